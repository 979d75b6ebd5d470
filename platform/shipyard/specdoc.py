"""``docs/spec.md``, generated from the JobSpec model: ``python -m shipyard.specdoc > docs/spec.md``.

Every field of every section, with its type, default, bounds and description, is read from the
pydantic model (``Field(description=..., ge=..., le=..., max_length=...)``), so the page cannot
say something the validator does not do; ``tests/unit/test_spec_doc.py`` fails when the committed
page and the model differ. Rules checked by validators in code (the name's shape, an elastic
job's need for a checkpoint) are in the descriptions and section texts, which are the model's.
"""

from __future__ import annotations

import inspect
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt, MaxLen
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from shipyard.spec import JobSpec

EXAMPLE = Path(__file__).resolve().parents[2] / "jobs" / "digits" / "job.yaml"
REGENERATE = "python -m shipyard.specdoc > docs/spec.md"
_SCALARS = {int: "integer", float: "number", str: "string", bool: "boolean", Any: "any JSON value"}


def render(example: str | None = None) -> str:
    """The page; ``example``: the YAML shown first (default: the digits demo's job.yaml)."""
    example = EXAMPLE.read_text() if example is None else example
    max_str = JobSpec.model_config["str_max_length"]
    out = ["# Job spec reference", "",
           f"Generated from `shipyard.spec.JobSpec` by `{REGENERATE}`: change the model (its "
           "`Field(description=...)` and bounds), not this page; `tests/unit/test_spec_doc.py` fails when they "
           "differ.", "",
           "A job spec is one YAML mapping, given to `shipyard run JOB.yaml` or `shipyard submit -f JOB.yaml`. "
           "Unknown fields are refused, naming the fields allowed there; every number must be finite and every "
           f"string at most {max_str} characters unless its row says less. Local paths (`workdir`, `dataset.uri`, "
           "`checkpoint.uri`, ...) are relative to the spec file. Both commands take `--set FIELD=VALUE` to "
           "override a field, e.g. `--set workers.count=4`.", "",
           "## Example", "", f"The digits demo, `{EXAMPLE.relative_to(EXAMPLE.parents[2])}`:", "",
           "```yaml", example.rstrip("\n"), "```", "",
           "## Top level", ""]
    out += _table(JobSpec, "")
    for name, field in JobSpec.model_fields.items():
        out += _section(name, field)
    return "\n".join(out) + "\n"


def _section(path: str, field: FieldInfo) -> list[str]:
    models = _models(field.annotation)
    if not models:
        return []
    out = ["", f"## `{path}`", ""]
    intro = _doc(models[0]) if len(models) == 1 else ""
    if intro or field.description:
        out += [intro or _markdown(_sentence(field.description)), ""]
    if field.discriminator:
        tag = field.discriminator
        out += [f"Chosen by `{path}.{tag}`; the default is `{tag}: {_tag(field.default, tag)}`.", ""]
        for model in models:
            out += [f"### `{tag}: {_tag(model, tag)}`", "", _doc(model), ""]
            out += _table(model, path + ".")
            out.append("")
        return out[:-1]
    out += _table(models[0], path + ".")
    for name, sub in models[0].model_fields.items():
        out += _section(f"{path}.{name}", sub)
    return out


def _table(model: type[BaseModel], prefix: str) -> list[str]:
    rows = ["| Field | Type | Default | Allowed | Description |", "| --- | --- | --- | --- | --- |"]
    for name, field in model.model_fields.items():
        cells = [f"`{prefix}{name}`", _type(field, prefix + name), _default(field), _allowed(field),
                 _markdown(describe(model, name))]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return rows


def describe(model: type[BaseModel], name: str) -> str:
    """A field's description; the tag of a discriminated section explains itself."""
    field = model.model_fields[name]
    if field.description:
        return field.description
    if get_origin(field.annotation) is Literal and len(get_args(field.annotation)) == 1:
        return "selects this kind"
    return ""


def _markdown(text: str) -> str:
    """Plain text made safe for a Markdown table: ``<name>`` is not an HTML tag, ``*`` not emphasis
    (code spans are left alone: Markdown shows them verbatim)."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("*", "\\*").replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def _models(annotation: Any) -> list[type[BaseModel]]:
    args = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    return [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]


def _type(field: FieldInfo, path: str) -> str:
    ann = field.annotation
    args = get_args(ann) if get_origin(ann) in (Union, types.UnionType) else (ann,)
    nullable = type(None) in args
    kinds = [a for a in args if a is not type(None)]
    if _models(ann):
        text = f"section ([below](#{path.replace('.', '')}))"
        if field.discriminator:
            text = f"one of {len(kinds)} sections by `{field.discriminator}` ([below](#{path.replace('.', '')}))"
    else:
        text = " or ".join(_scalar(a) for a in kinds)
    return text + (" or null" if nullable else "")


def _scalar(ann: Any) -> str:
    origin = get_origin(ann)
    if origin is Literal:
        return " or ".join(sorted({_SCALARS[type(v)] for v in get_args(ann)}))
    if origin is dict:
        key, value = get_args(ann)
        return f"mapping of {_scalar(key)} to {_scalar(value)}"
    if origin is list:
        return f"list of {_scalar(get_args(ann)[0])}"
    if isinstance(ann, type) and issubclass(ann, BaseModel):  # e.g. dataset.columns' values
        return "{" + ", ".join(f"`{name}`" for name in ann.model_fields) + "}"
    return _SCALARS[ann]


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return f"`{field.discriminator}: {_tag(value, field.discriminator)}`" if field.discriminator else "see below"
    return f"`{_literal(value)}`"


def _allowed(field: FieldInfo) -> str:
    ann = field.annotation
    args = get_args(ann) if get_origin(ann) in (Union, types.UnionType) else (ann,)
    parts: list[str] = []
    for a in args:
        if get_origin(a) is Literal:
            values = [f"`{_literal(v)}`" for v in get_args(a)]
            parts.append(values[0] if len(values) == 1 else "one of " + ", ".join(values))
    lo = hi = None
    for m in field.metadata:
        if isinstance(m, (Ge, Gt)):
            lo = ("at least", m.ge) if isinstance(m, Ge) else ("more than", m.gt)
        elif isinstance(m, (Le, Lt)):
            hi = ("at most", m.le) if isinstance(m, Le) else ("less than", m.lt)
        elif isinstance(m, MaxLen):
            unit = "entries" if any(get_origin(a) is dict for a in args) else "characters"
            parts.append(f"at most {m.max_length} {unit}")
        elif getattr(m, "pattern", None):
            parts.append(f"matches `{m.pattern}`")
    if lo and hi and lo[0] == "at least" and hi[0] == "at most":
        parts.append(f"{_number(lo[1])} to {_number(hi[1])}")
    else:
        parts += [f"{op} {_number(v)}" for op, v in (b for b in (lo, hi) if b)]
    return "; ".join(parts)


def _tag(model: BaseModel | type[BaseModel], tag: str) -> str:
    return model.model_fields[tag].default if isinstance(model, type) else getattr(model, tag)


def _doc(model: type[BaseModel]) -> str:
    """The section's docstring as one paragraph (none for a model that only inherits one)."""
    doc = model.__dict__.get("__doc__")
    return " ".join(inspect.cleandoc(doc).split()).replace("``", "`") if doc else ""


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + ("" if text.endswith(".") else ".")


def _literal(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return _number(value)
    if isinstance(value, dict) and not value:
        return "{}"
    return str(value)


def _number(v: float) -> str:
    if v == 2**63 - 1:
        return "2^63 - 1"
    return str(v) if isinstance(v, int) else f"{v:g}"


if __name__ == "__main__":
    import sys

    sys.stdout.write(render())
