"""dataset.columns: projection, casts and renames over real shards; the default rule unchanged."""

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from shipyard.data import ShardStream
from shipyard.data.sources import open_source
from shipyard.data.writer import write_dataset
from shipyard.errors import SpecError, UserError
from shipyard.spec import load_spec

REPO_JOB = Path(__file__).resolve().parents[2] / "jobs" / "digits" / "job.yaml"


def write_spec(tmp_path, columns):
    raw = yaml.safe_load(REPO_JOB.read_text())
    raw["dataset"]["columns"] = columns
    (tmp_path / "train.py").write_text("def train(ctx):\n    pass\n")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path / "job.yaml"


@pytest.fixture
def dataset(tmp_path):
    n = 40
    table = pa.table({
        "x": np.arange(n, dtype=np.float64) / 4,
        "y": np.arange(n, dtype=np.int64),
        "w": pa.array([[float(i), -float(i)] for i in range(n)], type=pa.list_(pa.float64(), 2)),
        "junk": np.ones(n, dtype=np.float32),
    })
    src = tmp_path / "ds.parquet"
    pq.write_table(table, src)
    dest = str(tmp_path / "ds")
    write_dataset(open_source(str(src)), dest, 16)
    return dest


def first(stream):
    return next(iter(stream))


def test_default_rule_keeps_arrow_types(dataset):
    b = first(ShardStream(dataset, batch_size=8, shuffle=False))
    assert set(b) == {"x", "y", "w", "junk"}
    assert (b["x"].dtype, b["y"].dtype, b["w"].dtype, b["junk"].dtype) == (torch.float64, torch.int64, torch.float64, torch.float32)
    assert b["w"].shape == (8, 2)


def test_cast_rename_and_projection(dataset):
    cols = {"x": {"dtype": "float32", "rename": "features"}, "w": {"dtype": "bfloat16"}, "y": {}}
    batches = list(ShardStream(dataset, batch_size=8, shuffle=False, columns=cols))
    b = batches[0]
    assert set(b) == {"features", "w", "y"}  # junk is not read; x is keyed by its rename
    assert b["features"].dtype == torch.float32 and b["w"].dtype == torch.bfloat16 and b["y"].dtype == torch.int64
    assert b["features"].tolist() == [i / 4 for i in range(8)]
    assert b["w"][3].tolist() == [3.0, -3.0]
    assert torch.cat([x["y"] for x in batches]).tolist() == list(range(40))  # rows across shards unchanged


def test_unknown_column_names_it_and_the_schema(dataset):
    with pytest.raises(UserError) as err:
        ShardStream(dataset, batch_size=8, columns={"z": {"dtype": "float32"}})
    msg = str(err.value)
    assert "'z'" in msg and "x, y, w, junk" in msg and len(msg.splitlines()) == 1


def test_float64_default_logged_once_with_the_fix(dataset, caplog):
    from shipyard.data import columns

    columns._told.clear()
    with caplog.at_level(logging.WARNING, logger="shipyard.data.columns"):
        ShardStream(dataset, batch_size=8)
        ShardStream(dataset, batch_size=8)
    lines = [r.getMessage() for r in caplog.records if "float64" in r.getMessage()]
    assert len(lines) == 1
    assert "x, w" in lines[0] and "dataset.columns: {x: {dtype: float32}" in lines[0]
    columns._told.clear()
    with caplog.at_level(logging.WARNING, logger="shipyard.data.columns"):
        caplog.clear()
        ShardStream(dataset, batch_size=8, columns={"x": {"dtype": "float32"}, "y": {}})
    assert not [r for r in caplog.records if "float64" in r.getMessage()]


def test_spec_accepts_columns(tmp_path):
    spec = load_spec(write_spec(tmp_path, {"x": {"dtype": "float32", "rename": "image"}}))
    assert spec.dataset.columns["x"].dtype == "float32" and spec.dataset.columns["x"].rename == "image"


@pytest.mark.parametrize("columns, expected", [
    ({"x": {"dtype": "float128"}}, "dataset.columns.x: got 'float128'"),
    ({f"c{i}": {} for i in range(1025)}, "dataset.columns"),
    ({"x": {"rename": "k"}, "y": {"rename": "k"}}, "batch key 'k'"),
    ({"x" * 257: {}}, "256 characters"),
])
def test_spec_rejects_bad_columns(tmp_path, columns, expected):
    with pytest.raises(SpecError) as err:
        load_spec(write_spec(tmp_path, columns))
    assert expected in str(err.value) and len(str(err.value).splitlines()) == 1
