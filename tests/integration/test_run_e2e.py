"""End to end: digits shards in a bucket on the moto server, `shipyard run` on the session's
Ray cluster with 2 workers and checkpoints in the bucket, then a second run that resumes."""

import json
import re

import pytest
import s3fs

from conftest import REPO

pytestmark = pytest.mark.integration
JOB = str(REPO / "jobs" / "digits" / "job.yaml")


def accuracy(output: str) -> float:
    found = re.findall(r"accuracy=([0-9.]+)", output)
    assert found, output
    return float(found[-1])


def tensorboard_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_digits_trains_checkpoints_to_s3_and_resumes(bucket, s3_endpoint, ray_address, shipyard, tmp_path):
    data, ckpt = f"s3://{bucket}/digits", f"s3://{bucket}/checkpoints/digits"
    tb = tmp_path / "tb"
    for split in ("train", "test"):
        r = shipyard("data", "shard", f"sklearn:digits:{split}", f"{data}/{split}", "--rows-per-shard", "400")
        assert r.returncode == 0, r.stderr

    common = ["--set", f"dataset.uri={data}/train", "--set", f"dataset.eval_uri={data}/test",
              "--set", f"checkpoint.uri={ckpt}", "--set", "checkpoint.keep_last=2",
              "--set", "metrics.tensorboard=true", "--set", f"metrics.tensorboard_dir={tb}"]
    env = {"RAY_ADDRESS": ray_address}
    # First run: half the epochs (23 steps per epoch with 2 workers x 32 rows).
    first = shipyard("run", JOB, *common, "--set", "dataset.epochs=15", env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "step 345/345" in first.stdout
    assert f"latest checkpoint: {ckpt}/step-000000345" in first.stdout

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    committed = sorted(p.rsplit("/", 2)[-2] for p in fs.glob(f"{bucket}/checkpoints/digits/*/COMMIT.json"))
    assert committed == ["step-000000300", "step-000000345"]  # keep_last=2 pruned 100 and 200
    files = {p.rsplit("/", 1)[-1] for p in fs.find(f"{bucket}/checkpoints/digits/step-000000345")}
    assert {".metadata", "rank-00000.pt", "rank-00001.pt", "COMMIT.json"} <= files
    record = json.loads(fs.cat_file(f"{bucket}/checkpoints/digits/step-000000345/COMMIT.json"))
    assert record["world"] == 2 and record["epoch"] == 15 and len(record["data"]) == 2

    # Second run with the full 30 epochs picks up at step 345 instead of starting over.
    second = shipyard("run", JOB, *common, env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"restored from checkpoint at step 345 ({ckpt}/step-000000345)" in second.stdout
    assert "step 690/690" in second.stdout
    assert accuracy(second.stdout) >= 0.95
    assert fs.exists(f"{bucket}/checkpoints/digits/step-000000690/COMMIT.json")
    # Built-in metrics in the run's summary, and TensorBoard event files across both runs: one
    # point per step for the reported loss and the measured step time, each step once.
    assert re.search(r"step_time_s=[0-9.e-]+ .*samples_per_s=", second.stdout), second.stdout
    scalars = tensorboard_scalars(tb)
    for tag in ("loss", "step_time_s", "data_wait_s"):
        assert [s for s, _ in scalars[tag]] == list(range(1, 691)), tag
    assert scalars["accuracy"][-1] == (690, pytest.approx(accuracy(second.stdout), abs=1e-4))
    assert {s for s, _ in scalars["checkpoint_blocked_s"]} >= {100, 200, 300, 345, 400, 690}
    assert scalars["samples_per_s"] and all(v > 0 for _, v in scalars["samples_per_s"])

    # --fresh: step 0 under a new line of checkpoints, the old ones kept; a plain run then
    # resumes from the new line (one epoch each: 23 steps, then 46).
    short = common[:8] + ["--set", "dataset.epochs=1"]  # no TensorBoard
    third = shipyard("run", JOB, *short, "--fresh", env=env)
    assert third.returncode == 0, third.stdout + third.stderr
    assert "restored from checkpoint" not in third.stdout and "step 23/23" in third.stdout
    line = re.search(r"latest checkpoint: " + re.escape(ckpt) + r"/(fresh-\d{8}-\d{6})/step-000000023", third.stdout)
    assert line, third.stdout[-2000:]
    assert fs.exists(f"{bucket}/checkpoints/digits/step-000000690/COMMIT.json")  # nothing deleted
    fs.invalidate_cache()  # this client listed the prefix before the run wrote LINE.json
    assert json.loads(fs.cat_file(f"{bucket}/checkpoints/digits/LINE.json")) == {"line": line.group(1)}
    fourth = shipyard("run", JOB, *short[:-1], "dataset.epochs=2", env=env)
    assert fourth.returncode == 0, fourth.stdout + fourth.stderr
    assert f"restored from checkpoint at step 23 ({ckpt}/{line.group(1)}/step-000000023)" in fourth.stdout


def test_missing_dataset_uri_is_named_and_exits_2(bucket, s3_endpoint, shipyard):
    r = shipyard("run", JOB, "--set", f"dataset.uri=s3://{bucket}/absent", "--set", f"checkpoint.uri=s3://{bucket}/ck")
    assert r.returncode == 2
    assert f"dataset.uri: s3://{bucket}/absent: no dataset here" in r.stderr
    assert "Traceback" not in r.stdout + r.stderr


def test_missing_checkpoint_bucket_is_named(bucket, s3_endpoint, shipyard, tmp_path):
    r = shipyard("data", "shard", "sklearn:digits:test", str(tmp_path / "d"))
    assert r.returncode == 0, r.stderr
    r = shipyard("run", JOB, "--set", f"dataset.uri={tmp_path / 'd'}", "--set", "dataset.eval_uri=null",
                 "--set", "checkpoint.uri=s3://no-such-bucket-xyz/ck")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "checkpoint.uri: s3://no-such-bucket-xyz/ck" in r.stderr


def test_shard_into_missing_bucket_is_named(s3_endpoint, shipyard):
    r = shipyard("data", "shard", "sklearn:digits:test", "s3://no-such-bucket-xyz/d")
    assert r.returncode == 2
    assert r.stderr.strip() == "error: s3://no-such-bucket-xyz/d: bucket or directory does not exist"
