"""Pipeline parallelism (``torch.distributed.pipelining``): the model cut into consecutive stages.

Each rank builds the whole model, then keeps only its stage's modules (the others are removed:
top-level ones set to ``None``, blocks deleted from ``model.layers``, which must therefore be a
``ModuleDict`` so the remaining blocks keep their names). The stage is the same class with the
same FQNs as the full model, so its checkpoint holds the full model's keys for its part and DCP
loads it under any other strategy. Cutting by hand at the model's declared split points rather
than tracing (``pipeline()``) keeps arbitrary Python in the forward and needs no example input.

A batch runs as ``microbatches`` microbatches under a 1F1B or GPipe schedule. The schedule, not
the user's loop, runs forward and backward, and the loss exists only on the last stage; so
training goes through :meth:`Pipeline.step` (``ctx.train_step``), which returns the batch's mean
loss on every rank. Gradients are scaled by ``1/microbatches`` by the schedule, so they equal the
gradient of the batch's mean loss. With ``dp = world / stages`` > 1 replicas of the pipeline, the
step averages gradients over dp once the schedule is done (one bucket per step).

A batch of another size (an epoch's last, when the rank's rows are not a multiple of the batch
size) runs too, whole, none of it dropped: the stages' buffers are shaped for one microbatch
size, so it gets a stage and schedule of its own, as many equal microbatches as divide it (at
most ``microbatches``; under 1F1B, when fewer than the stages, GPipe instead). Every rank of a
pipeline reads the same batches, so all of them build the same one at the same step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from shipyard.errors import UserError
from shipyard.parallel.activation_checkpoint import apply_activation_checkpoint
from shipyard.parallel.mesh import device_mesh, parallel_dims
from shipyard.parallel.model import split_points

SCHEDULES = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}


def units(model: nn.Module) -> list[str]:
    """The model's top-level modules in registration (= forward) order, ``layers`` expanded."""
    out = []
    for name, child in model.named_children():
        if name == "layers":
            out += [f"layers.{n}" for n, _ in child.named_children()]
        else:
            out.append(name)
    return out


def keep_stage(model: nn.Module, stage: int, stages: int) -> nn.Module:
    """Remove every module outside ``stage`` from ``model`` (in place); returns the model."""
    layers = getattr(model, "layers", None)
    if layers is not None and not isinstance(layers, nn.ModuleDict):
        raise UserError(f"strategy pipeline: {type(model).__name__}.layers must be an nn.ModuleDict "
                        f"(a stage drops blocks by name; a ModuleList would renumber the rest)")
    order = units(model)
    cuts = [0]
    for point in split_points(model, stages):
        if point not in order:
            raise UserError(f"strategy pipeline: split point {point!r} is no module of {type(model).__name__}; "
                            f"modules in order: {order}")
        cuts.append(order.index(point))
    cuts.append(len(order))
    mine = set(order[cuts[stage]:cuts[stage + 1]])
    for fqn in order:
        if fqn in mine:
            continue
        if fqn.startswith("layers."):
            del layers[fqn.split(".", 1)[1]]
        else:
            setattr(model, fqn, None)
    return model


MAX_SHAPES = 4  # batch sizes with a stage and schedule kept (the full size, an epoch's last)


class Pipeline:
    """One rank's stage and schedules; ``step`` runs a whole batch through the pipeline."""

    def __init__(self, make_stage: Callable[[], PipelineStage], *, stages: int, microbatches: int, schedule: str,
                 pp_group, dp_group, module: nn.Module, device: torch.device):
        self.make_stage, self.stages, self.microbatches = make_stage, stages, microbatches
        self.stage = make_stage()
        self.schedule_cls = SCHEDULES[schedule]
        self.pp_group, self.dp_group, self.module, self.device = pp_group, dp_group, module, device
        self._schedules: dict[int, Any] = {}  # rows per batch -> schedule (insertion order: oldest first)
        self._loss_fn = None

    @property
    def is_first(self) -> bool:
        return self.stage.stage_index == 0

    @property
    def is_last(self) -> bool:
        return self.stage.stage_index == self.stages - 1

    def schedule_for(self, rows: int, loss_fn: Callable):
        """The schedule for a batch of ``rows`` rows (see the module docstring); the first size
        seen keeps the stage made at setup, and stays cached."""
        if loss_fn is not self._loss_fn:
            self._schedules.clear()
            self._loss_fn = loss_fn
        if rows not in self._schedules:
            n = max(d for d in range(1, min(rows, self.microbatches) + 1) if rows % d == 0)
            cls = ScheduleGPipe if self.schedule_cls is Schedule1F1B and n < self.stages else self.schedule_cls
            first = not self._schedules
            if len(self._schedules) >= MAX_SHAPES:
                del self._schedules[list(self._schedules)[1]]  # the oldest after the first
            self._schedules[rows] = cls(self.stage if first else self.make_stage(), n, loss_fn=loss_fn)
        return self._schedules[rows]

    def step(self, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: Callable) -> torch.Tensor:
        schedule = self.schedule_for(inputs.size(0), loss_fn)
        args = (inputs,) if self.is_first else ()
        if self.is_last:
            losses: list[torch.Tensor] = []
            schedule.step(*args, target=targets, losses=losses, return_outputs=False)
            loss = torch.stack([x.detach() for x in losses]).mean()
        else:
            schedule.step(*args, return_outputs=False)
            loss = torch.zeros((), device=self.device)
        dist.broadcast(loss, group=self.pp_group, group_src=self.stages - 1)
        if self.dp_group is not None:
            self._average_gradients()
        return loss

    def _average_gradients(self) -> None:
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.dp_group)
        flat /= dist.get_world_size(self.dp_group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def apply_pipeline(model: nn.Module, device: torch.device, optimizer_fn: Callable[[Any], torch.optim.Optimizer],
                   strategy) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Returns ``(this rank's stage module, optimizer over its parameters)``; the stage module
    carries its :class:`Pipeline` as ``shipyard_pipeline`` for ``ctx.train_step``."""
    dims = parallel_dims(strategy, dist.get_world_size())
    mesh = device_mesh(dims, device)
    stage_index = mesh["pp"].get_local_rank()
    model = keep_stage(model, stage_index, strategy.stages).to(device)
    if strategy.activation_checkpoint:
        apply_activation_checkpoint(model, strategy)
    pp_group = mesh["pp"].get_group()
    model.shipyard_pipeline = Pipeline(lambda: PipelineStage(model, stage_index, strategy.stages, device, group=pp_group),
                                       stages=strategy.stages, microbatches=strategy.microbatches,
                                       schedule=strategy.schedule, pp_group=pp_group,
                                       dp_group=mesh["dp"].get_group() if dims.dp > 1 else None,
                                       module=model, device=device)
    return model, optimizer_fn(model.parameters())
