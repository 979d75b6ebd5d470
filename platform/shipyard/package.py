"""Packing a job directory into the code package ``shipyard submit`` uploads.

The package is a zip of the job's ``workdir``, named by the sha256 of its bytes
(``sha256:<hex>``): the server stores it once per tenant, and a second submit of an unchanged
directory finds it there and uploads nothing. For that the zip is deterministic: entries in
sorted order, every timestamp 1980-01-01, mode 0644 (0755 for files their owner may execute),
DEFLATE at zlib's default level, no directory entries, no extra fields. (Two machines with
different zlib builds may still compress differently; that only costs one more upload.)

What goes in: every regular file under the directory, except what ``.gitignore`` or
``.shipyardignore`` files exclude (gitignore syntax, read in the directory and every directory
below it as git does, not in its parents; in one directory ``.shipyardignore`` comes after
``.gitignore``, so ``!name`` there re-includes what git ignores) and except ``.git/``,
``__pycache__/`` and ``.venv/`` at any depth, which are never code a job needs. A root entry
:data:`MARKER` is added: with at least one top-level file, Ray never mistakes the package for a
single wrapped directory (for ``s3://`` working dirs it strips such a directory), so the job sees
the same layout from every store.

Symbolic links (and sockets, FIFOs, devices) that are not ignored are *refused*, naming the
link: following one could pack files from outside the directory, and skipping it would leave a
job that fails on the cluster, far from the cause. Ignore it, or replace it with what it points at.

Size: at most :data:`MAX_FILES` files, adding up to at most :data:`DEFAULT_MAX_MB` MiB
(``SHIPYARD_MAX_PACKAGE_MB``, ``Client(max_package_mb=...)``, ``shipyard submit
--max-package-mb``), checked before anything is compressed; over it, the error names the largest
files. The server has its own cap on the zip (:mod:`shipyard.packages`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from shipyard.errors import UserError

DEFAULT_MAX_MB = 100
MAX_MB_ENV = "SHIPYARD_MAX_PACKAGE_MB"
ALWAYS_SKIP = frozenset({".git", "__pycache__", ".venv"})
IGNORE_FILES = (".gitignore", ".shipyardignore")
MAX_FILES = 19_999  # the server takes at most 20,000 entries, the marker included
MARKER = ".shipyard-package"
MARKER_TEXT = b"shipyard code package, format 1\n"
EPOCH = (1980, 1, 1, 0, 0, 0)
MiB = 1 << 20


@dataclass(frozen=True)
class Package:
    path: Path      # the zip (the caller deletes it)
    digest: str     # sha256:<hex> of the zip's bytes
    bytes: int      # size of the zip
    files: int      # files packed (the marker not counted)
    source: Path    # the directory packed


def max_package_bytes(max_mb: float | None = None) -> int:
    """The client's cap in bytes: ``max_mb``, else ``SHIPYARD_MAX_PACKAGE_MB``, else 100 MiB."""
    raw = max_mb if max_mb is not None else os.environ.get(MAX_MB_ENV)
    if raw is None or raw == "":
        return DEFAULT_MAX_MB * MiB
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UserError(f"{MAX_MB_ENV}: got {raw!r}; expected a positive number of MiB")
    return int(value * MiB)


def _matcher(directory: Path):
    """The ignore rules of one directory (its .gitignore, then .shipyardignore), or None."""
    lines: list[str] = []
    for name in IGNORE_FILES:
        path = directory / name
        if path.is_file() and not path.is_symlink():
            lines += path.read_text(errors="replace").splitlines()
    if not any(line.strip() and not line.lstrip().startswith("#") for line in lines):
        return None
    import pathspec

    return pathspec.GitIgnoreSpec.from_lines(lines)


def _ignored(rules: list[tuple[str, object]], rel: str, is_dir: bool) -> bool:
    """Git's precedence: the deepest ignore file with a matching pattern decides; inside one
    file the last matching pattern does (``!pattern`` re-includes)."""
    for base, spec in reversed(rules):
        sub = rel[len(base):] + ("/" if is_dir else "")
        result = spec.check_file(sub)
        if result.include is not None:
            return bool(result.include)
    return False


def collect(directory: str | Path) -> list[tuple[str, Path, int, bool]]:
    """``(archive name, path, size, executable)`` for every file to pack, sorted by name."""
    root = Path(directory)
    if not root.is_dir():
        raise UserError(f"workdir: {root} is not a directory")
    out: list[tuple[str, Path, int, bool]] = []

    def walk(path: Path, rel: str, rules: list[tuple[str, object]]) -> None:
        spec = _matcher(path)
        if spec is not None:
            rules = [*rules, (rel, spec)]
        with os.scandir(path) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            name = rel + entry.name
            if entry.is_dir(follow_symlinks=False):
                if entry.name in ALWAYS_SKIP or _ignored(rules, name, True):
                    continue
                walk(Path(entry.path), name + "/", rules)
                continue
            # A link to a directory is also matched as one, so `data/` ignores a link named data.
            as_dir = entry.is_symlink() and entry.is_dir()
            if name == MARKER or _ignored(rules, name, False) or (as_dir and _ignored(rules, name, True)):
                continue
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                raise UserError(f"workdir: {name} is a symbolic link (to {os.readlink(entry.path)}); code "
                                "packages hold regular files only: list it in .shipyardignore or replace it "
                                "with what it points at")
            if not stat.S_ISREG(st.st_mode):
                raise UserError(f"workdir: {name} is not a regular file; list it in .shipyardignore")
            out.append((name, Path(entry.path), st.st_size, bool(st.st_mode & stat.S_IXUSR)))
            if len(out) > MAX_FILES:  # stop walking: a home directory or a dataset, not a job's code
                raise UserError(f"workdir: {root} holds more than {MAX_FILES} files to package (seen so far "
                                f"under {rel or './'}); leave data, environments and build output out with "
                                ".shipyardignore")

    walk(root, "", [])
    return sorted(out, key=lambda item: item[0])


def _mib(n: int) -> str:
    return f"{n / MiB:.1f} MiB"


def pack(directory: str | Path, out_dir: str | Path | None = None, max_bytes: int | None = None) -> Package:
    """Pack ``directory`` into a zip under ``out_dir`` (default: a new temporary directory)."""
    root = Path(directory).resolve()
    files = collect(root)
    cap = max_package_bytes() if max_bytes is None else max_bytes
    total = sum(size for _, _, size, _ in files)
    if total > cap:
        largest = sorted(files, key=lambda f: (-f[2], f[0]))[:5]
        raise UserError(f"workdir: {root} holds {_mib(total)} to package in {len(files)} files, over the "
                        f"{_mib(cap)} limit ({MAX_MB_ENV} or --max-package-mb); largest: "
                        + ", ".join(f"{name} ({_mib(size)})" for name, _, size, _ in largest)
                        + "; leave data and checkpoints out with .shipyardignore")
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="shipyard-package-"))
    fd, tmp = tempfile.mkstemp(prefix=".package-", suffix=".zip", dir=out)
    os.close(fd)
    with zipfile.ZipFile(tmp, "w") as zf:
        for name, path, _, executable in [(MARKER, None, 0, False), *files]:
            info = zipfile.ZipInfo(name, date_time=EPOCH)
            info.create_system = 3
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (stat.S_IFREG | (0o755 if executable else 0o644)) << 16
            with zf.open(info, "w") as dst:
                if path is None:
                    dst.write(MARKER_TEXT)
                else:
                    with open(path, "rb") as src:
                        shutil.copyfileobj(src, dst, 1 << 20)
    sha = hashlib.sha256()
    with open(tmp, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    final = out / f"{sha.hexdigest()}.zip"
    os.replace(tmp, final)
    return Package(final, f"sha256:{sha.hexdigest()}", final.stat().st_size, len(files), root)


__all__ = ["Package", "pack", "collect", "max_package_bytes", "MARKER", "DEFAULT_MAX_MB", "MAX_MB_ENV"]
