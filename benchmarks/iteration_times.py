"""Milliseconds per training iteration of finished runs, from their metrics.jsonl (steady state, no SPS averaging).

    python benchmarks/iteration_times.py runs/CartPole-v1__ppo_discrete__1__*
    python benchmarks/iteration_times.py --skip 3 runs/HalfCheetah-v4__ppo_continuous__1__*   # short runs

For each run folder: the median (and mean) of the time between consecutive logged iterations, the first --skip
iterations left out (default 20: they carry warm-up; 3 is enough for ppo_continuous's 2,048-step iterations).
Medians shrug off the slow stretches that a busy machine puts into single runs, which the final SPS of a run does
not; alternate the codes you compare (A, B, A, B, ...) and compare the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def iteration_ms(run_dir: Path, skip: int) -> list[float]:
    times = [json.loads(line)["time"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(b - a) * 1e3 for a, b in zip(times[skip:], times[skip + 1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip", type=int, default=20, help="iterations left out at the start (warm-up)")
    parser.add_argument("runs", nargs="+", type=Path, help="run folders, each with a metrics.jsonl")
    args = parser.parse_args()
    for run in args.runs:
        ms = iteration_ms(run, args.skip)
        if not ms:
            print(f"{run}: fewer than {args.skip + 2} iterations logged")
            continue
        print(f"{run}: median {statistics.median(ms):.2f} ms, mean {statistics.mean(ms):.2f} ms per iteration "
              f"({len(ms)} iterations)")


if __name__ == "__main__":
    main()
