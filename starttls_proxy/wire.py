"""What the main process, the TLS helper and the workers say to each other.

Kept free of TLS imports: the main process uses it and never loads OpenSSL.

* Spawn requests (main -> helper, with two descriptors; see ``zygote``).
* Assignments (helper -> spare worker, with the same descriptors and, with
  the key server, a third: see ``zygote``).
* The worker's report: the first frame on its plaintext channel, a 4-byte
  length and a JSON object, ``{"ok": true, "version", "cipher",
  "server_name", "alpn"}`` or ``{"ok": false, "reason"}``.
* Worker exit codes, which the helper passes on for metrics.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass

from protocols._base import TLSInfo

EXIT_OK = 0
EXIT_HANDSHAKE_FAILED = 10
EXIT_NOT_TLS = 11
EXIT_CLIENT_GONE = 12
EXIT_TLS_ERROR = 13
#: A spare worker that never got a connection (its helper left): not a
#: worker exit worth counting.
EXIT_SPARE_UNUSED = 17

#: Client bytes that may ride along with a spawn request: a ClientHello the
#: main process read before handing the socket off (16 KiB record + header).
MAX_EARLY_BYTES = 16 * 1024 + 5
#: Room for the JSON part of a spawn request.
MAX_SPAWN_REQUEST = MAX_EARLY_BYTES + 4096

#: The self check's sibling list (test only) is cut to this many PIDs.
MAX_SIBLINGS = 1000
#: Room for an ``Assignment``.
MAX_ASSIGNMENT = MAX_SPAWN_REQUEST + 16 * MAX_SIBLINGS
REPORT_HEADER = struct.Struct("!I")
MAX_REPORT_SIZE = 64 * 1024


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
    #: Set by the sender, echoed in the helper's ``spawned`` answer.
    id: int = 0

    @classmethod
    def decode(cls, message: bytes) -> SpawnRequest:
        """JSON, a newline (JSON text never contains a raw one), early bytes."""
        header, _, early = message.partition(b"\n")
        fields = json.loads(header)
        hint = fields.get("server_name_hint")
        return cls(
            id=int(fields["spawn"]),
            handshake_timeout=float(fields["handshake_timeout"]),
            server_name_hint=hint if isinstance(hint, str) else None,
            alpn=tuple(str(name) for name in fields.get("alpn", ())),
            early=early,
        )

    def encode(self) -> bytes:
        header = {
            "spawn": self.id,
            "handshake_timeout": self.handshake_timeout,
            "server_name_hint": self.server_name_hint,
            "alpn": list(self.alpn),
        }
        return json.dumps(header).encode() + b"\n" + self.early


@dataclass(frozen=True)
class Assignment:
    """Helper -> spare worker: the connection it is to serve (its
    descriptors ride along with SCM_RIGHTS)."""

    request: SpawnRequest
    #: The other live workers, which the self check tries to reach.
    siblings: tuple[int, ...] = ()

    @classmethod
    def decode(cls, message: bytes) -> Assignment:
        """The sibling PIDs as one JSON line, then the spawn request as it came."""
        siblings, _, request = message.partition(b"\n")
        return cls(SpawnRequest.decode(request), tuple(int(pid) for pid in json.loads(siblings)))

    def encode(self) -> bytes:
        siblings = list(self.siblings[:MAX_SIBLINGS])
        return json.dumps(siblings).encode() + b"\n" + self.request.encode()


def _frame(report: dict[str, object]) -> bytes:
    payload = json.dumps(report).encode()
    return REPORT_HEADER.pack(len(payload)) + payload


def handshake_report(info: TLSInfo) -> bytes:
    return _frame({"ok": True, **asdict(info)})


def failure_report(reason: str) -> bytes:
    return _frame({"ok": False, "reason": reason})
