"""Preflight (shipyard/preflight.py): the entrypoint parsed, never imported; storage endpoints
probed with one line naming field, endpoint, bucket and the class of error, in seconds."""

from __future__ import annotations

import socket
import time

import pytest

from shipyard.errors import SpecError
from shipyard.preflight import StorageUnreachable, buckets, check_endpoints, check_entrypoint_source
from shipyard.config import Settings
from shipyard.spec import spec_from_dict

SOURCE = b"""
import os
from helpers import evaluate as score

def train(ctx):
    pass

def _helper():
    pass

class Model:
    pass
"""


def spec(**dataset):
    return spec_from_dict({"name": "p", "entrypoint": "train.py:train",
                           "dataset": {"uri": "s3://data/train", "eval_uri": "s3://data/test", **dataset},
                           "checkpoint": {"uri": "s3://ckpt/p"}}, resolve=False)


def test_the_function_is_found_by_parsing_including_an_imported_name():
    check_entrypoint_source(SOURCE, "train.py", "train")
    check_entrypoint_source(SOURCE, "train.py", "score")


def test_a_missing_function_is_named_with_the_ones_the_file_has():
    with pytest.raises(SpecError, match=r"^entrypoint: train.py defines no 'trian' at its top level "
                                        r"\(its functions: train, _helper\)$"):
        check_entrypoint_source(SOURCE, "train.py", "trian")


def test_a_syntax_error_names_the_line_and_nothing_runs():
    with pytest.raises(SpecError, match=r"^entrypoint: train.py line 2: "):
        check_entrypoint_source(b"import os\ndef train(ctx)\n    raise SystemExit('ran')\n", "train.py", "train")


def test_each_bucket_is_probed_once_under_the_first_field_naming_it():
    assert [(b.field, b.name) for b in buckets(spec())] == [("dataset.uri", "data"), ("checkpoint.uri", "ckpt")]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("endpoint, problem", [
    (f"http://127.0.0.1:{closed_port()}", "refused: nothing listens on 127.0.0.1:"),
    ("http://no-such-host.invalid:9000", "DNS: host 'no-such-host.invalid' does not resolve"),
])
def test_an_unusable_endpoint_is_one_line_in_seconds(endpoint, problem):
    t0 = time.monotonic()
    with pytest.raises(StorageUnreachable) as e:
        check_endpoints(spec(), Settings.from_env({"SHIPYARD_S3_ENDPOINT": endpoint}), timeout_s=5)
    took = time.monotonic() - t0
    message = str(e.value)
    assert message.startswith(f"dataset.uri: s3://data/train: bucket 'data' at {endpoint}: {problem}"), message
    assert "SHIPYARD_S3_ENDPOINT" in message and "\n" not in message
    print(f"preflight {problem.split(':')[0]}: {took:.2f} s")
    assert took < 15
