"""benchmarks/figure_trust_region.py at a few steps: the closed-form J is the Monte-Carlo mean of the reward, the
Fisher from trpo.fisher_vector_product is diag(1 / sigma^2, 2), every TRPO step keeps the exact KL within delta
and raises J, vanilla PG's first step has the quadratic-model KL delta, and the figure draws."""

import importlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
figure = importlib.import_module("figure_trust_region")


def reward(a: torch.Tensor) -> torch.Tensor:
    """R(a) as the script's docstring writes it, sampled instead of integrated."""
    bump = figure.PEAK_HEIGHT * torch.exp(-(a**2) / (2 * figure.PEAK_WIDTH**2))
    hill = figure.HILL_HEIGHT * torch.exp(-(a**2) / (2 * figure.HILL_WIDTH**2))
    return bump + hill - figure.DROP * (a > figure.EDGE).to(a.dtype)


@pytest.mark.parametrize("theta", [(-2.5, 0.5), (0.0, -2.0), (0.45, -1.0), (1.0, 0.0)])
def test_expected_reward_is_the_mean_reward(theta):
    generator = torch.Generator().manual_seed(0)
    mu, log_std = theta
    a = mu + math.exp(log_std) * torch.randn(400_000, generator=generator, dtype=torch.float64)
    exact = figure.expected_reward(torch.tensor(theta, dtype=torch.float64)).item()
    assert exact == pytest.approx(reward(a).mean().item(), abs=5e-3)


def test_fisher_is_the_gaussian_one():
    theta = torch.tensor([0.3, -1.2], dtype=torch.float64)
    fisher = figure.fisher_matrix(theta)
    assert torch.allclose(fisher, torch.diag(torch.tensor([math.exp(2.4), 2.0], dtype=torch.float64)))


def test_paths_at_a_few_steps(tmp_path):
    data = figure.rounded_tree(figure.compute(steps=8), 6)
    trust, vanilla = data["trpo"], data["vanilla"]["1.0"]
    assert len(trust["path"]) == len(trust["J"]) == len(trust["fisher"]) == 9
    assert trust["path"][0] == vanilla["path"][0] == list(figure.THETA_0)
    assert all(0 < kl <= data["max_kl"] for kl in trust["step_kl"])
    assert all(later > earlier for earlier, later in zip(trust["J"], trust["J"][1:]))  # the line search's promise
    # lr is set so that 1/2 step^T F step = delta for the first step; its exact KL is close to that
    assert vanilla["step_kl"][0] == pytest.approx(data["max_kl"], rel=0.15)
    assert set(data["vanilla"]) == {str(f) for f in figure.LR_FACTORS}
    assert len(json.dumps(data)) < 20_000
    pytest.importorskip("matplotlib")
    figure.plot(data, tmp_path / "trust_region.png")
    assert (tmp_path / "trust_region.png").stat().st_size > 0
