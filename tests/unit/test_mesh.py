"""Device-mesh arithmetic and the spec's strategy validation (no torch.distributed)."""

import pytest

from shipyard.errors import SpecError
from shipyard.parallel.mesh import ParallelDims, parallel_dims
from shipyard.spec import FSDPStrategy, HybridStrategy, PipelineStrategy, TensorStrategy, spec_from_dict


def test_layout_is_row_major_pp_dp_tp():
    dims = parallel_dims(HybridStrategy(tp=2), 8)
    assert (dims.pp, dims.dp, dims.tp, dims.dp_shard) == (1, 4, 2, True)
    assert [dims.dp_rank(r) for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]  # tp peers read the same data
    pp = ParallelDims(8, pp=2, dp=2, tp=2)
    assert pp.coords(5) == (1, 0, 1) and pp.coords(2) == (0, 1, 0)


@pytest.mark.parametrize("strategy, world, shape", [
    (FSDPStrategy(), 4, (1, 4, 1)),
    (TensorStrategy(tp=2), 4, (1, 2, 2)),
    (PipelineStrategy(stages=2), 2, (2, 1, 1)),
    (HybridStrategy(tp=2, dp_shard=2), 4, (1, 2, 2)),
])
def test_shapes(strategy, world, shape):
    assert parallel_dims(strategy, world).shape == shape


def _spec(strategy, count=2, batch=8):
    return {"name": "lm", "entrypoint": "train.py:train", "workers": {"count": count},
            "strategy": strategy, "dataset": {"uri": "/tmp/x", "batch_size": batch}}


@pytest.mark.parametrize("strategy, count, message", [
    ({"kind": "tensor", "tp": 4}, 2, "strategy.tp: tp=4 needs a multiple of 4 workers, got 2"),
    ({"kind": "pipeline", "stages": 3}, 4, "strategy.stages: stages=3 needs a multiple of 3 workers, got 4"),
    ({"kind": "hybrid", "tp": 2, "dp_shard": 2}, 2, "strategy.dp_shard: dp_shard=2 x tp=2 needs 4 workers, got 2"),
    ({"kind": "pipeline", "stages": 2, "microbatches": 3}, 2, "strategy.microbatches: 3 microbatches must divide dataset.batch_size (8)"),
    ({"kind": "pipeline", "stages": 2, "microbatches": 1}, 2, "schedule 1f1b needs at least one microbatch per stage (2), got 1"),
])
def test_strategy_that_does_not_fit_the_workers_is_named(strategy, count, message):
    with pytest.raises(SpecError) as e:
        spec_from_dict(_spec(strategy, count), source="job.yaml")
    assert str(e.value) == f"job.yaml: {message}" or message in str(e.value)


def test_fitting_strategies_validate():
    assert spec_from_dict(_spec({"kind": "hybrid", "tp": 2}, 4)).strategy.kind == "hybrid"
    assert spec_from_dict(_spec({"kind": "pipeline", "stages": 2, "microbatches": 4})).strategy.schedule == "1f1b"


def test_spec_import_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, shipyard.spec; spec = shipyard.spec; import shipyard.parallel.mesh; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
