"""benchmarks/compact.py, the format every stored run is kept in: rows go in and come back as logged, floats to 8
significant digits; the readers find a folder's seed files in either format. And benchmarks/RESULTS.md names only
figures and result folders that are committed."""

import gzip
import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compact  # noqa: E402

ROWS = [
    {"iteration": 1, "global_step": 2048, "time": 1.0648994445800781, "episodic_return": None, "ok": True},
    {"iteration": 2, "global_step": 4096, "time": 2.12160587310791, "episodic_return": -322.7712345678, "ok": False},
]
# ppo_rlhf_toy.py's rows: each stage has its own keys
STAGES = [
    {"stage": "sft", "step": 50, "sft_loss": 2.4625582},
    {"stage": "ppo", "iteration": 1, "gold_reward": 1.5, "kl_ref": float("nan")},
    {"stage": "sft", "step": 100, "sft_loss": 2.1927675},
    {"stage": "summary", "gold_reward_ppo": 2.51},
]


def test_rows_come_back_as_logged_floats_to_8_digits(tmp_path):
    path = tmp_path / "seed1.json.gz"
    compact.write_metrics(path, ROWS)
    back = compact.read_metrics(path)
    assert back == [
        {"iteration": 1, "global_step": 2048, "time": 1.0648994, "episodic_return": None, "ok": True},
        {"iteration": 2, "global_step": 4096, "time": 2.1216059, "episodic_return": -322.77123, "ok": False},
    ]
    assert [list(row) for row in back] == [list(row) for row in ROWS]  # the key order too
    assert isinstance(back[0]["global_step"], int)
    stored = json.loads(gzip.decompress(path.read_bytes()))
    assert stored["columns"]["global_step"] == [2048, 4096]  # column by column
    compact.write_metrics(tmp_path / "again.json.gz", back)
    assert (tmp_path / "again.json.gz").read_bytes() == path.read_bytes()  # rounding twice changes nothing


def test_rows_with_different_keys_keep_their_own_keys(tmp_path):
    path = tmp_path / "seed1.json.gz"
    compact.write_metrics(path, STAGES)
    back = compact.read_metrics(path)
    assert [list(row) for row in back] == [list(row) for row in STAGES]
    assert json.dumps(back) == json.dumps(STAGES)  # NaN included


def test_seed_files_read_both_formats_and_refuse_a_seed_twice(tmp_path):
    compact.write_metrics(tmp_path / "seed2.json.gz", ROWS)
    (tmp_path / "seed10.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    compact.write_metrics(tmp_path / "update_seed2.json.gz", ROWS)
    (tmp_path / "summary.json").write_text("{}")
    files = compact.seed_files(tmp_path)
    assert [p.name for p in files] == ["seed10.jsonl", "seed2.json.gz"]  # by name, as the readers always sorted
    assert [compact.seed_number(p) for p in files] == [10, 2]
    assert compact.read_metrics(files[0]) == ROWS
    assert [p.name for p in compact.seed_files(tmp_path, prefix="update_seed")] == ["update_seed2.json.gz"]
    (tmp_path / "seed2.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    with pytest.raises(SystemExit, match="seed2 twice"):
        compact.seed_files(tmp_path)


def test_a_run_folder_is_one_seed_and_convert_replaces_the_jsonl(tmp_path):
    run = tmp_path / "runs" / "CartPole-v1__ppo_discrete__1__0"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    assert compact.seed_files(run) == [run / "metrics.jsonl"]
    (tmp_path / "seed1.jsonl").write_text("".join(json.dumps(row) + "\n" for row in STAGES))
    out = compact.convert(tmp_path / "seed1.jsonl")
    assert out.name == "seed1.json.gz" and not (tmp_path / "seed1.jsonl").exists()
    assert json.dumps(compact.read_metrics(out)) == json.dumps(STAGES)


def test_every_figure_link_and_result_folder_of_results_md_exists():
    """benchmarks/RESULTS.md quotes committed runs and embeds committed figures: every one it names is there."""
    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    text = (benchmarks / "RESULTS.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links and not [link for link in links if not (benchmarks / link.split("#")[0]).exists()]
    paths = set(re.findall(r"benchmarks/(?:results|figures)/[\w.\-/]*[\w\-]", text))
    assert paths and not [p for p in paths if not (benchmarks.parent / p).exists()]
    assert not re.search(r"--out benchmarks/[\w.\-]+\.png", text), "figures are written to benchmarks/figures/"
