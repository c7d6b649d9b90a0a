"""The TLS policy rendered with pyOpenSSL: certificates loaded, checked and
chosen by SNI.

The TLS helper (C, ``tls/helper/contexts.c``) serves the policy that
``tls.description`` writes down once; this module builds the same
contexts with pyOpenSSL, which stays the place where a certificate, its key
and the policy are validated: ``starttls-proxy --check`` loads every
configured pair here (refusing a key that does not match its
certificate), and ``tests/tlshelper/test_handshakes.py`` holds the C
helper and these contexts to the same handshake results. Only ``--check``
reads private keys in this way; the running proxy never imports it.

Policy: that of ``tls.description``, RSA or ECDSA certificates, no
compression, no renegotiation, no session cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from OpenSSL import SSL
from OpenSSL._util import lib as _openssl

from starttls_proxy.keys.server import PrivateKey, read_private_key
from starttls_proxy.settings import ConfigError, TLSConfig
from starttls_proxy.tls.description import (
    KEY_SHARE_GROUPS,
    TLS12_CIPHERS,
    TLS13_SUITES,
    dns_names,
)

_MIN_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}


@dataclass(frozen=True)
class LoadedCertificate:
    context: SSL.Context
    #: DNS names the leaf is valid for (SAN, or CN when there is no SAN).
    names: tuple[str, ...]
    serial: int


def _new_context(min_version: str) -> SSL.Context:
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(_MIN_VERSIONS[min_version])
    context.set_options(
        SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_RENEGOTIATION
    )
    context.set_cipher_list(TLS12_CIPHERS.encode())
    # pyOpenSSL exposes neither the TLS 1.3 suites nor more than one ECDH
    # curve; both need the binding underneath it.
    if not _openssl.SSL_CTX_set_ciphersuites(context._context, TLS13_SUITES.encode()):
        raise RuntimeError("OpenSSL refused the TLS 1.3 cipher suites")
    if not _openssl.SSL_CTX_set1_curves_list(context._context, KEY_SHARE_GROUPS.encode()):
        raise RuntimeError("OpenSSL refused the key share groups")
    # Workers are single-use processes: a server-side session cache would die
    # with each one. Tickets (keys shared through the helper) still resume.
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    return context


def load_certificate(cert: Path, key: Path, min_version: str, where: str) -> LoadedCertificate:
    """Load one certificate and its key; refuse a pair that does not match."""
    problems: list[str] = []
    files = (("cert", cert), ("key", key))
    for label, path in files:
        if not path.is_file():
            problems.append(f"{where}.{label}: file not found: {path}")
    if problems:
        raise ConfigError(problems)
    context = _new_context(min_version)
    try:
        leaf = x509.load_pem_x509_certificate(cert.read_bytes())
        context.use_certificate_chain_file(str(cert))
    except (ValueError, SSL.Error, OSError) as error:
        raise ConfigError([f"{where}.cert: not a PEM certificate chain: {error}"]) from None
    try:
        # The same failsafe as `sslmate download`: never serve a pair that
        # does not belong together.
        context.use_privatekey(_read_key_file(key, f"{where}.key"))
        context.check_privatekey()
    except SSL.Error:
        raise ConfigError(
            [f"{where}.key: does not match the certificate {cert} (refusing the pair)"]
        ) from None
    return LoadedCertificate(
        context=context,
        names=dns_names(leaf),
        serial=leaf.serial_number,
    )


def _name_matches(pattern: str, name: str) -> bool:
    if pattern == name:
        return True
    # RFC 6125 section 6.4.3: a wildcard stands for exactly one left-most label.
    if pattern.startswith("*."):
        head, _, rest = name.partition(".")
        return bool(head) and rest == pattern[2:]
    return False


def _read_key_file(key: Path, where: str) -> PrivateKey:
    try:
        data = key.read_bytes()
    except OSError as error:
        raise ConfigError([f"{where}: cannot read: {error.strerror}"]) from None
    return read_private_key(data, where)


class CertificateStore:
    """All configured certificates; the first is the default."""

    def __init__(self, certificates: list[LoadedCertificate]) -> None:
        self.certificates = certificates
        self.default = certificates[0].context
        self.default.set_tlsext_servername_callback(self._on_server_name)
        for certificate in certificates:
            certificate.context.set_alpn_select_callback(_select_alpn)

    def context_for(self, server_name: str | None) -> SSL.Context:
        if server_name:
            name = server_name.lower().rstrip(".")
            for certificate in self.certificates:
                if any(_name_matches(pattern, name) for pattern in certificate.names):
                    return certificate.context
        return self.default

    def _on_server_name(self, connection: SSL.Connection) -> None:
        raw = connection.get_servername()
        name = raw.decode("ascii", "replace") if raw else None
        context = self.context_for(name)
        if context is not connection.get_context():
            connection.set_context(context)


def _select_alpn(
    connection: SSL.Connection, offered: list[bytes]
) -> bytes | SSL._NoOverlappingProtocols:
    """Pick the first of the listener's protocols (set as app data) offered."""
    wanted = connection.get_app_data() or ()
    for name in wanted:
        if name in offered:
            return bytes(name)
    return SSL.NO_OVERLAPPING_PROTOCOLS


def load_certificates(tls: TLSConfig) -> CertificateStore:
    """Load every configured certificate, collecting all problems at once."""
    loaded: list[LoadedCertificate] = []
    problems: list[str] = []
    for index, entry in enumerate(tls.certificates):
        try:
            loaded.append(
                load_certificate(
                    entry.cert,
                    entry.key,
                    tls.min_version,
                    f"tls.certificates[{index}]",
                )
            )
        except ConfigError as error:
            problems.extend(error.problems)
    if problems:
        raise ConfigError(problems)
    return CertificateStore(loaded)
