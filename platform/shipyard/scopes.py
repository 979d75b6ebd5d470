"""Tenant storage scopes: every URI a job reads or writes lies under one of its tenant's roots.

A *root* is a URI prefix (``s3://bucket/team-a/`` or, where the operator allows local storage,
``/srv/shipyard/team-a/``) that a tenant's jobs may read, and write unless it is read-only (an
admin's shared datasets bucket, say). A tenant's roots are the server's default root for it
(``<--storage-root>/<tenant>/``), the roots an admin gave it, and the shared read-only roots of the
server. The job server checks a spec at submit; the job's driver checks it again before anything
runs (the server hands it the roots in :data:`ROOTS_ENV`), so a spec changed on its way cannot
escape either.

Why prefix matching is safe here: a URI is first *normalised* and anything ambiguous is refused
rather than interpreted — ``.`` and ``..`` segments, empty segments, percent-escapes, backslashes,
control characters, schemes other than ``s3`` (and local paths unless allowed), relative paths.
Local paths are compared after resolving symlinks, so a link inside a root cannot lead out of it.
Matching is by whole path segments: root ``s3://b/team-a`` does not cover ``s3://b/team-ab``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from shipyard.errors import SpecError, UserError

ROOTS_ENV = "SHIPYARD_STORAGE_ROOTS"
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_BAD = re.compile(r"[\x00-\x1f\x7f%\\]")


class ScopeError(UserError):
    """A URI outside the tenant's roots (the API answers 403)."""


@dataclass(frozen=True)
class StorageRoot:
    uri: str  # normalised, without a trailing '/'
    writable: bool = True

    def covers(self, uri: str) -> bool:
        return uri == self.uri or uri.startswith(self.uri + "/")

    def label(self) -> str:
        return self.uri + ("/" if self.writable else "/ (read-only)")


def normalise(uri: str, field: str, allow_local: bool) -> str:
    """The canonical form of ``uri`` (``s3://bucket/a/b`` or ``/a/b``), or a UserError naming
    ``field`` and what is wrong."""
    if not isinstance(uri, str) or not uri:
        raise SpecError(f"{field}: must be a non-empty URI")
    if _BAD.search(uri):
        raise SpecError(f"{field}: got {uri[:200]!r}; percent-escapes, backslashes and control characters "
                        "are not allowed in storage URIs")
    if uri.startswith("s3://"):
        bucket, _, key = uri[5:].partition("/")
        if not _BUCKET.match(bucket):
            raise SpecError(f"{field}: got {uri[:200]!r}; {bucket!r} is not an S3 bucket name")
        segments = key.rstrip("/").split("/") if key.strip("/") else []
        _check_segments(segments, uri, field)
        return "s3://" + "/".join([bucket, *segments])
    if "://" in uri and not uri.startswith("file://"):
        raise SpecError(f"{field}: got {uri[:200]!r}; storage URIs are s3://bucket/prefix"
                        + (" or local paths" if allow_local else ""))
    path = uri.removeprefix("file://")
    if not allow_local:
        raise SpecError(f"{field}: got {uri[:200]!r}; this server does not allow local paths, use "
                        "s3://bucket/prefix under your tenant's storage root")
    if not path.startswith("/"):
        raise SpecError(f"{field}: got {uri[:200]!r}; a local path must be absolute")
    segments = path.rstrip("/").split("/")[1:] if path.strip("/") else []
    _check_segments(segments, uri, field)
    return os.path.realpath("/" + "/".join(segments))


def _check_segments(segments: list[str], uri: str, field: str) -> None:
    for s in segments:
        if s in ("", ".", ".."):
            raise SpecError(f"{field}: got {uri[:200]!r}; empty, '.' and '..' path segments are not allowed")


def roots_for(tenant: str, default_root: str | None, granted: list[StorageRoot], shared: list[StorageRoot],
              allow_local: bool) -> list[StorageRoot]:
    """A tenant's roots: the default one (``<default_root>/<tenant>``), its own, the shared ones.
    A local root is dropped when local storage is not allowed."""
    out: list[StorageRoot] = []
    if default_root:
        out.append(StorageRoot(normalise(default_root.rstrip("/") + "/" + tenant, "--storage-root", allow_local)))
    for r in [*granted, *shared]:
        try:
            out.append(StorageRoot(normalise(r.uri, "storage root", allow_local), r.writable))
        except UserError:
            continue  # a local root on a server that no longer allows local storage
    return out


def uses(spec) -> list[tuple[str, str, bool]]:
    """``(field, uri, writes)`` for every storage location a spec reads or writes."""
    out = [("dataset.uri", spec.dataset.uri, False)]
    if spec.dataset.eval_uri:
        out.append(("dataset.eval_uri", spec.dataset.eval_uri, False))
    if spec.checkpoint is not None:
        out.append(("checkpoint.uri", spec.checkpoint.uri, True))
    if spec.metrics.tensorboard:
        if not spec.metrics.tensorboard_dir:
            out.append(("metrics.tensorboard_dir", "", True))  # the default is the server's home: refused
        else:
            out.append(("metrics.tensorboard_dir", spec.metrics.tensorboard_dir, True))
    return out


def check_spec(spec, roots: list[StorageRoot], allow_local: bool) -> None:
    """Raise :class:`ScopeError` (or UserError for a malformed URI) unless every location of
    ``spec`` lies under a root that permits the access."""
    for field, uri, writes in uses(spec):
        if not uri:
            raise SpecError(f"{field}: must be set on a shared server (under one of your storage roots: "
                            f"{_allowed(roots, writes)})")
        canonical = normalise(uri, field, allow_local)
        if any(r.covers(canonical) and (r.writable or not writes) for r in roots):
            continue
        read_only = any(r.covers(canonical) for r in roots)
        what = "is under a read-only root" if read_only else "is outside your tenant's storage roots"
        raise ScopeError(f"{field}: {uri[:300]} {what}; allowed{' for writing' if writes else ''}: "
                         f"{_allowed(roots, writes)}")


def _allowed(roots: list[StorageRoot], writes: bool) -> str:
    usable = [r.label() for r in roots if r.writable or not writes]
    return ", ".join(usable) if usable else "none (an admin adds roots with `shipyard admin set-tenant --storage-root`)"


def to_env(roots: list[StorageRoot], allow_local: bool) -> str:
    return json.dumps({"allow_local": allow_local, "roots": [{"uri": r.uri, "writable": r.writable} for r in roots]})


def check_from_env(spec, env: dict[str, str]) -> None:
    """The driver's check: a no-op outside a shared server (no :data:`ROOTS_ENV`)."""
    raw = env.get(ROOTS_ENV)
    if not raw:
        return
    data = json.loads(raw)
    roots = [StorageRoot(r["uri"], bool(r["writable"])) for r in data["roots"]]
    check_spec(spec, roots, bool(data["allow_local"]))
