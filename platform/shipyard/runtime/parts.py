"""The prepared parts of a job: each ``ctx.prepare`` call adds one (model, optimizer, scheduler).

A job with one model prepares it without a name (the unnamed part, saved at the checkpoint
layout of before names existed); a job with several names each (``name="generator"``). The
names are the checkpoint's keys (``parts.<name>.model...``), so they are checked where the user
gives them: a second unnamed part, or a name used twice, would make one model shadow another
in the checkpoint, and is refused at that call.
"""

from __future__ import annotations

import re

from shipyard.checkpoint.dcp import Part
from shipyard.errors import UserError

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
# Strategies under which several parts may be prepared. The others build one structure per job
# around one model: pipeline stages and their schedule (driven by ctx.train_step), a tensor-
# parallel plan over one mesh (not tried with two), Horovod's allreduces named by parameter name
# (two models' "0.weight" would collide). Under custom the user's code builds whatever it builds.
MULTI_PART_STRATEGIES = ("ddp", "fsdp", "custom")


def check_new(parts: list[Part], name: str | None, strategy: str) -> str:
    """The stored name (``""``: unnamed) of a part about to be prepared, or a UserError."""
    if name is not None and not (isinstance(name, str) and NAME.match(name)):
        raise UserError(f"ctx.prepare(name={name!r}): a name is 1-64 letters, digits, '_' or '-', "
                        "starting with a letter or '_'")
    part_name = name or ""
    if not parts:
        return part_name
    if strategy not in MULTI_PART_STRATEGIES:
        raise UserError(f"ctx.prepare(): strategy {strategy} takes one prepared model; several (a GAN's "
                        f"generator and discriminator) work under {' and '.join(MULTI_PART_STRATEGIES)}")
    if any(p.name == part_name for p in parts):
        if not part_name:
            raise UserError("ctx.prepare(): a model is already prepared; name each one so that every one is "
                            "checkpointed: ctx.prepare(model, optimizer_fn, name=\"discriminator\")")
        raise UserError(f"ctx.prepare(name={part_name!r}): a model of that name is already prepared; each name once")
    return part_name


def find(parts: list[Part], name: str | None, method: str) -> Part:
    """The part ``ctx.<method>(name=...)`` means: the only one, else the one of that name
    (``None``: the unnamed one)."""
    if not parts:
        raise UserError(f"call ctx.prepare(model, optimizer_fn) before ctx.{method}()")
    if name is None and len(parts) == 1:
        return parts[0]
    for p in parts:
        if p.name == (name or ""):
            return p
    names = ", ".join(f"name={p.name!r}" if p.name else "the unnamed one" for p in parts)
    raise UserError(f"ctx.{method}(name={name!r}): no such prepared model (there are: {names}); say which")
