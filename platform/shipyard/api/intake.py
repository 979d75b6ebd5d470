"""What a submitted spec must pass before the server does any work for it, in one place.

Order matters and is cheapest first: the caller is authenticated (a route dependency) before the
body is read; the body's size is bounded while it arrives (``app._bounded``); it is parsed with
:mod:`shipyard.untrusted` (aliases, depth, node count, NUL bytes, non-finite numbers); validated
as a JobSpec (every number in range, every string capped); then the server's own rules: no
``workdir`` on the server's disk, the priority cap, the tenant's storage roots.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shipyard.api.errors import ApiError
from shipyard.errors import SpecError
from shipyard.scopes import StorageRoot, check_spec, roots_for
from shipyard.spec import JobSpec, spec_from_dict
from shipyard.untrusted import UnparsableDocument, load_json, load_yaml

YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")


@dataclass(frozen=True)
class StoragePolicy:
    """Where tenants' jobs may read and write (``shipyard server --storage-root/--shared-root/
    --allow-local-storage``); see :mod:`shipyard.scopes`."""

    default_root: str | None = None
    shared: tuple[StorageRoot, ...] = field(default_factory=tuple)
    allow_local: bool = False

    def roots(self, tenant) -> list[StorageRoot]:
        granted = [StorageRoot(uri, writable) for uri, writable in tenant.storage_roots]
        return roots_for(tenant.name, self.default_root, granted, list(self.shared), self.allow_local)


def parse_body(raw: bytes, content_type: str) -> object:
    kind = content_type.split(";")[0].strip().lower()
    try:
        if kind in YAML_TYPES:
            return load_yaml(raw, "body")
        if kind in ("application/json", "") or kind.endswith("+json"):
            return load_json(raw, "body")
    except UnparsableDocument as e:
        raise ApiError(400, str(e), "invalid_body") from None
    raise ApiError(415, f"Content-Type {kind!r}: send the spec as application/json or application/yaml")


def submitted_spec(raw: bytes, content_type: str, *, admin: bool, max_user_priority: int) -> JobSpec:
    """The body as a JobSpec the server may queue (storage is checked by :func:`check_storage`)."""
    spec = spec_from_dict(parse_body(raw, content_type), source="spec", resolve=False)
    if spec.workdir != ".":
        raise SpecError(f"spec: workdir: got {spec.workdir[:200]!r}; the server never reads code from its own "
                        "disk: `shipyard submit` (or Client.submit) uploads the workdir as a package")
    if spec.package is None and spec.entry_target.endswith(".py"):
        raise SpecError(f"spec: entrypoint: {spec.entrypoint} names a file, but the spec has no code package; "
                        "`shipyard submit` (or Client.submit) uploads the workdir, or use module:function for "
                        "code installed in the image")
    if spec.priority > max_user_priority and not admin:
        raise ApiError(403, f"spec: priority: got {spec.priority}; priorities above {max_user_priority} "
                            "need an admin token", "forbidden_priority")
    return spec


def preflight(spec: JobSpec, packages, tenant: str, *, own_credentials: bool) -> None:
    """What ``shipyard run`` checks before it starts Ray, at submit (see :mod:`shipyard.preflight`):
    the entrypoint file in the uploaded package parses and defines the function (parsed, never
    imported), every storage endpoint answers, the datasets exist. With the server's own S3
    credentials only: a tenant whose jobs get credentials of their own (its env file) is checked
    for reachable endpoints, not for buckets and datasets its credentials might read and the
    server's not."""
    from shipyard import preflight as checks

    if spec.package and spec.entry_target.endswith(".py") and packages is not None:
        source = packages.read_member(tenant, spec.package, spec.entry_target, checks.MAX_SOURCE_BYTES)
        if source is None:
            raise SpecError(f"entrypoint: {spec.entry_target} is not in the uploaded package {spec.package} "
                            "(or is over 4 MiB); is the workdir right?")
        checks.check_entrypoint_source(source, spec.entry_target, spec.entry_function)
    checks.check_endpoints(spec, buckets_too=not own_credentials)
    if not own_credentials:
        checks.check_datasets(spec)


def check_storage(spec: JobSpec, policy: StoragePolicy | None, tenant) -> list[StorageRoot] | None:
    """The tenant's roots after checking that every URI of ``spec`` lies under one (403 when
    outside, 422 when malformed); None when the server checks no storage (tests, embedded use)."""
    if policy is None:
        return None
    roots = policy.roots(tenant)
    check_spec(spec, roots, policy.allow_local)
    return roots
