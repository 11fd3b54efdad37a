"""Bar chart of benchmarks/scaling.py's figures: SPS of each configuration (processes x envs, the same global batch).

    python benchmarks/plot_scaling.py benchmarks/results/scaling/ppo_continuous.json \
        benchmarks/results/scaling/ppo_discrete.json --out benchmarks/figures/scaling.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, nargs="+", help="JSON files written by scaling.py --out")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    fig, axes = plt.subplots(1, len(args.results), figsize=(5.5 * len(args.results), 4), squeeze=False)
    for ax, path in zip(axes[0], args.results):
        result = json.loads(path.read_text())
        labels = [f"{r['processes']} proc\n{r['num_envs']} env x {r['num_steps']}" for r in result["runs"]]
        means = [sum(r["sps"]) / len(r["sps"]) for r in result["runs"]]
        colors = ["tab:blue" if r["processes"] == 1 else "tab:orange" for r in result["runs"]]
        ax.bar(range(len(labels)), means, color=colors)
        for i, r in enumerate(result["runs"]):
            ax.plot([i] * len(r["sps"]), r["sps"], "k.", markersize=4)
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_ylabel("steps per second (global batch)")
        ax.set_title(f"{result['script']}, {result['date']}\n{result['machine'].split(',')[0]}, "
                     f"{result['machine'].split(',')[1].strip()}", fontsize=9)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
