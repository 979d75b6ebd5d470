"""The `shipyard` command (Typer + rich).

User errors (:class:`~shipyard.errors.UserError`) print one ``error:`` line per problem and exit
with status 2; a job that fails while training exits 1; internal errors keep their traceback.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from shipyard.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="shipyard: run distributed training jobs described in YAML.")
data_app = typer.Typer(no_args_is_help=True, help="Datasets: write Arrow shards.")
ckpt_app = typer.Typer(no_args_is_help=True, help="Checkpoints: list what a job saved, export one.")
app.add_typer(data_app, name="data")
app.add_typer(ckpt_app, name="checkpoints")

console = Console()
err_console = Console(stderr=True)


@app.command()
def run(
    spec_file: Annotated[str, typer.Argument(metavar="JOB.yaml", help="the job spec")],
    set_: Annotated[list[str], typer.Option("--set", metavar="FIELD=VALUE",
                                            help="override a spec field, e.g. --set workers.count=4")] = [],
) -> None:
    """Run a job in the foreground on a local Ray (or RAY_ADDRESS); resumes from its latest checkpoint."""
    from shipyard.config import enable_ray_token_auth

    enable_ray_token_auth()  # before anything imports ray
    from shipyard.display import RunView
    from shipyard.runtime.launcher import launch
    from shipyard.spec import load_spec

    spec = load_spec(spec_file, set_)
    console.print(f"[bold]{spec.name}[/bold]: {spec.workers.count} workers x {spec.workers.cpus:g} CPU"
                  f"{f' + {spec.workers.gpus:g} GPU' if spec.workers.gpus else ''}, strategy {spec.strategy.kind}, "
                  f"data {spec.dataset.uri}")
    with RunView(console, spec) as view:
        result = launch(spec, on_progress=view.update)
    view.summary(result)
    if not result.ok:
        raise typer.Exit(2 if result.user_error else 1)


@data_app.command("shard")
def data_shard(
    src: Annotated[str, typer.Argument(help="a .parquet/.csv/.arrow file or directory (any URI), or sklearn:digits[:train|:test]")],
    dest: Annotated[str, typer.Argument(help="where the shards and manifest go (s3://, file:// or a path)")],
    rows_per_shard: Annotated[int, typer.Option(help="rows in each shard")] = 100_000,
    overwrite: Annotated[bool, typer.Option(help="replace a dataset that already exists at DEST")] = False,
    format: Annotated[str, typer.Option("--format", help="shard format: arrow (Arrow IPC) or parquet")] = "arrow",
) -> None:
    """Write a dataset as Arrow IPC shards plus a manifest."""
    from shipyard.data.sources import open_source
    from shipyard.data.writer import write_dataset

    source = open_source(src)
    with Progress(TextColumn("sharding"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
                  TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("rows", total=source.total_rows)
        manifest = write_dataset(source, dest, rows_per_shard, overwrite=overwrite, fmt=format,
                                 on_rows=lambda n: progress.advance(task, n))
    console.print(f"[green]✓[/green] {manifest.rows:,} rows in {len(manifest.shards)} shard"
                  f"{'s' * (len(manifest.shards) != 1)} ({manifest.bytes / 1e6:.1f} MB) -> {dest}")


@ckpt_app.command("list")
def checkpoints_list(uri: Annotated[str, typer.Argument(help="a job's checkpoint.uri")]) -> None:
    """List checkpoints under URI: step, time, size, committed or not."""
    import datetime

    from shipyard.checkpoint import CheckpointStore

    listed = CheckpointStore(uri).list()
    if not listed:
        console.print(f"no checkpoints under {uri}")
        return
    table = Table("step", "epoch", "saved", "size", "committed", "uri")
    for c in listed:
        r = c.record
        table.add_row(str(c.step), str(r.epoch) if r else "", 
                      datetime.datetime.fromtimestamp(r.time).isoformat(" ", "seconds") if r else "",
                      f"{r.bytes / 1e6:.1f} MB" if r else "", "yes" if c.committed else "[yellow]no[/yellow]", c.uri)
    console.print(table)


@ckpt_app.command("export")
def checkpoints_export(
    uri: Annotated[str, typer.Argument(help="a job's checkpoint.uri")],
    out: Annotated[str, typer.Argument(metavar="OUT.pt", help="file to write (a path or URI)")],
    step: Annotated[int | None, typer.Option(help="the checkpoint's step (default: the latest committed)")] = None,
    model_only: Annotated[bool, typer.Option(help="write only the model's state dict")] = False,
) -> None:
    """Write one committed checkpoint as a single torch.save file, for use outside shipyard.

    The file holds {"model": state_dict, "optim": ..., "step": N, "epoch": E} (or just the model's
    state dict with --model-only): `model.load_state_dict(torch.load(OUT)["model"])`.
    """
    from shipyard.checkpoint import CheckpointStore
    from shipyard.checkpoint.export import export

    with console.status(f"reading {uri}"):
        record, nbytes = export(CheckpointStore(uri), out, step=step, model_only=model_only)
    console.print(f"[green]✓[/green] step {record.step} (epoch {record.epoch}, saved by {record.world} "
                  f"rank{'s' * (record.world != 1)}) -> {out} ({nbytes / 1e6:.1f} MB)", highlight=False)


def main() -> None:
    try:
        app()
    except UserError as e:
        for line in str(e).splitlines():
            err_console.print(f"[red]error:[/red] {line}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
