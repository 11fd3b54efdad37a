"""The README stays a page for users: short, with every link and image pointing at a file that exists, and the
two commands of a fresh machine in it. The measurement record lives in benchmarks/RESULTS.md and SPEED.md."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)


def test_readme_is_short():
    # 220 lines, plus the ~15 that issues 29 (RLHF methods) and 30 (the article's figures) each allow
    assert len(README.splitlines()) <= 250, "the README is for users: the record goes to benchmarks/*.md"


def test_every_relative_link_in_the_readme_exists():
    targets = [t.split("#")[0] for t in LINK.findall(README) if not t.startswith(("http://", "https://", "#"))]
    assert targets, "the README links to the results and the plots"
    missing = [t for t in targets if not (ROOT / t).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_the_two_commands_are_in_the_readme():
    assert "pip install -r requirements.txt && python ppo_discrete.py" in README
    assert "pip install -r requirements.txt && python -m pytest -q tests" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest -q tests" in ci, ".ci/run runs the README's test command"


def test_the_readme_quotes_no_commit_hashes():
    """Commit hashes and machine histories belong to the record in benchmarks/, not to the users' page."""
    assert not re.search(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b", README)
