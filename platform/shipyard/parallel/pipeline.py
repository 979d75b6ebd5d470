"""Pipeline parallelism (``torch.distributed.pipelining``): the model cut into consecutive stages.

Each rank builds the whole model, then keeps only its stage's modules: every other unit is
replaced by a :class:`PassThrough` (no parameters; returns its first input), in place, so a
``ModuleList`` of blocks is not renumbered. The stage is the same class with the same FQNs as the
full model, so its checkpoint holds the full model's keys for its part and DCP loads it under any
other strategy. Cutting by hand at split points rather than tracing (``pipeline()``) keeps
arbitrary Python in the forward and needs no example input.

The units (:func:`units`), in registration (= forward) order: for shipyard's own models the
top-level modules, ``layers`` expanded into its blocks (a forward of the form ``h = m(h)`` then
runs unchanged on a stage); for a Hugging Face model the modules of its own pipeline plan
(``model.pp_plan``, which transformers declares for the decoders whose forward runs with other
stages' modules replaced: the embedding, each decoder layer, the final norm, ``lm_head``),
everything else (the rotary embedding, which every layer needs) kept on every stage. A Hugging
Face model without such a plan (GPT-2: its forward adds position embeddings to ``inputs_embeds``)
is refused, and so is a model with BatchNorm (its statistics would be per microbatch). Stages begin at :func:`shipyard.parallel.model.split_points` (the model's declared
points, else its blocks: an even split by block count). A parameter that two stages would hold
(tied input/output embeddings split apart) is refused: each stage would train its own copy.

What a stage runs: shipyard's own model, its forward (stage input and output are one tensor). A
Hugging Face model through :class:`HFStage`: the first stage from token ids, the others from the
previous stage's hidden states (``inputs_embeds``); stages before the last return the base
model's last hidden state, the last the head's output (logits), sent between stages as tensors.
The loss function is given on the last stage what the model itself returns, rebuilt from that
tensor (a ``CausalLMOutputWithPast`` with ``logits`` set), so one loss function (e.g. one that
reads ``output.logits``) serves every strategy.

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
from shipyard.parallel import hf_adapter
from shipyard.parallel.activation_checkpoint import apply_activation_checkpoint
from shipyard.parallel.mesh import device_mesh, parallel_dims
from shipyard.parallel.model import blocks, set_block, split_points

SCHEDULES = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}


class PassThrough(nn.Module):
    """Stands where another stage's module was: returns its first input, holds nothing."""

    def forward(self, *args, **kwargs):
        return args[0] if args else next(iter(kwargs.values()))


def units(model: nn.Module) -> list[str]:
    """The modules a stage is cut from, in registration (= forward) order (module docstring)."""
    if hf_adapter.is_hf(model):
        names = hf_adapter.pp_plan(model)
        if not names:
            raise UserError(f"strategy pipeline: the Hugging Face model {type(model).__name__} has no pipeline plan "
                            f"(config.base_model_pp_plan), so its forward is not known to run on one stage with "
                            f"the others' modules removed; use fsdp, tensor or ddp for it")
        position = {n: i for i, (n, _) in enumerate(model.named_modules())}
        missing = [n for n in names if n not in position]
        if missing:
            raise UserError(f"strategy pipeline: {type(model).__name__}'s pipeline plan names {missing}, which it "
                            f"does not have")
        names.sort(key=position.__getitem__)
    else:
        names = [n for n, _ in model.named_children()]
    out = []
    for name in names:
        module = model.get_submodule(name)
        container = isinstance(module, (nn.ModuleList, nn.ModuleDict, nn.Sequential))
        if container and (name == "layers" or hf_adapter.is_hf(model)):
            out += [f"{name}.{n}" for n, _ in module.named_children()]
        else:
            out.append(name)
    return out


BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def stage_bounds(model: nn.Module, stages: int, strategy=None) -> tuple[list[str], list[int]]:
    """``(units, cuts)``: stage ``s`` holds ``units[cuts[s]:cuts[s + 1]]``."""
    norm = next((n for n, m in model.named_modules() if isinstance(m, BATCH_NORMS)), None)
    if norm is not None:
        raise UserError(f"strategy pipeline: {type(model).__name__}.{norm} is a BatchNorm, which under a pipeline "
                        f"would normalise each microbatch by its own statistics and update its running statistics "
                        f"once per microbatch: the model would train differently than under any other strategy; "
                        f"use ddp or fsdp for it")
    order = units(model)
    cuts = [0]
    for point in split_points(model, stages, strategy):
        if point not in order:
            raise UserError(f"strategy pipeline: split point {point!r} is no module of {type(model).__name__}; "
                            f"modules in order: {order}")
        if order.index(point) <= cuts[-1]:
            raise UserError(f"strategy pipeline: split point {point!r} is not after the previous stage's start "
                            f"(a stage must hold at least one module); modules in order: {order}")
        cuts.append(order.index(point))
    cuts.append(len(order))
    _check_one_stage_per_parameter(model, order, cuts)
    return order, cuts


def _check_one_stage_per_parameter(model: nn.Module, order: list[str], cuts: list[int]) -> None:
    owner: dict[int, tuple[int, str]] = {}
    for stage in range(len(cuts) - 1):
        for fqn in order[cuts[stage]:cuts[stage + 1]]:
            for name, p in model.get_submodule(fqn).named_parameters():
                first = owner.setdefault(id(p), (stage, f"{fqn}.{name}"))
                if first[0] != stage:
                    raise UserError(f"strategy pipeline: {first[1]} (stage {first[0]}) and {fqn}.{name} (stage {stage}) "
                                    f"are one parameter (tied weights); stages cannot share it: untie them (e.g. "
                                    f"tie_word_embeddings=False) or use another strategy")
    stray = [n for n, p in model.named_parameters() if id(p) not in owner]
    if stray:
        raise UserError(f"strategy pipeline: {type(model).__name__}'s parameters {stray[:4]} are in none of the "
                        f"modules a stage is cut from ({order}); every stage would train its own copy")


def keep_stage(model: nn.Module, stage: int, stages: int, strategy=None) -> nn.Module:
    """Replace every unit outside ``stage`` with a :class:`PassThrough` (in place); returns the model."""
    order, cuts = stage_bounds(model, stages, strategy)
    mine = set(order[cuts[stage]:cuts[stage + 1]])
    for fqn in order:
        if fqn not in mine:
            set_block(model, fqn, PassThrough())
    return model


class HFStage(nn.Module):
    """One stage of a Hugging Face decoder as ``PipelineStage`` runs it: one tensor in, one out
    (module docstring). Holds the cut model as its child; the model is what the job trains and
    checkpoints, this only routes the stage's input and output."""

    def __init__(self, model: nn.Module, *, is_first: bool, is_last: bool):
        super().__init__()
        self.model, self.is_first, self.is_last = model, is_first, is_last
        self._output: tuple[type, str] | None = None  # (the model's output class, its first field)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kwargs = {"input_ids": x} if self.is_first else {"inputs_embeds": x}
        if not self.is_last:
            return self.model.base_model(**kwargs, use_cache=False).last_hidden_state
        out = self.model(**kwargs, use_cache=False)
        key = next(iter(out.keys()))  # the first field set: logits (no labels, so no loss)
        self._output = (type(out), key)
        return out[key]

    def as_output(self, tensor: torch.Tensor):
        """The last stage's tensor as the model's own output, for the loss function."""
        cls, key = self._output
        return cls(**{key: tensor})


MAX_SHAPES = 4  # batch sizes with a stage and schedule kept (the full size, an epoch's last)


class Pipeline:
    """One rank's stage and schedules; ``step`` runs a whole batch through the pipeline."""

    def __init__(self, make_stage: Callable[[], PipelineStage], *, stages: int, microbatches: int, schedule: str,
                 pp_group, dp_group, module: nn.Module, device: torch.device,
                 output: Callable[[torch.Tensor], Any] | None = None):
        self.make_stage, self.stages, self.microbatches = make_stage, stages, microbatches
        self.output = output  # the last stage's tensor -> what loss_fn is given (HFStage.as_output)
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
            stage_loss = loss_fn if self.output is None else (lambda out, target: loss_fn(self.output(out), target))
            self._schedules[rows] = cls(self.stage if first else self.make_stage(), n, loss_fn=stage_loss)
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
    stage_index, stages = mesh["pp"].get_local_rank(), strategy.stages
    found = blocks(model, strategy) if strategy.activation_checkpoint else []
    model = keep_stage(model, stage_index, stages, strategy).to(device)
    if found:  # the blocks this stage kept (found on the whole model: a cut one may not look uniform)
        apply_activation_checkpoint(model, strategy, found=[(fqn, model.get_submodule(fqn)) for fqn, _ in found
                                                            if not isinstance(model.get_submodule(fqn), PassThrough)])
    runs = HFStage(model, is_first=stage_index == 0, is_last=stage_index == stages - 1) if hf_adapter.is_hf(model) else model
    pp_group = mesh["pp"].get_group()
    model.shipyard_pipeline = Pipeline(lambda: PipelineStage(runs, stage_index, stages, device, group=pp_group),
                                       stages=stages, microbatches=strategy.microbatches,
                                       schedule=strategy.schedule, pp_group=pp_group,
                                       dp_group=mesh["dp"].get_group() if dims.dp > 1 else None,
                                       module=model, device=device,
                                       output=runs.as_output if isinstance(runs, HFStage) else None)
    return model, optimizer_fn(model.parameters())
