"""What this machine has: GPU, torch, CUDA, NCCL, and whether shipyard's imports resolve.

Prints one JSON line. ``python tests/gpu/probe.py`` checks CUDA only (cheap: what run.sh needs to
decide whether to skip); ``--full`` also times one bf16 matmul on the GPU and imports what
``shipyard run`` and its workers import (Ray, pyarrow, pydantic, ...), naming any that is missing,
so a first run on a fresh image says what the carry lacks instead of failing later.
"""

from __future__ import annotations

import importlib
import json
import platform
import shutil
import subprocess
import sys
import time

# What the driver (`shipyard run`) and a worker import; the first missing one explains later failures.
IMPORTS = ["ray", "ray.train.torch", "pyarrow", "pydantic", "fsspec", "yaml", "typer", "rich", "numpy",
           "shipyard.cli", "shipyard.runtime.launcher", "shipyard.runtime.worker", "shipyard.runtime.context",
           "shipyard.display", "shipyard.runtime.report"]


def cuda_facts() -> dict:
    import torch
    import torch.distributed as dist

    facts = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
             "cuda_available": torch.cuda.is_available(), "nccl_available": dist.is_nccl_available()}
    if not facts["cuda_available"]:
        return facts
    props = torch.cuda.get_device_properties(0)
    facts.update(device_count=torch.cuda.device_count(), gpu=props.name,
                 capability=f"{props.major}.{props.minor}", gpu_mem_gib=round(props.total_memory / 2**30, 1),
                 bf16=torch.cuda.is_bf16_supported())
    if facts["nccl_available"]:
        facts["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return facts


def driver() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "nvidia-smi timed out"
    return out.stdout.strip() or None


def matmul_tflops() -> float:
    """bf16 8192^3 matmul rate: a sanity check that the GPU computes at its speed (~790 on an H200)."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return round(10 * 2 * 8192**3 / (time.perf_counter() - t0) / 1e12, 1)


def imports() -> dict:
    found = {}
    for name in IMPORTS:
        try:
            module = importlib.import_module(name)
            found[name] = getattr(module, "__version__", "ok")
        except Exception as e:  # report every missing piece, not only the first
            found[name] = f"MISSING: {type(e).__name__}: {e}"
    return found


def main() -> None:
    facts = cuda_facts()
    if "--full" in sys.argv:
        facts["driver"] = driver()
        if facts["cuda_available"]:
            facts["bf16_matmul_tflops"] = matmul_tflops()
        facts["imports"] = imports()
    print(json.dumps(facts), flush=True)


if __name__ == "__main__":
    main()
