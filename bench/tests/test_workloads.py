"""What the workloads compute from their measurements (bench.workloads)."""

from __future__ import annotations

import pytest

from bench.targets import HELPER_ROLE, MAIN_ROLE
from bench.workloads import CPUUsed, lanes_and_counts


def test_cpu_used_names_the_values_by_role() -> None:
    used = CPUUsed(2.0, 0.5, {MAIN_ROLE: 0.5, HELPER_ROLE: 1.5})
    assert used.role_values("cpu_ms", 1000 / 1000) == {"main_cpu_ms": 0.5, "helper_cpu_ms": 1.5}
    assert CPUUsed(1.0, 0.0).role_values("cpu_ms", 1.0) == {}


@pytest.mark.parametrize(
    ("workers", "jobs"),
    [
        (1, [(16, 1000)]),
        (2, [(8, 500), (8, 500)]),
        (3, [(6, 376), (5, 312), (5, 312)]),
        (32, [(1, 63)] * 8 + [(1, 62)] * 8),
    ],
)
def test_the_timed_opening_keeps_sixteen_lanes_over_the_generator(
    workers: int, jobs: list[tuple[int, int]]
) -> None:
    assert lanes_and_counts(1000, 16, workers) == jobs


def test_cpu_used_adds_up_transfer_by_transfer() -> None:
    first = CPUUsed(0.05, 0.5, {MAIN_ROLE: 0.02, HELPER_ROLE: 0.03})
    second = CPUUsed(0.06, 0.6, {MAIN_ROLE: 0.01, HELPER_ROLE: 0.05})
    total = CPUUsed(0.0, 0.0) + first + second
    assert total.terminator == pytest.approx(0.11)
    assert total.backend == pytest.approx(1.1)
    assert total.roles == pytest.approx({MAIN_ROLE: 0.03, HELPER_ROLE: 0.08})
