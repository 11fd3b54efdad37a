"""The numbers RESULTS.md quotes when it sets result folders side by side.

    R=benchmarks/results
    python benchmarks/compare.py $R/ppo_continuous/Hopper-v4,$R/more_seeds/ppo_continuous/Hopper-v4 \
        $R/cleanrl_ppo_continuous_action/Hopper-v4,$R/more_seeds/cleanrl_ppo_continuous_action/Hopper-v4 \
        --at 250000 500000 750000

Arguments are groups, as for plot.py: a folder written by run.py or cleanrl_reference.py (seed<k>.json.gz or
seed<k>.jsonl files), a run's own folder runs/<run_name>, or several joined by commas. For each group it prints,
for --key (default: the last-100 episodic return):
  final        the last logged value of each seed, then mean +- std over seeds (ddof 0, as everywhere here)
  at steps     the mean over seeds of each seed's curve, linearly interpolated at the --at steps
  run mean     each seed's curve averaged over 200 evenly spaced steps from the group's first logged step to
               its shortest seed's last, then mean +- std over seeds (one number for "ahead for most of the run")
  t            Welch's t of the final values against the first group (variances with ddof 1)
--seeds k ... reads only the files seed<k> of those seeds in every group (seeds 1-3 of a six-seed folder).
  median       (--median) each seed's median of --key over its iterations (e.g. --key kl_exact)
  reaches      (--reach X) each seed's first step at which --key >= X (e.g. 475 on CartPole)
With --paired and two groups, each seed file of the first is paired with the file of the same name in the
folder at the same position of the second (A1,A2 B1,B2: A1 with B1, A2 with B2; a group of one folder is paired
with each folder of the other), and it prints the differences of the final values (second minus first), how many
are positive, their mean, a one-sided sign test and the paired t; then the same for the run means (each pair's
curves averaged over 200 steps spanning what both logged), which a late jump to another gait moves less.
With --first-difference and two groups of our scripts' runs, it also prints, per seed file present in both,
the first iteration whose metrics (all but time and SPS) differ: where two variants of a script part ways. The
values are compared as stored (8 significant digits; a fresh run's metrics.jsonl is rounded alike first).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compact import read_metrics, rounded, seed_files, seed_number, stem  # noqa: E402
from plot import load_seeds  # noqa: E402


def welch_t(a: np.ndarray, b: np.ndarray) -> float:
    """(mean a - mean b) / sqrt(var a / n_a + var b / n_b), sample variances."""
    return float((a.mean() - b.mean()) / np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)))


def without_clock(row: dict) -> dict:
    """A row as stored (floats to 8 significant digits), wall-clock keys and unknown values left out."""
    return {k: rounded(v) for k, v in row.items() if k not in ("time", "sps") and v is not None}


def first_difference(group_a: list[Path], group_b: list[Path], only: list[int] | None) -> None:
    files_b = {stem(p): p for folder in group_b for p in seed_files(folder)}
    for path_a in sorted((p for folder in group_a for p in seed_files(folder)), key=lambda p: p.name):
        if stem(path_a) not in files_b or (only is not None and seed_number(path_a) not in only):
            continue
        rows_a, rows_b = (read_metrics(p) for p in (path_a, files_b[stem(path_a)]))
        pairs = zip(map(without_clock, rows_a), map(without_clock, rows_b))
        where = next((i for i, (row_a, row_b) in enumerate(pairs) if row_a != row_b), None)
        if where is None:
            print(f"  {stem(path_a)}: identical over {min(len(rows_a), len(rows_b))} iterations")
        else:
            print(f"  {stem(path_a)}: first difference at iteration {rows_a[where]['iteration']} "
                  f"(step {rows_a[where]['global_step']})")


def fmt(x: float) -> str:
    """Returns to the unit, small quantities (KL, fractions) to 4 significant digits."""
    return f"{x:.0f}" if abs(x) >= 10 else f"{x:.4g}"


def curve(path: Path, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(global_step, value) of the iterations of one seed file where `key` is known."""
    rows = [r for r in read_metrics(path) if r.get(key) is not None]
    return np.array([r["global_step"] for r in rows], dtype=float), np.array([r[key] for r in rows], dtype=float)


def run_means(curves: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Each (steps, value) curve averaged over 200 evenly spaced steps shared by all of them: from the latest
    first logged step to the earliest last one."""
    grid = np.linspace(max(steps[0] for steps, _ in curves), min(steps[-1] for steps, _ in curves), 200)
    return np.array([np.interp(grid, steps, value).mean() for steps, value in curves])


def print_paired(label: str, diffs: list[float]) -> None:
    n, higher = len(diffs), sum(d > 0 for d in diffs)
    # P(at least `higher` of n positive | each sign a fair coin)
    p = sum(math.comb(n, k) for k in range(higher, n + 1)) / 2**n
    t = np.mean(diffs) / (np.std(diffs, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    print(f"paired {label}: {', '.join(f'{d:+.0f}' for d in diffs)}")
    print(f"  {higher} of {n} higher in the second group, mean difference {np.mean(diffs):+.1f}, "
          f"one-sided sign test p = {p:.3f}, paired t = {t:.2f} ({n - 1} degrees of freedom)")


def paired(group_a: list[Path], group_b: list[Path], key: str) -> None:
    if len(group_a) != len(group_b):
        if 1 not in (len(group_a), len(group_b)):
            raise SystemExit("error: --paired needs as many folders in each group, or one folder in one of them")
        # One folder holding every seed against several folders holding a share each: pair it with each of them.
        if len(group_a) == 1:
            group_a = group_a * len(group_b)
        else:
            group_b = group_b * len(group_a)
    pairs = []
    for folder_a, folder_b in zip(group_a, group_b):
        files_b = {stem(p): p for p in seed_files(folder_b)}
        pairs += [(curve(path_a, key), curve(files_b[stem(path_a)], key))
                  for path_a in seed_files(folder_a) if stem(path_a) in files_b]
    print_paired("final", [value_b[-1] - value_a[-1] for (_, value_a), (_, value_b) in pairs])
    print_paired("run mean", [mean_b - mean_a for mean_a, mean_b in (run_means(list(pair)) for pair in pairs)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("groups", nargs="+", help="result folders; join several with commas for one group")
    parser.add_argument("--key", default="episodic_return_100")
    parser.add_argument("--at", type=int, nargs="*", default=[], help="steps at which to read the mean curve")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="only these seeds of every group")
    parser.add_argument("--median", action="store_true", help="each seed's median of --key over its iterations")
    parser.add_argument("--reach", type=float, default=None, help="each seed's first step with --key >= this")
    parser.add_argument("--paired", action="store_true", help="see above; needs exactly two groups")
    parser.add_argument("--first-difference", action="store_true", help="see above; needs exactly two groups")
    args = parser.parse_args()
    groups = [[Path(part) for part in spec.split(",")] for spec in args.groups]

    first_finals = None
    for spec, folders in zip(args.groups, groups):
        seeds = load_seeds(folders, args.key, args.seeds)  # per seed: (steps, time, value)
        finals = np.array([value[-1] for _, _, value in seeds])
        means = run_means([(steps, value) for steps, _, value in seeds])
        print(spec)
        print(f"  final     {', '.join(f'{f:.1f}' for f in finals)}: {finals.mean():.2f} +- {finals.std():.2f}")
        if args.at:
            at = [np.mean([np.interp(step, s[0], s[2]) for s in seeds]) for step in args.at]
            print(f"  at steps  {' / '.join(fmt(x) for x in at)} (at {' / '.join(map(str, args.at))})")
        print(f"  run mean  {fmt(means.mean())} +- {fmt(means.std())}")
        if args.median:
            print(f"  median    {', '.join(f'{np.median(value):.4g}' for _, _, value in seeds)}")
        if args.reach is not None:
            first = [steps[np.argmax(value >= args.reach)] if (value >= args.reach).any() else None
                     for steps, _, value in seeds]
            print(f"  reaches   {args.reach:g} at steps {', '.join('never' if f is None else f'{f:.0f}' for f in first)}")
        if first_finals is None:
            first_finals = finals
        else:
            print(f"  t         {welch_t(finals, first_finals):.2f} (final, against the first group)")
    if args.paired:
        if len(groups) != 2:
            parser.error("--paired compares exactly two groups")
        paired(*groups, args.key)
    if args.first_difference:
        if len(groups) != 2:
            parser.error("--first-difference compares exactly two groups")
        print("first difference:")
        first_difference(*groups, args.seeds)


if __name__ == "__main__":
    main()
