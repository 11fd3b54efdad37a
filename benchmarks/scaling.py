"""Steps per second of a script as it scales out: K processes (torchrun) and N envs in one process, at the same
global batch, and what an update spends in communication per minibatch step.

    python benchmarks/scaling.py ppo_continuous.py --iterations 12 --repeats 2 --out benchmarks/results/scaling/ppo_continuous.json
    python benchmarks/scaling.py ppo_discrete.py --iterations 60 --repeats 2 --out benchmarks/results/scaling/ppo_discrete.json

Each configuration trains the script with its defaults for --iterations iterations of the same global batch
(the script's default num_envs x num_steps): one process with --num-envs 1, 2, 4, 8 (num_steps = batch / N), and
K = 2 processes under `torchrun --standalone --nproc-per-node 2` with half the envs each (or half the steps,
when the default is one env). The minibatch count stays the default, so the global minibatch is the same too.
Runs alternate over the configurations --repeats times (drift hits all alike); the figure of a run is its
median time per iteration, the first 3 left out (start-up, the first rollout), as SPS of the global batch.

Then the communication: two gloo ranks on this machine time the collectives of one minibatch step (the
gradients' all-reduce of the agent's size, and the two scalar all-reduces of the advantage normalisation),
median over 2,000 steps. Nothing else should run meanwhile.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compact import read_metrics  # noqa: E402
from run import ROOT, machine, package_versions  # noqa: E402

DEFAULTS = {"ppo_continuous.py": (1, 2048), "ppo_discrete.py": (4, 128)}  # (num_envs, num_steps) of the defaults


def configurations(script: str) -> list[dict]:
    num_envs, num_steps = DEFAULTS[script]
    batch = num_envs * num_steps
    configs = [{"processes": 1, "num_envs": n, "num_steps": batch // n} for n in (1, 2, 4, 8)]
    if num_envs >= 2:
        configs.append({"processes": 2, "num_envs": num_envs // 2, "num_steps": num_steps})
    configs.append({"processes": 2, "num_envs": 1, "num_steps": batch // 2})
    return configs


def run_one(script: str, config: dict, iterations: int, extra: list[str]) -> float:
    """SPS of the global batch from the median iteration time of one run of the configuration."""
    batch = config["num_envs"] * config["num_steps"] * config["processes"]
    launcher = [sys.executable]
    if config["processes"] > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(config["processes"])]
    flags = ["--num-envs", str(config["num_envs"]), "--num-steps", str(config["num_steps"]),
             "--total-timesteps", str(batch * iterations), *extra]
    with tempfile.TemporaryDirectory() as cwd:
        done = subprocess.run([*launcher, str(ROOT / script), *flags], cwd=cwd, capture_output=True, text=True,
                              timeout=1800)
        if done.returncode != 0:
            raise SystemExit(f"error: {script} {flags} failed:\n{done.stderr[-3000:]}")
        (metrics_file,) = Path(cwd).glob("runs/*/metrics.jsonl")
        times = [row["time"] for row in read_metrics(metrics_file)]
    per_iteration = [b - a for a, b in zip(times[3:], times[4:])]
    return batch / statistics.median(per_iteration)


def communication(rank: int, world_size: int, port: int, script: str, out: str) -> None:
    """Median microseconds of one minibatch step's collectives on two gloo ranks."""
    import importlib

    sys.path.insert(0, str(ROOT))  # a spawned process starts with this file's folder only
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    module = importlib.import_module(Path(script).stem)
    agent = module.Agent(17, 6) if script == "ppo_continuous.py" else module.Agent(4, 2)
    loss = sum((p**2).sum() for p in agent.parameters())
    loss.backward()
    advantages = torch.randn(64 if script == "ppo_continuous.py" else 128)
    timings = {"average_gradients": [], "normalize_advantages_over_ranks": []}
    for _ in range(2000):
        start = time.perf_counter()
        module.average_gradients(agent.parameters(), world_size)
        middle = time.perf_counter()
        module.normalize_advantages_over_ranks(advantages, world_size)
        timings["average_gradients"].append(middle - start)
        timings["normalize_advantages_over_ranks"].append(time.perf_counter() - middle)
    if rank == 0:
        medians = {k: statistics.median(v) * 1e6 for k, v in timings.items()}
        medians["parameters"] = sum(p.numel() for p in agent.parameters())
        Path(out).write_text(json.dumps(medians))
    torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("script", choices=sorted(DEFAULTS))
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    extra = argv[split + 1 :]
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "comm.json")
        mp.start_processes(communication, args=(2, port, args.script, out_file), nprocs=2, start_method="spawn")
        comm = json.loads(Path(out_file).read_text())

    configs = configurations(args.script)
    sps = {json.dumps(c): [] for c in configs}
    for repeat in range(args.repeats):
        for config in configs:
            sps[json.dumps(config)].append(run_one(args.script, config, args.iterations, extra))
            print(f"repeat {repeat + 1}: {config} {sps[json.dumps(config)][-1]:.0f} SPS", flush=True)

    result = {
        "script": args.script,
        "command": " ".join(["python", "benchmarks/scaling.py", *sys.argv[1:]]),
        "machine": machine(),
        "packages": package_versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "runs": [{**json.loads(key), "sps": values} for key, values in sps.items()],
        "communication_us_per_minibatch_step": comm,
    }
    print(f"{'processes':>9} {'num_envs':>8} {'num_steps':>9}  SPS (each repeat)")
    for row in result["runs"]:
        print(f"{row['processes']:>9} {row['num_envs']:>8} {row['num_steps']:>9}  "
              + " / ".join(f"{v:,.0f}" for v in row["sps"]))
    print(f"two gloo ranks, per minibatch step: gradients' all-reduce ({comm['parameters']} numbers) "
          f"{comm['average_gradients']:.0f} us, advantage normalisation {comm['normalize_advantages_over_ranks']:.0f} us")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
