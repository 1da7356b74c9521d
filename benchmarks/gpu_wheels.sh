#!/usr/bin/env bash
# The wheels the GPU machine's image lacks, into .whl/ (git-ignored through .git/info/exclude), for
# benchmarks/gpu_suite.py there. The image has torch, transformers, triton, tensorboard, accelerate and
# pytest for Python 3.12, but not DeepSpeed (built here as a pure-Python wheel: DS_BUILD_OPS=0, no ops
# compiled ahead; vlscale's configs use torch's AdamW), open_clip, or pydantic/hjson/ftfy.
# Then, on the device (carry: [".whl"]):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 VLSCALE_CACHE=/tmp/vc \
#     && python3 benchmarks/gpu_suite.py --out /tmp/gs > /tmp/gs.log 2>&1; cp /tmp/gs/gpu_results.json /tmp/gs.log $OUT/
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info .whl
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  pydantic==2.13.4 pydantic_core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 hjson ftfy wcwidth \
  open_clip_torch==3.3.0
python3 -m pip install -q wheel
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation \
  "deepspeed==$(python3 -c 'from importlib.metadata import version; print(version("deepspeed"))')" -w .whl
ls .whl
