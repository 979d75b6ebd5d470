"""One mapping from a URI to a filesystem, used by data, checkpoints and the CLI.

``s3://bucket/key`` goes to s3fs (credentials from the standard AWS chain; ``SHIPYARD_S3_ENDPOINT``
points at MinIO, Ceph RGW or any S3-compatible store), ``file://`` and plain paths to the local
filesystem. Every caller goes through :func:`filesystem`, so local runs exercise the same code
path as S3 runs. Transient S3 errors are retried (:data:`S3_RETRIES`, plus s3fs's own retries of
failed body reads) and every retry is counted: :func:`retry_counts` (how, in ``s3_retries``).
"""

from __future__ import annotations

import posixpath

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from shipyard.config import Settings

# botocore's "standard" retry mode retries throttling (SlowDown), 5xx and connection errors
# with exponential backoff and jitter; s3fs adds its own retries around reads on top.
S3_RETRIES = {"max_attempts": 10, "mode": "standard"}


def retry_counts() -> dict[str, int]:
    """Retries of S3 requests in this process so far, by kind: ``throttled``, ``server_error``,
    ``timeout``, ``connection``, ``body_read``, ``other`` (see ``shipyard.s3_retries``)."""
    from shipyard import s3_retries  # imports s3fs and aiohttp: only when asked

    return s3_retries.retry_counts()


def storage_options(uri: str, settings: Settings | None = None) -> dict:
    """fsspec keyword arguments for ``uri`` (also handed to DCP's fsspec writer and reader)."""
    if not uri.startswith("s3://"):
        return {}
    from shipyard.s3_retries import CountingHTTPSession

    settings = settings or Settings.from_env()
    return {
        "client_kwargs": {"endpoint_url": settings.s3_endpoint} if settings.s3_endpoint else {},
        # A class, not an instance: the options stay picklable and print the same every time, so
        # s3fs's instance cache (keyed on their str()) and DCP's fsspec writer keep working.
        "config_kwargs": {"retries": S3_RETRIES, "http_session_cls": CountingHTTPSession},
        # Listings must be fresh: checkpoints and manifests appear while we run.
        "use_listings_cache": False,
    }


def filesystem(uri: str, settings: Settings | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(fs, path)`` for ``uri``; ``path`` is what to pass to ``fs`` methods."""
    if "://" in uri and not uri.startswith(("s3://", "file://")):
        scheme = uri.split("://", 1)[0]
        raise ValueError(f"{uri}: unsupported URI scheme {scheme!r}; use s3://, file:// or a local path")
    fs, path = url_to_fs(uri, **storage_options(uri, settings))
    return fs, path.rstrip("/") if uri.startswith("s3://") else path


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI or path with '/' (object-store keys never use '\\')."""
    return posixpath.join(uri.rstrip("/"), *parts)


def ensure_dir(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Create a local directory. Object stores have no directories, and s3fs's ``makedirs``
    would create a missing *bucket*: a typo in a URI must fail, not make new buckets."""
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(path, exist_ok=True)
