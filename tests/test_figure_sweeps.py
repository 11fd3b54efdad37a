"""The two figure scripts that train through benchmarks/run.py (figure_sensitivity.py, figure_learning_curves.py):
every command they would run is one the script accepts, the cells do not repeat, and both draw from stored
summaries alone (their --plot-only path) without running anything."""

import importlib
import json
import sys
from pathlib import Path

import pytest
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
figure_sensitivity = importlib.import_module("figure_sensitivity")
figure_learning_curves = importlib.import_module("figure_learning_curves")


def test_sensitivity_cells_are_distinct_and_accepted_by_ppo_discrete():
    import ppo_discrete

    cells = figure_sensitivity.all_cells()
    names = [figure_sensitivity.cell_name(c) for c in cells]
    assert len(names) == len(set(names))
    assert names.count("default") == 1
    for cell in cells:
        args = tyro.cli(ppo_discrete.Args, args=figure_sensitivity.cell_flags(cell))
        ppo_discrete.check_args(args)
        assert args.clip_coef == cell["clip_coef"] and args.clip_vloss == cell["clip_vloss"]
        assert args.learning_rate == pytest.approx(cell["learning_rate"], rel=1e-5)
        assert args.update_epochs == cell["update_epochs"]
        assert args.num_envs * args.num_steps // args.num_minibatches == cell["minibatch_size"]
        assert args.total_timesteps == figure_sensitivity.TOTAL_TIMESTEPS


def test_learning_curve_commands_are_accepted_by_their_scripts():
    for script, flags in figure_learning_curves.ALGORITHMS.values():
        module = importlib.import_module(script.removesuffix(".py"))
        args = tyro.cli(module.Args, args=["--env-id", "Hopper-v4", *flags])
        module.check_args(args)
        assert args.total_timesteps == 1_000_000


def test_sensitivity_draws_from_stored_cells_only(tmp_path):
    pytest.importorskip("matplotlib")
    for seed_returns, changed in (([250.0, 270.0], {}), ([300.0, 320.0], {"clip_coef": 0.1})):
        cell = dict(figure_sensitivity.DEFAULTS, **changed)
        folder = tmp_path / figure_sensitivity.cell_name(cell)
        folder.mkdir()
        per_seed = {str(k): {"final_return_last100": r, "mean_approx_kl_k3": 0.01, "mean_clipfrac": 0.1}
                    for k, r in enumerate(seed_returns, 1)}
        (folder / "summary.json").write_text(json.dumps({"cell": cell, "seeds": [1, 2], "per_seed": per_seed}))
    cells = figure_sensitivity.load(tmp_path)
    assert "| clip_coef0.1 | `--clip-coef 0.1` | 310.0 +- 10.0 | +19% |" in figure_sensitivity.table(cells)
    figure_sensitivity.plot(cells, tmp_path / "sensitivity.png")
    assert (tmp_path / "sensitivity.png").stat().st_size > 0
