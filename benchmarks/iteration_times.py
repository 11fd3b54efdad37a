"""Milliseconds per training iteration of finished runs, from their metrics.jsonl (steady state, no SPS averaging).

    python benchmarks/iteration_times.py runs/CartPole-v1__ppo_discrete__1__*

For each run folder: the median (and mean) of the time between consecutive logged iterations, iterations 21 on
(the first ones carry warm-up). Medians shrug off the slow stretches that a busy machine puts into single runs,
which the final SPS of a run does not; alternate the codes you compare (A, B, A, B, ...) and compare the medians.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

FIRST = 20  # iterations left out at the start


def iteration_ms(run_dir: Path) -> list[float]:
    times = [json.loads(line)["time"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(b - a) * 1e3 for a, b in zip(times[FIRST:], times[FIRST + 1:])]


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    for run in sys.argv[1:]:
        ms = iteration_ms(Path(run))
        if not ms:
            print(f"{run}: fewer than {FIRST + 2} iterations logged")
            continue
        print(f"{run}: median {statistics.median(ms):.2f} ms, mean {statistics.mean(ms):.2f} ms per iteration "
              f"({len(ms)} iterations)")


if __name__ == "__main__":
    main()
