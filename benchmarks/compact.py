"""How benchmarks/results/ stores a run's per-iteration metrics, and the converter to that format.

A script logs one JSON line per iteration to runs/<run_name>/metrics.jsonl. benchmarks/run.py (and
cleanrl_reference.py, rlhf_overoptimisation.py) store each seed's lines as seed<k>.json.gz instead: gzip'd JSON
holding the same rows column by column, every float rounded to 8 significant digits (more than a float32 holds;
enough that every figure RESULTS.md quotes reads the same as from the full floats; a 1M-step ppo_continuous run:
~310 KB -> ~35 KB):

    {"format": "columns/1", "rows": 488,
     "keys": [["iteration", "global_step", ...]],     # the key list(s) of the rows, in the rows' key order
     "columns": {"iteration": [1, 2, ...], "global_step": [2048, 4096, ...], ...}}

Rows with other keys than the first (ppo_rlhf_toy.py's stages) add a key list each, and a column "key_set"
(not a metric) says which list each row has; a column holds null for a row that lacks its key. Reading gives the
rows back as logged, floats rounded. Every reader here (plot.py, compare.py, diagnostics.py, plot_beta.py,
rlhf_overoptimisation.py) reads seed<k>.json.gz and a plain seed<k>.jsonl or metrics.jsonl alike, through
read_metrics() and seed_files() below.

    python benchmarks/compact.py benchmarks/results/<folder> [more folders]   # every *.jsonl below: -> .json.gz

The converter checks each file against its rows before deleting the .jsonl. summary.json files are not touched:
they hold the exact final returns.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

FORMAT = "columns/1"
DIGITS = 8  # significant digits kept of every float
SUFFIXES = (".json.gz", ".jsonl")  # the compact format, and a script's plain log


def rounded(value):
    """A float to DIGITS significant digits; anything else (int, bool, str, None) as it is."""
    return float(f"{value:.{DIGITS}g}") if isinstance(value, float) else value


def rounded_tree(x, digits: int):
    """Every float in nested lists and dicts to `digits` significant digits (a figure's data, kept small)."""
    if isinstance(x, float):
        return float(f"{x:.{digits}g}")
    if isinstance(x, list):
        return [rounded_tree(v, digits) for v in x]
    if isinstance(x, dict):
        return {k: rounded_tree(v, digits) for k, v in x.items()}
    return x


def to_columns(rows: list[dict]) -> dict:
    key_sets: list[list[str]] = []
    which = []
    for row in rows:
        keys = list(row)
        if keys not in key_sets:
            key_sets.append(keys)
        which.append(key_sets.index(keys))
    names = list(dict.fromkeys(k for keys in key_sets for k in keys))  # every key, first seen first
    if "key_set" in names:
        raise ValueError("a metric named 'key_set' would clash with the format's own column")
    columns = {k: [rounded(row.get(k)) for row in rows] for k in names}
    if len(key_sets) > 1:
        columns["key_set"] = which
    return {"format": FORMAT, "rows": len(rows), "keys": key_sets, "columns": columns}


def from_columns(data: dict) -> list[dict]:
    if data.get("format") != FORMAT:
        raise ValueError(f"unknown format {data.get('format')!r} (expected {FORMAT!r})")
    columns, key_sets = data["columns"], data["keys"]
    which = columns.get("key_set", [0] * data["rows"])
    return [{k: columns[k][i] for k in key_sets[which[i]]} for i in range(data["rows"])]


def write_metrics(path: Path, rows: list[dict]) -> None:
    """Store rows (a metrics.jsonl's lines, as dicts) at path, a .json.gz file. Byte-identical for equal rows
    (no time stamp in the gzip header), so re-converting leaves git nothing to commit."""
    text = json.dumps(to_columns(rows), separators=(",", ":"))
    Path(path).write_bytes(gzip.compress(text.encode(), compresslevel=9, mtime=0))


def read_metrics(path: Path) -> list[dict]:
    """The rows of a .json.gz file written by write_metrics, or of a plain .jsonl (one JSON object a line)."""
    path = Path(path)
    if path.name.endswith(".json.gz"):
        return from_columns(json.loads(gzip.decompress(path.read_bytes())))
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stem(path: Path) -> str:
    """seed3.json.gz, seed3.jsonl -> seed3."""
    name = Path(path).name
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def seed_number(path: Path) -> int | None:
    """seed3.json.gz -> 3; None for a file not named seed<k> (a run's metrics.jsonl)."""
    name = stem(path)
    return int(name[4:]) if name.startswith("seed") and name[4:].isdigit() else None


def seed_files(folder: Path, prefix: str = "seed") -> list[Path]:
    """The files <prefix><k>.json.gz or <prefix><k>.jsonl in folder, by name (seed1, seed10, seed2, ...). A folder
    with none of them but a metrics.jsonl (a run's own folder, runs/<run_name>) gives that file; a file given
    instead of a folder gives itself."""
    folder = Path(folder)
    if folder.is_file():
        return [folder]
    found = {}
    for suffix in SUFFIXES:
        for path in folder.glob(f"{prefix}*{suffix}"):
            name = stem(path)
            if not name[len(prefix):].isdigit():
                continue
            if name in found:
                raise SystemExit(f"error: {folder} holds {name} twice ({found[name].name}, {path.name}): keep one")
            found[name] = path
    files = sorted(found.values(), key=lambda p: p.name)
    if not files and prefix == "seed" and (folder / "metrics.jsonl").is_file():
        files = [folder / "metrics.jsonl"]
    return files


def convert(path: Path) -> Path:
    """path.jsonl -> path.json.gz, checked against the rows (rounded) before path.jsonl is deleted."""
    rows = read_metrics(path)
    out = path.with_name(stem(path) + ".json.gz")
    write_metrics(out, rows)
    expected = [{k: rounded(v) for k, v in row.items()} for row in rows]
    if json.dumps(read_metrics(out)) != json.dumps(expected):  # as text: NaN equals NaN
        raise SystemExit(f"error: {out} does not read back as {path}; {path} kept")
    print(f"{path}: {path.stat().st_size // 1024} KB -> {out.name}: {out.stat().st_size // 1024} KB")
    path.unlink()
    return out


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        raise SystemExit(__doc__)
    for folder in map(Path, sys.argv[1:]):
        files = sorted(folder.rglob("*.jsonl")) if folder.is_dir() else [folder]
        files = [f for f in files if "work" not in f.relative_to(folder).parts[:-1]] if folder.is_dir() else files
        if not files:
            raise SystemExit(f"error: no .jsonl file in {folder}")
        for path in files:
            convert(path)


if __name__ == "__main__":
    main()
