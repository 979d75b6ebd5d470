"""`shipyard admin`: tenants and tokens, written straight into a server's store.

These commands open the store the server uses (the SQLite file under ``--data-dir``, or
``--database-url``), so they run where the server's data is, with or without a server running;
the same operations through a running server are the ``/v1/admin/...`` routes. The store options
(``--data-dir``, ``--database-url``) are defined here and shared with ``shipyard server``.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from shipyard.errors import UserError

admin_app = typer.Typer(no_args_is_help=True, help="Tenants and tokens of a server's store (run where the server's data is).")

# Not shipyard.cli's consoles: that module imports this one (rich writes to whatever
# sys.stdout/sys.stderr are when it prints, so these behave the same).
console = Console()
err_console = Console(stderr=True)

DataDirOpt = Annotated[str, typer.Option("--data-dir", envvar="SHIPYARD_DATA_DIR",
                                         help="server state: SQLite store, admin token, report key, local Ray head")]
DbOpt = Annotated[str | None, typer.Option("--database-url", envvar="SHIPYARD_DATABASE_URL",
                                           help="postgresql://... (default: SQLite under the data dir)")]
DEFAULT_DATA_DIR = "~/.shipyard/server"


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
