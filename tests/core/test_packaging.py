"""Nothing in this repository may shadow an installed package.

``python -m pytest`` puts the repository root first on ``sys.path`` (and pytest puts ``tests/``
there, a running script puts ``scripts/``), so a top-level module or regular package in those
folders wins over an installed distribution of the same name. A top-level ``kernels/`` once hid
Hugging Face's ``kernels``, which transformers imports while reading a config, and every model
load in the suite failed. Folders without ``__init__.py`` are namespace portions, which never
win over a regular package, so they are not counted.
"""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# pytest puts each test folder first on sys.path too (its default "prepend" import mode)
ON_SYS_PATH = (ROOT, ROOT / "tests", ROOT / "scripts", *sorted(p for p in (ROOT / "tests").iterdir()
                                                            if p.is_dir() and p.name != "data" and not p.name.startswith((".", "_"))))
OWN = {"magicpig"}  # the distribution this repository is


def importable_names(folder: Path) -> set[str]:
    """Top-level names ``import NAME`` finds in ``folder``: modules (source or extension) and
    regular packages."""
    names = set()
    for entry in folder.iterdir():
        if entry.is_dir() and (entry / "__init__.py").is_file():
            names.add(entry.name)
        elif entry.is_file():
            for suffix in importlib.machinery.all_suffixes():
                if entry.name.endswith(suffix):
                    names.add(entry.name[: -len(suffix)].split(".")[0])
    return names


def installed_top_level() -> dict[str, list[str]]:
    """Top-level import name -> the distributions (other than this one) that install it."""
    found = {}
    for name, dists in importlib.metadata.packages_distributions().items():
        others = [d for d in dists if d.lower() not in OWN]
        if others:
            found[name] = others
    return found


def test_the_scan_sees_what_it_must() -> None:
    # The check below is only as good as these two lists: both must see the obvious names.
    assert "magicpig" in importable_names(ROOT)
    assert "conftest" in importable_names(ROOT / "tests")
    installed = installed_top_level()
    assert {"torch", "transformers", "numpy"} <= installed.keys()


def test_no_repository_name_shadows_an_installed_package() -> None:
    installed = installed_top_level()
    clashes = {
        f"{folder.relative_to(ROOT) or '.'}/{name}": installed[name]
        for folder in ON_SYS_PATH
        for name in importable_names(folder)
        if name in installed
    }
    assert not clashes, f"these names hide installed packages when their folder is on sys.path: {clashes}"
