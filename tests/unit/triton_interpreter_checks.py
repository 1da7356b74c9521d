"""The Triton kernels under Triton's CPU interpreter, in one process for the whole test session.

``TRITON_INTERPRET=1`` must be set before triton is imported, so these checks run in a subprocess
(started once by the ``triton_interpreter`` fixture of tests/conftest.py) and print their raw
results as one JSON line; test_kernels.py and test_fused_model.py assert on them.
"""

import contextlib
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


@contextlib.contextmanager
def recorded_launches():
    """Yields a list to which every kernel launch of vlscale.kernels.adapter appends (name, its KernelConfig), in
    order; the names: ``rows_fwd`` (the one-pass forward), ``rows_bwd`` (the one-pass dz and dx), ``down_fwd``,
    ``up_fwd`` (the two-kernel forward), ``down_bwd`` (dz), ``up_dx`` (dx, unfused backward), ``up_bwd`` /
    ``up_bwd_dwd`` (the fused backward kernel computing dx, the latter also dW_d), ``wgrad`` / ``wgrad_dwd`` (the
    same kernel after ``rows_bwd``: weight gradients only)."""
    from vlscale.kernels import adapter as ka

    launches = []

    def recorded(launch, name):
        def run(*args):
            out = launch(*args)
            launches.append((name(args, out), args[-1]))  # every launcher takes its KernelConfig last
            return out
        return run

    names = ("_launch_down", "_launch_up", "_launch_up_bwd", "_launch_rows")
    originals = [getattr(ka, n) for n in names]
    ka._launch_down = recorded(ka._launch_down, lambda a, out: "down_bwd" if a[5] else "down_fwd")
    ka._launch_up = recorded(ka._launch_up, lambda a, out: "up_dx" if a[4] else "up_fwd")
    ka._launch_up_bwd = recorded(ka._launch_up_bwd, lambda a, out: ("up_bwd" if a[5] else "wgrad")
                                 + ("" if out[3] is None else "_dwd"))
    ka._launch_rows = recorded(ka._launch_rows, lambda a, out: "rows_bwd" if a[7] else "rows_fwd")
    try:
        yield launches
    finally:
        for n, f in zip(names, originals):
            setattr(ka, n, f)


def kernel_cases() -> list[dict]:
    """fused_adapter (fp32) against the fp64 reference: 2 shapes x 2 activations x bias x 6 configs, and the
    one-pass kernels' default tiles on one shape and on a hidden wider than they take (the two-kernel path then)
    x 2 activations x bias; the kernel
    launches of each case's forward and backward (``launches``, sorted; :func:`recorded_launches`) and whether
    every launch had the case's tiles (its config, or ``default_config`` for none)."""
    with recorded_launches() as launches:
        return _kernel_cases(launches)


def _kernel_cases(launches: list) -> list[dict]:
    from vlscale.kernels.adapter import (
        KernelConfig,
        adapter_reference,
        default_config,
        fused_adapter,
        select_backend,
    )

    torch.manual_seed(0)
    assert select_backend(torch.zeros(1), "auto")[0] == "triton"
    results = []
    small = dict(down_block_m=16, down_block_k=16, down_block_h=16, down_stages=1, up_block_m=16,
                 up_block_n=16, up_block_k=16, up_stages=1, bwd_block_m=16, bwd_block_n=16, bwd_programs=8,
                 bwd_stages=1, rows_block_m=16, rows_block_k=16, rows_block_n=16, rows_stages=1)
    rows = dict(fwd_rows=True, bwd_rows=True)
    configs = {"default": None, "small_fused": KernelConfig(**small, bwd_fused=True),
               "small_cublas_dwd": KernelConfig(**small, bwd_fused=True, bwd_fuse_dwd=False),
               "small_unfused": KernelConfig(**small, bwd_fused=False),
               "rows": KernelConfig(**rows),
               "small_rows": KernelConfig(**small, **rows),
               "small_rows_wgrad": KernelConfig(**small, **rows, bwd_fused=True)}
    cases = [(shape, cname) for shape in ((37, 40, 24), (19, 32, 16)) for cname in configs if cname != "rows"]
    cases += [((37, 40, 24), "rows"), ((7, 16, 300), "rows")]
    for (tokens, d_model, hidden), cname in cases:
        cfg = configs[cname]
        for activation in ("gelu", "gelu_tanh"):
            for bias in (True, False):
                x = torch.randn(tokens, d_model, dtype=torch.float64)
                wd = torch.randn(hidden, d_model, dtype=torch.float64) / d_model ** 0.5
                wu = torch.randn(d_model, hidden, dtype=torch.float64) / hidden ** 0.5
                bd = torch.randn(hidden, dtype=torch.float64) if bias else None
                bu = torch.randn(d_model, dtype=torch.float64) if bias else None
                dh = torch.randn(tokens, d_model, dtype=torch.float64)
                args64 = [t.requires_grad_(True) if t is not None else None for t in (x, wd, bd, wu, bu)]
                ref = adapter_reference(*args64, activation=activation)
                present64 = [t for t in args64 if t is not None]
                gref = torch.autograd.grad(ref, present64, dh)
                args32 = [t.detach().float().requires_grad_(True) if t is not None else None for t in args64]
                launches.clear()
                out = fused_adapter(*args32, activation=activation, backend="triton", config=cfg)
                present32 = [t for t in args32 if t is not None]
                g = torch.autograd.grad(out, present32, dh.float())
                errs = [(out.double() - ref).abs().max().item()]
                errs += [(a.double() - b).abs().max().item() for a, b in zip(g, gref)]
                scale = [ref.abs().max().item()] + [b.abs().max().item() for b in gref]
                results.append({"case": [tokens, d_model, hidden, activation, bias, cname],
                                "dtype": str(out.dtype), "errs": errs, "scale": scale,
                                "launches": sorted(name for name, _ in launches),
                                "tiles_as_configured": all(
                                    c == (cfg or default_config(d_model, hidden, torch.float32))
                                    for _, c in launches)})
    return results


def fused_model_check() -> dict:
    """The tiny T5 with per-task adapters on the Triton path against the unfused model (asserts inside)."""
    import test_fused_model as t

    from vlscale.kernels.adapter import select_backend

    assert select_backend(torch.zeros(1), "auto")[0] == "triton"
    fused, plain = t.build_pair("tiny-t5", "multiple")
    f, p = t.run_steps(fused, ["gqa"]), t.run_steps(plain, ["gqa"])
    t.assert_same(f, p)
    names = t.graph_node_names(fused(t.make_batch(fused, "gqa", seed=10)).loss)
    return {"triton_nodes": sum("_TritonAdapterFn" in n for n in names), "fused_nodes": f["fused_nodes"],
            "sites": len(fused.peft.sites)}


def edge_cases() -> dict:
    """Strided biases, double backward, bf16's dispatch and fp16 on the Triton path (fp32 errors
    against the reference in fp64; test_kernels_edge_cases.py asserts on them)."""
    from vlscale.kernels.adapter import KernelConfig, adapter_reference, fused_adapter, select_backend

    g = torch.Generator().manual_seed(3)
    tokens, d_model, hidden = 9, 32, 8
    x = torch.randn(tokens, d_model, generator=g, dtype=torch.float64)
    wd = torch.randn(hidden, d_model, generator=g, dtype=torch.float64) / d_model ** 0.5
    wu = torch.randn(d_model, hidden, generator=g, dtype=torch.float64) / hidden ** 0.5
    # every other element of a longer vector: strided views, as a slice of stacked per-task biases is
    bd_all = torch.randn(2 * hidden, generator=g, dtype=torch.float64)
    bu_all = torch.randn(2 * d_model, generator=g, dtype=torch.float64)
    dh = torch.randn(tokens, d_model, generator=g, dtype=torch.float64)
    cfg = KernelConfig(down_block_m=16, down_block_k=16, down_block_h=16, down_stages=1, up_block_m=16,
                       up_block_n=16, up_block_k=16, up_stages=1)
    out = {}

    def run(dtype, fn, **kw):
        leaves = [t.to(dtype).requires_grad_(True) for t in (x, wd, bd_all, wu, bu_all)]
        xx, w1, b1, w2, b2 = leaves
        h = fn(xx, w1, b1[::2], w2, b2[::2], **kw)
        grads = torch.autograd.grad(h, leaves, dh.to(dtype), create_graph=True)
        # second order: d/d(w_down) of |dx|^2
        (ggw,) = torch.autograd.grad(grads[0].pow(2).sum(), w1)
        return [h] + list(grads) + [ggw]

    # the one-pass kernels (KernelConfig(fwd_rows=True, bwd_rows=True)) take each case below too
    rows = dataclasses.replace(cfg, fwd_rows=True, bwd_rows=True, rows_block_m=16, rows_block_k=16, rows_block_n=16,
                               rows_stages=1)
    ref = run(torch.float64, adapter_reference)
    for key, c in (("strided_bias_double_backward", cfg), ("strided_bias_double_backward_rows", rows)):
        got = run(torch.float32, fused_adapter, backend="triton", config=c)
        out[key] = {"errs": [(a.double() - b).abs().max().item() for a, b in zip(got, ref)],
                    "scale": [b.abs().max().item() for b in ref]}
    out["bf16_path"] = select_backend(torch.zeros(1, dtype=torch.bfloat16))[0]
    # fp16, which the interpreter does compute: the path taken, and the errors of it and of the fp16 reference
    # against the fp64 reference (h and the 5 gradients)
    def first_order(fn, dtype, **kw):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in (x, wd, bd_all[::2], wu, bu_all[::2])]
        h = fn(*leaves, **kw)
        return [h] + list(torch.autograd.grad(h, leaves, dh.to(dtype)))

    exact = first_order(adapter_reference, torch.float64)
    ref16 = first_order(adapter_reference, torch.float16)
    for key, c in (("fp16", cfg), ("fp16_rows", rows)):
        got16 = first_order(fused_adapter, torch.float16, config=c)
        out[key] = {"path": select_backend(torch.zeros(1, dtype=torch.float16))[0],
                    "dtypes": [str(t.dtype) for t in got16],
                    "errs": [(a.double() - b).abs().max().item() for a, b in zip(got16, exact)],
                    "ref_errs": [(a.double() - b).abs().max().item() for a, b in zip(ref16, exact)]}
    # what the kernels never take, though the interpreter runs them: fp64 inputs, an autocast region
    out["fp64_dispatch"] = list(select_backend(torch.zeros(1, dtype=torch.float64)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out["autocast_dispatch"] = list(select_backend(torch.zeros(1)))
        try:
            fused_adapter(x.float(), wd.float(), None, wu.float(), None, backend="triton", config=cfg)
            out["autocast_triton"] = "ran"
        except RuntimeError as e:
            out["autocast_triton"] = str(e)
    # a transposed x (the kernels read rows of a contiguous copy) and no tokens at all, also (transposed) under the
    # fused backward kernel, which reads x again; the upstream gradient of h.sum(), an expanded tensor (every
    # stride 0) that the backward kernels read as rows; and transposed weights (Compacter's w.t(); the fused
    # backward kernel reads W_d as rows): values and gradients
    fused = dataclasses.replace(cfg, bwd_fused=True, bwd_block_m=16, bwd_block_n=16, bwd_programs=8, bwd_stages=1)
    xt, wdt, wut = (t.T.contiguous().T for t in (x, wd, wu))
    cases = {"transposed_x": (xt, wd, wu, cfg, False), "empty_x": (x[:0], wd, wu, cfg, False),
             "transposed_x_fused_bwd": (xt, wd, wu, fused, False), "summed_h": (x, wd, wu, cfg, True),
             "summed_h_fused_bwd": (x, wd, wu, fused, True), "transposed_weights": (x, wdt, wut, cfg, False),
             "transposed_weights_fused_bwd": (x, wdt, wut, fused, False)}
    rows_wgrad = dataclasses.replace(rows, bwd_fused=True, bwd_block_m=16, bwd_block_n=16, bwd_programs=8,
                                     bwd_stages=1)
    cases.update({f"{name}_rows": (xx, w1, w2, rows, summed) for name, (xx, w1, w2, c, summed) in list(cases.items())
                  if c is cfg})
    cases.update({"transposed_x_rows_wgrad": (xt, wd, wu, rows_wgrad, False),
                  "summed_h_rows_wgrad": (x, wd, wu, rows_wgrad, True),
                  "transposed_weights_rows_wgrad": (x, wdt, wut, rows_wgrad, False)})
    for name, (xx, w1, w2, c, summed) in cases.items():
        def run(fn, dtype, **kw):
            leaves = [t.detach().to(dtype).requires_grad_(True) for t in (xx, w1, bd_all[::2], w2, bu_all[::2])]
            h = fn(*leaves, **kw)
            return [h] + list(torch.autograd.grad(h.sum() if summed else h, leaves,
                                                  None if summed else dh[:len(xx)].to(dtype)))

        got, ref = run(fused_adapter, torch.float32, backend="triton", config=c), run(adapter_reference, torch.float64)
        out[name] = {"shapes": [list(a.shape) == list(b.shape) for a, b in zip(got, ref)],
                     "errs": [(a.double() - b).abs().max().item() if b.numel() else 0.0 for a, b in zip(got, ref)],
                     "scale": [b.abs().max().item() if b.numel() else 0.0 for b in ref]}
    # bytes saved for backward beyond the inputs with a transposed x: z only, no contiguous copy of x
    from vlscale.profiling.measure import saved_bytes

    xt = x.float().T.contiguous().T.requires_grad_(True)
    weights = [t.float().requires_grad_(True) for t in (wd, bd_all[::2], wu, bu_all[::2])]
    saved = saved_bytes(lambda: fused_adapter(xt, *weights, backend="triton", config=cfg), [xt, *weights])
    out["saved_noncontiguous"] = {"activations": saved["activations"], "z_bytes": tokens * hidden * 4}
    return out


def torch_func_cases() -> dict:
    """torch.func over the Triton Function (fp32) against the reference (fp64): errors and scales per
    transform (test_kernels_edge_cases.func_transforms), and the graph of a vmapped call run backward."""
    from test_kernels_edge_cases import func_transforms, vmapped_graph

    from vlscale.kernels.adapter import KernelConfig, adapter_reference, fused_adapter

    cfg = KernelConfig(down_block_m=16, down_block_k=16, down_block_h=16, down_stages=1, up_block_m=16,
                       up_block_n=16, up_block_k=16, up_stages=1)
    ref = func_transforms(adapter_reference)
    got = func_transforms(lambda *a, **kw: fused_adapter(*a, backend="triton", config=cfg, **kw),
                          dtype=torch.float32)
    out = {}
    for name in ref:
        pairs = list(zip(*(v if isinstance(v, tuple) else (v,) for v in (ref[name], got[name]))))
        out[name] = {"errs": [(g.double() - r).abs().max().item() for r, g in pairs],
                     "scale": [r.abs().max().item() for r, _ in pairs]}
    out["vmap_graph"] = vmapped_graph(cfg)
    return out


def logged(fn):
    """fn()'s result and the messages vlscale.kernels.adapter logged (INFO and up) while it ran."""
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("vlscale.kernels.adapter")
    log.addHandler(handler)
    level = log.level
    log.setLevel(logging.INFO)
    try:
        return fn(), [r.getMessage() for r in records]
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


if __name__ == "__main__":
    kernels, kernel_log = logged(kernel_cases)  # the process's first fused_adapter calls
    print(json.dumps({"kernels": kernels, "kernel_log": kernel_log, "fused_model": fused_model_check(),
                      "edge": edge_cases(), "torch_func": torch_func_cases()}))
