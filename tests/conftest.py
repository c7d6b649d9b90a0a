"""Certificates for tests that need TLS without real servers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from hypothesis import settings

from tests.peer_certs import Authority

# The real servers and the proxy, for every directory that needs them.
pytest_plugins = ["tests.realservers.fixtures"]

# Property tests are about correctness, not speed: the shared 2-core CI
# machine must not turn a slow example into a failure.
settings.register_profile("starttls-proxy", deadline=None)
settings.load_profile("starttls-proxy")


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def cert_dir(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """ca.pem, cert.pem + key.pem (localhost), other.pem + other-key.pem."""
    directory = tmp_path_factory.mktemp("certs")
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    leaf = ca.issue_cert("localhost", "mail.example.test", "127.0.0.1")
    leaf.private_key_pem.write_to_path(str(directory / "key.pem"))
    leaf.cert_chain_pems[0].write_to_path(str(directory / "cert.pem"))
    for pem in leaf.cert_chain_pems[1:]:
        pem.write_to_path(str(directory / "cert.pem"), append=True)
    other = ca.issue_cert("other.example.test", "*.wild.example.test")
    other.private_key_pem.write_to_path(str(directory / "other-key.pem"))
    other.cert_chain_pems[0].write_to_path(str(directory / "other.pem"))
    yield directory


@pytest.fixture(scope="session")
def peer_authorities() -> tuple[Authority, Authority]:
    """Two CAs of connecting XMPP servers: the first one trusted by the
    peer-certificate tests, the second one not."""
    return Authority.new("Trusted peers' CA"), Authority.new("Unknown peers' CA")
