"""Tests of vlscale.kernels.adapter: reference, PyTorch recompute path, Triton kernels (interpreter
on CPU, compiled on CUDA), saved-tensor memory and dispatch."""

from __future__ import annotations

import logging
import re
from types import SimpleNamespace

import pytest
import torch

from vlscale.kernels import adapter as ka
from vlscale.kernels import adapter_reference, fused_adapter, select_backend
from vlscale.profiling.measure import saved_bytes

NAMES = ["h", "dx", "dw_down", "db_down", "dw_up", "db_up"]


def _inputs(tokens_shape, d_model, hidden, dtype=torch.float32, bias=True, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    x = rand(*tokens_shape, d_model)
    w_down, w_up = rand(hidden, d_model, scale=d_model**-0.5), rand(d_model, hidden, scale=hidden**-0.5)
    b_down = rand(hidden, scale=0.5) if bias else None
    b_up = rand(d_model, scale=0.5) if bias else None
    dh = rand(*tokens_shape, d_model)
    return [x, w_down, b_down, w_up, b_up], dh


def _run(fn, args, dh, **kw):
    """Output and gradients (None for absent biases) of fn(*args) with upstream gradient dh."""
    args = [a.detach().clone().requires_grad_(True) if a is not None else None for a in args]
    h = fn(*args, **kw)
    present = [a for a in args if a is not None]
    grads = iter(torch.autograd.grad(h, present, dh))
    return [h.detach()] + [next(grads) if a is not None else None for a in args]


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


# ------------------------------------------------------------------------------- reference
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_reference_matches_fp64_and_the_formula(activation):
    args, dh = _inputs((3, 7), 32, 8)
    x, wd, bd, wu, bu = [a.double() for a in args]
    z = x @ wd.T + bd
    if activation == "gelu":
        act = 0.5 * z * (1 + torch.erf(z / 2**0.5))
    else:  # HF gelu_new
        act = 0.5 * z * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (z + 0.044715 * z**3)))
    expected = x + act @ wu.T + bu
    out32 = adapter_reference(*args, activation=activation)
    assert out32.dtype == torch.float32 and out32.shape == (3, 7, 32)
    assert _max_err(out32, expected) < 1e-5
    assert _max_err(adapter_reference(x, wd, bd, wu, bu, activation), expected) < 1e-12
    assert _max_err(out32, args[0]) > 0.1  # not the identity


# ------------------------------------------------------------------------------- torch path
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
@pytest.mark.parametrize("bias", [True, False])
def test_torch_recompute_path_matches_reference(activation, bias):
    args, dh = _inputs((2, 13), 48, 12, bias=bias)
    ref = _run(adapter_reference, args, dh, activation=activation)
    got = _run(fused_adapter, args, dh, activation=activation, backend="torch")
    for name, r, o in zip(NAMES, ref, got):
        if r is None:
            assert o is None, name
            continue
        assert o.shape == r.shape and o.dtype == r.dtype, name
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5, msg=name)
    assert _max_err(ref[0], args[0]) > 0.1


def test_torch_path_handles_noncontiguous_input_and_frozen_weights():
    args, dh = _inputs((16,), 24, 8)
    x = torch.randn(24, 16).T  # non-contiguous (16, 24)
    x_ref, x_f = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    h_ref = adapter_reference(x_ref, *args[1:])
    h_f = fused_adapter(x_f, *args[1:], backend="torch")  # weights do not require grad
    torch.testing.assert_close(h_f, h_ref)
    (g_ref,) = torch.autograd.grad(h_ref, x_ref, dh)
    (g_f,) = torch.autograd.grad(h_f, x_f, dh)
    torch.testing.assert_close(g_f, g_ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_path_low_precision_two_x_rule(dtype):
    args, dh = _inputs((257,), 64, 16)
    exact = _run(adapter_reference, args, dh)
    lp = [a.to(dtype) if a is not None else None for a in args]
    ref_lp = _run(adapter_reference, lp, dh.to(dtype))
    got = _run(fused_adapter, lp, dh.to(dtype), backend="torch")
    for name, e, r, o in zip(NAMES, exact, ref_lp, got):
        assert o.dtype == dtype, name
        assert _max_err(o, e) <= 2 * _max_err(r, e) + 1e-5, name


# ------------------------------------------------------------------------------- saved memory
def test_recompute_path_saves_fewer_bytes_than_reference():
    tokens, d_model, hidden = 300, 64, 16
    args, _ = _inputs((tokens,), d_model, hidden)
    args = [a.requires_grad_(True) for a in args]
    ref = saved_bytes(lambda: adapter_reference(*args), args)
    fused = saved_bytes(lambda: fused_adapter(*args, backend="torch"), args)
    assert fused["all"] < ref["all"]
    z_bytes = tokens * hidden * 4
    assert fused["activations"] == z_bytes  # only z beyond the inputs
    assert ref["activations"] == 2 * z_bytes  # the reference also keeps act(z)


@pytest.mark.parametrize("layout", ["transposed", "sliced", "permuted_3d"])
def test_recompute_path_saves_no_copy_of_a_noncontiguous_x(layout):
    # a strided x (a transposed or sliced view) must not be saved as a contiguous d_model-wide copy
    tokens, d_model, hidden = 48, 32, 4
    args, dh = _inputs((tokens,), d_model, hidden)
    base = {"transposed": torch.randn(d_model, tokens).T, "sliced": torch.randn(tokens, 2 * d_model)[:, ::2],
            "permuted_3d": torch.randn(tokens // 4, 4, d_model).transpose(0, 1)}[layout]
    x = base.detach().requires_grad_(True)
    assert not x.is_contiguous()
    weights = [a.requires_grad_(True) for a in args[1:]]
    fused = saved_bytes(lambda: fused_adapter(x, *weights, backend="torch"), [x, *weights])
    assert fused["activations"] == tokens * hidden * 4  # z only
    # and the gradients still match the reference's
    dh = dh.reshape(x.shape)
    got = torch.autograd.grad(fused_adapter(x, *weights, backend="torch"), [x, *weights], dh)
    ref = torch.autograd.grad(adapter_reference(x, *weights), [x, *weights], dh)
    for g, r in zip(got, ref):
        assert g.shape == r.shape
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- dispatch
def test_auto_dispatch_on_cpu_uses_torch_path_and_logs_reason(caplog, monkeypatch):
    monkeypatch.delenv(ka.BACKEND_ENV, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ka._LOGGED.clear()
    args, _ = _inputs((5,), 16, 4)
    path, reason = select_backend(args[0])
    assert path == "torch" and reason
    with caplog.at_level(logging.INFO, logger=ka.__name__):
        fused_adapter(*args)
        fused_adapter(*args)
    msgs = [r.getMessage() for r in caplog.records if "fused_adapter" in r.getMessage()]
    assert msgs == [f"fused_adapter: using the PyTorch recompute path ({reason})"]  # once, with the reason


def test_auto_dispatch_follows_the_kernels_triton_built_not_the_variable_now(monkeypatch):
    # Triton reads TRITON_INTERPRET once, when the kernels are defined, and parses it its own way
    # ("false", "off" are false): a value set later, or such a value, must not send CPU tensors to
    # compiled kernels (a RuntimeError "0 active drivers" where the PyTorch path should run)
    monkeypatch.delenv(ka.BACKEND_ENV, raising=False)
    interpreted = "Interpreted" in type(getattr(ka, "_down_kernel", None)).__name__
    args, _ = _inputs((5,), 16, 4)
    for value in ("1", "false", "off", "2"):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert select_backend(args[0])[0] == ("triton" if interpreted else "torch"), value
        torch.testing.assert_close(fused_adapter(*args), adapter_reference(*args))


def test_a_requested_triton_backend_that_cannot_run_is_refused_before_the_build(monkeypatch):
    """VLSCALE_ADAPTER_BACKEND=triton where the kernels cannot run (float64, which they never take, or a CPU
    tensor outside the interpreter) is a ValueError naming the variable and the reason, which setup_run turns
    into a one-line refusal before the model is built; it was a RuntimeError traceback at the first forward."""
    monkeypatch.setenv(ka.BACKEND_ENV, "triton")
    with pytest.raises(ValueError, match=rf"^{ka.BACKEND_ENV}=triton, but .+; unset it \(auto\) or set it "
                                         r"to torch$"):
        ka.check_requested_backend(torch.device("cpu"), torch.float64)
    if "Interpreted" not in type(getattr(ka, "_down_kernel", None)).__name__ and not torch.cuda.is_available():
        with pytest.raises(ValueError, match="Triton needs CUDA tensors"):
            ka.check_requested_backend(torch.device("cpu"), torch.float32)
    for value in ("torch", "auto"):
        monkeypatch.setenv(ka.BACKEND_ENV, value)
        ka.check_requested_backend(torch.device("cpu"), torch.float64)  # nothing requested that cannot run


@pytest.mark.parametrize("name, capability", [("Tesla V100-SXM2-32GB", (7, 0)), ("Tesla T4", (7, 5)),
                                              ("NVIDIA GeForce RTX 3090", (8, 6))])
def test_a_gpu_below_triton_s_compute_capability_takes_the_pytorch_path_saying_why(name, capability, monkeypatch):
    """Triton supports compute capability 8.0+ (its README): below, tl.dot compiles to FMAs (the kernels compiled
    ahead of time for sm70 / sm75: no mma.sync), so on a V100 or T4 auto dispatched to matmuls without tensor
    cores, where the PyTorch path's cuBLAS has them."""
    if ka.triton is None or ka._interpreting():
        pytest.skip("needs Triton imported for GPUs")
    monkeypatch.delenv(ka.BACKEND_ENV, raising=False)
    gpu = SimpleNamespace(name=name, major=capability[0], minor=capability[1])
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: gpu)
    x = SimpleNamespace(is_cuda=True, device=torch.device("cuda:0"), dtype=torch.float16)  # no GPU here
    if capability < (8, 0):
        why = (f"{name} has compute capability {capability[0]}.{capability[1]}: Triton supports 8.0+ (below, its "
               f"matmuls compile to FMAs, without tensor cores)")
        assert select_backend(x) == ("torch", why)
        with pytest.raises(RuntimeError, match=re.escape(f"backend='triton' requested but {why}")):
            select_backend(x, "triton")
    else:
        assert select_backend(x) == ("triton", "using Triton kernels on cuda")


def test_dispatch_errors_are_clear(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args, _ = _inputs((5,), 16, 4)
    with pytest.raises(RuntimeError, match="backend='triton'"):
        fused_adapter(*args, backend="triton")
    with pytest.raises(ValueError, match="backend='cuda'"):
        fused_adapter(*args, backend="cuda")
    monkeypatch.setenv(ka.BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match=ka.BACKEND_ENV):
        fused_adapter(*args)
    monkeypatch.setenv(ka.BACKEND_ENV, "torch")
    assert select_backend(args[0]) == ("torch", "requested")


def test_a_blank_or_differently_written_backend_variable_is_read_as_meant(monkeypatch):
    """VLSCALE_ADAPTER_BACKEND set but empty (``VLSCALE_ADAPTER_BACKEND= python ...``) is auto, and a value is read
    without its surrounding blanks and case."""
    for value, expected in (("", "auto"), ("  ", "auto"), (" Torch ", "torch"), ("TRITON", "triton")):
        monkeypatch.setenv(ka.BACKEND_ENV, value)
        assert ka.env_backend() == expected, repr(value)
    monkeypatch.setenv(ka.BACKEND_ENV, "")
    args, _ = _inputs((5,), 16, 4)
    torch.testing.assert_close(fused_adapter(*args), adapter_reference(*args))


def test_input_validation_names_the_argument():
    args, _ = _inputs((5,), 16, 4)
    x, wd, bd, wu, bu = args
    with pytest.raises(ValueError, match="activation='relu'"):
        fused_adapter(*args, activation="relu")
    with pytest.raises(ValueError, match=r"x of shape \(5, 15\) does not end in d_model=16 of w_down \(4, 16\)$"):
        fused_adapter(x[:, :15], wd, bd, wu, bu)  # no word of a transposed w_down: 15 is not its hidden 4 either
    with pytest.raises(ValueError, match=r"x of shape \(\) does not end in d_model=16 of w_down \(4, 16\)$"):
        fused_adapter(x[0, 0], wd, bd, wu, bu)  # a 0-d x has no last axis to compare with hidden either
    with pytest.raises(ValueError, match="w_up has shape"):
        fused_adapter(x, wd, bd, wu.T, bu)
    with pytest.raises(ValueError, match="b_down has shape"):
        fused_adapter(x, wd, bu, wu, bu)
    # a b_up of hidden's size, or of one element, which F.linear would broadcast over d_model without a word
    for b_up in (bd, bu[:1]):
        with pytest.raises(ValueError, match=rf"b_up has shape \({len(b_up)},\), expected \(16,\)"):
            fused_adapter(x, wd, bd, wu, b_up)
    with pytest.raises(ValueError, match="activation='relu'"):  # the helper peft's adapters call directly
        ka.activate(x, "relu")
    with pytest.raises(ValueError, match="w_up has dtype"):
        fused_adapter(x, wd, bd, wu.double(), bu)
    # the biases' dtype and every tensor's device are checked too (F.linear's own errors name no argument)
    with pytest.raises(ValueError, match="b_up has dtype torch.float64 but x has torch.float32"):
        fused_adapter(x, wd, bd, wu, bu.double())
    with pytest.raises(ValueError, match="w_down is on meta but x is on cpu"):
        fused_adapter(x, wd.to("meta"), bd, wu, bu)


def test_wrong_inputs_are_refused_by_both_functions_naming_themselves_and_the_argument():
    """A w_down in (d_model, hidden) says it looks transposed; a numpy x, a None weight or a list bias was an
    AttributeError from inside, an integer x a NotImplementedError from GELU; adapter_reference's errors said
    "fused_adapter"."""
    args, _ = _inputs((5,), 16, 4)
    x, wd, bd, wu, bu = args
    for fn in (adapter_reference, fused_adapter):
        name = fn.__name__
        with pytest.raises(ValueError, match=rf"^{name}: x of shape \(5, 16\) does not end in d_model=4 of w_down "
                                             r"\(16, 4\); w_down looks transposed: nn.Linear layout is \(hidden, "
                                             r"d_model\) = \(4, 16\)$"):
            fn(x, wd.T, bd, wu.T, bu)
        with pytest.raises(TypeError, match=rf"^{name}: x must be a torch.Tensor, got ndarray$"):
            fn(x.numpy(), wd, bd, wu, bu)
        with pytest.raises(TypeError, match=rf"^{name}: w_up must be a torch.Tensor, got NoneType$"):
            fn(x, wd, bd, None, bu)
        with pytest.raises(TypeError, match=rf"^{name}: b_down must be a torch.Tensor or None, got list$"):
            fn(x, wd, bd.tolist(), wu, bu)
        with pytest.raises(ValueError, match=rf"^{name}: x has dtype torch.int64; the adapter computes in floating"):
            fn(*(t.long() for t in args))


# ------------------------------------------------------------------------------- Triton interpreter
def test_triton_kernels_under_interpreter_match_fp64(triton_interpreter):
    # 2 shapes x 2 activations x with/without bias x 6 configs: multi-block grids, hidden split
    # across programs, several row groups in the fused backward, masked rows/columns, the one-pass
    # and two-kernel paths, the cuBLAS weight-gradient variants; and the one-pass kernels' own tiles on
    # one shape and a hidden of 300, wider than they take (tests/unit/triton_interpreter_checks.py: kernel_cases).
    results = triton_interpreter["kernels"]
    assert len(results) == 56
    for r in results:
        assert r["dtype"] == "torch.float32"
        assert len(r["errs"]) == (6 if r["case"][4] else 4)
        for err, scale in zip(r["errs"], r["scale"]):
            assert err <= 1e-5 * max(1.0, scale), r


def test_triton_backward_runs_the_kernels_its_config_names(triton_interpreter):
    """The values above match whichever way the gradients are computed: each case's first-order backward also
    runs the kernels (not the differentiable PyTorch backward), and the ones its KernelConfig names: by default the
    two-kernel forward, the dz kernel and the dx kernel with cuBLAS weight gradients, or with bwd_fused=True the fused
    backward kernel (dW_d in it too unless bwd_fuse_dwd=False); with fwd_rows=bwd_rows=True the one-pass forward and
    the one-pass dz + dx kernel (with bwd_fused=True the fused kernel then computes the weight gradients only), but
    the two-kernel path for a hidden wider than ROWS_MAX_HIDDEN; each with the case's tiles."""
    rows, two = ["rows_fwd", "rows_bwd"], ["down_fwd", "up_fwd", "down_bwd"]
    expected = {"default": two + ["up_dx"], "rows": rows, "small_rows": rows, "small_rows_wgrad": rows + ["wgrad_dwd"],
                "small_unfused": two + ["up_dx"], "small_fused": two + ["up_bwd_dwd"],
                "small_cublas_dwd": two + ["up_bwd"]}
    results = triton_interpreter["kernels"]
    assert {r["case"][5] for r in results} == set(expected)
    for r in results:
        wide = r["case"][2] > ka.ROWS_MAX_HIDDEN
        assert r["launches"] == sorted(two + ["up_dx"] if wide else expected[r["case"][5]]), r["case"]
        assert r["tiles_as_configured"], r["case"]  # the small tiles' multi-block grids ran as configured


def test_triton_dispatch_logs_its_reason_once_under_interpreter(triton_interpreter):
    # the 32 fused_adapter calls above, the process's first: one line, saying where the kernels run
    assert triton_interpreter["kernel_log"] == ["fused_adapter: using Triton kernels on the Triton interpreter"]


# ------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
@pytest.mark.parametrize("bias", [True, False])
def test_triton_cuda_two_x_rule(dtype, activation, bias):
    pytest.importorskip("triton")
    args, dh = _inputs((3, 333), 256, 40, bias=bias, device="cuda")
    exact = _run(adapter_reference, [a.double() if a is not None else None for a in args], dh.double(),
                 activation=activation)
    lp = [a.to(dtype) if a is not None else None for a in args]
    assert select_backend(lp[0])[0] == "triton"
    ref_lp = _run(adapter_reference, lp, dh.to(dtype), activation=activation)
    got = _run(fused_adapter, lp, dh.to(dtype), activation=activation)
    atol = {torch.bfloat16: 1e-5, torch.float16: 1e-6, torch.float32: 1e-5}[dtype]
    for name, e, r, o in zip(NAMES, exact, ref_lp, got):
        if e is None:
            assert o is None, name
            continue
        assert o.dtype == dtype and o.shape == e.shape, name
        assert _max_err(o, e) <= 2 * _max_err(r, e) + atol, (name, _max_err(o, e), _max_err(r, e))
