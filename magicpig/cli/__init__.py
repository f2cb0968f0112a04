"""The ``magicpig`` command (:mod:`magicpig.cli.main`) and its subcommands' parsers
(:mod:`magicpig.cli.eval`). The top layer (DESIGN.md §5): nothing else in the package imports it."""

from magicpig.cli.main import main

__all__ = ["main"]
