"""The key server: the only process of the proxy that holds private keys.

Heartbleed leaked private keys because the process that parsed attacker
bytes held them. Here the TLS workers hold key *references* (see
``provider``) and ask this process for each signature, so a memory
disclosure in a worker, in the TLS helper or in the main process finds no
key. A compromised worker is at most a signing oracle, and a narrow one:
for the certificates its own connection may use, for as many signatures as
one handshake needs (one), over data shaped like what a TLS endpoint of its
role signs in a handshake (a server's TLS 1.3 CertificateVerify or TLS 1.2
ServerKeyExchange for a worker that accepts, a client's TLS 1.3
CertificateVerify for one that connects), for its lifetime.

Process: the keeper starts it (``python -m starttls_proxy.keys.server FD``, a
fresh interpreter, no OpenSSL provider) before any TLS helper and restarts
it when it dies; it outlives helper restarts and reloads. Before it holds a
key it confines itself (``confine``): network, IPC and UTS namespaces of
its own, chroot into the workers' empty directory, the last UID of
``isolation.uid_range`` with no groups, not dumpable, no_new_privs, no core,
no fork, and a seccomp allow-list. It never opens a file: the keeper opens
the configured key files and passes the descriptors, at start, on every
helper start and on reload.

Sockets (all SOCK_SEQPACKET: one message per datagram):

* control, with the keeper: ``wire.KEEPER_TO_KEY_SERVER`` and
  ``wire.KEY_SERVER_TO_KEEPER`` (JSON); the exit statuses are
  ``wire.SubordinateExit``.

* link, with one TLS helper (binary, ``Link``): a grant, the worker's role
  (``wire.TLSRole``), a count and that many certificate indexes (u16 each),
  with one descriptor attached: a worker's connection, which may use the
  keys of those certificates and no other, for its role's signatures.

* connection, with one worker (binary, ``keys/keyserver_wire.h``): one signature
  request, one answer.

Links and connections are served by ``keys._service`` (C, linked with the
system's libcrypto): each session wakes this process twice while its
handshake waits, too often for a Python loop's cold dispatch. This module
keeps what happens once: confinement, the keeper's messages, reading keys.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import hashlib
import os
import socket
import struct
import sys
import textwrap
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from starttls_proxy import procname
from starttls_proxy.sandbox import seccomp
from starttls_proxy.sandbox.layers import (
    LIBC,
    become,
    harden,
    prepare_root_directory,
    unshare_namespaces,
)
from starttls_proxy.sandbox.layers import problems as sandbox_problems
from starttls_proxy.settings import ConfigError, IsolationConfig, decode
from starttls_proxy.wire import (
    KEEPER_TO_KEY_SERVER,
    MAX_MESSAGE,
    KeyServerCounts,
    KeyServerStart,
    KeysLoaded,
    LayerStatus,
    LoadKeys,
    Message,
    Problems,
    Ready,
    SigningCounts,
    SubordinateExit,
    TLSRole,
    WireError,
)

if TYPE_CHECKING:
    from starttls_proxy.keys._service import Service

# The key reference's format (``provider/keyref.h``, the provider's reader;
# tests/keyserver/test_keyserver_wire.py holds these values to it).
REFERENCE_LABEL = "STARTTLS-PROXY KEY REFERENCE"
REFERENCE_MAGIC = b"STPK"
REFERENCE_VERSION = 1
KIND_EC, KIND_RSA = 1, 2
KEY_ID_SIZE = 16
#: cryptography's curve names -> the reference's curve codes.
CURVES = {"secp256r1": 1, "secp384r1": 2, "secp521r1": 3}

#: A PEM private key is a few KiB; more is not a key file.
MAX_KEY_FILE = 1024 * 1024
#: Seconds between two counts messages to the keeper.
COUNTS_INTERVAL = 0.25

# The wire format of a worker's connection (``keys/keyserver_wire.h``, which
# tests/keyserver/test_keyserver_wire.py holds these values to), for the tests
# and scripts that speak it.
WIRE_VERSION = 1
#: version, scheme (request) or status (answer), digest or 0, 0, request id.
HEADER = struct.Struct(">BBBBI")
#: The most data a request may carry (``MAX_DATA_SIZE``).
MAX_DATA = 1024
MAX_REQUEST = HEADER.size + KEY_ID_SIZE + MAX_DATA
STATUS_SIGNED, STATUS_REFUSED = 0, 1
#: RFC 8446 section 4.4.3: what a TLS 1.3 server's CertificateVerify signs,
#: followed by the transcript hash (a worker that accepts), and a client's
#: (a worker that connects).
TLS13_SERVER_CONTEXT = b" " * 64 + b"TLS 1.3, server CertificateVerify\x00"
TLS13_CLIENT_CONTEXT = b" " * 64 + b"TLS 1.3, client CertificateVerify\x00"
#: A grant (``keys/keyserver_wire.h``): the role (``enum grant_role``, whose
#: values are ``wire.TLSRole``'s) and the count of certificate indexes.
GRANT_HEADER = struct.Struct(">BH")
#: The most certificate indexes one grant may carry.
MAX_CERTIFICATES = 4096


class Scheme(enum.IntEnum):
    ECDSA = 1
    RSA_PKCS1 = 2
    RSA_PSS = 3


class Digest(enum.IntEnum):
    SHA256 = 1
    SHA384 = 2
    SHA512 = 3


PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


def read_private_key(data: bytes, where: str) -> PrivateKey:
    """Parse a PEM private key; raise ``ConfigError`` naming ``where``."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as error:
        raise ConfigError([f"{where}: not a usable PEM private key: {error}"]) from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ConfigError([f"{where}: only RSA and ECDSA keys are supported"])
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name not in CURVES:
        raise ConfigError([f"{where}: only the curves P-256, P-384 and P-521 are supported"])
    return key


def key_id(public_key: PublicKey) -> bytes:
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()[:KEY_ID_SIZE]


def signature_request(
    key: PublicKey, data: bytes, scheme: Scheme, request_id: int, digest: Digest = Digest.SHA256
) -> bytes:
    """A worker's request to sign ``data`` (``keys/keyserver_wire.h``), as tests and
    benchmarks make it; in a worker, the provider makes it."""
    return HEADER.pack(WIRE_VERSION, scheme, digest, 0, request_id) + key_id(key) + data


def encode_grant(certificates: list[int], role: TLSRole) -> bytes:
    """A grant (``keys/keyserver_wire.h``): a worker of ``role`` may use the
    keys of ``certificates``, as the TLS helper sends it."""
    if len(certificates) > MAX_CERTIFICATES:
        raise ValueError(f"{len(certificates)} certificates: at most {MAX_CERTIFICATES}")
    indexes = struct.pack(f">{len(certificates)}H", *certificates)
    return GRANT_HEADER.pack(TLSRole(role), len(certificates)) + indexes


def _sized(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def _unsigned(number: int) -> bytes:
    return number.to_bytes((number.bit_length() + 7) // 8 or 1, "big")


def encode_reference(key: PrivateKey) -> bytes:
    """The key reference (PEM) of ``key``: public facts only.

    Body (big-endian; parsed by the provider's ``key_parse_reference``):
    ``"STPK"``, version 1, kind (1 EC, 2 RSA), key id (``key_id``), then for
    EC the curve (1 P-256, 2 P-384, 3 P-521), the point size (u16) and the
    uncompressed point; for RSA the modulus size (u16), the modulus, the
    exponent size (u16) and the exponent.
    """
    public = key.public_key()
    head = REFERENCE_MAGIC + bytes([REFERENCE_VERSION])
    if isinstance(public, ec.EllipticCurvePublicKey):
        point = public.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        body = (
            head
            + bytes([KIND_EC])
            + key_id(public)
            + bytes([CURVES[public.curve.name]])
            + _sized(point)
        )
    else:
        numbers = public.public_numbers()
        body = (
            head
            + bytes([KIND_RSA])
            + key_id(public)
            + _sized(_unsigned(numbers.n))
            + _sized(_unsigned(numbers.e))
        )
    lines = textwrap.wrap(base64.b64encode(body).decode("ascii"), 64)
    pem = [f"-----BEGIN {REFERENCE_LABEL}-----", *lines, f"-----END {REFERENCE_LABEL}-----", ""]
    return "\n".join(pem).encode()


class Link:
    """The TLS helper's end of its link to the key server."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        # Never wait on the key server: a worker it cannot reach just fails
        # its handshake.
        sock.setblocking(False)

    def grant(self, connection: socket.socket, certificates: list[int], role: TLSRole) -> None:
        """Hand the key server its end of a worker's ``connection``, good for
        the keys of ``certificates`` only and the signatures of ``role``, and
        close ours. When the key server cannot be reached the worker's end
        has no peer, and its signatures fail at once. Requests the worker
        sends before the key server took its end wait in the socket."""
        message = encode_grant(certificates, role)
        with connection, contextlib.suppress(OSError):
            socket.send_fds(self.sock, [message], [connection.fileno()])

    def connection_for(self, certificates: list[int], role: TLSRole) -> int:
        """A new connection for one worker (see ``grant``); returns the
        worker's end, which the caller closes."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.grant(ours, certificates, role)
        return theirs.detach()


# ----------------------------------------------------------------------
# Confinement.


def _chroot(isolation: IsolationConfig) -> None:
    prepare_root_directory(isolation.chroot)
    os.chroot(isolation.chroot)
    os.chdir("/")


def user_id(isolation: IsolationConfig) -> int:
    """The key server's UID: the last of ``uid_range`` (workers never get it)."""
    first, count = isolation.uid_range
    return first + count - 1


def _warm_up() -> None:
    """Use both OpenSSLs once before the seccomp filter: they set some things
    up on first use (random generator, algorithm tables, configuration)."""
    from starttls_proxy.keys import _service

    _service.warm_up()
    key = ec.generate_private_key(ec.SECP256R1())
    key.sign(b"warm-up", ec.ECDSA(hashes.SHA256()))


def confine(isolation: IsolationConfig) -> list[LayerStatus]:
    """Enter every enabled layer that works here; say which did."""
    layers = isolation.layers
    root = os.geteuid() == 0
    program = b""
    if layers.seccomp:
        with contextlib.suppress(ImportError, RuntimeError, OSError):
            program = seccomp.compile_filter(seccomp.KEY_SERVER_ALLOWED, fionbio=True)
    _warm_up()
    uid = user_id(isolation)
    steps = (
        ("namespaces", layers.namespaces, root, unshare_namespaces, "no network, own IPC and UTS"),
        ("chroot", layers.chroot, root, lambda: _chroot(isolation), f"chroot {isolation.chroot}"),
        ("identity", layers.identity, root, lambda: become(uid), f"UID {uid}, no groups"),
        ("hardening", layers.hardening, True, harden, "no dumps, no_new_privs"),
        (
            "seccomp",
            layers.seccomp,
            bool(program),
            lambda: seccomp.load_filter(program, LIBC),
            "seccomp-bpf allow-list",
        ),
    )
    statuses = []
    for name, enabled, possible, step, description in steps:
        if not enabled:
            statuses.append(LayerStatus(name, False, "off (isolation.layers)"))
            continue
        if not possible:
            reason = "libseccomp not usable" if name == "seccomp" else "needs root"
            statuses.append(LayerStatus(name, False, f"key server: {reason}"))
            continue
        try:
            step()
        except OSError as error:
            statuses.append(LayerStatus(name, False, f"key server: {error}"))
            continue
        statuses.append(LayerStatus(name, True, description))
    return statuses


# ----------------------------------------------------------------------
# The server.


def _read_key_file(fd: int, where: str) -> PrivateKey:
    chunks = []
    offset = 0
    while chunk := os.pread(fd, 65536, offset):
        chunks.append(chunk)
        offset += len(chunk)
        if offset > MAX_KEY_FILE:
            raise ConfigError([f"{where}: larger than {MAX_KEY_FILE} bytes: not a key file"])
    return read_private_key(b"".join(chunks), where)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


class KeyServer:
    def __init__(self, control: socket.socket, service: Service) -> None:
        self.control = control
        self.service = service

    def load(self, wheres: tuple[str, ...], fds: list[int]) -> KeysLoaded | Problems:
        """Read the keys whose descriptors came with a load request."""
        link_fd, key_fds = fds[0], fds[1:]
        keys: list[PrivateKey] = []
        problems: list[str] = []
        try:
            if len(key_fds) != len(wheres):
                raise ConfigError([f"{len(key_fds)} key files for {len(wheres)} certificates"])
            for fd, where in zip(key_fds, wheres, strict=True):
                try:
                    keys.append(_read_key_file(fd, where))
                except ConfigError as error:
                    problems.extend(error.problems)
                except OSError as error:
                    problems.append(f"{where}: cannot read: {error.strerror}")
        except ConfigError as error:
            problems.extend(error.problems)
        finally:
            _close_all(key_fds)
        if problems:
            os.close(link_fd)
            return Problems(tuple(problems))
        der = serialization.Encoding.DER, serialization.PrivateFormat.PKCS8
        plain = serialization.NoEncryption()
        try:
            self.service.add_link(
                link_fd,
                [(key_id(key.public_key()), key.private_bytes(*der, plain)) for key in keys],
            )
        except (ValueError, OSError) as error:  # libcrypto refused what cryptography read
            os.close(link_fd)
            return Problems((f"the key server's libcrypto: {error}",))
        return KeysLoaded(tuple(encode_reference(key).decode() for key in keys))

    def on_control(self) -> bool:
        """Serve a keeper message; False once the keeper has left."""
        try:
            message, fds, _, _ = socket.recv_fds(self.control, MAX_MESSAGE, 256)
        except ConnectionResetError:  # the keeper left with counts unread
            return False
        if not message:
            _close_all(fds)
            return False
        try:
            request = KEEPER_TO_KEY_SERVER.decode(message)
        except WireError as error:
            request = None
            print(f"key server: unusable message from the keeper: {error}", file=sys.stderr)
        match request:
            case LoadKeys(certificates=wheres) if fds:
                self._send(self.load(wheres, fds))
            case LoadKeys():
                self._send(Problems(("a load request without a link",)))
            case _:
                _close_all(fds)
        return True

    def _send(self, message: Message) -> None:
        with contextlib.suppress(OSError):
            self.control.send(message.encode())

    def report_counts(self) -> None:
        self._send(KeyServerCounts(SigningCounts(*self.service.take_counts())))

    def serve_forever(self) -> int:
        while True:
            if not self.service.serve(COUNTS_INTERVAL):
                self.report_counts()
            elif not self.on_control():
                return SubordinateExit.DONE


def serve(control: socket.socket) -> int:
    """Confine, report, then sign for the workers until the keeper leaves."""
    procname.name_subordinate(procname.KEY_SERVER)
    try:
        start = KEEPER_TO_KEY_SERVER.decode(control.recv(MAX_MESSAGE))
        if not isinstance(start, KeyServerStart):
            raise WireError(f"{type(start).__name__} before KeyServerStart")
    except WireError as error:
        control.send(Problems((f"the key server's first message: {error}",)).encode())
        return SubordinateExit.REFUSED
    isolation = decode(IsolationConfig, start.isolation)
    from starttls_proxy.keys._service import Service

    # Its epoll descriptor is made before the seccomp filter forbids that.
    server = KeyServer(control, Service(control.fileno()))
    statuses = confine(isolation)
    problems = sandbox_problems(isolation, statuses)
    if problems:
        control.send(Problems(tuple(problems)).encode())
        return SubordinateExit.REFUSED
    control.send(Ready(tuple(statuses)).encode())
    return server.serve_forever()


if __name__ == "__main__":
    sys.exit(serve(socket.socket(fileno=int(sys.argv[1]))))
