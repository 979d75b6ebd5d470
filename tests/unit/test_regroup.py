"""Which failures a surviving rank recovers from in place (runtime/regroup.py): a lost peer, seen
as gloo's or torch.distributed's error however deeply it is wrapped; not the rank's own bug."""

import torch.distributed as dist

from shipyard.runtime.regroup import is_peer_loss

GLOO = ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
        "[127.0.0.1]:53403. This is typically caused by a remote worker crashing.")


class CheckpointException(BaseException):  # the shape of DCP's: rank -> (exception, traceback)
    def __init__(self, failures):
        self.failures = failures


def test_gloo_and_torch_distributed_errors_are_a_lost_peer():
    assert is_peer_loss(RuntimeError(GLOO))
    assert is_peer_loss(dist.DistNetworkError("The client socket has timed out"))


def test_a_lost_peer_is_found_inside_what_wraps_it():
    try:
        try:
            raise RuntimeError(GLOO)
        except RuntimeError as e:
            raise RuntimeError("checkpoint at step 40 to /ck/step-40 failed") from e
    except RuntimeError as wrapped:
        assert is_peer_loss(wrapped)
    assert is_peer_loss(CheckpointException({1: (RuntimeError(GLOO), "traceback")}))


def test_the_ranks_own_errors_are_not():
    assert not is_peer_loss(RuntimeError("injected bug at step 15"))
    assert not is_peer_loss(ValueError("gloo is mentioned, but not gloo's own error"))
