"""Rich rendering of a run: a live progress bar on a terminal, plain periodic lines otherwise.

Throughput is one figure, the measured built-in ``samples_per_s`` (``runtime/meter.py``: rank 0's
step clock), in the live line and in the summary's metrics alike. The ranks' output lines come
through :meth:`RunView.write_line` (``runtime/output.py`` routes them), above the bar on a terminal.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

from shipyard.run.records import AttemptKind, AttemptRecord, RunSnapshot
from shipyard.runtime.launcher import RunResult
from shipyard.runtime.meter import BUILTIN
from shipyard.spec import JobSpec

LINE_EVERY_S = 5.0


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class RunView:
    def __init__(self, console: Console, spec: JobSpec):
        self.console, self.spec = console, spec
        self.events_shown = 0
        self.last_line = 0.0
        self.last_step = -1
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

    def write_line(self, line: str) -> None:
        """One line of a rank's output (already prefixed; escapes only on a terminal, which
        renders them). Not markup, not highlighted, never wrapped."""
        text = Text.from_ansi(line) if self.console.is_terminal else Text(line)
        self.console.print(text, soft_wrap=True, highlight=False)

    def info(self, snap: RunSnapshot) -> str:
        """The user's first metrics, then the measured throughput (built-in rates)."""
        metrics = snap.metrics
        parts = [f"{k}={_fmt(v)}" for k, v in metrics.items() if k not in BUILTIN][:4]
        if sps := metrics.get("samples_per_s"):
            parts.append(f"{sps:,.0f} samples/s")
        if metrics.get("tokens_per_s"):
            parts.append(f"{metrics['tokens_per_s']:,.0f} tokens/s")
        return "  ".join(parts)

    def update(self, snap: RunSnapshot) -> None:
        now = time.monotonic()
        unseen = min(snap.events_total - self.events_shown, len(snap.events))
        for e in snap.events[len(snap.events) - unseen:] if unseen > 0 else []:
            self.console.print(f"[dim]·[/dim] {e.message}", soft_wrap=True, highlight=False)
        self.events_shown = snap.events_total
        info = self.info(snap)
        self.progress.update(self.task, completed=snap.step, total=snap.total or None, info=info)
        if not self.live and snap.total and now - self.last_line >= LINE_EVERY_S and snap.step != self.last_step:
            self.last_line, self.last_step = now, snap.step  # a line when the step moved, not the same one again
            self.console.print(f"{self.spec.name}: step {snap.step}/{snap.total} epoch {snap.epoch}  {info}",
                               soft_wrap=True, highlight=False)

    def summary(self, result: RunResult) -> None:
        snap = result.snapshot
        attempts = len(snap.attempts) or 1
        metrics = "  ".join(f"{k}={_fmt(v)}" for k, v in snap.metrics.items())
        if result.ok:
            self.console.print(f"[green]✓[/green] {self.spec.name} finished: step {snap.step}/"
                               f"{snap.total} in {result.seconds:.1f}s, {_workers(self.spec, snap)} workers, "
                               f"{attempts} attempt{'s' * (attempts > 1)}", highlight=False, soft_wrap=True)
        else:
            self.console.print(f"[red]✗[/red] {self.spec.name} failed at step {snap.step} after "
                               f"{result.seconds:.1f}s: {escape(result.error or '')}", soft_wrap=True)
        if metrics:
            self.console.print(f"  metrics: {metrics}", highlight=False, soft_wrap=True)
        if len(snap.attempts) > 1 or any(a.cause for a in snap.attempts):
            self.console.print("  attempts:")
            for line in attempt_lines(snap.attempts):
                self.console.print(f"    {line}", soft_wrap=True, highlight=False)
        if snap.checkpoint:
            self.console.print(f"  latest checkpoint: {snap.checkpoint}", highlight=False, soft_wrap=True)
        elif self.spec.checkpoint:
            self.console.print(f"  checkpoints: {self.spec.checkpoint.uri}", highlight=False, soft_wrap=True)


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
