"""Connecting a session's backend side: the listener's backend address, or,
for an outgoing stream, the first server of the remote domain that answers
(``routes``). A failure is a ``ConnectionError`` or a ``RouteError`` whose
text says why, for the log and the client's last words."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from starttls_proxy.proxy.endpoints import Endpoint
from starttls_proxy.proxy.routes import Router, Target

if TYPE_CHECKING:
    from starttls_proxy.config import SocketAddress

EndpointFactory = Callable[[], Endpoint]


async def connect_backend(
    loop: asyncio.AbstractEventLoop,
    address: SocketAddress,
    timeout: float,
    factory: EndpointFactory,
) -> tuple[asyncio.Transport, Endpoint]:
    try:
        async with asyncio.timeout(timeout):
            if address.unix_path is not None:
                return await loop.create_unix_connection(factory, address.unix_path)
            return await loop.create_connection(factory, address.host, address.port)
    except (OSError, TimeoutError) as error:
        raise ConnectionError(f"backend {address} unreachable: {error or 'timeout'}") from None


async def connect_route(
    loop: asyncio.AbstractEventLoop,
    router: Router,
    domain: str,
    timeout: float,
    factory: EndpointFactory,
) -> tuple[asyncio.Transport, Endpoint, Target]:
    """The first of ``domain``'s servers that answers, in the router's order."""
    failures = []
    for target in await router.targets(domain):
        try:
            async with asyncio.timeout(timeout):
                transport, endpoint = await loop.create_connection(
                    factory, target.address, target.port
                )
        except (OSError, TimeoutError) as error:
            failures.append(f"{target}: {error or 'timeout'}")
            continue
        return transport, endpoint, target
    raise ConnectionError(f"no server of {domain} answered: {'; '.join(failures)}")
