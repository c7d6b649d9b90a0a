"""What a run measured, as plain records that round-trip through JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: Workload names.
RATE = "rate"
BULK = "bulk"
IDLE = "idle"
#: The fastest TLS target at a high concurrency: does the generator fill its CPUs?
SATURATION = "saturation"
#: Memory of the idle workload at each step (``param`` = sessions held).
IDLE_CURVE = "idle-curve"
#: A bulk record's MB/s in one round: ``mb_per_s_1``, ``mb_per_s_2``, ...
ROUND_MB_PER_S = "mb_per_s_"


@dataclass
class Record:
    """One measured point (or the reason it was not measured, in ``note``).

    ``param`` is the concurrency (rate), the message size in bytes (bulk) or the
    number of sessions asked for (idle).  ``values`` is empty when not measured.
    """

    workload: str
    key_type: str
    protocol: str
    target: str
    param: int
    values: dict[str, float] = field(default_factory=dict)
    note: str = ""

    def get(self, name: str) -> float | None:
        return self.values.get(name)

    def rounds(self) -> dict[int, float]:
        """A bulk record's MB/s by round (rounds whose transfer failed are absent)."""
        return {
            int(name.removeprefix(ROUND_MB_PER_S)): value
            for name, value in self.values.items()
            if name.startswith(ROUND_MB_PER_S)
        }


@dataclass
class Results:
    """A whole run: machine description, settings and every record."""

    machine: dict[str, str]
    settings: dict[str, Any]
    records: list[Record] = field(default_factory=list)

    def find(
        self, workload: str, key_type: str, protocol: str, target: str, param: int | None = None
    ) -> Record | None:
        """The record of that point (the first with any ``param`` when ``param`` is None)."""
        for record in self.records:
            if (record.workload, record.key_type, record.protocol, record.target) == (
                workload,
                key_type,
                protocol,
                target,
            ) and (param is None or record.param == param):
                return record
        return None

    def value(
        self, workload: str, key_type: str, protocol: str, target: str, param: int | None, name: str
    ) -> float | None:
        record = self.find(workload, key_type, protocol, target, param)
        return None if record is None else record.get(name)

    def params(self, workload: str) -> list[int]:
        """The distinct ``param`` values of a workload, ascending."""
        return sorted({r.param for r in self.records if r.workload == workload})

    def key_types(self) -> list[str]:
        return list(dict.fromkeys(r.key_type for r in self.records))

    def protocols(self, workload: str) -> list[str]:
        return list(dict.fromkeys(r.protocol for r in self.records if r.workload == workload))

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Path) -> Results:
        data = json.loads(path.read_text())
        return cls(
            machine=data["machine"],
            settings=data["settings"],
            records=[Record(**record) for record in data["records"]],
        )
