"""Arrow-sharded datasets: the shard writer, the manifest, and the per-rank stream.

``shipyard data shard`` writes a dataset as Arrow IPC shards plus ``manifest.json`` (written
last, so a half-written dataset is never visible). :class:`ShardStream` reads one rank's share.
"""

from shipyard.data.manifest import Manifest, ShardInfo, read_manifest
from shipyard.data.stream import ShardStream

__all__ = ["Manifest", "ShardInfo", "ShardStream", "read_manifest"]
