#!/usr/bin/env bash
# A throwaway PostgreSQL server for tests and local trials; prints its URL.
#
#   deploy/postgres.sh DIR [DBNAME]   start (initialising DIR on first use), create DBNAME
#                                     (default: shipyard), print postgresql+psycopg://... on stdout
#   deploy/postgres.sh stop DIR       stop the server of DIR (DIR is kept; start again reuses it)
#   deploy/postgres.sh install        only make sure PostgreSQL is installed (CI runs this first)
#
# Installs Debian's `postgresql` with apt-get if no /usr/lib/postgresql/*/bin exists (as root, or
# through `sudo -n`). The server listens on 127.0.0.1 only, on a free port remembered in DIR, with
# a random password (scram-sha-256) and fsync off: it is for tests, never for data you keep.
# PostgreSQL refuses to run as root, so as root it runs as the `postgres` system user (created by
# the package) and DIR must be reachable by that user. A second run is fast: it only checks that
# the server answers. Progress goes to stderr; stdout carries the URL alone.
set -euo pipefail

log() { echo "postgres.sh: $*" >&2; }
die() { log "$*"; exit 1; }

cmd=start
case "${1:-}" in start|stop|install) cmd=$1; shift ;; esac
if [ "$cmd" != install ]; then
  [ $# -ge 1 ] || die "usage: $0 [start] DIR [DBNAME] | $0 stop DIR | $0 install"
  mkdir -p "$1"
  dir=$(cd "$1" && pwd)
  db=${2:-shipyard}
  [[ $db =~ ^[a-z_][a-z0-9_]{0,62}$ ]] || die "DBNAME $db: use lower-case letters, digits and _"
fi

pg_bindir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

install_postgres() {
  local run=()
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null && sudo -n true 2>/dev/null \
      || die "PostgreSQL is not installed and this user can neither apt-get (not root) nor sudo without a password; install it: apt-get install postgresql"
    run=(sudo -n)
  fi
  command -v apt-get >/dev/null || die "PostgreSQL is not installed and there is no apt-get here; install PostgreSQL (initdb, pg_ctl) under /usr/lib/postgresql/VERSION/bin"
  log "installing Debian's postgresql (apt-get)"
  "${run[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  "${run[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >&2
}

bin=$(pg_bindir)
if [ -z "$bin" ]; then
  [ "$cmd" = stop ] && exit 0
  install_postgres
  bin=$(pg_bindir)
  [ -n "$bin" ] || die "apt-get installed postgresql but no /usr/lib/postgresql/*/bin appeared"
fi
[ "$cmd" = install ] && { log "PostgreSQL binaries in $bin"; exit 0; }

data=$dir/data
# As root, run every server-side command as the `postgres` user, which owns DIR.
as_owner() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

if [ "$cmd" = stop ]; then
  if [ -f "$data/postmaster.pid" ]; then
    as_owner "$bin/pg_ctl" -D "$data" -m fast -w stop >&2 || true
  fi
  exit 0
fi

if [ "$(id -u)" = 0 ]; then
  id postgres >/dev/null 2>&1 || die "running as root needs the 'postgres' user (created by Debian's postgresql package)"
  chown postgres: "$dir"
  runuser -u postgres -- test -w "$dir" \
    || die "$dir is not reachable by the postgres user (a parent directory is private to root); use a directory under /tmp"
fi

# shellcheck source=free-port.sh
source "$(dirname "${BASH_SOURCE[0]}")/free-port.sh"

if [ ! -f "$data/PG_VERSION" ]; then
  log "initialising a cluster in $data"
  (umask 077; head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$dir/password")
  [ "$(id -u)" = 0 ] && chown postgres: "$dir/password"
  as_owner "$bin/initdb" -D "$data" -U shipyard --pwfile="$dir/password" --auth=scram-sha-256 \
    -E UTF8 --locale=C.UTF-8 --no-sync >"$dir/initdb.log" 2>&1 \
    || { cat "$dir/initdb.log" >&2; die "initdb failed (log above)"; }
fi
password=$(cat "$dir/password")

running() { as_owner "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; }
if ! running; then
  port=$(cat "$dir/port" 2>/dev/null || true)
  if [ -z "$port" ] || (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then port=$(free_port); fi
  echo "$port" > "$dir/port"
  # No Unix socket: its path would have to be short and writable; TCP on loopback is enough.
  as_owner "$bin/pg_ctl" -D "$data" -l "$dir/server.log" -w -t 60 start \
    -o "-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories='' -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" >&2 \
    || { tail -n 20 "$dir/server.log" >&2; die "server did not start (log above)"; }
fi
port=$(cat "$dir/port")

export PGPASSWORD=$password
psql=("$bin/psql" -h 127.0.0.1 -p "$port" -U shipyard -d postgres -v ON_ERROR_STOP=1 -qtA)
if [ "$("${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname = '$db'")" != 1 ]; then
  "${psql[@]}" -c "CREATE DATABASE $db" >&2
fi
echo "postgresql+psycopg://shipyard:$password@127.0.0.1:$port/$db"
