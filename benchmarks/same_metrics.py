"""Do two versions of a script log the same metrics? Runs each once, in its own temporary folder, and compares
every key of every line of their metrics.jsonl, wall-clock keys aside (time, sps).

    git show HEAD~3:ppo_discrete.py > /tmp/old_ppo_discrete.py
    python benchmarks/same_metrics.py /tmp/old_ppo_discrete.py ppo_discrete.py -- --total-timesteps 10240

Everything after `--` goes to both. Exit status 0 when every compared value is equal (floats exactly), 1 when
not; the first differences are printed. --out writes the verdict and the command as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

WALL_CLOCK = {"time", "sps"}


def metrics_of(script: Path, args: list[str]) -> list[dict]:
    with tempfile.TemporaryDirectory() as cwd:
        subprocess.run([sys.executable, str(script.resolve()), *args], cwd=cwd, check=True, stdout=subprocess.DEVNULL)
        files = sorted(Path(cwd).glob("runs/*/metrics.jsonl"))
        if len(files) != 1:
            raise SystemExit(f"error: expected one runs/*/metrics.jsonl from {script}, found {len(files)}")
        return [json.loads(line) for line in files[0].read_text().splitlines()]


def differences(old: list[dict], new: list[dict]) -> list[str]:
    found = []
    if len(old) != len(new):
        found.append(f"{len(old)} lines before, {len(new)} after")
    for line, (a, b) in enumerate(zip(old, new), start=1):
        for key in sorted((set(a) | set(b)) - WALL_CLOCK):
            if a.get(key, "<missing>") != b.get(key, "<missing>"):
                found.append(f"line {line}: {key} {a.get(key, '<missing>')!r} -> {b.get(key, '<missing>')!r}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    common = argv[split + 1 :]
    old, new = metrics_of(args.old, common), metrics_of(args.new, common)
    found = differences(old, new)
    keys = sorted(set().union(*old, *new) - WALL_CLOCK) if old or new else []
    verdict = "equal" if not found else "different"
    print(f"{args.new.name} {' '.join(common)}: {len(new)} lines, {len(keys)} keys compared: {verdict}")
    for line in found[:10]:
        print("  " + line)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "old": str(args.old), "new": str(args.new), "args": common, "lines": len(new), "keys": keys,
            "verdict": verdict, "differences": found[:50],
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        }, indent=1) + "\n")
    sys.exit(0 if not found else 1)


if __name__ == "__main__":
    main()
