"""Suite sizes and the figures collector shared by the reliability tests."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Size:
    name: str
    processes: int  # contention: worker processes
    tasks: int  # contention: concurrent tasks per process
    attempts: int  # contention: operations per task
    fault_rounds: int  # faults: acquires per fault scenario
    fuzz_examples: int  # bad input: hypothesis examples per method
    hot_acquires: int  # hot bucket: acquires per case, split across processes and tasks


SIZES = {
    # The README's test command: every scenario, fewer clients and rounds (CI runs `ci`).
    "quick": Size("quick", processes=2, tasks=3, attempts=4, fault_rounds=2, fuzz_examples=30,
                  hot_acquires=64),
    "ci": Size("ci", processes=3, tasks=4, attempts=6, fault_rounds=3, fuzz_examples=60,
               hot_acquires=160),
    "large": Size("large", processes=6, tasks=8, attempts=20, fault_rounds=10,
                  fuzz_examples=600, hot_acquires=640),
}


class Figures:
    """Session-wide counters; tests add to them, the terminal summary prints them."""

    def __init__(self, size: str) -> None:
        self.size = size
        self.counts: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.inputs: Counter[str] = Counter()
        self.maxima: dict[str, float] = {}
        self.started = time.monotonic()

    def add(self, **counts: int) -> None:
        self.counts.update(counts)

    def raw(self) -> dict[str, Any]:
        """The counters as JSON-able data: a worker of a parallel run sends them to the main
        process, which `merge`s them."""
        return {"counts": self.counts, "faults": self.faults, "inputs": self.inputs,
                "maxima": self.maxima}

    def merge(self, raw: dict[str, Any]) -> None:
        self.counts.update(raw["counts"])
        self.faults.update(raw["faults"])
        self.inputs.update(raw["inputs"])
        for key, value in raw["maxima"].items():
            self.worst(key, value)

    def worst(self, key: str, value: float) -> None:
        """Keep the largest value seen under `key` (e.g. the slowest failure of a kind)."""
        self.maxima[key] = max(value, self.maxima.get(key, value))

    def as_dict(self) -> dict[str, Any]:
        main = (
            "clients",
            "processes",
            "operations",
            "admitted",
            "denied",
            "rolled_back",
            "over_admissions",
            "lost_updates",
            "doubled_updates",
            "ledger_checks",
        )
        data: dict[str, Any] = {
            "size": self.size,
            "seconds": round(time.monotonic() - self.started, 1),
        }
        data |= {key: self.counts[key] for key in main}
        data |= {key: value for key, value in sorted(self.counts.items()) if key not in main}
        data["faults_injected"] = dict(sorted(self.faults.items()))
        data["faults_total"] = sum(self.faults.values())
        data["worst"] = dict(sorted(self.maxima.items()))
        data["inputs_tried"] = dict(sorted(self.inputs.items()))
        data["inputs_total"] = sum(self.inputs.values())
        return data
