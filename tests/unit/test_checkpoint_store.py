"""Commit records, latest() and retention on local disk (S3 in tests/integration)."""

import time

from shipyard.checkpoint import CheckpointStore, CommitRecord
from shipyard.checkpoint.store import COMMIT


def fake_checkpoint(store: CheckpointStore, step: int, commit: bool = True) -> None:
    path = store.path_for(step)
    store.fs.makedirs(path, exist_ok=True)
    store.fs.pipe_file(f"{path}/__0_0.distcp", b"x" * step)
    if commit:
        store.commit(CommitRecord(step=step, epoch=0, world=2, strategy="ddp", time=time.time()))


def test_latest_ignores_uncommitted(tmp_path):
    store = CheckpointStore(str(tmp_path))
    assert store.latest() is None
    fake_checkpoint(store, 100)
    fake_checkpoint(store, 200, commit=False)  # a save that crashed mid-upload
    latest = store.latest()
    assert latest.step == 100 and latest.files == {"__0_0.distcp": 100}
    assert [(c.step, c.committed) for c in store.list()] == [(100, True), (200, False)]


def test_retention_keeps_exactly_n_committed(tmp_path):
    store = CheckpointStore(str(tmp_path))
    for step in (100, 200, 300, 400):
        fake_checkpoint(store, step)
    fake_checkpoint(store, 250, commit=False)
    removed = store.prune(keep_last=2)
    assert removed == [100, 200, 250]
    assert [c.step for c in store.list()] == [300, 400]


def test_interrupted_delete_leaves_nothing_visible(tmp_path):
    store = CheckpointStore(str(tmp_path))
    fake_checkpoint(store, 100)
    fake_checkpoint(store, 200)
    # A prune that died after removing the commit record but before the files:
    store.fs.rm_file(f"{store.path_for(200)}/{COMMIT}")
    assert store.latest().step == 100


# -- lines: `--fresh` --------------------------------------------------------------------------

def test_a_fresh_line_starts_empty_keeps_the_old_checkpoints_and_is_followed_afterwards(tmp_path):
    import pytest  # noqa: F401

    old = CheckpointStore(str(tmp_path))
    fake_checkpoint(old, 100)
    fresh = CheckpointStore(str(tmp_path), line="fresh-20261202-030000")
    assert fresh.latest() is None and fresh.uri == f"{tmp_path}/fresh-20261202-030000"
    fresh.follow_here()
    fake_checkpoint(fresh, 10)
    assert CheckpointStore(str(tmp_path)).latest().step == 10  # a plain run resumes from the new line
    assert old.latest().step == 100 and (tmp_path / "step-000000100" / COMMIT).exists()  # nothing deleted
    fresh.prune(keep_last=1)
    assert (tmp_path / "step-000000100" / COMMIT).exists()  # retention stays within its line


def test_a_requeued_older_line_does_not_take_the_newer_one_back(tmp_path):
    newer = CheckpointStore(str(tmp_path), line="fresh-20261202-040000")
    newer.follow_here()
    CheckpointStore(str(tmp_path), line="fresh-20261202-030000").follow_here()
    assert CheckpointStore(str(tmp_path)).line == "fresh-20261202-040000"


def test_a_line_record_someone_else_wrote_is_refused_naming_the_file(tmp_path):
    import pytest

    from shipyard.checkpoint.store import LINE
    from shipyard.errors import CheckpointError

    for body in (b'{"line": "../../other-tenant"}', b"x" * 5000, b"not json", b'["fresh-20261202-030000"]'):
        (tmp_path / LINE).write_bytes(body)
        with pytest.raises(CheckpointError, match=r"LINE.json is not a line record shipyard wrote"):
            CheckpointStore(str(tmp_path))
