"""benchmarks/figure_penalty.py at a tiny size: pi_old after 1 iteration of ppo_penalty.py, a batch of 256 steps.
At t = 0 (theta_old) every L^KL is mean(A) = 0 (normalised advantages) and the KL is 0; the KL is >= 0 along the
line; a larger beta never lets the maximiser's KL grow (for b1 < b2 the two optimality inequalities add up to
(b2 - b1) (KL(t*_1) - KL(t*_2)) >= 0); the schedule's shares add up; the figure draws."""

import importlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
figure = importlib.import_module("figure_penalty")


def test_penalty_figure_at_a_tiny_size(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing of the training run may be left behind, here or in the repo
    data = figure.rounded_tree(figure.compute(total_timesteps=512, batch_steps=256), 6)
    assert not list(tmp_path.iterdir())
    line = data["line"]
    zero = line["t"].index(0.0)
    assert line["kl"][zero] == 0.0
    assert all(kl >= 0.0 for kl in line["kl"])
    assert set(line["L"]) == {str(beta) for beta in figure.BETAS}
    for curve in line["L"].values():
        assert len(curve) == len(line["t"])
        assert curve[zero] == pytest.approx(0.0, abs=1e-6)
    maximisers = [line["maximiser"][str(beta)] for beta in sorted(figure.BETAS)]
    assert all(later["kl"] <= earlier["kl"] for earlier, later in zip(maximisers, maximisers[1:]))
    assert maximisers[0]["t"] > 0  # beta 0 climbs the gradient direction at least a little

    s = data["schedule"]
    assert s["share_in_band"] + s["share_above"] + s["share_below"] == pytest.approx(1.0)
    assert s["beta_min"] <= s["early_beta_min"] <= s["early_beta_max"] <= s["beta_max"]
    assert len(s["beta"]) == len(s["kl_exact"]) == len(s["iteration"])
    assert len(json.dumps(data)) < 200_000
    pytest.importorskip("matplotlib")
    figure.plot(data, tmp_path / "penalty_beta.png")
    assert (tmp_path / "penalty_beta.png").stat().st_size > 0
