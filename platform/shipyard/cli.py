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

CONFIG_FILE = "~/.shipyard/config.yaml"  # client.client_config: $SHIPYARD_HOME/config.yaml, SHIPYARD_HOME=~/.shipyard
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="shipyard: run distributed training jobs described in YAML. Commands that talk to a "
                       "server read SHIPYARD_URL and SHIPYARD_TOKEN, else the config file "
                       f"{CONFIG_FILE} (keys url: and token:; $SHIPYARD_HOME/config.yaml when SHIPYARD_HOME "
                       "is set).")
data_app = typer.Typer(no_args_is_help=True, help="Datasets: write Arrow shards.")
ckpt_app = typer.Typer(no_args_is_help=True, help="Checkpoints: list what a job saved, export one.")
admin_app = typer.Typer(no_args_is_help=True, help="Tenants and tokens of a server's store (run where the server's data is).")
app.add_typer(data_app, name="data")
app.add_typer(ckpt_app, name="checkpoints")
app.add_typer(admin_app, name="admin")

console = Console()
err_console = Console(stderr=True)


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
) -> None:
    """Run a job in the foreground on a local Ray (or RAY_ADDRESS); resumes from its latest checkpoint."""
    from shipyard.config import enable_ray_token_auth

    enable_ray_token_auth()  # before anything imports ray
    from shipyard.display import RunView
    from shipyard.runtime import report
    from shipyard.runtime.launcher import launch
    from shipyard.spec import load_spec

    spec = load_spec(spec_file, fresh_start(spec_file, set_) if fresh else set_)
    w = spec.workers
    console.print(f"[bold]{spec.name}[/bold]: {f'{w.min}-{w.count} (elastic)' if w.elastic else w.count} workers"
                  f" x {w.cpus:g} CPU{f' + {w.gpus:g} GPU' if w.gpus else ''}, strategy {spec.strategy.kind}, "
                  f"data {spec.dataset.uri}")
    # A submitted job (the backend set SHIPYARD_REPORT_URL) also reports to the server and turns
    # SIGTERM into a checkpoint; for a user's own run the session does nothing.
    with report.session(spec) as session, RunView(console, spec) as view:
        try:
            result = launch(spec, on_progress=report.chain(view.update, session.update))
        except UserError as e:
            session.finish(False, str(e), user_error=True)
            raise
        except BaseException as e:
            session.finish(False, f"{type(e).__name__}: {e}")
            raise
        session.finish(result.ok, result.error, result.user_error)
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
DataDirOpt = Annotated[str, typer.Option("--data-dir", envvar="SHIPYARD_DATA_DIR",
                                         help="server state: SQLite store, admin token, report key, local Ray head")]
DbOpt = Annotated[str | None, typer.Option("--database-url", envvar="SHIPYARD_DATABASE_URL",
                                           help="postgresql://... (default: SQLite under the data dir)")]
DEFAULT_DATA_DIR = "~/.shipyard/server"


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
           json_: Annotated[bool, typer.Option("--json", help="print the API's JSON")] = False) -> None:
    """A job's state, progress, attempts, metrics and checkpoints."""
    with _client(url, token) as c:
        job = c.get(job_id)
    if json_:
        import json

        console.print_json(json.dumps(job))
        return
    from shipyard.api.schemas import JobDetail

    d = JobDetail.model_validate(job)
    step = f"step {d.step}/{d.total_steps}" if d.total_steps else ""
    console.print(f"[bold]{d.id}[/bold] {d.name} ({d.tenant}, priority {d.priority}): "
                  f"[bold]{d.state}[/bold] {step}", highlight=False)
    if d.progress is not None:
        console.print(f"  progress: {_bar(d.progress)}", highlight=False)
    for key, value in (("waiting", d.waiting), ("cause", d.cause), ("message", d.message),
                       ("checkpoint", d.checkpoint)):
        if value:
            console.print(f"  {key}: {value}", highlight=False)
    if d.metrics:
        console.print("  metrics: " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                for k, v in d.metrics.items()), highlight=False)
    if d.attempts:
        t = Table("run", "attempt", "steps", "ended", "cause", "lost", "recovery")
        for a in d.attempts:
            ended = a.kind.value if a.kind else ("running" if a.ended_at is None else "")
            t.add_row(str(a.run_number or ""), str(a.number), f"{a.start_step or 0}->{a.last_step or 0}", ended,
                      a.cause or "", "" if a.steps_lost is None else str(a.steps_lost),
                      "" if a.recovery_s is None else f"{a.recovery_s:.1f}s")
        console.print(t)


def _bar(progress: float | None, width: int = 30) -> str:
    if progress is None:
        return ""
    done = round(max(0.0, min(1.0, progress)) * width)
    return f"[green]{'█' * done}[/green][dim]{'░' * (width - done)}[/dim] {progress * 100:3.0f}%"


@app.command()
def top(interval: Annotated[float, typer.Option(help="seconds between refreshes (at least 1)", min=1.0)] = 2.0,
        all_: Annotated[bool, typer.Option("--all", help="also queued jobs, not only running ones")] = False,
        once: Annotated[bool, typer.Option("--once", help="print one frame and exit (scripts, logs)")] = False,
        url: UrlOpt = None, token: TokenOpt = None) -> None:
    """A live view of running jobs: progress, latest metrics, attempts. q or Ctrl-C quits."""
    import select
    import termios
    import time
    import tty

    from rich.live import Live

    from shipyard.api.schemas import JobDetail
    from shipyard.runtime.meter import BUILTIN

    states = "ADMITTED,RUNNING,RESTARTING" + (",QUEUED,PREEMPTED" if all_ else "")

    def frame(c) -> Table:
        t = Table("id", "name", "tenant", "state", "progress", "step", "metrics", "attempts", "lost",
                  title=f"shipyard top ({c.url}{'' if once else f', every {interval:g}s; q quits'})",
                  title_justify="left")
        for j in c.list(state=states, limit=50)["items"]:
            d = JobDetail.model_validate(c.get(j["id"]))  # at most 50 jobs per refresh, every >= 1 s
            shown = sorted((k for k, v in d.metrics.items() if v is not None), key=lambda k: k in BUILTIN)[:3]
            metrics = "  ".join(f"{k}={d.metrics[k]:.4g}" for k in shown)
            t.add_row(d.id, d.name, d.tenant, d.state, _bar(d.progress, 15), f"{d.step or 0}/{d.total_steps or '?'}",
                      metrics, str(len(d.attempts)), str(sum(a.steps_lost or 0 for a in d.attempts)))
        return t

    if once:
        with _client(url, token) as c:
            console.print(frame(c))
        return
    tty_in = sys.stdin.isatty()
    saved = termios.tcgetattr(sys.stdin) if tty_in else None
    try:
        if tty_in:
            tty.setcbreak(sys.stdin.fileno())
        with _client(url, token) as c, Live(frame(c), console=console, auto_refresh=False) as live:
            while True:
                ready = select.select([sys.stdin], [], [], interval)[0] if tty_in else time.sleep(interval)
                if ready and sys.stdin.read(1).lower() == "q":
                    return
                live.update(frame(c), refresh=True)
    except KeyboardInterrupt:
        return
    finally:
        if saved is not None:
            termios.tcsetattr(sys.stdin, termios.TCSADRAIN, saved)


@app.command("list")
def list_(state: Annotated[str | None, typer.Option(help="only these states, comma-separated")] = None,
          name: Annotated[str | None, typer.Option(help="only jobs with this name")] = None,
          limit: Annotated[int, typer.Option(help="rows to show")] = 50, url: UrlOpt = None, token: TokenOpt = None) -> None:
    """Jobs, newest first."""
    with _client(url, token) as c:
        page = c.list(state=state, name=name, limit=limit)
    t = Table("id", "name", "tenant", "priority", "state", "progress", "submitted", "note")
    for j in page["items"]:
        progress = f"{j['progress'] * 100:.0f}%" if j.get("progress") is not None else ""
        t.add_row(j["id"], j["name"], j["tenant"], str(j["priority"]), j["state"], progress,
                  j["submitted_at"][:19].replace("T", " "), j.get("waiting") or j.get("cause") or "")
    console.print(t)
    if page.get("next_cursor"):
        console.print(f"(more: --limit {limit * 2})")


@app.command()
def logs(job_id: Annotated[str, typer.Argument(help="job id")],
         follow: Annotated[bool, typer.Option("-f", "--follow", help="stream until the job ends")] = False,
         tail: Annotated[int, typer.Option(help="last lines")] = 1000, url: UrlOpt = None, token: TokenOpt = None) -> None:
    """A job's output (its driver's, i.e. `shipyard run`'s)."""
    with _client(url, token) as c:
        if follow:
            for chunk in c.follow_logs(job_id):
                sys.stdout.write(chunk)
                sys.stdout.flush()
        else:
            sys.stdout.write(c.logs(job_id, tail))


@app.command()
def cancel(job_id: Annotated[str, typer.Argument(help="job id")], url: UrlOpt = None, token: TokenOpt = None) -> None:
    """Cancel a job (a running one checkpoints, then stops)."""
    with _client(url, token) as c:
        job = c.cancel(job_id)
    console.print(f"{job['id']}: {job['state']}", highlight=False)


def _store(data_dir: str, database_url: str | None):
    from pathlib import Path

    from shipyard.store import Store

    return Store.open(database_url, data_dir=Path(data_dir).expanduser())


@admin_app.command("create-tenant")
def admin_create_tenant(name: Annotated[str, typer.Argument(help="tenant name")],
                        max_gpus: Annotated[float | None, typer.Option(help="GPU quota")] = None,
                        max_cpus: Annotated[float | None, typer.Option(help="CPU quota")] = None,
                        max_running_jobs: Annotated[int | None, typer.Option(help="jobs holding resources at once")] = None,
                        storage_root: Annotated[list[str], typer.Option(help="a storage root its jobs may read and "
                                                                             "write, besides the server's default (repeat)")] = [],
                        read_only_root: Annotated[list[str], typer.Option(help="a root its jobs may only read (repeat)")] = [],
                        priority: Annotated[int, typer.Option(help="tenant priority: its jobs may preempt jobs of "
                                                                   "tenants with a lower one")] = 0,
                        data_dir: DataDirOpt = DEFAULT_DATA_DIR, database_url: DbOpt = None) -> None:
    """Create a tenant (a team with quotas, storage roots and a priority)."""
    roots = [(r, True) for r in storage_root] + [(r, False) for r in read_only_root]
    with _store(data_dir, database_url) as store:
        t = store.create_tenant(name, max_gpus=max_gpus, max_cpus=max_cpus, max_running_jobs=max_running_jobs,
                                storage_roots=roots, priority=priority)
    console.print(f"tenant {t.name} created", highlight=False)


@admin_app.command("set-tenant")
def admin_set_tenant(name: Annotated[str, typer.Argument(help="tenant name")],
                     storage_root: Annotated[list[str] | None, typer.Option(help="replace its read-write roots (repeat)")] = None,
                     read_only_root: Annotated[list[str] | None, typer.Option(help="replace its read-only roots (repeat)")] = None,
                     priority: Annotated[int | None, typer.Option(help="its tenant priority")] = None,
                     data_dir: DataDirOpt = DEFAULT_DATA_DIR, database_url: DbOpt = None) -> None:
    """Change a tenant's storage roots or priority (what is not given is kept)."""
    with _store(data_dir, database_url) as store:
        t = store.get_tenant(name)
        if storage_root is not None or read_only_root is not None:
            rw = [(u, True) for u in storage_root] if storage_root is not None else [r for r in t.storage_roots if r[1]]
            ro = [(u, False) for u in read_only_root] if read_only_root is not None else [r for r in t.storage_roots if not r[1]]
            t = store.set_storage(name, rw + ro)
        if priority is not None:
            t = store.set_priority(name, priority)
    roots = ", ".join(u + ("" if w else " (read-only)") for u, w in t.storage_roots) or "none granted"
    console.print(f"tenant {t.name}: priority {t.priority}; storage roots: {roots}", highlight=False)


# 5 s: shipyard.api.auth.TOKEN_CACHE_S (not imported here: the CLI starts without FastAPI)
REVOCATION_NOTE = ("A server that has seen the token in the last 5 s may accept it for up to 5 s more (its token "
                   "cache); POST /v1/admin/tokens/ID/revoke through a server stops it at once in that replica.")


@admin_app.command("create-token")
def admin_create_token(tenant: Annotated[str, typer.Option(help="the token's tenant (must exist, unless --create-tenant)")],
                       role: Annotated[str, typer.Option(help="user or admin")] = "user",
                       label: Annotated[str | None, typer.Option(help="a note: who holds it")] = None,
                       expires_in: Annotated[str | None, typer.Option(metavar="DURATION",
                                                                      help="refuse the token after this long: 90d, 12h "
                                                                           "or 30m, at most 3650d (default: never)")] = None,
                       create_tenant: Annotated[bool, typer.Option("--create-tenant",
                                                                   help="create the tenant first if it does not exist "
                                                                        "(no quotas; see create-tenant)")] = False,
                       data_dir: DataDirOpt = DEFAULT_DATA_DIR, database_url: DbOpt = None) -> None:
    """Create a bearer token and print it (it cannot be shown again); its id goes to stderr."""
    from shipyard.store import TenantNotFound
    from shipyard.store.tenancy import check_label, check_tenant_name, token_lifetime

    if role not in ("user", "admin"):
        raise UserError(f"--role: got {role!r}; expected user or admin")
    check_tenant_name(tenant, "--tenant")
    check_label(label, "--label")
    lifetime = None if expires_in is None else token_lifetime(expires_in, "--expires-in")
    with _store(data_dir, database_url) as store:
        if create_tenant:
            store.create_tenant(tenant, exist_ok=True)
        try:
            secret, t = store.create_token(tenant, admin=role == "admin", label=label, expires_in=lifetime)
        except TenantNotFound:
            raise UserError(f"tenant {tenant!r} does not exist; create it with `shipyard admin create-tenant "
                            f"{tenant}` or pass --create-tenant") from None
    expires = f"expires {_utc(t.expires_at)}" if t.expires_at else "never expires"
    err_console.print(f"token {t.id} ({role} of tenant {t.tenant}, {expires}); it is shown once", highlight=False,
                      soft_wrap=True)
    print(secret)


def _utc(when) -> str:
    return when.strftime("%Y-%m-%d %H:%M UTC") if when else ""


@admin_app.command("list-tokens")
def admin_list_tokens(tenant: Annotated[str | None, typer.Option(help="only this tenant's tokens")] = None,
                      limit: Annotated[int, typer.Option(min=1, max=100_000, help="rows to show")] = 1000,
                      output: Annotated[str, typer.Option("-o", "--output", help="table or json")] = "table",
                      data_dir: DataDirOpt = DEFAULT_DATA_DIR, database_url: DbOpt = None) -> None:
    """Tokens, oldest first, revoked and expired ones included (never their secrets)."""
    import json

    from rich.markup import escape

    from shipyard.store.tenancy import check_tenant_name, token_state

    if output not in ("table", "json"):
        raise UserError(f"--output: got {output!r}; expected table or json")
    if tenant is not None:
        check_tenant_name(tenant, "--tenant")
    with _store(data_dir, database_url) as store:
        if tenant is not None:
            store.get_tenant(tenant)  # a typo is an error, not an empty table
        tokens = store.list_tokens(tenant, limit=limit + 1)
    more, tokens = len(tokens) > limit, tokens[:limit]
    if output == "json":
        from shipyard.api.routes_admin import TokenOut  # the shape GET /v1/admin/tokens answers

        print(json.dumps([TokenOut.of(t).model_dump(mode="json") for t in tokens], indent=2))
        return
    table = Table("id", "tenant", "role", "label", "created", "expires", "revoked", "state", box=None, pad_edge=False)
    for t in tokens:
        table.add_row(str(t.id), t.tenant, "admin" if t.admin else "user", escape(t.label or ""), _utc(t.created_at),
                      _utc(t.expires_at) or "never", _utc(t.revoked_at), token_state(t))
    # Piped: rows at their full width, not folded at 80 columns.
    (console if console.is_terminal else Console(width=10_000)).print(table)
    if more:
        err_console.print(f"(more: --limit {limit * 2})")


@admin_app.command("revoke-token", help="Revoke a token by its id (list-tokens shows them). " + REVOCATION_NOTE)
def admin_revoke_token(token_id: Annotated[int, typer.Argument(metavar="ID", help="the token's id")],
                       data_dir: DataDirOpt = DEFAULT_DATA_DIR, database_url: DbOpt = None) -> None:
    from rich.markup import escape

    with _store(data_dir, database_url) as store:
        before = store.get_token(token_id)
        t = store.revoke_token(token_id)
    who = f"{'admin' if t.admin else 'user'} of tenant {t.tenant}" + (f", {escape(t.label)}" if t.label else "")
    if before.revoked_at is not None:
        console.print(f"token {t.id} ({who}) was already revoked at {_utc(t.revoked_at)}", highlight=False,
                      soft_wrap=True)
        return
    console.print(f"token {t.id} ({who}) revoked; a running server refuses it within 5 s", highlight=False,
                  soft_wrap=True)


def main() -> None:
    try:
        app()
    except UserError as e:
        for line in str(e).splitlines():
            err_console.print(f"[red]error:[/red] {line}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
