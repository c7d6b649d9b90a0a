"""Scale-out: an L4 balancer's PROXY header is honoured only from trusted_proxies."""

from __future__ import annotations

import socket

import pytest

from protocols import proxy_header
from protocols._base import Peer
from tests.realservers.certs import CertFiles
from tests.realservers.dialogue import read_smtp_reply, read_until, smtp_upgraded
from tests.realservers.postfix import PostfixInstance
from tests.realservers.proxy import ProxyProcess, StartProxy, listener

BALANCER = "127.0.0.20"
STRANGER = "127.0.0.21"


@pytest.fixture(scope="module")
def proxy(module_proxy: StartProxy, postfix: PostfixInstance) -> ProxyProcess:
    return module_proxy(
        [
            listener(
                "balanced",
                postfix.proxy_port,
                backend={"identity": "proxy-v2"},
                trusted_proxies=[f"{BALANCER}/32"],
            ),
        ],
    )


def _through_balancer(proxy: ProxyProcess, source: str, header: bytes) -> socket.socket:
    sock = proxy.connect("balanced", source)
    sock.sendall(header)
    return sock


@pytest.mark.parametrize("version", [1, 2])
def test_header_from_trusted_balancer_names_the_client(
    proxy: ProxyProcess, postfix: PostfixInstance, test_certs: CertFiles, version: int
) -> None:
    claimed = f"198.51.100.{70 + version}"
    peer = Peer(claimed, 50000, "127.0.0.1", proxy.ports["balanced"])
    header = proxy_header.proxy_v1(peer) if version == 1 else proxy_header.proxy_v2(peer, None)
    tls = smtp_upgraded(_through_balancer(proxy, BALANCER, header), test_certs, ehlo=False)
    tls.sendall(b"QUIT\r\n")
    assert read_smtp_reply(tls).startswith(b"221")
    tls.close()
    postfix.wait_for_log(f"connect from unknown[{claimed}]")


def test_header_from_untrusted_address_is_not_honoured(
    proxy: ProxyProcess, postfix: PostfixInstance
) -> None:
    peer = Peer("198.51.100.99", 50000, "127.0.0.1", proxy.ports["balanced"])
    sock = _through_balancer(proxy, STRANGER, proxy_header.proxy_v1(peer))
    refusal = b"530 5.7.0 Must issue a STARTTLS command first\r\n"
    # The header is just a line of text to the SMTP machine: refused.
    replies = read_until(sock, refusal)
    assert replies.startswith(b"220 proxy.test")
    assert replies.endswith(b"\r\n" + refusal)
    sock.close()
    assert "198.51.100.99" not in postfix.log()


def test_trusted_balancer_without_header_is_closed(proxy: ProxyProcess) -> None:
    sock = _through_balancer(proxy, BALANCER, b"EHLO client.test\r\n")
    assert sock.recv(4096) == b""
    sock.close()
    proxy.wait_for_log("no PROXY header where one is required")
