"""Triton kernels compiled ahead of time for an H100 (sm_90) on a machine without a GPU.

The interpreter tests (tests/test_kernels.py) check what a kernel computes; these check that the
compiler takes it, as the device would (magicpig.kernels.aot). Each test runs in a subprocess
without TRITON_INTERPRET, which must be unset when triton is imported, and with its own Triton
cache, so that a kernel compiled by an earlier run cannot answer for today's source.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is in the [gpu] and [test] extras")

_REPORT = textwrap.dedent(
    """
    import dataclasses, json, sys
    from magicpig.kernels.aot import compile_all, kernels_without_spec
    package = sys.argv[1]
    print(json.dumps({"missing": kernels_without_spec(package),
                      "reports": [dataclasses.asdict(r) for r in compile_all(package)]}))
    """
)

# Two kernels the interpreter runs and the check must flag (one rejected by the compiler, one
# spilling), and one without a spec.
_BAD_KERNELS = textwrap.dedent(
    """
    import triton
    import triton.language as tl

    from magicpig.kernels.aot import AotSpec


    @triton.jit
    def _sum_until_negative(x_ptr, out_ptr, n):
        acc = 0.0
        for i in range(n):
            v = tl.load(x_ptr + i)
            if v < 0:
                break  # Python's break, to the interpreter; no such construct to the compiler
            acc += v
        tl.store(out_ptr, acc)


    @triton.jit
    def _normalize_rows(x_ptr, out_ptr, ROWS: tl.constexpr, COLS: tl.constexpr):
        # The whole [64, 512] tile stays live across the row sums: 256 floats a thread.
        offs = tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :]
        x = tl.load(x_ptr + offs)
        tl.store(out_ptr + offs, x / tl.sum(x, axis=1)[:, None])


    @triton.jit
    def _unspecified(x_ptr):
        tl.store(x_ptr, 1.0)


    AOT_SPECS = [
        AotSpec(_sum_until_negative, {"x_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32"}, {}),
        AotSpec(_normalize_rows, {"x_ptr": "*fp32", "out_ptr": "*fp32"}, {"ROWS": 64, "COLS": 512}),
    ]
    """
)

_INTERPRET_BAD = textwrap.dedent(
    """
    import torch
    from aotbad.kernels import _normalize_rows, _sum_until_negative
    out = torch.zeros(1)
    _sum_until_negative[(1,)](torch.tensor([1.0, 2.0, -1.0, 5.0]), out, 4)
    assert out.item() == 3.0, out
    x = torch.rand(64, 512) + 0.5
    y = torch.empty_like(x)
    _normalize_rows[(1,)](x, y, ROWS=64, COLS=512)
    assert torch.allclose(y, x / x.sum(1, keepdim=True)), (y - x / x.sum(1, keepdim=True)).abs().max()
    print("OK")
    """
)


def _python(code: str, tmp_path: Path, *args: str, interpret: bool = False) -> subprocess.CompletedProcess:
    """Run ``code`` with tmp_path importable, a fresh Triton cache and TRITON_INTERPRET as asked."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(Path(__file__).resolve().parents[2]),
                                         env.get("PYTHONPATH", "")])
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300)


def _check(package: str, tmp_path: Path) -> dict:
    proc = _python(_REPORT, tmp_path, package)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_kernel_compiles_for_sm90_without_spills(tmp_path):
    result = _check("magicpig.kernels", tmp_path)
    assert result["missing"] == [], "kernels without AOT_SPECS: " + ", ".join(result["missing"])
    assert result["reports"], "no AOT_SPECS found in magicpig.kernels"
    for r in result["reports"]:
        assert r["error"] is None, f"{r['label']}: {r['error']}"
        assert r["has_ptx"] and r["has_cubin"], r
        assert r["ptx_target"] in ("sm_90", "sm_90a"), r
        assert r["spill_stores"] == r["spill_loads"] == 0, r
        assert 0 < r["registers"] <= 255, r


def test_the_check_flags_kernels_the_interpreter_accepts(tmp_path):
    (tmp_path / "aotbad").mkdir()
    (tmp_path / "aotbad" / "__init__.py").write_text("")
    (tmp_path / "aotbad" / "kernels.py").write_text(_BAD_KERNELS)
    interpreted = _python(_INTERPRET_BAD, tmp_path, interpret=True)
    assert interpreted.returncode == 0 and interpreted.stdout.strip().endswith("OK"), interpreted.stderr[-3000:]

    result = _check("aotbad", tmp_path)
    assert result["missing"] == ["aotbad.kernels._unspecified"]
    rejected, spilling = result["reports"]
    assert rejected["error"] is not None and "unsupported AST node type: Break" in rejected["error"], rejected
    assert spilling["error"] is None and spilling["spill_stores"] > 0 and spilling["spill_loads"] > 0, spilling
