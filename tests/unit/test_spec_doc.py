"""docs/spec.md is the JobSpec model rendered (shipyard.specdoc): it fails here when the two drift,
when a field has no description, or when the page's example is not a valid spec."""

from __future__ import annotations

import difflib
import re
from pathlib import Path

from pydantic import BaseModel

from shipyard import specdoc
from shipyard.spec import JobSpec, spec_from_dict
from shipyard.untrusted import load_yaml

REPO = Path(__file__).resolve().parents[2]
PAGE = REPO / "docs" / "spec.md"


def fields(model: type[BaseModel], prefix: str = ""):
    """(path, model, name) of every field, nested sections and every strategy kind included."""
    for name, field in model.model_fields.items():
        yield prefix + name, model, name
        for sub in specdoc._models(field.annotation):
            yield from fields(sub, f"{prefix}{name}.")


def test_the_committed_page_is_the_model_rendered():
    committed, rendered = PAGE.read_text(), specdoc.render()
    if committed != rendered:
        diff = "".join(list(difflib.unified_diff(committed.splitlines(True), rendered.splitlines(True),
                                                 "docs/spec.md (committed)", "docs/spec.md (from the model)"))[:60])
        raise AssertionError(f"docs/spec.md is out of date with shipyard/spec.py; regenerate it from the repository "
                             f"root with `.venv/bin/{specdoc.REGENERATE}` and commit it:\n{diff}")


def test_every_field_has_a_description_and_a_row():
    page = PAGE.read_text()
    missing = [path for path, model, name in fields(JobSpec) if not specdoc.describe(model, name)]
    assert not missing, (f"fields without a description: {', '.join(missing)}; give each a one-line "
                         f"Field(description=...) in shipyard/spec.py and regenerate docs/spec.md")
    for path, _, _ in fields(JobSpec):
        assert f"| `{path}` |" in page, path


def test_rows_carry_the_models_bounds_defaults_and_choices():
    rows = {m["path"]: m["rest"] for m in re.finditer(r"^\| `(?P<path>[\w.]+)` \| (?P<rest>.*) \|$",
                                                       PAGE.read_text(), re.M)}
    assert rows["workers.count"].startswith("integer | `2` | 1 to 4096 | ")
    assert rows["dataset"].startswith("section ([below](#dataset)) | required | ")
    assert rows["checkpoint.preemption_grace_s"].startswith("number | `30` | more than 0; at most 3600 | ")
    assert rows["dataset.format"].startswith("string | `auto` | one of `auto`, `arrow`, `parquet` | ")
    assert rows["package"].startswith("string or null | `null` | matches `^sha256:[0-9a-f]{64}$` | ")
    assert rows["env"].startswith("mapping of string to string | `{}` | at most 256 entries | ")


def test_the_example_is_the_digits_job_and_validates():
    example = re.search(r"^## Example\n.*?^```yaml\n(?P<yaml>.*?)^```$", PAGE.read_text(), re.S | re.M)["yaml"]
    assert example == specdoc.EXAMPLE.read_text()
    spec = spec_from_dict(load_yaml(example, "docs/spec.md example"), "docs/spec.md example", resolve=False)
    assert (spec.name, spec.workers.count, spec.strategy.kind) == ("digits", 2, "ddp")
