"""Rich rendering of a run: a live progress bar on a terminal, plain periodic lines otherwise."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

from shipyard.run.records import AttemptKind, AttemptRecord, RunSnapshot
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

    def info(self, snap: RunSnapshot) -> str:
        """The user's first metrics, then throughput (the built-in rates when reported)."""
        metrics = snap.metrics
        parts = [f"{k}={_fmt(v)}" for k, v in metrics.items() if k not in BUILTIN][:4]
        sps = metrics.get("samples_per_s")
        if not sps and self.rate.per_second:
            sps = self.rate.per_second * snap.samples_per_step
        if sps:
            parts.append(f"{sps:,.0f} samples/s")
        if metrics.get("tokens_per_s"):
            parts.append(f"{metrics['tokens_per_s']:,.0f} tokens/s")
        return "  ".join(parts)

    def update(self, snap: RunSnapshot) -> None:
        now = time.monotonic()
        if snap.total:
            self.rate.add(now, snap.step)
        unseen = min(snap.events_total - self.events_shown, len(snap.events))
        for e in snap.events[len(snap.events) - unseen:] if unseen > 0 else []:
            self.console.print(f"[dim]·[/dim] {e.message}", soft_wrap=True, highlight=False)
        self.events_shown = snap.events_total
        info = self.info(snap)
        self.progress.update(self.task, completed=snap.step, total=snap.total or None, info=info)
        if not self.live and snap.total and now - self.last_line >= LINE_EVERY_S:
            self.last_line = now
            self.console.print(f"{self.spec.name}: step {snap.step}/{snap.total} epoch {snap.epoch}  {info}",
                               soft_wrap=True, highlight=False)

    @staticmethod
    def throughput(snap: RunSnapshot) -> str:
        """Average samples/s over the current attempt's training steps (start-up excluded)."""
        last = snap.last_attempt
        if last is None or not snap.updated:
            return ""
        steps = snap.step - (last.start_step or 0)
        seconds = snap.updated - last.start
        if steps <= 0 or seconds <= 0:
            return ""
        return f", {steps * snap.samples_per_step / seconds:,.0f} samples/s"

    def summary(self, result: RunResult) -> None:
        snap = result.snapshot
        attempts = len(snap.attempts) or 1
        metrics = "  ".join(f"{k}={_fmt(v)}" for k, v in snap.metrics.items())
        if result.ok:
            self.console.print(f"[green]✓[/green] {self.spec.name} finished: step {snap.step}/"
                               f"{snap.total} in {result.seconds:.1f}s, {_workers(self.spec, snap)} workers, "
                               f"{attempts} attempt{'s' * (attempts > 1)}{self.throughput(snap)}", highlight=False)
        else:
            self.console.print(f"[red]✗[/red] {self.spec.name} failed at step {snap.step} after "
                               f"{result.seconds:.1f}s: {result.error}")
        if metrics:
            self.console.print(f"  metrics: {metrics}")
        if len(snap.attempts) > 1 or any(a.cause for a in snap.attempts):
            self.console.print("  attempts:")
            for line in attempt_lines(snap.attempts):
                self.console.print(f"    {line}", soft_wrap=True, highlight=False)
        if snap.checkpoint:
            self.console.print(f"  latest checkpoint: {snap.checkpoint}")
        elif self.spec.checkpoint:
            self.console.print(f"  checkpoints: {self.spec.checkpoint.uri}")


def _workers(spec, snap: RunSnapshot) -> str:
    """The last attempt's world ("2"), or for an elastic job that changed size, every size ("2->1->2")."""
    worlds = [a.world for a in snap.attempts if a.world]
    sizes = [w for i, w in enumerate(worlds) if i == 0 or w != worlds[i - 1]]
    return "->".join(map(str, sizes)) if sizes else str(spec.workers.count)


def attempt_lines(attempts: list[AttemptRecord]) -> list[str]:
    """One line per attempt: when, how it ended, the steps it ran, committed and lost."""
    if not attempts:
        return []
    t0 = attempts[0].start
    lines = []
    for a in attempts:
        end = f"{a.end - t0:.1f}s" if a.end is not None else "now"
        how = ("running" if a.kind is None else "finished" if a.kind is AttemptKind.FINISHED
               else f"{a.kind.value}: {a.cause}")
        steps = f"steps {a.start_step or 0}->{a.last_step}"
        if a.world:
            steps = f"{a.world} worker{'s' * (a.world > 1)}, {steps}"
        if a.committed_step is not None:
            steps += f", committed {a.committed_step}"
        if a.steps_lost is not None and a.kind is not AttemptKind.FINISHED:
            steps += f", lost {a.steps_lost}"
        if a.number > 1 and a.recovery_s is not None:
            steps += f", first step {a.recovery_s:.1f}s after restart"
        lines.append(f"#{a.number} {a.start - t0:.1f}s-{end}  {how}  ({steps})")
    return lines
