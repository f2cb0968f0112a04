"""The argparse vocabulary of every command-line parser in the package and in scripts/: the
one-line error parser and the checked ``type=`` converters (stdlib only; no torch).

It lives here, low in the layers (DESIGN.md §5), because parsers below ``cli/`` use it (the
simulator's, ``magicpig bench serve``'s, the demo's) as well as ``cli/`` and ``scripts/``.
"""

from __future__ import annotations

import argparse
import math
from typing import Any, Callable, NoReturn


class OneLineParser(argparse.ArgumentParser):
    """argparse, but an error is one line on stderr (``prog: message``, exit 2) instead of the
    usage block, so that every mistake of every ``magicpig`` command reads the same."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def argtype(convert: Callable[[str], Any], ok: Callable[[Any], bool], expected: str) -> Callable[[str], Any]:
    """An argparse ``type=``: ``convert`` the text, then require ``ok``; argparse names the
    option in the one-line error when this raises ArgumentTypeError."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {expected}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r}: expected {expected}")
        return value

    return parse


POSITIVE_INT = argtype(int, lambda v: v >= 1, "an integer >= 1")
NONNEGATIVE_INT = argtype(int, lambda v: v >= 0, "an integer >= 0")
POSITIVE_FLOAT = argtype(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
