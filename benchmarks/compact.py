"""Store runs compactly: rewrite the seed*.jsonl files of benchmarks/run.py folders with every float rounded to
4 significant digits and no spaces (a 1M-step ppo_continuous run: ~310 KB -> under 200 KB). summary.json, which
holds the exact final returns, is left as it is; plot.py reads the rounded files as before.

    python benchmarks/compact.py benchmarks/results/issue22/ppo_continuous/HalfCheetah-v4 [more folders]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rounded(value):
    return float(f"{value:.4g}") if isinstance(value, float) else value


def main() -> None:
    for folder in map(Path, sys.argv[1:]):
        files = sorted(folder.glob("seed*.jsonl"))
        if not files:
            raise SystemExit(f"error: no seed*.jsonl in {folder}")
        for path in files:
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            before = path.stat().st_size
            path.write_text("".join(json.dumps({k: rounded(v) for k, v in row.items()}, separators=(",", ":")) + "\n" for row in rows))
            print(f"{path}: {before // 1024} KB -> {path.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
