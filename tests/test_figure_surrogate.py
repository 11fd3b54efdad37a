"""benchmarks/figure_surrogate.py at a tiny size: a 1-iteration pi_old, a short slice, 16 episodes per t. What
must hold whatever the numbers: pi_t = pi_old at t = 0 (KL 0, ratio 1, so both surrogates 0 and nothing clipped),
KL >= 0, L^CLIP <= L^IS everywhere (the min is pessimistic), returns within CartPole's [1, 500], the same
episodes at every t; and the figure draws from the stored numbers alone."""

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
figure_surrogate = importlib.import_module("figure_surrogate")

TINY_SLICES = [{"name": "tiny", "lr_factor": 1.0, "t_range": (-1.0, 4.0), "ts_return": [-1, 0, 1, 4]},
               {"name": "tiny 10x", "lr_factor": 10.0, "t_range": (0.0, 2.0), "ts_return": [0, 2]}]


@pytest.fixture(scope="module")
def data():
    return figure_surrogate.compute(512, seed=3, episodes=16, points=11, slices=TINY_SLICES)


def test_slice_starts_at_pi_old_and_clip_is_pessimistic(data):
    assert data["batch_size"] == 512 and [s["name"] for s in data["slices"]] == ["tiny", "tiny 10x"]
    for s in data["slices"]:
        t = np.array(s["t"])
        assert set(s["t_return"]) <= set(s["t"])  # every J point has its KL and surrogates
        zero = int(np.flatnonzero(t == 0)[0])
        assert s["kl"][zero] == 0.0 and s["clipfrac"][zero] == 0.0
        assert s["L_IS"][zero] == pytest.approx(0.0, abs=1e-6) and s["L_CLIP"][zero] == pytest.approx(0.0, abs=1e-6)
        assert min(s["kl"]) >= 0.0 and max(s["kl"]) > 0.0
        assert np.all(np.array(s["L_CLIP"]) <= np.array(s["L_IS"]) + 1e-6)
        assert all(1.0 <= j <= 500.0 for j in s["J"]) and min(s["J_ci95"]) >= 0.0
        assert s["J_gain"][s["t_return"].index(0.0)] == 0.0
        assert s["d_norm"] > 0.0
    assert data["slices"][1]["d_norm"] > data["slices"][0]["d_norm"]  # 10x the learning rate: a longer step
    assert len(json.dumps(data)) < 200_000


def test_the_same_policy_gets_the_same_episodes():
    import torch

    actor = torch.nn.Linear(4, 2)
    first = figure_surrogate.episode_returns(actor, "CartPole-v1", 8, seed=5)
    assert np.array_equal(first, figure_surrogate.episode_returns(actor, "CartPole-v1", 8, seed=5))
    assert first.shape == (8,) and first.min() >= 1.0


def test_trust_region_is_the_interval_around_zero():
    s = {"t": [-3, -2, -1, 0, 1, 2, 3], "kl": [0.001, 0.05, 0.005, 0.0, 0.008, 0.03, 0.001]}
    assert figure_surrogate.trust_region(s, 0.01) == (-1.0, 1.0)
    assert figure_surrogate.trust_region(s, 0.1) == (-3.0, 3.0)


def test_summary_and_plot(data, tmp_path):
    text = figure_surrogate.summary(data)
    assert "L_CLIP peaks at t =" in text and "J(0) =" in text
    pytest.importorskip("matplotlib")
    figure_surrogate.plot(json.loads(json.dumps(data)), tmp_path / "surrogate.png")  # as --plot-only reads it
    assert (tmp_path / "surrogate.png").stat().st_size > 0
