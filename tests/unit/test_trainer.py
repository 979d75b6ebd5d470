"""shipyard.runtime.trainer: Ray Train's default callbacks, less the placement-group cleaner."""

from ray.train import ScalingConfig
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

from shipyard.runtime.trainer import ShipyardTrainer


def test_drops_only_the_placement_group_cleaner():
    from ray.train.torch import TorchTrainer

    kw = dict(train_loop_per_worker=lambda: None, scaling_config=ScalingConfig(num_workers=1))
    ray_defaults = TorchTrainer(**kw)._create_default_callbacks()
    ours = ShipyardTrainer(**kw)._create_default_callbacks()
    assert any(isinstance(cb, PlacementGroupCleanerCallback) for cb in ray_defaults), \
        "Ray no longer adds PlacementGroupCleanerCallback: drop shipyard/runtime/trainer.py"
    assert not any(isinstance(cb, PlacementGroupCleanerCallback) for cb in ours)
    assert [type(cb) for cb in ours] == [type(cb) for cb in ray_defaults
                                         if not isinstance(cb, PlacementGroupCleanerCallback)]
