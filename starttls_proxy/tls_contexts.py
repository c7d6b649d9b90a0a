"""TLS server contexts: certificates loaded, checked and chosen by SNI.

Only the TLS helper process (and ``--check``) calls this module: the main
process never reads a private key. With ``isolation.key_server`` the helper
does not either: it loads key references (``provider``) in their place.

Policy: TLS 1.2 or newer, forward secrecy only (ECDHE suites for TLS 1.2; TLS
1.3 suites are all ephemeral), key shares X25519 and P-256, RSA or ECDSA
certificates, no compression, no renegotiation.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from OpenSSL import SSL
from OpenSSL._util import exception_from_error_queue
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _openssl

from starttls_proxy.keyserver import PrivateKey, read_private_key
from starttls_proxy.settings import ConfigError, TLSConfig

TLS12_CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20"
KEY_SHARE_GROUPS = b"X25519:P-256"
_MIN_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}
#: A TLS 1.3 handshake takes two client flights; a few more rounds are slack.
WARM_UP_FLIGHTS = 4
WARM_UP_READ = 64 * 1024


@dataclass(frozen=True)
class LoadedCertificate:
    context: SSL.Context
    #: DNS names the leaf is valid for (SAN, or CN when there is no SAN).
    names: tuple[str, ...]
    not_after: datetime
    serial: int


def _new_context(min_version: str) -> SSL.Context:
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(_MIN_VERSIONS[min_version])
    context.set_options(
        SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_RENEGOTIATION
    )
    context.set_cipher_list(TLS12_CIPHERS)
    # pyOpenSSL only exposes a single ECDH curve; the group list needs the
    # binding underneath it.
    if not _openssl.SSL_CTX_set1_curves_list(context._context, KEY_SHARE_GROUPS):
        raise RuntimeError("OpenSSL refused the key share groups")
    # Workers are single-use processes: a server-side session cache would die
    # with each one. Tickets (keys shared through the helper) still resume.
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    return context


def _names(leaf: x509.Certificate) -> tuple[str, ...]:
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        return tuple(n.lower() for n in san.value.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        common = leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        return tuple(str(attribute.value).lower() for attribute in common)


def _use_key_reference(context: SSL.Context, reference: bytes) -> None:
    """Load a key reference, which only the provider (OPENSSL_CONF) decodes.

    Raises ``SSL.Error`` when the key does not match the certificate.
    """
    bio = _openssl.BIO_new_mem_buf(reference, len(reference))
    key = _openssl.PEM_read_bio_PrivateKey(bio, _ffi.NULL, _ffi.NULL, _ffi.NULL)
    _openssl.BIO_free(bio)
    if key == _ffi.NULL:
        _openssl.ERR_clear_error()
        raise ConfigError(["the key-reference provider is not loaded (OPENSSL_CONF)"])
    try:
        if not _openssl.SSL_CTX_use_PrivateKey(context._context, key):
            exception_from_error_queue(SSL.Error)
    finally:
        _openssl.EVP_PKEY_free(key)


def load_certificate(
    cert: Path, key: Path, min_version: str, where: str, reference: bytes | None = None
) -> LoadedCertificate:
    """Load one certificate and its key, or the key's ``reference`` (the key
    server made it from ``key``); refuse a pair that does not match."""
    problems: list[str] = []
    files = (("cert", cert),) if reference is not None else (("cert", cert), ("key", key))
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
        if reference is not None:
            _use_key_reference(context, reference)
        else:
            context.use_privatekey(_read_key_file(key, f"{where}.key"))
        context.check_privatekey()
    except SSL.Error:
        raise ConfigError(
            [f"{where}.key: does not match the certificate {cert} (refusing the pair)"]
        ) from None
    return LoadedCertificate(
        context=context,
        names=_names(leaf),
        not_after=leaf.not_valid_after_utc,
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

    def reachable_from(self, context: SSL.Context) -> list[int]:
        """The certificates (indexes) a connection that starts on ``context``
        may end up serving: SNI switches only away from the default."""
        if context is self.default:
            return list(range(len(self.certificates)))
        return [i for i, c in enumerate(self.certificates) if c.context is context]

    def context_for(self, server_name: str | None) -> SSL.Context:
        if server_name:
            name = server_name.lower().rstrip(".")
            for certificate in self.certificates:
                if any(_name_matches(pattern, name) for pattern in certificate.names):
                    return certificate.context
        return self.default

    def warm_up(self) -> None:
        """One TLS 1.3 handshake per certificate, in memory, before any fork.

        OpenSSL fetches its algorithms and fills its caches on first use;
        done here, every worker inherits them instead of paying again (about
        a millisecond of each handshake). With key references the helper has
        no key-server connection, so the handshake fails at the signature,
        once every algorithm a worker needs has been fetched (the provider's
        signature method included), without a signature being counted.
        """
        client_context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        for certificate in self.certificates:
            with contextlib.suppress(SSL.Error):
                _handshake_in_memory(certificate.context, client_context)

    def _on_server_name(self, connection: SSL.Connection) -> None:
        raw = connection.get_servername()
        name = raw.decode("ascii", "replace") if raw else None
        context = self.context_for(name)
        if context is not connection.get_context():
            connection.set_context(context)


def _handshake_in_memory(server_context: SSL.Context, client_context: SSL.Context) -> None:
    server = SSL.Connection(server_context)
    server.set_accept_state()
    client = SSL.Connection(client_context)
    client.set_connect_state()
    for _ in range(WARM_UP_FLIGHTS):
        done = True
        for sender, receiver in ((client, server), (server, client)):
            try:
                sender.do_handshake()
            except SSL.WantReadError:
                done = False
            with contextlib.suppress(SSL.WantReadError):
                while True:
                    receiver.bio_write(sender.bio_read(WARM_UP_READ))
        if done:
            return


def _select_alpn(
    connection: SSL.Connection, offered: list[bytes]
) -> bytes | SSL._NoOverlappingProtocols:
    """Pick the first of the listener's protocols (set as app data) offered."""
    wanted = connection.get_app_data() or ()
    for name in wanted:
        if name in offered:
            return bytes(name)
    return SSL.NO_OVERLAPPING_PROTOCOLS


def load_certificates(tls: TLSConfig, references: list[bytes] | None = None) -> CertificateStore:
    """Load every configured certificate, collecting all problems at once.

    ``references``: the key server's references for the keys, in order.
    """
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
                    references[index] if references is not None else None,
                )
            )
        except ConfigError as error:
            problems.extend(error.problems)
    if problems:
        raise ConfigError(problems)
    return CertificateStore(loaded)
