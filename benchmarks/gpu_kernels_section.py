"""Kernel section of the project's GPU benchmark: fused bottleneck adapter on CUDA.

``run(out)`` fills ``out["kernels"]`` with, for bf16 and fp16 at 16384 tokens x d_model 1024 x
hidden 64/128/256: forward and forward+backward times of the reference and the fused Triton path,
speedups, % of the measured copy bandwidth, saved-activation bytes, the acceptance verdicts
(fused fwd+bwd >= 1.5x the reference; >= 70% of copy bandwidth where memory-bound), and the
low-precision correctness check (fused error vs fp32 reference <= 2x the reference's own error in
bf16/fp16). Designed to finish well under 2 minutes on an H100/H200, Triton compiles included.
Run alone: ``python benchmarks/gpu_kernels_section.py`` prints the JSON.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

try:
    from benchmarks import adapter_kernel as ak
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import adapter_kernel as ak

TOKENS, D_MODEL, HIDDEN = 16384, 1024, (64, 128, 256)
MIN_SPEEDUP_FWD_BWD = 1.5
MIN_PCT_COPY_BW = 70.0


def run(out: dict) -> dict:
    """Benchmark + correctness of the fused adapter on CUDA; writes and returns ``out["kernels"]``."""
    t0 = time.perf_counter()
    if not torch.cuda.is_available():
        out["kernels"] = {"skipped": "CUDA is not available"}
        return out["kernels"]
    section = {"grid": {"tokens": TOKENS, "d_model": D_MODEL, "hidden": list(HIDDEN)}, "results": {},
               "correctness": [], "acceptance": {"min_speedup_fwd_bwd": MIN_SPEEDUP_FWD_BWD,
                                                 "min_pct_copy_bw_memory_bound": MIN_PCT_COPY_BW}}
    floors = {"copy_bandwidth": ak.measure_copy_bandwidth("cuda")}
    grid = [(TOKENS, D_MODEL, h) for h in HIDDEN]
    verdicts = []
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        res = ak.run_benchmark("cuda", dtype, grid, "gelu", floors=floors)
        section["results"][name] = res
        for c in res["cases"]:
            m = c["fwd_bwd"]
            speed_ok = m["speedup"] >= MIN_SPEEDUP_FWD_BWD
            bw_ok = m["bound"] != "memory" or m["pct_copy_bw"] >= MIN_PCT_COPY_BW
            verdicts.append({"dtype": name, "hidden": c["hidden"], "fwd_bwd_speedup": m["speedup"],
                             "pct_copy_bw": m["pct_copy_bw"], "bound": m["bound"],
                             "speedup_ok": speed_ok, "bandwidth_ok": bw_ok})
        for h in HIDDEN:
            section["correctness"].append(ak.check_low_precision("cuda", dtype, TOKENS, D_MODEL, h, "gelu"))
        section["correctness"].append(ak.check_low_precision("cuda", dtype, 4099, D_MODEL, 96, "gelu_tanh"))
    section["acceptance"]["cases"] = verdicts
    section["acceptance"]["pass"] = all(v["speedup_ok"] and v["bandwidth_ok"] for v in verdicts)
    section["correctness_pass"] = all(c["pass"] for c in section["correctness"])
    section["elapsed_s"] = time.perf_counter() - t0
    out["kernels"] = section
    return section


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description="The fused adapter kernels' GPU section (needs CUDA); prints JSON, the "
                                        "tables on stderr. No options.").parse_args()
    result: dict = {}
    run(result)
    print(json.dumps(result, indent=1))
    for name, res in result["kernels"].get("results", {}).items():
        print(ak.format_table(res), file=sys.stderr)
