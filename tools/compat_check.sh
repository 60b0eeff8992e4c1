#!/usr/bin/env bash
# Builds an environment for a given torch/torchvision pair with the project's own set-up
# (tools/setup_env.sh) and runs the tests there, this checkout's gn_det first on the path.
#
#   bash tools/compat_check.sh TORCH TORCHVISION [--full | PYTEST_ARGS...]
#   bash tools/compat_check.sh 2.5.1 0.20.1               # the subset below
#   bash tools/compat_check.sh 2.7.1 0.22.1 --full        # the whole default suite (12+ min)
#   bash tools/compat_check.sh 2.5.1 0.20.1 tests/test_recompute.py -k hooks
#
# The subset (COMPAT_TESTS) covers what depends on torch's version: the GN operator and its
# custom ops, autograd, ONNX/TorchScript export and torch.compile (test_group_norm,
# test_gn_properties), output recomputation and saved-tensor hooks (test_recompute), the
# direct kernel launches against the triton torch brings (test_direct_launch: its launcher
# convention, or the public launch where it does not fit), detectron2 building, conversion and LazyConfig building (test_detectron2_integration,
# test_convert_predictions, test_lazy_config without its training runs, about 5 min on 2 cores). A torch older than
# gn_det's minimum (gn_det/requirements.py) is checked for the one-line refusal instead.
#
# Environment: GN_DET_COMPAT_DIR (where the venvs go, default ~/.cache/gn_det_compat; 6 GB each; each pair
# gets torch-<version>, reused when it is in place), PYTHON (interpreter for the venv).
# Prints one summary line at the end: versions, then pytest's counts; exits with pytest's status.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ $# -lt 2 ]; then
  echo "usage: bash tools/compat_check.sh TORCH TORCHVISION [--full | PYTEST_ARGS...] (e.g. 2.5.1 0.20.1)" >&2
  exit 2
fi
TORCH=${1#torch==}
TORCHVISION=${2#torchvision==}
shift 2
COMPAT_TESTS=(tests/test_group_norm.py tests/test_gn_properties.py tests/test_recompute.py tests/test_direct_launch.py
              tests/test_detectron2_integration.py tests/test_convert_predictions.py tests/test_lazy_config.py
              -k "not train_net_trains and not train_net_names and not trains_on_the_embedded")
if [ "${1:-}" = "--full" ]; then
  TESTS=()
  shift
elif [ $# -gt 0 ]; then
  TESTS=("$@")
else
  TESTS=("${COMPAT_TESTS[@]}")
fi

VENV=${GN_DET_COMPAT_DIR:-$HOME/.cache/gn_det_compat}/torch-$TORCH
GN_DET_VENV=$VENV GN_DET_TORCH="torch==$TORCH" GN_DET_TORCHVISION="torchvision==$TORCHVISION" \
  bash "$ROOT/tools/setup_env.sh" || exit $?
VPY="$VENV/bin/python"
versions=$("$VPY" -c "import sys, torch, torchvision
try:
    import triton; t = triton.__version__
except Exception:
    t = 'none'
print(f'torch {torch.__version__}, torchvision {torchvision.__version__}, triton {t}, python {sys.version.split()[0]}')")

cd "$ROOT" || exit 1
export PYTHONPATH=$ROOT
# (read as text: importing gn_det.requirements would run gn_det's own check first)
MIN_TORCH=$(sed -n 's/^MIN_TORCH = "\([0-9.]*\)"$/\1/p' "$ROOT/gn_det/requirements.py")
minimum=$("$VPY" -c "import sys, torch
have = tuple(int(p) for p in torch.__version__.split('+')[0].split('.')[:2])
need = tuple(int(p) for p in sys.argv[1].split('.')[:2])
print('' if have >= need else sys.argv[1])" "$MIN_TORCH") || exit 1
if [ -n "$minimum" ]; then
  # Older than supported: import gn_det must stop with one line naming both versions.
  err=$("$VPY" -c "import gn_det" 2>&1)
  last=$(printf '%s\n' "$err" | tail -n 1)
  if [[ $last == "ImportError: gn_det needs torch >= $minimum; this environment has torch "* ]]; then
    echo "compat_check: $versions: below the minimum torch $minimum; import gn_det refused it: $last"
    exit 0
  fi
  echo "compat_check: $versions: below the minimum torch $minimum, but import gn_det did not say so:"
  printf '%s\n' "$err" | tail -n 5
  exit 1
fi
log="$VENV/compat-pytest.log"
nice -n 10 "$VPY" -m pytest -q -p no:cacheprovider "${TESTS[@]}" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
echo "compat_check: $versions: $(grep -E '^[0-9]+ (passed|failed)|^=+ .*(passed|failed)' "$log" | tail -n 1 | tr -d '=')"
exit "$status"
