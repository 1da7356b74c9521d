"""Benchmark of the fused bottleneck adapter (vlscale.kernels.fused_adapter) against the reference.

For each (tokens, d_model, hidden) case: forward and forward+backward time of
``adapter_reference`` (plain PyTorch autograd) and ``fused_adapter`` (Triton on CUDA, the PyTorch
recompute path on CPU), the bytes autograd saves for backward, and the two floors measured in the
same run: the device's copy bandwidth (device-to-device copy) against the minimum bytes the op
must move, and a large matmul's FLOP rate against the op's FLOPs. ``pct_copy_bw`` is
``min_bytes / time / copy_bandwidth``; ``bound`` says which floor is higher.

    python benchmarks/adapter_kernel.py [--json] [--device cuda|cpu] [--dtype bf16|fp16|fp32]
        [--tokens N ...] [--d-model D ...] [--hidden H ...] [--activation gelu|gelu_tanh]

On CUDA the primary times are device times (L2 flushed before each call, launch overhead hidden:
see ``gpu_and_host_time``), with ``triton.testing.do_bench`` medians (``*_wall_ms``, which include
host launch gaps when the host is the bottleneck) and host enqueue time per call (``*_host_ms``)
beside them. CPU timing takes the median of alternating repeats with a fixed thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

try:
    import vlscale  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vlscale.config import PRECISIONS, torch_dtype  # noqa: E402
from vlscale.kernels.adapter import adapter_reference, fused_adapter, select_backend  # noqa: E402
from vlscale.profiling.measure import saved_bytes  # noqa: E402

GPU_GRID = [(16384, 1024, h) for h in (64, 128, 256)] + [(16384, d, 64) for d in (512, 768)]
CPU_GRID = [(2048, 256, 32), (2048, 256, 64), (1024, 512, 64)]
# Low-precision check: fused error vs fp32 reference <= 2x the low-precision reference's + atol.
LOWP_ATOL = {torch.bfloat16: 1e-5, torch.float16: 1e-6, torch.float32: 1e-7}


# ----------------------------------------------------------------------------------- floors
def _time(fns: dict, device: str, repeats: int = 15, grad_to_none=None) -> dict:
    """Median seconds per call of each function in ``fns``: ``triton.testing.do_bench`` on CUDA
    (events around each call, L2 flushed before it; host launch gaps count when the host is
    slower than the GPU), alternating repeats on CPU."""
    if device == "cuda":
        import triton.testing

        return {k: triton.testing.do_bench(f, grad_to_none=grad_to_none, return_mode="median") * 1e-3
                for k, f in fns.items()}
    times = {k: [] for k in fns}
    for i in range(repeats + 1):
        for k, f in fns.items():
            for t in grad_to_none or ():
                t.grad = None
            t0 = time.perf_counter()
            f()
            if i:  # the first round is warm-up
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def gpu_and_host_time(fn, grad_to_none=(), repeats: int = 25) -> tuple[float, float]:
    """(GPU seconds, host seconds) per call of ``fn`` on CUDA, launch overhead excluded from the first.

    The stream is held by a ``torch.cuda._sleep`` while the host enqueues all repeats (each after
    an L2 flush, bracketed by events), so the GPU then runs them back to back: the event times are
    device time only, and the enqueue loop's duration is the host time per call.
    """
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    per_call = (time.perf_counter() - t0) / 3
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    torch.cuda._sleep(int(min(2.0, 3 * repeats * per_call + 0.01) * 2e9))  # ~2 GHz clock, overestimated
    t0 = time.perf_counter()
    for i in range(repeats):
        for t in grad_to_none:
            t.grad = None
        flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    host = (time.perf_counter() - t0) / repeats
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e-3, host


def measure_copy_bandwidth(device: str) -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    n = (512 << 20) if device == "cuda" else (64 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    return 2 * n / _time({"copy": lambda: dst.copy_(src)}, device)["copy"]


def measure_matmul_rate(device: str, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul in ``dtype``."""
    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / _time({"mm": lambda: torch.mm(a, b)}, device, repeats=5)["mm"]


def op_cost(tokens: int, d_model: int, hidden: int, itemsize: int) -> dict:
    """Minimum bytes and FLOPs of the adapter, forward and forward+backward (biases included).

    Forward must read x and the weights and write h and the saved z; backward must read dh, x, z
    and the weights and write dx and the weight/bias gradients.
    """
    big = tokens * d_model * itemsize
    low = tokens * hidden * itemsize
    weights = (2 * d_model * hidden + d_model + hidden) * itemsize
    fwd = 2 * big + low + weights
    bwd = 3 * big + low + 2 * weights
    return {"fwd": {"bytes": fwd, "flops": 4 * tokens * d_model * hidden},
            "fwd_bwd": {"bytes": fwd + bwd, "flops": 12 * tokens * d_model * hidden}}


# ----------------------------------------------------------------------------------- cases
def make_inputs(tokens: int, d_model: int, hidden: int, dtype: torch.dtype, device: str, seed: int = 0):
    """x, w_down, b_down, w_up, b_up (all requiring grad) and an upstream gradient dh."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_(True)

    x = rand(tokens, d_model)
    w_down, b_down = rand(hidden, d_model, scale=d_model**-0.5), rand(hidden, scale=0.1)
    w_up, b_up = rand(d_model, hidden, scale=hidden**-0.5), rand(d_model, scale=0.1)
    dh = torch.randn(tokens, d_model, generator=g).to(device=device, dtype=dtype)
    return (x, w_down, b_down, w_up, b_up), dh


def bench_case(tokens, d_model, hidden, dtype, device, activation, floors) -> dict:
    """Times and saved bytes of reference vs fused for one shape, with the floors applied."""
    inputs, dh = make_inputs(tokens, d_model, hidden, dtype, device)
    fns = {"reference": lambda: adapter_reference(*inputs, activation=activation),
           "fused": lambda: fused_adapter(*inputs, activation=activation)}
    cost = op_cost(tokens, d_model, hidden, torch.finfo(dtype).bits // 8)
    case = {"tokens": tokens, "d_model": d_model, "hidden": hidden}
    for mode in ("fwd", "fwd_bwd"):
        runs = {name: (f if mode == "fwd" else (lambda f=f: f().backward(dh))) for name, f in fns.items()}
        wall = _time(runs, device, grad_to_none=list(inputs))
        if device == "cuda":  # primary: device time; wall (do_bench) and host time beside it
            gpu_host = {name: gpu_and_host_time(f, list(inputs)) for name, f in runs.items()}
            t = {name: gh[0] for name, gh in gpu_host.items()}
        else:
            t, gpu_host = wall, None
        t_ref, t_fused = t["reference"], t["fused"]
        bw_floor = cost[mode]["bytes"] / floors["copy_bandwidth"]
        flop_floor = cost[mode]["flops"] / floors["matmul_flops"]
        m = case[mode] = {
            "reference_ms": t_ref * 1e3, "fused_ms": t_fused * 1e3, "speedup": t_ref / t_fused,
            "min_bytes": cost[mode]["bytes"], "flops": cost[mode]["flops"],
            "floor_ms": max(bw_floor, flop_floor) * 1e3,
            "bound": "memory" if bw_floor >= flop_floor else "compute",
            "pct_copy_bw": 100 * cost[mode]["bytes"] / t_fused / floors["copy_bandwidth"],
            "pct_matmul_rate": 100 * cost[mode]["flops"] / t_fused / floors["matmul_flops"],
        }
        if gpu_host is not None:
            m.update({"reference_wall_ms": wall["reference"] * 1e3, "fused_wall_ms": wall["fused"] * 1e3,
                      "speedup_wall": wall["reference"] / wall["fused"],
                      "reference_host_ms": gpu_host["reference"][1] * 1e3,
                      "fused_host_ms": gpu_host["fused"][1] * 1e3})
    case["saved_bytes"] = {name: saved_bytes(f, inputs) for name, f in fns.items()}
    return case


def check_low_precision(device, dtype, tokens, d_model, hidden, activation="gelu", seed=0, config=None) -> dict:
    """flash-attention's 2x rule: max error of the fused op in ``dtype`` against an fp32 reference
    is at most twice the reference's own error in ``dtype`` (+ a small atol), for h and all grads.
    ``config``: the fused path's KernelConfig (default: its own)."""
    inputs, dh = make_inputs(tokens, d_model, hidden, dtype, device, seed)
    ref32 = [t.detach().float().requires_grad_(True) for t in inputs]
    results = {}
    outs = {}
    for name, fn, args, g in (("ref32", adapter_reference, ref32, dh.float()),
                              ("ref_lp", adapter_reference, inputs, dh),
                              ("fused", fused_adapter, inputs, dh)):
        h = fn(*args, activation=activation, **({"config": config} if fn is fused_adapter and config else {}))
        grads = torch.autograd.grad(h, args, g)
        outs[name] = [h.detach()] + list(grads)
    names = ["h", "dx", "dw_down", "db_down", "dw_up", "db_up"]
    ok = True
    for i, n in enumerate(names):
        exact = outs["ref32"][i]
        err_ref = (outs["ref_lp"][i].float() - exact).abs().max().item()
        err_fused = (outs["fused"][i].float() - exact).abs().max().item()
        passed = err_fused <= 2 * err_ref + LOWP_ATOL[dtype]
        ok = ok and passed
        results[n] = {"err_fused": err_fused, "err_reference": err_ref, "pass": passed}
    return {"dtype": str(dtype).replace("torch.", ""), "tokens": tokens, "d_model": d_model,
            "hidden": hidden, "activation": activation, "pass": ok, "errors": results}


def run_benchmark(device: str, dtype: torch.dtype, grid, activation: str = "gelu", floors=None) -> dict:
    """Floors (measured now unless given) and one entry per grid case."""
    if device == "cpu":
        from vlscale.engine.distributed import usable_cpu_count

        torch.set_num_threads(min(2, usable_cpu_count()))
    probe = torch.empty(1, device=device, dtype=dtype)
    path, reason = select_backend(probe)
    floors = dict(floors or {})
    if "copy_bandwidth" not in floors:  # not setdefault: its argument would run the measurement anyway
        floors["copy_bandwidth"] = measure_copy_bandwidth(device)
    floors["matmul_flops"] = measure_matmul_rate(device, dtype)
    cases = [bench_case(t, d, h, dtype, device, activation, floors) for t, d, h in grid]
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return {"device": device, "device_name": name, "dtype": str(dtype).replace("torch.", ""),
            "activation": activation, "fused_path": path, "fused_path_reason": reason,
            "copy_bandwidth_GBps": floors["copy_bandwidth"] / 1e9,
            "matmul_TFLOPs": floors["matmul_flops"] / 1e12, "cases": cases}


def format_table(result: dict) -> str:
    gpu = result["device"] == "cuda"
    lines = [f"{result['device_name']} {result['dtype']} {result['activation']} "
             f"fused path: {result['fused_path']} ({result['fused_path_reason']})",
             f"copy bandwidth {result['copy_bandwidth_GBps']:.0f} GB/s, matmul {result['matmul_TFLOPs']:.1f} TFLOP/s",
             f"{'tokens':>7} {'d':>5} {'h':>4} {'mode':>7} {'ref ms':>8} {'fused ms':>8} {'speedup':>7} "
             f"{'floor ms':>8} {'bound':>7} {'%copyBW':>7} {'saved ref':>9} {'fused':>7}"
             + (f" {'wall ref':>8} {'fused':>7} {'speedup':>7} {'host ref':>8} {'fused':>7}" if gpu else "")]
    for c in result["cases"]:
        for mode in ("fwd", "fwd_bwd"):
            m = c[mode]
            sv = c["saved_bytes"]
            saved = (f"{sv['reference']['activations'] / 2**20:8.2f}M {sv['fused']['activations'] / 2**20:6.2f}M"
                     if mode == "fwd" else f"{'':>9} {'':>7}")
            line = (f"{c['tokens']:>7} {c['d_model']:>5} {c['hidden']:>4} {mode:>7} {m['reference_ms']:8.4f} "
                    f"{m['fused_ms']:8.4f} {m['speedup']:6.2f}x {m['floor_ms']:8.4f} {m['bound']:>7} "
                    f"{m['pct_copy_bw']:6.1f}% {saved}")
            if gpu:
                line += (f" {m['reference_wall_ms']:8.4f} {m['fused_wall_ms']:7.4f} {m['speedup_wall']:6.2f}x "
                         f"{m['reference_host_ms']:8.4f} {m['fused_host_ms']:7.4f}")
            lines.append(line)
    lines.append("saved = activation bytes autograd keeps for backward (x and weights excluded)"
                 + ("; ms = device time; wall = do_bench (host gaps included); host = enqueue time per call"
                    if gpu else ""))
    return "\n".join(lines)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=PRECISIONS, default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--activation", choices=("gelu", "gelu_tanh"), default="gelu")
    p.add_argument("--tokens", type=_positive_int, nargs="+", help="override the grid's token counts")
    p.add_argument("--d-model", type=_positive_int, nargs="+", help="override the grid's d_model values")
    p.add_argument("--hidden", type=_positive_int, nargs="+", help="override the grid's hidden sizes")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    dtype = torch_dtype(args.dtype or ("bf16" if args.device == "cuda" else "fp32"))
    grid = GPU_GRID if args.device == "cuda" else CPU_GRID
    if args.tokens or args.d_model or args.hidden:
        grid = [(t, d, h) for t in (args.tokens or [grid[0][0]]) for d in (args.d_model or [grid[0][1]])
                for h in (args.hidden or sorted({c[2] for c in grid}))]
    result = run_benchmark(args.device, dtype, grid, args.activation)
    print(json.dumps(result) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
