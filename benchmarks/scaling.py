"""Steps per second of a script as it scales out: K processes (torchrun) and N envs in one process, at the same
global batch, and what an update spends in communication per minibatch step.

    python benchmarks/scaling.py ppo_continuous.py --iterations 12 --repeats 2 --out benchmarks/results/scaling/ppo_continuous.json
    python benchmarks/scaling.py ppo_discrete.py --iterations 60 --repeats 2 --out benchmarks/results/scaling/ppo_discrete.json
    python benchmarks/scaling.py trpo.py --processes-only --out benchmarks/results/scaling/trpo.json -- --env-id HalfCheetah-v4
    python benchmarks/scaling.py ppo_penalty.py --processes-only --out benchmarks/results/scaling/ppo_penalty.json -- \
        --env-id HalfCheetah-v4 --learning-rate 3e-4 --update-epochs 10 --num-minibatches 32 --ent-coef 0.0

Each configuration trains the script with its defaults for --iterations iterations of the same global batch
(the script's default num_envs x num_steps): one process with --num-envs 1, 2, 4, 8 (num_steps = batch / N), and
K = 2 processes under `torchrun --standalone --nproc-per-node 2` with half the envs each (or half the steps,
when the default is one env). The minibatch count stays the default, so the global minibatch is the same too.
Runs alternate over the configurations --repeats times (drift hits all alike); the figure of a run is its
median time per iteration, the first 3 left out (start-up, the first rollout), as SPS of the global batch.

--processes-only: just one process with the default envs and two with half of them each.

Then the communication, two ways. For the PPO-Clip scripts, two gloo ranks on this machine time the collectives
of one minibatch step alone (the gradients' all-reduce of the agent's size, and the advantage normalisation's),
median over 2,000 steps. For every script, two gloo ranks train it for --collective-iterations iterations with
every collective counted and timed where it is called (which helper, called from which function): the
collectives an iteration makes, and what they cost inside a real run, waiting for the other rank included.
Nothing else should run meanwhile.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib
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

# (num_envs, num_steps) of each script's defaults; ppo_penalty.py: its MuJoCo settings (benchmarks/RESULTS.md)
DEFAULTS = {"ppo_continuous.py": (1, 2048), "ppo_discrete.py": (4, 128), "ppo_penalty.py": (1, 2048), "trpo.py": (2, 1024)}


def configurations(script: str, processes_only: bool) -> list[dict]:
    num_envs, num_steps = DEFAULTS[script]
    batch = num_envs * num_steps
    env_counts = [num_envs] if processes_only else [1, 2, 4, 8]
    configs = [{"processes": 1, "num_envs": n, "num_steps": batch // n} for n in env_counts]
    if processes_only:
        half = {"num_envs": num_envs // 2, "num_steps": num_steps} if num_envs >= 2 else {"num_envs": 1, "num_steps": batch // 2}
        return configs + [{"processes": 2, **half}]
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


def collectives(rank: int, world_size: int, port: int, script: str, flags: list[str], out: str) -> None:
    """Train the script on two gloo ranks with torch.distributed's collectives wrapped: each call counted and
    timed under 'helper <- caller' (the script's function that made the collective, and the one that called it)."""
    sys.path.insert(0, str(ROOT))  # a spawned process starts with this file's folder only
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    seconds = collections.defaultdict(list)

    def timed(collective):
        def wrapper(*args, **kwargs):
            helper = sys._getframe(1)
            start = time.perf_counter()
            result = collective(*args, **kwargs)
            seconds[f"{helper.f_code.co_name} <- {helper.f_back.f_code.co_name}"].append(time.perf_counter() - start)
            return result

        return wrapper

    for name in ("all_reduce", "all_gather", "barrier"):
        setattr(torch.distributed, name, timed(getattr(torch.distributed, name)))
    with tempfile.TemporaryDirectory() as cwd:
        os.chdir(cwd)
        start = time.perf_counter()
        importlib.import_module(Path(script).stem).main(flags)
        wall = time.perf_counter() - start
    if rank == 0:
        Path(out).write_text(json.dumps({"wall_s": wall, "sites": {
            site: {"calls": len(v), "median_us": statistics.median(v) * 1e6, "total_ms": sum(v) * 1e3}
            for site, v in sorted(seconds.items())}}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("script", choices=sorted(DEFAULTS))
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--processes-only", action="store_true")
    parser.add_argument("--collective-iterations", type=int, default=4)
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
        comm = None
        if args.script.startswith("ppo_") and args.script != "ppo_penalty.py":
            mp.start_processes(communication, args=(2, port, args.script, out_file), nprocs=2, start_method="spawn")
            comm = json.loads(Path(out_file).read_text())
        num_envs, num_steps = DEFAULTS[args.script]
        two = configurations(args.script, processes_only=True)[-1]  # each rank: half the global batch
        flags = [*extra, "--total-timesteps", str(num_envs * num_steps * args.collective_iterations),
                 "--num-envs", str(two["num_envs"]), "--num-steps", str(two["num_steps"])]
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        mp.start_processes(collectives, args=(2, port, args.script, flags, out_file), nprocs=2, start_method="spawn")
        in_a_run = {"flags": flags, "iterations": args.collective_iterations, **json.loads(Path(out_file).read_text())}

    configs = configurations(args.script, args.processes_only)
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
        "collectives_in_a_run": in_a_run,
    }
    print(f"{'processes':>9} {'num_envs':>8} {'num_steps':>9}  SPS (each repeat)")
    for row in result["runs"]:
        print(f"{row['processes']:>9} {row['num_envs']:>8} {row['num_steps']:>9}  "
              + " / ".join(f"{v:,.0f}" for v in row["sps"]))
    if comm:
        print(f"two gloo ranks, per minibatch step: gradients' all-reduce ({comm['parameters']} numbers) "
              f"{comm['average_gradients']:.0f} us, advantage normalisation {comm['normalize_advantages_over_ranks']:.0f} us")
    iterations = in_a_run["iterations"]
    print(f"collectives in {iterations} iterations on two ranks ({in_a_run['wall_s']:.1f} s):")
    for site, row in in_a_run["sites"].items():
        print(f"  {site:<55} {row['calls'] / iterations:7.1f} per iteration, median {row['median_us']:6.0f} us, "
              f"{row['total_ms'] / iterations:7.1f} ms per iteration")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
