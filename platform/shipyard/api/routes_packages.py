"""``/v1/packages/{digest}``: a tenant's code packages (content-addressed zips of a job directory).

``HEAD`` answers 200 when the caller's tenant has the package, 404 otherwise (another tenant's
copy does not count: see :mod:`shipyard.packages`). ``PUT`` takes the zip as the raw body
(``application/zip`` or ``application/octet-stream``, with a Content-Length or chunked) and
answers 201 when it stored it, 200 when the tenant already had it. The body is read once, in
chunks, into a staging file: its size is checked against the store's cap while it arrives (a
chunked body too), its sha256 is computed from the bytes actually read and must equal the
digest in the path, and the zip must pass :func:`shipyard.packages.check_zip`; only then is it
moved into place. Nothing is stored for a refused upload.

:func:`require_package` is what ``POST /v1/jobs`` calls: a spec naming a package its tenant has
not uploaded is refused there, with 422, before the job is queued.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel

from shipyard.api.auth import Principal, principal
from shipyard.api.errors import ApiError
from shipyard.errors import UserError
from shipyard.packages import MiB, PackageRejected, PackageStore, check_zip, hex_of
from shipyard.spec import JobSpec

router = APIRouter(tags=["packages"])
Caller = Annotated[Principal, Depends(principal)]
PREFIX = "/v1/packages/"  # LimitsAndMetrics leaves these bodies to this router's own cap
# Any Content-Type is read as the zip's bytes; the schema says octet-stream, which clients and
# OpenAPI tooling know how to send.
ZIP_BODY = {"requestBody": {"required": True, "description": "the zip's bytes", "content": {
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


class PackageOut(BaseModel):
    digest: str
    bytes: int
    created: bool


def _store(request: Request) -> PackageStore:
    store = request.app.state.packages
    if store is None:  # an app built without one (tests, embedded use): nothing can have been uploaded
        raise ApiError(404, "this server keeps no code packages (it was started without a package store)")
    return store


def _digest(digest: str) -> str:
    try:
        return hex_of(digest)
    except PackageRejected as e:
        raise ApiError(e.status, str(e), "invalid_digest") from None


async def _call(store: PackageStore, fn, *args):
    """Local stores answer from a stat or a rename (microseconds): on the event loop. Object
    storage is a network round trip: in the thread pool."""
    return await run_in_threadpool(fn, *args) if store.remote else fn(*args)


@router.head("/packages/{digest}", responses={404: {"description": "this tenant has not uploaded it"}})
async def head_package(request: Request, who: Caller, digest: str) -> Response:
    """200 if the caller's tenant has uploaded this package, else 404."""
    _digest(digest)
    store = _store(request)
    if not await _call(store, store.exists, who.tenant, digest):
        raise ApiError(404, f"package {digest} has not been uploaded by this tenant")
    return Response(status_code=200)


@router.put("/packages/{digest}", status_code=201, response_model=PackageOut, openapi_extra=ZIP_BODY,
            responses={200: {"model": PackageOut, "description": "the tenant already had it"},
                       400: {"description": "the body's sha256 is not the digest"},
                       413: {"description": "over the size, entry or uncompressed-size limit"},
                       422: {"description": "not a zip, or an unsafe one"}})
async def put_package(request: Request, who: Caller, digest: str, response: Response) -> PackageOut:
    """Upload a code package: the zip's bytes, whose sha256 is ``digest``."""
    hexdigest = _digest(digest)
    store = _store(request)
    cap = store.limits.max_bytes
    too_large = (f"body: the code package is larger than {cap / MiB:g} MiB (the server's limit on a package; "
                 "leave data and checkpoints out of the job directory: .shipyardignore)")
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > cap):
        raise ApiError(413, too_large, "too_large")
    fd, staged = tempfile.mkstemp(prefix="upload-", suffix=".zip", dir=store.staging_dir())
    try:
        sha, size = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as f:
            async for chunk in request.stream():
                size += len(chunk)
                if size > cap:
                    raise ApiError(413, too_large, "too_large")
                sha.update(chunk)
                f.write(chunk)
        if sha.hexdigest() != hexdigest:
            raise ApiError(400, f"digest: the body's sha256 is sha256:{sha.hexdigest()}, not {digest} "
                                f"({size} bytes read)", "digest_mismatch")
        try:
            await run_in_threadpool(check_zip, staged, store.limits)
            created = await run_in_threadpool(store.put, who.tenant, digest, staged)
        except PackageRejected as e:
            raise ApiError(e.status, str(e), "invalid_package") from None
    finally:
        if os.path.exists(staged):
            os.unlink(staged)
    if not created:
        response.status_code = 200
    return PackageOut(digest=digest, bytes=size, created=created)


async def require_package(request: Request, tenant: str, spec: JobSpec) -> None:
    """Refuse (422) a spec whose package its tenant has not uploaded, or that the backend could
    not run (the kuberay backend needs packages in object storage: ``backend.check_package``)."""
    if spec.package is None:
        return
    store = request.app.state.packages
    if store is None or not await _call(store, store.exists, tenant, spec.package):
        raise ApiError(422, f"package: {spec.package} has not been uploaded by this tenant "
                            "(shipyard submit uploads it)", "package_missing")
    check = getattr(request.app.state.backend, "check_package", None)
    if check is not None:
        try:
            check(spec)
        except UserError as e:
            raise ApiError(422, str(e), "package_unusable") from None


__all__ = ["router", "require_package", "PREFIX", "PackageOut"]
