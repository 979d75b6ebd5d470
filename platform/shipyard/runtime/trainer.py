"""The TorchTrainer that :func:`shipyard.runtime.launcher.launch` runs: Ray's, less one callback.

Ray Train V2 (2.60) starts a detached ``PlacementGroupCleaner`` actor for every run. Its monitor
thread asks the State API, once a second, whether the controller is still alive, and removes the
run's placement group if it is not. The State API client finds the dashboard through
``/tmp/ray/ray_current_cluster``, which names the cluster of the last ``ray start`` on the machine
and outlives it (our own heads and test clusters are stopped by signal, not ``ray stop``). For a
private ``ray.init`` cluster that file names another cluster or none, so the first check blocks
~40 s on a GCS that is not there and then kills the thread; a run that ends before that waits
out the controller's 12 s ``stop`` timeout and logs a ``GetTimeoutError`` traceback. Where the
file names a live cluster, the check asks the wrong one and is wrong.

The cleaner only matters when the controller dies while its driver lives on: a non-detached
placement group is removed by Ray once its creator's job has ended. shipyard's driver is always a
one-shot ``shipyard run`` (foreground, or a Ray job's entrypoint), whose exit ends the job, and a
private cluster is shut down whole; so the cleaner is dropped rather than repaired.
"""

from __future__ import annotations

from ray.train.torch import TorchTrainer

from shipyard.runtime.ray_adapter import without_placement_group_cleaner


@without_placement_group_cleaner
class ShipyardTrainer(TorchTrainer):
    """Ray's TorchTrainer without its placement-group cleaner (see the module docstring)."""
