#!/usr/bin/env bash
# The peer environment of benchmarks/step_time.py, and a run of it there.
#
# AdapterHub `adapters` 1.3.0 pins transformers 4.57.x, so the comparison against AdapterHub and
# HF `peft` runs in its own virtual environment: torch 2.14.1, transformers 4.57.6, adapters
# 1.3.0, peft, and vlscale itself (editable, without its heavy extras). Ours and the peers are
# then timed in the same process, with the same torch and transformers.
# This venv is a benchmark environment, not a supported install: setup.py asks for transformers >= 5.23,
# so vlscale goes in with --no-deps beside 4.57.6, and only what step_time.py times is expected to work.
#
#   benchmarks/peer_env.sh [step_time.py arguments ...]      # e.g. --json --repeats 5
#
# VLSCALE_PEER_VENV   where the venv lives (default /tmp/vlscale-peer); reused when it exists
# VLSCALE_PEER_PYTHON the interpreter that creates it (default python3.11, else python3)
# VLSCALE_PEER_SETUP_ONLY=1   build the venv and stop
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLSCALE_PEER_VENV:-/tmp/vlscale-peer}"
PY="${VLSCALE_PEER_PYTHON:-$(command -v python3.11 || command -v python3)}"
STAMP="$VENV/.vlscale-peer-ready"

# What the benchmark's environment holds. torch/torchvision install from the local wheel store;
# open_clip_torch is there because vlscale.modeling imports it (vision.py).
PEER_PACKAGES=(
  "torch==2.14.1"
  "torchvision==0.29.1"
  "transformers==4.57.6"
  "adapters==1.3.0"
  "peft"
  "pyyaml>=6" "safetensors>=0.4" "sentencepiece>=0.2" "numpy>=1.26" "pillow>=10" "tqdm>=4.66"
  "open_clip_torch>=3.1"
)

# pip, without the notes about local index folders that lack a package (keeps pip's exit status)
pip_install() {
  "$VENV/bin/python" -m pip install --quiet "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

if [[ ! -f "$STAMP" ]]; then
  echo "peer_env: creating $VENV with $PY" >&2
  "$PY" -m venv "$VENV"
  pip_install --upgrade pip
  pip_install "${PEER_PACKAGES[@]}"
  pip_install --no-deps --no-build-isolation -e "$REPO"
  "$VENV/bin/python" - <<'EOF'
import adapters, peft, torch, transformers
assert transformers.__version__.startswith("4.57."), transformers.__version__
print(f"peer_env: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"adapters {adapters.__version__}, peft {peft.__version__}")
import vlscale.modeling.vl_model, vlscale.peft  # noqa: F401  (our code imports under 4.57.x)
EOF
  touch "$STAMP"
fi

if [[ "${VLSCALE_PEER_SETUP_ONLY:-0}" == "1" ]]; then
  exit 0
fi
cd "$REPO"
exec "$VENV/bin/python" benchmarks/step_time.py --peers required "$@"
