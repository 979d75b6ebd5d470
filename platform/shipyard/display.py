"""Rich rendering of a run: a live progress bar on a terminal, plain periodic lines otherwise."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

from shipyard.runtime.launcher import RunResult
from shipyard.runtime.meter import BUILTIN
from shipyard.runtime.progress import Rate
from shipyard.spec import JobSpec

LINE_EVERY_S = 5.0


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class RunView:
    def __init__(self, console: Console, spec: JobSpec):
        self.console, self.spec = console, spec
        self.rate = Rate()
        self.events_shown = 0
        self.last_line = 0.0
        self.live = console.is_terminal
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
            TextColumn("step {task.completed:.0f}/{task.total:.0f}"), TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(), console=console, disable=not self.live, transient=False)
        self.task = self.progress.add_task(spec.name, total=None, info="starting workers…")

    def __enter__(self) -> "RunView":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def info(self, snap: dict) -> str:
        """The user's first metrics, then throughput (the built-in rates when reported)."""
        metrics = snap.get("metrics", {})
        parts = [f"{k}={_fmt(v)}" for k, v in metrics.items() if k not in BUILTIN][:4]
        sps = metrics.get("samples_per_s")
        if not sps and self.rate.per_second:
            sps = self.rate.per_second * snap.get("samples_per_step", 0)
        if sps:
            parts.append(f"{sps:,.0f} samples/s")
        if metrics.get("tokens_per_s"):
            parts.append(f"{metrics['tokens_per_s']:,.0f} tokens/s")
        return "  ".join(parts)

    def update(self, snap: dict) -> None:
        now = time.monotonic()
        if snap.get("total"):
            self.rate.add(now, snap["step"])
        for _, message in snap.get("events", [])[self.events_shown:]:
            self.console.print(f"[dim]·[/dim] {message}", soft_wrap=True, highlight=False)
        self.events_shown = len(snap.get("events", []))
        info = self.info(snap)
        self.progress.update(self.task, completed=snap.get("step", 0), total=snap.get("total") or None, info=info)
        if not self.live and snap.get("total") and now - self.last_line >= LINE_EVERY_S:
            self.last_line = now
            self.console.print(f"{self.spec.name}: step {snap['step']}/{snap['total']} epoch {snap['epoch']}  {info}",
                               soft_wrap=True, highlight=False)

    @staticmethod
    def throughput(snap: dict) -> str:
        """Average samples/s over the current attempt's training steps (start-up excluded)."""
        attempts, updated = snap.get("attempts"), snap.get("updated")
        if not attempts or not updated:
            return ""
        steps = snap.get("step", 0) - attempts[-1]["start_step"]
        seconds = updated - attempts[-1]["start"]
        if steps <= 0 or seconds <= 0:
            return ""
        return f", {steps * snap.get('samples_per_step', 0) / seconds:,.0f} samples/s"

    def summary(self, result: RunResult) -> None:
        snap = result.snapshot
        attempts = len(snap.get("attempts", [])) or 1
        metrics = "  ".join(f"{k}={_fmt(v)}" for k, v in snap.get("metrics", {}).items())
        if result.ok:
            self.console.print(f"[green]✓[/green] {self.spec.name} finished: step {snap.get('step', 0)}/"
                               f"{snap.get('total', 0)} in {result.seconds:.1f}s, {_workers(self.spec, snap)} workers, "
                               f"{attempts} attempt{'s' * (attempts > 1)}{self.throughput(snap)}", highlight=False)
        else:
            self.console.print(f"[red]✗[/red] {self.spec.name} failed at step {snap.get('step', 0)} after "
                               f"{result.seconds:.1f}s: {result.error}")
        if metrics:
            self.console.print(f"  metrics: {metrics}")
        attempts_list = snap.get("attempts", [])
        if len(attempts_list) > 1 or any(a.get("cause") for a in attempts_list):
            self.console.print("  attempts:")
            for line in attempt_lines(attempts_list):
                self.console.print(f"    {line}", soft_wrap=True, highlight=False)
        if snap.get("checkpoint"):
            self.console.print(f"  latest checkpoint: {snap['checkpoint']}")
        elif self.spec.checkpoint:
            self.console.print(f"  checkpoints: {self.spec.checkpoint.uri}")


def _workers(spec, snap: dict) -> str:
    """The last attempt's world ("2"), or for an elastic job that changed size, every size ("2->1->2")."""
    worlds = [a["world"] for a in snap.get("attempts", []) if a.get("world")]
    sizes = [w for i, w in enumerate(worlds) if i == 0 or w != worlds[i - 1]]
    return "->".join(map(str, sizes)) if sizes else str(spec.workers.count)


def attempt_lines(attempts: list[dict]) -> list[str]:
    """One line per attempt: when, how it ended, the steps it ran, committed and lost."""
    if not attempts:
        return []
    t0 = attempts[0]["start"]
    lines = []
    for a in attempts:
        end = f"{a['end'] - t0:.1f}s" if a.get("end") else "now"
        how = {"finished": "finished", None: "running"}.get(a.get("kind"), f"{a.get('kind')}: {a.get('cause')}")
        steps = f"steps {a.get('start_step') or 0}->{a.get('last_step', 0)}"
        if a.get("world"):
            steps = f"{a['world']} worker{'s' * (a['world'] > 1)}, {steps}"
        if a.get("committed_step") is not None:
            steps += f", committed {a['committed_step']}"
        if a.get("steps_lost") is not None and a.get("kind") != "finished":
            steps += f", lost {a['steps_lost']}"
        if a["number"] > 1 and a.get("recovery_s") is not None:
            steps += f", first step {a['recovery_s']:.1f}s after restart"
        lines.append(f"#{a['number']} {a['start'] - t0:.1f}s-{end}  {how}  ({steps})")
    return lines
