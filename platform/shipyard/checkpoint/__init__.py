"""Checkpoints: sharded save/load through torch.distributed.checkpoint to any storage URI.

Layout under the job's checkpoint URI::

    step-000000100/            one directory per checkpoint
        .metadata, __0_0.distcp ...   DCP's files (model, optimizer; ``parts.<name>.`` for each
                               named model; ``state.<key>`` for ctx.state's tensors), by every rank
        rank-00000.pt ...      per-rank state: data stream position, RNG states
        COMMIT.json            written last by rank 0; without it the checkpoint does not exist
                               (also: the parts saved, ctx.state's JSON, a finished mark)

See :mod:`shipyard.checkpoint.store` (listing, commit, retention) and
:mod:`shipyard.checkpoint.dcp` (what is saved and how it is restored).
"""

from shipyard.checkpoint.store import CheckpointStore, CommitRecord

__all__ = ["CheckpointStore", "CommitRecord"]
