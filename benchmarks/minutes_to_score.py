"""Seconds to a score: when each seed's mean return of the last 100 episodes first reaches a threshold.

    python benchmarks/minutes_to_score.py benchmarks/results/fast/HalfCheetah-v4 --threshold 1442.64
    python benchmarks/minutes_to_score.py benchmarks/results/ppo_continuous/HalfCheetah-v4 --threshold 1442.64 \
        --sps 2744

"Reached" is the first logged row whose `episodic_return_100` is at least the threshold (issue 27: cleanrl's
published 1M-step returns, HalfCheetah-v4 1442.64, Hopper-v4 2382.86, Walker2d-v4 2287.95); its `global_step`
is the steps it took. Its seconds are the run's own clock at that row (`time`: seconds since the training loop
started, so a --compile's compile is in it, the process's start-up and env creation are not), or, with --sps,
global_step / sps: a learning curve recorded elsewhere, or with other runs beside it, converted to this machine's
speed measured alone (benchmarks/SPEED.md). Each folder holds seed<k>.json.gz or .jsonl files (benchmarks/run.py,
cleanrl_reference.py) or is a run folder with a metrics.jsonl. Prints one line per seed and the mean over the
seeds that reached it; --json writes the same as JSON.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", type=Path, nargs="+")
    parser.add_argument("--threshold", type=float, required=True)
    parser.add_argument("--sps", type=float, default=None, help="convert steps to seconds at this speed")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    result = {"threshold": args.threshold, "sps": args.sps, "folders": {}}
    for folder in args.folders:
        files = [folder / "metrics.jsonl"] if (folder / "metrics.jsonl").exists() else seed_files(folder)
        if not files:
            raise SystemExit(f"error: no seed files or metrics.jsonl in {folder}")
        seeds = {}
        for path in files:
            rows = read_metrics(path)
            row = first_reach(rows, args.threshold)
            last = rows[-1]
            if row is not None and args.sps is None and row.get("time") is None:
                raise SystemExit(f"error: {path} logs no time (cleanrl's curves): give --sps")
            seeds[path.name] = {
                "steps": None if row is None else row["global_step"],
                "seconds": None if row is None else (row["global_step"] / args.sps if args.sps else row["time"]),
                "trained_steps": last["global_step"],
            }
        reached = [s["seconds"] for s in seeds.values() if s["seconds"] is not None]
        result["folders"][str(folder)] = {"seeds": seeds, "reached": f"{len(reached)}/{len(seeds)}",
                                          "mean_seconds": statistics.mean(reached) if reached else None}
        print(f"{folder}: reached {len(reached)}/{len(seeds)}"
              + (f", mean {statistics.mean(reached):.0f} s ({statistics.mean(reached) / 60:.1f} min)" if reached else ""))
        for name, s in seeds.items():
            where = (f"step {s['steps']:,} at {s['seconds']:.0f} s" if s["steps"] is not None
                     else f"not reached in {s['trained_steps']:,} steps")
            print(f"  {name}: {where}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
