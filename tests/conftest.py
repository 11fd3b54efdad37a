"""Shared helpers: find the top-level scripts and the ones that define a given function.

Contract tests are parametrised over every script that defines the function under test, so a copy pasted
into a new script is tested the moment the script exists, and copies cannot drift apart.
"""

import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SCRIPT_NAMES = ["ppo_discrete", "ppo_continuous", "ppo_penalty", "trpo", "ppo_rlhf_toy"]


def load_scripts():
    """The scripts that exist in this checkout, imported (importing runs nothing)."""
    return [importlib.import_module(name) for name in SCRIPT_NAMES if (ROOT / f"{name}.py").exists()]


def scripts_defining(function_name: str):
    """pytest params: one per script that defines `function_name`, with the script's name as test id."""
    import pytest

    return [
        pytest.param(getattr(module, function_name), id=module.__name__)
        for module in load_scripts()
        if hasattr(module, function_name)
    ]
