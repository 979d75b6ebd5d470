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

from shipyard.cli_admin import DEFAULT_DATA_DIR, DataDirOpt, DbOpt, admin_app
from shipyard.cli_output import (OUTPUT_HELP, Output, dump, list_table, parse_output, print_status, print_table,
                                 top_table)
from shipyard.errors import UserError

CONFIG_FILE = "~/.shipyard/config.yaml"  # client.client_config: $SHIPYARD_HOME/config.yaml, SHIPYARD_HOME=~/.shipyard
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="shipyard: run distributed training jobs described in YAML. Commands that talk to a "
                       "server read SHIPYARD_URL and SHIPYARD_TOKEN, else the config file "
                       f"{CONFIG_FILE} (keys url: and token:; $SHIPYARD_HOME/config.yaml when SHIPYARD_HOME "
                       "is set).")
data_app = typer.Typer(no_args_is_help=True, help="Datasets: write Arrow shards.")
ckpt_app = typer.Typer(no_args_is_help=True, help="Checkpoints: list what a job saved, export one.")
app.add_typer(data_app, name="data")
app.add_typer(ckpt_app, name="checkpoints")
app.add_typer(admin_app, name="admin")

console = Console()
err_console = Console(stderr=True)
# Piped (not a terminal), a line is never folded at 80 columns: a script or a log reads it whole.
console.soft_wrap, err_console.soft_wrap = not console.is_terminal, not err_console.is_terminal


FRESH_HELP = ("start from step 0 under a new line of checkpoints in checkpoint.uri (the older ones are kept; "
              "later runs resume from the new line)")


def fresh_start(spec_file: str, set_: list[str]) -> list[str]:
    """``--set`` overrides plus the new checkpoint line that ``--fresh`` starts."""
    from shipyard.checkpoint.store import new_line
    from shipyard.spec import load_spec

    if load_spec(spec_file, set_).checkpoint is None:
        raise UserError("--fresh: the spec has no checkpoint section, so every run starts at step 0 already")
    return [*set_, f"checkpoint.line={new_line()}"]


@app.command()
def run(
    spec_file: Annotated[str, typer.Argument(metavar="JOB.yaml", help="the job spec")],
    set_: Annotated[list[str], typer.Option("--set", metavar="FIELD=VALUE",
                                            help="override a spec field, e.g. --set workers.count=4")] = [],
    fresh: Annotated[bool, typer.Option("--fresh", help=FRESH_HELP)] = False,
    ranks: Annotated[str, typer.Option("--ranks", metavar="all|N[,N...]",
                                       help="whose output to show: every rank's (all), or these ranks'")] = "all",
    verbose: Annotated[bool, typer.Option("--verbose", "-v",
                                          help="also show Ray's own lines: its INFO messages, its controller's "
                                               "and raylets' output")] = False,
) -> None:
    """Run a job in the foreground on a local Ray (or RAY_ADDRESS); resumes from its latest checkpoint.

    Each line a rank prints is shown once, as "[rank N] line" (rank 0's too); lines without a
    prefix are shipyard's own. Colours and other escape codes are kept on a terminal only.
    """
    from shipyard.config import enable_ray_token_auth

    enable_ray_token_auth()  # before anything imports ray
    from shipyard.display import RunView
    from shipyard.runtime import report
    from shipyard.runtime.launcher import launch
    from shipyard.runtime.output import OutputOptions, RankOutput, parse_ranks
    from shipyard.spec import load_spec

    options = OutputOptions(ranks=parse_ranks(ranks), verbose=verbose, keep_ansi=console.is_terminal)
    spec = load_spec(spec_file, fresh_start(spec_file, set_) if fresh else set_)
    w = spec.workers
    console.print(f"[bold]{spec.name}[/bold]: {f'{w.min}-{w.count} (elastic)' if w.elastic else w.count} workers"
                  f" x {w.cpus:g} CPU{f' + {w.gpus:g} GPU' if w.gpus else ''}, strategy {spec.strategy.kind}, "
                  f"data {spec.dataset.uri}")
    # A submitted job (the backend set SHIPYARD_REPORT_URL) also reports to the server and turns
    # SIGTERM into a checkpoint; for a user's own run the session does nothing.
    with report.session(spec) as session, RunView(console, spec) as view:
        try:
            result = launch(spec, on_progress=report.chain(view.update, session.update),
                            output=RankOutput(view.write_line, options))
        except UserError as e:
            session.finish(False, str(e), user_error=True)
            raise
        except report.Interrupted as e:  # a user's own run, stopped by Ctrl-C/SIGTERM: saved what it could
            console.print(f"[yellow]■[/yellow] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:  # a second Ctrl-C (or one before Ray started): nothing waited for
            raise typer.Exit(130) from None
        except BaseException as e:
            session.finish(False, f"{type(e).__name__}: {e}")
            raise
        session.finish(result.ok, result.error, result.user_error)
    if result.already_finished:
        console.print(f"[green]✓[/green] {result.already_finished}", highlight=False, soft_wrap=True)
        return
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


# -- the job service ---------------------------------------------------------------------------

UrlOpt = Annotated[str | None, typer.Option("--url", envvar=["SHIPYARD_URL", "SHIPYARD_SERVER"], show_envvar=False,
                                            help=f"server URL (default: SHIPYARD_URL, else url: in {CONFIG_FILE}, else "
                                                 "http://127.0.0.1:8321)")]
TokenOpt = Annotated[str | None, typer.Option("--token", envvar="SHIPYARD_TOKEN", show_envvar=False,
                                              help=f"bearer token (default: SHIPYARD_TOKEN, else token: in {CONFIG_FILE})")]
OutputOpt = Annotated[str, typer.Option("-o", "--output", metavar="FORMAT", help=OUTPUT_HELP)]


def _client(url: str | None, token: str | None):
    from shipyard.client import Client

    return Client(url, token)


# `shipyard server [OPTIONS]` serves; `shipyard server stop-head` is its one subcommand.
server_app = typer.Typer(help="Run the job service: REST API and scheduler, over a store and a Ray cluster.")
app.add_typer(server_app, name="server")


@server_app.callback(invoke_without_command=True)
def server(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8321,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    ray_address: Annotated[str | None, typer.Option(help="join this Ray head (host:6379 or http://host:8265); "
                                                         "default: start a local one")] = None,
    database_url: DbOpt = None,
    backend: Annotated[str, typer.Option(help="ray, or kuberay (reads SHIPYARD_CONFIG)", envvar="SHIPYARD_BACKEND")] = "ray",
    no_auth: Annotated[bool, typer.Option("--no-auth", help="single-user local mode: no tokens, everyone is admin")] = False,
    public_url: Annotated[str | None, typer.Option(envvar="SHIPYARD_PUBLIC_URL",
                                                   help="URL job drivers use to reach this server")] = None,
    ray_cpus: Annotated[float | None, typer.Option(help="logical CPUs of the local Ray head")] = None,
    interval: Annotated[float, typer.Option(help="seconds between scheduler ticks")] = 2.0,
    package_store: Annotated[str | None, typer.Option(envvar="SHIPYARD_PACKAGE_STORE",
                                                      help="where uploaded code packages go: a directory or "
                                                           "s3://bucket/prefix (default: <data dir>/packages; "
                                                           "--backend kuberay needs s3://)")] = None,
    max_package_mb: Annotated[float, typer.Option(envvar="SHIPYARD_MAX_PACKAGE_MB", min=0.001,
                                                  help="largest code package (zip) accepted, MiB")] = 100.0,
    storage_root: Annotated[str | None, typer.Option(envvar="SHIPYARD_STORAGE_ROOT",
                                                     help="each tenant's default storage root is <this>/<tenant>/ "
                                                          "(s3://bucket/prefix; a local path needs --allow-local-storage)")] = None,
    shared_root: Annotated[list[str], typer.Option(help="a read-only root every tenant may read (repeat)")] = [],
    allow_local_storage: Annotated[bool, typer.Option("--allow-local-storage",
                                                      help="allow local paths as storage roots (jobs then read and "
                                                           "write this machine's disk)")] = False,
    shared_ray_trust: Annotated[bool, typer.Option("--shared-ray-trust",
                                                   help="let several tenants share the Ray cluster, which does not "
                                                        "isolate jobs from each other (one trust domain)")] = False,
    stop_head_on_exit: Annotated[bool, typer.Option("--stop-head-on-exit",
                                                    help="stop the local Ray head, and every job on it, when the "
                                                         "server exits (default: it keeps running for the next "
                                                         "server)")] = False,
) -> None:
    """Run the job service: REST API and scheduler, over a store and a Ray cluster."""
    if ctx.invoked_subcommand is not None:
        return
    import logging

    from shipyard.api.serve import ServerOptions, serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pathlib import Path

    serve(ServerOptions(host=host, port=port, data_dir=Path(data_dir), ray_address=ray_address,
                        database_url=database_url, backend=backend, auth=not no_auth, public_url=public_url,
                        interval_s=interval, ray_cpus=ray_cpus, package_store=package_store,
                        max_package_mb=max_package_mb,
                        storage_root=storage_root, shared_roots=tuple(shared_root),
                        allow_local_storage=allow_local_storage, shared_ray_trust=shared_ray_trust,
                        stop_head_on_exit=stop_head_on_exit), say=lambda m: console.print(m, highlight=False))
    import gc

    gc.freeze()  # everything is closed; spare the exit a final collection of the heap (2-3 s on 2 cores)


@server_app.command("stop-head")
def server_stop_head(data_dir: DataDirOpt = DEFAULT_DATA_DIR) -> None:
    """Stop the local Ray head a server started in this data dir, and every job running on it."""
    from pathlib import Path

    from shipyard.backends.ray_head import stop_head

    head = stop_head(Path(data_dir).expanduser().resolve())
    if head is None:
        console.print(f"no local Ray head is running for {data_dir}", highlight=False)
    else:
        console.print(f"stopped the local Ray head at {head.address} (pid {head.pid})", highlight=False)


@app.command()
def submit(
    file: Annotated[str, typer.Option("-f", "--file", metavar="JOB.yaml", help="the job spec")],
    set_: Annotated[list[str], typer.Option("--set", metavar="FIELD=VALUE", help="override a spec field")] = [],
    follow: Annotated[bool, typer.Option("--follow", help="stream the job's output until it ends")] = False,
    fresh: Annotated[bool, typer.Option("--fresh", help=FRESH_HELP)] = False,
    max_package_mb: Annotated[float | None, typer.Option(envvar="SHIPYARD_MAX_PACKAGE_MB", show_envvar=False,
                                                         help="cap on the job directory's code package, MiB "
                                                              "(default: SHIPYARD_MAX_PACKAGE_MB or 100)")] = None,
    url: UrlOpt = None, token: TokenOpt = None,
) -> None:
    """Queue a job on the server; prints its id. The job's workdir is packed and uploaded (once
    per content: an unchanged directory is not sent again), honouring .gitignore and .shipyardignore."""
    from shipyard.client import Client

    with Client(url, token, max_package_mb=max_package_mb) as c:
        job_id = c.submit(file, fresh_start(file, set_) if fresh else set_, on_upload=_upload_view)
        console.print(job_id, highlight=False)
        if follow:
            _follow(c, job_id)


UPLOAD_BAR_BYTES = 8 << 20  # uploads smaller than this get one line, larger ones a progress bar


def _upload_view(package):
    """Announce an upload on stderr (stdout carries only the job id); a bar for large ones."""
    size = f"{package.bytes / (1 << 20):.1f} MiB"
    line = f"uploading {size} code package {package.digest[:19]}… ({package.files} files from {package.source})"
    if package.bytes < UPLOAD_BAR_BYTES or not err_console.is_terminal:
        err_console.print(line, highlight=False)
        return None
    from rich.progress import DownloadColumn, TransferSpeedColumn

    progress = Progress(TextColumn(line), BarColumn(), DownloadColumn(binary_units=True), TransferSpeedColumn(),
                        console=err_console)
    task = progress.add_task("upload", total=package.bytes)
    progress.start()

    def update(sent: int, total: int) -> None:
        progress.update(task, completed=sent)
        if sent >= total:
            progress.stop()

    return update


def _follow(c, job_id: str) -> None:
    import time

    while c.get(job_id)["state"] in ("QUEUED", "ADMITTED"):
        time.sleep(1)
    for chunk in c.follow_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    job = c.wait(job_id)
    console.print(f"{job_id}: {job['state']}" + (f" ({job['message']})" if job.get("message") else ""), highlight=False)
    if job["state"] != "SUCCEEDED":
        raise typer.Exit(1)


@app.command()
def status(job_id: Annotated[str, typer.Argument(help="job id")], url: UrlOpt = None, token: TokenOpt = None,
           output: OutputOpt = "table",
           json_: Annotated[bool, typer.Option("--json", help="the same as -o json")] = False) -> None:
    """A job's state, progress, attempts, metrics, checkpoint and latest events."""
    fmt = Output.JSON if json_ else parse_output(output)
    with _client(url, token) as c:
        job = c.get(job_id)
    from shipyard.api.schemas import JobDetail

    d = JobDetail.model_validate(job)
    if fmt.document:
        sys.stdout.write(dump(d.model_dump(mode="json"), fmt))
        return
    print_status(console, d, wide=fmt is Output.WIDE)


@app.command()
def top(interval: Annotated[float, typer.Option(help="seconds between refreshes (at least 1)", min=1.0)] = 2.0,
        all_: Annotated[bool, typer.Option("--all", help="also queued jobs, not only running ones")] = False,
        once: Annotated[bool, typer.Option("--once", help="print one frame and exit (also what top does when "
                                                          "stdout is not a terminal)")] = False,
        output: OutputOpt = "table", url: UrlOpt = None, token: TokenOpt = None) -> None:
    """A live view of running jobs: progress, latest metrics, attempts. q or Ctrl-C quits.

    -o json or -o yaml prints one snapshot and exits: the jobs under "items", each as
    `status -o json` prints it."""
    import select
    import termios
    import time
    import tty

    from rich.live import Live

    from shipyard.api.schemas import JobDetail

    fmt = parse_output(output)
    states = "ADMITTED,RUNNING,RESTARTING" + (",QUEUED,PREEMPTED" if all_ else "")

    def jobs(c) -> list[JobDetail]:  # at most 50 jobs per refresh, every >= 1 s
        return [JobDetail.model_validate(c.get(j["id"])) for j in c.list(state=states, limit=50)["items"]]

    def frame(c, live: bool = False) -> Table:
        title = f"shipyard top ({c.url}, every {interval:g}s; q quits)" if live else f"shipyard top ({c.url})"
        return top_table(jobs(c), title, wide=fmt is Output.WIDE, fold_ids=live)

    if fmt.document:
        with _client(url, token) as c:
            sys.stdout.write(dump({"items": [d.model_dump(mode="json") for d in jobs(c)]}, fmt))
        return
    if once or not console.is_terminal:
        with _client(url, token) as c:
            print_table(console, frame(c))
        return
    tty_in = sys.stdin.isatty()
    saved = termios.tcgetattr(sys.stdin) if tty_in else None
    try:
        if tty_in:
            tty.setcbreak(sys.stdin.fileno())
        # Live redraws in place, so a frame must fit the terminal: ids fold there (fold_ids).
        with _client(url, token) as c, Live(frame(c, live=True), console=console, auto_refresh=False) as live:
            while True:
                ready = select.select([sys.stdin], [], [], interval)[0] if tty_in else time.sleep(interval)
                if ready and sys.stdin.read(1).lower() == "q":
                    return
                live.update(frame(c, live=True), refresh=True)
    except KeyboardInterrupt:
        return
    finally:
        if saved is not None:
            termios.tcsetattr(sys.stdin, termios.TCSADRAIN, saved)


@app.command("list")
def list_(state: Annotated[str | None, typer.Option(help="only these states, comma-separated")] = None,
          name: Annotated[str | None, typer.Option(help="only jobs with this name")] = None,
          limit: Annotated[int, typer.Option(help="rows to show")] = 50,
          output: OutputOpt = "table",
          quiet: Annotated[bool, typer.Option("-q", "--quiet", help="only the job ids, one per line "
                                                                    "(e.g. | xargs -n1 shipyard cancel)")] = False,
          url: UrlOpt = None, token: TokenOpt = None) -> None:
    """Jobs, newest first."""
    from shipyard.api.schemas import JobList

    fmt = parse_output(output)
    with _client(url, token) as c:
        page = JobList.model_validate(c.list(state=state, name=name, limit=limit))
    if fmt.document and not quiet:
        sys.stdout.write(dump(page.model_dump(mode="json"), fmt))  # next_cursor says whether there is more
        return
    if quiet:
        sys.stdout.write("".join(f"{j.id}\n" for j in page.items))
    else:
        print_table(console, list_table(page.items, wide=fmt is Output.WIDE))
    if page.next_cursor:  # on stderr: stdout is the table, or ids for xargs
        err_console.print(f"(more: --limit {limit * 2})", highlight=False)


@app.command()
def logs(job_id: Annotated[str, typer.Argument(help="job id")],
         follow: Annotated[bool, typer.Option("-f", "--follow", help="stream until the job ends")] = False,
         tail: Annotated[int, typer.Option(help="last lines")] = 1000,
         rank: Annotated[int | None, typer.Option("--rank", min=0, help="only this rank's lines (those "
                                                                          "prefixed [rank N])")] = None,
         url: UrlOpt = None, token: TokenOpt = None) -> None:
    """A job's output (its driver's, i.e. `shipyard run`'s): each rank's lines prefixed "[rank N]"."""
    with _client(url, token) as c:
        if follow:
            for chunk in c.follow_logs(job_id, rank=rank):
                sys.stdout.write(chunk)
                sys.stdout.flush()
        else:
            sys.stdout.write(c.logs(job_id, tail, rank=rank))


@app.command()
def cancel(job_id: Annotated[str, typer.Argument(help="job id")], url: UrlOpt = None, token: TokenOpt = None) -> None:
    """Cancel a job (a running one checkpoints, then stops)."""
    with _client(url, token) as c:
        job = c.cancel(job_id)
    console.print(f"{job['id']}: {job['state']}", highlight=False)


def main() -> None:
    try:
        app()
    except UserError as e:
        for line in str(e).splitlines():
            err_console.print(f"[red]error:[/red] {line}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
