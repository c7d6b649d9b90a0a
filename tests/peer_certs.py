"""XMPP servers' certificates for the peer-certificate tests, made with
``cryptography`` (trustme cannot write an ``id-on-xmppAddr`` otherName).

``Authority.new`` is a root CA (trustme's); ``issue`` gives a leaf (or an intermediate)
with the subjectAltName dNSNames and xmppAddrs asked for, the extended key
usage asked for, and a validity that can lie in the past. ``Issued.write``
puts the leaf, its chain up to (not including) the root, and the key where
a TLS client loads them.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: id-on-xmppAddr (RFC 6120 section 13.7.1.4).
XMPP_ADDR = x509.ObjectIdentifier("1.3.6.1.5.5.7.8.5")
_DAY = datetime.timedelta(days=1)


def der_string(tag: int, value: bytes) -> bytes:
    """One DER string of universal ``tag`` (0x0C UTF8String, 0x16 IA5String)."""
    size = len(value)
    length = bytes((size,)) if size < 0x80 else bytes((0x82, size >> 8, size & 0xFF))
    return bytes((tag,)) + length + value


def xmpp_addr(value: str | bytes, tag: int = 0x0C) -> x509.OtherName:
    """An xmppAddr otherName; bytes are taken as they are (malformed UTF-8)."""
    raw = value.encode() if isinstance(value, str) else value
    return x509.OtherName(XMPP_ADDR, der_string(tag, raw))


@dataclass
class Issued:
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    #: Its issuers up to the root, the root left out.
    chain: list[x509.Certificate] = field(default_factory=list)

    def write(self, directory: Path, name: str) -> tuple[Path, Path]:
        """``NAME.pem`` (the leaf, then its chain) and ``NAME-key.pem``."""
        cert, key = directory / f"{name}.pem", directory / f"{name}-key.pem"
        cert.write_bytes(
            b"".join(c.public_bytes(Encoding.PEM) for c in [self.certificate, *self.chain])
        )
        key.write_bytes(self.key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
        return cert, key

    def authority(self) -> Authority:
        """This certificate as the issuer of others (an intermediate)."""
        return Authority(self.key, self.certificate, [self.certificate, *self.chain])


@dataclass
class Authority:
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    #: What a leaf it issues sends after itself (empty for a root).
    chain: list[x509.Certificate] = field(default_factory=list)

    @classmethod
    def new(cls, name: str) -> Authority:
        """A root CA (trustme's), whose key signs the leaves made here."""
        ca = trustme.CA(organization_name=name)
        key = load_pem_private_key(ca.private_key_pem.bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cls(key, x509.load_pem_x509_certificate(ca.cert_pem.bytes()))

    def pem(self) -> bytes:
        return self.certificate.public_bytes(Encoding.PEM)

    def issue(
        self,
        dns: Sequence[str] = (),
        xmpp: Sequence[str | x509.OtherName] = (),
        *,
        usages: Sequence[x509.ObjectIdentifier] | None = (
            ExtendedKeyUsageOID.SERVER_AUTH,
            ExtendedKeyUsageOID.CLIENT_AUTH,
        ),
        expired: bool = False,
        ca: bool = False,
        common_name: str = "peer",
    ) -> Issued:
        """A certificate for ``dns`` names and ``xmpp`` addresses (no SAN at
        all when both are empty); ``usages``: its extended key usage (None:
        no such extension)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        start, end = (now - 30 * _DAY, now - _DAY) if expired else (now - _DAY, now + 90 * _DAY)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns]
        names += [a if isinstance(a, x509.OtherName) else xmpp_addr(a) for a in xmpp]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        if usages is not None and not ca:
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        certificate = builder.sign(self.key, hashes.SHA256())
        return Issued(key, certificate, list(self.chain))
