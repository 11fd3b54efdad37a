"""Train cleanrl's own script on this machine, so its final return sits beside ours from the same hardware.

    python benchmarks/cleanrl_reference.py <cleanrl>/cleanrl/ppo_continuous_action.py Hopper-v4 \
        --python <cleanrl venv>/bin/python --seeds 1 2 3 --jobs 2

cleanrl's scripts print `global_step=..., episodic_return=[...]` for every finished episode; this runs the
script for each seed (at most --jobs at once, each with OMP_NUM_THREADS=1 so that two runs on two cores do not
busy-wait on each other's threads), keeps those lines, and writes to --out (default
benchmarks/results/cleanrl_<script>/<env>/):
    seed<k>.json.gz one row per finished episode: global_step, episodic_return, episodic_return_100 (mean of
                    the last 100 episodes so far) and time (null: cleanrl prints none), so that
                    benchmarks/plot.py draws it beside our runs against steps (benchmarks/compact.py's format)
    update_seed<k>.json.gz  one row per iteration: cleanrl's logged entropy, clip fraction, approx KL, explained
                    variance and value loss (benchmarks/diagnostics.py --export, run with cleanrl's python, which
                    has tensorboard to read them from cleanrl's event files under work/)
    summary.json    command, seeds, machine, date, per-seed final return, mean and std over seeds
The final return is defined as for our scripts (benchmarks/run.py): the mean return of a seed's last 100
episodes; mean +- std (ddof=0) over seeds. Nothing of cleanrl's is copied into this repository.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import time
from pathlib import Path

import numpy as np
from compact import write_metrics
from run import machine, package_versions

ROOT = Path(__file__).resolve().parents[1]
EPISODE = re.compile(r"global_step=(\d+), episodic_return=\[?([-+0-9.eE]+)\]?")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("script", type=Path, help="path to cleanrl's script, e.g. .../ppo_continuous_action.py")
    parser.add_argument("env_id")
    parser.add_argument("--python", default="python", help="the interpreter of cleanrl's own venv")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--total-timesteps", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/cleanrl_<script>/<env>")
    parser.add_argument("--collect", action="store_true", help="run nothing: summarise the logs already in <out>/work")
    args = parser.parse_args()
    out = args.out or ROOT / "benchmarks" / "results" / f"cleanrl_{args.script.stem}" / args.env_id
    work = out / "work"  # cleanrl's runs/ folders (tensorboard) and raw stdout; gitignored
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def command(seed: int) -> list[str]:
        return [args.python, str(args.script.resolve()), "--env-id", args.env_id, "--seed", str(seed),
                "--total-timesteps", str(args.total_timesteps)]

    started = time.time()
    pending, running = ([] if args.collect else list(args.seeds)), {}
    while pending or running:
        while pending and len(running) < args.jobs:
            seed = pending.pop(0)
            (work / f"seed{seed}").mkdir(exist_ok=True)
            log = open(work / f"seed{seed}" / "stdout.log", "w")
            running[seed] = (subprocess.Popen(command(seed), cwd=work / f"seed{seed}", stdout=log,
                                              stderr=subprocess.STDOUT, env=env), log)
            print(f"seed {seed}: started ({' '.join(command(seed))})", flush=True)
        time.sleep(5)
        for seed, (proc, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                del running[seed]
                print(f"seed {seed}: exit {proc.returncode} after {time.time() - started:.0f} s", flush=True)
                if proc.returncode != 0:
                    raise SystemExit(f"seed {seed} failed: see {work / f'seed{seed}' / 'stdout.log'}")

    versions = package_versions(args.python)
    finals = {}
    for seed in args.seeds:
        lines = (work / f"seed{seed}" / "stdout.log").read_text().splitlines()
        found = [(int(m.group(1)), float(m.group(2))) for m in map(EPISODE.search, lines) if m]
        returns = np.array([r for _, r in found])
        episodes = [
            {"global_step": step, "episodic_return": r, "episodic_return_100": float(returns[max(0, i - 99) : i + 1].mean()),
             "time": None}
            for i, (step, r) in enumerate(found)
        ]
        write_metrics(out / f"seed{seed}.json.gz", episodes)
        (out / f"seed{seed}.jsonl").unlink(missing_ok=True)  # an older run's plain file would be read twice
        finals[seed] = float(returns[-100:].mean())  # exact, before rounding
    values = np.array(list(finals.values()))
    summary = {
        "script": args.script.name,
        "env_id": args.env_id,
        "command": " ".join(command(0)).replace("--seed 0", "--seed <k>").replace(str(args.script.resolve()), args.script.name),
        "environment": f"OMP_NUM_THREADS=1, {args.jobs} seeds at a time, cleanrl's own venv: {versions}",
        "seeds": args.seeds,
        "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "final_return_per_seed": finals,
        "final_return_mean": float(values.mean()),
        "final_return_std": float(values.std()),
        "definition": "mean episodic return of the last 100 episodes of each seed; mean and std (ddof=0) over seeds",
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    subprocess.run([args.python, str(ROOT / "benchmarks" / "diagnostics.py"), "--export", str(out)], check=True)
    print(f"{args.env_id}: {summary['final_return_mean']:.2f} +- {summary['final_return_std']:.2f} over seeds {args.seeds}")


if __name__ == "__main__":
    main()
