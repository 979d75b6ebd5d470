"""What a user reads when an attempt fails (runtime/attempts.py): out-of-memory errors named as
such with the rank, the step and the size asked for; a process that died without a Python error
said so, not as an empty message."""

from __future__ import annotations

import pytest
import torch

from shipyard.run.records import AttemptKind as K
from shipyard.runtime.attempts import describe_failure, out_of_memory

CPU_OOM = ("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: you tried to "
           "allocate 8589934592 bytes. Error code 12 (Cannot allocate memory)")
CUDA_OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 139.72 GiB of which "
            "1.06 GiB is free.")


def test_a_cpu_allocation_failure_names_rank_step_and_size():
    f = describe_failure({1: RuntimeError(CPU_OOM), 0: RuntimeError("Connection reset by peer")}, step=37)
    assert f.kind is K.FAILED
    assert f.cause.startswith("rank 1: out of CPU memory (tried to allocate 8.00 GiB) at step 37: RuntimeError:")


def test_a_real_cpu_allocation_failure_is_recognised():
    with pytest.raises(RuntimeError) as e:
        torch.empty(1 << 60, dtype=torch.uint8)  # 1 EiB: refused by the allocator at once
    assert out_of_memory(e.value).startswith("out of CPU memory (tried to allocate")


def test_cuda_out_of_memory_keeps_the_size():
    error = torch.OutOfMemoryError(CUDA_OOM)
    assert out_of_memory(error) == "CUDA out of memory (tried to allocate 2.00 GiB)"
    assert describe_failure({0: error}, step=5).cause.startswith("rank 0: CUDA out of memory (tried to allocate 2.00 GiB) at step 5")


def test_memory_error_is_out_of_memory():
    assert describe_failure({0: MemoryError()}, step=2).cause == "rank 0: out of CPU memory at step 2: MemoryError"


def test_the_exception_of_a_failed_rank_is_kept_for_the_repeat_rule_but_a_dead_process_has_none():
    from ray.exceptions import ActorDiedError

    bug = describe_failure({0: ValueError("bad batch")})
    assert (bug.cause, bug.error) == ("rank 0: ValueError: bad batch", "ValueError: bad batch")
    died = describe_failure({1: ActorDiedError()})
    assert died.error is None and died.cause.startswith("rank 1: worker process died (")
