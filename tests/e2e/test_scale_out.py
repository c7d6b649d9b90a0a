"""Scale-out behind a real load balancer: Debian's HAProxy in ``mode tcp``
with ``send-proxy-v2`` in front of two proxy instances, the real Postfix,
Dovecot and Prosody behind them.

What the README's "Scale-out" section promises: sessions of every protocol
spread over both instances; the backends log the real client's address,
not HAProxy's nor the proxy's; killing one instance loses only its own
sessions while new ones go to the other; a rolling reload keeps serving.
Without a balancer, instances on one host share a port (``reuse_port``).
Each client connects from an address of its own, so that the instance that
served it can be read from the instances' logs.
"""

from __future__ import annotations

import contextlib
import imaplib
import itertools
import os
import poplib
import signal
import smtplib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.realservers.certs import CertFiles
from tests.realservers.dialogue import read_until
from tests.realservers.dovecot import DovecotInstance
from tests.realservers.haproxy import HAProxyInstance, running_haproxy
from tests.realservers.net import free_port, sourced, wait_until
from tests.realservers.postfix import PostfixInstance
from tests.realservers.prosody import ProsodyInstance
from tests.realservers.proxy import ProxyProcess, StartProxy, listener, start_proxy

PROTOCOLS = ("smtp", "imap", "pop3", "xmpp")
#: Sessions per protocol in the spreading test: round robin gives each
#: instance some.
SESSIONS = 4
#: Source addresses: one per client session, never reused within the module.
_SOURCES = (f"127.0.{third}.{fourth}" for third in range(10, 40) for fourth in range(1, 255))

Session = Callable[[int, str], None]


def _listeners(
    postfix: PostfixInstance, dovecot: DovecotInstance, prosody: ProsodyInstance
) -> list[dict[str, Any]]:
    # HAProxy connects from 127.0.0.1; its PROXY header names the client.
    balancer = ["127.0.0.1/32"]
    proxy_v2 = {"identity": "proxy-v2"}
    return [
        listener(
            "smtp", postfix.plain_port, backend={"identity": "xclient"}, trusted_proxies=balancer
        ),
        listener(
            "imap", dovecot.imap_proxy_port, "imap", backend=proxy_v2, trusted_proxies=balancer
        ),
        listener(
            "pop3", dovecot.pop3_proxy_port, "pop3", backend=proxy_v2, trusted_proxies=balancer
        ),
        listener(
            "xmpp",
            prosody.port,
            "xmpp-client",
            hostname="localhost",
            domains=["localhost"],
            trusted_proxies=balancer,
        ),
    ]


def _smtp(certs: CertFiles) -> Session:
    def session(port: int, source: str) -> None:
        with smtplib.SMTP("localhost", port, source_address=(source, 0), timeout=20) as client:
            client.starttls(context=certs.client_context())
            client.sendmail(
                "alice@client.test", ["bob@example.test"], b"Subject: scale-out\r\n\r\nhi\r\n"
            )

    return session


def _imap(certs: CertFiles) -> Session:
    def session(port: int, source: str) -> None:
        client = sourced(imaplib.IMAP4, source)("localhost", port, timeout=20)
        try:
            client.starttls(certs.client_context())
            client.login("alice", "alicepw")
            client.logout()
        finally:
            with contextlib.suppress(OSError):
                client.shutdown()

    return session


def _pop3(certs: CertFiles) -> Session:
    def session(port: int, source: str) -> None:
        client = sourced(poplib.POP3, source)("localhost", port, timeout=20)
        try:
            client.stls(certs.client_context())
            client.user("alice")
            client.pass_("alicepw")
            client.quit()
        finally:
            client.close()

    return session


def _xmpp(certs: CertFiles) -> Session:
    header = (
        b"<?xml version='1.0'?><stream:stream to='localhost' xmlns='jabber:client' "
        b"xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>"
    )

    def session(port: int, source: str) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=20, source_address=(source, 0))
        with sock:
            sock.sendall(header)
            read_until(sock, b"</stream:features>")
            sock.sendall(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
            read_until(sock, b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
            with certs.client_context().wrap_socket(sock, server_hostname="localhost") as tls:
                tls.sendall(header)
                read_until(tls, b"</stream:features>")
                tls.sendall(b"</stream:stream>")

    return session


@pytest.fixture(scope="module")
def sessions(test_certs: CertFiles) -> dict[str, Session]:
    return {
        "smtp": _smtp(test_certs),
        "imap": _imap(test_certs),
        "pop3": _pop3(test_certs),
        "xmpp": _xmpp(test_certs),
    }


@contextlib.contextmanager
def _balanced(base: Path, instances: list[ProxyProcess]) -> Iterator[HAProxyInstance]:
    frontends = {
        protocol: [(f"instance{n}", proxy.ports[protocol]) for n, proxy in enumerate(instances)]
        for protocol in PROTOCOLS
    }
    with running_haproxy(base, frontends) as haproxy:
        yield haproxy


@pytest.fixture(scope="module")
def pair(
    module_proxy: StartProxy,
    postfix: PostfixInstance,
    dovecot: DovecotInstance,
    prosody: ProsodyInstance,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[HAProxyInstance, list[ProxyProcess]]]:
    instances = [module_proxy(_listeners(postfix, dovecot, prosody)) for _ in range(2)]
    with _balanced(tmp_path_factory.mktemp("haproxy"), instances) as haproxy:
        yield haproxy, instances


def _served_by(instances: list[ProxyProcess], source: str) -> int:
    """Which instance's log names a session from ``source``."""
    deadline = time.monotonic() + 10
    while True:
        found = [n for n, proxy in enumerate(instances) if f" {source}:" in proxy.log()]
        if found:
            assert len(found) == 1, found
            return found[0]
        assert time.monotonic() < deadline, f"no instance logged {source}"
        time.sleep(0.05)


def test_sessions_of_every_protocol_spread_and_backends_see_the_real_client(
    pair: tuple[HAProxyInstance, list[ProxyProcess]],
    sessions: dict[str, Session],
    postfix: PostfixInstance,
    dovecot: DovecotInstance,
) -> None:
    haproxy, instances = pair
    for protocol in PROTOCOLS:
        served = []
        for _ in range(SESSIONS):
            source = next(_SOURCES)
            sessions[protocol](haproxy.ports[protocol], source)
            served.append(_served_by(instances, source))
            if protocol == "smtp":
                postfix.wait_for_log(f"client=unknown[{source}]")
            elif protocol in ("imap", "pop3"):
                dovecot.wait_for_line("Login: user=<alice>", f"rip={source}")
        assert set(served) == {0, 1}, (protocol, served)


def _idle_upgraded(port: int, source: str, certs: CertFiles) -> imaplib.IMAP4:
    client = sourced(imaplib.IMAP4, source)("localhost", port, timeout=20)
    client.starttls(certs.client_context())
    client.login("alice", "alicepw")
    return client


def test_killing_one_instance_loses_only_its_sessions(
    postfix: PostfixInstance,
    dovecot: DovecotInstance,
    prosody: ProsodyInstance,
    test_certs: CertFiles,
    sessions: dict[str, Session],
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    listeners = _listeners(postfix, dovecot, prosody)
    certificates = [(test_certs.cert, test_certs.key)]
    doomed = start_proxy(tmp_path / "doomed", certificates, [dict(e) for e in listeners])
    survivor = start_proxy(tmp_path / "survivor", certificates, [dict(e) for e in listeners])
    try:
        with _balanced(tmp_path / "haproxy", [doomed, survivor]) as haproxy:
            port = haproxy.ports["imap"]
            idle = {}
            for _ in range(6):
                source = next(_SOURCES)
                idle[source] = _idle_upgraded(port, source, test_certs)
            on = {source: _served_by([doomed, survivor], source) for source in idle}
            assert sorted(on.values()) == [0, 0, 0, 1, 1, 1]

            killed = time.monotonic()
            os.killpg(doomed.process.pid, signal.SIGKILL)
            doomed.process.wait(10)
            # A connection the dying instance's backlog took in its last
            # moment was its session; from now on nothing listens there.
            assert wait_until("127.0.0.1", list(doomed.ports.values()), listening=False, timeout=10)
            # New sessions right away: a refused connection is dispatched again.
            failures = []
            for _ in range(10):
                try:
                    sessions["imap"](port, next(_SOURCES))
                except (OSError, imaplib.IMAP4.error) as error:
                    failures.append(repr(error))
            assert failures == [], haproxy.log()[-3000:]
            haproxy.wait_for_log("instance0 is DOWN")
            routed_around = time.monotonic() - killed

            for source, client in idle.items():
                if on[source] == 1:
                    assert client.noop()[0] == "OK"
                    client.logout()
                else:
                    with pytest.raises((OSError, imaplib.IMAP4.abort)):
                        client.noop()
                    with contextlib.suppress(OSError):
                        client.shutdown()
            record_property("seconds_until_haproxy_marked_it_down", round(routed_around, 2))
    finally:
        doomed.stop()
        assert survivor.stop() == 0, survivor.log()[-3000:]


def test_a_rolling_reload_keeps_serving(
    pair: tuple[HAProxyInstance, list[ProxyProcess]], sessions: dict[str, Session]
) -> None:
    haproxy, instances = pair
    failures: list[Exception] = []
    done = threading.Event()

    def clients() -> None:
        for protocol in itertools.cycle(PROTOCOLS):
            if done.is_set():
                return
            try:
                sessions[protocol](haproxy.ports[protocol], next(_SOURCES))
            except Exception as error:  # every failure counts
                failures.append(error)

    runner = threading.Thread(target=clients)
    runner.start()
    try:
        for proxy in instances:
            mark = len(proxy.log())
            proxy.process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 30
            while "reloaded" not in proxy.log()[mark:]:
                assert time.monotonic() < deadline, proxy.log()[mark:]
                time.sleep(0.05)
            time.sleep(0.5)
    finally:
        done.set()
        runner.join(60)
    assert failures == []


def test_instances_on_one_host_share_a_port_with_reuse_port(
    dovecot: DovecotInstance, test_certs: CertFiles, sessions: dict[str, Session], tmp_path: Path
) -> None:
    """The kernel spreads new connections over the instances that listen
    with ``reuse_port``; once one has stopped, the other takes them all."""
    address = f"127.0.0.1:{free_port()}"
    instances = [
        start_proxy(
            tmp_path / f"instance{n}",
            [(test_certs.cert, test_certs.key)],
            [
                listener(
                    "imap",
                    dovecot.imap_proxy_port,
                    "imap",
                    backend={"identity": "proxy-v2"},
                    listen=address,
                    reuse_port=True,
                )
            ],
            # Workers of different instances must never share a UID.
            isolation={"uid_range": [300_000 + n * 1_000, 1_000]},
        )
        for n in range(2)
    ]
    port = instances[0].ports["imap"]
    try:
        served = []
        for _ in range(16):
            source = next(_SOURCES)
            sessions["imap"](port, source)
            served.append(_served_by(instances, source))
            dovecot.wait_for_line("Login: user=<alice>", f"rip={source}")
        assert set(served) == {0, 1}, served

        assert instances[0].stop() == 0
        for _ in range(8):
            source = next(_SOURCES)
            sessions["imap"](port, source)
            assert _served_by(instances, source) == 1
    finally:
        for proxy in instances:
            proxy.stop()
