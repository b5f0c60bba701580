"""Every script in examples/ runs to completion against the tiny checkpoint."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import DEVICE

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("[0-9][0-9]_*.py"))


def test_examples_exist() -> None:
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script: Path, tiny_model: str, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "XDG_CACHE_HOME": str(tmp_path),  # example 07's index: one per run, never shared
        "SYNTHIA_MODEL": tiny_model,
        "SYNTHIA_DEVICE": DEVICE,
        "SYNTHIA_MAX_TOKENS": "12",
    }
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip()
