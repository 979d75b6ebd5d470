"""Built-in metrics: what the platform measures on rank 0's loop without the user doing anything.

``TrainContext.batches()`` stamps the clock twice per step (around the wait for the next batch,
and once the user's code hands control back); everything else is arithmetic on local numbers.
Nothing here talks to other ranks or to Ray per step: the aggregates ride on the context's
throttled push (about once a second), and the per-step points (for TensorBoard) are kept only
when asked for. A step's time runs from one step boundary to the next, so it holds the wait for
its batch, the user's forward/backward/optimizer step and any checkpoint taken after it.

Names (all numbers, all global where they are rates):

- ``step_time_s``: mean seconds per step since the last push.
- ``data_wait_s``: mean seconds per step the loop waited for its next batch (rank 0's stream).
- ``samples_per_s``: ``dataset.batch_size`` x data-parallel ranks / step time.
- ``tokens_per_s``: tokens per step x data-parallel ranks / step time, when a step's tokens are
  known: the element count of ``batch[metrics.tokens_key]``, else of the batch's first 2-D
  integer tensor (token ids, by convention); absent when the batch has none.
- ``gpu_mem_gib``: ``torch.cuda.max_memory_allocated`` of rank 0's device, on GPU only.
- ``checkpoint_blocked_s``: how long the last checkpoint stopped the loop (set by the context
  when a checkpoint commits).
"""

from __future__ import annotations


# torch is imported where it is used: the API server imports BUILTIN and must not pay for torch.
BUILTIN = ("step_time_s", "data_wait_s", "samples_per_s", "tokens_per_s", "gpu_mem_gib", "checkpoint_blocked_s")
MAX_PENDING_STEPS = 100_000  # per-step points waiting for a push; a loop that never pushes cannot grow without end


def token_key(batch: dict, declared: str | None) -> str | None:
    """The batch key whose element count is a step's tokens on this rank (see the module doc)."""
    import torch

    if declared is not None:
        return declared if isinstance(batch.get(declared), torch.Tensor) else None
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.dim() == 2 and not v.is_floating_point() and not v.is_complex() \
                and v.dtype is not torch.bool:
            return k
    return None


class StepMeter:
    """Step clock of one rank's loop; every method is called by the loop's thread (the upload
    thread's commit events go through the publisher, which never reads the meter), so no lock."""

    def __init__(self, *, samples_per_step: int, dp_world: int, device: "torch.device",
                 tokens_key: str | None = None, per_step: bool = False):
        self.samples_per_step, self.dp_world, self.device = samples_per_step, dp_world, device
        self.tokens_key, self._key_known = tokens_key, False
        self.per_step = per_step
        self._last: float | None = None  # the previous step boundary
        self._wait: float | None = None  # the wait for the batch of the step now running (None: no step running)
        self._tokens = 0
        self._n = 0
        self._time = self._wait_sum = 0.0
        self._tokens_sum = 0
        self._steps: list[tuple[int, dict[str, float]]] = []

    def fetched(self, batch: dict, wait_s: float) -> None:
        """The loop got its next batch after waiting ``wait_s`` seconds (a step of several
        batches, with ``gradient_accumulation``, counts the waits and tokens of all of them)."""
        if not self._key_known:
            self.tokens_key, self._key_known = token_key(batch, self.tokens_key), True
        t = batch.get(self.tokens_key) if self.tokens_key is not None else None
        self._tokens += t.numel() if hasattr(t, "numel") else 0
        self._wait = (self._wait or 0.0) + wait_s

    def boundary(self, step: int, now: float) -> None:
        """A step boundary (the user's code is done with ``step``; checkpoints, if due, are taken)."""
        if self._wait is not None and self._last is not None:
            dt = now - self._last
            self._n += 1
            self._time += dt
            self._wait_sum += self._wait
            self._tokens_sum += self._tokens
            if self.per_step and len(self._steps) < MAX_PENDING_STEPS:
                self._steps.append((step, {"step_time_s": dt, "data_wait_s": self._wait}))
        self._wait, self._last, self._tokens = None, now, 0

    def flush(self) -> dict[str, float]:
        """Aggregates since the previous flush (empty when no step finished since)."""
        n, seconds, wait, tokens = self._n, self._time, self._wait_sum, self._tokens_sum
        self._n, self._time, self._wait_sum, self._tokens_sum = 0, 0.0, 0.0, 0
        out: dict[str, float] = {}
        if n and seconds > 0:
            out = {"step_time_s": seconds / n, "data_wait_s": wait / n,
                   "samples_per_s": self.samples_per_step * n / seconds}
            if tokens:
                out["tokens_per_s"] = tokens * self.dp_world / seconds
        if self.device.type == "cuda":
            import torch

            out["gpu_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return out

    def take_steps(self) -> list[tuple[int, dict[str, float]]]:
        """The per-step points recorded since the last call (only with ``per_step``)."""
        steps, self._steps = self._steps, []
        return steps
