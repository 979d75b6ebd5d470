"""Code packages on the server: where a tenant's uploaded zips live, and what makes one acceptable.

A job's code reaches its workers from the submitter, never from the server's disk: ``shipyard
submit`` packs the job directory (:mod:`shipyard.package`), uploads it once per content
(``PUT /v1/packages/sha256:<hex>``), and the spec names it by digest. The backend hands the stored
zip to Ray as the job's ``working_dir``.

Packages are kept per tenant (``<root>/<tenant>/<hex>.zip``): a digest is not a secret (it is the
hash of code anyone may have), so a job may use only the packages its own tenant uploaded. The
root is a local directory (default ``<data dir>/packages``) or an object-store prefix
(``s3://bucket/prefix``, ``--package-store``); only the latter can be read by pods on Kubernetes.

An upload is checked before it is stored (:func:`check_zip`): its size, then that it is a zip
whose entries are plain relative paths (no absolute path, no ``..``, no symbolic link or other
special file, nothing encrypted), at most :attr:`PackageLimits.max_entries` of them, whose sizes
add up to at most :attr:`PackageLimits.max_uncompressed` and whose data decompresses to what the
entries declare (CRC checked). Ray unpacks with Python's ``zipfile``, which reads an entry only up
to its declared size, so the declared sum bounds what a worker writes to its disk.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from shipyard.errors import UserError

DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")
_TENANT = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
MiB = 1 << 20


class PackageRejected(UserError):
    """An uploaded package that is not acceptable; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 422):
        self.status = status
        super().__init__(message)


@dataclass(frozen=True)
class PackageLimits:
    """Bounds on one upload. 100 MiB of zip is far more code than any job needs (a repository
    with its data or checkpoints in it is the usual way to exceed it); 20,000 entries and 1 GiB
    unpacked keep a worker's unpack of a crafted archive (a zip bomb) short and small."""

    max_bytes: int = 100 * MiB
    max_entries: int = 20_000
    max_uncompressed: int = 1 << 30


def hex_of(digest: str) -> str:
    """The hex part of ``sha256:<64 hex>``, or PackageRejected naming the field."""
    m = DIGEST.match(digest)
    if not m:
        raise PackageRejected(f"digest: got {digest[:80]!r}; expected sha256:<64 lower-case hex digits>", 400)
    return m.group(1)


def _member_problem(info: zipfile.ZipInfo) -> str | None:
    name = info.filename
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if not name or "\x00" in name:
        return "an empty or NUL-containing name"
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "an absolute path"
    if ".." in parts:
        return "a '..' component"
    if info.flag_bits & 0x1:
        return "encryption"
    mode = info.external_attr >> 16
    if info.create_system == 3 and mode and stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
        return "a symbolic link" if stat.S_ISLNK(mode) else "a special file type"
    return None


def check_zip(path: str | Path, limits: PackageLimits = PackageLimits()) -> int:
    """Raise :class:`PackageRejected` unless the zip at ``path`` is safe to unpack; returns its
    number of entries. See the module docstring for what is checked."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise PackageRejected(f"body: not a zip file ({e})") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.max_entries:
            raise PackageRejected(f"body: the package has {len(infos)} entries; at most {limits.max_entries} "
                                  "are allowed", 413)
        seen: set[str] = set()
        total = 0
        for info in infos:
            problem = _member_problem(info)
            if problem:
                raise PackageRejected(f"body: entry {info.filename[:200]!r} has {problem}; a code package "
                                      "holds regular files under relative paths only")
            if info.filename in seen:
                raise PackageRejected(f"body: entry {info.filename[:200]!r} appears twice")
            seen.add(info.filename)
            total += info.file_size
            if total > limits.max_uncompressed:
                raise PackageRejected(f"body: the package unpacks to more than {limits.max_uncompressed / MiB:g} MiB "
                                      f"(the limit on its uncompressed size)", 413)
        try:
            bad = zf.testzip()  # every entry decompressed and its CRC checked, in bounded memory
        except (zipfile.BadZipFile, NotImplementedError, EOFError, OSError, ValueError) as e:
            raise PackageRejected(f"body: the zip's data is corrupt or uses an unsupported method ({e})") from None
        if bad is not None:
            raise PackageRejected(f"body: entry {bad[:200]!r} is corrupt (CRC mismatch)")
        return len(infos)


class PackageStore:
    """Per-tenant, content-addressed zips under ``root`` (a local directory or ``s3://...``)."""

    def __init__(self, root: str | Path, limits: PackageLimits = PackageLimits()):
        root = str(root)
        self.remote = root.startswith("s3://")
        if "://" in root and not self.remote:
            raise UserError(f"--package-store: got {root!r}; expected a local directory or s3://bucket/prefix")
        self.root = root.rstrip("/") if self.remote else str(Path(root).expanduser().resolve())
        self.limits = limits
        if not self.remote:
            Path(self.root).mkdir(parents=True, exist_ok=True, mode=0o700)

    @classmethod
    def open(cls, uri: str | None, data_dir: Path, limits: PackageLimits = PackageLimits()) -> "PackageStore":
        """The server's store: ``uri`` if given, else ``<data_dir>/packages``."""
        return cls(uri or Path(data_dir) / "packages", limits)

    def path_or_uri(self, tenant: str, digest: str) -> str:
        """Where the package is: a local path, or an ``s3://`` URI (what Ray's ``working_dir`` takes)."""
        if not _TENANT.match(tenant):
            raise PackageRejected(f"tenant: got {tenant!r}; not a tenant name", 400)
        name = f"{hex_of(digest)}.zip"
        return f"{self.root}/{tenant}/{name}" if self.remote else str(Path(self.root) / tenant / name)

    def exists(self, tenant: str, digest: str) -> bool:
        where = self.path_or_uri(tenant, digest)
        if not self.remote:
            return os.path.isfile(where)
        fs, path = self._fs(where)
        return fs.exists(path)

    def read_member(self, tenant: str, digest: str, name: str, max_bytes: int) -> bytes | None:
        """The bytes of file ``name`` in the tenant's package (None when it has no such file or
        the file is larger than ``max_bytes``). The zip was checked when it was uploaded."""
        where = self.path_or_uri(tenant, digest)
        if self.remote:
            fs, path = self._fs(where)
            handle = fs.open(path, "rb")
        else:
            handle = open(where, "rb")
        with handle as f, zipfile.ZipFile(f) as zf:
            try:
                info = zf.getinfo(name)
            except KeyError:
                return None
            return zf.read(info) if info.file_size <= max_bytes else None

    def staging_dir(self) -> str:
        """A directory for an upload in progress: on the store's own filesystem when local, so
        that :meth:`put` is a rename."""
        if self.remote:
            return tempfile.gettempdir()
        path = Path(self.root) / ".incoming"
        path.mkdir(exist_ok=True, mode=0o700)
        return str(path)

    def put(self, tenant: str, digest: str, source: str | Path) -> bool:
        """Store the verified file ``source`` (consumed) as the tenant's package; False if it was
        already there. Local: fsync, rename into place (a reader never sees half a package),
        mode 0600, fsync the directory. Object storage: one PUT, which S3 makes visible whole."""
        where = self.path_or_uri(tenant, digest)
        if self.exists(tenant, digest):
            os.unlink(source)
            return False
        if self.remote:
            fs, path = self._fs(where)
            try:
                fs.put_file(str(source), path)
            finally:
                os.unlink(source)
            return True
        target = Path(where)
        target.parent.mkdir(exist_ok=True, mode=0o700)
        os.chmod(source, 0o600)
        with open(source, "rb") as f:
            os.fsync(f.fileno())
        os.replace(source, target)
        fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    @staticmethod
    def _fs(uri: str):
        from shipyard.storage import filesystem

        return filesystem(uri)


__all__ = ["PackageStore", "PackageLimits", "PackageRejected", "check_zip", "hex_of", "DIGEST"]
