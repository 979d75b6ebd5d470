"""The JobSpec: the one contract between the user, the CLI/API, backends and the runtime.

A spec is loaded from YAML (:func:`load_spec`), validated once, and frozen; everything after
trusts it. Validation errors are turned into :class:`~shipyard.errors.SpecError` messages that
name the field path (``workers.count``), the value given and what is allowed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shipyard.errors import SpecError

_ENTRYPOINT = re.compile(r"^(?P<target>[\w./-]+\.py|[A-Za-z_][\w.]*):(?P<func>[A-Za-z_]\w*)$")
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
RESERVED_ENV_PREFIXES = ("SHIPYARD_", "RAY_")
MAX_CONFIG_BYTES = 65_536


class _Model(BaseModel):
    # Every number finite (a NaN CPU count would poison every scheduler tick), every string capped.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, str_max_length=4096)


_URI = 2048          # characters in a dataset/checkpoint/TensorBoard URI
_DAY = 86_400.0


_QUANTITY = re.compile(r"^(?P<n>\d+(\.\d+)?)(?P<unit>|k|M|G|T|Ki|Mi|Gi|Ti)$")
_MAX_MEMORY = 64 * 2**40
_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


class Workers(_Model):
    """A fixed gang (``count``) or an elastic range (``min``..``max``): an elastic job starts with as
    many workers as fit, up to ``max``, and after a lost worker or node goes on with as few as
    ``min`` instead of waiting; it grows back when capacity returns. Each change of size resumes from
    a checkpoint and the data stream repartitions exactly, so no sample is skipped or repeated."""

    count: int = Field(2, ge=1, le=4096, description="number of training processes (ranks); the most, for an elastic job")
    cpus: float = Field(1.0, ge=0.01, le=1024, description="CPUs reserved per worker (quotas count each "
                                                           "worker's CPUs rounded up to a whole CPU)")
    gpus: float = Field(0.0, ge=0, le=64, description="GPUs per worker; > 0 selects CUDA + NCCL")
    memory: str | None = Field(None, max_length=32, description="memory per worker, a Kubernetes quantity such as 8Gi or 512M; "
                                                 "reserved in Ray and requested from Kubernetes")
    pool: str | None = Field(None, max_length=63, description="node pool for the workers on Kubernetes (a name from the server's config)")
    min: int | None = Field(None, ge=1, le=4096, description="elastic: the fewest workers the job runs with")
    max: int | None = Field(None, ge=1, le=4096, description="elastic: the most workers (sets workers.count)")
    resize_interval_s: float = Field(60.0, ge=1, le=_DAY, description="elastic: how often a running job checks whether "
                                                             "more workers fit (growing costs a checkpoint and a restart)")

    @model_validator(mode="before")
    @classmethod
    def _range(cls, data: Any) -> Any:
        if not isinstance(data, dict) or (data.get("min") is None and data.get("max") is None):
            return data
        if data.get("min") is None or data.get("max") is None:
            raise ValueError("an elastic range needs both min and max, e.g. workers: {min: 2, max: 4}")
        if data.get("count") is not None and data["count"] != data["max"]:
            raise ValueError("give a fixed count or an elastic min/max range, not both")
        return {**data, "count": data["max"]}

    @model_validator(mode="after")
    def _min_le_max(self) -> "Workers":
        if self.min is not None and self.min > self.count:
            raise ValueError(f"min ({self.min}) is more than max ({self.count})")
        return self

    @property
    def elastic(self) -> bool:
        return self.min is not None and self.min < self.count

    @property
    def fewest(self) -> int:
        """The smallest world the job may run at (``count`` unless elastic)."""
        return self.min if self.elastic else self.count

    @field_validator("memory")
    @classmethod
    def _memory(cls, v: str | None) -> str | None:
        if v is None:
            return v
        m = _QUANTITY.match(v)
        if not m:
            raise ValueError("must be a quantity such as 8Gi, 512Mi, 4G or a number of bytes")
        if float(m["n"]) * _UNITS[m["unit"]] > _MAX_MEMORY:
            raise ValueError("must be at most 64Ti per worker")
        return v

    @property
    def memory_bytes(self) -> int:
        """``memory`` in bytes (0 when not set)."""
        if self.memory is None:
            return 0
        m = _QUANTITY.match(self.memory)
        return int(float(m["n"]) * _UNITS[m["unit"]])


def _blocks_field():
    return Field(None, max_length=256, pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$",
                 description="dotted path to the model's repeated blocks (FSDP and activation-checkpoint units: a "
                             "ModuleList/ModuleDict/Sequential, e.g. model.layers); default: found automatically "
                             "(model.layers, a Hugging Face model's _no_split_modules layers, layer1..layerN)")


class DDPStrategy(_Model):
    """Data parallel: every rank holds the whole model, gradients are averaged (PyTorch DDP)."""

    kind: Literal["ddp"] = "ddp"
    sync_batchnorm: bool = Field(False, description="convert BatchNorm layers to SyncBatchNorm (statistics over "
                                                    "the global batch, not each rank's); GPU workers only: "
                                                    "torch's SyncBatchNorm does not run on CPU")


class HorovodStrategy(_Model):
    """Data parallel through Horovod (Gloo on CPU, NCCL on GPU), on the same Ray workers."""

    kind: Literal["horovod"] = "horovod"


class FSDPStrategy(_Model):
    """Fully sharded data parallel (FSDP2 ``fully_shard``): parameters, gradients and optimizer
    state are split across all workers; each block's parameters are gathered just for its use."""

    kind: Literal["fsdp"] = "fsdp"
    reshard_after_forward: bool = Field(True, description="free gathered parameters after forward "
                                                          "(less memory, one more all-gather in backward)")
    mixed_precision: Literal["bf16", "none"] = Field("bf16", description="compute dtype on GPU "
                                                     "(gradients reduced in fp32); CPU always runs fp32")
    activation_checkpoint: bool = Field(False, description="recompute each block's activations in backward")
    blocks: str | None = _blocks_field()


class TensorStrategy(_Model):
    """Tensor parallel (DTensor): each block's matmuls are split across ``tp`` workers with the
    model's TP plan; groups of ``tp`` workers form data-parallel replicas."""

    kind: Literal["tensor"] = "tensor"
    tp: int = Field(2, ge=1, le=4096, description="workers that split each layer; workers.count must be a multiple")
    activation_checkpoint: bool = Field(False, description="recompute each block's activations in backward")
    blocks: str | None = _blocks_field()


class PipelineStrategy(_Model):
    """Pipeline parallel (torch.distributed.pipelining): the model is cut into ``stages``
    consecutive stages at its declared split points, else between its repeated blocks (evenly by
    block count); each batch runs as ``microbatches`` microbatches."""

    kind: Literal["pipeline"] = "pipeline"
    stages: int = Field(2, ge=2, le=4096, description="pipeline stages; workers.count must be a multiple")
    microbatches: int = Field(4, ge=1, le=4096, description="microbatches per batch; must divide dataset.batch_size")
    schedule: Literal["1f1b", "gpipe"] = Field("1f1b", description="1f1b (less activation memory) or gpipe")
    activation_checkpoint: bool = Field(False, description="recompute each block's activations in backward")
    blocks: str | None = _blocks_field()


class HybridStrategy(_Model):
    """FSDP x TP on a 2-D mesh: ``tp`` workers split each layer, ``dp_shard`` groups shard the rest."""

    kind: Literal["hybrid"] = "hybrid"
    tp: int = Field(2, ge=1, le=4096, description="tensor-parallel degree (inner mesh dimension)")
    dp_shard: int | None = Field(None, ge=1, le=4096, description="FSDP degree (outer); default workers.count / tp")
    mixed_precision: Literal["bf16", "none"] = Field("bf16", description="compute dtype on GPU; CPU always runs fp32")
    activation_checkpoint: bool = Field(False, description="recompute each block's activations in backward")
    blocks: str | None = _blocks_field()


class CustomStrategy(_Model):
    """Your own parallelism: shipyard applies nothing. ``train(ctx)`` gets ``ctx.mesh`` (the
    ``(pp, dp, tp)`` DeviceMesh) and wraps the model itself (e.g. torchtitan's
    ``parallelize_llama``, or ``fully_shard`` by hand) before ``ctx.prepare``, which then only builds
    the optimizer and restores; data is split over ``dp``, checkpoints go through DCP."""

    kind: Literal["custom"] = "custom"
    tp: int = Field(1, ge=1, le=4096, description="size of the mesh's tp dimension (ranks that read the same batches)")
    pp: int = Field(1, ge=1, le=4096, description="size of the mesh's pp dimension (ranks that read the same batches)")


# Strategies whose only mesh dimension is data parallel, so any world size works.
ELASTIC_STRATEGIES = ("ddp", "horovod", "fsdp")

Strategy = (DDPStrategy | HorovodStrategy | FSDPStrategy | TensorStrategy | PipelineStrategy | HybridStrategy
            | CustomStrategy)


class ColumnSpec(_Model):
    """How one dataset column reaches the batch: its tensor dtype and its batch key."""

    dtype: Literal["float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"] | None = Field(
        None, description="cast the column's tensor to this dtype; null keeps the default rule")
    rename: str | None = Field(None, min_length=1, max_length=256, description="the batch key for this column; default its name")


class Dataset(_Model):
    uri: str = Field(max_length=_URI, description="directory holding a shard manifest, written by `shipyard data shard`")
    eval_uri: str | None = Field(None, max_length=_URI, description="optional held-out dataset for ctx.eval_batches()")
    format: Literal["auto", "arrow", "parquet"] = Field("auto", description="shard format; auto: as the manifest says")
    batch_size: int = Field(32, ge=1, le=1 << 20, description="rows per batch on each rank")
    shuffle: bool = Field(True, description="shuffle the shard order and the rows in each shard, anew each epoch; false reads in file order")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="shuffle seed; the order is a pure function of (seed, epoch, world)")
    epochs: int = Field(1, ge=1, le=1_000_000, description="passes over the dataset; the job's total steps are its batches per epoch times this")
    columns: dict[str, ColumnSpec] | None = Field(
        None, max_length=1024,
        description="when set, only these columns are read and yielded, each cast to its `dtype` (float32, "
                    "float64, float16, bfloat16, int64, int32, int16, int8, uint8, bool) and keyed by its `rename`; "
                    "a column the dataset lacks fails before training. Default: every column, as Arrow's type maps to torch (float64 -> torch.float64, "
                    "float32 -> float32, int64 -> int64, bool -> bool, fixed-size lists -> 2-D tensors of the "
                    "element type), and a run logs once which columns arrive as float64; e.g. `{x: {dtype: float32}}` "
                    "to train on float32")

    @field_validator("columns")
    @classmethod
    def _column_names(cls, v: dict | None) -> dict | None:
        if v is None:
            return v
        if not v:
            raise ValueError("is empty; list at least one column, or leave dataset.columns out to read every column")
        for name in v:
            if not 1 <= len(name) <= 256:
                raise ValueError(f"column name {name[:40]!r}... must be 1 to 256 characters")
        keys = [c.rename or n for n, c in v.items()]
        if dup := sorted({k for k in keys if keys.count(k) > 1}):
            raise ValueError(f"two columns share the batch key {dup[0]!r}; give each a distinct rename")
        return v


class Checkpoint(_Model):
    uri: str = Field(max_length=_URI, description="where checkpoints go: s3://bucket/prefix, file://, or a path")
    every_steps: int | None = Field(None, ge=1, le=10**9, description="checkpoint every this many steps; 100 when neither this nor every_seconds is set")
    every_seconds: float | None = Field(None, ge=1, le=7 * _DAY, description="checkpoint at a step boundary once this many seconds have passed since the last one")
    keep_last: int | None = Field(3, ge=1, le=10_000, description="committed checkpoints to keep; null keeps all")
    async_upload: bool = Field(True, description="upload in the background; training waits only for a copy to CPU memory")
    preemption_grace_s: float = Field(30.0, gt=0, le=3600, description="after SIGTERM to a worker, seconds to commit a checkpoint before exiting")
    line: str | None = Field(None, pattern=r"^fresh-\d{8}-\d{6}$", description="a fresh line of checkpoints under uri (set by `run --fresh` / `submit --fresh`): the job starts at step 0 there, the older checkpoints are kept, and later runs of the same uri follow the newest line")


class Metrics(_Model):
    """What the platform records besides ``ctx.report``; built-in metrics are always measured."""

    tensorboard: bool = Field(False, description="rank 0 also writes TensorBoard event files: every reported "
                                                 "metric and the built-ins, one point per step")
    tensorboard_dir: str | None = Field(None, max_length=_URI, description="where event files go: a local path (relative to the spec "
                                                          "file) or file://; default <SHIPYARD_HOME>/tensorboard/<name> "
                                                          "on rank 0's node")
    tokens_key: str | None = Field(None, max_length=128, description="batch key whose element count is a step's tokens (tokens_per_s); "
                                                     "default: the first 2-D integer tensor in the batch")

    @field_validator("tensorboard_dir")
    @classmethod
    def _local_dir(cls, v: str | None, info) -> str | None:
        if v is None:
            return v
        if is_remote_uri(v):
            raise ValueError("must be a local path or file://; TensorBoard event files cannot be written to "
                             "object storage yet (write them to a mounted volume)")
        if not info.data.get("tensorboard"):
            raise ValueError("is set but metrics.tensorboard is false; set metrics.tensorboard: true")
        return v


class JobSpec(_Model):
    name: str = Field(description="lower-case letters, digits and '-', at most 63 characters")
    entrypoint: str = Field(max_length=512, description="`file.py:function` (relative to workdir) or `module:function`")
    workdir: str = Field(".", description="directory shipped to the workers; relative to the spec file")
    package: str | None = Field(None, pattern=r"^sha256:[0-9a-f]{64}$",
                                description="the uploaded code package (set by `shipyard submit`, which packs workdir)")
    workers: Workers = Field(Workers(), description="how many training processes (ranks) and what each one reserves")
    strategy: Strategy = Field(DDPStrategy(), discriminator="kind", description="how the model is split across the workers")
    image: str | None = Field(None, max_length=512, description="worker container image on Kubernetes (default: the server's)")
    priority: int = Field(0, ge=-1000, le=1000, description="queue priority; higher runs first and may preempt lower")
    dataset: Dataset = Field(description="the shards the job trains on (and evaluates on)")
    checkpoint: Checkpoint | None = Field(None, description="where and how often to checkpoint; null: no checkpoints, so a restart begins at step 0")
    metrics: Metrics = Field(Metrics(), description="what the platform records besides ctx.report")
    max_steps: int | None = Field(None, ge=1, le=10**12, description="end the run at this step even if the data goes on (a run of the same spec that reached it trains nothing more; a larger max_steps goes on)")
    gradient_accumulation: int = Field(1, ge=1, le=4096, description="batches per step: ctx.batches() yields this many batches for each step, ctx.sync_gradients is true on the last one (step the optimizer then), and checkpoints fall between steps only; a last step short of its batches is dropped")
    max_failures: int = Field(0, ge=-1, le=10_000, description="failed attempts allowed before the job fails (preemptions do not count); -1 = unlimited")
    retry_repeated_errors: bool = Field(False, description="retry an attempt that failed with the same error at the same step as the attempt before it (false: such a failure is deterministic and ends the job at once, whatever max_failures allows)")
    nan_policy: Literal["fail", "warn", "ignore"] = Field("fail", description="a reported metric (the loss included) that is NaN or infinite: fail the attempt naming the metric and step; warn once per metric and train on; or ignore it")
    restart_in_place: bool = Field(True, description="after a lost rank, start a new process for it alone; the other ranks rejoin in their own processes and run train(ctx) again from the last checkpoint (false: restart every rank; elastic and horovod jobs always do)")
    stall_timeout_s: float | None = Field(600.0, ge=1, le=7 * _DAY, description="a rank that finishes no step for this long fails the attempt (it restarts from the last checkpoint); null turns detection off")
    env: dict[str, str] = Field(default_factory=dict, max_length=256,
                                description="environment variables for the workers (names SHIPYARD_* and RAY_* are the "
                                            "platform's and refused)")
    config: dict[str, Any] = Field(default_factory=dict, description="free-form values handed to train(ctx) as ctx.config")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("must be lower-case letters, digits and '-', starting and ending with a letter or digit, at most 63 characters")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if not _ENV_NAME.match(key):
                raise ValueError(f"{key[:80]!r} is not a variable name (letters, digits and '_', at most 128)")
            if key.startswith(RESERVED_ENV_PREFIXES):
                raise ValueError(f"{key} is set by the platform; names starting with "
                                 f"{' or '.join(RESERVED_ENV_PREFIXES)} are reserved")
        return v

    @field_validator("config")
    @classmethod
    def _config_size(cls, v: dict[str, Any]) -> dict[str, Any]:
        import json

        try:
            n = len(json.dumps(v))
        except (TypeError, ValueError):
            raise ValueError("must hold only JSON values (strings, finite numbers, booleans, lists, mappings)") from None
        if n > MAX_CONFIG_BYTES:
            raise ValueError(f"is {n} bytes as JSON; at most {MAX_CONFIG_BYTES}")
        return v

    @field_validator("entrypoint")
    @classmethod
    def _entrypoint(cls, v: str) -> str:
        if not _ENTRYPOINT.match(v):
            raise ValueError("must be `file.py:function` or `module:function`")
        return v

    @model_validator(mode="after")
    def _checkpoint_trigger(self) -> "JobSpec":
        ck = self.checkpoint
        if ck is not None and ck.every_steps is None and ck.every_seconds is None:
            return self.model_copy(update={"checkpoint": ck.model_copy(update={"every_steps": 100})})
        return self

    @model_validator(mode="after")
    def _strategy_fits_workers(self) -> "JobSpec":
        """The device mesh is cut from ``workers.count``; a strategy that does not divide it fails here."""
        from shipyard.parallel.mesh import MeshError, parallel_dims

        if self.workers.elastic and self.checkpoint is None:
            raise ValueError("workers.min: an elastic job resumes from a checkpoint whenever its size changes; "
                             "add a checkpoint section (checkpoint: {uri: ...}) or give a fixed workers.count")
        if self.workers.elastic and self.strategy.kind not in ELASTIC_STRATEGIES:
            raise ValueError(f"workers.min: strategy {self.strategy.kind!r} cuts a fixed device mesh from "
                             f"workers.count and cannot change size; elastic ranges work with "
                             f"{', '.join(ELASTIC_STRATEGIES)} (or give a fixed workers.count)")
        try:
            parallel_dims(self.strategy, self.workers.count)
        except MeshError as e:
            raise ValueError(f"strategy.{e.field}: {e}") from None
        s = self.strategy
        if isinstance(s, PipelineStrategy) and self.dataset.batch_size % s.microbatches:
            raise ValueError(f"strategy.microbatches: {s.microbatches} microbatches must divide "
                             f"dataset.batch_size ({self.dataset.batch_size})")
        if isinstance(s, PipelineStrategy) and s.schedule == "1f1b" and s.microbatches < s.stages:
            raise ValueError(f"strategy.microbatches: schedule 1f1b needs at least one microbatch per stage "
                             f"({s.stages}), got {s.microbatches}")
        return self

    @property
    def entry_target(self) -> str:
        return self.entrypoint.rsplit(":", 1)[0]

    @property
    def entry_function(self) -> str:
        return self.entrypoint.rsplit(":", 1)[1]


# ---------------------------------------------------------------------------------------------
# Loading and error messages

def is_remote_uri(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def _resolve_path(value: str, base: Path) -> str:
    """Local paths become absolute (relative ones against the spec file); URIs are kept."""
    if "://" in value:
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _resolve_loc(loc: tuple) -> tuple[tuple, type[BaseModel] | None]:
    """Walk an error location through the spec's models. Drops the tag pydantic inserts for a
    discriminated union (``strategy.tensor.tp`` -> ``strategy.tp``); returns the cleaned location
    and the model holding its last part (None when it is not inside a model)."""
    cur: Any = JobSpec
    out: list = []
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        out.append(part)
        field = getattr(cur, "model_fields", {}).get(part) if isinstance(part, str) else None
        if field is None or not parts:
            break
        models = [a for a in (getattr(field.annotation, "__args__", None) or (field.annotation,))
                  if isinstance(a, type) and issubclass(a, BaseModel)]
        by_tag = {m.model_fields["kind"].default: m for m in models if "kind" in m.model_fields}
        if len(models) > 1 and parts[0] in by_tag:
            cur = by_tag[parts.pop(0)]
        else:
            cur = models[0] if models else None
    return tuple(out), cur


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        raw_loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        loc, _ = _resolve_loc(raw_loc)
        path = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            _, holder = _resolve_loc(raw_loc[:-1] + ("?",)) if len(raw_loc) > 1 else (None, JobSpec)
            allowed = list(holder.model_fields) if isinstance(holder, type) and issubclass(holder, BaseModel) else None
            hint = f"; allowed: {', '.join(allowed)}" if allowed else ""
            lines.append(f"{source}: {path}: unknown field{hint}")
        elif e["type"] == "missing":
            lines.append(f"{source}: {path}: required field is missing")
        elif e["type"] in ("union_tag_invalid", "union_tag_not_found"):
            tags = e.get("ctx", {}).get("expected_tags", "")
            got = e["input"].get("kind") if isinstance(e["input"], dict) else e["input"]
            lines.append(f"{source}: {path}.kind: got {got!r}; input should be one of {tags}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if not loc:  # a check across fields (JobSpec's model validators): msg names the field
                lines.append(f"{source}: {msg}")
                continue
            got = repr(e["input"])
            got = got if len(got) <= 200 else got[:200] + f"... ({len(got)} characters)"
            lines.append(f"{source}: {path}: got {got}; {msg[0].lower()}{msg[1:]}")
    return "\n".join(lines)


def apply_override(raw: dict, override: str) -> None:
    """Apply one ``a.b.c=value`` override (value parsed as YAML) to a raw spec dict in place."""
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise SpecError(f"--set {override!r}: expected FIELD.PATH=VALUE, e.g. workers.count=4")
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise SpecError(f"--set {override!r}: {part} is not a mapping")
        node = child
    from shipyard.untrusted import load_yaml

    node[parts[-1]] = load_yaml(value, f"--set {key}")


def spec_from_dict(raw: Any, source: str = "spec", base: Path | None = None, resolve: bool = True) -> JobSpec:
    """Validate a raw mapping. Local paths are resolved against ``base`` (default: cwd), unless
    ``resolve`` is false (the server: a path relative to *its* directory means nothing)."""
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: expected a mapping of fields at the top level, got {type(raw).__name__}")
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(format_validation_error(err, source)) from None
    if not resolve:
        return spec
    base = base or Path.cwd()
    update: dict[str, Any] = {"workdir": _resolve_path(spec.workdir, base)}
    update["dataset"] = spec.dataset.model_copy(update={
        "uri": _resolve_path(spec.dataset.uri, base),
        "eval_uri": spec.dataset.eval_uri and _resolve_path(spec.dataset.eval_uri, base),
    })
    if spec.checkpoint is not None:
        update["checkpoint"] = spec.checkpoint.model_copy(update={"uri": _resolve_path(spec.checkpoint.uri, base)})
    if spec.metrics.tensorboard_dir is not None:
        update["metrics"] = spec.metrics.model_copy(
            update={"tensorboard_dir": _resolve_path(spec.metrics.tensorboard_dir.removeprefix("file://"), base)})
    return spec.model_copy(update=update)


def load_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    """Read, override and validate a YAML job spec; checks that a file entrypoint exists."""
    from shipyard.untrusted import MAX_DOCUMENT_BYTES, load_yaml

    path = Path(path)
    try:
        with path.open("rb") as f:
            data = f.read(MAX_DOCUMENT_BYTES + 1)
    except OSError as e:
        raise SpecError(f"{path}: cannot read job spec: {e.strerror or e}") from None
    if len(data) > MAX_DOCUMENT_BYTES:
        raise SpecError(f"{path}: larger than {MAX_DOCUMENT_BYTES} bytes; a job spec is a few KiB")
    raw = load_yaml(data, str(path))
    raw = {} if raw is None else raw
    for o in overrides or []:
        if not isinstance(raw, dict):
            break
        apply_override(raw, o)
    spec = spec_from_dict(raw, source=str(path), base=path.resolve().parent)
    if spec.entry_target.endswith(".py"):
        entry = Path(spec.workdir) / spec.entry_target
        if not entry.is_file():
            raise SpecError(f"{path}: entrypoint: file {entry} does not exist (workdir is {spec.workdir})")
    return spec
