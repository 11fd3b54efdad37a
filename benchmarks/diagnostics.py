"""Do two implementations train alike? The per-iteration diagnostics of result folders, averaged over windows
of environment steps and over seeds.

    R=benchmarks/results
    python benchmarks/diagnostics.py $R/cleanrl_ppo_continuous_action/Hopper-v4 \
        $R/mujoco_2.3.7/ppo_continuous/Hopper-v4 --windows 0 50000 150000 300000 500000 750000 1000000
    <cleanrl venv>/bin/python benchmarks/diagnostics.py --export $R/cleanrl_ppo_continuous_action/Hopper-v4

Final returns are noisy (three seeds of Hopper move by ~500); the diagnostics of the update are not, so two
scripts that implement the same algorithm should give the same window means here, and a difference points at
where they part. Arguments are groups, as for plot.py and compare.py (folders joined by commas make one group):
  - a folder of our runs (run.py): the seed<k> metrics are read (seed<k>.json.gz, or plain seed<k>.jsonl);
  - a folder written by cleanrl_reference.py: its update_seed<k>.json.gz, one row per iteration with the keys
    below, which --export writes (in benchmarks/compact.py's format) from cleanrl's tensorboard files under
    work/seed*/runs/ (not committed; reading them needs the `tensorboard` package, which cleanrl's own venv has:
    run --export with that venv's python). With no update_seed<k> file, the tensorboard files are read directly.
Keys, ours = cleanrl's: entropy = losses/entropy, clipfrac = losses/clipfrac, value_loss = losses/value_loss,
approx_kl_k3 = losses/approx_kl, explained_variance = losses/explained_variance. Two of them are defined
slightly differently: cleanrl logs entropy, value loss and approx KL of the LAST minibatch of an update (the KL
before that minibatch's step), ours the mean over the minibatches (entropy, value loss) and the KL of the
updated policy on the whole batch. With a state-independent std the entropy is the same for every minibatch
but moves a little within an update; the KL differs by one minibatch step.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compact import read_metrics, seed_files, write_metrics  # noqa: E402

CLEANRL_TAGS = {
    "entropy": "losses/entropy",
    "clipfrac": "losses/clipfrac",
    "approx_kl_k3": "losses/approx_kl",
    "explained_variance": "losses/explained_variance",
    "value_loss": "losses/value_loss",
}


def read_tensorboard(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    """cleanrl's runs in a cleanrl_reference.py folder: seed name -> key -> [iterations, 2] (global_step, value)."""
    events = sorted(folder.glob("work/seed*/runs/*/events.out.tfevents.*"))
    if not events:
        return {}
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        raise SystemExit("error: reading cleanrl's tensorboard files needs `tensorboard`: run this with the "
                         "python of cleanrl's venv") from None
    seeds = {}
    for path in events:
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        seed = path.relative_to(folder / "work").parts[0]  # "seed<k>"
        seeds[seed] = {k: np.array([(e.step, e.value) for e in acc.Scalars(t)]) for k, t in CLEANRL_TAGS.items()}
    return seeds


def export(folder: Path) -> None:
    """Write update_seed<k>.json.gz (one row per iteration: global_step and the keys) from the tensorboard files."""
    seeds = read_tensorboard(folder)
    if not seeds:
        raise SystemExit(f"error: no cleanrl tensorboard files under {folder}/work")
    for seed, series in seeds.items():
        rows = {}  # global_step -> that iteration's values; cleanrl logs every key once per iteration
        for key, values in series.items():
            for step, value in values:
                # tensorboard stores float32: 7 significant digits keep all of it
                rows.setdefault(int(step), {"global_step": int(step)})[key] = float(f"{value:.7g}")
        rows = [rows[step] for step in sorted(rows)]
        write_metrics(folder / f"update_{seed}.json.gz", rows)
        print(f"{folder / f'update_{seed}.json.gz'}: {len(rows)} iterations")


def load(folder: Path) -> list[dict[str, np.ndarray]]:
    """Per seed: key -> [iterations, 2] array of (global_step, value)."""
    updates = seed_files(folder, prefix="update_seed")
    if updates:  # cleanrl_reference.py's folder, exported
        seeds = []
        for path in updates:
            rows = read_metrics(path)
            seeds.append({k: np.array([(r["global_step"], r[k]) for r in rows]) for k in CLEANRL_TAGS})
        return seeds
    cleanrl_runs = read_tensorboard(folder)  # cleanrl_reference.py's folder, not exported
    if cleanrl_runs:
        return list(cleanrl_runs.values())
    seeds = []
    for path in seed_files(folder):
        rows = read_metrics(path)
        seeds.append({
            k: np.array([(r["global_step"], r[k]) for r in rows if r.get(k) is not None]) for k in CLEANRL_TAGS
        })
    if not seeds:
        raise SystemExit(f"error: neither seed<k> files nor cleanrl tensorboard files in {folder}")
    if not any(len(v) for seed in seeds for v in seed.values()):  # cleanrl_reference.py's per-episode files only
        raise SystemExit(f"error: no diagnostics in {folder}: for cleanrl's runs, re-run cleanrl_reference.py and "
                         "then this with --export")
    return seeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("groups", nargs="+", help="result folders; several joined by commas make one group")
    parser.add_argument("--windows", type=float, nargs="+", default=[0, 50e3, 150e3, 300e3, 500e3, 750e3, 1e6],
                        help="window edges in environment steps; a window is (lo, hi]")
    parser.add_argument("--export", action="store_true",
                        help="write update_seed<k>.json.gz into each cleanrl_reference.py folder given, and stop")
    args = parser.parse_args()
    if args.export:
        for folder in (Path(f) for g in args.groups for f in g.split(",")):
            export(folder)
        return
    edges = list(zip(args.windows[:-1], args.windows[1:]))
    groups = {g: [s for f in g.split(",") for s in load(Path(f))] for g in args.groups}
    print("window means over iterations, then over seeds; windows (k steps): "
          + " ".join(f"{lo / 1e3:g}-{hi / 1e3:g}" for lo, hi in edges))
    for key in CLEANRL_TAGS:
        print(key)
        for name, seeds in groups.items():
            means = []
            for lo, hi in edges:
                per_seed = [s[key][(s[key][:, 0] > lo) & (s[key][:, 0] <= hi), 1] for s in seeds]
                per_seed = [v.mean() for v in per_seed if len(v)]
                means.append(np.mean(per_seed) if per_seed else np.nan)
            print(f"  {' '.join(f'{m:8.4f}' for m in means)}  {name} ({len(seeds)} seeds)")


if __name__ == "__main__":
    main()
