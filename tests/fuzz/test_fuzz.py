"""The fuzzers' fixed short budget in the normal test run: every target
replays its committed corpus and its seeds in this process, then atheris
tries ``NEW_INPUTS`` new inputs from that corpus in a process of its own.
The longer run is ``python -m tests.fuzz --minutes 10``."""

from __future__ import annotations

import pytest

from tests.fuzz.__main__ import corpus_dir, fuzz
from tests.fuzz.targets import TARGETS, seeds

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


@every_target
def test_new_inputs(name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    figures = fuzz(name, tmp_path_factory.mktemp("fuzz"), seconds=None, runs=NEW_INPUTS)
    assert "crash" not in figures, f"{figures['crash']}\n{figures['log']}"
    assert int(figures["executions"]) >= NEW_INPUTS
