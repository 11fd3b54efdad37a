"""benchmarks/figure_importance_sampling.py at a tiny size: pi_old after one ppo_discrete.py iteration on CartPole,
a 256-step batch, 8 Adam steps; the quantities that must hold whatever the numbers, the exact Gaussian E_old[r^2]
against sampling, and (with matplotlib) the figure."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import figure_importance_sampling as fig  # noqa: E402


@pytest.fixture(scope="module")
def case():
    return fig.measure("CartPole-v1", train_steps=512, batch_size=256, epochs=2)


def test_pi_old_against_itself_is_the_on_policy_estimate(case):
    first = case["pairs"][0]
    assert first["step"] == 0
    assert first["kl"] == 0 and first["kl_k3"] == 0
    assert first["r2_exact"] == pytest.approx(1.0) and first["mean_exp_2kl"] == pytest.approx(1.0)
    for key in ("var_is", "var_clipped", "var_ppo"):
        assert first[key] == pytest.approx(1.0)
    assert first["outside_clip"] == 0 and first["fit"]["outside_clip"] == 0
    assert first["histogram"][fig.BINS.searchsorted(1.0, side="right") - 1] == 256  # every r == 1: one bin


def test_pairs_hold_what_must_hold(case):
    pairs = case["pairs"]
    assert [p["step"] for p in pairs] == [0, 1, 2, 3, 4, 6, 8]  # 2 epochs of 4 minibatches of 64
    for p in pairs:
        assert p["kl"] >= 0 and p["kl_k3"] >= 0
        assert p["r2_exact"] >= 1.0 - 1e-6  # 1 + chi^2
        assert p["mean_exp_2kl"] >= math.exp(2 * p["kl"]) * (1 - 1e-6)  # Jensen
        assert sum(p["histogram"]) + p["above_3"] == 256
        assert 0 <= p["outside_clip"] <= 1
    assert pairs[-1]["kl"] > 0
    law = fig.law_check(case, kls=(pairs[2]["kl"],))
    assert law["r2_exact"][0] == pytest.approx(pairs[2]["r2_exact"] / math.exp(2 * pairs[2]["kl"]), rel=1e-6)


def test_gaussian_second_moment_is_exact():
    torch.manual_seed(0)
    old = (torch.tensor([[0.3, -1.0]], dtype=torch.float64), torch.tensor([0.0, -0.5], dtype=torch.float64))
    new = (torch.tensor([[0.8, -0.7]], dtype=torch.float64), torch.tensor([-0.1, -0.45], dtype=torch.float64))
    actions = old[0] + old[1].exp() * torch.randn(500_000, 2, dtype=torch.float64)
    ratio = (fig.Gaussian.logprob(new, actions) - fig.Gaussian.logprob(old, actions)).exp()
    assert fig.Gaussian.second_moment(old, new).item() == pytest.approx(ratio.square().mean().item(), rel=1e-2)
    same_std = (new[0], old[1])  # the article's law holds exactly per state
    kl = fig.Gaussian.kl(old, same_std)
    assert fig.Gaussian.second_moment(old, same_std).item() == pytest.approx((2 * kl).exp().item(), rel=1e-9)
    too_wide = (new[0], old[1] + 0.5 * math.log(2.0))  # sigma_new^2 = 2 sigma_old^2: no variance
    assert math.isinf(fig.Gaussian.second_moment(old, too_wide).item())


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed")
def test_plot(case, tmp_path):
    out = tmp_path / "importance_sampling.png"
    fig.plot({"cases": [case]}, out)
    assert out.stat().st_size > 0
