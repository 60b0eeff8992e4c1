#!/usr/bin/env bash
# Sets up a fresh machine for gn_det: a virtual environment (default .venv) holding
#   1. torch + torchvision (a pair whose default PyPI build runs on CPU-only machines and on CUDA),
#   2. the pure-Python packages detectron2 and the tests import,
#   3. detectron2, by the first path that works:
#        (a) an already importable detectron2 is kept,
#        (b) upstream from its git repository when that host is reachable (compiles its ops),
#        (c) the Python sources published on PyPI as sal-detectron2 (no compiled ops),
#   4. gn_det itself, editable (pyproject.toml).
# Idempotent: each step checks first and does nothing when its part is in place.
# A failing step stops with the step's name, the package and the lines of pip's log that
# say why; the full log stays under $VENV/setup-logs/.
#
# Environment: GN_DET_VENV (venv path), PYTHON (interpreter that creates the venv),
# GN_DET_TORCH / GN_DET_TORCHVISION (the pins, default torch==2.14.1 / torchvision==0.29.1:
# e.g. the versions of a GPU machine's image, to test against them), GN_DET_TORCH_FREE_MB (the
# free disk space, in MB, that installing them asks for first; default 6500).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${GN_DET_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
TORCH_PIN=${GN_DET_TORCH:-torch==2.14.1}
TORCHVISION_PIN=${GN_DET_TORCHVISION:-torchvision==0.29.1}
TORCH_FREE_MB=${GN_DET_TORCH_FREE_MB:-6500}
D2_GIT_URL="https://github.com/facebookresearch/detectron2.git"
D2_PYPI_PIN="sal-detectron2==0.7.2"
VPY="$VENV/bin/python"
LOG_DIR="$VENV/setup-logs"

say() { printf 'gn_det setup: %s\n' "$*"; }

# run_step NAME PACKAGE CMD...: runs CMD with its output in a log; on failure prints the
# step, the package and the telling lines of the log, then exits.
run_step() {
  local name=$1 package=$2
  shift 2
  mkdir -p "$LOG_DIR"
  local log="$LOG_DIR/${name// /_}.log"
  if ! "$@" >"$log" 2>&1; then
    say "FAILED at step '$name' (package: $package)."
    local why
    why=$(grep -m 5 -iE "error|no matching distribution|could not|temporary failure|connection|refused|not found" "$log")
    [ -n "$why" ] || why=$(tail -n 5 "$log")
    printf '  %s\n' "$why" | sed 's/^  \s*/  /'
    say "full log: $log"
    exit 1
  fi
}

pip_install() { "$VPY" -m pip install --disable-pip-version-check --no-input "$@"; }

# 1. the virtual environment
if [ ! -x "$VPY" ]; then
  say "creating virtual environment at $VENV"
  mkdir -p "$(dirname "$VENV")"
  "$PYTHON" -m venv "$VENV" || { say "FAILED at step 'venv' (package: python3-venv): '$PYTHON -m venv $VENV' did not work."; exit 1; }
fi

# 2. torch + torchvision
if "$VPY" - "$TORCH_PIN" "$TORCHVISION_PIN" >/dev/null 2>&1 <<'EOF'
import sys
from importlib.metadata import version
want = {spec.split("==")[0]: spec.split("==")[1] for spec in sys.argv[1:]}
for name, ver in want.items():
    assert version(name).split("+")[0] == ver, name
import torchvision.ops  # noqa: F401  (fails when torchvision's ops do not match torch)
EOF
then
  say "torch/torchvision: in place ($TORCH_PIN, $TORCHVISION_PIN)"
else
  # The default pair is a CUDA build: about 5.6 GB in the venv. Fail early and clearly, not
  # half-way through pip's unpacking with "No space left on device".
  free_mb=$(df -Pm "$VENV" | awk 'NR == 2 {print $4}')
  if [ -n "$free_mb" ] && [ "$free_mb" -lt "$TORCH_FREE_MB" ]; then
    say "FAILED at step 'torch' (package: $TORCH_PIN $TORCHVISION_PIN): ${free_mb} MB free on the disk of $VENV; installing them needs about ${TORCH_FREE_MB} MB (GN_DET_TORCH_FREE_MB). Free some space, or point GN_DET_VENV elsewhere."
    exit 1
  fi
  say "installing $TORCH_PIN $TORCHVISION_PIN (several GB on a fresh machine)"
  run_step "torch" "$TORCH_PIN $TORCHVISION_PIN" pip_install "$TORCH_PIN" "$TORCHVISION_PIN"
fi

# 3. PyPI dependencies (detectron2's imports, gn_det's install_requires, the test runner). In
#    place when the requirement files are those of the last install (a stamp of their hash: a
#    requirement added to a file changes it) and every requirement is still met in the venv (a
#    package removed since is noticed too); otherwise pip installs what is missing.
REQ_FILES=("$ROOT/requirements/detectron2-runtime.txt" "$ROOT/requirements/gn_det.txt" "$ROOT/requirements/test.txt")
STAMP="$VENV/.gn_det-requirements.sha256"
want_stamp=$(cat "${REQ_FILES[@]}" | sha256sum | cut -d' ' -f1)
requirements_met() {
  "$VPY" - "${REQ_FILES[@]}" >/dev/null 2>&1 <<'EOF'
import sys
from importlib.metadata import version
from packaging.requirements import Requirement  # a line it cannot parse counts as unmet
for path in sys.argv[1:]:
    for line in open(path):
        line = line.strip()
        if line and not line.startswith("#"):
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate():
                assert req.specifier.contains(version(req.name), prereleases=True), line
EOF
}
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want_stamp" ] && requirements_met; then
  say "python dependencies: in place"
else
  say "installing python dependencies (requirements/*.txt)"
  for req in "${REQ_FILES[@]}"; do
    run_step "deps $(basename "$req" .txt)" "$(grep -vE '^\s*(#|$)' "$req" | tr '\n' ' ')" \
      pip_install -r "$req"
  done
  echo "$want_stamp" >"$STAMP"
fi

# 4. detectron2
if "$VPY" -c "import detectron2" >/dev/null 2>&1; then
  say "detectron2: kept the importable one ($("$VPY" -c 'import detectron2, os; print(os.path.dirname(detectron2.__file__))'))"
else
  installed=""
  if timeout 15 git ls-remote "$D2_GIT_URL" HEAD >/dev/null 2>&1; then
    say "detectron2: installing upstream from $D2_GIT_URL (compiles its C++/CUDA ops)"
    mkdir -p "$LOG_DIR"
    if pip_install --no-build-isolation "git+$D2_GIT_URL" >"$LOG_DIR/detectron2_git.log" 2>&1; then
      installed="git"
    else
      say "detectron2 from git failed (log: $LOG_DIR/detectron2_git.log); falling back to PyPI sources"
    fi
  else
    say "detectron2: $D2_GIT_URL is not reachable"
  fi
  if [ -z "$installed" ]; then
    # The wheel is tagged for CPython 3.10 but holds Python sources plus a _C extension built
    # for 3.10 and CUDA 12: install it into its own folder, drop that _C and the wheel's
    # top-level `tools` package (it would shadow this repository's tools/), and put the
    # folder on the venv's path with a .pth file.
    target="$VENV/detectron2-pypi"
    say "detectron2: installing the Python sources from PyPI ($D2_PYPI_PIN) into $target"
    rm -rf "$target"
    run_step "detectron2 pypi" "$D2_PYPI_PIN" pip_install --no-deps --only-binary=:all: \
      --python-version 3.10 --platform any --target "$target" "$D2_PYPI_PIN"
    rm -rf "$target"/tools "$target"/detectron2/_C.*.so
    site=$("$VPY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    echo "$target" >"$site/gn_det_detectron2_pypi.pth"
    installed="pypi"
  fi
  run_step "detectron2 import check" "detectron2" "$VPY" -c "import detectron2.modeling, detectron2.engine"
  case $installed in
    git) say "detectron2: installed from git with compiled ops (deformable conv, rotated ops, C++ COCOeval)";;
    pypi) say "detectron2: installed from PyPI sources without compiled ops: no deformable conv, no rotated-box ops, no C++ COCOeval (gn_det evaluates with faster-coco-eval's)";;
  esac
fi

# 5. gn_det, editable (PEP 660, from pyproject.toml): --no-build-isolation builds it with the venv's
#    setuptools (>=70.1, requirements/detectron2-runtime.txt), offline; --no-deps because step 3
#    installed its dependencies (requirements/gn_det.txt, which pyproject.toml reads). Subpackages
#    added later need no reinstall: the editable install maps the package gn_det to $ROOT/gn_det.
if (cd / && "$VPY" - "$ROOT" >/dev/null 2>&1) <<'EOF'
import os, sys
import gn_det
assert os.path.realpath(os.path.dirname(gn_det.__file__)) == os.path.realpath(os.path.join(sys.argv[1], "gn_det"))
EOF
then
  say "gn_det: in place (editable)"
else
  say "installing gn_det (editable)"
  run_step "gn_det editable" "gn_det" pip_install --no-deps --no-build-isolation -e "$ROOT"
fi
say "ready: $VPY"
