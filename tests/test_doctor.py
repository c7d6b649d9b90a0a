"""--check-backends without real servers: a backend that is down or speaks
garbage gets a finding, never a traceback."""

from __future__ import annotations

import asyncio

from starttls_proxy.config import ListenerConfig
from starttls_proxy.proxy.doctor import examine, examine_routes
from starttls_proxy.proxy.doctor_report import judge, table
from tests.realservers.net import free_port


def _listener(port: int) -> ListenerConfig:
    return ListenerConfig.model_validate(
        {
            "name": "smtp",
            "protocol": "smtp",
            "listen": "127.0.0.1:2525",
            "hostname": "proxy.test",
            "backend": {"address": f"127.0.0.1:{port}"},
            "timeouts": {"backend_connect": 2},
        }
    )


def test_unreachable_backend() -> None:
    port = free_port()
    verdict = judge(asyncio.run(examine(_listener(port))))
    assert not verdict.usable
    assert verdict.findings[0].text.startswith(f"backend unreachable: 127.0.0.1:{port}: ")
    assert "NOT USABLE" in table([verdict])


def test_backend_speaking_garbage() -> None:
    async def run() -> str:
        async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"\x00\xffnot smtp at all\r\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(garbage, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return table([judge(await examine(_listener(port)))])

    report = asyncio.run(run())
    assert "PROBLEM       the session failed: malformed reply from backend: " in report
    assert report.endswith("verdict       NOT USABLE")


def test_an_outgoing_listener_has_routes_not_a_backend() -> None:
    """xmpp-server-out: its static routes are connected, the rest is DNS."""

    async def run() -> str:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        server = await asyncio.start_server(accept, "127.0.0.1", 0)
        up, down = server.sockets[0].getsockname()[1], free_port()
        listener = ListenerConfig.model_validate(
            {
                "name": "s2s-out",
                "protocol": "xmpp-server-out",
                "listen": "127.0.0.1:5299",
                "timeouts": {"backend_connect": 2},
                "routes": {
                    "static": {
                        "a.example": [{"address": f"127.0.0.1:{up}"}],
                        "b.example": [{"address": f"127.0.0.1:{down}"}],
                    }
                },
            }
        )
        async with server:
            return table([judge(await examine_routes(listener))])

    report = asyncio.run(run())
    assert "the system resolver (/etc/resolv.conf), the static routes first" in report
    assert "a.example: 127.0.0.1:" in report and ", reachable" in report
    assert "PROBLEM       static route of b.example unreachable: 127.0.0.1:" in report
    assert report.endswith("verdict       NOT USABLE")
