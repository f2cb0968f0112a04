"""One-line usage errors shared by the commands (``magicpig demo``, ``eval``, ``serve``, ``profile``).

User mistakes (a bad argument, an unknown model, an unusable cache or output folder) end in one
line on stderr, ``magicpig <command>: <message>``, and exit status 2. The commands check their
arguments and resolve the model's config before loading any weights. Only that phase turns
exceptions (:func:`user_error_types`) into such lines, so an internal bug later on still shows
its traceback. The parser itself (:class:`magicpig.core.argtypes.OneLineParser`) and the checked
argparse types are in :mod:`magicpig.core.argtypes`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

__all__ = ["DTYPES", "UsageError", "check_device", "check_out_dir", "report", "resolve_model_args",
           "user_error_types"]

# What LongContextModel.from_pretrained accepts as a dtype name.
DTYPES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


class UsageError(Exception):
    """A user mistake found by a command's checks; shown as one line, exit status 2."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exceptions that mean a user mistake while arguments are checked and the model is
    resolved and loaded: ValueError/TypeError from the package's checks, the loader's and the
    cache's errors."""
    from magicpig.cache import FetchError
    from magicpig.model.loading import ModelLoadError

    return (UsageError, ValueError, TypeError, ModelLoadError, FetchError)


def report(prog: str, err: BaseException) -> int:
    """Print ``err`` as one line for ``prog`` and return the exit status 2."""
    text = " ".join(str(err).split()) or type(err).__name__  # multi-line messages on one line
    print(f"{prog}: {text}", file=sys.stderr)
    return 2


def check_out_dir(option: str, path: str) -> Path:
    """``path`` as an output folder that exists or can be made and written (checked now, not
    after hours of work); UsageError naming ``option`` otherwise."""
    from magicpig.cache import writable_dir_problem

    problem = writable_dir_problem(Path(path))
    if problem:
        raise UsageError(f"{option} {path}: {problem}")
    return Path(path)


def check_device(option: str, text: Optional[str]) -> Any:
    """The torch device named ``text`` (None stays None: the loader's default); UsageError when
    torch does not know it or this machine does not have it."""
    if text is None:
        return None  # no torch import: other mistakes are reported in a fraction of a second
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as err:
        raise UsageError(f"{option} {text}: not a torch device (expected e.g. cpu, cuda, cuda:1, mps)") from err
    try:
        torch.empty(0, device=device)  # the cheapest proof that the device exists here
    except (RuntimeError, AssertionError) as err:  # AssertionError: torch built without CUDA
        raise UsageError(f"{option} {text}: this machine has no such device ({err})") from err
    return device


def resolve_model_args(option: str, name: Optional[str]) -> tuple[Path, Any]:
    """(model directory, ModelArgs) of ``name`` from its config alone, before any weights load
    (the embedded model is fetched and converted here on first use)."""
    from magicpig.cache import FetchError
    from magicpig.model.loading import EMBEDDED_ALIAS, ModelLoadError, load_config, resolve_model_dir

    try:
        model_dir = resolve_model_dir(name)
        config = load_config(model_dir)
        from magicpig.model.llama import ModelArgs  # torch: only once the name is known to be good

        return model_dir, ModelArgs.from_hf_config(config)
    except (ModelLoadError, ValueError) as err:  # UnsupportedModelError is a ValueError
        if isinstance(err.__cause__, FetchError):
            raise  # the network or the cache failed, not the name: the message says which
        name = name or EMBEDDED_ALIAS
        text = str(err).removeprefix(f"name_or_path={name!r}: ")  # the option already names it
        raise UsageError(f"{option} {name}: {text}") from err
