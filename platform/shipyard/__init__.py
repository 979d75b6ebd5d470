"""shipyard: a distributed training platform.

A job is described by a YAML :class:`shipyard.spec.JobSpec`; ``shipyard run`` trains it on Ray
workers, streaming Arrow shards from any fsspec URI (S3 included) and checkpointing back to one.
"""

__version__ = "0.1.0"
