"""What each speed device the scripts keep buys: a run with it against a run without it, alternating.

    python benchmarks/kept_devices.py ppo_continuous.py --repeats 3 -- --total-timesteps 61440
    python benchmarks/kept_devices.py ppo_discrete.py --repeats 3 -- --total-timesteps 102400

Issue 22's rule: a device that makes a script faster stays only if its line still reads as the article (a named
helper, called under the article's name) and it buys at least 5% of a run's wall time. The devices left are
plumbing below main(); each variant here swaps one of them for the plain thing it replaces, in a process of its
own, and the runs alternate (with, without-A, without-B, with, ...) so drift in the machine's speed hits all alike:
    sync_vector_env   SameStepVectorEnv -> gymnasium's SyncVectorEnv(SAME_STEP) + RecordEpisodeStatistics
    torch_normaliser  the normalisers' per-step arithmetic on numpy views (compute_array) -> on the torch tensors
Reports the median milliseconds per iteration (the first 3 left out) of each variant and its cost against the
script as it is. Nothing else should run meanwhile. --out writes the figures and the command as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import ROOT, machine, package_versions  # noqa: E402

# Run in a fresh interpreter: import the script, swap one device, call its main() with the given flags.
DRIVER = """
import sys
import gymnasium as gym
import torch
sys.path.insert(0, {root!r})
import {module} as script
variant = {variant!r}
if variant == "sync_vector_env":
    def SameStepVectorEnv(env_fns):
        envs = gym.vector.SyncVectorEnv(env_fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
        return gym.wrappers.vector.RecordEpisodeStatistics(envs)
    script.SameStepVectorEnv = SameStepVectorEnv
elif variant == "torch_normaliser":
    script.compute_array = lambda x, device: torch.as_tensor(x, dtype=torch.float64, device=device)
script.main({argv!r})
"""
VARIANTS = {"ppo_discrete": ["sync_vector_env"], "ppo_continuous": ["sync_vector_env", "torch_normaliser"],
            "ppo_penalty": ["sync_vector_env"], "trpo": ["sync_vector_env", "torch_normaliser"]}


def median_iteration_ms(module: str, variant: str, argv: list[str]) -> float:
    with tempfile.TemporaryDirectory() as cwd:
        code = DRIVER.format(root=str(ROOT), module=module, variant=variant, argv=argv)
        subprocess.run([sys.executable, "-c", code], cwd=cwd, check=True, stdout=subprocess.DEVNULL)
        (metrics,) = Path(cwd).glob("runs/*/metrics.jsonl")
        times = [json.loads(line)["time"] for line in metrics.read_text().splitlines()]
        return statistics.median((b - a) * 1e3 for a, b in zip(times[3:], times[4:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("script", help="one of ours, e.g. ppo_continuous.py")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    common = argv[split + 1 :]
    module = Path(args.script).stem
    variants = ["as_is", *VARIANTS[module]]
    ms = {variant: [] for variant in variants}
    for repeat in range(args.repeats):
        for variant in variants:
            ms[variant].append(median_iteration_ms(module, variant, common))
            print(f"repeat {repeat + 1}: {variant} {ms[variant][-1]:.1f} ms per iteration", flush=True)
    base = statistics.mean(ms["as_is"])
    result = {
        "script": args.script, "args": common, "machine": machine(), "packages": package_versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "median_ms_per_iteration": ms,
        "cost_without_device": {v: statistics.mean(ms[v]) / base - 1.0 for v in variants[1:]},
    }
    for variant in variants[1:]:
        print(f"without the device ({variant}): {statistics.mean(ms[variant]):.1f} ms against {base:.1f} ms "
              f"as is, {100 * result['cost_without_device'][variant]:+.1f}%")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
