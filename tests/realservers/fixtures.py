"""Fixtures of the tests against real servers (tests/e2e, tests/adversarial):
test certificates, real Postfix, Dovecot, Prosody and ejabberd, the proxy.

Postfix runs as a standalone instance on 127.0.0.1 (see ``tests/realservers/postfix.py``);
the tests must run as root.  A missing Postfix is a failure, not a skip: install the
system packages with ``sudo scripts/install-system-deps.sh``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.realservers.certs import CertFiles, write_test_certs
from tests.realservers.daemons import INSTALL_HINT, find_program
from tests.realservers.dovecot import DovecotInstance, start_dovecot
from tests.realservers.ejabberd import EjabberdInstance, start_ejabberd
from tests.realservers.net import free_port
from tests.realservers.postfix import PostfixInstance, start_postfix
from tests.realservers.prosody import ProsodyInstance, start_prosody
from tests.realservers.proxy import ProxyProcess, StartProxy, running_proxy


@pytest.fixture(scope="session")
def test_ca() -> trustme.CA:
    """The session's test CA; it issues both ``test_certs`` and ``test_certs_other``."""
    return trustme.CA()


@pytest.fixture(scope="session")
def test_certs(tmp_path_factory: pytest.TempPathFactory, test_ca: trustme.CA) -> CertFiles:
    """Server certificate for ``localhost``, ``mail.example.test`` and ``127.0.0.1``."""
    return write_test_certs(
        tmp_path_factory.mktemp("certs"), test_ca, ("localhost", "mail.example.test", "127.0.0.1")
    )


@pytest.fixture(scope="session")
def test_certs_other(tmp_path_factory: pytest.TempPathFactory, test_ca: trustme.CA) -> CertFiles:
    """Server certificate for ``other.example.test`` only, same CA (for SNI tests)."""
    return write_test_certs(
        tmp_path_factory.mktemp("certs-other"), test_ca, ("other.example.test",)
    )


@pytest.fixture(scope="module")
def metrics_port() -> int:
    """A free port for the metrics endpoint of the module's proxy."""
    return free_port()


@pytest.fixture(scope="session")
def postfix(
    tmp_path_factory: pytest.TempPathFactory, test_certs: CertFiles
) -> Iterator[PostfixInstance]:
    """A running Postfix backend (plain+XCLIENT, PROXY and STARTTLS listeners), stopped at the end.

    Shared by the whole session: tests that count deliveries should call
    ``postfix.clear_mailbox()`` first.
    """
    if find_program("postfix") is None or find_program("script") is None:
        pytest.fail(f"Postfix (or `script`) is not installed: {INSTALL_HINT}", pytrace=False)
    if os.geteuid() != 0:
        pytest.fail("the end-to-end tests start Postfix and must run as root", pytrace=False)
    instance = start_postfix(tmp_path_factory.mktemp("postfix"), test_certs.cert, test_certs.key)
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture(scope="session")
def dovecot(
    tmp_path_factory: pytest.TempPathFactory, test_certs: CertFiles
) -> Iterator[DovecotInstance]:
    """A running Dovecot backend (IMAP and POP3, plain and PROXY listeners), stopped at the end.

    Users alice/alicepw and bob/bobpw; shared by the whole session, so tests should find
    their messages by a unique token rather than count them.
    """
    if find_program("dovecot") is None:
        pytest.fail(f"Dovecot is not installed: {INSTALL_HINT}", pytrace=False)
    if os.geteuid() != 0:
        pytest.fail("the end-to-end tests start Dovecot and must run as root", pytrace=False)
    with start_dovecot(
        tmp_path_factory.mktemp("dovecot"), test_certs.cert, test_certs.key
    ) as instance:
        yield instance


@pytest.fixture(scope="module")
def module_proxy(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, test_certs: CertFiles
) -> Iterator[StartProxy]:
    """Starts proxies for the module's tests, by default with the ``test_certs``
    certificate, and stops them once those tests are done (see ``running_proxy``)."""
    with contextlib.ExitStack() as running:

        def start(
            listeners: list[dict[str, Any]],
            certificates: list[tuple[Path, Path]] | None = None,
            **options: Any,
        ) -> ProxyProcess:
            base = tmp_path_factory.mktemp(f"proxy-{request.module.__name__.rpartition('.')[2]}")
            certificates = certificates or [(test_certs.cert, test_certs.key)]
            return running.enter_context(running_proxy(base, certificates, listeners, **options))

        yield start


@pytest.fixture(scope="module")
def dovecot_proxy(
    module_proxy: StartProxy, dovecot: DovecotInstance, dovecot_protocol: str
) -> ProxyProcess:
    """The proxy in front of Dovecot for the module's ``dovecot_protocol``
    (see ``DovecotInstance.proxy_listeners``)."""
    return module_proxy(dovecot.proxy_listeners(dovecot_protocol))


# -- XMPP backends ---------------------------------------------------------------------


def _require_xmpp_server(program: str, name: str) -> None:
    if find_program(program) is None:
        pytest.fail(f"{name} is not installed: {INSTALL_HINT}", pytrace=False)
    if os.geteuid() != 0:
        pytest.fail(f"the end-to-end tests start {name} and must run as root", pytrace=False)


@pytest.fixture(scope="session")
def prosody(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProsodyInstance]:
    """A running Prosody on 127.0.0.1 without TLS (a plaintext backend), stopped at the end.

    Domain ``localhost``, users alice/alicepw and bob/bobpw; no PROXY protocol.
    """
    _require_xmpp_server("prosody", "Prosody")
    with start_prosody(tmp_path_factory.mktemp("prosody")) as instance:
        yield instance


@pytest.fixture(scope="session")
def ejabberd(
    tmp_path_factory: pytest.TempPathFactory, test_certs: CertFiles
) -> Iterator[EjabberdInstance]:
    """A running ejabberd on 127.0.0.1 offering STARTTLS itself, stopped at the end.

    Domain ``localhost``, users alice/alicepw and bob/bobpw; ``proxy_port`` requires a
    PROXY header.
    """
    _require_xmpp_server("ejabberdctl", "ejabberd")
    # Without the port mapper: another test run on the machine (a developer's,
    # next to CI's) has its own on the one port the mapper can take.
    with start_ejabberd(
        tmp_path_factory.mktemp("ejabberd"), test_certs.cert, test_certs.key, epmd=False
    ) as instance:
        yield instance
