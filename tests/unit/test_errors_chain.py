"""The one exception-chain walk (errors.chain) and what decides with it: is_peer_loss, explain."""

import traceback

import torch.distributed as dist
from ray.train import WorkerGroupError
from torch.distributed.checkpoint.api import CheckpointException

from shipyard.errors import DataError, chain, first_line
from shipyard.runtime.launcher import explain
from shipyard.runtime.regroup import is_peer_loss

GLOO = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer")


def caused(error: BaseException, *, cause=None, context=None) -> BaseException:
    error.__cause__, error.__context__ = cause, context
    return error


def dcp_failure(**by_rank: BaseException) -> CheckpointException:
    """As DCP raises it: rank -> (exception, the traceback it was caught with)."""
    return CheckpointException("save failed", {int(r[1:]): (e, traceback.StackSummary()) for r, e in by_rank.items()})


class RayTaskError(Exception):
    """Stand-in for Ray's task errors, which carry the remote exception as ``cause``."""

    def __init__(self, cause: BaseException):
        super().__init__(f"task failed: {cause}")
        self.cause = cause


def test_chain_goes_depth_first_cause_before_context():
    a, b, c = ValueError("a"), KeyError("b"), OSError("c")
    top = caused(RuntimeError("top"), cause=caused(a, context=b), context=c)
    assert list(chain(top)) == [top, a, b, c]


def test_chain_yields_each_exception_once_and_ends_on_a_cycle():
    a, b = ValueError("a"), ValueError("b")
    a.__context__, b.__context__ = b, a
    assert list(chain(a)) == [a, b]
    shared = OSError("shared")
    diamond = caused(RuntimeError("top"), cause=caused(ValueError("x"), cause=shared), context=shared)
    assert [e for e in chain(diamond)].count(shared) == 1


def test_chain_follows_a_cause_attribute_and_ray_trains_worker_failures():
    inner = OSError("disk full")
    e0, e1 = RayTaskError(inner), ValueError("rank 1's own")
    group = WorkerGroupError("2 workers failed", {0: e0, 1: e1})
    assert list(chain(group)) == [group, e0, inner, e1]


def test_chain_unwraps_dcps_exception_traceback_tuples():
    e0, e1 = OSError("rank 0 write"), dist.DistNetworkError("rank 1 lost")
    failure = dcp_failure(r0=e0, r1=e1)
    assert list(chain(failure)) == [failure, e0, e1]
    wrapped = caused(RuntimeError("checkpoint at step 5 failed"), cause=failure)
    assert list(chain(wrapped))[-1] is e1


def test_first_line_is_the_messages_first_line_or_the_type_name():
    assert first_line(ValueError("  bad value\nmore detail")) == "bad value"
    assert first_line(ValueError()) == "ValueError"
    assert first_line(OSError("   ")) == "OSError"


def test_is_peer_loss_finds_a_dist_or_gloo_error_anywhere_in_the_chain():
    assert is_peer_loss(caused(ValueError("while saving"), context=GLOO))
    assert is_peer_loss(caused(RuntimeError("checkpoint failed"), cause=dcp_failure(r1=dist.DistNetworkError("x"))))
    assert is_peer_loss(WorkerGroupError("failed", {1: RayTaskError(dist.DistError("peer gone"))}))
    assert not is_peer_loss(caused(ValueError("user bug"), context=KeyError("k")))
    looped = ValueError("a")
    looped.__context__ = caused(ValueError("b"), context=looped)
    assert not is_peer_loss(looped)


def test_explain_names_the_users_error_wherever_ray_or_dcp_put_it():
    user = DataError("dataset.uri: s3://b/d has no manifest")
    assert explain(WorkerGroupError("failed", {0: RayTaskError(caused(RuntimeError("x"), cause=user))})) == (
        str(user), True)
    # DCP's tuples broke the old walk (a tuple has no __cause__); a user error behind them is found.
    assert explain(caused(RuntimeError("checkpoint failed"), cause=dcp_failure(r0=OSError("io"), r1=user))) == (
        str(user), True)


def test_explain_without_a_user_error_reports_the_deepest_cause():
    root = OSError("No space left on device")
    error = WorkerGroupError("failed", {0: RayTaskError(caused(RuntimeError("checkpoint at step 5 failed"),
                                                               cause=dcp_failure(r0=root)))})
    assert explain(error) == ("OSError: No space left on device", False)
