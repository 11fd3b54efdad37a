"""Steps per second of one of our scripts against cleanrl's, in the same command on the same machine.

    python benchmarks/speed.py ppo_discrete.py --cleanrl-script ~/cleanrl/cleanrl/ppo.py \
        --cleanrl-python ~/venv-cleanrl/bin/python --total-timesteps 500000 --repeats 2

Runs are sequential and alternate (ours, ours with each --variant's flags, each --also script, cleanrl, ours, ...) so that drift
in the machine's speed hits all alike; nothing else should run meanwhile. Both get the same hyperparameters: their own defaults,
which are equal by design, plus whatever follows `--` (passed to both). SPS is the final figure each script
reports (global steps / wall seconds of the training loop). cleanrl runs in its own venv (it pins gymnasium
0.29); it is not part of this repository. Prints a table and writes it to --out as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import ROOT, machine, package_versions  # noqa: E402


def run_ours(script: Path, args: list[str]) -> float:
    with tempfile.TemporaryDirectory() as cwd:
        subprocess.run([sys.executable, str(script), *args], cwd=cwd, check=True, stdout=subprocess.DEVNULL)
        (metrics,) = Path(cwd).glob("runs/*/metrics.jsonl")
        return json.loads(metrics.read_text().splitlines()[-1])["sps"]


def run_cleanrl(python: str, script: str, args: list[str]) -> float:
    with tempfile.TemporaryDirectory() as cwd:
        out = subprocess.run([python, script, "--no-cuda", *args], cwd=cwd, check=True, capture_output=True, text=True)
        return float(re.findall(r"SPS: (\d+)", out.stdout)[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("script", help="ours, e.g. ppo_discrete.py")
    parser.add_argument("--cleanrl-script", required=True, help="path to cleanrl's ppo.py / ppo_continuous_action.py")
    parser.add_argument("--cleanrl-python", required=True, help="python of a venv with cleanrl's dependencies")
    parser.add_argument("--env-id", default=None, help="passed to both; default: each script's default env")
    parser.add_argument("--total-timesteps", type=int, default=None, help="passed to both")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variant", action="append", default=[],
                        help="flags of one more run of ours per repeat (ours only), e.g. --variant=--compile")
    parser.add_argument("--also", action="append", default=[],
                        help="another of our scripts, run once per repeat with the same arguments, e.g. --also trpo.py")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default benchmarks/results/speed_<script>.json)")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    common = argv[split + 1 :]  # everything after `--` goes to both scripts
    if args.env_id:
        common += ["--env-id", args.env_id]
    if args.total_timesteps:
        common += ["--total-timesteps", str(args.total_timesteps)]

    ours, theirs = [], []
    variants = {variant: [] for variant in args.variant}
    also = {script: [] for script in args.also}
    for repeat in range(args.repeats):
        ours.append(run_ours(ROOT / args.script, common))
        print(f"repeat {repeat + 1}: ours {ours[-1]:.0f} SPS", flush=True)
        for variant, sps in variants.items():
            sps.append(run_ours(ROOT / args.script, common + variant.split()))
            print(f"repeat {repeat + 1}: ours {variant} {sps[-1]:.0f} SPS", flush=True)
        for script, sps in also.items():
            sps.append(run_ours(ROOT / script, common))
            print(f"repeat {repeat + 1}: {script} {sps[-1]:.0f} SPS", flush=True)
        theirs.append(run_cleanrl(args.cleanrl_python, args.cleanrl_script, common))
        print(f"repeat {repeat + 1}: cleanrl {theirs[-1]:.0f} SPS", flush=True)
    result = {
        "script": args.script,
        "cleanrl_script": Path(args.cleanrl_script).name,
        "common_args": common,
        "machine": machine(),
        "packages": {"ours": package_versions(), "cleanrl": package_versions(args.cleanrl_python)},
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "ours_sps": ours,
        "cleanrl_sps": theirs,
        "ratio_of_means": float(np.mean(ours) / np.mean(theirs)),
        "variants": {
            variant: {"ours_sps": sps, "ratio_of_means": float(np.mean(sps) / np.mean(theirs))}
            for variant, sps in variants.items()
        },
        "also": {
            script: {"sps": sps, "ratio_of_means": float(np.mean(sps) / np.mean(theirs))} for script, sps in also.items()
        },
    }
    out = args.out or ROOT / "benchmarks" / "results" / f"speed_{Path(args.script).stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"ours {np.mean(ours):.0f} SPS, cleanrl {np.mean(theirs):.0f} SPS: ratio {result['ratio_of_means']:.2f}x "
          f"({args.repeats} alternating runs each); written to {out}")
    for variant, sps in variants.items():
        print(f"ours {variant}: {np.mean(sps):.0f} SPS, ratio {np.mean(sps) / np.mean(theirs):.2f}x")
    for script, sps in also.items():
        print(f"{script}: {np.mean(sps):.0f} SPS, ratio {np.mean(sps) / np.mean(theirs):.2f}x")


if __name__ == "__main__":
    main()
