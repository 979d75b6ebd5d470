"""Environment-driven settings, read once at the edge.

``SHIPYARD_*`` variables configure shipyard itself; S3 credentials come from the standard
``AWS_*`` variables (or any other source botocore knows: profiles, instance roles).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# Variables forwarded from the driver to every Ray worker, so that a worker on a remote
# cluster sees the same object store and credentials as the process that launched the job.
FORWARDED_ENV_PREFIXES = ("SHIPYARD_", "AWS_", "FSSPEC_")


@dataclass(frozen=True)
class Settings:
    home: Path
    s3_endpoint: str | None
    ray_address: str | None

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Settings":
        env = dict(os.environ if env is None else env)
        return cls(
            home=Path(env.get("SHIPYARD_HOME", "~/.shipyard")).expanduser(),
            s3_endpoint=env.get("SHIPYARD_S3_ENDPOINT") or None,
            ray_address=env.get("RAY_ADDRESS") or None,
        )


def forwarded_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The driver's variables that workers need (see FORWARDED_ENV_PREFIXES)."""
    env = dict(os.environ if env is None else env)
    return {k: v for k, v in env.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
