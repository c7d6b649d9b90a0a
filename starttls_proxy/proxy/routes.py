"""Where an outgoing server-to-server stream goes (``xmpp-server-out``).

RFC 6120 section 3.2 as XEP-0368 extends it: the SRV records of
``_xmpps-server._tcp.DOMAIN`` (direct TLS) and ``_xmpp-server._tcp.DOMAIN``
(STARTTLS) are merged and ordered as RFC 2782 says (priority, then a
weighted random draw within one), direct TLS first within a priority (it
saves the STARTTLS round trips); a single record whose target is ``.``
means the service is decidedly not offered there, and nothing else is
tried. Only when the domain has no SRV record at all is it connected
directly, on port 5269 with STARTTLS (section 3.2.2). A listener's
``routes.static`` overrides DNS for the domains it names, in the order
given: for tests, and for operators whose peers are reached another way.

Names resolve through dnspython, against the listener's
``routes.nameservers`` or the system's (``/etc/resolv.conf``): the name
servers the SRV answers came from also resolve their targets. DNS answers
are the network's word, so what is taken from them is bounded
(``MAX_TARGETS``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdata
import dns.rdtypes.IN.SRV
import dns.resolver

if TYPE_CHECKING:
    from starttls_proxy.config import RoutesConfig

#: XMPP's registered server-to-server port (RFC 6120 section 14.7).
DEFAULT_PORT = 5269
#: Addresses tried for one domain at most, whatever DNS says.
MAX_TARGETS = 16
_SERVICES = (("_xmpps-server._tcp.", True), ("_xmpp-server._tcp.", False))


@dataclass(frozen=True)
class Target:
    """One address to try, and how TLS starts there."""

    address: str
    port: int
    direct_tls: bool

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port} ({'direct TLS' if self.direct_tls else 'STARTTLS'})"


class RouteError(Exception):
    """The domain has nowhere to go; the message says why."""


@dataclass(frozen=True)
class _Record:
    """One SRV record, or one static route (priority and weight 0)."""

    host: str
    port: int
    direct_tls: bool
    priority: int = 0
    weight: int = 0


def rfc2782_order(records: Sequence[_Record], draw: random.Random) -> list[_Record]:
    """``records`` in the order to try them: by priority, direct TLS before
    STARTTLS within one, and within each a weighted random draw (RFC 2782,
    "Usage rules")."""
    ordered: list[_Record] = []
    groups = sorted({(record.priority, not record.direct_tls) for record in records})
    for priority, starttls in groups:
        pool = [r for r in records if (r.priority, not r.direct_tls) == (priority, starttls)]
        # Zero weights first, so that they have a small chance too.
        pool.sort(key=lambda record: record.weight != 0)
        while pool:
            point = draw.randint(0, sum(record.weight for record in pool))
            running = 0
            for index, record in enumerate(pool):
                running += record.weight
                if running >= point:
                    ordered.append(pool.pop(index))
                    break
    return ordered


class Router:
    """Resolves domains for one ``xmpp-server-out`` listener."""

    def __init__(self, config: RoutesConfig, timeout: float) -> None:
        # Normalized by the configuration (RoutesConfig), as the machine's domains are.
        self._static = config.static
        servers = [
            dns.nameserver.Do53Nameserver(server.host, server.port) for server in config.nameservers
        ]
        try:
            self._resolver = dns.asyncresolver.Resolver(configure=not servers)
        except dns.resolver.NoResolverConfiguration:
            # No name server in /etc/resolv.conf: the C library's default.
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            servers = [dns.nameserver.Do53Nameserver("127.0.0.1", 53)]
        if servers:
            self._resolver.nameservers = servers
        self._resolver.lifetime = timeout
        self._draw = random.Random()

    async def targets(self, domain: str) -> list[Target]:
        """Where to connect for ``domain`` (a normalized domain), in order;
        ``RouteError`` when nowhere."""
        static = self._static.get(domain)
        if static is not None:
            records = [
                _Record(route.address.host, route.address.port, route.direct_tls)
                for route in static
            ]
        else:
            records = rfc2782_order(await self._service_records(domain), self._draw)
        targets: list[Target] = []
        for record in records:
            for address in await self._addresses(record.host):
                targets.append(Target(address, record.port, record.direct_tls))
                if len(targets) == MAX_TARGETS:
                    return targets
        if not targets:
            raise RouteError(f"no address for {domain}")
        return targets

    async def _service_records(self, domain: str) -> list[_Record]:
        answers = await asyncio.gather(
            *(self._srv(prefix + domain, direct) for prefix, direct in _SERVICES)
        )
        records = [record for answer in answers for record in answer]
        if not records:
            # No SRV record at all: the domain itself (section 3.2.2).
            return [_Record(domain, DEFAULT_PORT, direct_tls=False)]
        if all(record.host == "" for record in records):
            raise RouteError(f"{domain} offers no XMPP server-to-server service (SRV target '.')")
        return [record for record in records if record.host][:MAX_TARGETS]

    async def _srv(self, name: str, direct_tls: bool) -> list[_Record]:
        answer = await self._lookup(name, "SRV")
        records = []
        for data in answer:
            assert isinstance(data, dns.rdtypes.IN.SRV.SRV)
            host = data.target.to_text(omit_final_dot=True)
            records.append(
                _Record(
                    "" if host in ("", ".") else host,
                    data.port,
                    direct_tls,
                    data.priority,
                    data.weight,
                )
            )
        return records

    async def _addresses(self, host: str) -> list[str]:
        try:
            return [str(ipaddress.ip_address(host))]
        except ValueError:
            pass
        answers = await asyncio.gather(self._lookup(host, "AAAA"), self._lookup(host, "A"))
        return [data.to_text() for answer in answers for data in answer]

    async def _lookup(self, name: str, kind: str) -> Iterable[dns.rdata.Rdata]:
        """The records of ``kind``, none when the name has none; ``RouteError``
        when DNS cannot say (no answer in time, no name server answering)."""
        try:
            return await self._resolver.resolve(name, kind, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return ()
        except dns.exception.DNSException as error:
            raise RouteError(f"DNS lookup of {kind} {name} failed: {error}") from None
