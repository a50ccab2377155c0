"""What a scenario reports: one summary line with requests sent / failed, time to Ready, time to switch."""

from __future__ import annotations

import dataclasses

from e2e.traffic import Outcome


@dataclasses.dataclass
class Result:
    name: str
    passed: bool | None  # None: not runnable
    sent: int = 0
    failed: int = 0
    to_ready_s: float | None = None
    to_switch_s: float | None = None
    note: str = ""

    def line(self) -> str:
        verdict = {True: "PASS", False: "FAIL", None: "SKIP"}[self.passed]

        def secs(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.1f}s"

        return (
            f"[{verdict}] {self.name}: requests {self.sent} sent / {self.failed} failed | "
            f"time to Ready {secs(self.to_ready_s)} | time to switch {secs(self.to_switch_s)} | {self.note}"
        )


def first_failure(failures: list[Outcome]) -> str:
    return f"; first failure: {failures[0].status} {failures[0].error[:120]}" if failures else ""
