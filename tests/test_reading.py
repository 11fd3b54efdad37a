"""The scripts read as the article: one order in every file, the loss written as it is minimised, no timing
figures in docstrings or --help (they live in benchmarks/, next to the command that made them)."""

import ast
import re

import pytest

from conftest import ROOT, SCRIPT_NAMES

SCRIPTS = [name for name in SCRIPT_NAMES if (ROOT / f"{name}.py").exists()]
PLUMBING_BANNER = "# Plumbing a reader may skip"
# Plumbing every script that has it keeps below main(); the article's pieces stay above it.
PLUMBING = {"check_args", "pick_device", "compute_array", "SameStepVectorEnv", "make_envs", "check_env", "Logger",
            "load_checkpoint", "evaluate"}
ARTICLE = {"compute_gae", "ppo_clip_loss", "approx_kl", "value_loss", "kl_penalty_loss", "conjugate_gradient",
           "fisher_vector_product", "line_search", "trpo_update", "RunningMeanStd", "RewardScaler", "Agent"}
TIMING = re.compile(r"\b\d+(\.\d+)?\s?(us|ms)\b|~\s?\d+(\.\d+)?\s?s\b|\b\d+(\.\d+)?\s?(seconds|minutes)\b")


def strings_a_reader_sees(tree: ast.Module) -> list[str]:
    """Docstrings of the module, its classes and functions, and the attribute docstrings of Args (--help)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
            body = node.body
            for i, statement in enumerate(body):
                is_docstring = i == 0 or (isinstance(node, ast.ClassDef) and isinstance(body[i - 1], ast.AnnAssign))
                if is_docstring and isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant) \
                        and isinstance(statement.value.value, str):
                    found.append(statement.value.value)
    return found


@pytest.mark.parametrize("name", SCRIPTS)
def test_one_order_plumbing_below_main(name):
    source = (ROOT / f"{name}.py").read_text()
    tree = ast.parse(source)
    line_of = {node.name: node.lineno for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    banner = [i + 1 for i, line in enumerate(source.splitlines()) if line.startswith(PLUMBING_BANNER)]
    assert len(banner) == 1, "one plumbing banner"
    assert line_of["Args"] < line_of["main"] < banner[0]
    for definition in PLUMBING & set(line_of):
        assert line_of[definition] > banner[0], f"{definition} is plumbing: below main()"
    for definition in ARTICLE & set(line_of):
        assert line_of[definition] < line_of["main"], f"{definition} is the article's: above main()"


@pytest.mark.parametrize("name", SCRIPTS)
def test_no_timing_figures_in_docstrings_or_help(name):
    for text in strings_a_reader_sees(ast.parse((ROOT / f"{name}.py").read_text())):
        match = TIMING.search(text)
        assert match is None, f"timing figure {match.group(0)!r} in a docstring: it belongs in benchmarks/"


def test_the_loss_is_written_as_it_is_minimised():
    """The code minimises -L^CLIP + c_vf L^V - c_ent H; 'L^CLIP + c_vf L^V' (without the minus) is wrong."""
    wrong = re.compile(r"(?<![-\w])L\^CLIP \+ c_vf")
    for path in [ROOT / "README.md", *(ROOT / f"{name}.py" for name in SCRIPTS)]:
        assert not wrong.search(path.read_text()), path.name
