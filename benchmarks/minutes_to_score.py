"""Seconds to a score: when each seed's mean return of the last 100 episodes first reaches a threshold.

    python benchmarks/minutes_to_score.py benchmarks/results/fast/HalfCheetah-v4 --threshold 1442.64
    python benchmarks/minutes_to_score.py benchmarks/results/fast/HalfCheetah-v4 \
        benchmarks/results/issue22/ppo_continuous/HalfCheetah-v4 --sps 0 2744 --threshold 1442.64 --plot out.png

"Reached" is the first logged row whose `episodic_return_100` is at least the threshold (issue 27: cleanrl's
published 1M-step returns, HalfCheetah-v4 1442.64, Hopper-v4 2382.86, Walker2d-v4 2287.95); its `global_step`
is the steps it took. Its seconds are the run's own clock at that row (`time`: seconds since the training loop
started, so a --compile's compile is in it, the process's start-up and env creation are not), or, with --sps,
global_step / sps: a learning curve recorded elsewhere, or with other runs beside it, converted to this machine's
speed measured alone (benchmarks/SPEED.md); one --sps per folder, 0 for the run's own clock. Each folder holds
seed<k>.json.gz or .jsonl files (benchmarks/run.py, cleanrl_reference.py) or is a run folder with a
metrics.jsonl. Prints one line per seed and the mean over the seeds that reached it; --json writes the same as
JSON; --plot draws each seed's return against those seconds, with the threshold (needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compact import read_metrics, seed_files  # noqa: E402


def first_reach(rows: list[dict], threshold: float) -> dict | None:
    """The first row whose episodic_return_100 is >= threshold, or None."""
    for row in rows:
        value = row.get("episodic_return_100")
        if value is not None and value >= threshold:
            return row
    return None


def plot(curves: list[tuple[Path, list[tuple[float, float]]]], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = dict(zip(args.folders, args.label))
    colors = dict(zip(args.folders, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    shown = set()
    for folder, points in curves:
        seconds, returns = zip(*points)
        label = labels.get(folder, str(folder)) if folder not in shown else None
        shown.add(folder)
        ax.plot([t / 60 for t in seconds], returns, color=colors[folder], linewidth=1, label=label)
    ax.axhline(args.threshold, color="k", linestyle="--", linewidth=0.8, label=f"threshold {args.threshold}")
    ax.set_xlabel("minutes on this machine")
    ax.set_ylabel("mean return of the last 100 episodes")
    ax.set_title(args.title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", type=Path, nargs="+")
    parser.add_argument("--threshold", type=float, required=True)
    parser.add_argument("--sps", type=float, nargs="+", default=None,
                        help="per folder: convert steps to seconds at this speed (0: the run's own clock)")
    parser.add_argument("--label", action="append", default=[], help="per folder, for --plot")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    speeds = args.sps or [0.0] * len(args.folders)
    if len(speeds) != len(args.folders):
        raise SystemExit(f"error: {len(args.folders)} folders but {len(speeds)} --sps values")
    result = {"threshold": args.threshold, "folders": {}}
    curves = []
    for folder, sps in zip(args.folders, speeds):
        files = [folder / "metrics.jsonl"] if (folder / "metrics.jsonl").exists() else seed_files(folder)
        if not files:
            raise SystemExit(f"error: no seed files or metrics.jsonl in {folder}")
        seeds = {}
        for path in files:
            rows = read_metrics(path)
            row = first_reach(rows, args.threshold)
            last = rows[-1]
            if not sps and rows[0].get("time") is None:
                raise SystemExit(f"error: {path} logs no time (cleanrl's curves): give --sps")
            seeds[path.name] = {
                "steps": None if row is None else row["global_step"],
                "seconds": None if row is None else (row["global_step"] / sps if sps else row["time"]),
                "trained_steps": last["global_step"],
            }
            curves.append((folder, [(r["global_step"] / sps if sps else r["time"], r["episodic_return_100"])
                                    for r in rows if r.get("episodic_return_100") is not None]))
        reached = [s["seconds"] for s in seeds.values() if s["seconds"] is not None]
        result["folders"][str(folder)] = {"sps": sps or None, "seeds": seeds, "reached": f"{len(reached)}/{len(seeds)}",
                                          "mean_seconds": statistics.mean(reached) if reached else None}
        print(f"{folder}: reached {len(reached)}/{len(seeds)}"
              + (f", mean {statistics.mean(reached):.0f} s ({statistics.mean(reached) / 60:.1f} min)" if reached else ""))
        for name, s in seeds.items():
            where = (f"step {s['steps']:,} at {s['seconds']:.0f} s" if s["steps"] is not None
                     else f"not reached in {s['trained_steps']:,} steps")
            print(f"  {name}: {where}")
    if args.plot:
        plot(curves, args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
