"""Checks that fail a job in seconds, before any worker starts: the entrypoint, the storage
endpoints, the datasets.

``shipyard run`` runs them before it starts Ray (``launcher.preflight``); the server runs them
at submit (``api/intake.py``), so a typo is a 422 at once rather than a failure when the job
reaches the front of the queue. Nothing here imports the user's code: the entrypoint file is
parsed (``ast``), which the server can do safely with a file from an uploaded package.

Storage endpoints are probed with one bucket request each (``HeadBucket``), no retries, at most
``timeout_s`` (default 5 s) in all; a failure is one line naming the spec field, the endpoint,
the bucket and what went wrong: the host does not resolve (DNS), nothing listens (refused), no
answer in time, the credentials are refused (auth), or the bucket does not exist.
"""

from __future__ import annotations

import ast
import concurrent.futures
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from shipyard.config import Settings
from shipyard.errors import SpecError, UserError
from shipyard.spec import JobSpec

PROBE_TIMEOUT_S = 5.0
MAX_SOURCE_BYTES = 4 << 20  # an entrypoint file larger than this is not parsed at submit


class StorageUnreachable(UserError):
    """A storage endpoint or bucket a spec names cannot be used (the message says why)."""


# -- the entrypoint -------------------------------------------------------------------------------

def check_entrypoint_source(source: bytes | str, target: str, function: str) -> None:
    """``target`` (a ``.py`` file's text) parses and defines ``function`` at its top level (a
    ``def``, an assignment or an import of that name). Raises :class:`SpecError` naming the line."""
    try:
        tree = ast.parse(source, filename=target)
    except SyntaxError as e:
        raise SpecError(f"entrypoint: {target} line {e.lineno}: {e.msg}") from None
    except ValueError as e:  # NUL bytes
        raise SpecError(f"entrypoint: {target} is not Python source ({e})") from None
    defined: list[str] = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.append(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            defined += [t.id for t in targets if isinstance(t, ast.Name)]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            defined += [(a.asname or a.name).split(".")[0] for a in node.names]
    if function in defined:
        return
    functions = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    hint = f" (its functions: {', '.join(functions[:10])})" if functions else " (it defines no function)"
    raise SpecError(f"entrypoint: {target} defines no {function!r} at its top level{hint}")


# -- storage endpoints --------------------------------------------------------------------------

@dataclass(frozen=True)
class Bucket:
    field: str  # the first spec field that names it
    uri: str
    name: str


def buckets(spec: JobSpec) -> list[Bucket]:
    """The distinct S3 buckets ``spec`` reads or writes, each with the first field naming it."""
    found: dict[str, Bucket] = {}
    fields = [("dataset.uri", spec.dataset.uri), ("dataset.eval_uri", spec.dataset.eval_uri)]
    if spec.checkpoint:
        fields.append(("checkpoint.uri", spec.checkpoint.uri))
    for field, uri in fields:
        if uri and uri.startswith("s3://"):
            name = uri[len("s3://"):].split("/", 1)[0]
            found.setdefault(name, Bucket(field, uri, name))
    return list(found.values())


def check_endpoints(spec: JobSpec, settings: Settings | None = None, timeout_s: float = PROBE_TIMEOUT_S,
                    buckets_too: bool = True) -> None:
    """Every S3 bucket of ``spec`` answers at its endpoint within ``timeout_s`` (all probed at
    once; with ``buckets_too=False`` only the endpoint: DNS and TCP). Raises
    :class:`StorageUnreachable` for the first that does not."""
    targets = buckets(spec)
    if not targets:
        return
    settings = settings or Settings.from_env()
    endpoint = settings.s3_endpoint  # None: AWS, botocore's regional endpoint
    shown = endpoint or "AWS S3"
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(4, len(targets)), thread_name_prefix="probe")
    try:
        futures = [pool.submit(_probe, endpoint, b.name, timeout_s, buckets_too) for b in targets]
        done, _ = concurrent.futures.wait(futures, timeout=timeout_s + 0.5)
        for bucket, future in zip(targets, futures):
            problem = future.result() if future in done else f"no answer within {timeout_s:g} s"
            if problem:
                raise StorageUnreachable(f"{bucket.field}: {bucket.uri}: bucket {bucket.name!r} at "
                                         f"{shown}: {problem}{_hint(problem)}")
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _hint(problem: str) -> str:
    if problem.startswith(("DNS", "refused", "no answer")):
        return " (is SHIPYARD_S3_ENDPOINT right?)"
    if problem.startswith("auth"):
        return " (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the role)"
    return ""


def _probe(endpoint: str | None, bucket: str, timeout_s: float, head: bool = True) -> str | None:
    """None when ``HeadBucket`` succeeds, else the error class and what was said."""
    import botocore.session
    from botocore.config import Config

    client = botocore.session.get_session().create_client("s3", endpoint_url=endpoint, config=Config(
        connect_timeout=timeout_s, read_timeout=timeout_s, retries={"total_max_attempts": 1}))
    try:
        problem = _reachable(client.meta.endpoint_url, timeout_s)
        return problem if problem or not head else _head_bucket(client, bucket)
    finally:
        client.close()


def _reachable(endpoint: str, timeout_s: float) -> str | None:
    """The endpoint's host resolves and accepts a TCP connection (botocore would retry both)."""
    parts = urlsplit(endpoint)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return f"DNS: host {host!r} does not resolve ({e.strerror or e})"
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except ConnectionRefusedError:
        return f"refused: nothing listens on {host}:{port}"
    except (socket.timeout, TimeoutError):
        return f"no answer within {timeout_s:g} s from {host}:{port}"
    except OSError as e:
        return f"refused: {host}:{port}: {e.strerror or e}"
    return None


def _head_bucket(client, bucket: str) -> str | None:
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        client.head_bucket(Bucket=bucket)
    except NoCredentialsError:
        return "auth: no credentials found"
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status == 301 or code == "PermanentRedirect":
            return None  # the bucket exists, in another region (s3fs follows the redirect)
        if status == 404 or code in ("404", "NoSuchBucket"):
            return "no such bucket"
        if status in (401, 403) or code in ("403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"):
            return f"auth: {status} {code}: the credentials were refused or may not read this bucket"
        return f"{status} {code}"
    except BotoCoreError as e:
        return f"{type(e).__name__}: {e}"
    return None


# -- datasets -----------------------------------------------------------------------------------

def check_datasets(spec: JobSpec) -> None:
    """The dataset (and eval dataset) has a readable manifest whose shards are all listed and of
    the spec's format. Raises a :class:`UserError` naming the field."""
    from shipyard.data import read_manifest
    from shipyard.data.manifest import check_shards
    from shipyard.errors import DataError

    for label, uri in _dataset_uris(spec):
        try:
            manifest = read_manifest(uri)
            check_shards(manifest)
        except UserError as e:
            raise type(e)(f"{label}: {e}") from None
        if spec.dataset.format not in ("auto", manifest.format):
            raise DataError(f"dataset.format: {spec.dataset.format!r}, but {uri} holds {manifest.format} shards; "
                            f"set it to {manifest.format!r} or 'auto'")


def _dataset_uris(spec: JobSpec) -> Iterable[tuple[str, str]]:
    for label, uri in (("dataset.uri", spec.dataset.uri), ("dataset.eval_uri", spec.dataset.eval_uri)):
        if uri:
            yield label, uri
