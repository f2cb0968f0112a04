"""The extension is built, reports what it runs with, and the SIMD level can be forced lower."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

C = pytest.importorskip("magicpig._C", reason="the C++ extension is not built")

LEVELS = ("scalar", "avx2", "avx512")


def _info_in_subprocess(simd: str | None) -> dict:
    env = dict(os.environ)
    env.pop("MAGICPIG_SIMD", None)
    if simd is not None:
        env["MAGICPIG_SIMD"] = simd
    code = "import json, magicpig._C as C; print(json.dumps(C.cpu_info()))"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_cpu_info_fields() -> None:
    info = C.cpu_info()
    assert info["simd"] in LEVELS
    assert info["simd_supported"] in LEVELS
    assert LEVELS.index(info["simd"]) <= LEVELS.index(info["simd_supported"])
    assert isinstance(info["omp_max_threads"], int) and info["omp_max_threads"] >= 1
    assert info["omp_num_procs"] == os.cpu_count() or info["omp_num_procs"] >= 1
    assert info["block_tokens"] == 65535


def test_default_level_is_best_supported() -> None:
    info = _info_in_subprocess(None)
    assert info["simd"] == info["simd_supported"]


@pytest.mark.parametrize("level", LEVELS)
def test_env_forces_lower_level(level: str) -> None:
    best = _info_in_subprocess(None)["simd_supported"]
    info = _info_in_subprocess(level)
    expected = level if LEVELS.index(level) <= LEVELS.index(best) else best
    assert info["simd"] == expected


def test_bad_env_level_fails_clearly() -> None:
    env = dict(os.environ, MAGICPIG_SIMD="sse9")
    res = subprocess.run([sys.executable, "-c", "import magicpig._C as C; C.cpu_info()"], env=env,
                         capture_output=True, text=True)
    assert res.returncode != 0
    assert "avx512, avx2, scalar" in res.stderr


def test_set_simd_switches_and_rejects_unknown() -> None:
    start = C.cpu_info()["simd"]
    try:
        C.set_simd("scalar")
        assert C.cpu_info()["simd"] == "scalar"
        with pytest.raises(ValueError, match="expected one of"):
            C.set_simd("sse9")
    finally:
        C.set_simd(start)
    assert C.cpu_info()["simd"] == start


def test_kernels_ship_inside_the_package() -> None:
    import magicpig.kernels

    assert magicpig.kernels.__name__ == "magicpig.kernels"
