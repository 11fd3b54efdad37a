"""Steps per second of ppo_continuous.py, ppo_penalty.py and trpo.py (HalfCheetah-v4) and ppo_discrete.py
(CartPole-v1) over a small grid: 1 and 64 envs, 1 and 8 processes, with and without --cuda. Made for a GPU
machine; runs on any (issues 25 and 26).

    python benchmarks/gpu.py --budget-s 240 --out benchmarks/results/gpu.json
    python benchmarks/gpu.py --fast-run --budget-s 360 --out benchmarks/results/gpu.json   # and issue 27's race

--fast-run first trains ppo_continuous.py's fast configuration (benchmarks/SPEED.md: the physics of 16 envs on
mujoco.batch's threads, one per core) on HalfCheetah-v4 for 1M steps, with --cuda where there is CUDA, and
records the seconds until it reaches cleanrl's published 1M-step return (1442.64) and the return it ends at.

Each point is one run of a script in a temporary folder of its own: 1 process is a plain `python script.py`,
K processes are `python -m torch.distributed.run --standalone --nproc-per-node K script.py` (torchrun, with this
Python's torch). The batch per process is fixed per script, so every point does the same update work per
process: 2048 for HalfCheetah (ppo_continuous.py's default: 1 env x 2048 steps; 64 envs x 32 steps) and 8192 for
CartPole (64 envs x ppo_discrete.py's default 128 steps; 1 env x 8192 steps). Each script keeps its other
defaults; --scripts picks some of them. --total-timesteps is three
iterations of the global batch (K x the batch per process; global_step counts every process's steps). The SPS is
that of iterations 2 and 3: global steps over seconds between the ends of iterations 1 and 3, read from the
run's metrics.jsonl, so start-up, env creation and the first iteration (CUDA context, first kernels) are left
out. `seconds` is the whole point's wall time.

Points run in order of what they tell (one process before eight; one env before 64; each with and without
--cuda, side by side). A point is skipped, with the reason recorded, when it cannot run here (--cuda without
CUDA; K processes on fewer than K cores) or when the budget left cannot hold it (estimated from the points run
so far). Every point runs under a timeout of the budget left, its whole process tree killed at the end of it;
one that fails is recorded with the last lines of its stderr, and the grid goes on. Writes JSON (the command,
date, machine, package versions and the points) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {  # script: (env, batch per process)
    "ppo_continuous": ("HalfCheetah-v4", 2048),
    "ppo_discrete": ("CartPole-v1", 8192),
    "ppo_penalty": ("HalfCheetah-v4", 2048),
    "trpo": ("HalfCheetah-v4", 2048),
}
ASYNC_ENVS = {"ppo_continuous", "ppo_penalty"}  # step more than one MuJoCo env in subprocesses (AsyncVectorEnv)
# ppo_continuous.py's fast configuration (benchmarks/SPEED.md) and the score it races to (issue 27)
FAST_RUN = ["--env-id", "HalfCheetah-v4", "--env-backend", "mujoco-batch", "--num-envs", "16", "--num-steps", "128",
            "--num-minibatches", "8", "--total-timesteps", "1000000", "--seed", "1"]
CLEANRL_HALFCHEETAH = 1442.64  # cleanrl's published 1M-step return of ppo_continuous_action.py
ITERATIONS = 3  # the first is start-up; the SPS is that of the other two
MIN_POINT_S = 10.0  # a point is not started with less budget left than this
STDERR_LINES = 15  # of a failed point, kept in the JSON


def grid(processes: list[int], num_envs: list[int], scripts: list[str]) -> list[dict]:
    """The points, most informative first: fewer processes before more, fewer envs before more, then each
    script without and with --cuda."""
    return [
        {"script": script, "env": SCRIPTS[script][0], "num_envs": n, "processes": k, "cuda": cuda}
        for k in processes
        for n in num_envs
        for script in scripts
        for cuda in (False, True)
    ]


def command(point: dict) -> list[str]:
    batch = SCRIPTS[point["script"]][1]
    k, n = point["processes"], point["num_envs"]
    launcher = [sys.executable] if k == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                 "--nproc-per-node", str(k)]
    flags = ["--env-id", point["env"], "--num-envs", str(n), "--num-steps", str(batch // n),
             "--total-timesteps", str(ITERATIONS * k * batch), "--seed", "1"]
    return launcher + [str(ROOT / f"{point['script']}.py")] + flags + (["--cuda"] if point["cuda"] else [])


def descendants(pid: int) -> set[int]:
    """Every process below pid (children, their children, ...), from /proc; torchrun starts its workers in
    sessions of their own, so a process group does not reach them."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(command name)": state, ppid, ...
        except (OSError, IndexError):
            continue  # ended meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    """Stop (SIGSTOP) the point's process and everything below it until no new process appears, then SIGKILL
    them all: the tree's members, by id, and nothing else."""
    if not Path("/proc").is_dir():
        os.killpg(proc.pid, signal.SIGKILL)  # no /proc: the process group started for the point
    else:
        stopped: set[int] = set()
        for _ in range(5):
            new = ({proc.pid} | descendants(proc.pid)) - stopped
            if not new:
                break
            for pid in new:
                try:
                    os.kill(pid, signal.SIGSTOP)
                except ProcessLookupError:
                    pass
            stopped |= new
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    proc.wait()


def stderr_of(path: Path) -> dict:
    """What to keep of a failed point's stderr: the scripts' own one-line errors (under torchrun, one per rank,
    above torchrun's report) and the last lines."""
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    errors = list(dict.fromkeys(line for line in lines if line.startswith("error:")))
    return {"errors": errors, "stderr": "\n".join(lines[-STDERR_LINES:])}


def shown(cmd: list[str]) -> str:
    """The command as one would type it in the project's root."""
    return shlex.join(["python", *cmd[1:]]).replace(str(ROOT) + "/", "")


def run_point(point: dict, timeout: float) -> dict:
    """Runs one point in a temporary folder, under `timeout` seconds; returns what to record of it."""
    result, rows = run_command(command(point), timeout)
    if rows is None:
        return result
    times = [row["time"] for row in rows]
    result["iteration_seconds"] = [round(b - a, 3) for a, b in zip([0.0] + times, times)]
    result["sps"] = round((rows[-1]["global_step"] - rows[0]["global_step"]) / (times[-1] - times[0]), 1)
    result["status"] = "ok"
    batch = SCRIPTS[point["script"]][1]
    if rows[0]["global_step"] != point["processes"] * batch:
        result["note"] = (f"global_step after iteration 1 is {rows[0]['global_step']}, not processes x batch "
                          f"= {point['processes'] * batch}")
    return result


def run_fast(cuda: bool, timeout: float) -> dict:
    """ppo_continuous.py's fast configuration (benchmarks/SPEED.md), HalfCheetah-v4, seed 1, 1M steps: the
    physics on mujoco.batch's threads (all cores), the learner on the GPU with --cuda. Records the seconds until
    the mean return of the last 100 episodes first reaches cleanrl's published 1M-step return, and the end."""
    cmd = [sys.executable, str(ROOT / "ppo_continuous.py"), *FAST_RUN] + (["--cuda"] if cuda else [])
    result, rows = run_command(cmd, timeout)
    result.update(cuda=cuda, threshold=CLEANRL_HALFCHEETAH)
    if rows is None:
        return result
    reached = next((row for row in rows if (row.get("episodic_return_100") or -math.inf) >= CLEANRL_HALFCHEETAH), None)
    result.update(status="ok", steps_to_threshold=reached and reached["global_step"],
                  seconds_to_threshold=reached and round(reached["time"], 1),
                  final_return_100=rows[-1]["episodic_return_100"], train_seconds=round(rows[-1]["time"], 1),
                  sps=round(rows[-1]["sps"], 1))
    return result


def run_command(cmd: list[str], timeout: float) -> tuple[dict, list[dict] | None]:
    """Runs a script's command in a temporary folder under `timeout` seconds: (what to record, the rows of its
    metrics.jsonl), the rows None when it failed."""
    result = {"command": shown(cmd), "sps": None, "seconds": None, "iteration_seconds": None}
    with tempfile.TemporaryDirectory(prefix="gpu_bench_") as tmp:
        cwd = Path(tmp)
        start = time.monotonic()
        with open(cwd / "stdout.txt", "w") as out, open(cwd / "stderr.txt", "w") as err:
            proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
            finally:  # a timeout, or Ctrl-C of this script: nothing of the point is left running
                if proc.poll() is None:
                    kill_tree(proc)
                    result.update(status="timeout", reason=f"killed after {timeout:.0f} s (the budget left)")
        result["seconds"] = round(time.monotonic() - start, 1)
        if "status" in result:
            return result, None
        if proc.returncode != 0:
            return {**result, "status": "failed", "reason": f"exit code {proc.returncode}",
                    **stderr_of(cwd / "stderr.txt")}, None
        folders = sorted((cwd / "runs").glob("*/metrics.jsonl")) if (cwd / "runs").is_dir() else []
        if len(folders) != 1:
            return {**result, "status": "failed",
                    "reason": f"{len(folders)} run folders with a metrics.jsonl; one expected (only rank 0 writes)",
                    **stderr_of(cwd / "stderr.txt")}, None
        rows = [json.loads(line) for line in folders[0].read_text().splitlines()]
    if len(rows) < 2:
        return {**result, "status": "failed", "reason": f"{len(rows)} iterations logged; at least 2 needed"}, None
    return result, rows


def estimate(point: dict, done: list[dict]) -> float | None:
    """Seconds the point will take, from the points run so far: the slowest one of the same script and number
    of envs, scaled by how much more the CPU cores are oversubscribed (busy processes per core, at least 1),
    and by 2 for more processes than it had (torchrun's start, the collectives: about what 2 ranks on 2 cores
    took); None when none is comparable yet."""
    cores = os.cpu_count() or 1

    def load(p: dict) -> float:
        per_process = p["num_envs"] + 1 if p["script"] in ASYNC_ENVS and p["num_envs"] > 1 else 1
        return max(1.0, p["processes"] * per_process / cores)

    same = [p for p in done if p["status"] in ("ok", "failed", "timeout") and p["seconds"]
            and p["script"] == point["script"] and p["num_envs"] == point["num_envs"]]
    if not same:
        return None
    return max(p["seconds"] * load(point) / load(p) * (1.0 if p["processes"] >= point["processes"] else 2.0)
               for p in same)


def machine() -> dict:
    cpu = "unknown CPU"
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f"{torch.cuda.get_device_name(0)} (x{torch.cuda.device_count()}, CUDA {torch.version.cuda})"
    except Exception as err:  # no torch, a broken driver: the grid records why its --cuda points fail
        gpu = f"unknown ({type(err).__name__}: {err})"
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "system": f"{platform.system()} {platform.release()}",
            "python": platform.python_version()}


def package_versions() -> dict:
    versions = {}
    for name in ("torch", "gymnasium", "mujoco", "numpy"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def print_table(points: list[dict]) -> None:
    print(f"\n{'script':<15} {'env':<15} {'envs':>4} {'procs':>5} {'cuda':>4}  {'status':<8} {'SPS':>8} {'s':>6}")
    for p in points:
        sps = "-" if p.get("sps") is None else f"{p['sps']:.0f}"
        seconds = "-" if p.get("seconds") is None else f"{p['seconds']:.1f}"
        print(f"{p['script']:<15} {p['env']:<15} {p['num_envs']:>4} {p['processes']:>5} "
              f"{'yes' if p['cuda'] else 'no':>4}  {p['status']:<8} {sps:>8} {seconds:>6}")
    for p in points:
        if p["status"] != "ok" or p.get("note"):
            print(f"  {p['script']} envs={p['num_envs']} procs={p['processes']} cuda={p['cuda']}: "
                  f"{p['status']}: {p.get('reason') or p.get('note')}")
            shown_lines = p.get("errors") or (p.get("stderr") or "").splitlines()[-1:]
            for line in shown_lines:
                print("    " + line[:300])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=240.0, help="wall seconds for the whole grid")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu.json", help="JSON file")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 8], help="processes per point (torchrun)")
    parser.add_argument("--num-envs", type=int, nargs="+", default=[1, 64], help="envs per process")
    parser.add_argument("--scripts", nargs="+", choices=list(SCRIPTS), default=list(SCRIPTS), help="which scripts")
    parser.add_argument("--fast-run", action="store_true",
                        help="first, ppo_continuous.py's fast configuration for 1M steps (--cuda where there is CUDA)")
    args = parser.parse_args()
    start = time.monotonic()
    info = machine()  # before the points: it also tells whether CUDA is there
    has_cuda = info["gpu"] is not None and not info["gpu"].startswith("unknown")
    done: list[dict] = []
    fast: dict | None = None

    def write() -> dict:
        """The JSON, rewritten after every point: a grid stopped half-way keeps what it measured."""
        result = {
            "command": shlex.join(["python", *sys.argv]),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
            "machine": info,
            "packages": package_versions(),
            "budget_s": args.budget_s,
            "seconds": round(time.monotonic() - start, 1),
            "batch_per_process": {script: SCRIPTS[script][1] for script in args.scripts},
            "points": done,
            "fast_run": fast,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        return result

    if args.fast_run:
        print(f"running ppo_continuous.py {' '.join(FAST_RUN)}{' --cuda' if has_cuda else ''}", flush=True)
        fast = run_fast(has_cuda, timeout=args.budget_s)
        print(f"  {fast['status']}: {fast.get('seconds_to_threshold')} s to {CLEANRL_HALFCHEETAH}, "
              f"final {fast.get('final_return_100')}, {fast['seconds']} s in all", flush=True)
        write()
    for point in grid(args.processes, args.num_envs, args.scripts):
        left = args.budget_s - (time.monotonic() - start)
        needed = estimate(point, done)
        skip = None
        if point["cuda"] and not has_cuda:
            skip = "no CUDA device"
        elif point["processes"] > (os.cpu_count() or 1):
            skip = f"fewer than {point['processes']} cores ({os.cpu_count()})"
        elif left < MIN_POINT_S:
            skip = f"budget spent ({max(left, 0):.0f} s left)"
        elif needed is not None and needed > left:
            skip = f"needs ~{needed:.0f} s (estimated from the points run), {left:.0f} s left"
        if skip:
            done.append({**point, "command": shown(command(point)), "status": "skipped", "reason": skip,
                         "sps": None, "seconds": None})
            continue
        print(f"running {shown(command(point))} (at most {left:.0f} s)", flush=True)
        done.append({**point, **run_point(point, timeout=left)})
        print(f"  {done[-1]['status']}: {done[-1]['sps']} SPS, {done[-1]['seconds']} s", flush=True)
        write()
    result = write()
    print_table(done)
    print(f"\n{result['seconds']:.0f} s of a {args.budget_s:.0f} s budget; written to {args.out}")


if __name__ == "__main__":
    main()
