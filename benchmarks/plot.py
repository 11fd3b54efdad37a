"""Plot return against environment steps and against wall-clock time, mean +- std over seeds.

    python benchmarks/plot.py benchmarks/results/ppo_discrete/CartPole-v1 --out benchmarks/figures/cartpole.png
    python benchmarks/plot.py results/ppo_continuous/Hopper-v4 results/trpo/Hopper-v4 --out hopper.png

Each argument is a folder written by benchmarks/run.py (seed<k>.json.gz files, or plain seed<k>.jsonl), a run's own
folder runs/<run_name> (its metrics.jsonl is one seed), or several joined by commas whose seeds make one curve
(seeds 1-3 and 4-6 run at different times); each argument becomes one curve labelled <script> on <env>. The y value is the mean return of the last 100 episodes at each iteration: mean +- std over seeds against
steps, one line per seed against wall-clock (seeds share the cores unevenly, so their clocks differ).
Needs matplotlib (optional dependency: pip install matplotlib).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compact import read_metrics, seed_files, seed_number  # noqa: E402


def load_seeds(folders: list[Path], key: str, only: Optional[list[int]] = None) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per seed: (global_step, time, value) arrays of the iterations where `key` is known. With `only`, just
    the files seed<k> of those k."""
    seeds = []
    for path in (p for folder in folders for p in seed_files(folder)):
        if only is not None and seed_number(path) not in only:
            continue
        rows = [r for r in read_metrics(path) if r.get(key) is not None]
        seeds.append(tuple(np.array([r.get(k) for r in rows], dtype=float) for k in ("global_step", "time", key)))
    if not seeds:
        raise SystemExit(f"error: no seed files (seed<k>.json.gz, seed<k>.jsonl) in {', '.join(map(str, folders))}")
    return seeds


def mean_std_on_grid(xs: list[np.ndarray], ys: list[np.ndarray], points: int = 200):
    """Interpolate every seed onto a shared x grid (up to the shortest seed's end), then mean and std."""
    end = min(x[-1] for x in xs)
    grid = np.linspace(max(x[0] for x in xs), end, points)
    stacked = np.stack([np.interp(grid, x, y) for x, y in zip(xs, ys)])
    return grid, stacked.mean(0), stacked.std(0)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or exit with one line saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: plotting needs matplotlib: pip install matplotlib") from None
    return plt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="run.py result folders; join several with commas for one curve")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--key", default="episodic_return_100", help="metric to plot")
    parser.add_argument("--title", default=None)
    parser.add_argument("--label", action="append", default=[],
                        help="legend name of the next curve, once per folder argument in order (default: the script)")
    args = parser.parse_args()
    if args.label and len(args.label) != len(args.folders):
        parser.error(f"{len(args.label)} --label for {len(args.folders)} curves: give one per curve or none")
    plt = pyplot()

    fig, (ax_steps, ax_time) = plt.subplots(1, 2, figsize=(11, 4))
    for i, spec in enumerate(args.folders):
        folders = [Path(part) for part in spec.split(",")]
        seeds = load_seeds(folders, args.key)
        label = f"{args.label[i] if args.label else folders[0].parent.name} ({len(seeds)} seeds)"
        grid, mean, std = mean_std_on_grid([s[0] for s in seeds], [s[2] for s in seeds])
        (line,) = ax_steps.plot(grid, mean, label=label)
        ax_steps.fill_between(grid, mean - std, mean + std, alpha=0.2, color=line.get_color())
        # Wall-clock differs between seeds (they share the cores unevenly), so each seed gets its own line.
        for k, (_, seconds, value) in enumerate(seeds):
            if np.isnan(seconds).all():  # no clock logged (cleanrl_reference.py's runs of cleanrl's script)
                continue
            ax_time.plot(seconds, value, color=line.get_color(), alpha=0.7, lw=1, label=label if k == 0 else None)
    ax_steps.set_xlabel("environment steps")
    ax_time.set_xlabel("wall-clock seconds (training loop), one line per seed")
    for ax in (ax_steps, ax_time):
        ax.set_ylabel("return (mean of last 100 episodes)" if args.key == "episodic_return_100" else args.key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(args.title or Path(args.folders[0].split(",")[0]).name)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
