"""The fuzzers' fixed short budget in the normal test run: every target
replays its committed corpus and its seeds in this process, then atheris
tries ``NEW_INPUTS`` new inputs from that corpus in a process of its own.
The longer run is ``python -m tests.fuzz --minutes 10``."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from protocols._base import CloseConnection, PeerChecked, PeerVerification, SessionSettings
from tests.fuzz.__main__ import corpus_dir, fuzz
from tests.fuzz.harness import Machine, run_program
from tests.fuzz.targets import TARGETS, XMPP_SERVER_OUT_TARGET, XMPP_SERVER_TARGET, seeds

NEW_INPUTS = 3000

every_target = pytest.mark.parametrize("name", list(TARGETS))


@every_target
def test_corpus(name: str) -> None:
    target = TARGETS[name]
    committed = sorted(path for path in corpus_dir(name).iterdir() if path.is_file())
    assert committed, "python -m tests.fuzz --write-seeds"
    for path in committed:
        target(path.read_bytes())
    for program in seeds(name):
        target(program)


def _outcomes(
    name: str, make: Callable[[int], tuple[Machine, SessionSettings]]
) -> tuple[set[PeerVerification], set[str]]:
    """The verdicts on the peer's certificate and the endings that the
    committed corpus of target ``name`` reaches."""
    results: set[PeerVerification] = set()
    endings: set[str] = set()
    for path in sorted(corpus_dir(name).iterdir()):
        for command in run_program(path.read_bytes(), make).commands:
            if isinstance(command, PeerChecked):
                results.add(command.result)
            elif isinstance(command, CloseConnection):
                endings.add(command.reason)
    return results, endings


def test_the_server_corpus_reaches_every_peer_outcome() -> None:
    """The committed xmpp-server corpus starts the fuzzer from every verdict
    on the peer's certificate and every refusal of its stream, under TLS and
    restarted after SASL."""
    results, endings = _outcomes("xmpp-server", XMPP_SERVER_TARGET.make)
    assert results == set(PeerVerification)
    for ending in (
        "peer certificate: no_certificate (no certificate) (not-authorized)",
        "peer certificate: untrusted (certificate has expired) (not-authorized)",
        "peer certificate: name_mismatch (not valid for 'remote.example') (invalid-from)",
        "peer certificate: name_mismatch (no 'from') (improper-addressing)",
        "'from' is not a domain (improper-addressing)",
        "restarted stream from 'evil.example', verified 'remote.example' (invalid-from)",
        "restarted stream without 'from', verified 'remote.example' (improper-addressing)",
    ):
        assert ending in endings


def test_the_outgoing_corpus_reaches_every_verdict_and_failure() -> None:
    """The committed xmpp-server-out corpus starts the fuzzer from every
    verdict on the remote's certificate, and from each way the remote or the
    local server's header fails before TLS."""
    results, endings = _outcomes("xmpp-server-out", XMPP_SERVER_OUT_TARGET.make)
    assert results == set(PeerVerification)
    for ending in (
        "remote certificate: no_certificate (no certificate) (remote-connection-failed)",
        "remote remote.example: it offers no STARTTLS (remote-connection-failed)",
        "remote remote.example: it refused STARTTLS (remote-connection-failed)",
        "remote remote.example: stream error: host-unknown (remote-connection-failed)",
        "not a local domain: 'intruder.example' (invalid-from)",
        "backend closed the stream",
    ):
        assert ending in endings


@every_target
def test_new_inputs(name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    figures = fuzz(name, tmp_path_factory.mktemp("fuzz"), seconds=None, runs=NEW_INPUTS)
    assert "crash" not in figures, f"{figures['crash']}\n{figures['log']}"
    assert int(figures["executions"]) >= NEW_INPUTS
