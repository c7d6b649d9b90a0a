"""Two real XMPP servers federating on loopback, each with its s2s port behind
starttls-proxy (issue 16): a Prosody and an ejabberd, each serving three domains.

``prosody.example`` and ``ejabberd.example`` are the servers' *home* domains,
reached directly: where a stream starts, and where dialback calls back. For
each way of reaching a server through the proxy there is one more domain on
it, ``starttls.SERVER.example`` and ``direct.SERVER.example`` (XEP-0368 direct
TLS, ALPN ``xmpp-server``), each routed to its own ``xmpp-server`` listener of
the proxy: a test that sends to ``bob@starttls.ejabberd.example`` makes a
fresh s2s stream from ``prosody.example`` through the proxy's STARTTLS
listener, authenticated by dialback, whatever other tests did before.

Outgoing streams (``xmpp-server-out``): Prosody sends its streams to
ejabberd's ``out-starttls`` and ``out-direct`` domains, and to
``impostor.example``, in plaintext to the proxy's :data:`OUTGOING` listener,
which finds their servers by SRV in the name server below and does TLS
itself: ``out-starttls`` is ejabberd's own s2s port (ejabberd's STARTTLS,
ejabberd's certificate), ``out-direct`` the proxy's own direct-TLS listener
in front of ejabberd (two proxies in a row: the second verifies the
certificate the first presents for ``prosody.example``), and
``impostor.example`` a direct-TLS listener whose certificate does not name
it.

Nothing asks real DNS (``.example`` is reserved anyway): Prosody reads its
routes from a file (``ProsodyInstance.set_routes``), ejabberd and the proxy's
outgoing listener ask a :class:`~tests.realservers.dns.StaticDNS` on loopback. Prosody's outgoing
s2s streams start from :data:`PROSODY_SOURCE`, so that ejabberd's log can
prove that the proxy told it the originating server's address (PROXY v2)
rather than its own (127.0.0.1). Prosody has no PROXY support in Debian
(``mod_net_proxy`` is not in Debian's ``prosody-modules``): its listener
gets no header.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import trustme

from tests.realservers.certs import CertFiles, write_test_certs
from tests.realservers.dns import SRV, StaticDNS
from tests.realservers.ejabberd import EjabberdInstance, EjabberdS2S, start_ejabberd
from tests.realservers.prosody import ProsodyInstance, ProsodyS2S, S2SRoute, start_prosody
from tests.realservers.proxy import ProxyProcess, StartProxy, listener
from tests.realservers.tap import RecordingTap

Server = Literal["prosody", "ejabberd"]
Mode = Literal["starttls", "direct"]
SERVERS: tuple[Server, ...] = ("prosody", "ejabberd")
MODES: tuple[Mode, ...] = ("starttls", "direct")
#: Where Prosody's outgoing s2s connections come from.
PROSODY_SOURCE = "127.0.0.2"
#: The target of the StaticDNS's SRV records: an address, not a name, since
#: ejabberd resolves SRV targets with the C library's getaddrinfo(), which
#: would ask the system's resolver (p1_xmpp 1.6.1).
_LOOPBACK = "127.0.0.1"
_SERVICES: dict[Mode, str] = {"starttls": "xmpp-server", "direct": "xmpps-server"}
#: The proxy's listener for Prosody's outgoing streams.
OUTGOING = "prosody-out"
#: A domain whose SRV record leads to a server without a certificate for it.
IMPOSTOR = "impostor.example"


def home(server: Server) -> str:
    """The domain a server is reached at directly."""
    return f"{server}.example"


def behind_proxy(server: Server, mode: Mode) -> str:
    """The server's domain that the others reach through the proxy's ``mode`` listener."""
    return f"{mode}.{server}.example"


def via_outgoing(mode: Mode) -> str:
    """ejabberd's domain that Prosody reaches through the proxy's outgoing listener."""
    return f"out-{mode}.ejabberd.example"


def domains(server: Server) -> tuple[str, ...]:
    outgoing = tuple(via_outgoing(mode) for mode in MODES) if server == "ejabberd" else ()
    return (home(server), *(behind_proxy(server, mode) for mode in MODES), *outgoing)


def listener_name(server: Server, mode: Mode) -> str:
    return f"{server}-{mode}"


@dataclass
class Federation:
    """The running servers, the proxy in front of their s2s ports, the name server,
    and the recording taps between the proxy and each server (what the tap
    recorded is exactly what the server read from the proxy, and the answers)."""

    prosody: ProsodyInstance
    ejabberd: EjabberdInstance
    proxy: ProxyProcess
    dns: StaticDNS
    taps: dict[Server, RecordingTap]
    #: The CA of every certificate here.
    ca: Path
    #: Each server's own certificate, which it presents on its outgoing streams.
    certs: dict[Server, CertFiles]

    def c2s_port(self, server: Server) -> int:
        """The server's plaintext c2s port (clients log in there directly)."""
        return self.prosody.port if server == "prosody" else self.ejabberd.port

    def log(self, server: Server) -> str:
        return self.prosody.log() if server == "prosody" else self.ejabberd.log()


def _proxied_port(server: Server, prosody: ProsodyInstance, ejabberd: EjabberdInstance) -> int:
    """The server's s2s port that the proxy forwards to."""
    port = prosody.s2s_port if server == "prosody" else ejabberd.s2s_proxy_port
    assert port is not None
    return port


def proxy_listeners(
    backends: dict[Server, int], trust: Path, nameserver: int
) -> list[dict[str, Any]]:
    """One ``xmpp-server`` listener per server and mode, to ``backends[server]``;
    PROXY v2 to ejabberd. Each refuses a peer whose certificate does not chain
    to ``trust`` for the domain its stream claims: both servers present their
    own on their outgoing streams, so every stream that gets through was
    verified by the proxy, and then authenticated by dialback all the same.
    And the :data:`OUTGOING` listener, which resolves with the name server on
    port ``nameserver`` and refuses remotes that ``trust`` does not verify."""
    peers = {"trust": str(trust), "on_failure": "refuse"}
    entries = []
    for server in SERVERS:
        backend_port = backends[server]
        identity = "proxy-v2" if server == "ejabberd" else "none"
        for mode in MODES:
            served = [behind_proxy(server, mode)]
            if server == "ejabberd" and mode == "direct":
                served.append(via_outgoing(mode))
            entries.append(
                listener(
                    listener_name(server, mode),
                    backend_port,
                    protocol="xmpp-server",
                    hostname=behind_proxy(server, mode),
                    domains=served,
                    tls="starttls" if mode == "starttls" else "implicit",
                    backend={"identity": identity},
                    peer_certificates=peers,
                )
            )
    outgoing = listener(
        OUTGOING,
        0,
        protocol="xmpp-server-out",
        domains=[home("prosody")],
        peer_certificates=peers,
        routes={"nameservers": [f"127.0.0.1:{nameserver}"]},
    )
    del outgoing["backend"]
    return [*entries, outgoing]


def _route(federation: Federation) -> None:
    """Point each server at the other's home directly and its other domains at the proxy."""
    prosody, ejabberd, proxy, dns = (
        federation.prosody,
        federation.ejabberd,
        federation.proxy,
        federation.dns,
    )
    assert prosody.s2s_port is not None and ejabberd.s2s_port is not None
    routes = [S2SRoute(home("ejabberd"), "xmpp-server", "127.0.0.1", ejabberd.s2s_port)]
    for mode in MODES:
        port = proxy.ports[listener_name("ejabberd", mode)]
        routes.append(S2SRoute(behind_proxy("ejabberd", mode), _SERVICES[mode], "127.0.0.1", port))
    outgoing = proxy.ports[OUTGOING]
    for domain in (*(via_outgoing(mode) for mode in MODES), IMPOSTOR):
        routes.append(S2SRoute(domain, "xmpp-server", "127.0.0.1", outgoing))
    prosody.set_routes([route._replace(source=PROSODY_SOURCE) for route in routes])
    # What the outgoing listener finds: ejabberd's own STARTTLS, the proxy's
    # direct-TLS listener in front of it, and one whose certificate is another's.
    dns.set_srv(f"_xmpp-server._tcp.{via_outgoing('starttls')}", SRV(_LOOPBACK, ejabberd.s2s_port))
    ejabberd_direct = proxy.ports[listener_name("ejabberd", "direct")]
    dns.set_srv(f"_xmpps-server._tcp.{via_outgoing('direct')}", SRV(_LOOPBACK, ejabberd_direct))
    prosody_direct = proxy.ports[listener_name("prosody", "direct")]
    dns.set_srv(f"_xmpps-server._tcp.{IMPOSTOR}", SRV(_LOOPBACK, prosody_direct))
    dns.set_srv(f"_xmpp-server._tcp.{home('prosody')}", SRV(_LOOPBACK, prosody.s2s_port))
    for mode in MODES:
        port = proxy.ports[listener_name("prosody", mode)]
        name = f"_{_SERVICES[mode]}._tcp.{behind_proxy('prosody', mode)}"
        dns.set_srv(name, SRV(_LOOPBACK, port))


def server_certs(directory: Path, ca: trustme.CA, server: Server) -> CertFiles:
    # ejabberd cannot take trustme's certificates valid for centuries (see write_test_certs).
    valid_for = datetime.timedelta(days=30)
    return write_test_certs(directory / server, ca, domains(server), valid_for=valid_for)


@contextlib.contextmanager
def running_federation(base: Path, ca: trustme.CA, start_proxy: StartProxy) -> Iterator[Federation]:
    """Start the name server, Prosody, ejabberd and the proxy in ``base``; stop
    them when the block ends (the proxy is ``start_proxy``'s to stop)."""
    certs = {server: server_certs(base / "certs", ca, server) for server in SERVERS}
    # The outgoing listener presents the certificate for prosody.example when
    # the remote asks (the proxy's own listener in front of ejabberd does).
    proxy_names = [
        *(behind_proxy(server, mode) for server in SERVERS for mode in MODES),
        via_outgoing("direct"),
        home("prosody"),
    ]
    proxy_certs = write_test_certs(base / "certs" / "proxy", ca, proxy_names)
    with contextlib.ExitStack() as stack:
        dns = stack.enter_context(StaticDNS())
        prosody_certs = certs["prosody"]
        prosody = stack.enter_context(
            start_prosody(
                base / "prosody",
                domains=domains("prosody"),
                s2s=ProsodyS2S(prosody_certs.cert, prosody_certs.key, prosody_certs.ca),
            )
        )
        ejabberd_certs = certs["ejabberd"]
        ejabberd = stack.enter_context(
            start_ejabberd(
                base / "ejabberd",
                ejabberd_certs.cert,
                ejabberd_certs.key,
                domains=domains("ejabberd"),
                s2s=EjabberdS2S(nameserver=dns.port),
                epmd=False,
            )
        )
        taps = {
            server: RecordingTap(_proxied_port(server, prosody, ejabberd)) for server in SERVERS
        }
        for tap in taps.values():
            stack.enter_context(tap)
        proxy = start_proxy(
            proxy_listeners(
                {server: tap.port for server, tap in taps.items()}, proxy_certs.ca, dns.port
            ),
            certificates=[(proxy_certs.cert, proxy_certs.key)],
        )
        federation = Federation(prosody, ejabberd, proxy, dns, taps, proxy_certs.ca, certs)
        _route(federation)
        yield federation
