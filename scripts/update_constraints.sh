#!/usr/bin/env bash
# Make a new constraints.txt from a fresh resolve and run the suite on it.
#
#   bash scripts/update_constraints.sh            # resolve, install, test; writes constraints.txt if green
#   KEEP_VENV=1 bash scripts/update_constraints.sh  (keeps the scratch venv, to look into a failure)
#
# The README's two commands install exactly the versions in constraints.txt, so a release of a
# dependency never changes what a fresh clone gets. This script is how the pins move forward:
# it takes the newest releases that pyproject.toml's ranges allow (and the newest build tools for
# [build-system]), installs them into a scratch virtual environment, runs the default test suite
# there, and only when it passes writes constraints.txt (build pins go into pyproject.toml first,
# since the install is what tests them). Review `git diff constraints.txt pyproject.toml`, then
# commit both with the suite's result.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
venv=$(mktemp -d /tmp/magicpig-resolve.XXXXXX)
cleanup() { [ -n "${KEEP_VENV:-}" ] && echo "scratch venv kept: $venv" || rm -rf "$venv"; }
trap cleanup EXIT

echo "== newest build tools for [build-system] (in a venv of their own: they are no runtime pins)"
python3 -m venv "$venv/build"
"$venv/build/bin/pip" install -q -U setuptools wheel pybind11 cmake
build_pins=$("$venv/build/bin/pip" freeze --all)
python3 - "$build_pins" <<'PY'
import re, sys
found = dict(line.split("==") for line in sys.argv[1].split() if "==" in line)
pins = ", ".join(f'"{name}=={found[name]}"' for name in ("setuptools", "wheel", "pybind11", "cmake"))
path = "pyproject.toml"
text = open(path).read()
text = re.sub(r'(\[build-system\][^\[]*?requires = )\[[^\]]*\]', lambda m: m.group(1) + "[" + pins + "]", text, count=1, flags=re.S)
open(path, "w").write(text)
print("build-system requires:", pins)
PY

python3 -m venv "$venv/run"
. "$venv/run/bin/activate"
echo "== fresh resolve of the runtime and test dependencies (no constraints)"
pip install -q torch==2.13.0  # the CPU build; see the README
pip install -q -e ".[test]"

echo "== the default suite on it"
python -m pytest -q

{
  echo "# Exact versions the README's commands install (pip install -c constraints.txt ...): one"
  echo "# resolve of pyproject.toml's ranges that passed the default test suite on $(date -u +%F)."
  echo "# Made by scripts/update_constraints.sh; pyproject.toml keeps the ranges for other installs."
  echo "# torch is the CPU build here; a GPU user installs their own torch before magicpig."
  pip freeze --exclude-editable | grep -viE '^magicpig([ =@]|$)' | sed -E 's/^(torch==[^+]+)\+.*/\1/'
} > "$root/constraints.txt"
echo "== wrote constraints.txt ($(grep -vc '^#' "$root/constraints.txt") pins); review and commit it with pyproject.toml"
