"""TrainContext: everything the user's ``train(ctx)`` touches.

The platform owns the parts users get wrong: applying the strategy, restoring model,
optimizer, scheduler, RNG and data position from the latest committed checkpoint (inside
:meth:`TrainContext.prepare`, before the first batch), and checkpointing at step boundaries
(inside :meth:`TrainContext.batches`, between two batches, where the model state and the data
position agree). A user loop cannot forget to resume.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from shipyard import storage
from shipyard.checkpoint import CheckpointStore
from shipyard.checkpoint import dcp as ckpt
from shipyard.checkpoint.saver import Checkpointer, Saved
from shipyard.data import ShardStream
from shipyard.errors import UserError
from shipyard.parallel import STRATEGIES
from shipyard.parallel.mesh import parallel_dims
from shipyard.runtime import preemption
from shipyard.runtime.meter import MAX_PENDING_STEPS, StepMeter
from shipyard.runtime.tensorboard import EventWriter, log_dir, to_floats
from shipyard.runtime.watchdog import Watchdog
from shipyard.spec import JobSpec

log = logging.getLogger(__name__)

# Rank 0 sends progress to the driver at most this often: an actor call costs about 1 ms of
# the training loop (measured in tests/bench/step_overhead.py), so once a second is ~0.1%.
PUSH_INTERVAL_S = 1.0
# Ranks compare SIGTERM notices and every_seconds clocks about this often (one all-reduce).
AGREE_EVERY_S = 1.0


class TrainContext:
    def __init__(self, spec: JobSpec, *, rank: int, world_size: int, local_rank: int,
                 device: torch.device, board=None, generation: int | None = None):
        self.spec = spec
        self.config: dict[str, Any] = dict(spec.config)
        self.rank, self.world_size, self.local_rank, self.device = rank, world_size, local_rank, device
        # Data is sharded over the data-parallel dimension only: tensor- and pipeline-parallel
        # peers (which hold parts of one model replica) must read the same batches.
        self.dims = parallel_dims(spec.strategy, world_size)
        self.dp_rank, self.dp_world = self.dims.dp_rank(rank), self.dims.dp
        self.step = 0
        self._board, self._generation = board, generation  # generation: of the process group (regroup.py)
        self._model = self._optimizer = self._scheduler = None
        self._stream = ShardStream(
            spec.dataset.uri, batch_size=spec.dataset.batch_size, rank=self.dp_rank, world=self.dp_world,
            seed=spec.dataset.seed, shuffle=spec.dataset.shuffle, epochs=spec.dataset.epochs)
        self._store = CheckpointStore(spec.checkpoint.uri) if spec.checkpoint else None
        self._checkpointer: Checkpointer | None = None
        self._control = None
        self._agree_at = self._agreed_step = 0  # see _step_boundary
        self._agreed_time = time.monotonic()
        self._saved_step: int | None = None
        self._last_save_time = time.monotonic()
        self._metrics: dict[str, Any] = {}
        self._last_push = 0.0
        self._busy = False  # inside a platform wait (restore, checkpoint commit): not a stall
        self._watchdog: Watchdog | None = None
        # Built-in metrics (runtime/meter.py) and, with metrics.tensorboard, rank 0's event files:
        # both fed from local numbers only, sent with the throttled push.
        tensorboard = spec.metrics.tensorboard and rank == 0 and board is not None
        self._meter = StepMeter(samples_per_step=spec.dataset.batch_size * self.dp_world, dp_world=self.dp_world,
                                device=device, tokens_key=spec.metrics.tokens_key, per_step=tensorboard)
        self._tb: EventWriter | None = None
        self._tb_wanted = tensorboard
        self._tb_rows: deque = deque(maxlen=MAX_PENDING_STEPS)

    @property
    def epoch(self) -> int:
        return self._stream.epoch

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    @property
    def total_steps(self) -> int:
        """Steps when the data is exhausted (counting steps taken before a restore)."""
        return self.step + self._stream.remaining_batches

    # -- setup ----------------------------------------------------------------------------
    def prepare(self, model: torch.nn.Module, optimizer_fn: Callable[[Any], torch.optim.Optimizer],
                scheduler_fn: Callable[[torch.optim.Optimizer], Any] | None = None):
        """Apply the spec's strategy, build the optimizer (and scheduler), restore the latest checkpoint.

        ``optimizer_fn`` receives the parameters of the wrapped model (strategies such as FSDP
        replace them). Returns ``(model, optimizer)``, or ``(model, optimizer, scheduler)``.
        """
        model, optimizer = STRATEGIES[self.spec.strategy.kind](model, self.device, optimizer_fn, self.spec.strategy)
        scheduler = scheduler_fn(optimizer) if scheduler_fn else None
        self._model, self._optimizer, self._scheduler = model, optimizer, scheduler
        if self._store is not None:
            ck = self.spec.checkpoint
            self._control = dist.new_group(backend="gloo")  # for _step_boundary's agreement
            self._checkpointer = Checkpointer(self._store, strategy=self.spec.strategy.kind, keep_last=ck.keep_last,
                                              async_upload=ck.async_upload, on_commit=self._committed)
        self._busy = True
        self._restore()
        self._busy = False
        if self._tb_wanted:
            self._tb = EventWriter(log_dir(self.spec), resumed_step=self.step)
        self._push(force=True, event="started")
        if self._board is not None and (self.spec.stall_timeout_s or self._generation is not None):
            self._watchdog = Watchdog(self._board, self.rank, self.spec.stall_timeout_s,
                                      step=lambda: self.step, busy=lambda: self._busy, generation=self._generation)
            self._watchdog.start()
        return (model, optimizer) if scheduler is None else (model, optimizer, scheduler)

    def _restore(self) -> None:
        record = self._store.latest() if self._store else None
        if record is None:
            return
        rank_state = ckpt.restore(self._store, record, model=self._model, optimizer=self._optimizer,
                                  scheduler=self._scheduler)
        # Every rank's data state, so that a different world size still resumes exactly.
        self._stream.load_state_dict(_data_states(record.data))
        if rank_state is not None:
            ckpt.set_rng_state(rank_state["rng"])
        self.step = self._saved_step = self._agree_at = self._agreed_step = record.step
        self._event(f"restored from checkpoint at step {record.step} ({record.uri})", checkpoint=record.uri)

    # -- the loop -------------------------------------------------------------------------
    def batches(self) -> Iterator[dict]:
        """This rank's batches (dicts of tensors on ``ctx.device``) from the restored position on.

        Checkpoints are taken here, between batches, when the spec's trigger is due, and once
        more when the data is exhausted.
        """
        if self._model is None:
            raise UserError("call ctx.prepare(model, optimizer_fn) before ctx.batches()")
        it = iter(self._stream)
        first = self.step + 1
        while True:
            if self.step == first:
                self._push(force=True)  # this attempt's first step is done: its recovery time
            self._step_boundary()
            self._meter.boundary(self.step, time.perf_counter())
            self._push()  # throttled: built-in metrics flow even when the user never reports
            waited = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            self._meter.fetched(batch, time.perf_counter() - waited)
            self.step += 1
            yield _to_device(batch, self.device)
        if self._store and self._saved_step != self.step:
            self.checkpoint()
        self.wait_for_checkpoint()
        self._stop_watchdog()  # what the user does after the last batch (evaluation) has no steps
        self._push(force=True)

    def eval_batches(self, batch_size: int | None = None) -> Iterator[dict]:
        """This rank's share of ``dataset.eval_uri``: every row once across ranks, file order."""
        uri = self.spec.dataset.eval_uri
        if not uri:
            raise UserError("ctx.eval_batches(): dataset.eval_uri is not set in the job spec")
        stream = ShardStream(uri, batch_size=batch_size or self.spec.dataset.batch_size, rank=self.dp_rank,
                             world=self.dp_world, shuffle=False, drop_remainder=False)
        for batch in stream:
            yield _to_device(batch, self.device)

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor,
                   loss_fn: Callable[[Any, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Forward and backward of one batch under any strategy; returns the loss, detached.

        ``loss_fn(model(inputs), targets)`` must be a mean over the batch. Under ``pipeline`` the
        model is cut into stages and a schedule runs the batch as microbatches through them: there
        the schedule runs forward and backward, and the returned loss (the mean over microbatches,
        sent from the last stage) is the same on every rank of a pipeline. Elsewhere this is
        ``loss = loss_fn(model(inputs), targets); loss.backward()``. The loss is this data-parallel
        rank's; the optimizer step (and ``clip_grad_norm_`` before it) stays in the user's loop.
        """
        if self._model is None:
            raise UserError("call ctx.prepare(model, optimizer_fn) before ctx.train_step()")
        pipeline = getattr(self._model, "shipyard_pipeline", None)
        if pipeline is not None:
            return pipeline.step(inputs, targets, loss_fn)
        loss = loss_fn(self._model(inputs), targets)
        loss.backward()
        return loss.detach()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the gradients of the prepared model to a global 2-norm of ``max_norm`` (collective).

        The norm is the whole model's under every strategy (FSDP/TP shards, pipeline stages; see
        ``parallel/clip.py``); returns it (before clipping), equal on every rank. Call it after
        backward (``ctx.train_step``) and before ``optimizer.step()``.
        """
        from shipyard.parallel.clip import clip_grad_norm_

        if self._model is None:
            raise UserError("call ctx.prepare(model, optimizer_fn) before ctx.clip_grad_norm_()")
        if self.spec.strategy.kind == "horovod":
            # Horovod averages gradients inside optimizer.step(); clip what it averaged. Its step
            # then averages the (already equal) clipped gradients once more, with a warning.
            self._optimizer.synchronize()
        pipeline = getattr(self._model, "shipyard_pipeline", None)
        return clip_grad_norm_(self._model.parameters(), max_norm,
                               pp_group=pipeline.pp_group if pipeline is not None else None)

    def report(self, **metrics: Any) -> None:
        """Record metrics for this step (tensors are fine: they are read only when sent)."""
        self._metrics.update(metrics)
        if self._tb is not None:  # every report becomes a point; tensors are read in bulk at the push
            self._tb_rows.append((self.step, {k: v.detach() if isinstance(v, torch.Tensor) else v
                                              for k, v in metrics.items()}))
        self._push()

    # -- checkpoints ----------------------------------------------------------------------
    def _step_boundary(self) -> None:
        """Between two batches: checkpoint when due; stop here when any rank got SIGTERM.

        Ranks must agree on both, or the collective save deadlocks. ``every_steps`` is the same
        arithmetic on every rank; ``every_seconds`` clocks and SIGTERM notices are compared in a
        tiny all-reduce on a gloo group of its own. That costs milliseconds on a busy machine, so
        it runs about once every ``AGREE_EVERY_S``: each check also agrees on the number of steps
        until the next one, from the step time the ranks measured.
        """
        ck = self.spec.checkpoint
        if ck is None:
            return
        due = bool(ck.every_steps and self.step % ck.every_steps == 0)
        noticed = -1
        if self.step >= self._agree_at:
            now = time.monotonic()
            steps, seconds = self.step - self._agreed_step, now - self._agreed_time
            interval = max(1, min(1000, int(AGREE_EVERY_S * steps / seconds))) if steps and seconds > 0 else 1
            flags = torch.tensor([
                int(ck.every_seconds is not None and now - self._last_save_time >= ck.every_seconds),
                self.rank + 1 if preemption.requested() else 0,
                interval])
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._control)
            due = due or bool(flags[0])
            noticed = int(flags[1]) - 1  # the highest rank that received SIGTERM, or -1
            self._agree_at, self._agreed_step, self._agreed_time = self.step + int(flags[2]), self.step, now
        if (due or noticed >= 0) and self.step not in (0, self._saved_step):
            self.checkpoint()
        if noticed >= 0:
            self.wait_for_checkpoint()
            why = preemption.reason() if preemption.requested() else "received SIGTERM"
            message = (f"preempted: rank {noticed} {why}; checkpoint at step {self.step} committed, "
                       f"the job restarts from it")
            self._event(message)
            raise preemption.Preempted(message)

    def checkpoint(self) -> None:
        """Save a checkpoint now (collective: every rank must call it at the same step).

        With ``checkpoint.async_upload`` (the default) this returns once the model is copied to
        CPU memory; the optimizer state is copied before the next ``optimizer.step``, and the
        upload and commit go on in the background.
        """
        if self._checkpointer is None:
            raise UserError("ctx.checkpoint(): the job spec has no checkpoint section")
        self._busy = True  # the save waits for the previous upload's commit
        self._checkpointer.save(step=self.step, epoch=self.epoch, model=self._model, optimizer=self._optimizer,
                                scheduler=self._scheduler, data_state=self._stream.state_dict())
        self._busy = False
        self._saved_step = self.step
        self._last_save_time = time.monotonic()

    def wait_for_checkpoint(self) -> None:
        """Block until the checkpoint in flight, if any, is committed."""
        if self._checkpointer is not None:
            self._busy = True
            try:
                self._checkpointer.wait()
            finally:
                self._busy = False

    def close(self) -> None:
        """Called by the platform after ``train(ctx)`` returns: commit what is in flight, free buffers."""
        self._stop_watchdog()
        if self._checkpointer is not None:
            self._checkpointer.close()
        if self._tb is not None:  # after the last commit: its blocking time is a point too
            self._tensorboard(self._meter.flush())
            self._tb.close()
            self._tb = None
        if self.spec.strategy.kind == "horovod":
            from shipyard.parallel.horovod import shutdown

            shutdown()

    def abandon(self) -> None:
        """Called by the platform when this generation fails: stop the watchdog, let an upload in
        flight end (it cannot commit once a rank is gone) and free buffers, without raising. The
        process group itself is dropped next (``regroup.leave``)."""
        self._stop_watchdog()
        if self._checkpointer is not None:
            self._checkpointer.abandon()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self.spec.strategy.kind == "horovod":
            from shipyard.parallel.horovod import shutdown

            shutdown()

    def _stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None

    def _committed(self, saved: Saved) -> None:
        # Rank 0's upload thread, once COMMIT.json is written.
        r = saved.record
        self._metrics["checkpoint_blocked_s"] = saved.blocked_s
        if self._tb is not None:
            self._tb.add([(r.step, {"checkpoint_blocked_s": saved.blocked_s})])
        self._event(f"checkpoint at step {r.step} committed ({r.bytes / 1e6:.1f} MB; training blocked "
                    f"{saved.blocked_s:.2f}s, committed after {saved.total_s:.2f}s): {r.uri}", checkpoint=r.uri,
                    committed_step=r.step)

    # -- progress -------------------------------------------------------------------------
    def _event(self, message: str, **extra) -> None:
        log.debug(message)
        self._push(force=True, event=message, **extra)

    def _reached(self) -> None:
        if self._board is None:
            return
        import ray

        try:
            ray.get(self._board.reached.remote(self.step), timeout=5)
        except Exception as e:  # failing already; this is only bookkeeping
            log.debug("could not report the step reached: %s", e)

    def _push(self, force: bool = False, event: str | None = None, **extra) -> None:
        if self._board is None or self.rank != 0:
            return
        now = time.monotonic()
        if not force and now - self._last_push < PUSH_INTERVAL_S:
            return
        self._last_push = now
        # list(): the upload thread pushes commit events while the loop may add a metric.
        metrics = {k: _scalar(v) for k, v in list(self._metrics.items())}
        builtins = self._meter.flush()  # after the user's metrics: displays show those first
        metrics.update(builtins)
        if self._tb is not None:
            self._tensorboard(builtins)
        retries = sum(storage.retry_counts().values())
        if retries:
            metrics["s3_retries"] = retries  # transient S3 errors this rank's reads and writes absorbed
        self._board.update.remote(step=self.step, total=self.total_steps, epoch=self.epoch,
                                  samples_per_step=self.spec.dataset.batch_size * self.dp_world,
                                  metrics=metrics, event=event, **extra)

    def _tensorboard(self, aggregates: dict[str, float]) -> None:
        """Hand the event writer this push's rows: per step, the built-in step clock and every
        report; at this step, the rates and GPU memory aggregated since the last push."""
        rows = self._meter.take_steps()
        reported = []
        while self._tb_rows:  # the upload thread's commit event may push at the same time
            try:
                reported.append(self._tb_rows.popleft())
            except IndexError:
                break
        rows += to_floats(reported)
        rates = {k: v for k, v in aggregates.items() if k not in ("step_time_s", "data_wait_s")}
        if rates:
            rows.append((self.step, rates))
        self._tb.add(rows)


def _data_states(states: list[dict]) -> list[dict]:
    """One state per data-parallel rank: tensor/pipeline peers saved the same position."""
    seen, out = set(), []
    for s in states:
        key = (s.get("world"), s.get("rank"))
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


def _to_device(batch: dict, device: torch.device) -> dict:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _scalar(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().float().item() if v.numel() == 1 else v.detach().tolist()
    return v
