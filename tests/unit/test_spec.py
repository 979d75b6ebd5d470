"""JobSpec validation: errors name the field, the value and what is allowed."""

from pathlib import Path

import pytest
import yaml

from shipyard.errors import SpecError
from shipyard.spec import load_spec

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "jobs" / "digits" / "job.yaml"


def write_spec(tmp_path: Path, **changes) -> Path:
    raw = yaml.safe_load(DIGITS.read_text())
    for key, value in changes.items():
        node = raw
        *parents, leaf = key.split("__")
        for p in parents:
            node = node[p]
        if value is None:
            node.pop(leaf)
        else:
            node[leaf] = value
    (tmp_path / "train.py").write_text("def train(ctx):\n    pass\n")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_digits_spec_loads_with_paths_resolved():
    spec = load_spec(DIGITS)
    assert spec.workers.count == 2 and spec.strategy.kind == "ddp"
    assert spec.workdir == str(DIGITS.parent)
    assert Path(spec.dataset.uri).is_absolute() and "~" not in spec.dataset.uri
    assert spec.checkpoint.every_steps == 100


@pytest.mark.parametrize("change, expected", [
    ({"workers__count": 0}, "workers.count: got 0; input should be greater than or equal to 1"),
    ({"workers__cnt": 2}, "workers.cnt: unknown field; allowed: count, cpus, gpus"),
    ({"strategy__kind": "zero"}, "strategy.kind: got 'zero'; input should be one of 'ddp', 'horovod', 'fsdp', 'tensor', 'pipeline', 'hybrid'"),
    ({"dataset__uri": None}, "dataset.uri: required field is missing"),
    ({"entrypoint": "train"}, "entrypoint: got 'train'; must be `file.py:function` or `module:function`"),
    ({"name": "My Job"}, "name: got 'My Job'; must be lower-case"),
    ({"checkpoint__keep_last": -1}, "checkpoint.keep_last: got -1"),
    ({"max_failures": -2}, "max_failures: got -2"),
])
def test_bad_field_is_named(tmp_path, change, expected):
    with pytest.raises(SpecError) as err:
        load_spec(write_spec(tmp_path, **change))
    message = str(err.value)
    assert expected in message
    assert message.startswith(str(tmp_path / "job.yaml"))
    assert len(message.splitlines()) == 1


def test_checkpoint_without_trigger_defaults_to_every_100_steps(tmp_path):
    spec = load_spec(write_spec(tmp_path, checkpoint__every_steps=None))
    assert spec.checkpoint.every_steps == 100


def test_overrides_apply_and_validate(tmp_path):
    path = write_spec(tmp_path)
    spec = load_spec(path, ["workers.count=4", "dataset.uri=s3://bucket/data", "config.lr=0.5"])
    assert spec.workers.count == 4 and spec.dataset.uri == "s3://bucket/data" and spec.config["lr"] == 0.5
    with pytest.raises(SpecError, match="workers.count: got 'many'"):
        load_spec(path, ["workers.count=many"])
    with pytest.raises(SpecError, match="expected FIELD.PATH=VALUE"):
        load_spec(path, ["workers.count"])


def test_missing_entrypoint_file(tmp_path):
    path = write_spec(tmp_path, entrypoint="nope.py:train")
    with pytest.raises(SpecError, match="entrypoint: file .*nope.py does not exist"):
        load_spec(path)


def test_yaml_syntax_error_names_line(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("name: x\nworkers: [1,\n")
    with pytest.raises(SpecError, match=r"job.yaml:\d+:\d+: not valid YAML"):
        load_spec(path)


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecError, match="cannot read job spec"):
        load_spec(tmp_path / "absent.yaml")


def test_cli_bad_spec_exits_2_with_one_line_and_no_traceback(tmp_path, shipyard):
    path = write_spec(tmp_path, workers__count=0)
    result = shipyard("run", str(path))
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: {path}: workers.count: got 0; input should be greater than or equal to 1")
    assert "Traceback" not in result.stdout + result.stderr


def test_elastic_range_sets_count_to_max_and_round_trips(tmp_path):
    spec = load_spec(write_spec(tmp_path, workers={"min": 1, "max": 4, "cpus": 1}))
    assert spec.workers.elastic and spec.workers.count == 4 and spec.workers.fewest == 1
    again = type(spec).model_validate(spec.model_dump(mode="json"))  # as the workers receive it
    assert again.workers == spec.workers
    fixed = load_spec(write_spec(tmp_path, workers={"count": 3}))
    assert not fixed.workers.elastic and fixed.workers.fewest == 3


@pytest.mark.parametrize("workers, strategy, expected", [
    ({"min": 2}, None, "workers: got {'min': 2}; an elastic range needs both min and max"),
    ({"min": 2, "max": 4, "count": 3}, None, "give a fixed count or an elastic min/max range, not both"),
    ({"min": 5, "max": 4}, None, "min (5) is more than max (4)"),
    ({"min": 2, "max": 4}, {"kind": "tensor", "tp": 2}, "workers.min: strategy 'tensor' cuts a fixed device mesh"),
])
def test_bad_elastic_ranges_are_named(tmp_path, workers, strategy, expected):
    changes = {"workers": workers}
    if strategy:
        changes["strategy"] = strategy
    with pytest.raises(SpecError) as e:
        load_spec(write_spec(tmp_path, **changes))
    assert expected in str(e.value), str(e.value)


def test_elastic_job_needs_a_checkpoint(tmp_path):
    with pytest.raises(SpecError, match="workers.min: an elastic job resumes from a checkpoint"):
        load_spec(write_spec(tmp_path, workers={"min": 1, "max": 2}, checkpoint=None))
