"""The TLS helper's *description*: everything it needs to know, as the keeper
hands it over.

The helper (C, ``tls/helper/``) runs as root and forks every worker, so what
it parses should be as plain as the data allows: a list of records, each a
tag (u16), a length (u32) and a value, big-endian, laid out in
``tls/helper/wire.h`` (which is the reference; a test holds ``Tag`` and
``Layer`` in agreement with it). The keeper writes it into a memfd
(certificate chains can make it larger than a datagram) and has already
done on the way what needs Python: validating the settings, compiling the
seccomp filter, preparing the chroot directory, and reading the certificate
chains, so that a missing or garbled file is refused with the same messages
as always, naming the YAML path, before any helper starts. The private keys
are not in it: with the key server the helper gets key references (PEM of
public facts), otherwise the paths of the key files, which it reads itself.

The TLS policy is defined here once, for the C helper and for pyOpenSSL
(``tls.contexts``, used by ``--check``) alike: TLS 1.2 or newer, forward
secrecy only (ECDHE suites for TLS 1.2; TLS 1.3 suites are all ephemeral),
key shares X25519 and P-256.

The keeper imports this module, so it imports ``cryptography.x509`` for the
chains and nothing else of TLS: neither pyOpenSSL nor pydantic nor a YAML
parser.
"""

from __future__ import annotations

import enum
import os
import re
import struct
import warnings
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from starttls_proxy.settings import ConfigError, IsolationConfig, IsolationMode, TLSConfig

TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
TLS13_SUITES = "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256"
KEY_SHARE_GROUPS = "X25519:P-256"

DESCRIPTION_VERSION = 1
#: The helper refuses a larger description, more certificates, or more
#: names for one certificate (its leaf's DNS names) than these.
MAX_DESCRIPTION = 4 * 1024 * 1024
MAX_CERTIFICATES = 64
MAX_NAMES = 256
_RECORD_HEADER = struct.Struct("!HI")
_MIN_VERSIONS = {"1.2": 0x0303, "1.3": 0x0304}


class Tag(enum.IntEnum):
    """``enum description_tag`` of ``tls/helper/wire.h``."""

    VERSION = 1
    MIN_VERSION = 2
    TLS12_CIPHERS = 3
    TLS13_SUITES = 4
    GROUPS = 5
    CERTIFICATE = 6
    CHAIN = 7
    CHAIN_PATH = 8
    KEY = 9
    KEY_PATH = 10
    NAME = 11
    UID_RANGE = 12
    CHROOT = 13
    MEMORY_LIMIT = 14
    SPARE_WORKERS = 15
    LAYERS = 16
    STRICT = 17
    SELF_TEST = 18
    SECCOMP = 19
    SECCOMP_MISSING = 20
    CHROOT_MISSING = 21
    PROVIDER = 22
    PROBE_ONLY = 23
    TRUST = 24
    UID_MAP = 25


class Layer(enum.IntEnum):
    """``enum layer`` of ``tls/helper/wire.h``: the sandbox layers in the order a
    worker enters them. Lowercased, each names its switch in
    ``settings.IsolationLayers``."""

    PID_NAMESPACE = 0
    NAMESPACES = 1
    CHROOT = 2
    IDENTITY = 3
    HARDENING = 4
    MEMORY_LIMIT = 5
    SECCOMP = 6


def dns_names(leaf: x509.Certificate) -> tuple[str, ...]:
    """The DNS names ``leaf`` is valid for: its SAN, or its CN when it has no SAN."""
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        return tuple(n.lower() for n in san.value.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        common = leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        return tuple(str(attribute.value).lower() for attribute in common)


def layer_mask(isolation: IsolationConfig) -> int:
    """Bit ``1 << layer`` for every layer ``isolation.layers`` enables."""
    return sum(1 << layer for layer in Layer if getattr(isolation.layers, layer.name.lower()))


def describe(
    tls: TLSConfig,
    isolation: IsolationConfig,
    *,
    key_references: list[bytes] | None,
    provider: Path | None,
    seccomp_program: bytes | None,
    seccomp_missing: str | None,
    chroot_missing: str | None,
    uid_range: tuple[int, int],
    uid_map_size: int | None = None,
    probe_only: bool = False,
) -> bytes:
    """The description of a helper serving ``tls`` in workers isolated as
    ``isolation`` says.

    ``key_references``: the key server's, one per certificate, in order
    (None: the helper reads the key files). ``provider``: the key-reference
    provider the helper loads. ``seccomp_program``, or why there is none
    (``seccomp_missing``), when the seccomp layer is on. ``chroot_missing``:
    why the chroot directory could not be prepared. ``uid_range``: the
    workers' UIDs, the key server's excluded. ``uid_map_size``: the keeper's
    map of the range comes with the description (``tls/helper/wire.h``
    section 2a), this many bytes. ``probe_only``: the helper
    only reports which layers work here, and exits (``--isolation-report``).

    Raises ``ConfigError`` naming every certificate file that is missing or
    not a PEM chain.
    """
    if key_references is not None and len(key_references) != len(tls.certificates):
        raise ValueError("one key reference per certificate")
    if seccomp_program is not None and seccomp_missing is not None:
        raise ValueError("a seccomp program and why there is none")
    out = _Records()
    out.add(Tag.VERSION, struct.pack("!I", DESCRIPTION_VERSION))
    out.add(Tag.MIN_VERSION, struct.pack("!H", _MIN_VERSIONS[tls.min_version]))
    out.add(Tag.TLS12_CIPHERS, TLS12_CIPHERS.encode())
    out.add(Tag.TLS13_SUITES, TLS13_SUITES.encode())
    out.add(Tag.GROUPS, KEY_SHARE_GROUPS.encode())
    problems: list[str] = []
    if len(tls.certificates) > MAX_CERTIFICATES:
        problems.append(
            f"tls.certificates: {len(tls.certificates)} certificates; the TLS helper"
            f" takes at most {MAX_CERTIFICATES}"
        )
    for index, entry in enumerate(tls.certificates):
        where = f"tls.certificates[{index}]"
        reference = key_references[index] if key_references is not None else None
        try:
            chain, names = _read_chain(entry.cert, entry.key, where, reference is None)
        except ConfigError as error:
            problems.extend(error.problems)
            continue
        if len(names) > MAX_NAMES:
            problems.append(
                f"{where}.cert: the certificate names {len(names)} hosts; the TLS helper"
                f" takes at most {MAX_NAMES} per certificate"
            )
            continue
        out.add(Tag.CERTIFICATE, where.encode())
        out.add(Tag.CHAIN, chain)
        out.add(Tag.CHAIN_PATH, os.fsencode(entry.cert))
        if reference is not None:
            out.add(Tag.KEY, reference)
        else:
            out.add(Tag.KEY_PATH, os.fsencode(entry.key))
        for name in names:
            out.add(Tag.NAME, name.encode())
    trust = []
    for path in () if probe_only else tls.peer_trust:
        try:
            trust.append(read_trust_store(path))
        except ConfigError as error:
            problems.extend(error.problems)
    if problems:
        raise ConfigError(problems)
    out.add(Tag.UID_RANGE, struct.pack("!II", *uid_range))
    if uid_map_size is not None:
        out.add(Tag.UID_MAP, struct.pack("!I", uid_map_size))
    out.add(Tag.CHROOT, os.fsencode(isolation.chroot))
    if chroot_missing is not None:
        out.add(Tag.CHROOT_MISSING, chroot_missing.encode())
    out.add(Tag.MEMORY_LIMIT, struct.pack("!Q", isolation.memory_limit))
    out.add(Tag.SPARE_WORKERS, struct.pack("!I", isolation.spare_workers))
    out.add(Tag.LAYERS, struct.pack("!I", layer_mask(isolation)))
    out.add(Tag.STRICT, bytes((isolation.mode is IsolationMode.STRICT,)))
    out.add(Tag.SELF_TEST, bytes((isolation.self_test,)))
    if seccomp_program is not None:
        out.add(Tag.SECCOMP, seccomp_program)
    if seccomp_missing is not None:
        out.add(Tag.SECCOMP_MISSING, seccomp_missing.encode())
    if provider is not None:
        out.add(Tag.PROVIDER, os.fsencode(provider))
    for store in trust:
        out.add(Tag.TRUST, store)
    description = out.join()
    if len(description) > MAX_DESCRIPTION:
        # Only certificate chains and trust stores can make it this large.
        raise ConfigError(
            [
                f"tls.certificates: the chains and the peer trust stores take more than"
                f" {MAX_DESCRIPTION} bytes together"
            ]
        )
    return description


def _read_chain(cert: Path, key: Path, where: str, key_file: bool) -> tuple[bytes, tuple[str, ...]]:
    """The chain file's bytes and its leaf's names; ``key_file``: the key's
    file must be there too (no key server to have read it)."""
    problems: list[str] = []
    files = (("cert", cert), ("key", key)) if key_file else (("cert", cert),)
    for label, path in files:
        if not path.is_file():
            problems.append(f"{where}.{label}: file not found: {path}")
    if problems:
        raise ConfigError(problems)
    try:
        chain = cert.read_bytes()
        # The leaf alone first: its errors say more about a file that holds
        # no certificate at all (a key, say) than the whole chain's.
        leaf = x509.load_pem_x509_certificate(chain)
        x509.load_pem_x509_certificates(chain)
    except (ValueError, OSError) as error:
        raise ConfigError([f"{where}.cert: not a PEM certificate chain: {error}"]) from None
    return chain, dns_names(leaf)


_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.*?-----END CERTIFICATE-----", re.DOTALL
)


def read_trust_store(path: Path) -> bytes:
    """The CA certificates of ``path`` (a listener's
    ``peer_certificates.trust``) as the helper loads them: PEM, nothing
    else. A certificate that ``cryptography`` cannot read is left out (the
    system bundle holds a few that bend RFC 5280, which it warns it will
    refuse one day), so that one of them cannot make the whole store
    unusable. ``ConfigError`` when the file is missing or holds no
    certificate at all."""
    where = f"peer_certificates.trust: {path}"
    try:
        blocks = _PEM_CERTIFICATE.findall(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError([f"{where}: file not found"]) from None
    except OSError as error:
        raise ConfigError([f"{where}: cannot read: {error.strerror}"]) from None
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for block in blocks:
            try:
                found.append(x509.load_pem_x509_certificate(block))
            except ValueError:
                continue
    if not found:
        raise ConfigError([f"{where}: not a PEM list of CA certificates (none found)"])
    return b"".join(certificate.public_bytes(Encoding.PEM) for certificate in found)


class _Records:
    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def add(self, tag: Tag, value: bytes) -> None:
        self._parts += (_RECORD_HEADER.pack(tag, len(value)), value)

    def join(self) -> bytes:
        return b"".join(self._parts)


def records(description: bytes) -> list[tuple[Tag, bytes]]:
    """The records of ``description`` in order; ``ValueError`` when it is not
    a list of whole records with known tags."""
    found: list[tuple[Tag, bytes]] = []
    offset = 0
    while offset < len(description):
        if offset + _RECORD_HEADER.size > len(description):
            raise ValueError(f"record header truncated at {offset}")
        tag, length = _RECORD_HEADER.unpack_from(description, offset)
        offset += _RECORD_HEADER.size
        if offset + length > len(description):
            raise ValueError(f"record {tag} truncated at {offset}")
        found.append((Tag(tag), description[offset : offset + length]))
        offset += length
    return found
