"""``--check-backends``: each listener's backend, met as a session meets it.

Per listener three connections, all with the listener's settings: one that
sends nothing (does a backend that should wait for a PROXY header greet
anyway?), the capability probe the running proxy makes, and a whole session
through the listener's own protocol machine, the doctor playing a client
that completed the TLS handshake. The machine announces that client to the
backend as it would a real one (PROXY header, XCLIENT, ID), so what the
backend answers is what real sessions get; the bytes it sent are kept for
``doctor_report`` to judge.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from dataclasses import dataclass

from protocols import proxy_header
from protocols._base import (
    BackendIdentity,
    CloseConnection,
    OpenBackend,
    Peer,
    SendToBackend,
    SendToClient,
    Side,
    StartTLS,
    TLSInfo,
    TLSMode,
)
from protocols.registry import PROTOCOLS
from starttls_proxy.config import Config, ListenerConfig, Protocol
from starttls_proxy.proxy.server import (
    PROBE_READ_SIZE,
    ProbeError,
    open_backend,
    own_connection,
    probe_backend,
    probe_failure,
    session_settings,
)

#: The client the doctor plays: a documentation address (RFC 5737), so that
#: no backend trusts it for anything and its logs show where it came from.
CLIENT = "192.0.2.10"
#: What the TLS worker would have reported for that client.
TLS = TLSInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384")
#: How long a backend that expects a PROXY header is given to show it does
#: not (by greeting a connection that sent nothing).
QUIET_WAIT = 1.0
#: Protocols whose server speaks first: a greeting before any header tells.
_SERVER_SPEAKS_FIRST = frozenset({Protocol.SMTP, Protocol.IMAP, Protocol.POP3})
_PROXY_HEADERS = frozenset({BackendIdentity.PROXY_V1, BackendIdentity.PROXY_V2})


@dataclass
class Observation:
    """What one listener's backend did."""

    listener: ListenerConfig
    #: Why the backend could not be connected to, or None.
    unreachable: str | None = None
    #: The proxy's address as the backend sees it (what its trust lists need).
    own_address: str | None = None
    #: What a backend that should wait for a PROXY header said unasked.
    unasked: bytes = b""
    probed: tuple[str, ...] | None = None
    probe_error: str | None = None
    #: Everything the backend sent in the session; what its client got
    #: before the upgrade and after it.
    backend_said: bytes = b""
    client_before: bytes = b""
    client_got: bytes = b""
    #: Why the session ended, and whether it ended as the protocol intends.
    ended: str = ""
    clean: bool = False


@dataclass
class RoutesObservation:
    """What an outgoing listener (``xmpp-server-out``, no backend) could reach."""

    listener: ListenerConfig
    #: Each static route (domain, address) and why it cannot be reached, or None.
    reached: list[tuple[str, str, str | None]]


def _scripts(listener: ListenerConfig) -> tuple[bytes, bytes]:
    """What the client says before the upgrade, and once under TLS: ask for
    the capabilities, then leave."""
    protocol = listener.protocol
    if protocol is Protocol.SMTP:
        return b"EHLO doctor.invalid\r\nSTARTTLS\r\n", b"EHLO doctor.invalid\r\nQUIT\r\n"
    if protocol is Protocol.IMAP:
        return b"d1 STARTTLS\r\n", b"d2 CAPABILITY\r\nd3 LOGOUT\r\n"
    if protocol is Protocol.POP3:
        return b"CAPA\r\nSTLS\r\n", b"CAPA\r\nQUIT\r\n"
    namespace = "jabber:client" if protocol is Protocol.XMPP_CLIENT else "jabber:server"
    domain = listener.domains[0] if listener.domains else listener.hostname
    header = (
        f"<?xml version='1.0'?><stream:stream xmlns='{namespace}' to='{domain}' "
        "xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>"
    ).encode()
    return (
        header + b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>",
        header + b"</stream:stream>",
    )


def _local_address(listener: ListenerConfig) -> str:
    """The listener's address for PROXY headers, which need an IP address."""
    try:
        return str(ipaddress.ip_address(listener.listen.host))
    except ValueError:
        return "127.0.0.1"


async def _unasked(listener: ListenerConfig, seen: Observation) -> None:
    """Connect and send nothing: the backend should stay silent."""
    reader, writer = await open_backend(listener.fixed_backend.address)
    try:
        seen.own_address = own_connection(writer).client_address
        try:
            async with asyncio.timeout(min(QUIET_WAIT, listener.timeouts.backend_connect)):
                seen.unasked = await reader.read(PROBE_READ_SIZE)
        except TimeoutError:
            pass
    finally:
        writer.close()


async def _session(listener: ListenerConfig, seen: Observation) -> None:
    """One session through the listener's machine, to its end."""
    spec = PROTOCOLS[listener.protocol.value]
    capabilities = listener.capabilities or seen.probed or spec.facts.fallback_capabilities
    peer = Peer(CLIENT, 50000, _local_address(listener), listener.listen.port)
    machine = spec.machine(session_settings(listener, capabilities), peer)
    before, after = _scripts(listener)
    if listener.tls is TLSMode.STARTTLS:
        machine.receive_data(Side.CLIENT, before)
    timeout = listener.timeouts.backend_connect
    backend: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    said, got = bytearray(), bytearray()
    try:
        while True:
            match machine.next_command():
                case SendToClient(data):
                    got += data
                case SendToBackend(data) if backend is not None:
                    backend[1].write(data)
                case OpenBackend():
                    try:
                        async with asyncio.timeout(timeout):
                            backend = await open_backend(listener.fixed_backend.address)
                    except (OSError, TimeoutError) as error:
                        machine.backend_failed(probe_failure(error, timeout))
                        continue
                    seen.own_address = own_connection(backend[1]).client_address
                    backend[1].write(
                        proxy_header.session_header(listener.fixed_backend.identity, peer, TLS)
                    )
                    machine.backend_connected()
                case StartTLS():
                    seen.client_before, got = bytes(got), bytearray()
                    machine.tls_established(TLS)
                    machine.receive_data(Side.CLIENT, after)
                case CloseConnection(reason, clean):
                    seen.ended, seen.clean = reason, clean
                    return
                case None if backend is not None:
                    try:
                        async with asyncio.timeout(timeout):
                            data = await backend[0].read(PROBE_READ_SIZE)
                    except TimeoutError:
                        seen.ended = f"no answer from the backend within {timeout:g} s"
                        return
                    except OSError as error:
                        data = b""
                        seen.ended = str(error)
                    said += data
                    if data:
                        machine.receive_data(Side.BACKEND, data)
                    else:
                        machine.receive_eof(Side.BACKEND)
                case _:
                    seen.ended = "the session stopped before reaching the backend"
                    return
    finally:
        seen.backend_said, seen.client_got = bytes(said), bytes(got)
        if backend is not None:
            backend[1].close()


async def examine(listener: ListenerConfig) -> Observation:
    """Everything the doctor learns about ``listener``'s backend."""
    seen = Observation(listener)
    address, timeout = listener.fixed_backend.address, listener.timeouts.backend_connect
    try:
        async with asyncio.timeout(timeout):
            _, writer = await open_backend(address)
        writer.close()
    except (OSError, TimeoutError) as error:
        seen.unreachable = f"{address}: {probe_failure(error, timeout)}"
        return seen
    if (
        listener.fixed_backend.identity in _PROXY_HEADERS
        and listener.protocol in _SERVER_SPEAKS_FIRST
    ):
        with contextlib.suppress(OSError):
            await _unasked(listener, seen)
    spec = PROTOCOLS[listener.protocol.value]
    # As the running proxy: no probe where nothing would use its answer.
    if listener.capabilities is None and not (
        spec.facts.probe_only_for_plaintext and listener.require_tls
    ):
        try:
            seen.probed = await probe_backend(listener)
        except (OSError, TimeoutError, ProbeError) as error:
            seen.probe_error = probe_failure(error, timeout)
    await _session(listener, seen)
    return seen


async def examine_routes(listener: ListenerConfig) -> RoutesObservation:
    """Connect each of an outgoing listener's static routes (no TLS, nothing said)."""
    assert listener.routes is not None
    timeout = listener.timeouts.backend_connect
    reached: list[tuple[str, str, str | None]] = []
    for domain, routes in listener.routes.static.items():
        for route in routes:
            problem = None
            try:
                async with asyncio.timeout(timeout):
                    _, writer = await open_backend(route.address)
                writer.close()
            except (OSError, TimeoutError) as error:
                problem = probe_failure(error, timeout)
            reached.append((domain, str(route.address), problem))
    return RoutesObservation(listener, reached)


async def examine_all(config: Config) -> list[Observation | RoutesObservation]:
    """The listeners' backends (an outgoing listener's static routes), one
    after the other (their logs stay apart)."""
    return [
        await examine(listener) if listener.backend else await examine_routes(listener)
        for listener in config.listeners
    ]
