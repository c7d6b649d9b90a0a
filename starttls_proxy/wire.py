"""What the main process and the TLS helper (C, ``tls/helper/``) say to each other.

``tls/helper/wire.h`` is the reference; every value here mirrors it, and a
test holds the two in agreement. Kept free of TLS imports: the main process
uses it and never loads OpenSSL.

* Spawn requests (main -> helper, with two descriptors): a fixed binary
  layout rather than JSON, because the helper is C and the request comes
  from the network-facing process: a parser that only copies
  length-prefixed fields into buffers of known size leaves little to get
  wrong. Integers are big-endian.
* The worker's report: the first frame on its plaintext channel, a 4-byte
  length and a JSON object, ``{"ok": true, "version", "cipher",
  "server_name", "alpn"}`` or ``{"ok": false, "reason"}``; with a
  ``"peer"`` object too when the request named a trust store (the peer
  certificate's verification and names).
* Worker exit codes, which the helper passes on for metrics.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass

from protocols._base import PeerCertificate, TLSInfo

EXIT_OK = 0
EXIT_HANDSHAKE_FAILED = 10
EXIT_NOT_TLS = 11
EXIT_CLIENT_GONE = 12
EXIT_TLS_ERROR = 13
#: Past the handshake deadline. The alarm's handler is ``_exit`` itself,
#: which gets the signal's number (SIGALRM) as its status: a PID namespace's
#: init ignores even the kernel's SIGALRM unless it has a handler.
EXIT_DEADLINE = 14
#: A worker that could not enter a layer it was meant to.
EXIT_SANDBOX_FAILED = 16
#: A spare worker that never got a connection (its helper left): not a
#: worker exit worth counting.
EXIT_SPARE_UNUSED = 17
#: The worker's own failure (out of memory under its RLIMIT_AS, an
#: impossible state), not its peer's: a crash.
EXIT_INTERNAL_ERROR = 18

#: Client bytes that may ride along with a spawn request: a ClientHello the
#: main process read before handing the socket off (16 KiB record + header).
MAX_EARLY_BYTES = 16 * 1024 + 5
#: The handshake timeout (ms) and the peer trust store; then the hint,
#: the ALPN list and the early bytes, each after its length (u8, u8, u16).
SPAWN_HEADER = struct.Struct("!IB")
SPAWN_FIXED_SIZE = SPAWN_HEADER.size + 1 + 1 + 2
#: Trust stores for peers' certificates a helper may hold (and so the
#: largest trust store number of a spawn request).
MAX_TRUST_STORES = 16
#: A peer certificate's names the worker reports, at most.
MAX_PEER_DNS_NAMES = 100
MAX_PEER_XMPP_ADDRS = 10
MAX_PEER_NAME = 255
#: A one-byte length: the most a server name hint or an ALPN list can be.
MAX_SHORT_FIELD = 255
MAX_SPAWN_REQUEST = SPAWN_FIXED_SIZE + 2 * MAX_SHORT_FIELD + MAX_EARLY_BYTES
#: The handshake timeout travels in milliseconds, as a u32.
MAX_HANDSHAKE_TIMEOUT = (2**32 - 1) / 1000

REPORT_HEADER = struct.Struct("!I")
MAX_REPORT_SIZE = 64 * 1024
#: What a worker may report: the versions the policy allows, OpenSSL's
#: cipher names, host names and ALPN names as the helper's parser admits
#: them (printable ASCII, no space), a failure's reason cut to one line.
REPORTED_VERSIONS = frozenset({"TLSv1.2", "TLSv1.3"})
_CIPHER_NAME = re.compile(r"[A-Z0-9_-]{1,64}")
_NAME = re.compile(r"[\x21-\x7e]{1,255}")
MAX_REASON = 200
#: A peer certificate's dNSName as the worker passes it on: an A-label or
#: a wildcard (the worker leaves out the others).
_DNS_NAME = re.compile(rf"[A-Za-z0-9.*-]{{1,{MAX_PEER_NAME}}}")
_PEER_VERIFY = frozenset({"ok", "untrusted", "none"})

#: TEST ONLY (``isolation.self_test``): the start of the line each worker
#: logs about its own sandbox.
SELF_TEST_LOG_PREFIX = "starttls_proxy.selftest "
#: TEST ONLY: a client sending this SNI makes its worker call a system call
#: outside the allow-list after the handshake (the filter must kill it).
FORBIDDEN_SYSCALL_SNI = "forbidden-syscall.self-test"


@dataclass(frozen=True)
class SpawnRequest:
    handshake_timeout: float
    #: Certificate choice when the client sends no SNI (XMPP's stream ``to``).
    server_name_hint: str | None = None
    #: ALPN protocols the worker may select (XEP-0368 direct TLS).
    alpn: tuple[str, ...] = ()
    #: Client bytes already read by the main process (see MAX_EARLY_BYTES):
    #: the start of a ClientHello, handled before anything read from the socket.
    early: bytes = b""
    #: Ask the client for a certificate and verify it against the helper's
    #: trust store of this number (1-based); 0: ask for none.
    peer_trust: int = 0

    def encode(self) -> bytes:
        """The request as ``tls/helper/wire.h`` lays it out; ``ValueError`` if
        a field does not fit in it."""
        hint = (self.server_name_hint or "").encode("ascii")
        if len(hint) > MAX_SHORT_FIELD:
            raise ValueError(f"server name hint longer than {MAX_SHORT_FIELD} bytes")
        alpn = encode_alpn(self.alpn)
        if len(self.early) > MAX_EARLY_BYTES:
            raise ValueError(f"more than {MAX_EARLY_BYTES} early bytes")
        if not 0 < self.handshake_timeout <= MAX_HANDSHAKE_TIMEOUT:
            raise ValueError(f"handshake timeout of {self.handshake_timeout} s")
        if not 0 <= self.peer_trust <= MAX_TRUST_STORES:
            raise ValueError(f"peer trust store {self.peer_trust}")
        # At least 1 ms: 0 would read as "no deadline" to an alarm.
        timeout = max(1, round(self.handshake_timeout * 1000))
        return b"".join(
            (
                SPAWN_HEADER.pack(timeout, self.peer_trust),
                bytes((len(hint),)),
                hint,
                bytes((len(alpn),)),
                alpn,
                len(self.early).to_bytes(2, "big"),
                self.early,
            )
        )


def usable_hint(name: str | None) -> str | None:
    """``name`` as a ``SpawnRequest.server_name_hint``, or None when no
    certificate name could match it anyway: certificates name hosts in
    printable ASCII (A-labels), in at most 253 bytes, so nothing is lost
    where the hint does not fit its field.

    The hint comes from the client (XMPP's stream ``to``); without a usable
    one the worker serves the default certificate, as for a name nothing
    matches.
    """
    # The helper takes printable ASCII without spaces, as host names are.
    if name is None or not name.isascii() or not name.isprintable() or " " in name:
        return None
    return name if len(name) <= MAX_SHORT_FIELD else None


def encode_alpn(names: tuple[str, ...]) -> bytes:
    """ALPN protocol names in their wire format (RFC 7301 section 3.1), as
    one spawn request field; ``ValueError`` when they do not fit."""
    wire = b""
    for name in names:
        if not name or not name.isascii():
            raise ValueError(f"ALPN protocol {name!r}: not a non-empty ASCII name")
        wire += bytes((len(name),)) + name.encode("ascii")
    if len(wire) > MAX_SHORT_FIELD:
        raise ValueError(
            f"ALPN protocols take {len(wire)} bytes on the wire, more than {MAX_SHORT_FIELD}"
        )
    return wire


@dataclass(frozen=True)
class HandshakeFailure:
    reason: str


def read_report(
    payload: bytes, alpn: tuple[str, ...], *, peer: bool = False
) -> TLSInfo | HandshakeFailure:
    """The worker's report (its JSON), checked before anything of it reaches
    a metric label, a log line or a PROXY TLV: the worker is the process the
    design assumes may be compromised. ``alpn``: what the listener offered
    (the worker may have selected only one of those); ``peer``: whether the
    spawn request named a trust store (a handshake's report then says what
    came of the peer's certificate, and only then). ``ValueError`` for a
    report no sound worker writes."""
    try:
        report = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"not JSON: {error}") from None
    if not isinstance(report, dict):
        raise ValueError("not an object")
    if report.get("ok") is not True:
        reason = report.get("reason")
        if report.get("ok") is not False or not isinstance(reason, str):
            raise ValueError("neither a handshake nor a failure")
        printable = "".join(c if c.isprintable() else "?" for c in reason)
        return HandshakeFailure(printable[:MAX_REASON])
    version, cipher = report.get("version"), report.get("cipher")
    server_name, selected = report.get("server_name"), report.get("alpn")
    if version not in REPORTED_VERSIONS:
        raise ValueError(f"version {version!r}")
    if not isinstance(cipher, str) or not _CIPHER_NAME.fullmatch(cipher):
        raise ValueError(f"cipher {cipher!r}")
    if selected is not None and selected not in alpn:
        raise ValueError(f"ALPN {selected!r} was not offered")
    if server_name is not None and not (
        isinstance(server_name, str) and _NAME.fullmatch(server_name)
    ):
        # The client chose it: a name no certificate could match is no
        # reason to refuse the session, but it goes no further.
        server_name = None
    assert isinstance(version, str)
    if peer != ("peer" in report):
        raise ValueError("a peer certificate's report where none was asked for, or none")
    certificate = _peer_certificate(report["peer"]) if peer else None
    return TLSInfo(version, cipher, server_name, selected, certificate)


def _peer_certificate(found: object) -> PeerCertificate | None:
    """The report's ``"peer"``: None when the client sent no certificate."""
    if not isinstance(found, dict) or found.get("verify") not in _PEER_VERIFY:
        raise ValueError(f"peer {found!r}")
    verify, error = found["verify"], found.get("error")
    dns_names, xmpp_addrs = found.get("dns_names"), found.get("xmpp_addrs")
    if not isinstance(dns_names, list) or not isinstance(xmpp_addrs, list):
        raise ValueError("peer names are not lists")
    if len(dns_names) > MAX_PEER_DNS_NAMES or len(xmpp_addrs) > MAX_PEER_XMPP_ADDRS:
        raise ValueError("more peer names than a worker reports")
    if verify == "untrusted":
        if not isinstance(error, str) or not error.isprintable() or len(error) > MAX_REASON:
            raise ValueError(f"peer verification error {error!r}")
    elif error is not None:
        raise ValueError("a peer verification error without a failure")
    if verify == "none":
        if dns_names or xmpp_addrs:
            raise ValueError("names of a certificate that was not sent")
        return None
    for name in dns_names:
        if not isinstance(name, str) or not _DNS_NAME.fullmatch(name):
            raise ValueError(f"peer dNSName {name!r}")
    return PeerCertificate(
        trusted=verify == "ok",
        problem=error,
        dns_names=tuple(name.lower() for name in dns_names),
        xmpp_addrs=tuple(_xmpp_addr(address) for address in xmpp_addrs),
    )


def _xmpp_addr(found: object) -> str:
    """An id-on-xmppAddr as the worker wrote it: its UTF-8 bytes, each an
    escaped code point below 256 (``tls/helper/json.c``)."""
    if not isinstance(found, str):
        raise ValueError(f"peer xmppAddr {found!r}")
    try:
        raw = found.encode("latin-1")
        address = raw.decode("utf-8")
    except UnicodeError:
        raise ValueError(f"peer xmppAddr {found!r} is not UTF-8") from None
    # As the worker checks it: no C0 or C1 control, no DEL.
    if not 0 < len(raw) <= MAX_PEER_NAME or any(
        ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in address
    ):
        raise ValueError(f"peer xmppAddr {address!r}")
    return address
