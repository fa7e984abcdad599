"""Hardware peak for MFU: a measured matmul throughput when params give none."""

from __future__ import annotations

import statistics
import time

import torch


def measure_matmul_peak(
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", n: int = 2048, reps: int = 5
) -> float:
    """FLOP/s of a square (n x n) @ (n x n) matmul in ``dtype`` on ``device``: the denominator of MFU.

    The median of ``reps`` timed products after one warm-up, so a single preempted repetition does not
    move it. A large square matmul is the best case for the BLAS; model-FLOP utilisation against it says
    how much of the achievable machine a training step uses.
    """
    device = torch.device(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def product() -> None:
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    product()  # warm-up
    wall = []
    for _ in range(reps):
        start = time.perf_counter()
        product()
        wall.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(wall)
