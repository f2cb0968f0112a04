"""The public API under property-based fuzzing (tests/serve/fuzz_api.py), each property in a
subprocess: a segfault, an abort in OpenMP or an OOM kill fails the test with the child's
output instead of taking pytest down."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("hypothesis")
SCRIPT = Path(__file__).with_name("fuzz_api.py")


@pytest.mark.parametrize("prop, examples", [("config", 400), ("store", 150), ("generate", 40)])
def test_every_call_succeeds_finite_or_raises_naming_an_argument(prop, examples):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), prop, "--examples", str(examples)],
        capture_output=True, text=True, timeout=900,
    )
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{tail}"
    assert proc.stdout.strip().endswith("OK"), tail
