"""shipyard: a distributed training platform.

A job is described by a YAML :class:`shipyard.spec.JobSpec`; ``shipyard run`` trains it on Ray
workers, streaming Arrow shards from any fsspec URI (S3 included) and checkpointing back to one.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `shipyard.Client` without importing httpx for every `import shipyard` (workers import it too).
    if name == "Client":
        from shipyard.client import Client

        return Client
    raise AttributeError(f"module 'shipyard' has no attribute {name!r}")
