"""Each rank's output on the driver: every line once, as ``[rank N] line``; Ray's own lines hidden.

Ray streams every worker process's stdout and stderr to the driver (``ray.init(log_to_driver=True)``),
whose printer shows them behind ``(RayTrainWorker pid=...)`` prefixes, coloured, with identical
lines of different processes folded into one, and with the output of Ray's controller actor and
raylets mixed in. shipyard replaces that printer (:func:`~shipyard.runtime.ray_adapter.route_worker_output`)
by :meth:`RankOutput.on_lines`, which decides per line:

- a line of a training worker process whose rank is known (each rank registers its process on
  the run's Board as it starts; the driver learns it with the next snapshot, within a second) is
  written as ``[rank N] line``, when rank N is among those shown (``shipyard run --ranks``);
- a line of a training worker process not registered yet waits for the registration. What never
  gets one (a process's output from before shipyard's loop started in it: Ray Train's own start-up)
  is shown with ``--verbose`` only, when the run ends (:meth:`RankOutput.close`);
- every other line (Ray Train's controller, raylet warnings such as "A worker died or was killed",
  the autoscaler, other actors and tasks) is shown with ``--verbose`` only, as ``(name pid=N) line``.

Escape sequences are removed unless the output is a terminal (:attr:`OutputOptions.keep_ansi`),
so that a piped or stored log holds plain text. stdout and stderr lines go to one writer, in the
order they arrive (per process and stream, the order they were written).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from shipyard.errors import UserError
from shipyard.loglines import strip_ansi, with_rank
from shipyard.run.records import RankProcess
from shipyard.runtime.ray_adapter import TRAIN_WORKER_CLASS, WorkerLines

MAX_WAITING = 10_000  # lines of unregistered worker processes held back, in all


@dataclass(frozen=True)
class OutputOptions:
    ranks: frozenset[int] | None = None  # the ranks whose lines are shown; None: every rank
    verbose: bool = False  # also Ray's own lines
    keep_ansi: bool = False  # keep escape sequences (the output is a terminal)


def parse_ranks(value: str, option: str = "--ranks") -> frozenset[int] | None:
    """``all`` -> None (every rank); ``0`` or ``0,2`` -> those ranks."""
    if value.strip().lower() == "all":
        return None
    try:
        ranks = frozenset(int(v) for v in value.split(","))
    except ValueError:
        ranks = frozenset({-1})
    if not ranks or min(ranks) < 0:
        raise UserError(f"{option}: got {value!r}; expected all, a rank (0) or ranks (0,2)")
    return ranks


class RankOutput:
    """Routes worker output lines to ``write`` (see the module docstring). :meth:`on_lines` runs
    on Ray's log thread, :meth:`learn` on the launcher's: one lock orders them."""

    def __init__(self, write: Callable[[str], None], options: OutputOptions = OutputOptions(),
                 clock: Callable[[], float] = time.monotonic):
        self.write, self.options, self.clock = write, options, clock
        self._lock = threading.Lock()
        self._ranks: dict[tuple[str, int], int] = {}
        self._by_pid: dict[int, int | None] = {}  # pid -> rank, None when the pid is two ranks' (two nodes)
        self._waiting: dict[tuple[str | None, int], list[str]] = {}
        self._n_waiting = 0
        self.last_line_at = clock()

    # -- from the launcher ------------------------------------------------------------------------

    def learn(self, processes: Iterable[RankProcess]) -> None:
        """Which process runs which rank (the Board's snapshot); lines held for them are written."""
        with self._lock:
            for p in processes:
                if self._ranks.get((p.node_ip, p.pid)) == p.rank:
                    continue
                self._ranks[(p.node_ip, p.pid)] = p.rank
                self._by_pid[p.pid] = p.rank if self._by_pid.get(p.pid, p.rank) == p.rank else None
            for key in [k for k in self._waiting if self._rank(*k) is not None]:
                rank = self._rank(*key)
                lines = self._waiting.pop(key)
                self._n_waiting -= len(lines)
                self._emit_rank(rank, lines)

    def drain(self, quiet_s: float = 0.5, max_s: float = 3.0, sleep: Callable[[float], None] = time.sleep) -> None:
        """Wait until no line arrived for ``quiet_s`` (at most ``max_s``): the ranks' last lines
        are still on their way (Ray's log monitor reads the files every 0.1 s) when training ends."""
        deadline = self.clock() + max_s
        while self.clock() < deadline and self.clock() - self.last_line_at < quiet_s:
            sleep(0.05)

    def close(self) -> None:
        """The run is over: lines of processes that never registered, with ``--verbose`` only."""
        with self._lock:
            waiting, self._waiting, self._n_waiting = self._waiting, {}, 0
            if self.options.verbose:
                for (_, pid), lines in waiting.items():
                    for line in lines:
                        self.write(self._clean(f"({TRAIN_WORKER_CLASS} pid={pid}) {line}"))

    # -- from Ray's log thread ----------------------------------------------------------------------

    def on_lines(self, batch: WorkerLines) -> None:
        with self._lock:
            self.last_line_at = self.clock()
            if batch.actor == TRAIN_WORKER_CLASS and isinstance(batch.pid, int):
                rank = self._rank(batch.ip, batch.pid)
                if rank is not None:
                    self._emit_rank(rank, batch.lines)
                else:
                    self._hold((batch.ip, batch.pid), batch.lines)
            elif self.options.verbose:
                source = batch.actor or batch.task
                prefix = f"({source} pid={batch.pid})" if source else f"({batch.pid})"
                for line in batch.lines:
                    self.write(self._clean(f"{prefix} {line}"))

    # -- inside the lock ------------------------------------------------------------------------------

    def _rank(self, ip: str | None, pid: int) -> int | None:
        rank = self._ranks.get((ip, pid)) if ip is not None else None
        return rank if rank is not None else self._by_pid.get(pid)  # Ray may name a node by another address

    def _emit_rank(self, rank: int, lines: Iterable[str]) -> None:
        if self.options.ranks is not None and rank not in self.options.ranks:
            return
        for line in lines:
            self.write(with_rank(rank, self._clean(line)))

    def _hold(self, key: tuple[str | None, int], lines: tuple[str, ...]) -> None:
        held = self._waiting.setdefault(key, [])
        held.extend(lines)
        self._n_waiting += len(lines)
        while self._n_waiting > MAX_WAITING and held:  # an unregistered chatty process: keep its newest
            held.pop(0)
            self._n_waiting -= 1

    def _clean(self, line: str) -> str:
        return line if self.options.keep_ansi else strip_ansi(line)
