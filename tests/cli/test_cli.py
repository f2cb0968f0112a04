"""`magicpig` as a user runs it: every mistake is one line on stderr and exit status 2, found
before any weights load.

The commands run as subprocesses with MAGICPIG_CACHE under a regular file: a check that waited
for the model would fail on the cache instead, with a message that does not name the argument.
They run concurrently (one torch import each) to keep the module fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import magicpig
from magicpig.cli.args import UsageError, check_out_dir

# (arguments, what the message must name); {out}, {file}, {tiny}, {ro} are filled in below.
CASES = {
    "dense-layers": ("eval ruler --methods magicpig:dense_layers=99 --model {tiny} --out {out}",
                     ["--methods", "dense_layers", "2 layers"]),
    "batch-size": ("eval ruler --batch-size 0 --out {out}", ["--batch-size"]),
    "out-file": ("eval ruler --out {file}", ["--out", "not a directory"]),
    "out-under-file": ("eval ruler --out {file}/sub", ["--out", "not a directory"]),
    "out-read-only": ("eval ruler --out {ro}/out", ["--out", "not writable"]),
    "model": ("eval ruler --model nosuch-model --out {out}", ["--model", "nosuch-model"]),
    "dtype": ("eval ruler --dtype int8 --out {out}", ["--dtype", "int8"]),
    "device": ("eval ruler --device nosuch --out {out}", ["--device", "nosuch"]),
    "lengths": ("eval ruler --lengths 4096 --model {tiny} --out {out}", ["--lengths", "2048"]),
    "cost": ("eval pick-kl --cost 0", ["--cost"]),
    "demo-depth": ("demo --depth 2", ["--depth"]),
    "demo-K": ("demo --K 99", ["--K"]),
    "demo-max-new-tokens": ("demo --max-new-tokens 0", ["--max-new-tokens"]),
    "demo-model": ("demo --model nosuch", ["--model", "nosuch"]),
    "demo-tokens": ("demo --tokens 5000 --model {tiny}", ["--tokens", "2048"]),
    "bench-name": ("bench nosuch", ["nosuch"]),
}


def _read_only_dir() -> str | None:
    """A directory even root cannot write in (/sys in containers), or None."""
    try:
        fd, name = tempfile.mkstemp(dir="/sys")
    except OSError:
        return "/sys" if Path("/sys").is_dir() else None
    os.close(fd)
    os.unlink(name)
    return None


def _tiny_model(path: Path) -> Path:
    """A model directory with a config and no weights: 2 layers, 2048 positions (written by
    hand: importing transformers here would cost seconds)."""
    path.mkdir()
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2,
              "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 100, "max_position_embeddings": 2048,
              "hidden_act": "silu", "rms_norm_eps": 1e-5}
    (path / "config.json").write_text(json.dumps(config))
    return path


def _magicpig(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "magicpig", *args], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    file = tmp / "a-file"
    file.write_text("not a directory")
    fill = {"out": str(tmp / "out"), "file": str(file), "tiny": str(_tiny_model(tmp / "tiny")),
            "ro": _read_only_dir() or "/nonexistent-read-only"}
    env = {**os.environ, "MAGICPIG_CACHE": str(file / "cache")}
    names = [n for n in CASES if n != "out-read-only" or _read_only_dir()]
    with ThreadPoolExecutor(max_workers=4) as pool:
        procs = pool.map(lambda n: _magicpig(CASES[n][0].format(**fill).split(), env), names)
        return dict(zip(names, procs))


@pytest.mark.parametrize("name", sorted(CASES))
def test_mistake_is_one_line(results, name):
    if name not in results:
        pytest.skip("no directory here that root cannot write in")
    proc, needles = results[name], CASES[name][1]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("magicpig "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_cache_under_a_file_names_it_and_the_env_var(tmp_path):
    """The default model with an unusable cache: the same one line, naming path and variable."""
    file = tmp_path / "f"
    file.write_text("")
    proc = _magicpig(["demo"], {**os.environ, "MAGICPIG_CACHE": str(file / "cache")})
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(file / "cache") in lines[0] and "MAGICPIG_CACHE" in lines[0] and "not a directory" in lines[0]


def test_version_and_bench_help():
    env = dict(os.environ)
    version = _magicpig(["--version"], env)
    assert version.returncode == 0 and version.stdout.strip() == f"magicpig {magicpig.__version__}"
    # --help after the name reaches the benchmark's own parser (it has --repeats; bench has not).
    from magicpig.bench.hashing import build_parser as hashing_parser

    assert "--repeats" in hashing_parser().format_help()
    bench = _magicpig(["bench", "hashing", "--help"], env)
    assert bench.returncode == 0 and "--repeats" in bench.stdout, bench.stdout + bench.stderr


def test_check_out_dir(tmp_path):
    """The up-front --out check creates nothing and names the blocking path."""
    (tmp_path / "f").write_text("")
    assert check_out_dir("--out", str(tmp_path / "new" / "dir")) == tmp_path / "new" / "dir"
    assert not (tmp_path / "new").exists()
    for bad in (tmp_path / "f", tmp_path / "f" / "sub"):
        with pytest.raises(UsageError, match=rf"--out .*{tmp_path / 'f'} is not a directory"):
            check_out_dir("--out", str(bad))


def test_serve_help_explains_prefix_caching_and_the_switch_turns_it_off():
    from magicpig.cli.main import _serve_parser

    parser = _serve_parser()
    assert parser.parse_args([]).prefix_caching is True
    assert parser.parse_args(["--no-prefix-caching"]).prefix_caching is False
    text = " ".join(parser.format_help().split())
    assert "--no-prefix-caching" in text and "least recently used" in text and "cached_tokens" in text
    from magicpig.bench.prefix import parse_args

    args = parse_args(["--docs", "3", "--questions", "4", "--json", "x.json"])
    assert (args.docs, args.questions, args.json, args.methods) == (3, 4, "x.json", ["dense", "magicpig"])
