"""Every message between the proxy's processes, and every exit status.

One frozen dataclass per message, with ``encode``; one ``Channel`` per
socket and direction, whose ``decode`` returns one of the messages that
channel may carry or raises ``WireError``. The peers are the proxy's own
processes, but the keeper and the key server run as root and the main
process faces the network: nothing of a message is used before it is
checked here. What C reads or writes is laid out as ``tls/helper/wire.h``
says, and a test holds the values here to that header; the key server's
binary formats, which only C speaks, are ``keys/keyserver_wire.h``'s. Kept
free of TLS imports and of pydantic, YAML and lxml: the main process and
the root processes all load it.

Who says what (SOCK_SEQPACKET, one message per datagram, except the
worker's channel)::

    main -> keeper         Configuration (first), Reload
    keeper -> main         HelperStarted (+ the helper's control socket),
                           WorkerExited, KeyServerCounts, Problems,
                           HelperUnusable, Fatal, ReloadFailed
    keeper -> helper       DESCRIPTION (+ its memfd [+ the key server link])
    helper -> keeper       Ready or Problems (then the socket goes to main)
    main -> helper         SpawnRequest, binary (+ network socket, channel):
                           the worker accepts a client's TLS, or connects
                           to a remote server (TLSRole)
    helper -> main         WorkerExited
    worker -> main         its report, first on its channel (read_report);
                           with the peer certificate's verification and
                           names when the spawn request named a trust store
                           (always when it connects)
    keeper -> key server   KeyServerStart (first), LoadKeys (+ link, key files)
    key server -> keeper   Ready or Problems, KeysLoaded or Problems,
                           KeyServerCounts

The JSON messages are objects recognised by one key, their ``TAG``; the
spawn request is binary because the helper that parses it is C and the
request comes from the network-facing process: a parser that only copies
length-prefixed fields into buffers of known size leaves little to get
wrong. Integers there are big-endian.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import re
import struct
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, NamedTuple, TypeVar

from protocols._base import PeerCertificate, TLSInfo

# ----------------------------------------------------------------------
# Exit statuses.


class WorkerExit(enum.IntEnum):
    """A TLS worker's exit status (``EXIT_*`` in ``tls/helper/wire.h``),
    which the helper passes on (``WorkerExited``) for metrics. A negative
    status is the signal that killed it."""

    OK = 0
    HANDSHAKE_FAILED = 10
    NOT_TLS = 11
    CLIENT_GONE = 12
    TLS_ERROR = 13
    #: Past the handshake deadline. The alarm's handler is ``_exit`` itself,
    #: which gets the signal's number (SIGALRM) as its status: a PID
    #: namespace's init ignores even the kernel's SIGALRM unless it has a handler.
    DEADLINE = 14
    #: A worker that could not enter a layer it was meant to.
    SANDBOX_FAILED = 16
    #: A spare worker that never got a connection (its helper left): not a
    #: worker exit worth counting.
    SPARE_UNUSED = 17
    #: The worker's own failure (out of memory under its RLIMIT_AS, an
    #: impossible state), not its peer's: a crash.
    INTERNAL_ERROR = 18


class ProxyExit(enum.IntEnum):
    """``starttls-proxy``'s exit status, for the service manager."""

    OK = 0
    #: ``--check-backends`` or ``--isolation-report`` found what keeps the
    #: proxy from working as configured (each named on stderr).
    PROBLEMS_FOUND = 1
    #: The configuration cannot be used (each problem named on stderr),
    #: including what only binding or starting the TLS helper can tell.
    CONFIG_ERROR = 2
    #: No TLS helper can be had any more (``Fatal``, or the keeper left).
    HELPER_LOST = 3


class SubordinateExit(enum.IntEnum):
    """The exit status of the keeper and of the key server (their parents
    go by their messages, which say more)."""

    #: Its parent (the main process; the keeper) closed its socket.
    DONE = 0
    #: It could not start as told, and ``Problems`` said why: the keeper's
    #: configuration or first helper, the key server's confinement.
    REFUSED = 1
    #: The keeper: no helper or key server could be had any more (``Fatal``
    #: said why).
    GAVE_UP = 3


# ----------------------------------------------------------------------
# The JSON control messages.


class WireError(ValueError):
    """A message no sound peer sends: not JSON, of no kind its channel
    carries, or with a field missing, unknown or of the wrong type."""


#: The largest JSON message (a datagram) between the processes.
MAX_MESSAGE = 64 * 1024
#: A settings section as JSON (``settings.encode``), passed on as it is:
#: the keeper validates what the main process sends (``settings.checked``).
JSONObject = dict[str, Any]


class Message:
    """A JSON object recognised by the key ``TAG``: the JSON key of one of
    its fields (``metadata={"key": ...}`` where it differs from the field's
    name), or else a key of its own whose value is ``true``."""

    TAG: ClassVar[str]

    def encode(self) -> bytes:
        return json.dumps(_to_json(self)).encode()


class LayerStatus(NamedTuple):
    """A sandbox layer as a process found it (``[name, applied, detail]``)."""

    name: str
    applied: bool
    detail: str


@dataclass(frozen=True)
class Configuration(Message):
    """main -> keeper, first: the settings the keeper validates and starts
    the helpers (and the key server) with; ``{"tls": ..., "isolation": ...}``."""

    TAG = "tls"
    tls: JSONObject
    isolation: JSONObject


@dataclass(frozen=True)
class Reload(Message):
    """main -> keeper (SIGHUP): start a new helper with these settings; it
    answers ``HelperStarted`` (``reloaded``) or ``ReloadFailed``."""

    TAG = "reload"
    configuration: Configuration = field(metadata={"key": "reload"})


@dataclass(frozen=True)
class HelperStarted(Message):
    """keeper -> main, with the main's end of the helper's control socket:
    a helper is ready, at start, after every restart and on reload."""

    TAG = "helper"
    pid: int = field(metadata={"key": "helper"})
    layers: tuple[LayerStatus, ...]
    #: The key server's layers; None when the helper holds the keys.
    key_server_layers: tuple[LayerStatus, ...] | None = None
    #: The answer to a ``Reload`` (the old helper is retired).
    reloaded: bool = False


@dataclass(frozen=True)
class WorkerExited(Message):
    """helper -> main (C writes it), and keeper -> main for the workers of
    a dead helper: a worker has ended with ``status`` (``WorkerExit``, or
    minus the killing signal)."""

    TAG = "exited"
    pid: int = field(metadata={"key": "exited"})
    status: int


@dataclass(frozen=True)
class SigningCounts:
    """Signature requests the key server served since it last said."""

    signed: int
    refused: int
    dropped: int

    def __post_init__(self) -> None:
        if min(self.signed, self.refused, self.dropped) < 0:
            raise WireError(f"negative counts: {self}")


@dataclass(frozen=True)
class KeyServerCounts(Message):
    """key server -> keeper (at most one per ``keys.server.COUNTS_INTERVAL``),
    passed on unchanged keeper -> main for metrics."""

    TAG = "counts"
    counts: SigningCounts


@dataclass(frozen=True)
class Problems(Message):
    """What keeps a process from starting, one line each: helper -> keeper
    and key server -> keeper (then it exits), keeper -> main (then the
    keeper exits); key server -> keeper for keys it could not load."""

    TAG = "problems"
    problems: tuple[str, ...]


@dataclass(frozen=True)
class HelperUnusable(Message):
    """keeper -> main: the key server died, so the helper's workers cannot
    sign; no connection goes to it until the next ``HelperStarted``."""

    TAG = "helper_unusable"
    reason: str = field(metadata={"key": "helper_unusable"})


@dataclass(frozen=True)
class Fatal(Message):
    """keeper -> main: no helper can be had any more; the keeper exits."""

    TAG = "fatal"
    reason: str = field(metadata={"key": "fatal"})


@dataclass(frozen=True)
class ReloadFailed(Message):
    """keeper -> main: the ``Reload``'s helper could not start; the old one serves on."""

    TAG = "reload_failed"
    problems: tuple[str, ...] = field(metadata={"key": "reload_failed"})


@dataclass(frozen=True)
class Ready(Message):
    """helper -> keeper (C writes it) and key server -> keeper: started,
    with these sandbox layers in force; ``{"ready": true, "layers": ...}``."""

    TAG = "ready"
    layers: tuple[LayerStatus, ...]


@dataclass(frozen=True)
class KeyServerStart(Message):
    """keeper -> key server, first: the isolation settings it confines
    itself with (validated by the keeper); it answers ``Ready`` or ``Problems``."""

    TAG = "isolation"
    isolation: JSONObject


@dataclass(frozen=True)
class LoadKeys(Message):
    """keeper -> key server, with a link (the key server's end of a socket
    pair whose other end goes to a helper), then one key file per entry of
    ``certificates`` (where each is configured, for messages). It answers
    ``KeysLoaded`` or ``Problems``; the keys stay as long as the link or a
    connection made through it is open."""

    TAG = "load"
    certificates: tuple[str, ...] = field(metadata={"key": "load"})


@dataclass(frozen=True)
class KeysLoaded(Message):
    """key server -> keeper: the key reference (PEM) of each key loaded, in order."""

    TAG = "references"
    references: tuple[str, ...]


#: keeper -> helper, once: this datagram with the description's memfd
#: (``tls.description``) and, with the key server, the helper's link to it.
DESCRIPTION = b"D"

M = TypeVar("M", bound=Message)


class Channel(Generic[M]):
    """The messages one process may send another over one socket: ``M``,
    a union of ``Message`` classes."""

    def __init__(self, kinds: Any) -> None:
        self.kinds: tuple[type[Message], ...] = typing.get_args(kinds) or (kinds,)
        self._by_tag = {kind.TAG: kind for kind in self.kinds}

    def decode(self, payload: bytes) -> M:
        """The message ``payload`` holds; ``WireError`` for anything else."""
        if len(payload) > MAX_MESSAGE:
            raise WireError(f"{len(payload)} bytes: larger than any message")
        data = _json(payload)
        if not isinstance(data, dict):
            raise WireError("not a JSON object")
        tags = [tag for tag in self._by_tag if tag in data]
        if len(tags) != 1:
            expected = ", ".join(self._by_tag)
            raise WireError(f"keys {_keys(data)}: not one message of {expected}")
        kind = self._by_tag[tags[0]]
        return typing.cast(M, _record(kind, data, kind.__name__))


MainToKeeper = Configuration | Reload
KeeperToMain = (
    HelperStarted
    | WorkerExited
    | KeyServerCounts
    | Problems
    | HelperUnusable
    | Fatal
    | ReloadFailed
)
HelperToKeeper = Ready | Problems
HelperToMain = WorkerExited
KeeperToKeyServer = KeyServerStart | LoadKeys
KeyServerToKeeper = Ready | Problems | KeysLoaded | KeyServerCounts

MAIN_TO_KEEPER: Channel[MainToKeeper] = Channel(MainToKeeper)
KEEPER_TO_MAIN: Channel[KeeperToMain] = Channel(KeeperToMain)
HELPER_TO_KEEPER: Channel[HelperToKeeper] = Channel(HelperToKeeper)
HELPER_TO_MAIN: Channel[HelperToMain] = Channel(HelperToMain)
KEEPER_TO_KEY_SERVER: Channel[KeeperToKeyServer] = Channel(KeeperToKeyServer)
KEY_SERVER_TO_KEEPER: Channel[KeyServerToKeeper] = Channel(KeyServerToKeeper)


def _json(payload: bytes) -> object:
    try:
        return json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        # RecursionError: nesting deeper than the parser goes.
        raise WireError(f"not JSON: {str(error)[:100]}") from None


@functools.cache
def _hints(kind: type) -> tuple[Any, ...]:
    """The type of each field of ``kind`` (a NamedTuple or a dataclass), in order."""
    return tuple(typing.get_type_hints(kind).values())


@functools.cache
def _fields(kind: type) -> tuple[tuple[str, str, Any], ...]:
    """(attribute, JSON key, type) of each field of the dataclass ``kind``."""
    hints = typing.get_type_hints(kind)
    return tuple(
        (f.name, f.metadata.get("key", f.name), hints[f.name]) for f in dataclasses.fields(kind)
    )


def _to_json(value: object) -> object:
    if isinstance(value, tuple):
        return [_to_json(item) for item in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        data = {key: _to_json(getattr(value, name)) for name, key, _ in _fields(type(value))}
        if isinstance(value, Message) and value.TAG not in data:
            return {value.TAG: True, **data}
        return data
    return value


def _record(kind: type, data: dict[str, Any], where: str) -> Any:
    """The dataclass ``kind`` from a JSON object that has each of its keys
    (and a message's tag) and no other."""
    fields = _fields(kind)
    keys = {key for _, key, _ in fields}
    if issubclass(kind, Message) and kind.TAG not in keys:
        if data.get(kind.TAG) is not True:
            raise WireError(f"{where}: {kind.TAG!r} is not true")
        keys.add(kind.TAG)
    if set(data) != keys:
        raise WireError(f"{where}: keys {_keys(data)}, not {sorted(keys)}")
    return kind(**{name: _value(hint, data[key], f"{where}.{key}") for name, key, hint in fields})


def _value(kind: Any, data: object, where: str) -> Any:
    """``data`` (parsed JSON) as a value of the type ``kind``."""
    origin, arguments = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):  # X | None
        (present,) = (argument for argument in arguments if argument is not type(None))
        return None if data is None else _value(present, data, where)
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        return _record(kind, _expect(dict, data, where), where)
    if origin is tuple:  # tuple[X, ...]
        items = _expect(list, data, where)
        return tuple(_value(arguments[0], item, f"{where}[{i}]") for i, item in enumerate(items))
    if origin is dict:  # a JSONObject, passed on as it is
        return _expect(dict, data, where)
    if isinstance(kind, type) and issubclass(kind, tuple):  # a NamedTuple: a fixed array
        items = _expect(list, data, where)
        hints = _hints(kind)
        if len(items) != len(hints):
            raise WireError(f"{where}: {len(items)} items, not {len(hints)}")
        return kind(*(_value(hint, item, where) for hint, item in zip(hints, items, strict=True)))
    if kind in (str, int, bool):
        return _expect(kind, data, where)
    raise TypeError(f"{where}: no wire form for {kind!r}")  # this module's bug


def _keys(data: dict[str, Any]) -> str:
    """The keys of ``data`` for an error message, a few and not too long."""
    shown = [key[:40] for key in sorted(data)[:8]]
    return repr(shown) if len(data) <= len(shown) else f"{shown} and {len(data) - len(shown)} more"


T = TypeVar("T")


def _expect(kind: type[T], data: object, where: str) -> T:
    # ``type`` rather than isinstance: JSON's true is no integer here.
    if type(data) is not kind:
        raise WireError(f"{where}: {type(data).__name__}, not {kind.__name__}")
    return data


# ----------------------------------------------------------------------
# The spawn request (main -> helper) and the worker's report (worker -> main).

#: Client bytes that may ride along with a spawn request: a ClientHello the
#: main process read before handing the socket off (16 KiB record + header).
MAX_EARLY_BYTES = 16 * 1024 + 5
#: The handshake timeout (ms), the peer trust store and the role; then
#: the hint, the peer name, the ALPN list and the early bytes, each after
#: its length (u8, u8, u8, u16).
SPAWN_HEADER = struct.Struct("!IBB")
SPAWN_FIXED_SIZE = SPAWN_HEADER.size + 1 + 1 + 1 + 2
#: Trust stores for peers' certificates a helper may hold (and so the
#: largest trust store number of a spawn request).
MAX_TRUST_STORES = 16
#: A peer certificate's names the worker reports, at most.
MAX_PEER_DNS_NAMES = 100
MAX_PEER_XMPP_ADDRS = 10
MAX_PEER_NAME = 255
#: A one-byte length: the most a server name hint, a peer name or an ALPN
#: list can be.
MAX_SHORT_FIELD = 255
MAX_SPAWN_REQUEST = SPAWN_FIXED_SIZE + 3 * MAX_SHORT_FIELD + MAX_EARLY_BYTES
#: The handshake timeout travels in milliseconds, as a u32.
MAX_HANDSHAKE_TIMEOUT = (2**32 - 1) / 1000

#: The worker's report, the first frame on its plaintext channel: this
#: length, then a JSON object, ``{"ok": true, "version", "cipher",
#: "server_name", "alpn"}`` or ``{"ok": false, "reason"}`` (``read_report``).
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


class TLSRole(enum.IntEnum):
    """Which side of TLS a worker takes (``enum tls_role`` in ``tls/helper/wire.h``)."""

    #: The socket is a client's: the worker is the TLS server (STARTTLS
    #: and direct TLS listeners).
    ACCEPT = 0
    #: The socket is connected to a remote server (an outgoing XMPP
    #: server-to-server stream, STARTTLS already negotiated by the main
    #: process): the worker is the TLS client, and verifies the server's
    #: certificate against ``peer_trust``.
    CONNECT = 1


@dataclass(frozen=True)
class SpawnRequest:
    handshake_timeout: float
    #: Which of the proxy's certificates: on accept, when the client sends no
    #: SNI (XMPP's stream ``to``); on connect, the one presented if the server
    #: asks for a client certificate, on TLS 1.3 only (on TLS 1.2 the worker
    #: sends none: ``tls/helper/wire.h`` section 3).
    server_name_hint: str | None = None
    #: ALPN protocols the worker may select (XEP-0368 direct TLS); on
    #: connect, those it offers.
    alpn: tuple[str, ...] = ()
    #: Client bytes already read by the main process (see MAX_EARLY_BYTES):
    #: the start of a ClientHello, handled before anything read from the
    #: socket. Accept only.
    early: bytes = b""
    #: Verify the peer's certificate against the helper's trust store of this
    #: number (1-based): on accept, ask the client for one (0: ask for none);
    #: on connect, the server's, always (0 is refused).
    peer_trust: int = 0
    role: TLSRole = TLSRole.ACCEPT
    #: Connect only, and required there: the remote server's name, sent as
    #: SNI (printable ASCII without spaces, at most 255 bytes).
    peer_name: str | None = None

    def encode(self) -> bytes:
        """The request as ``tls/helper/wire.h`` lays it out; ``ValueError`` if
        a field does not fit in it, or does not go with the role."""
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
        peer_name = self._peer_name()
        # At least 1 ms: 0 would read as "no deadline" to an alarm.
        timeout = max(1, round(self.handshake_timeout * 1000))
        return b"".join(
            (
                SPAWN_HEADER.pack(timeout, self.peer_trust, self.role),
                bytes((len(hint),)),
                hint,
                bytes((len(peer_name),)),
                peer_name,
                bytes((len(alpn),)),
                alpn,
                len(self.early).to_bytes(2, "big"),
                self.early,
            )
        )

    def _peer_name(self) -> bytes:
        """The peer name field, checked against the role as the helper checks it."""
        if self.role == TLSRole.ACCEPT:
            if self.peer_name is not None:
                raise ValueError("a peer name for a worker that accepts")
            return b""
        if self.role != TLSRole.CONNECT:
            raise ValueError(f"role {self.role!r}")
        if self.peer_name is None:
            raise ValueError("no peer name for a worker that connects")
        if not _NAME.fullmatch(self.peer_name):
            raise ValueError(
                f"peer name {self.peer_name[:80]!r}: not 1 to {MAX_SHORT_FIELD} printable"
                " ASCII characters without spaces"
            )
        if self.peer_trust == 0:
            raise ValueError("no trust store for a worker that connects")
        if self.early:
            raise ValueError("early bytes for a worker that connects")
        return self.peer_name.encode("ascii")


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
    (the worker may have selected only one of those); on connect, what it
    offered (the server selected one of those); ``peer``: whether the spawn
    request named a trust store, as it always does on connect (a
    handshake's report then says what came of the peer's certificate, and
    only then). ``WireError`` for a report no sound worker writes."""
    report = _json(payload)
    if not isinstance(report, dict):
        raise WireError("not an object")
    if report.get("ok") is not True:
        reason = report.get("reason")
        if report.get("ok") is not False or not isinstance(reason, str):
            raise WireError("neither a handshake nor a failure")
        printable = "".join(c if c.isprintable() else "?" for c in reason)
        return HandshakeFailure(printable[:MAX_REASON])
    version, cipher = report.get("version"), report.get("cipher")
    server_name, selected = report.get("server_name"), report.get("alpn")
    if version not in REPORTED_VERSIONS:
        raise WireError(f"version {version!r}")
    if not isinstance(cipher, str) or not _CIPHER_NAME.fullmatch(cipher):
        raise WireError(f"cipher {cipher!r}")
    if selected is not None and selected not in alpn:
        raise WireError(f"ALPN {selected!r} was not offered")
    if server_name is not None and not (
        isinstance(server_name, str) and _NAME.fullmatch(server_name)
    ):
        # The client chose it: a name no certificate could match is no
        # reason to refuse the session, but it goes no further.
        server_name = None
    assert isinstance(version, str)
    if peer != ("peer" in report):
        raise WireError("a peer certificate's report where none was asked for, or none")
    certificate = _peer_certificate(report["peer"]) if peer else None
    return TLSInfo(version, cipher, server_name, selected, certificate)


def _peer_certificate(found: object) -> PeerCertificate | None:
    """The report's ``"peer"``: None when the client sent no certificate."""
    if not isinstance(found, dict) or found.get("verify") not in _PEER_VERIFY:
        raise WireError(f"peer {found!r}")
    verify, error = found["verify"], found.get("error")
    dns_names, xmpp_addrs = found.get("dns_names"), found.get("xmpp_addrs")
    if not isinstance(dns_names, list) or not isinstance(xmpp_addrs, list):
        raise WireError("peer names are not lists")
    if len(dns_names) > MAX_PEER_DNS_NAMES or len(xmpp_addrs) > MAX_PEER_XMPP_ADDRS:
        raise WireError("more peer names than a worker reports")
    if verify == "untrusted":
        if not isinstance(error, str) or not error.isprintable() or len(error) > MAX_REASON:
            raise WireError(f"peer verification error {error!r}")
    elif error is not None:
        raise WireError("a peer verification error without a failure")
    if verify == "none":
        if dns_names or xmpp_addrs:
            raise WireError("names of a certificate that was not sent")
        return None
    for name in dns_names:
        if not isinstance(name, str) or not _DNS_NAME.fullmatch(name):
            raise WireError(f"peer dNSName {name!r}")
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
        raise WireError(f"peer xmppAddr {found!r}")
    try:
        raw = found.encode("latin-1")
        address = raw.decode("utf-8")
    except UnicodeError:
        raise WireError(f"peer xmppAddr {found!r} is not UTF-8") from None
    # As the worker checks it: no C0 or C1 control, no DEL.
    if not 0 < len(raw) <= MAX_PEER_NAME or any(
        ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in address
    ):
        raise WireError(f"peer xmppAddr {address!r}")
    return address
