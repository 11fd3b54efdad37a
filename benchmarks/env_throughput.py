"""Env steps per second of N copies of a MuJoCo task, random controls, no agent: ppo_continuous.py's
MujocoBatchVectorEnv (mujoco.batch, on 1 and 2 threads) against its SameStepVectorEnv (a plain loop over
gymnasium envs: what it steps one env with) and gymnasium's SyncVectorEnv and AsyncVectorEnv, for N from 1 to 256. The committed figures came from

    python benchmarks/env_throughput.py --out benchmarks/results/env_throughput/HalfCheetah-v4.json
    python benchmarks/plot_env_throughput.py benchmarks/results/env_throughput/HalfCheetah-v4.json \
        --out benchmarks/figures/env_throughput.png

Every vector env autoresets in SAME_STEP mode (as ppo_continuous.py's are); the gymnasium ones are built from
plain gym.make(env_id) envs (AsyncVectorEnv: one subprocess per env). Each point (backend, threads, N) builds its
vector env, resets it with a seed, takes --warmup vector steps, then times (time.perf_counter) ceil(--env-steps / N)
vector steps, at least --min-vector-steps; its figure is N x vector steps / seconds. The actions are float32,
uniform in the action bounds from a fixed numpy generator, drawn before the clock starts (a pool of 64 batches,
cycled). AsyncVectorEnv is skipped above --async-max-envs envs (one process per env; the reason goes into the
JSON). The points run --repeats times, alternating: every point once, then every point again, so drift hits all
alike; every repeat is recorded. Writes JSON (command, date, machine, package versions, points) and prints a table.
Nothing else should run meanwhile.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import ROOT, machine, package_versions  # noqa: E402

sys.path.insert(0, str(ROOT))
import ppo_continuous  # noqa: E402

ACTION_POOL = 64  # pre-drawn action batches, cycled


def make_vector_env(backend: str, env_id: str, num_envs: int, threads: int | None) -> gym.vector.VectorEnv:
    if backend == "mujoco.batch":
        return ppo_continuous.MujocoBatchVectorEnv(env_id, num_envs, threads)
    fns = [lambda: gym.make(env_id)] * num_envs
    same_step = gym.vector.AutoresetMode.SAME_STEP
    if backend == "loop":
        return ppo_continuous.SameStepVectorEnv(fns)
    if backend == "sync":
        return gym.vector.SyncVectorEnv(fns, autoreset_mode=same_step)
    return gym.vector.AsyncVectorEnv(fns, autoreset_mode=same_step)


def measure(point: dict, env_id: str, warmup: int, seed: int) -> dict:
    """One timed run of a point: {"seconds", "sps"}."""
    n = point["num_envs"]
    envs = make_vector_env(point["backend"], env_id, n, point["threads"])
    try:
        space = envs.single_action_space
        rng = np.random.default_rng(seed)
        pool = [rng.uniform(space.low, space.high, size=(n, *space.shape)).astype(np.float32)
                for _ in range(ACTION_POOL)]
        envs.reset(seed=seed)
        for i in range(warmup):
            envs.step(pool[i % ACTION_POOL])
        steps = point["vector_steps"]
        start = time.perf_counter()
        for i in range(steps):
            envs.step(pool[i % ACTION_POOL])
        seconds = time.perf_counter() - start
    finally:
        envs.close()  # AsyncVectorEnv: ends its subprocesses
    return {"seconds": round(seconds, 4), "sps": round(n * steps / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env-id", default="HalfCheetah-v4", choices=sorted(ppo_continuous.MUJOCO_BATCH_TASKS))
    parser.add_argument("--num-envs", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="mujoco.batch's thread counts")
    parser.add_argument("--env-steps", type=int, default=20_000, help="env steps timed per point")
    parser.add_argument("--min-vector-steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=20, help="vector steps before the clock starts")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--async-max-envs", type=int, default=64,
                        help="AsyncVectorEnv (one process per env) is skipped above this many envs")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/env_throughput/HalfCheetah-v4.json"))
    args = parser.parse_args()

    started = time.perf_counter()
    points, skipped = [], []
    for n in args.num_envs:
        vector_steps = max(math.ceil(args.env_steps / n), args.min_vector_steps)
        configs = [("mujoco.batch", t) for t in args.threads] + [("loop", None), ("sync", None), ("async", None)]
        for backend, threads in configs:
            if backend == "async" and n > args.async_max_envs:
                skipped.append({"backend": backend, "num_envs": n, "reason":
                                f"one process per env: {n} processes on {os.cpu_count()} cores "
                                f"(above --async-max-envs {args.async_max_envs})"})
                continue
            points.append({"backend": backend, "threads": threads, "num_envs": n, "vector_steps": vector_steps,
                           "runs": []})
    for repeat in range(args.repeats):
        for point in points:
            point["runs"].append(measure(point, args.env_id, args.warmup, args.seed))
            threads = "" if point["threads"] is None else f", {point['threads']} thread(s)"
            print(f"repeat {repeat + 1}: {point['backend']}{threads}, N={point['num_envs']}: "
                  f"{point['runs'][-1]['sps']:,.0f} env steps/s", flush=True)

    result = {
        "env_id": args.env_id,
        "command": " ".join(["python", "benchmarks/env_throughput.py", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "packages": package_versions(),
        "settings": {"env_steps": args.env_steps, "min_vector_steps": args.min_vector_steps,
                     "warmup": args.warmup, "repeats": args.repeats, "seed": args.seed,
                     "autoreset_mode": "SAME_STEP", "actions": "float32 uniform in the action bounds"},
        "points": points,
        "skipped": skipped,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(f"\n{args.env_id}, env steps/s (mean; each repeat)")
    print(f"{'backend':<14} {'threads':>7} {'N':>4} {'mean':>9}  repeats")
    for p in points:
        sps = [r["sps"] for r in p["runs"]]
        print(f"{p['backend']:<14} {p['threads'] or '':>7} {p['num_envs']:>4} {statistics.mean(sps):>9,.0f}  "
              + " / ".join(f"{v:,.0f}" for v in sps))
    for s in skipped:
        print(f"skipped: {s['backend']} N={s['num_envs']}: {s['reason']}")
    print(f"wall time {result['wall_s']} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=1)  # one line per point and per skip, to keep the file short
    for key in ("points", "skipped"):
        rows = ",\n  ".join(json.dumps(row) for row in result[key])
        compact = f' "{key}": [\n  {rows}\n ]' if rows else f' "{key}": []'
        text = text.replace(json.dumps({key: result[key]}, indent=1)[2:-2], compact)
    assert json.loads(text) == result
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
