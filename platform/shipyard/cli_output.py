"""How the job commands (`list`, `status`, `top`) write what they show: `-o json|yaml|wide`,
and tables whose job ids stay whole.

Scripts read ``-o json`` or ``-o yaml``: one document, the API's own records (the pydantic
models of :mod:`shipyard.api.schemas`, dumped with ``model_dump(mode="json")``), plain text with
no colour, whatever stdout is. People read the tables. A job id is what a user copies into the
next command, so no table cuts or folds one: rich shrinks a table that is wider than its console
by wrapping and then truncating columns, so the id column is ``no_wrap`` and the table is printed
on a console at least as wide as the ids need (the terminal wraps the lines instead), and when
stdout is not a terminal, at full width (rich's default there is 80 columns).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from enum import Enum
from typing import Any

from rich.cells import cell_len
from rich.console import Console
from rich.table import Table

from shipyard.errors import UserError

PIPED_WIDTH = 100_000  # "no limit" for a table printed to a pipe or a file


class Output(str, Enum):
    """The values of ``-o/--output``."""

    TABLE = "table"  # the default: what a person reads
    WIDE = "wide"  # the table with more columns (and, for status, every event)
    JSON = "json"
    YAML = "yaml"

    @property
    def document(self) -> bool:
        """Whether this output is one machine-readable document rather than a table."""
        return self in (Output.JSON, Output.YAML)


OUTPUT_HELP = "table (default), wide (more columns), json or yaml (the API's records, one document)"


def parse_output(value: str) -> Output:
    """``-o`` as given -> :class:`Output`; a wrong value is a :class:`UserError` of one line
    (the CLI prints it and exits 2; Typer's own choice error is a multi-line box)."""
    try:
        return Output(value.lower())
    except ValueError:
        allowed = ", ".join(o.value for o in Output)
        raise UserError(f"-o/--output: got {value!r}; expected one of {allowed}") from None


def dump(doc: Any, fmt: Output) -> str:
    """One JSON or YAML document (``doc``: plain data, e.g. a ``model_dump(mode="json")``)."""
    if fmt is Output.JSON:
        return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    if fmt is Output.YAML:
        import yaml

        return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=PIPED_WIDTH)
    raise ValueError(f"{fmt.value} is not a document format")


def job_table(*columns: str, title: str | None = None, fold_ids: bool = False) -> Table:
    """A table whose ``id`` column never wraps (print it with :func:`print_table`). ``fold_ids``:
    for a live view (``top``), which must fit its terminal: there an id too wide for its column
    continues on the next line (every character shown) instead of widening the table."""
    table = Table(title=title, title_justify="left")
    for name in columns:
        if name == "id":
            table.add_column(name, no_wrap=not fold_ids, overflow="fold")
        else:
            table.add_column(name)
    return table


def _whole_width(table: Table) -> int:
    """The narrowest width at which rich keeps every ``no_wrap`` column whole: rich shrinks the
    other columns first, down to a character each, before it cuts a ``no_wrap`` one."""
    width = 0
    for column in table.columns:
        if column.no_wrap:
            cells: Iterable[Any] = [column.header, *column.cells]
            width += max((cell_len(str(c)) for c in cells), default=1)
        else:
            width += 1
    padding = table.padding[1] + table.padding[3]
    borders = len(table.columns) + 1 if table.box else 0
    return width + padding * len(table.columns) + borders


def table_console(console: Console, table: Table) -> Console:
    """``console``, or one as wide as ``table`` needs to keep its ids whole: at full width when
    ``console`` is not a terminal, at least :func:`_whole_width` on one."""
    want = PIPED_WIDTH if not console.is_terminal else _whole_width(table)
    if want <= console.width:
        return console
    return Console(file=console.file, width=want, force_terminal=console.is_terminal, no_color=console.no_color,
                   color_system=console.color_system, highlight=False)


def print_table(console: Console, table: Table) -> None:
    table_console(console, table).print(table)


def print_line(console: Console, text: str) -> None:
    """One line of rich markup, never wrapped by rich (a long message stays one line in a pipe)."""
    console.print(text, highlight=False, soft_wrap=True)


# -- the job views -------------------------------------------------------------------------
# Each takes the API's records (shipyard.api.schemas, imported by the caller) and builds what a
# person reads; text that came from a job or a user is escaped, so "[rank 0]" is not markup.

def bar(progress: float | None, width: int = 30) -> str:
    if progress is None:
        return ""
    done = round(max(0.0, min(1.0, progress)) * width)
    return f"[green]{'█' * done}[/green][dim]{'░' * (width - done)}[/dim] {progress * 100:3.0f}%"


def when(at) -> str:
    """A record's time as the tables show it (UTC, to the second)."""
    return f"{at:%Y-%m-%d %H:%M:%S}" if at is not None else ""


def steps(step: int | None, total: int | None) -> str:
    return "" if step is None and not total else f"{step or 0}/{total or '?'}"


def list_table(jobs: Iterable[Any], wide: bool = False) -> Table:
    """``shipyard list``: one row per :class:`~shipyard.api.schemas.JobSummary`."""
    from rich.markup import escape

    columns = ["id", "name", "tenant", "priority", "state", "progress", "submitted", "note"]
    if wide:
        columns = ["id", "name", "tenant", "priority", "state", "progress", "step", "submitted", "started", "ended",
                   "note", "message"]
    table = job_table(*columns)
    for j in jobs:
        progress = f"{j.progress * 100:.0f}%" if j.progress is not None else ""
        note = escape(j.waiting or j.cause or "")
        if wide:
            table.add_row(j.id, j.name, j.tenant, str(j.priority), j.state, progress, steps(j.step, j.total_steps),
                          when(j.submitted_at), when(j.started_at), when(j.ended_at), note, escape(j.message or ""))
        else:
            table.add_row(j.id, j.name, j.tenant, str(j.priority), j.state, progress, when(j.submitted_at), note)
    return table


def top_table(jobs: Iterable[Any], title: str, wide: bool = False, fold_ids: bool = False) -> Table:
    """``shipyard top``: one row per :class:`~shipyard.api.schemas.JobDetail`, with up to three
    of its latest metrics (the job's own before the built-in ones)."""
    from rich.markup import escape

    from shipyard.runtime.meter import BUILTIN

    columns = ["id", "name", "tenant", "state", "progress", "step", "metrics", "attempts", "lost"]
    if wide:
        columns = ["id", "name", "tenant", "priority", "state", "progress", "step", "metrics", "attempts", "lost",
                   "started", "note"]
    table = job_table(*columns, title=title, fold_ids=fold_ids)
    for d in jobs:
        shown = sorted((k for k, v in d.metrics.items() if v is not None), key=lambda k: k in BUILTIN)[:3]
        metrics = "  ".join(f"{escape(k)}={d.metrics[k]:.4g}" for k in shown)
        progress, step = bar(d.progress, 15), steps(d.step, d.total_steps)
        attempts, lost = str(len(d.attempts)), str(sum(a.steps_lost or 0 for a in d.attempts))
        if wide:
            table.add_row(d.id, d.name, d.tenant, str(d.priority), d.state, progress, step, metrics, attempts, lost,
                          when(d.started_at), escape(d.waiting or d.cause or ""))
        else:
            table.add_row(d.id, d.name, d.tenant, d.state, progress, step, metrics, attempts, lost)
    return table


STATUS_EVENTS = 5  # events `shipyard status` shows (-o wide: every one the API returned)


def print_status(console: Console, d: Any, wide: bool = False) -> None:
    """``shipyard status``: a :class:`~shipyard.api.schemas.JobDetail` for a person."""
    from rich.markup import escape

    by = f" (preempted by {d.preempted_by})" if d.preempted_by and d.cause == "preempted" else ""
    step = f" step {steps(d.step, d.total_steps)}" if d.step is not None or d.total_steps else ""
    print_line(console, f"[bold]{d.id}[/bold] {d.name} ({d.tenant}, priority {d.priority}): "
                        f"[bold]{d.state}[/bold]{by}{step}")
    if d.progress is not None:
        print_line(console, f"  progress: {bar(d.progress)}")
    for key, value in (("waiting", d.waiting), ("cause", d.cause), ("message", d.message),
                       ("checkpoint", d.checkpoint)):
        if value:
            print_line(console, f"  {key}: {escape(value)}")
    if d.metrics:
        print_line(console, "  metrics: " + "  ".join(escape(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
                                                      for k, v in d.metrics.items()))
    if d.attempts:
        columns = ["run", "attempt", "steps", "ended", "cause", "lost", "recovery"]
        if wide:
            columns += ["started", "ended at", "committed", "handle"]
        t = Table(*columns)
        for a in d.attempts:
            ended = a.kind.value if a.kind else ("running" if a.ended_at is None else "")
            cause = "" if a.cause == ended else escape(a.cause or "")  # "preempted" once, not twice
            row = [str(a.run_number or ""), str(a.number), f"{a.start_step or 0}->{a.last_step or 0}", ended, cause,
                   "" if a.steps_lost is None else str(a.steps_lost),
                   "" if a.recovery_s is None else f"{a.recovery_s:.1f}s"]
            if wide:
                row += [when(a.started_at), when(a.ended_at), "" if a.committed_step is None else str(a.committed_step),
                        escape(a.run or "")]
            t.add_row(*row)
        print_table(console, t)
    events = d.events if wide else d.events[-STATUS_EVENTS:]
    if events:
        more = len(d.events) - len(events)
        print_line(console, "  events:" + (f" (the latest {len(events)}; -o wide shows {more} more)" if more else ""))
        for e in events:
            print_line(console, f"    {when(e.at)}  {escape(e.kind):<7} {escape(e.message)}")
