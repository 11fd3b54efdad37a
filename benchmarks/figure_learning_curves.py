"""The article's PPO vs TRPO vs vanilla-policy-gradient figure, from runs of this project's scripts on one machine
("TRPO vs PPO: head to head": "PPO-Clip dominates A2C across the board and edges past TRPO on most tasks while
running roughly 10x faster per wall-clock second").

    python benchmarks/figure_learning_curves.py              # train what is not stored yet (~40 min on 2 cores), draw
    python benchmarks/figure_learning_curves.py --plot-only  # draw from benchmarks/results/article_figures/curves/

Three algorithms, each with its script's defaults, 1M steps, seeds 1-3, on HalfCheetah-v4 and Hopper-v4:
    PPO        python ppo_continuous.py --env-id <env>
    TRPO       python trpo.py --env-id <env> --total-timesteps 1000000
    A2C-like   python ppo_continuous.py --env-id <env> --update-epochs 1 --clip-coef 1e6
The A2C-like baseline is the PPO script with what makes it PPO taken out: every sample enters one gradient step
(one epoch of 32 minibatches of 64), and a clip coefficient of 1e6 never clips the ratio or the value update, so
each step is the plain importance-weighted policy gradient with GAE, Adam at PPO's learning rate, the same
networks and normalisers. It is not A2C's exact recipe (RMSProp, 5-step rollouts, a tuned learning rate); it is
the comparison the article's claim is about: the same data used once and unconstrained, against PPO's 10 epochs
inside the clip and TRPO's one KL-bounded natural-gradient step.

Each (algorithm, env) is one `benchmarks/run.py ... --seeds 1 2 3 --jobs 3` into
benchmarks/results/article_figures/curves/<algorithm>/<env>/ (run.py's compact per-iteration metrics and summary,
~40 KB a seed), one after another: the three seeds of one algorithm run together on the 2 cores, so every run's
clock is measured under the same load (each run gets ~2/3 of a core: about 1.5x its time alone). A folder with a
summary is not run again: kill it and start it again, it goes on from the next one. The figure, benchmarks/figures/ppo_trpo_a2c.png, has one row per
env: return (mean of the last 100 episodes) against steps (mean +- std over seeds) and against the training loop's
wall-clock (one line per seed). The table printed is the one in RESULTS.md. Needs matplotlib to draw.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plot import load_seeds, mean_std_on_grid, pyplot  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENVS = ["HalfCheetah-v4", "Hopper-v4"]
ALGORITHMS = {  # name -> (script, flags besides --env-id and --seed)
    "PPO": ("ppo_continuous.py", []),
    "TRPO": ("trpo.py", ["--total-timesteps", "1000000"]),
    "A2C-like": ("ppo_continuous.py", ["--update-epochs", "1", "--clip-coef", "1e6"]),
}
SEEDS = [1, 2, 3]


def folder(results: Path, algorithm: str, env_id: str) -> Path:
    return results / algorithm.lower() / env_id


def run_missing(results: Path, jobs: int) -> None:
    for env_id in ENVS:
        for algorithm, (script, flags) in ALGORITHMS.items():
            out = folder(results, algorithm, env_id)
            if (out / "summary.json").exists():
                continue
            print(f"{algorithm} on {env_id}", flush=True)
            subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), script, env_id, "--seeds",
                            *map(str, SEEDS), "--jobs", str(jobs), "--out", str(out), "--", *flags], check=True)


def table(results: Path) -> str:
    """Final return, training seconds and SPS per (env, algorithm), from the run summaries."""
    lines = ["| env | algorithm | final return (seeds 1-3) | training loop, s (mean over seeds) | SPS (mean) |",
             "| --- | --- | --- | --- | --- |"]
    for env_id in ENVS:
        for algorithm in ALGORITHMS:
            path = folder(results, algorithm, env_id) / "summary.json"
            if not path.exists():
                continue
            summary = json.loads(path.read_text())
            seeds = summary["per_seed"].values()
            finals = np.array([s["final_return_last100"] for s in seeds])
            seconds = np.mean([s["train_seconds"] for s in seeds])
            sps = np.mean([s["sps"] for s in seeds])
            lines.append(f"| {env_id} | {algorithm} | {finals.mean():.0f} +- {finals.std():.0f} | {seconds:.0f} | "
                         f"{sps:.0f} |")
    return "\n".join(lines)


def plot(results: Path, out_png: Path) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(len(ENVS), 2, figsize=(12, 4.2 * len(ENVS)), squeeze=False)
    for row, env_id in enumerate(ENVS):
        ax_steps, ax_time = axes[row]
        for k, algorithm in enumerate(ALGORITHMS):
            path = folder(results, algorithm, env_id)
            if not (path / "summary.json").exists():
                continue
            seeds = load_seeds([path], "episodic_return_100")
            color = f"C{k}"
            grid, mean, std = mean_std_on_grid([s[0] for s in seeds], [s[2] for s in seeds])
            ax_steps.plot(grid, mean, color=color, label=f"{algorithm} ({len(seeds)} seeds)")
            ax_steps.fill_between(grid, mean - std, mean + std, color=color, alpha=0.2)
            for i, (_, seconds, value) in enumerate(seeds):
                ax_time.plot(seconds, value, color=color, lw=1, alpha=0.8, label=algorithm if i == 0 else None)
        ax_steps.set_xlabel("environment steps")
        ax_time.set_xlabel("wall-clock seconds of the training loop (one line per seed; 3 runs on 2 cores)")
        for ax in (ax_steps, ax_time):
            ax.set_ylabel(f"{env_id}: return (last 100 episodes)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle("PPO (ppo_continuous.py) vs TRPO (trpo.py) vs A2C-like (ppo_continuous.py, 1 epoch, no clip), "
                 "defaults, 1M steps")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    print(f"wrote {out_png}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path,
                        default=ROOT / "benchmarks" / "results" / "article_figures" / "curves")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "figures" / "ppo_trpo_a2c.png")
    parser.add_argument("--jobs", type=int, default=3, help="seeds run at once")
    parser.add_argument("--plot-only", action="store_true", help="run nothing: draw from the stored runs")
    args = parser.parse_args()
    if not args.plot_only:
        run_missing(args.results, args.jobs)
    print(table(args.results))
    plot(args.results, args.out)


if __name__ == "__main__":
    main()
