"""TrainContext: everything the user's ``train(ctx)`` touches.

The platform owns the parts users get wrong: applying the strategy, restoring model,
optimizer, scheduler, RNG and data position from the latest committed checkpoint (inside
:meth:`TrainContext.prepare`, before the first batch), and checkpointing at step boundaries
(inside :meth:`TrainContext.batches`, between two batches, where the model state and the data
position agree). A user loop cannot forget to resume.

The context is a facade over parts with one owner each (all the training loop's thread):
``checkpointing.py`` (restore, save, wait, free), ``step_agreement.py`` (do all ranks checkpoint
or stop at this step), ``stopping.py`` (``ctx.stop`` and a ``break``: a finished run),
``user_state.py`` (what ``ctx.state`` may hold), ``parts.py`` (the prepared models' names),
``publisher.py`` (rank 0's progress to the board and TensorBoard; the one part rank 0's
checkpoint upload thread enters, to post a commit) and ``watchdog.py``.
"""

from __future__ import annotations

import inspect
import time
import weakref
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from shipyard.checkpoint.dcp import Part
from shipyard.data import ShardStream
from shipyard.errors import UserError
from shipyard.parallel import STRATEGIES
from shipyard.parallel.buffers import dp_group, sync_buffers
from shipyard.parallel.mesh import parallel_dims
from shipyard.runtime import parts, preemption, stopping
from shipyard.runtime.checkpointing import Checkpointing
from shipyard.runtime.meter import StepMeter
from shipyard.runtime.publisher import Position, Publisher
from shipyard.runtime.step_agreement import StepAgreement, max_over_ranks, preempted_message
from shipyard.runtime.tensorboard import EventWriter, log_dir
from shipyard.runtime.watchdog import Watchdog
from shipyard.spec import JobSpec

class TrainContext:
    """What the platform hands to the user's ``train(ctx)``, one per rank (see docs/sdk.md).

    Attributes: ``spec`` (the :class:`~shipyard.spec.JobSpec`), ``config`` (a copy of its
    ``config:`` section), ``rank``, ``world_size``, ``local_rank`` (this rank on its node),
    ``device`` (where batches land: this rank's GPU, or ``cpu``), ``dims`` (the parallel
    dimensions of ``strategy``), ``dp_rank`` and ``dp_world`` (this rank among the data-parallel
    replicas, which is how the data is split), ``step`` (steps taken, counting those before a
    restore) and ``state`` (the user's own values, saved with every checkpoint and restored by the
    first :meth:`prepare`). Users call :meth:`prepare`, :meth:`batches`, :meth:`report` and, as
    needed, the rest; :meth:`close`, :meth:`abandon`, :meth:`finished` and :meth:`reached` are the platform's.
    """

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
        self.state: dict[str, Any] = {}
        self._created = time.monotonic()  # the every_seconds clock starts here
        self._board, self._generation = board, generation  # generation: of the process group (regroup.py)
        self._parts: list[Part] = []
        self._batches_started = False
        self._batches: weakref.ref | None = None  # the generator ctx.batches() handed out
        self._stopped: stopping.Stop | None = None  # this run stopped (ctx.stop, or a break seen at close)
        self._left_at: int | None = None  # the step at which a break left ctx.batches()
        self._finished = None  # the restored record, when it says this run finished before
        self._stop_gather = None  # built in prepare, with its process group
        self._dp_group = None  # buffers are synced over it (parallel/buffers.py); None: the world
        self._stream = ShardStream(
            spec.dataset.uri, batch_size=spec.dataset.batch_size, rank=self.dp_rank, world=self.dp_world,
            seed=spec.dataset.seed, shuffle=spec.dataset.shuffle, epochs=spec.dataset.epochs,
            columns=spec.dataset.columns)
        # Built-in metrics (runtime/meter.py) and, with metrics.tensorboard, rank 0's event files:
        # both fed from local numbers only, sent with the throttled push.
        self._tb_wanted = spec.metrics.tensorboard and rank == 0 and board is not None
        self._accumulate = spec.gradient_accumulation
        self._syncing = True  # this batch ends its step (ctx.sync_gradients)
        self._in_step = 0  # batches of the step now running already taken (0 at a step boundary)
        samples_per_step = spec.dataset.batch_size * self.dp_world * self._accumulate
        meter = StepMeter(samples_per_step=samples_per_step, dp_world=self.dp_world, device=device,
                          tokens_key=spec.metrics.tokens_key, per_step=self._tb_wanted)
        self._progress = Publisher(board, rank=rank, position=self._position, samples_per_step=samples_per_step,
                                   meter=meter, nan_policy=spec.nan_policy)
        self._checkpoints = Checkpointing(spec, self._stream, self._progress)
        self._agreement: StepAgreement | None = None  # built in prepare, with its process group
        self._watchdog: Watchdog | None = None
        self._mesh = None

    @property
    def mesh(self):
        """The job's ``(pp, dp, tp)`` DeviceMesh (dimension names ``pp``, ``dp``, ``tp``; see
        ``parallel/mesh.py``), for a model that parallelizes itself under ``strategy: {kind:
        custom}``: ``fully_shard(block, mesh=ctx.mesh["dp"])``, ``parallelize_module(model,
        ctx.mesh["tp"], plan)``. Built on first use, which is collective: every rank must touch it."""
        if self._mesh is None:
            from shipyard.parallel.mesh import device_mesh

            self._mesh = device_mesh(self.dims, self.device)
        return self._mesh

    @property
    def epoch(self) -> int:
        """The data epoch the stream is in (0-based; restored with the data position)."""
        return self._stream.epoch

    @property
    def is_chief(self) -> bool:
        """Whether this is rank 0, whose :meth:`report` values are the job's metrics (other ranks'
        are not sent): the rank to log, print or write a file of its own from."""
        return self.rank == 0

    @property
    def total_steps(self) -> int:
        """The step at which the run ends: when the data is exhausted, or at ``max_steps``
        (counting steps taken before a restore)."""
        done = self.step - (self._in_step > 0)  # steps whose every batch was taken
        total = done + (self._stream.remaining_batches + self._in_step) // self._accumulate
        return total if self.spec.max_steps is None else min(total, max(self.step, self.spec.max_steps))

    @property
    def sync_gradients(self) -> bool:
        """Whether the batch just yielded is the last of its step, after which the optimizer
        steps. Always true unless the spec sets ``gradient_accumulation`` (see :meth:`no_sync`)."""
        return self._syncing

    def no_sync(self, *, name: str | None = None):
        """A context manager for forward and backward of a batch: while :attr:`sync_gradients`
        is false, gradients accumulate locally and are not reduced across data-parallel ranks
        (DDP's ``no_sync``, FSDP2's ``set_requires_gradient_sync(False)``); on the step's last
        batch it does nothing, so that batch's backward reduces the sum. ``name``: which prepared
        model, when several are."""
        from shipyard.parallel.accumulate import no_sync

        return no_sync(parts.find(self._parts, name, "no_sync").model, skip=self._syncing)

    # -- setup ----------------------------------------------------------------------------
    def prepare(self, model: torch.nn.Module, optimizer_fn: Callable[[Any], torch.optim.Optimizer],
                scheduler_fn: Callable[[torch.optim.Optimizer], Any] | None = None, *, name: str | None = None):
        """Apply the spec's strategy, build the optimizer (and scheduler), restore the latest checkpoint.

        ``optimizer_fn`` receives the parameters of the wrapped model (strategies such as FSDP
        replace them). Returns ``(model, optimizer)``, or ``(model, optimizer, scheduler)``.
        Call it once per model; a job with several models (a GAN's generator and discriminator)
        names each: ``ctx.prepare(G, opt_fn, name="generator")``. Every part is checkpointed and
        restored under its name; the first call also restores the step, data position and
        ``ctx.state``.
        """
        part_name = self._check_part(name)
        model, optimizer = STRATEGIES[self.spec.strategy.kind](model, self.device, optimizer_fn, self.spec.strategy)
        scheduler = scheduler_fn(optimizer) if scheduler_fn else None
        part = Part(part_name, model, optimizer, scheduler)
        first = not self._parts
        self._parts.append(part)
        ck = self.spec.checkpoint
        if first and ck is not None:
            # The agreement's group first, then the Checkpointer's: every rank makes groups in one order.
            self._agreement = StepAgreement(rank=self.rank, every_steps=ck.every_steps, every_seconds=ck.every_seconds,
                                            reduce=max_over_ranks(dist.new_group(backend="gloo")), since=self._created)
        restored = self._checkpoints.add(part)
        if first:
            self._stop_gather = self._stop_group()
            if self.world_size > 1 and self.dims.dp > 1 and dist.is_initialized():
                self._dp_group = dp_group(self.dims)
        if restored is not None:
            record, state = restored
            self.step = record.step
            self.state.clear()
            self.state.update(state)
            self._agreement.restored(record.step)
            self._progress.event(f"restored from checkpoint at step {record.step} ({record.uri})",
                                 checkpoint=record.uri)
            if record.finished is not None and not stopping.extends(record, self.spec.dataset.epochs):
                self._finished = record
        if first:
            self._started()
        return (model, optimizer) if scheduler is None else (model, optimizer, scheduler)

    def _check_part(self, name: str | None) -> str:
        if self._batches_started:
            raise UserError("ctx.prepare() after ctx.batches() began: prepare every model before the loop")
        return parts.check_new(self._parts, name, self.spec.strategy.kind)

    def _stop_group(self):
        """The gather with which ranks agree on a stop (stopping.py): a gloo group of its own,
        whose timeout is how long a rank waits for the others to stop too."""
        if self.world_size <= 1 or not dist.is_initialized():
            return None
        timeout = self.spec.stall_timeout_s or stopping.DEFAULT_AGREE_TIMEOUT_S
        group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
        return stopping.gatherer(group, self.world_size, timeout)

    def _started(self) -> None:
        if self._tb_wanted:
            self._progress.open_tensorboard(EventWriter(log_dir(self.spec), resumed_step=self.step))
        self._progress.push(force=True, event="started")
        if self._board is not None and (self.spec.stall_timeout_s or self._generation is not None):
            self._watchdog = Watchdog(self._board, self.rank, self.spec.stall_timeout_s, step=lambda: self.step,
                                      busy=lambda: self._checkpoints.busy, generation=self._generation)
            self._watchdog.start()

    # -- the loop -------------------------------------------------------------------------
    def batches(self) -> Iterator[dict]:
        """This rank's batches (dicts of tensors on ``ctx.device``) from the restored position on.

        Checkpoints are taken here, between batches, when the spec's trigger is due, and once
        more when the data is exhausted. A ``break`` out of the loop stops the run (as
        :meth:`stop` does, at :meth:`close`). A run whose checkpoint says it finished yields nothing.
        """
        if not self._parts:
            raise UserError("call ctx.prepare(model, optimizer_fn) before ctx.batches()")
        gen = self._batches_from_here()
        self._batches = weakref.ref(gen)
        return gen

    def _batches_from_here(self) -> Iterator[dict]:
        self._batches_started = True
        if self._finished is not None:
            r = self._finished
            self._progress.event(f"already finished: stopped at step {r.step} ({r.finished['reason']}); "
                                 f"nothing to train (dataset.epochs above {r.finished['epochs']} goes on)")
            self._stop_watchdog()
            return
        self._checkpoints.restore_rng()  # here, not in prepare: building a second model draws random numbers
        it = iter(self._stream)
        first = self.step + 1
        try:
            while self._stopped is None:
                if self.step == first:
                    self._progress.push(force=True)  # this attempt's first step is done: its recovery time
                self._step_boundary()
                self._progress.meter.boundary(self.step, time.perf_counter())
                self._progress.push()  # throttled: built-in metrics flow even when the user never reports
                if self.step >= self.total_steps:  # the data is exhausted (a last step short of its
                    if self._stream.remaining_batches == 0:  # batches is dropped), or max_steps
                        next(it, None)  # the stream moves past its last epoch, as a checkpoint records it
                    break
                self.step += 1
                for k in range(self._accumulate):  # the step's batches; checkpoints fall between steps only
                    waited = time.perf_counter()
                    batch = next(it)  # never exhausted here: total_steps counted whole steps
                    self._progress.meter.fetched(batch, time.perf_counter() - waited)
                    self._in_step, self._syncing = (k + 1) % self._accumulate, k == self._accumulate - 1
                    yield _to_device(batch, self.device)
        except GeneratorExit:
            # A break (or an exception unwinding the user's loop): only close() can tell which, as
            # the platform calls it only after train(ctx) returned. Nothing collective here.
            if self._stopped is None:
                self._left_at = self.step
            self._stop_watchdog()
            raise
        if self._checkpoints.enabled and self._checkpoints.saved_step != self.step:
            self.checkpoint()
        self.wait_for_checkpoint()
        self._stop_watchdog()  # what the user does after the last batch (evaluation) has no steps
        self._progress.push(force=True)

    def eval_batches(self, batch_size: int | None = None) -> Iterator[dict]:
        """This rank's share of ``dataset.eval_uri``: every row once across ranks, file order.

        Collective: every rank calls it, at the same point. The call itself (before the first
        batch) makes the prepared models' buffers (BatchNorm running statistics) those of
        data-parallel rank 0, so every rank scores its share with the same model.
        """
        uri = self.spec.dataset.eval_uri
        if not uri:
            raise UserError("ctx.eval_batches(): dataset.eval_uri is not set in the job spec")
        self.sync_buffers()
        stream = ShardStream(uri, batch_size=batch_size or self.spec.dataset.batch_size, rank=self.dp_rank,
                             world=self.dp_world, shuffle=False, drop_remainder=False,
                             columns=self.spec.dataset.columns)
        return (_to_device(batch, self.device) for batch in stream)

    def sync_buffers(self) -> None:
        """Make every prepared model's buffers those of data-parallel rank 0 (collective; see
        ``parallel/buffers.py`` for why a broadcast). Done for you before every checkpoint and by
        :meth:`eval_batches`; free for a model without buffers."""
        if self.world_size <= 1 or self.dims.dp <= 1 or not dist.is_initialized():
            return
        for part in self._parts:
            sync_buffers(part.model, self._dp_group)

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor,
                   loss_fn: Callable[[Any, torch.Tensor], torch.Tensor], *, name: str | None = None) -> torch.Tensor:
        """Forward and backward of one batch under any strategy; returns the loss, detached.

        ``loss_fn(model(inputs), targets)`` must be a mean over the batch. Under ``pipeline`` the
        model is cut into stages and a schedule runs the batch as microbatches through them: there
        the schedule runs forward and backward, and the returned loss (the mean over microbatches,
        sent from the last stage) is the same on every rank of a pipeline; ``loss_fn`` gets the last
        stage's output (a Hugging Face model's rebuilt as its own output class with the logits, so
        ``output.logits`` works under every strategy). Elsewhere this is
        ``loss = loss_fn(model(inputs), targets); loss.backward()``. The loss is this data-parallel
        rank's; the optimizer step (and ``clip_grad_norm_`` before it) stays in the user's loop.
        ``name``: which prepared model, when several are.
        """
        model = parts.find(self._parts, name, "train_step").model
        pipeline = getattr(model, "shipyard_pipeline", None)
        if pipeline is not None:
            return pipeline.step(inputs, targets, loss_fn)
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        return loss.detach()

    def clip_grad_norm_(self, max_norm: float, *, name: str | None = None) -> torch.Tensor:
        """Clip the gradients of the prepared model to a global 2-norm of ``max_norm`` (collective).

        The norm is the whole model's under every strategy (FSDP/TP shards, pipeline stages; see
        ``parallel/clip.py``); returns it (before clipping), equal on every rank. Call it after
        backward (``ctx.train_step``) and before ``optimizer.step()``. ``name``: which prepared
        model, when several are.
        """
        from shipyard.parallel.clip import clip_grad_norm_

        part = parts.find(self._parts, name, "clip_grad_norm_")
        if self.spec.strategy.kind == "horovod":
            # Horovod averages gradients inside optimizer.step(); clip what it averaged. Its step
            # then averages the (already equal) clipped gradients once more, with a warning.
            part.optimizer.synchronize()
        pipeline = getattr(part.model, "shipyard_pipeline", None)
        return clip_grad_norm_(part.model.parameters(), max_norm,
                               pp_group=pipeline.pp_group if pipeline is not None else None)

    def report(self, **metrics: Any) -> None:
        """Record metrics for this step (tensors are fine: they are read only when sent)."""
        self._progress.report(self.step, metrics)

    # -- checkpoints ----------------------------------------------------------------------
    def _step_boundary(self) -> None:
        """Between two batches: checkpoint when due; stop here when any rank got SIGTERM (every
        rank decides the same, see step_agreement.py)."""
        if self._agreement is None:
            return
        decision = self._agreement.decide(self.step, saved_step=self._checkpoints.saved_step)
        if decision.checkpoint:
            self.checkpoint()
        if decision.preempted:
            self.wait_for_checkpoint()
            message = preempted_message(decision.noticed, self.step)
            self._progress.event(message)
            raise preemption.Preempted(message)

    def checkpoint(self) -> None:
        """Save a checkpoint now (collective: every rank must call it at the same step).

        With ``checkpoint.async_upload`` (the default) this returns once the model is copied to
        CPU memory; the optimizer state is copied before the next ``optimizer.step``, and the
        upload and commit go on in the background.
        """
        if not self._checkpoints.started:
            raise UserError("ctx.checkpoint(): the job spec has no checkpoint section")
        self.sync_buffers()  # one copy is saved; it must be the one every rank continues from
        self._checkpoints.save(self.step, self.state)
        self._agreement.saved()

    def stop(self, reason: str = "ctx.stop()") -> None:
        """Stop the run for good at this step (collective: every rank calls it at the same step).

        Checkpoints now, marked finished with ``reason`` (early stopping, a target reached), and
        waits for the commit; ``ctx.batches()`` then yields no more batches. Running the job again
        reports that it finished and trains nothing, unless its ``dataset.epochs`` is larger (see
        docs/sdk.md). A ``break`` out of ``ctx.batches()`` stops the same way, at :meth:`close`.
        """
        if not self._parts:
            raise UserError("call ctx.prepare(model, optimizer_fn) before ctx.stop()")
        if self._stopped is None:
            self._stop_now(stopping.reason_of(reason))

    def _stop_now(self, reason: str) -> None:
        stop = stopping.Stop(self.step, reason)
        if self._stop_gather is not None:
            stop = stopping.check(self._stop_gather(stop))  # collective: every rank's stop, judged
        self._stopped = stop
        if self._checkpoints.started:
            self.sync_buffers()  # as before every checkpoint
            self._checkpoints.stop(self.step, self.state, stopping.finished_record(stop, self.spec.dataset.epochs))
            self._agreement.saved()
            self.wait_for_checkpoint()
            self._progress.event(f"stopped at step {stop.step} ({stop.reason}): checkpoint committed, marked finished")
        else:
            self._progress.event(f"stopped at step {stop.step} ({stop.reason}); no checkpoint section, nothing saved")

    def wait_for_checkpoint(self) -> None:
        """Block until the checkpoint in flight, if any, is committed."""
        self._checkpoints.wait()

    def close(self) -> None:
        """Called by the platform after ``train(ctx)`` returns: stop the run if a ``break`` left
        ``ctx.batches()`` early, commit what is in flight, free buffers."""
        gen = self._batches() if self._batches is not None else None
        if gen is not None and inspect.getgeneratorstate(gen) == inspect.GEN_SUSPENDED:
            gen.close()  # still held by the user's code: a break that has not closed it yet
        if self._left_at is not None and self._stopped is None:
            self._stop_now(f"break out of ctx.batches() after step {self._left_at}")
        self._stop_watchdog()
        self._checkpoints.close()
        self._progress.close(flush=True)  # after the last commit: its blocking time is a point too
        if self.spec.strategy.kind == "horovod":
            from shipyard.parallel.horovod import shutdown

            shutdown()

    def abandon(self) -> None:
        """Called by the platform when this generation fails: stop the watchdog, let an upload in
        flight end (it cannot commit once a rank is gone) and free buffers, without raising. The
        process group itself is dropped next (``regroup.leave``)."""
        self._stop_watchdog()
        self._checkpoints.abandon()
        self._progress.close(flush=False)
        if self.spec.strategy.kind == "horovod":
            from shipyard.parallel.horovod import shutdown

            shutdown()

    def _stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None

    def finished(self) -> None:
        """Called by the platform after :meth:`close`: tells the board the attempt finished."""
        self._progress.finished()

    def reached(self) -> None:
        """Called by the platform on any rank whose generation fails, before :meth:`abandon`: the
        step this rank got to (rank 0's progress reports are up to a second old)."""
        self._progress.reached(self.step)

    def _position(self) -> Position:
        return Position(self.step, self.total_steps, self.epoch)


def _to_device(batch: dict, device: torch.device) -> dict:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
