"""Where outgoing server-to-server streams go (``proxy/routes.py``): SRV
records of both services (RFC 6120 section 3.2, XEP-0368), the fallback to
the domain itself, static routes, and what DNS failures give; answered by a
real name server on loopback (``tests.realservers.dns``)."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from starttls_proxy.config import RoutesConfig, SocketAddress, StaticRoute
from starttls_proxy.proxy.routes import (
    DEFAULT_PORT,
    MAX_TARGETS,
    RouteError,
    Router,
    Target,
    _Record,
    rfc2782_order,
)
from tests.realservers.dns import SRV, StaticDNS


@pytest.fixture
def dns() -> Iterator[StaticDNS]:
    with StaticDNS() as server:
        yield server


def _router(dns: StaticDNS, **routes: object) -> Router:
    config = RoutesConfig.model_validate({"nameservers": [f"127.0.0.1:{dns.port}"], **routes})
    return Router(config, timeout=2.0)


def _targets(router: Router, domain: str) -> list[Target]:
    return asyncio.run(router.targets(domain))


def test_both_services_merge_by_priority(dns: StaticDNS) -> None:
    dns.set_srv("_xmpps-server._tcp.a.example", SRV("192.0.2.1", 5270, priority=20))
    dns.set_srv(
        "_xmpp-server._tcp.a.example",
        SRV("192.0.2.2", 5269, priority=10),
        SRV("192.0.2.3", 5269, priority=30),
    )
    assert _targets(_router(dns), "a.example") == [
        Target("192.0.2.2", 5269, direct_tls=False),
        Target("192.0.2.1", 5270, direct_tls=True),
        Target("192.0.2.3", 5269, direct_tls=False),
    ]


def test_srv_targets_are_resolved(dns: StaticDNS) -> None:
    dns.set_srv("_xmpp-server._tcp.a.example", SRV("xmpp.a.example", 5269))
    dns.set_a("xmpp.a.example", "192.0.2.7", "192.0.2.8")
    targets = _targets(_router(dns), "a.example")
    assert [(t.address, t.port) for t in targets] == [("192.0.2.7", 5269), ("192.0.2.8", 5269)]


def test_without_srv_the_domain_itself_on_5269(dns: StaticDNS) -> None:
    """RFC 6120 section 3.2.2: no SRV record, then A/AAAA of the domain."""
    dns.set_a("plain.example", "192.0.2.9")
    assert _targets(_router(dns), "plain.example") == [
        Target("192.0.2.9", DEFAULT_PORT, direct_tls=False)
    ]


def test_a_dot_target_means_no_service(dns: StaticDNS) -> None:
    """RFC 2782: a single record with target "." says the service is not there."""
    dns.set_srv("_xmpp-server._tcp.none.example", SRV(".", 0))
    dns.set_a("none.example", "192.0.2.9")
    with pytest.raises(RouteError, match="offers no XMPP server-to-server service"):
        _targets(_router(dns), "none.example")


def test_an_unknown_domain_has_nowhere_to_go(dns: StaticDNS) -> None:
    with pytest.raises(RouteError, match=r"no address for nowhere\.example"):
        _targets(_router(dns), "nowhere.example")


def test_static_routes_override_dns_in_their_order(dns: StaticDNS) -> None:
    dns.set_srv("_xmpp-server._tcp.a.example", SRV("192.0.2.2", 5269))
    dns.set_a("relay.example", "192.0.2.5")
    router = _router(
        dns,
        static={
            "a.example": [
                {"address": "relay.example:5270", "tls": "implicit"},
                {"address": "192.0.2.6:5269"},
            ]
        },
    )
    assert _targets(router, "a.example") == [
        Target("192.0.2.5", 5270, direct_tls=True),
        Target("192.0.2.6", 5269, direct_tls=False),
    ]
    assert ("_xmpp-server._tcp.a.example", 33) not in dns.questions


def test_targets_are_bounded(dns: StaticDNS) -> None:
    records = [SRV(f"192.0.2.{i}", 5269) for i in range(1, 40)]
    dns.set_srv("_xmpp-server._tcp.many.example", *records)
    assert len(_targets(_router(dns), "many.example")) == MAX_TARGETS


def test_a_silent_name_server_is_a_route_error() -> None:
    # A bound UDP socket that never answers: the lookup gives up in time.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        config = RoutesConfig(nameservers=(SocketAddress(host="127.0.0.1", port=port),))
        router = Router(config, timeout=0.5)
        with pytest.raises(RouteError, match="DNS lookup of SRV"):
            asyncio.run(router.targets("a.example"))


def test_system_resolver_when_no_name_server_is_named() -> None:
    # Constructed from /etc/resolv.conf; static routes need no lookup at all.
    route = StaticRoute(address=SocketAddress(host="192.0.2.1", port=5269))
    router = Router(RoutesConfig(static={"a.example": (route,)}), timeout=1.0)
    assert asyncio.run(router.targets("a.example")) == [Target("192.0.2.1", 5269, False)]


_records = st.lists(
    st.builds(
        _Record,
        host=st.sampled_from(["a", "b", "c", "d"]),
        port=st.integers(1, 65535),
        direct_tls=st.booleans(),
        priority=st.integers(0, 3),
        weight=st.integers(0, 100),
    ),
    max_size=12,
)


@given(_records, st.integers())
def test_rfc2782_order_is_a_permutation_by_priority(records: list[_Record], seed: int) -> None:
    """By priority, and within one direct TLS first (XEP-0368's _xmpps-server)."""
    ordered = rfc2782_order(records, random.Random(seed))
    assert sorted(ordered, key=repr) == sorted(records, key=repr)
    keys = [(record.priority, not record.direct_tls) for record in ordered]
    assert keys == sorted(keys)


def test_direct_tls_first_within_a_priority(dns: StaticDNS) -> None:
    dns.set_srv("_xmpp-server._tcp.a.example", SRV("192.0.2.2", 5269, weight=100))
    dns.set_srv("_xmpps-server._tcp.a.example", SRV("192.0.2.1", 5270, weight=0))
    assert [t.direct_tls for t in _targets(_router(dns), "a.example")] == [True, False]


def test_rfc2782_weights_are_proportional() -> None:
    heavy, light = _Record("heavy", 1, False, weight=90), _Record("light", 1, False, weight=10)
    draw = random.Random(7)
    first = [rfc2782_order([light, heavy], draw)[0].host for _ in range(2000)]
    assert 0.85 < first.count("heavy") / len(first) < 0.95
