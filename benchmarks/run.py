"""Train one script on one env for several seeds and store what came out.

    python benchmarks/run.py ppo_discrete.py CartPole-v1 --seeds 1 2 3
    python benchmarks/run.py ppo_continuous.py HalfCheetah-v4 --seeds 1 2 3 --jobs 2 -- --num-envs 1
    python benchmarks/run.py ppo_continuous.py Hopper-v4 --seeds 1 2 3 --jobs 1 --nproc-per-node 2   # torchrun

Seeds run in parallel, at most --jobs at a time (default: the number of cores). Everything after `--` goes
to the script unchanged. Results land in benchmarks/results/<script>/<env>/:
    seed<k>.json.gz the run's per-iteration metrics: runs/<run_name>/metrics.jsonl stored column by column,
                    floats to 8 significant digits (benchmarks/compact.py; plot.py, compare.py read it)
    summary.json    command, seeds, machine, package versions, date, per-seed final return, mean and std over seeds
The final return of a seed is the mean episodic return of its last 100 episodes (Stable-Baselines3's
`ep_rew_mean`); the summary gives mean +- std of that over seeds (std with ddof=0, as cleanrl reports).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compact import read_metrics, write_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    model = "unknown CPU"
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def package_versions(python: str = sys.executable) -> str:
    """The versions, as `python` sees them, of the packages that move the figures: MuJoCo's version changes
    the physics (so the returns), and all four change the speed."""
    code = ("import gymnasium, mujoco, numpy, torch; print(f'torch {torch.__version__}, gymnasium "
            "{gymnasium.__version__}, mujoco {mujoco.__version__}, numpy {numpy.__version__}')")
    return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("script", help="e.g. ppo_discrete.py")
    parser.add_argument("env_id", help="e.g. CartPole-v1")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="seeds run at once")
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/<script>/<env>")
    parser.add_argument("--nproc-per-node", type=int, default=1,
                        help="K > 1: each seed runs as `torchrun --standalone --nproc-per-node K <script>` (K ranks)")
    parser.add_argument(
        "--collect", action="store_true",
        help="run nothing: summarise the seeds already in <out>/work/seed<k>/ (runs started by hand, or resumed)",
    )
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    extra = argv[split + 1 :]  # everything after `--` goes to the script
    script = ROOT / args.script
    if not script.exists():
        raise SystemExit(f"error: no script {script}")
    out = args.out or ROOT / "benchmarks" / "results" / script.stem / args.env_id
    work = out / "work"
    if not args.collect:
        shutil.rmtree(work, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)

    commands = {seed: [str(script), "--env-id", args.env_id, "--seed", str(seed), *extra] for seed in args.seeds}
    launcher = [sys.executable]
    if args.nproc_per_node > 1:  # the torchrun that belongs to this python's torch
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc_per_node)]
    typed = "python" if args.nproc_per_node == 1 else f"torchrun --standalone --nproc-per-node {args.nproc_per_node}"
    shown = {seed: " ".join([typed, args.script, *cmd[1:]]) for seed, cmd in commands.items()}  # as a user types it
    procs, started = {}, {}
    pending = [] if args.collect else list(args.seeds)
    start = time.time()
    while pending or procs:
        while pending and len(procs) < args.jobs:
            seed = pending.pop(0)
            cwd = work / f"seed{seed}"
            cwd.mkdir(parents=True)
            log = open(cwd / "stdout.log", "w")
            procs[seed] = subprocess.Popen([*launcher, *commands[seed]], cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
            started[seed] = time.time()
            print(f"seed {seed}: started ({shown[seed]})", flush=True)
        for seed, proc in list(procs.items()):
            if proc.poll() is not None:
                del procs[seed]
                status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
                print(f"seed {seed}: {status} after {time.time() - started[seed]:.0f} s", flush=True)
        time.sleep(1)

    per_seed = {}
    for seed in args.seeds:
        runs = sorted((work / f"seed{seed}" / "runs").glob("*/metrics.jsonl"))
        if not runs:
            raise SystemExit(f"error: seed {seed} wrote no metrics; see {work / f'seed{seed}' / 'stdout.log'}")
        metrics = read_metrics(runs[-1])
        write_metrics(out / f"seed{seed}.json.gz", metrics)
        (out / f"seed{seed}.jsonl").unlink(missing_ok=True)  # an older run's plain copy would be read twice
        last = metrics[-1]  # the exact values, before rounding
        per_seed[seed] = {
            "final_return_last100": last["episodic_return_100"],
            "global_step": last["global_step"],
            "train_seconds": last["time"],
            "sps": last["sps"],
        }
    finals = np.array([v["final_return_last100"] for v in per_seed.values()], dtype=float)
    summary = {
        "script": args.script,
        "env_id": args.env_id,
        "command": shown[args.seeds[0]].replace(f"--seed {args.seeds[0]}", "--seed <seed>"),
        "seeds": args.seeds,
        "parallel_jobs": args.jobs,
        "processes_per_seed": args.nproc_per_node,
        "machine": machine(),
        "packages": package_versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_seconds_all_seeds": None if args.collect else round(time.time() - start, 1),
        "per_seed": per_seed,
        "final_return_mean": float(finals.mean()),
        "final_return_std": float(finals.std()),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    shutil.rmtree(work)
    print(f"{args.script} {args.env_id}: final return {finals.mean():.2f} +- {finals.std():.2f} over seeds "
          f"{args.seeds}; results in {out}")


if __name__ == "__main__":
    main()
