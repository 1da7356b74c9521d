"""fused_adapter beyond the plain first-order fp32 call: fp64 gradients, double backward,
torch.autocast, torch.func, torch.compile, strided biases and bf16 on the Triton path (interpreter results from
tests/unit/triton_interpreter_checks.py: edge_cases)."""

from __future__ import annotations

import pytest
import torch

from vlscale.kernels import adapter_reference, fused_adapter
from vlscale.kernels import adapter as ka


def _args(dtype=torch.float64, tokens=6, d_model=12, hidden=4, scale_x=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_model, generator=g, dtype=torch.float64) * scale_x
    wd = torch.randn(hidden, d_model, generator=g, dtype=torch.float64) * 0.4
    bd = torch.randn(hidden, generator=g, dtype=torch.float64)
    wu = torch.randn(d_model, hidden, generator=g, dtype=torch.float64) * 0.4
    bu = torch.randn(d_model, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (x, wd, bd, wu, bu)]


def _torch_path(*args, **kw):
    return fused_adapter(*args, backend="torch", **kw)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_fp64_gradients_are_fp64_exact(activation):
    args = _args(tokens=40, d_model=48, hidden=12)
    dh = torch.randn(40, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = []
    for fn in (adapter_reference, _torch_path):
        leaves = [t.clone().requires_grad_(True) for t in args]
        grads.append(torch.autograd.grad(fn(*leaves, activation=activation), leaves, dh))
    for name, r, f in zip(["dx", "dw_down", "db_down", "dw_up", "db_up"], *grads):
        assert (r - f).abs().max().item() < 1e-12, name  # not fp32-rounded (~1e-7)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_double_backward_matches_reference(activation):
    args = _args()
    results = []
    for fn in (adapter_reference, _torch_path):
        leaves = [t.clone().requires_grad_(True) for t in args]
        out = fn(*leaves, activation=activation)
        (dx,) = torch.autograd.grad(out.pow(2).sum(), leaves[0], create_graph=True)
        results.append(torch.autograd.grad(dx.pow(2).sum(), leaves))
    for name, r, f in zip(["x", "w_down", "b_down", "w_up", "b_up"], *results):
        torch.testing.assert_close(f, r, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")
    leaves = tuple(t.clone().requires_grad_(True) for t in _args(tokens=3, d_model=5, hidden=2))
    assert torch.autograd.gradgradcheck(lambda *t: _torch_path(*t, activation=activation), leaves)


def test_double_backward_with_only_some_inputs_requiring_grad():
    x, wd, bd, wu, bu = _args()
    x.requires_grad_(True)
    wd.requires_grad_(True)
    grads = []
    for fn in (adapter_reference, _torch_path):
        (dx,) = torch.autograd.grad(fn(x, wd, bd, wu, bu).pow(2).sum(), x, create_graph=True)
        grads.append(torch.autograd.grad(dx.sum(), wd)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-10)


def test_autocast_gives_the_reference_result_and_backward_outside_it(monkeypatch, caplog):
    monkeypatch.delenv(ka.BACKEND_ENV, raising=False)
    ka._LOGGED.clear()
    args = _args(torch.float32, scale_x=100.0)  # a large residual: rounding it to bf16 would show
    outs, grads = [], []
    for fn in (adapter_reference, fused_adapter, _torch_path):
        leaves = [t.clone().requires_grad_(True) for t in args]
        with torch.autocast("cpu", dtype=torch.bfloat16), caplog.at_level("INFO", logger=ka.__name__):
            out = fn(*leaves)
        out.pow(2).sum().backward()  # outside autocast, as torch.autocast's docs advise
        outs.append(out)
        grads.append([t.grad for t in leaves])
    for out, g in zip(outs[1:], grads[1:]):
        assert out.dtype == torch.float32  # as the reference: the residual add in x's dtype
        torch.testing.assert_close(out, outs[0], rtol=0, atol=0)
        for a, b in zip(g, grads[0]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the two fused calls said why they ran the reference graph, once
    assert [r.getMessage() for r in caplog.records if "fused_adapter" in r.getMessage()] == [
        "fused_adapter: using the reference graph, torch.autocast is on (torch.bfloat16, x is torch.float32)"]
    # autocast to x's own dtype changes nothing: the recompute path runs
    x = args[0].bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = _torch_path(x, *[t.bfloat16() for t in args[1:]])
    assert any(type(fn).__name__.startswith("_TorchAdapterFn") for fn, _ in h.grad_fn.next_functions)


# ------------------------------------------------------------------------------- torch.func
def func_transforms(fn, activation="gelu", dtype=torch.float64):
    """Results of torch.func transforms over ``fn``: grad (every argument), vmap over x, over a stack
    of down-projections and over a stack of up-projection biases, per-sample gradients (vmap of grad),
    jacrev, and grad of grad. Also run by triton_interpreter_checks.py on the Triton path."""
    from torch.func import grad, jacrev, vmap

    x, wd, bd, wu, bu = _args(dtype, tokens=6, d_model=12, hidden=4)

    def f(*a):
        return fn(*a, activation=activation)

    def loss(*a):
        return f(*a).pow(2).sum()

    wds, bus = torch.stack([wd, 2 * wd, -wd]), torch.stack([bu, 2 * bu, -bu])
    return {
        "grad": grad(loss, argnums=(0, 1, 2, 3, 4))(x, wd, bd, wu, bu),
        "vmap_x": vmap(lambda xi: f(xi, wd, bd, wu, bu))(x.reshape(2, 3, 12)),
        "vmap_x_dim1": vmap(lambda xi: f(xi, wd, bd, wu, bu), in_dims=1)(x.reshape(3, 2, 12)),
        "vmap_w": vmap(lambda w: f(x, w, bd, wu, bu))(wds),
        "vmap_b_up": vmap(lambda b: f(x, wd, bd, wu, b))(bus),
        "per_sample": vmap(grad(lambda w, xi: loss(xi, w, bd, wu, bu)), in_dims=(None, 0))(wd, x),
        "jacrev": jacrev(lambda xi: f(xi, wd, bd, wu, bu))(x[:2]),
        "grad_grad": grad(lambda xi: grad(loss)(xi, wd, bd, wu, bu).pow(2).sum())(x),
    }


def vmapped_graph(cfg, device="cpu") -> list[str]:
    """The autograd node names of a vmapped Triton-path call (batched x, shared weights) on ``device``."""
    x = torch.randn(2, 3, 16, device=device, requires_grad=True)
    w = [torch.randn(*shape, device=device) for shape in ((8, 16), (8,), (16, 8), (16,))]
    h = torch.vmap(lambda xi: fused_adapter(xi, *w, backend="triton", config=cfg))(x)
    nodes, stack = [], [h.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None:
            nodes.append(type(node).__name__)
            stack.extend(n for n, _ in node.next_functions)
    return nodes


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_torch_func_transforms_match_the_reference(activation):
    """The PyTorch recompute Function under torch.func (it raised 'must override the setup_context
    staticmethod' under every transform): the same values as the reference's, fp64 exact, and the
    second derivative through grad of grad too."""
    ref = func_transforms(adapter_reference, activation)
    got = func_transforms(_torch_path, activation)
    for name in ref:
        for r, f in zip(*(v if isinstance(v, tuple) else (v,) for v in (ref[name], got[name]))):
            assert r.abs().max() > 0, name
            torch.testing.assert_close(f, r, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")


def test_torch_compile_traces_fused_adapter_in_one_graph(monkeypatch):
    """torch.compile traced the first call's log line (_log_once) as a graph break, and the compiled code
    kept it for every later call: a model compiled before any eager call ran as 10 graphs a step (tiny-t5,
    one per adapter site and frame). Now one graph (fullgraph=True raised), same values and gradients."""
    from torch._dynamo.testing import CompileCounter

    monkeypatch.delenv(ka.BACKEND_ENV, raising=False)
    ka._LOGGED.clear()  # the first call in this process: the message not logged yet
    torch._dynamo.reset()
    args = [t.float().requires_grad_(True) for t in _args(tokens=10, d_model=16, hidden=4)]
    counter = CompileCounter()
    compiled = torch.compile(lambda *a: fused_adapter(*a).pow(2).sum(), backend=counter, fullgraph=True)
    try:
        for _ in range(2):
            got = torch.autograd.grad(compiled(*args), args)
    finally:
        torch._dynamo.reset()
    assert counter.frame_count == 1
    ref = torch.autograd.grad(adapter_reference(*args).pow(2).sum(), args)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- Triton interpreter
def test_triton_strided_biases_double_backward_and_bf16_dispatch(triton_interpreter):
    edge = triton_interpreter["edge"]
    for key in ("strided_bias_double_backward", "strided_bias_double_backward_rows"):  # two-kernel, one-pass
        case = edge[key]
        assert len(case["errs"]) == 7  # h, 5 gradients, one second-order gradient
        for err, scale in zip(case["errs"], case["scale"]):
            assert err <= 1e-5 * max(1.0, scale), (key, case)
    # the interpreter has no bfloat16 arithmetic (its results are garbage): the PyTorch path runs bf16
    assert edge["bf16_path"] == "torch"
    # fp16 it computes: the kernels run it, within twice the fp16 reference's error (test_triton_cuda_two_x_rule)
    for fp16 in (edge["fp16"], edge["fp16_rows"]):
        assert fp16["path"] == "triton" and fp16["dtypes"] == ["torch.float16"] * 6, fp16
        for name, err, ref_err in zip(["h", "dx", "dw_down", "db_down", "dw_up", "db_up"], fp16["errs"],
                                      fp16["ref_errs"]):
            assert err <= 2 * ref_err + 1e-6, (name, fp16)
    # a strided (transposed) x is saved as given, not as a contiguous d_model-wide copy: z only
    saved = edge["saved_noncontiguous"]
    assert saved["activations"] == saved["z_bytes"], saved


def test_triton_dispatch_refusals_and_unusual_x_under_interpreter(triton_interpreter):
    """Under the interpreter (where the kernels would run on CPU tensors) fp64 and an autocast region still go to
    the PyTorch path, with the reason, and backend='triton' is refused under autocast; a transposed x (under the
    default and the fused backward kernels), an x of no tokens, the expanded upstream gradient of h.sum() (every
    stride 0; the backward kernels read dh as rows) and transposed weights (Compacter's w.t(), under both backward
    kernels, and the one-pass kernels) give the reference's values and gradients."""
    edge = triton_interpreter["edge"]
    path, reason = edge["fp64_dispatch"]
    assert path == "torch" and "dtype torch.float64 is not supported" in reason
    path, reason = edge["autocast_dispatch"]
    assert path == "torch" and "torch.autocast is on for cpu (torch.bfloat16" in reason
    assert "backend='triton' requested but torch.autocast is on" in edge["autocast_triton"]
    names = ["transposed_x", "empty_x", "transposed_x_fused_bwd", "summed_h", "summed_h_fused_bwd",
             "transposed_weights", "transposed_weights_fused_bwd"]
    # the same under the one-pass kernels (KernelConfig(fwd_rows=True, bwd_rows=True)), and with the fused
    # weight-gradient kernel after them
    names += ["transposed_x_rows", "empty_x_rows", "summed_h_rows", "transposed_weights_rows",
              "transposed_x_rows_wgrad", "summed_h_rows_wgrad", "transposed_weights_rows_wgrad"]
    for name in names:
        case = edge[name]
        assert len(case["errs"]) == 6 and all(case["shapes"]), (name, case)
        for err, scale in zip(case["errs"], case["scale"]):
            assert err <= 1e-5 * max(1.0, scale), (name, case)


def test_triton_function_under_torch_func(triton_interpreter):
    """tests/unit/triton_interpreter_checks.py: torch_func_cases. grad, vmap (x batched: more tokens for the
    kernels; weights batched: the PyTorch Function), per-sample gradients, jacrev and grad of grad over the
    Triton Function match the fp64 reference; a vmapped call's graph holds the Triton Function's node."""
    cases = triton_interpreter["torch_func"]
    assert "_TritonAdapterFnBackward" in cases.pop("vmap_graph")
    assert len(cases) == 8
    for name, case in cases.items():
        for err, scale in zip(case["errs"], case["scale"]):
            assert err <= 1e-5 * max(1.0, scale), (name, case)


# ------------------------------------------------------------------------------- CUDA (benchmarks/gpu_suite.py: cuda_tests)
SMALL_TILES = dict(down_block_m=16, down_block_k=16, down_block_h=16, down_stages=1, up_block_m=16, up_block_n=16,
                   up_block_k=16, up_stages=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_cuda_function_under_torch_func():
    """test_triton_function_under_torch_func on a GPU: torch.func over the compiled Triton kernels (fp32, ieee
    dots) against the fp64 reference on the host; a vmapped call keeps the Triton Function in its graph."""
    pytest.importorskip("triton")
    cfg = ka.KernelConfig(**SMALL_TILES)

    def on_cuda(*a, **kw):
        a = [t.to("cuda", torch.float32) for t in a]
        assert ka.select_backend(a[0])[0] == "triton"
        return fused_adapter(*a, backend="triton", config=cfg, **kw).to("cpu", torch.float64)

    ref, got = func_transforms(adapter_reference), func_transforms(on_cuda)
    for name in ref:
        for r, f in zip(*(v if isinstance(v, tuple) else (v,) for v in (ref[name], got[name]))):
            assert (f - r).abs().max() <= 1e-5 * max(1.0, r.abs().max().item()), name
    nodes = vmapped_graph(cfg, "cuda")
    assert "_TritonAdapterFnBackward" in nodes, nodes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_cuda_under_torch_compile():
    """torch.compile (inductor) over a function calling the Triton path on a GPU: runs, and its values and
    gradients are the eager Triton path's (whether Dynamo traces the launch or breaks the graph there)."""
    pytest.importorskip("triton")
    args = [t.to("cuda", torch.float32).requires_grad_(True) for t in _args(tokens=64, d_model=64, hidden=16)]

    def f(*a):
        return fused_adapter(*a, backend="triton").pow(2).sum()

    torch._dynamo.reset()
    try:
        compiled = torch.compile(f)
        got = [compiled(*args)] + list(torch.autograd.grad(compiled(*args), args))
    finally:
        torch._dynamo.reset()
    eager = [f(*args)] + list(torch.autograd.grad(f(*args), args))
    for g, e in zip(got, eager):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- benchmark
def _benchmark_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "adapter_kernel.py"
    spec = importlib.util.spec_from_file_location("adapter_kernel_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_cost_model_and_size_arguments(capsys):
    ak = _benchmark_module()
    cost = ak.op_cost(tokens=10, d_model=8, hidden=2, itemsize=2)
    big, low, weights = 10 * 8 * 2, 10 * 2 * 2, (2 * 8 * 2 + 8 + 2) * 2
    assert cost["fwd"] == {"bytes": 2 * big + low + weights, "flops": 2 * 2 * 10 * 8 * 2}
    assert cost["fwd_bwd"] == {"bytes": 5 * big + 2 * low + 3 * weights, "flops": 6 * 2 * 10 * 8 * 2}
    for bad in (["--tokens", "-5"], ["--hidden", "0"], ["--d-model", "x"]):
        with pytest.raises(SystemExit):
            ak.main(["--device", "cpu", *bad])
        assert "is not a positive integer" in capsys.readouterr().err


def test_the_triton_path_launches_on_the_inputs_device(monkeypatch):
    """Triton launches its kernels on the current CUDA device: x on cuda:1 with cuda:0 current would hand
    the kernels another device's pointers. The launch now runs under torch.cuda.device(x.device)."""
    import contextlib
    from types import SimpleNamespace

    from vlscale.kernels import adapter as kernels

    entered, launched = [], []

    @contextlib.contextmanager
    def device(d):
        entered.append(d)
        yield
        entered.append("exit")

    monkeypatch.setattr(kernels.torch.cuda, "device", device)
    with kernels._on_device_of(SimpleNamespace(is_cuda=True, device="cuda:1")):
        assert entered == ["cuda:1"]
    with kernels._on_device_of(torch.zeros(1)):  # the interpreter's host tensors: nothing to switch
        pass
    assert entered == ["cuda:1", "exit"]

    class FakeFn:
        @staticmethod
        def apply(x, *args):
            launched.append(list(entered))
            return x, None  # (h, z)

    monkeypatch.setattr(kernels, "select_backend", lambda x, backend="auto": ("triton", "test"))
    monkeypatch.setattr(kernels, "_TritonAdapterFn", FakeFn)
    monkeypatch.setattr(kernels, "_on_device_of", lambda x: device(x.device))
    entered.clear()
    x = torch.randn(2, 3, 8)
    kernels.fused_adapter(x, torch.randn(4, 8), torch.randn(4), torch.randn(8, 4), torch.randn(8))
    assert launched == [[x.device]] and entered == [x.device, "exit"]


def test_benchmark_cpu_timer_drops_the_warm_up_call_and_takes_the_median(monkeypatch):
    """Each function's first call is not timed, the figure is the median of the rest, and the tensors given in
    ``grad_to_none`` start every call without a gradient (accumulation would add work to the timed call)."""
    from types import SimpleNamespace

    ak = _benchmark_module()
    clock = [0.0]
    monkeypatch.setattr(ak, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    t = torch.zeros(1, requires_grad=True)
    durations = iter([100.0, 1.0, 5.0, 2.0])

    def fn():
        assert t.grad is None
        t.grad = torch.ones(1)
        clock[0] += next(durations)

    assert ak._time({"f": fn}, "cpu", repeats=3, grad_to_none=[t]) == {"f": 2.0}


def test_benchmark_floors_count_read_plus_write_bytes_and_two_flops_per_multiply_add(monkeypatch):
    ak = _benchmark_module()
    monkeypatch.setattr(ak, "_time", lambda fns, device, repeats=15, grad_to_none=None: dict.fromkeys(fns, 0.5))
    assert ak.measure_copy_bandwidth("cpu") == 2 * (64 << 20) / 0.5
    assert ak.measure_matmul_rate("cpu", torch.float32) == 2 * 1024**3 / 0.5


def test_benchmark_case_speedup_floors_and_bandwidth_fraction(monkeypatch):
    """fwd_bwd times the backward too; speedup = reference time / fused time; floor = the larger of the
    bytes / copy-bandwidth and the FLOPs / matmul-rate bounds, ``bound`` names it; % of copy bandwidth and of
    the matmul rate are the fused op's; the bytes at the dtype's width; saved bytes measured for each path (the
    fused one recomputes, keeping less)."""
    ak = _benchmark_module()
    backward_ran = []

    def fake_time(fns, device, repeats=15, grad_to_none=None):
        for f in fns.values():
            for t in grad_to_none:
                t.grad = None
            f()
            backward_ran.append(grad_to_none[0].grad is not None)
        return {"reference": 3e-3, "fused": 1e-3}

    monkeypatch.setattr(ak, "_time", fake_time)
    tokens, d, h = 8, 16, 4
    cost = ak.op_cost(tokens, d, h, 2)
    # memory-bound forward (bytes / bw > flops / rate) and compute-bound forward + backward
    bw = cost["fwd"]["bytes"] / 1e-3
    rate = cost["fwd"]["flops"] / 0.95e-3  # backward: 3x the FLOPs, under 3x the bytes
    assert cost["fwd"]["flops"] / rate < cost["fwd"]["bytes"] / bw
    assert cost["fwd_bwd"]["flops"] / rate > cost["fwd_bwd"]["bytes"] / bw
    case = ak.bench_case(tokens, d, h, torch.bfloat16, "cpu", "gelu", {"copy_bandwidth": bw, "matmul_flops": rate})
    for mode, bound in (("fwd", "memory"), ("fwd_bwd", "compute")):
        m = case[mode]
        assert (m["reference_ms"], m["fused_ms"], m["speedup"]) == (3.0, 1.0, 3.0), mode
        assert (m["min_bytes"], m["flops"], m["bound"]) == (cost[mode]["bytes"], cost[mode]["flops"], bound), mode
        assert m["floor_ms"] == pytest.approx(1e3 * max(cost[mode]["bytes"] / bw, cost[mode]["flops"] / rate)), mode
        assert m["pct_copy_bw"] == pytest.approx(100 * cost[mode]["bytes"] / 1e-3 / bw), mode
        assert m["pct_matmul_rate"] == pytest.approx(100 * cost[mode]["flops"] / 1e-3 / rate), mode
    assert case["fwd"]["pct_copy_bw"] == pytest.approx(100.0)
    assert backward_ran == [False, False, True, True]  # fwd: the op alone; fwd_bwd: with its backward
    sv = case["saved_bytes"]
    assert 0 < sv["fused"]["activations"] < sv["reference"]["activations"]


def test_benchmark_low_precision_rule_is_twice_the_reference_error(monkeypatch):
    """check_low_precision passes a fused output whose error against the fp32 reference is at most 2x the
    low-precision reference's (+ atol), and fails at 3x, on the output alone (the gradients equal); the fp32
    reference runs on fp32 copies of the inputs, and the fused path gets the KernelConfig asked for."""
    ak = _benchmark_module()
    e = 2.0 ** -6  # the low-precision reference's error; 2e and 3e are exact in bf16 on zeros
    factor, configs = [2], []

    def make_inputs(tokens, d_model, hidden, dtype, device, seed=0):
        args = [torch.zeros(*s, dtype=dtype).requires_grad_(True)
                for s in ((tokens, d_model), (hidden, d_model), (hidden,), (d_model, hidden), (d_model,))]
        return args, torch.ones(tokens, d_model, dtype=dtype)

    def plain(x, wd, bd, wu, bu, offset):
        return x + offset + 0 * (wd.sum() + bd.sum() + wu.sum() + bu.sum())

    def reference(x, *w, activation="gelu"):
        return plain(x, *w, 0.0 if x.dtype == torch.float32 else e)

    def fused(x, *w, activation="gelu", config=None):
        configs.append(config)
        return plain(x, *w, factor[0] * e)

    monkeypatch.setattr(ak, "make_inputs", make_inputs)
    monkeypatch.setattr(ak, "adapter_reference", reference)
    monkeypatch.setattr(ak, "fused_adapter", fused)
    res = ak.check_low_precision("cpu", torch.bfloat16, 4, 8, 2, config="cfg")
    assert res["pass"] is True and res["errors"]["h"] == {"err_fused": 2 * e, "err_reference": e, "pass": True}
    assert configs == ["cfg"]
    factor[0] = 3
    res = ak.check_low_precision("cpu", torch.bfloat16, 4, 8, 2)
    assert res["pass"] is False and res["errors"]["h"]["pass"] is False
    assert all(res["errors"][n]["pass"] for n in ("dx", "dw_down", "db_down", "dw_up", "db_up"))



def test_benchmark_grid_override_keeps_the_default_grid_s_other_sizes(monkeypatch):
    """A --tokens override keeps the default grid's d_model and every one of its hidden sizes."""
    ak = _benchmark_module()
    seen = {}
    monkeypatch.setattr(ak, "run_benchmark", lambda device, dtype, grid, act: seen.setdefault("grid", grid))
    monkeypatch.setattr(ak, "format_table", lambda result: "")
    assert ak.main(["--device", "cpu", "--tokens", "64"]) == 0
    assert seen["grid"] == [(64, 256, 32), (64, 256, 64)]


def test_benchmark_keeps_a_copy_bandwidth_it_is_given(monkeypatch):
    """gpu_kernels_section measures the copy bandwidth once for bf16 and fp16; run_benchmark measured it again
    each time (``setdefault`` evaluates its default first) and threw the figure away."""
    ak = _benchmark_module()
    seen = {}
    monkeypatch.setattr(ak.torch, "set_num_threads", lambda n: None)
    monkeypatch.setattr(ak, "measure_copy_bandwidth", lambda device: pytest.fail("the copy bandwidth re-measured"))
    monkeypatch.setattr(ak, "measure_matmul_rate", lambda device, dtype: 7.0)
    monkeypatch.setattr(ak, "bench_case", lambda *a: seen.setdefault("floors", a[-1]))
    res = ak.run_benchmark("cpu", torch.float32, [(1, 2, 3)], floors={"copy_bandwidth": 5.0})
    assert seen["floors"] == {"copy_bandwidth": 5.0, "matmul_flops": 7.0} and res["copy_bandwidth_GBps"] == 5e-9
    monkeypatch.setattr(ak, "measure_copy_bandwidth", lambda device: 3.0)
    assert ak.run_benchmark("cpu", torch.float32, [(1, 2, 3)])["copy_bandwidth_GBps"] == 3e-9
