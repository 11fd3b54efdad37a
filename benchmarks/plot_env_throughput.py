"""Line chart of benchmarks/env_throughput.py's figures: env steps/s against N (log scale), one line per backend
(and thread count) through the means of the repeats, a dot for each repeat.

    python benchmarks/plot_env_throughput.py benchmarks/results/env_throughput/HalfCheetah-v4.json \
        --out benchmarks/figures/env_throughput.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def label(point: dict) -> str:
    if point["backend"] == "mujoco.batch":
        return f"mujoco.batch, {point['threads']} thread{'s' if point['threads'] != 1 else ''}"
    return {"loop": "gymnasium envs in a loop (SameStepVectorEnv)", "sync": "gymnasium SyncVectorEnv", "async": "gymnasium AsyncVectorEnv"}[point["backend"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, nargs="+", help="JSON files written by env_throughput.py --out")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    fig, axes = plt.subplots(1, len(args.results), figsize=(6 * len(args.results), 4.2), squeeze=False)
    for ax, path in zip(axes[0], args.results):
        result = json.loads(path.read_text())
        lines: dict[str, list[dict]] = {}
        for point in result["points"]:
            lines.setdefault(label(point), []).append(point)
        for (name, points), color in zip(lines.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
            points = sorted(points, key=lambda p: p["num_envs"])
            ns = [p["num_envs"] for p in points]
            means = [sum(r["sps"] for r in p["runs"]) / len(p["runs"]) for p in points]
            ax.plot(ns, means, "-o", color=color, label=name, markersize=3)
            for p in points:
                ax.plot([p["num_envs"]] * len(p["runs"]), [r["sps"] for r in p["runs"]], ".", color="k",
                        markersize=3)
        all_n = sorted({p["num_envs"] for p in result["points"]})
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_n, [str(n) for n in all_n])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("N (envs)")
        ax.set_ylabel("env steps per second")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        cpu, cores = (part.strip() for part in result["machine"].split(",")[:2])
        ax.set_title(f"{result['env_id']}, random controls, {result['date']}\n{cpu}, {cores}", fontsize=9)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
