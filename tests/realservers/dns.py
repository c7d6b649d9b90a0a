"""A static DNS server on loopback: SRV and A records that the tests set.

The federation tests give each XMPP server its own domain and route it by
configuration, never through real DNS, and so do the proxy's outgoing
listeners (``routes.nameservers``). ejabberd resolves with Erlang's own
resolver, which can be pointed at a name server on any address and port
(``{nameserver, IP, Port}`` in its ``inetrc``): this one answers it. Records
may change while it runs. Unknown names get NXDOMAIN at once, so that no
lookup waits for a timeout; a known name has no other records. Only what a
resolver needs for SRV and A is implemented (one question per query, UDP, no
compression in answers). ejabberd (p1_xmpp 1.6.1) resolves SRV targets
with the C library's ``getaddrinfo()``, outside Erlang's configuration:
give addresses as targets, never names.
"""

from __future__ import annotations

import socket
import struct
import threading
from dataclasses import dataclass

#: Record types and classes (RFC 1035, RFC 2782).
TYPE_A = 1
TYPE_SRV = 33
CLASS_IN = 1
_NXDOMAIN = 3
_FORMERR = 1
#: How long a thread blocks at most, so that closing is prompt.
_POLL = 0.05


@dataclass(frozen=True)
class SRV:
    """One SRV record's data: where a service of a domain is."""

    target: str
    port: int
    priority: int = 0
    weight: int = 0


def _encode_name(name: str) -> bytes:
    labels = [label.encode("ascii") for label in name.rstrip(".").split(".") if label]
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\0"


def _decode_question(packet: bytes) -> tuple[str, int, int, int]:
    """The question's name, type and class, and where it ends."""
    offset, labels = 12, []
    while True:
        length = packet[offset]
        offset += 1
        if length == 0:
            break
        if length & 0xC0:
            raise ValueError("compressed name in a question")
        labels.append(packet[offset : offset + length].decode("ascii"))
        offset += length
    qtype, qclass = struct.unpack_from("!HH", packet, offset)
    return ".".join(labels).lower(), qtype, qclass, offset + 4


class StaticDNS:
    """A UDP name server on ``127.0.0.1:port`` for the SRV and A records
    given to ``set_srv`` and ``set_a``."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind((host, 0))
        self._socket.settimeout(_POLL)
        self.host = host
        self.port: int = self._socket.getsockname()[1]
        self._lock = threading.Lock()
        self._srv: dict[str, list[SRV]] = {}
        self._a: dict[str, list[str]] = {}
        #: Every question asked, as ``(name, type)``, oldest first.
        self.questions: list[tuple[str, int]] = []
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> StaticDNS:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._closing.set()
        self._thread.join(5)
        self._socket.close()

    def set_srv(self, name: str, *records: SRV) -> None:
        """Answer SRV queries for ``name`` (``_xmpp-server._tcp.DOMAIN``) with ``records``."""
        with self._lock:
            self._srv[name.lower()] = list(records)

    def set_a(self, name: str, *addresses: str) -> None:
        """Answer A queries for ``name`` with ``addresses`` (IPv4)."""
        with self._lock:
            self._a[name.lower()] = list(addresses)

    def _run(self) -> None:
        while not self._closing.is_set():
            try:
                packet, client = self._socket.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            reply = self._answer(packet)
            if reply is not None:
                self._socket.sendto(reply, client)

    def _answer(self, packet: bytes) -> bytes | None:
        if len(packet) < 12:
            return None
        query_id, flags, questions = struct.unpack_from("!HHH", packet)
        recursion_desired = flags & 0x0100
        try:
            if questions != 1:
                raise ValueError("one question per query")
            name, qtype, qclass, end = _decode_question(packet)
        except (ValueError, IndexError, struct.error, UnicodeDecodeError):
            flags = 0x8000 | recursion_desired | _FORMERR
            return struct.pack("!HHHHHH", query_id, flags, 0, 0, 0, 0)
        with self._lock:
            self.questions.append((name, qtype))
            known = name in self._srv or name in self._a
            answers = self._records(name, qtype) if qclass == CLASS_IN else []
        rcode = 0 if known else _NXDOMAIN
        header = struct.pack(
            "!HHHHHH", query_id, 0x8400 | recursion_desired | rcode, 1, len(answers), 0, 0
        )
        return header + packet[12:end] + b"".join(answers)

    def _records(self, name: str, qtype: int) -> list[bytes]:
        datas: list[bytes] = []
        if qtype == TYPE_SRV:
            for srv in self._srv.get(name, []):
                fields = struct.pack("!HHH", srv.priority, srv.weight, srv.port)
                datas.append(fields + _encode_name(srv.target))
        elif qtype == TYPE_A:
            datas = [socket.inet_aton(address) for address in self._a.get(name, [])]
        owner = _encode_name(name)
        # A time to live of 0: records change between tests, nothing may cache them.
        return [owner + struct.pack("!HHIH", qtype, CLASS_IN, 0, len(d)) + d for d in datas]
