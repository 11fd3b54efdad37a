"""What one env step of the observation normaliser costs on the CPU: torch ops against numpy views.

    python benchmarks/normaliser_cost.py

Prints (1) microseconds per call of a few single ops on 17 float64 numbers (HalfCheetah's observation), in
numpy and in torch, and (2) microseconds per step of update + normalize over 20,000 streamed one-row batches:
ppo_continuous.py's RunningMeanStd (numpy views of its device tensors, commit 5d9cb2b) against the same
class as it was before that commit (torch ops on the tensors, written out below as TorchRunningMeanStd). Timed
alone, not inside the training loop, where every per-step call costs more (benchmarks/SPEED_continuous.md).
Best of 3; run it with nothing else on the machine.

It compares the numpy-view RunningMeanStd of commits 5d9cb2b-5e54b5e; since 509f8ad the scripts' class is
the torch one again (issue 22: the views bought 2% of a run, benchmarks/kept_devices.py), so run it in a
checkout of 5e54b5e.
"""

from __future__ import annotations

import sys
import time
import timeit
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ppo_continuous import NORM_CLIP, NORM_EPS, RunningMeanStd  # noqa: E402


class TorchRunningMeanStd:
    """ppo_continuous.py's RunningMeanStd before commit 5d9cb2b: the same formulas as torch ops (update and
    normalize only)."""

    def __init__(self, shape: tuple[int, ...], device: torch.device):
        self.mean = torch.zeros(shape, dtype=torch.float64, device=device)
        self.var = torch.ones(shape, dtype=torch.float64, device=device)
        self.count = 0.0

    def update(self, batch: torch.Tensor) -> None:
        n = batch.shape[0]
        if n == 1:
            batch_mean, batch_var = batch[0], None
        else:
            batch_var, batch_mean = torch.var_mean(batch, dim=0, correction=0)
        self.count += n
        w = n / self.count
        delta = batch_mean - self.mean
        self.mean.add_(delta, alpha=w)
        self.var.mul_(1.0 - w)
        if batch_var is not None:
            self.var.add_(batch_var, alpha=w)
        self.var.addcmul_(delta, delta, value=w * (1.0 - w))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / (self.var + NORM_EPS).sqrt()).clamp_(-NORM_CLIP, NORM_CLIP).float()


def per_call_us(stmt: str, namespace: dict, number: int = 100_000) -> float:
    return min(timeit.repeat(stmt, globals=namespace, number=number, repeat=3)) / number * 1e6


def per_step_us(make, rows: np.ndarray, as_tensor: bool) -> float:
    best = float("inf")
    for _ in range(3):
        rms = make((rows.shape[-1],), torch.device("cpu"))
        with torch.inference_mode():  # as in the rollout
            start = time.perf_counter()
            for row in rows:
                # the code before 5d9cb2b converted each observation to a tensor first; the current one takes numpy
                raw = torch.as_tensor(row, dtype=torch.float64) if as_tensor else row
                rms.update(raw)
                rms.normalize(raw)
            best = min(best, (time.perf_counter() - start) / len(rows) * 1e6)
    return best


def main() -> None:
    torch.set_num_threads(1)
    x_np, y_np = np.random.default_rng(0).normal(size=(2, 17))
    x_t, y_t = torch.from_numpy(x_np.copy()), torch.from_numpy(y_np.copy())
    ns = {"np": np, "torch": torch, "x_np": x_np, "y_np": y_np, "x_t": x_t, "y_t": y_t}
    print("us per call on 17 float64 numbers (numpy | torch):")
    for name, numpy_stmt, torch_stmt in [
        ("subtract", "x_np - y_np", "x_t - y_t"),
        ("scalar multiply", "0.5 * x_np", "0.5 * x_t"),
        ("square root", "np.sqrt(y_np * y_np)", "(y_t * y_t).sqrt()"),
        ("clip", "x_np.clip(-1.0, 1.0)", "x_t.clip(-1.0, 1.0)"),
        ("to float32 tensor", "torch.from_numpy(x_np.astype(np.float32))", "x_t.float()"),
    ]:
        print(f"  {name:18s} {per_call_us(numpy_stmt, ns):5.2f} | {per_call_us(torch_stmt, ns):5.2f}")
    with torch.inference_mode():
        print(f"  numpy -> tensor, as_tensor (the old per-step conversion): "
              f"{per_call_us('torch.as_tensor(x_np, dtype=torch.float64)', ns):.2f}")

    rows = np.random.default_rng(1).normal(size=(20_000, 1, 17)) * 3 + 1  # one env: one row per step
    print("us per env step, update + normalize of one row:")
    print(f"  torch ops (before 5d9cb2b, with the as_tensor)  {per_step_us(TorchRunningMeanStd, rows, True):5.1f}")
    print(f"  numpy views (ppo_continuous.RunningMeanStd)     {per_step_us(RunningMeanStd, rows, False):5.1f}")


if __name__ == "__main__":
    main()
