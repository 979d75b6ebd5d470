"""Code packages: the client's deterministic zip (shipyard.package) and the server's check of an
uploaded one (shipyard.packages.check_zip)."""

from __future__ import annotations

import io
import os
import stat
import zipfile
from pathlib import Path

import pytest

from shipyard.errors import UserError
from shipyard.package import MARKER, collect, max_package_bytes, pack
from shipyard.packages import PackageLimits, PackageRejected, PackageStore, check_zip, hex_of


def job_dir(root: Path) -> Path:
    (root / "pkg").mkdir(parents=True)
    (root / "train.py").write_text("def train(ctx):\n    pass\n")
    (root / "pkg" / "model.py").write_text("X = 1\n")
    (root / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(root / "run.sh", 0o755)
    return root


def names(directory: Path) -> list[str]:
    return [name for name, *_ in collect(directory)]


def test_the_digest_depends_on_content_only(tmp_path):
    a = pack(job_dir(tmp_path / "a"), tmp_path)
    b = pack(job_dir(tmp_path / "b"), tmp_path)  # same files, other directory, other mtimes
    os.utime(tmp_path / "a" / "train.py", (0, 0))
    again = pack(tmp_path / "a", tmp_path)
    assert a.digest == b.digest == again.digest and a.digest.startswith("sha256:") and len(a.digest) == 71
    assert a.path.read_bytes() == again.path.read_bytes() and a.files == 3
    (tmp_path / "a" / "pkg" / "model.py").write_text("X = 2\n")
    assert pack(tmp_path / "a", tmp_path).digest != a.digest
    with zipfile.ZipFile(a.path) as zf:
        infos = zf.infolist()
    assert [i.filename for i in infos] == [MARKER, "pkg/model.py", "run.sh", "train.py"]
    assert {i.date_time for i in infos} == {(1980, 1, 1, 0, 0, 0)}
    modes = {i.filename: stat.S_IMODE(i.external_attr >> 16) for i in infos}
    assert modes["run.sh"] == 0o755 and modes["train.py"] == 0o644


def test_gitignore_and_shipyardignore_are_respected_and_git_venv_pycache_always_skipped(tmp_path):
    root = job_dir(tmp_path / "job")
    for d in (".git", ".venv/lib", "pkg/__pycache__", "data", "logs/sub"):
        (root / d).mkdir(parents=True)
    (root / ".git" / "HEAD").write_text("ref")
    (root / ".venv" / "lib" / "x.py").write_text("")
    (root / "pkg" / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"\0")
    (root / "data" / "train.bin").write_bytes(b"\0" * 10)
    (root / "logs" / "sub" / "a.log").write_text("")
    (root / "notes.log").write_text("")
    (root / "keep.log").write_text("")
    (root / "secret.env").write_text("")
    (root / ".gitignore").write_text("# comment\ndata/\n*.log\n!keep.log\n")
    (root / ".shipyardignore").write_text("secret.env\n")
    (root / "pkg" / ".gitignore").write_text("generated_*.py\n")  # a nested ignore file, relative to pkg/
    (root / "pkg" / "generated_a.py").write_text("")
    (root / "generated_b.py").write_text("")  # not under pkg/: kept
    assert names(root) == [".gitignore", ".shipyardignore", "generated_b.py", "keep.log", "pkg/.gitignore",
                           "pkg/model.py", "run.sh", "train.py"]
    # .shipyardignore comes after .gitignore: it may re-include what git ignores.
    (root / ".shipyardignore").write_text("secret.env\n!data/\n")
    assert "data/train.bin" in names(root)


def test_symlinks_are_refused_unless_ignored(tmp_path):
    root = job_dir(tmp_path / "job")
    (tmp_path / "outside").mkdir()
    (root / "data").symlink_to(tmp_path / "outside")
    with pytest.raises(UserError, match=r"workdir: data is a symbolic link .*\.shipyardignore"):
        collect(root)
    (root / ".shipyardignore").write_text("data/\n")  # a link to a directory matches a directory pattern
    assert "data" not in names(root)


def test_an_oversized_directory_is_refused_naming_its_largest_files(tmp_path):
    root = job_dir(tmp_path / "job")
    (root / "big.bin").write_bytes(b"\0" * (3 << 20))
    (root / "pkg" / "mid.bin").write_bytes(b"\0" * (2 << 20))
    with pytest.raises(UserError) as e:
        pack(root, tmp_path, max_bytes=max_package_bytes(4))
    msg = str(e.value)
    assert "\n" not in msg and "5.0 MiB to package" in msg and "over the 4.0 MiB limit" in msg
    assert msg.index("big.bin (3.0 MiB)") < msg.index("pkg/mid.bin (2.0 MiB)")
    assert not list(tmp_path.glob("*.zip"))  # refused before anything was written
    assert pack(root, tmp_path, max_bytes=max_package_bytes(6)).files == 5


def test_the_cap_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("SHIPYARD_MAX_PACKAGE_MB", "2.5")
    assert max_package_bytes() == int(2.5 * (1 << 20))
    assert max_package_bytes(1) == 1 << 20
    monkeypatch.setenv("SHIPYARD_MAX_PACKAGE_MB", "lots")
    with pytest.raises(UserError, match="SHIPYARD_MAX_PACKAGE_MB: got 'lots'"):
        max_package_bytes()


# -- the server's check of an upload -------------------------------------------------------------

def zip_of(*entries: tuple[str, bytes], mode: int | None = None, tmp: Path, method=zipfile.ZIP_DEFLATED) -> Path:
    path = tmp / f"z{len(list(tmp.iterdir()))}.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries:
            info = zipfile.ZipInfo(name)
            info.compress_type = method
            if mode is not None:
                info.create_system, info.external_attr = 3, mode << 16
            zf.writestr(info, data)
    return path


def test_a_packed_directory_passes_the_server_check(tmp_path):
    assert check_zip(pack(job_dir(tmp_path / "job"), tmp_path).path) == 4


@pytest.mark.parametrize("name, problem", [("../evil.py", "'..' component"), ("a/../../evil.py", "'..' component"),
                                           ("/etc/cron.d/x", "absolute path"), ("C:/x.py", "absolute path"),
                                           ("..\\evil.py", "'..' component")])
def test_traversal_and_absolute_entries_are_refused(tmp_path, name, problem):
    with pytest.raises(PackageRejected, match=problem) as e:
        check_zip(zip_of(("ok.py", b""), (name, b"x"), tmp=tmp_path))
    assert e.value.status == 422


def test_symlink_entries_are_refused(tmp_path):
    with pytest.raises(PackageRejected, match="symbolic link"):
        check_zip(zip_of(("link", b"/etc/passwd"), mode=stat.S_IFLNK | 0o777, tmp=tmp_path))


def test_zip_bombs_and_too_many_entries_are_refused(tmp_path):
    bomb = zip_of(("a", b"\0" * (3 << 20)), ("b", b"\0" * (3 << 20)), tmp=tmp_path)
    assert bomb.stat().st_size < 64 << 10
    with pytest.raises(PackageRejected, match="unpacks to more than 5 MiB") as e:
        check_zip(bomb, PackageLimits(max_uncompressed=5 << 20))
    assert e.value.status == 413
    many = zip_of(*((f"f{i}", b"") for i in range(11)), tmp=tmp_path)
    with pytest.raises(PackageRejected, match="11 entries; at most 10"):
        check_zip(many, PackageLimits(max_entries=10))


def test_corrupt_data_is_caught_by_the_crc_check(tmp_path):
    path = zip_of(("a.py", b"print(1)\n" * 100), tmp=tmp_path, method=zipfile.ZIP_STORED)
    raw = bytearray(path.read_bytes())
    raw[raw.index(b"print") + 3] ^= 0xFF  # the data no longer matches the CRC its header declares
    path.write_bytes(bytes(raw))
    with pytest.raises(PackageRejected, match="corrupt"):
        check_zip(path)


def test_not_a_zip_is_refused(tmp_path):
    (tmp_path / "x.zip").write_bytes(b"hello")
    with pytest.raises(PackageRejected, match="not a zip file"):
        check_zip(tmp_path / "x.zip")


def test_the_store_keeps_packages_per_tenant_with_mode_0600(tmp_path):
    store = PackageStore(tmp_path / "packages")
    package = pack(job_dir(tmp_path / "job"), tmp_path)
    assert not store.exists("a", package.digest)
    staged = Path(store.staging_dir()) / "upload.zip"
    staged.write_bytes(package.path.read_bytes())
    assert store.put("a", package.digest, staged) is True and not staged.exists()
    where = Path(store.path_or_uri("a", package.digest))
    assert where == tmp_path / "packages" / "a" / f"{hex_of(package.digest)}.zip"
    assert stat.S_IMODE(where.stat().st_mode) == 0o600
    assert store.exists("a", package.digest) and not store.exists("b", package.digest)
    with pytest.raises(PackageRejected, match="tenant"):
        store.path_or_uri("../b", package.digest)
    with pytest.raises(PackageRejected, match="digest: got"):
        store.exists("a", "sha256:XYZ")
    assert io.BytesIO(where.read_bytes()).getbuffer().nbytes == package.bytes


def test_too_many_files_are_refused_early(tmp_path, monkeypatch):
    import shipyard.package as package

    root = job_dir(tmp_path / "job")
    for i in range(5):
        (root / "pkg" / f"m{i}.py").write_text("")
    monkeypatch.setattr(package, "MAX_FILES", 4)
    with pytest.raises(UserError, match=r"more than 4 files to package .*\.shipyardignore"):
        collect(root)
