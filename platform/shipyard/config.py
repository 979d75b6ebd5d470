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


def enable_ray_token_auth(env: dict[str, str] | None = None) -> None:
    """Send the cluster token when joining RAY_ADDRESS: Ray 2.60 clusters require one by default,
    but its clients only send it in token mode. Must run before ``ray`` is imported (Ray reads
    RAY_AUTH_MODE at import)."""
    env = os.environ if env is None else env
    if not env.get("RAY_ADDRESS") or "RAY_AUTH_MODE" in env:
        return
    if env.get("RAY_AUTH_TOKEN") or env.get("RAY_AUTH_TOKEN_PATH") or Path("~/.ray/auth_token").expanduser().exists():
        env["RAY_AUTH_MODE"] = "token"
