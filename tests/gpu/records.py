"""What the GPU proof (proof.py) records: one JSON line per step, a one-line summary, the budget.

Pure functions over text and numbers (no torch, no subprocess), so tests/unit/test_gpu_script.py
checks them on any machine. Reading figures from a command's printed output is deliberate here:
the proof drives the real ``shipyard run`` and the bench scripts as a user would, and what they
print (the run's summary and events, the benches' JSON lines) is what it proves.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

SKIPPED_LINE = "no CUDA device: GPU proof skipped"

_RESTORED = re.compile(r"restored from checkpoint at step (\d+)")
_FINISHED = re.compile(r"finished: step (\d+)/(\d+)")
_METRIC = re.compile(r"(\w+)=(-?[0-9][0-9.]*(?:e[-+]?\d+)?)")
_PYTEST_SUMMARY = re.compile(r"^=*\s*(\d+ \w+.* in [0-9.]+s.*?|no tests ran in [0-9.]+s.*?)\s*=*$")


@dataclass(frozen=True)
class StepResult:
    """How one step of the proof ended and what it measured.

    ``brief`` is the step's phrase in the final summary line (``"ddp/bare 1.004x"``);
    ``figures`` the numbers it measured; ``error`` why it failed (a timeout, an exit status,
    a figure missing from the output). ``ok`` says the step ran and produced its figures, not
    that a figure met its goal: goals are reported beside the figures.
    """

    name: str
    ok: bool
    seconds: float
    brief: str = ""
    figures: dict = field(default_factory=dict)
    error: str | None = None
    timeout_s: float | None = None

    def to_json(self) -> str:
        return json.dumps({"record": "step", "step": self.name, "ok": self.ok, "seconds": round(self.seconds, 2),
                           "timeout_s": self.timeout_s, "error": self.error, "brief": self.brief,
                           "figures": self.figures}, default=str)


def step_timeout(own_s: float, elapsed_s: float, budget_s: float, reserve_s: float = 5.0) -> float:
    """A step's timeout: its own, cut to what is left of the whole run's budget (minus a reserve
    for the summary). 0 means there is no time left to start it."""
    return max(0.0, min(own_s, budget_s - reserve_s - elapsed_s))


def summary_line(results: list[StepResult], seconds: float, device: str) -> str:
    """The proof's last line: how many steps ran, then each step's brief (or why it failed)."""
    ok = sum(r.ok for r in results)
    parts = [f"{r.name}: {r.brief}" if r.ok else f"{r.name}: FAILED ({r.error})" for r in results]
    return f"gpu proof: {ok}/{len(results)} steps ok in {seconds:.0f}s on {device} | " + " | ".join(parts)


def summary_record(results: list[StepResult], seconds: float, device: str) -> str:
    return json.dumps({"record": "summary", "ok": sum(r.ok for r in results), "steps": len(results),
                       "failed": [r.name for r in results if not r.ok], "seconds": round(seconds, 1),
                       "device": device, "line": summary_line(results, seconds, device)})


def json_lines(text: str) -> list[dict]:
    """The JSON objects a bench printed, one per line; other lines (logs, warnings) are skipped."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                out.append(value)
    return out


def restored_step(text: str) -> int | None:
    """The step ``shipyard run`` said it restored from (its "restored from checkpoint" event)."""
    found = _RESTORED.findall(text)
    return int(found[-1]) if found else None


def finished_step(text: str) -> tuple[int, int] | None:
    """``(step, total)`` from ``shipyard run``'s "finished: step N/T" summary, if it finished."""
    found = _FINISHED.findall(text)
    return (int(found[-1][0]), int(found[-1][1])) if found else None


def run_metrics(text: str) -> dict[str, float]:
    """The ``metrics: k=v ...`` line of ``shipyard run``'s summary, as numbers."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("metrics:"):
            return {k: float(v) for k, v in _METRIC.findall(line)}
    return {}


def pytest_summary(text: str) -> str | None:
    """pytest's final ``3 passed, 1 skipped in 2.10s`` line (``-q``; or between ``===`` rules)."""
    for line in reversed(text.splitlines()):
        m = _PYTEST_SUMMARY.match(line.strip())
        if m and any(w in m[1] for w in ("passed", "failed", "skipped", "error", "no tests ran", "deselected")):
            return m[1]
    return None


def ratio(value: float | None, goal: float) -> str:
    """``1.004x (goal <= 1.02, met)`` for the summary line."""
    if value is None:
        return "n/a"
    return f"{value:.4g}x (goal <= {goal:g}, {'met' if value <= goal else 'NOT met'})"


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])
