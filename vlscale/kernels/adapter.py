"""Fused bottleneck adapter: reference, Triton kernels and autograd Functions in one file.

The bottleneck adapter of VL-Adapter (Sung, Cho, Bansal, CVPR 2022; Houlsby et al. 2019) is

    z = x W_d^T + b_d          (tokens x hidden, hidden = d_model / reduction_factor)
    h = x + act(z) W_u^T + b_u (tokens x d_model, residual add)

with weights in ``nn.Linear`` layout (``w_down``: (hidden, d_model), ``w_up``: (d_model, hidden)) and
``act`` the exact-erf GELU (``"gelu"``) or T5's tanh GELU (``"gelu_tanh"``, HF ``gelu_new``).
Backward, with dh the incoming gradient and act' the activation's derivative:

    dz   = (dh W_u) * act'(z)     dx   = dh + dz W_d
    dW_u = dh^T act(z)            db_u = sum_tokens dh
    dW_d = dz^T x                 db_d = sum_tokens dz

Both fused paths save only x (the caller's tensor, also when it is a strided view), z and the
weights for backward and recompute act(z) and act'(z) from z there; the plain autograd graph of
:func:`adapter_reference` also keeps act(z).

* Triton path (CUDA with Triton, or CPU tensors under ``TRITON_INTERPRET=1``). With
  ``KernelConfig(fwd_rows=True, bwd_rows=True)`` (opt-in until their speed is measured on a GPU:
  benchmarks/gpu_kernels_section.py's sweep) two one-pass kernels, one program per block of rows holding
  the whole hidden width (up to ``ROWS_MAX_HIDDEN``): ``_rows_kernel`` computes z = x W_d^T + b_d
  (stored: the only saved activation), act(z) in registers, and h = x + act(z) W_u^T + b_u column block
  by column block, x's rows read a second time while still in L2; ``_rows_kernel`` computes dz = (dh
  W_u) * act'(z) with act(z), act'(z) recomputed from z, then dx = dh + dz W_d the same way, with
  per-block column sums of dz and dh for the bias gradients. The weight gradients dW_u = dh^T act(z),
  dW_d = dz^T x are cuBLAS matmuls, or with ``KernelConfig(bwd_fused=True)`` ``_up_bwd_kernel`` (one
  program per (columns, row group), dh and x read once there). By default (and for wider adapters) two
  kernels each way: ``_down_kernel`` (one program per (rows, hidden slice) tile, reduction over d_model;
  forward z with bias + activation in its epilogue, storing act(z); backward dz with act recomputed from
  z) and ``_up_kernel`` (one program per output tile, reduction over hidden: h = x + act(z) W_u^T + b_u,
  or dx = dh + dz W_d, residual and bias in the epilogue). No d_model-wide intermediate is materialised;
  partial sums are added deterministically afterwards (no atomics). Accumulation is fp32 inside the
  kernels for fp32, bf16 and fp16 inputs.
* PyTorch path (CPU, a GPU below compute capability 8.0, or Triton unavailable): an autograd Function with the
  same saving scheme.

Both Functions return (h, z) and save in ``setup_context``, so torch.func transforms them (grad, vmap,
jacrev, functional_call + grad; not forward mode, jvp / jacfwd / hessian: a ``jvp`` staticmethod, tried,
makes torch.compile refuse the Function, "Unsupported custom jvp", a graph break at every adapter site;
``peft.fused=false`` runs the plain graph, which has them all): the PyTorch Function through ``generate_vmap_rule``, the Triton one
through a ``vmap`` rule (a batched x is more tokens for the kernels; weight sets per sample run the PyTorch
Function). Under ``create_graph=True`` (double backward, gradient penalties, torch.func.grad) backward
runs in differentiable torch ops that reach x and the weights through z, the Function's own output, so
higher-order gradients are exact.
Under ``torch.autocast`` to a dtype other than x's, ``fused_adapter`` runs the reference graph
(autocast's casts, the residual add in x's dtype), logged once; ``backend="triton"`` is refused there.

:func:`fused_adapter` dispatches (``backend="auto"|"triton"|"torch"``, or the environment variable
``VLSCALE_ADAPTER_BACKEND`` for ``auto``) and logs its choice and the reason once.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

ACTIVATIONS = ("gelu", "gelu_tanh")
BACKENDS = ("auto", "triton", "torch")
BACKEND_ENV = "VLSCALE_ADAPTER_BACKEND"

try:  # Triton is optional (setup.py extra "kernels").
    import triton
    import triton.language as tl

    TRITON_IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # noqa: BLE001 - any import failure means "no Triton", with the reason logged
    triton = None
    tl = None
    TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------
def _gelu_approximate(activation: str) -> str:
    """``approximate`` of torch's GELU ops (``F.gelu``, ``aten.gelu_backward``) for an activation name."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not supported; choose one of {list(ACTIVATIONS)}")
    return "tanh" if activation == "gelu_tanh" else "none"


def activate(z: torch.Tensor, activation: str) -> torch.Tensor:
    """The adapter's activation by name (``ACTIVATIONS``), through torch's GELU kernels."""
    return F.gelu(z, approximate=_gelu_approximate(activation))


def adapter_reference(x, w_down, b_down, w_up, b_up, activation: str = "gelu") -> torch.Tensor:
    """Plain PyTorch bottleneck adapter: ``x + up(act(down(x)))`` with nn.Linear-layout weights."""
    _check_inputs(x, w_down, b_down, w_up, b_up, activation, "adapter_reference")
    return x + F.linear(activate(F.linear(x, w_down, b_down), activation), w_up, b_up)


def _check_inputs(x, w_down, b_down, w_up, b_up, activation, who: str = "fused_adapter") -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"{who}: activation={activation!r} is not supported; "
                         f"choose one of {list(ACTIVATIONS)}")
    named = (("x", x), ("w_down", w_down), ("b_down", b_down), ("w_up", w_up), ("b_up", b_up))
    for name, t in named:  # a numpy array, a list, or None for a weight: an AttributeError from inside
        if not isinstance(t, torch.Tensor) and not (t is None and name.startswith("b_")):
            raise TypeError(f"{who}: {name} must be a torch.Tensor{' or None' if name.startswith('b_') else ''}, "
                            f"got {type(t).__name__}")
    if w_down.dim() != 2 or w_up.dim() != 2:
        raise ValueError(f"{who}: w_down {tuple(w_down.shape)} and w_up {tuple(w_up.shape)} must be "
                         "2-D (nn.Linear layout: w_down (hidden, d_model), w_up (d_model, hidden))")
    hidden, d_model = w_down.shape
    if x.dim() < 1 or x.shape[-1] != d_model:
        flipped = x.dim() >= 1 and x.shape[-1] == hidden
        raise ValueError(f"{who}: x of shape {tuple(x.shape)} does not end in d_model={d_model} "
                         f"of w_down {tuple(w_down.shape)}" + (f"; w_down looks transposed: nn.Linear layout is "
                         f"(hidden, d_model) = {(d_model, hidden)}" if flipped else ""))
    if tuple(w_up.shape) != (d_model, hidden):
        raise ValueError(f"{who}: w_up has shape {tuple(w_up.shape)}, expected (d_model, hidden) = "
                         f"{(d_model, hidden)} to match w_down {tuple(w_down.shape)}")
    for name, b, n in (("b_down", b_down, hidden), ("b_up", b_up, d_model)):
        if b is not None and tuple(b.shape) != (n,):
            raise ValueError(f"{who}: {name} has shape {tuple(b.shape)}, expected ({n},)")
    for name, t in named[1:]:
        if t is None:
            continue
        if t.device != x.device:
            raise ValueError(f"{who}: {name} is on {t.device} but x is on {x.device}")
        if t.dtype != x.dtype:
            raise ValueError(f"{who}: {name} has dtype {t.dtype} but x has {x.dtype}; "
                             "cast the adapter weights to the activation dtype")
    if not x.is_floating_point():
        raise ValueError(f"{who}: x has dtype {x.dtype}; the adapter computes in floating point")


# --------------------------------------------------------------------------------------------
# PyTorch recompute path
# --------------------------------------------------------------------------------------------
def _save_for_backward(ctx, inputs, output) -> None:
    """``setup_context`` of both Functions: x (as given), z and the weights; z is the second output
    (``setup_context`` sees only inputs and outputs, which is what lets torch.func transform them)."""
    x, w_down, b_down, w_up, b_up, activation = inputs[:6]
    ctx.activation = activation
    ctx.has_b = (b_down is not None, b_up is not None)
    ctx.set_materialize_grads(False)  # z's gradient is None unless a double backward differentiates through z
    ctx.save_for_backward(x, output[1], w_down, w_up)  # all inputs but z: no extra memory


def _backward(ctx, dh, dz_out):
    """Gradients of (x, w_down, b_down, w_up, b_up) from those of h (``dh``) and z (``dz_out``), either
    may be None, in differentiable torch ops: act(z) and act'(z) are recomputed from the saved z, and under
    ``create_graph=True`` (double backward, torch.func.grad) they differentiate through z, the Function's
    own output, so higher-order gradients are exact."""
    if dh is None and dz_out is None:
        return None, None, None, None, None
    x, z, w_down, w_up = ctx.saved_tensors
    x2d = x.reshape(-1, x.shape[-1])
    need_x, need_wd, need_bd, need_wu, need_bu = ctx.needs_input_grad[:5]
    dz = dz_out
    if dh is not None:
        # dz = (dh W_u) * act'(z), in torch's own GELU kernel (half precision computed in fp32 inside it,
        # as the Triton epilogues do)
        dz_h = torch.ops.aten.gelu_backward(torch.mm(dh, w_up), z, approximate=_gelu_approximate(ctx.activation))
        dz = dz_h if dz is None else dz_h + dz
    dx = dwd = dbd = dwu = dbu = None
    if need_x:
        dx = dh if dz is None else torch.mm(dz, w_down) if dh is None else torch.addmm(dh, dz, w_down)
        dx = dx.reshape(x.shape)
    if dz is not None:
        dwd = torch.mm(dz.t(), x2d) if need_wd else None
        dbd = dz.sum(0) if need_bd and ctx.has_b[0] else None
    if dh is not None:
        dwu = torch.mm(dh.t(), activate(z, ctx.activation)) if need_wu else None
        dbu = dh.sum(0) if need_bu and ctx.has_b[1] else None
    return dx, dwd, dbd, dwu, dbu


class _TorchAdapterFn(torch.autograd.Function):
    """Saves x, z and the weights; recomputes act(z) and act'(z) in backward. Takes x of any shape
    (..., d_model) and layout and saves that tensor itself: a contiguous or 2-D copy of it saved
    instead would be a d_model-wide activation of its own. Returns (h, z) as (tokens, d_model),
    (tokens, hidden). torch.func transforms it (vmap through ``generate_vmap_rule``)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, w_down, b_down, w_up, b_up, activation):
        x2d = x.reshape(-1, x.shape[-1])
        z = F.linear(x2d, w_down, b_down)
        h = F.linear(activate(z, activation), w_up, b_up)
        h += x2d
        return h, z

    setup_context = staticmethod(_save_for_backward)

    @staticmethod
    def backward(ctx, dh, dz):
        return *_backward(ctx, dh, dz), None


# --------------------------------------------------------------------------------------------
# Triton path
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes of the kernels (hidden is padded to a power of two >= 16). Keyword use advised.

    ``down_*``: ``_down_kernel``, one program per (rows, hidden slice of <= down_block_h) tile,
    reduction over d_model. ``up_*``: ``_up_kernel``, one program per (rows, columns) output tile,
    reduction over hidden. The weight gradients are cuBLAS matmuls unless ``bwd_fused``: then
    ``_up_bwd_kernel`` (``bwd_*`` tiles, one program per (columns, row group), about ``bwd_programs``
    in all) computes dW_u, db_u, with ``bwd_fuse_dwd`` dW_d, and dx unless ``bwd_rows`` made it.
    On an H200 (bf16, 16k x 1024) the fused variant with dx measured no faster than cuBLAS at hidden 64
    and slower at 128, and needs too much shared memory at 256, so it is off by default.

    ``rows_*``: the one-pass kernels, one program per ``rows_block_m`` rows holding the whole hidden
    width (up to :data:`ROWS_MAX_HIDDEN`; wider adapters take the two-kernel path); off by default until
    measured on a GPU (interpreter-verified only). ``fwd_rows``:
    ``_rows_kernel`` instead of ``_down_kernel`` + ``_up_kernel`` (act(z) written and read back,
    x read twice from DRAM). ``bwd_rows``: ``_rows_kernel`` computes dz and then dx from the same
    rows instead of ``_down_kernel`` + ``_up_kernel``; with ``bwd_fused`` too, ``_up_bwd_kernel``
    then computes only the weight and bias gradients.
    """

    down_block_m: int = 64
    down_block_k: int = 64
    down_block_h: int = 128
    down_warps: int = 4
    down_stages: int = 4
    up_block_m: int = 128
    up_block_n: int = 64
    up_block_k: int = 64
    up_warps: int = 4
    up_stages: int = 3
    bwd_fused: bool = False
    bwd_fuse_dwd: bool = True
    bwd_block_m: int = 64
    bwd_block_n: int = 64
    bwd_programs: int = 256
    bwd_warps: int = 8
    bwd_stages: int = 3
    fwd_rows: bool = False
    bwd_rows: bool = False
    rows_block_m: int = 32
    rows_block_k: int = 64
    rows_block_n: int = 64
    rows_warps: int = 4
    rows_stages: int = 3


ROWS_MAX_HIDDEN = 256  # the one-pass kernels keep (rows_block_m x hidden) fp32 accumulators in registers


def default_config(d_model: int, hidden: int, dtype: torch.dtype) -> KernelConfig:
    """Fixed tiles per dtype (no autotuning, so compile time stays short). The 16-bit tiles were
    picked from a sweep on an H200 at 16384 tokens x d_model 1024 x hidden 64..256."""
    if dtype == torch.float32:
        return KernelConfig(down_block_m=32, down_block_k=32, down_block_h=64, down_stages=2, up_block_m=32,
                            up_block_n=64, up_block_k=32, up_stages=2, bwd_block_m=32, bwd_block_n=32,
                            bwd_stages=2, rows_block_m=16, rows_block_k=32, rows_block_n=32, rows_stages=2)
    return KernelConfig()


if triton is not None:

    @triton.jit
    def _act_fwd(z, ACTIVATION: tl.constexpr):
        if ACTIVATION == 0:
            return z * (0.5 * (1.0 + tl.erf(z * 0.7071067811865476)))
        else:
            u2 = 1.5957691216057308 * (z + 0.044715 * z * z * z)
            return z * tl.sigmoid(u2)

    @triton.jit
    def _act_grad(z, ACTIVATION: tl.constexpr):
        if ACTIVATION == 0:
            cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
            pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
            return z * cdf, cdf + z * pdf
        else:
            u2 = 1.5957691216057308 * (z + 0.044715 * z * z * z)
            s = tl.sigmoid(u2)
            du2 = 1.5957691216057308 * (1.0 + 0.134145 * z * z)
            return z * s, s + z * s * (1.0 - s) * du2

    @triton.jit
    def _rows_matmul(A, B, rm64, mask_m, rh, mask_h, D, stride_bd, stride_bh, IEEE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
        """fp32 (BLOCK_M, BLOCK_H) tile of A @ B: rows rm of A (M x D, row-major), columns rh of B (D x H, strided)."""
        acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            mask_k = kk < D
            a = tl.load(A + rm64[:, None] * D + kk[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(B + kk[:, None] * stride_bd + rh[None, :] * stride_bh,
                        mask=mask_k[:, None] & mask_h[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        return acc

    @triton.jit
    def _low_rank_epilogue(acc, BIAS, Z, ACT, DZ, PSUM, row_block, rm64, mask_m, rh, mask_h, H,
                           ACTIVATION: tl.constexpr, BACKWARD: tl.constexpr, HAS_BIAS: tl.constexpr,
                           STORE_ACT: tl.constexpr):
        """The down-projection's epilogue on its fp32 tile ``acc``; returns the low-rank tile in the input dtype.

        Forward: Z = acc + b_d, stored rounded to the input dtype (as F.linear's output would be); returns act(Z),
        also stored in ACT with STORE_ACT. Backward (acc = dh W_u): returns dz = acc * act'(z) from the stored Z,
        stored in DZ with act(z) in ACT, and its column sums in PSUM[row_block]."""
        dtype = ACT.dtype.element_ty
        zmask = mask_m[:, None] & mask_h[None, :]
        zoffs = rm64[:, None] * H + rh[None, :]
        if BACKWARD:
            act, dact = _act_grad(tl.load(Z + zoffs, mask=zmask, other=0.0).to(tl.float32), ACTIVATION)
            dz = tl.where(zmask, acc * dact, 0.0)
            tl.store(ACT + zoffs, act.to(dtype), mask=zmask)
            tl.store(PSUM + row_block * H + rh, tl.sum(dz, axis=0), mask=mask_h)
            e = dz.to(dtype)
            tl.store(DZ + zoffs, e, mask=zmask)
        else:
            if HAS_BIAS:
                acc += tl.load(BIAS + rh, mask=mask_h, other=0.0).to(tl.float32)[None, :]
            z = acc.to(dtype)
            tl.store(Z + zoffs, z, mask=zmask)
            e = _act_fwd(z.to(tl.float32), ACTIVATION).to(dtype)
            if STORE_ACT:
                tl.store(ACT + zoffs, e, mask=zmask)
        return e

    @triton.jit
    def _down_kernel(
        A, B, BIAS, Z, ACT, DZ, PSUM, M, D, H, stride_bd, stride_bh,
        ACTIVATION: tl.constexpr, BACKWARD: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """Tile (rows, hidden slice) of P = A @ B (A: M x D row-major, B: D x H strided), low-rank epilogue.

        Forward (A=x, B=W_d^T): Z = P + b_d (rounded to the input dtype), ACT = act(Z).
        Backward (A=dh, B=W_u): DZ = P * act'(Z), ACT = act(Z), PSUM[row block, h] = column sums of DZ.
        """
        pid = tl.program_id(0)
        num_h = tl.cdiv(H, BLOCK_H)
        pid_m = pid // num_h
        pid_h = pid % num_h
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = rm < M
        rm64 = rm.to(tl.int64)
        rh = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
        mask_h = rh < H
        acc = _rows_matmul(A, B, rm64, mask_m, rh, mask_h, D, stride_bd, stride_bh, IEEE, BLOCK_M, BLOCK_H, BLOCK_K)
        _low_rank_epilogue(acc, BIAS, Z, ACT, DZ, PSUM, pid_m, rm64, mask_m, rh, mask_h, H, ACTIVATION, BACKWARD,
                           HAS_BIAS, True)

    @triton.jit
    def _up_kernel(
        E, W, BIAS, RES, OUT, PSUM, M, D, H, stride_wh, stride_wd,
        HAS_BIAS: tl.constexpr, WRITE_PSUM: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """Tile of OUT = RES + E @ W (+ bias): E (M x H) low-rank, W (H x D) strided, RES/OUT (M x D).

        Forward: E = act(z), W = W_u^T, RES = x. Backward (unfused variant): E = dz, W = W_d,
        RES = dh, and PSUM[row block, cols] = column sums of dh (for db_u).
        """
        pid = tl.program_id(0)
        num_n = tl.cdiv(D, BLOCK_N)
        pid_m = pid // num_n
        pid_n = pid % num_n
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = rm < M
        mask_n = rn < D
        rm64 = rm.to(tl.int64)
        omask = mask_m[:, None] & mask_n[None, :]
        offs = rm64[:, None] * D + rn[None, :]
        res = tl.load(RES + offs, mask=omask, other=0.0)  # issued before the GEMM to overlap it
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            kk = k0 + rk
            mask_k = kk < H
            e = tl.load(E + rm64[:, None] * H + kk[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(W + kk[:, None] * stride_wh + rn[None, :] * stride_wd,
                        mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(e, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(e, w, acc)
        res = res.to(tl.float32)
        acc += res
        if HAS_BIAS:
            acc += tl.load(BIAS + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=omask)
        if WRITE_PSUM:
            tl.store(PSUM + pid_m * D + rn, tl.sum(res, axis=0), mask=mask_n)

    @triton.jit
    def _up_bwd_kernel(
        DZ, ACT, WD, DH, X, DX, PWU, PWD, PBU, M, D, H, rows_per_group,
        WRITE_DX: tl.constexpr, FUSE_DWD: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        """Backward over (columns, row group): dx = dh + dz W_d for its tiles (WRITE_DX), and the group's
        partial weight gradients, so dh (and x) are read from DRAM once here:
        PWU[g, cols, :] = dh^T act(z), PBU[g, cols] = sum dh, PWD[g, :, cols] = dz^T x (FUSE_DWD).
        """
        pid_n = tl.program_id(0)
        pid_g = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = rn < D
        rh = tl.arange(0, BLOCK_H)
        mask_h = rh < H
        if WRITE_DX:
            w = tl.load(WD + rh[:, None] * D + rn[None, :], mask=mask_h[:, None] & mask_n[None, :], other=0.0)
        acc_wu = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
        acc_wd = tl.zeros((BLOCK_H, BLOCK_N), dtype=tl.float32)
        acc_bu = tl.zeros((BLOCK_N,), dtype=tl.float32)
        row_start = pid_g * rows_per_group
        row_end = tl.minimum(row_start + rows_per_group, M)
        for m0 in range(row_start, row_end, BLOCK_M):
            rm = m0 + tl.arange(0, BLOCK_M)
            mask_m = rm < row_end
            rm64 = rm.to(tl.int64)
            lmask = mask_m[:, None] & mask_h[None, :]
            omask = mask_m[:, None] & mask_n[None, :]
            offs = rm64[:, None] * D + rn[None, :]
            dh = tl.load(DH + offs, mask=omask, other=0.0)
            dz = tl.load(DZ + rm64[:, None] * H + rh[None, :], mask=lmask, other=0.0)
            act = tl.load(ACT + rm64[:, None] * H + rh[None, :], mask=lmask, other=0.0)
            if IEEE:
                acc_wu = tl.dot(tl.trans(dh), act, acc_wu, input_precision="ieee")
            else:
                acc_wu = tl.dot(tl.trans(dh), act, acc_wu)
            if WRITE_DX:
                if IEEE:
                    dx = tl.dot(dz, w, dh.to(tl.float32), input_precision="ieee")
                else:
                    dx = tl.dot(dz, w, dh.to(tl.float32))
                tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=omask)
            acc_bu += tl.sum(dh.to(tl.float32), axis=0)
            if FUSE_DWD:
                x = tl.load(X + offs, mask=omask, other=0.0)
                if IEEE:
                    acc_wd = tl.dot(tl.trans(dz), x, acc_wd, input_precision="ieee")
                else:
                    acc_wd = tl.dot(tl.trans(dz), x, acc_wd)
        base = pid_g.to(tl.int64) * D * H
        tl.store(PWU + base + rn[:, None] * H + rh[None, :], acc_wu, mask=mask_n[:, None] & mask_h[None, :])
        tl.store(PBU + pid_g * D + rn, acc_bu, mask=mask_n)
        if FUSE_DWD:
            tl.store(PWD + base + rh[:, None] * D + rn[None, :], acc_wd, mask=mask_h[:, None] & mask_n[None, :])

    @triton.jit
    def _rows_kernel(
        A, W1, B1, Z, ACT, DZ, W2, B2, OUT, PSUM_DZ, PSUM_A, M, D, H, stride_w1_d, stride_w1_h, stride_w2_h,
        stride_w2_d, ACTIVATION: tl.constexpr, BACKWARD: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
        IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """The adapter over BLOCK_M rows in one program, the whole hidden width in it. A, OUT: M x D row-major;
        W1: D x H, W2: H x D, both strided.

        Forward (A = x, W1 = W_d^T, W2 = W_u^T): Z = A W1 + b_d, rounded to the input dtype; e = act(Z).
        Backward (A = dh, W1 = W_u, W2 = W_d): DZ = (A W1) * act'(z), stored with ACT = act(z) (for the weight
        gradients) and its column sums in PSUM_DZ[pid]; e = DZ.
        Then OUT = A + e W2 (+ b_u) column block by column block, A's rows read again (from L2: this program read
        them a moment ago), and backward their column sums into PSUM_A[pid] (for db_u). e never leaves the program.
        """
        pid = tl.program_id(0)
        rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = rm < M
        rm64 = rm.to(tl.int64)
        rh = tl.arange(0, BLOCK_H)
        mask_h = rh < H
        dtype = OUT.dtype.element_ty
        acc = _rows_matmul(A, W1, rm64, mask_m, rh, mask_h, D, stride_w1_d, stride_w1_h, IEEE, BLOCK_M, BLOCK_H,
                           BLOCK_K)
        e = _low_rank_epilogue(acc, B1, Z, ACT, DZ, PSUM_DZ, pid, rm64, mask_m, rh, mask_h, H, ACTIVATION, BACKWARD,
                               HAS_B1, False)
        for n0 in range(0, D, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            mask_n = rn < D
            omask = mask_m[:, None] & mask_n[None, :]
            offs = rm64[:, None] * D + rn[None, :]
            w = tl.load(W2 + rh[:, None] * stride_w2_h + rn[None, :] * stride_w2_d,
                        mask=mask_h[:, None] & mask_n[None, :], other=0.0)
            out = tl.load(A + offs, mask=omask, other=0.0).to(tl.float32)
            if BACKWARD:
                tl.store(PSUM_A + pid * D + rn, tl.sum(out, axis=0), mask=mask_n)
            if IEEE:
                out = tl.dot(e, w, out, input_precision="ieee")
            else:
                out = tl.dot(e, w, out)
            if HAS_B2:
                out += tl.load(B2 + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            tl.store(OUT + offs, out.to(dtype), mask=omask)

def _use_ieee(a: torch.Tensor) -> bool:
    return a.dtype == torch.float32 and not (a.is_cuda and torch.backends.cuda.matmul.allow_tf32)


def _launch_down(a, b, bias, z, activation, backward, cfg):
    """Forward: returns (z, act). Backward (``z`` given): returns (dz, act, column sums of dz)."""
    M, D = a.shape
    H = b.shape[1]
    act = torch.empty((M, H), device=a.device, dtype=a.dtype)
    block_h = min(max(16, triton.next_power_of_2(H)), cfg.down_block_h)
    n_m = triton.cdiv(M, cfg.down_block_m)
    if backward:
        dz = torch.empty_like(act)
        psum = torch.empty((n_m, H), device=a.device, dtype=torch.float32)
    else:
        z = torch.empty_like(act)
        dz = psum = act  # unused
    _down_kernel[(n_m * triton.cdiv(H, block_h),)](
        a, b, bias if bias is not None else a, z, act, dz, psum, M, D, H, b.stride(0), b.stride(1),
        ACTIVATION=ACTIVATIONS.index(activation), BACKWARD=backward, HAS_BIAS=bias is not None,
        IEEE=_use_ieee(a), BLOCK_M=cfg.down_block_m, BLOCK_H=block_h,
        BLOCK_K=cfg.down_block_k, num_warps=cfg.down_warps, num_stages=cfg.down_stages)
    return (dz, act, psum) if backward else (z, act)


def _launch_up(e, w, bias, res, write_psum, cfg):
    """OUT = res + e @ w (+ bias); with ``write_psum`` also per-row-block column sums of res."""
    M, D = res.shape
    H = e.shape[1]
    out = torch.empty_like(res)
    n_m, n_n = triton.cdiv(M, cfg.up_block_m), triton.cdiv(D, cfg.up_block_n)
    psum = torch.empty((n_m, D), device=res.device, dtype=torch.float32) if write_psum else out
    _up_kernel[(n_m * n_n,)](
        e, w, bias if bias is not None else res, res, out, psum, M, D, H, w.stride(0), w.stride(1),
        HAS_BIAS=bias is not None, WRITE_PSUM=write_psum, IEEE=_use_ieee(res),
        BLOCK_M=cfg.up_block_m, BLOCK_N=cfg.up_block_n,
        BLOCK_K=min(cfg.up_block_k, max(16, triton.next_power_of_2(H))),
        num_warps=cfg.up_warps, num_stages=cfg.up_stages)
    return (out, psum) if write_psum else out


def _launch_up_bwd(dz, act, w_down, dh, x2d, write_dx, cfg):
    """dx (``None`` unless ``write_dx``), and the partial dW_u, db_u, dW_d (``None`` unless ``cfg.bwd_fuse_dwd``)
    summed over groups."""
    M, D = dh.shape
    H = dz.shape[1]
    n_n = triton.cdiv(D, cfg.bwd_block_n)
    blocks = triton.cdiv(M, cfg.bwd_block_m)
    groups = max(1, min(blocks, cfg.bwd_programs // n_n))
    rows = triton.cdiv(blocks, groups) * cfg.bwd_block_m
    groups = triton.cdiv(M, rows)
    dx = torch.empty_like(dh) if write_dx else None
    pwu = torch.empty((groups, D, H), device=dh.device, dtype=torch.float32)
    pbu = torch.empty((groups, D), device=dh.device, dtype=torch.float32)
    pwd = torch.empty((groups, H, D), device=dh.device, dtype=torch.float32) if cfg.bwd_fuse_dwd else pwu
    _up_bwd_kernel[(n_n, groups)](
        dz, act, w_down, dh, x2d, dx if write_dx else dh, pwu, pwd, pbu, M, D, H, rows,
        WRITE_DX=write_dx, FUSE_DWD=cfg.bwd_fuse_dwd, IEEE=_use_ieee(dh), BLOCK_M=cfg.bwd_block_m,
        BLOCK_N=cfg.bwd_block_n, BLOCK_H=max(16, triton.next_power_of_2(H)), num_warps=cfg.bwd_warps,
        num_stages=cfg.bwd_stages)
    return dx, pwu.sum(0), pbu.sum(0), (pwd.sum(0) if cfg.bwd_fuse_dwd else None)


def _rows_hidden_block(hidden: int, cfg: KernelConfig, backward: bool) -> Optional[int]:
    """The one-pass kernels' hidden width (a power of two >= 16) when ``cfg`` asks for them and it fits; else None."""
    wanted = cfg.bwd_rows if backward else cfg.fwd_rows
    block_h = max(16, triton.next_power_of_2(hidden))
    return block_h if wanted and block_h <= ROWS_MAX_HIDDEN else None


def _launch_rows(a, w1, b1, z, w2, b2, activation, backward, block_h, cfg):
    """``_rows_kernel`` over ``block_h`` hidden columns (:func:`_rows_hidden_block`). Forward (a = x,
    w1 = W_d^T, w2 = W_u^T): returns (h, z). Backward (a = dh, w1 = W_u, w2 = W_d, ``z`` given): returns
    (dz, act(z), dx, column sums of dz and of dh per row block)."""
    M, D = a.shape
    H = w1.shape[1]
    n_m = triton.cdiv(M, cfg.rows_block_m)
    out = torch.empty_like(a)
    low = torch.empty((M, H), device=a.device, dtype=a.dtype)  # forward: z; backward: act(z)
    if backward:
        act, dz = low, torch.empty_like(low)
        psum_dz = torch.empty((n_m, H), device=a.device, dtype=torch.float32)
        psum_a = torch.empty((n_m, D), device=a.device, dtype=torch.float32)
    else:
        z = act = dz = low  # act, dz and the column sums are not written forward
        psum_dz = psum_a = out
    _rows_kernel[(n_m,)](
        a, w1, b1 if b1 is not None else a, z, act, dz, w2, b2 if b2 is not None else a, out, psum_dz, psum_a,
        M, D, H, w1.stride(0), w1.stride(1), w2.stride(0), w2.stride(1), ACTIVATION=ACTIVATIONS.index(activation),
        BACKWARD=backward, HAS_B1=b1 is not None, HAS_B2=b2 is not None, IEEE=_use_ieee(a),
        BLOCK_M=cfg.rows_block_m, BLOCK_H=block_h, BLOCK_K=cfg.rows_block_k,
        BLOCK_N=cfg.rows_block_n, num_warps=cfg.rows_warps, num_stages=cfg.rows_stages)
    return (dz, act, out, psum_dz, psum_a) if backward else (out, z)


class _TritonAdapterFn(torch.autograd.Function):
    """Triton forward/backward; saves x (as given, as _TorchAdapterFn), z and the weights (z: tokens x
    hidden, input dtype). Returns (h, z) as (tokens, d_model), (tokens, hidden). Under torch.func a batched
    x alone is more tokens for the kernels (``vmap``); backward under ``create_graph`` (double backward,
    torch.func.grad) runs the PyTorch path's differentiable backward."""

    @staticmethod
    def forward(x, w_down, b_down, w_up, b_up, activation, config):
        x2d = x.reshape(-1, x.shape[-1]).contiguous()  # the kernels read x row-major; a copy is not saved
        cfg = config or default_config(x2d.shape[1], w_down.shape[0], x2d.dtype)
        # the kernels index the biases as contiguous vectors (a strided view would be read wrongly)
        bd = b_down.contiguous() if b_down is not None else None
        bu = b_up.contiguous() if b_up is not None else None
        block_h = _rows_hidden_block(w_down.shape[0], cfg, False)
        if block_h:
            return _launch_rows(x2d, w_down.t(), bd, None, w_up.t(), bu, activation, False, block_h, cfg)
        z, act = _launch_down(x2d, w_down.t(), bd, None, activation, False, cfg)
        h = _launch_up(act, w_up.t(), bu, x2d, False, cfg)
        return h, z

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save_for_backward(ctx, inputs, output)
        x, w_down, config = inputs[0], inputs[1], inputs[6]
        ctx.cfg = config or default_config(x.shape[-1], w_down.shape[0], x.dtype)

    @staticmethod
    def vmap(info, in_dims, x, w_down, b_down, w_up, b_up, activation, config):
        if any(d is not None for d in in_dims[1:5]):  # a weight set per sample: no kernel computes that
            h, z = torch.vmap(_TorchAdapterFn.apply, in_dims=in_dims[:6])(x, w_down, b_down, w_up, b_up, activation)
            return (h, z), (0, 0)
        n = info.batch_size
        h, z = _TritonAdapterFn.apply(x.movedim(in_dims[0], 0), w_down, b_down, w_up, b_up, activation, config)
        return (h.view(n, -1, h.shape[-1]), z.view(n, -1, z.shape[-1])), (0, 0)

    @staticmethod
    def backward(ctx, dh, dz_out):
        if torch.is_grad_enabled() or dz_out is not None:  # a double backward: differentiable, exact
            return *_backward(ctx, dh, dz_out), None, None
        x, z, w_down, w_up = ctx.saved_tensors
        x2d = x.reshape(-1, x.shape[-1])
        need_x, need_wd, need_bd, need_wu, need_bu, _, _ = ctx.needs_input_grad
        cfg, dtype = ctx.cfg, dh.dtype
        dh = dh.contiguous()
        dwd = dx = None
        block_h = _rows_hidden_block(z.shape[1], cfg, True)
        if block_h:  # dz and dx in one kernel
            dz, act, dx, psum_dz, psum_dh = _launch_rows(dh, w_up, None, z, w_down, None, ctx.activation, True, block_h,
                                                         cfg)
            dbu = psum_dh.sum(0).to(dtype)
        else:
            dz, act, psum_dz = _launch_down(dh, w_up, None, z, ctx.activation, True, cfg)
        if cfg.bwd_fused:  # the weight gradients (and dx, unless made above) in one kernel
            dx_made, dwu, dbu, dwd = _launch_up_bwd(dz, act, w_down.contiguous(), dh, x2d.contiguous(), dx is None,
                                                    cfg)
            dx = dx if dx is not None else dx_made
            dwu, dbu = dwu.to(dtype), dbu.to(dtype)
            dwd = dwd.to(dtype) if dwd is not None else None
        else:
            if dx is None:
                dx, psum_dh = _launch_up(dz, w_down, None, dh, True, cfg)
                dbu = psum_dh.sum(0).to(dtype)
            dwu = torch.mm(dh.t(), act) if need_wu else None
        if dwd is None and need_wd:
            dwd = torch.mm(dz.t(), x2d)
        dbd = psum_dz.sum(0).to(dtype) if need_bd and ctx.has_b[0] else None
        return (dx.view(x.shape) if need_x else None, dwd if need_wd else None, dbd, dwu if need_wu else None,
                dbu if need_bu and ctx.has_b[1] else None, None, None)


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------
_LOGGED: set = set()


def _log_once(message: str) -> None:
    """Log ``message`` the first time only; not while torch.compile traces (a logger call there is a graph
    break, kept by the compiled code for every later call)."""
    if message not in _LOGGED and not torch.compiler.is_compiling():
        _LOGGED.add(message)
        logger.info(message)


def _interpreting() -> bool:
    """Whether the kernels run in Triton's interpreter: as ``triton.jit`` built them when this module
    was imported (it reads ``TRITON_INTERPRET`` then, and parses values such as ``false`` or ``off``
    its own way), not as the variable reads now."""
    return triton is not None and type(_down_kernel).__name__ == "InterpretedFunction"


def _autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype torch.autocast would compute x's matmuls in, where that is not x's own; else None."""
    try:
        if not torch.is_autocast_enabled(x.device.type):
            return None
        dtype = torch.get_autocast_dtype(x.device.type)
    except RuntimeError:  # a device type autocast does not know (meta, ...)
        return None
    return dtype if dtype != x.dtype else None


def env_backend() -> str:
    """``VLSCALE_ADAPTER_BACKEND`` (default ``auto``); ValueError naming it when it is none of :data:`BACKENDS`."""
    env = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if env not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={env!r} is not valid; choose one of {list(BACKENDS)}")
    return env


def check_requested_backend(device, dtype: torch.dtype) -> None:
    """``VLSCALE_ADAPTER_BACKEND=triton`` where the kernels cannot run on ``device`` / ``dtype`` (no GPU, bf16 in
    the interpreter, ...): ValueError with the reason, for a run to refuse before it builds its model (it was a
    RuntimeError traceback at the first forward)."""
    problem = _triton_problem(torch.empty(0, device=device, dtype=dtype)) if env_backend() == "triton" else None
    if problem:
        raise ValueError(f"{BACKEND_ENV}=triton, but {problem}; unset it (auto) or set it to torch")


def _triton_problem(x: torch.Tensor) -> Optional[str]:
    """Why the Triton path cannot run on ``x``, or None."""
    problem = None
    if triton is None:
        problem = f"Triton unavailable ({TRITON_IMPORT_ERROR})"
    elif not x.is_cuda and not _interpreting():
        problem = (f"Triton needs CUDA tensors (x is on {x.device}) unless TRITON_INTERPRET=1 is set before "
                   "triton is imported")
    elif x.is_cuda and _interpreting():
        problem = "TRITON_INTERPRET=1 runs kernels on CPU tensors only, but x is on CUDA"
    elif x.is_cuda and (gpu := torch.cuda.get_device_properties(x.device)).major < 8:  # (a constant to dynamo)
        # V100, T4: the kernels compiled for sm70 / sm75 (Triton 3.8, ahead of time) have no mma.sync, only FMAs
        problem = (f"{gpu.name} has compute capability {gpu.major}.{gpu.minor}: Triton supports 8.0+ (below, its "
                   f"matmuls compile to FMAs, without tensor cores)")
    elif x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        problem = f"dtype {x.dtype} is not supported by the kernels (fp32, fp16, bf16)"
    elif _interpreting() and x.dtype == torch.bfloat16:
        problem = "the Triton interpreter computes bf16 wrongly (numpy has no bfloat16); it runs fp32 and fp16"
    elif _autocast_dtype(x) is not None:
        problem = (f"torch.autocast is on for {x.device.type} ({_autocast_dtype(x)}, x is {x.dtype}); the "
                   "kernels compute in the input dtype")
    return problem


def select_backend(x: torch.Tensor, backend: str = "auto") -> tuple[str, str]:
    """Which path ``fused_adapter`` takes for ``x``: ``("triton"|"torch", reason)``.

    ``backend="auto"`` reads ``VLSCALE_ADAPTER_BACKEND`` (auto/triton/torch) first; ``"triton"``
    raises RuntimeError with the reason when the Triton path cannot run on ``x``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"fused_adapter: backend={backend!r} is not valid; choose one of {list(BACKENDS)}")
    if backend == "auto":
        backend = env_backend()
    if backend == "torch":
        return "torch", "requested"
    problem = _triton_problem(x)
    if problem is None:
        where = "the Triton interpreter" if _interpreting() else x.device.type
        return "triton", f"using Triton kernels on {where}"
    if backend == "triton":
        raise RuntimeError(f"fused_adapter: backend='triton' requested but {problem}")
    return "torch", problem


def _on_device_of(x):
    """Triton launches on the current CUDA device, which may be another GPU than ``x``'s: make ``x``'s current
    (nothing for host tensors: Triton's interpreter)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def fused_adapter(x, w_down, b_down, w_up, b_up, activation: str = "gelu", backend: str = "auto",
                  config: Optional[KernelConfig] = None) -> torch.Tensor:
    """``x + up(act(down(x) + b_down)) + b_up`` with recompute-based backward (same result as
    :func:`adapter_reference`). ``config`` overrides the Triton tile sizes (benchmarks, tests)."""
    _check_inputs(x, w_down, b_down, w_up, b_up, activation)
    path, reason = select_backend(x, backend)
    lead, d_model = x.shape[:-1], x.shape[-1]
    if math.prod(lead) == 0:
        return adapter_reference(x, w_down, b_down, w_up, b_up, activation)
    autocast = _autocast_dtype(x)
    if autocast is not None:
        # autocast casts the matmuls' inputs and leaves the residual add in x's dtype: the plain graph
        # does exactly that (the recompute Function would return, and round the residual to, autocast's
        # dtype, and fail in a backward run outside autocast)
        _log_once(f"fused_adapter: using the reference graph, torch.autocast is on ({autocast}, x is {x.dtype})")
        return adapter_reference(x, w_down, b_down, w_up, b_up, activation)
    if path == "triton":
        _log_once(f"fused_adapter: {reason}")
        with _on_device_of(x):
            h, _ = _TritonAdapterFn.apply(x, w_down, b_down, w_up, b_up, activation, config)
    else:
        _log_once(f"fused_adapter: using the PyTorch recompute path ({reason})")
        h, _ = _TorchAdapterFn.apply(x, w_down, b_down, w_up, b_up, activation)
    return h.reshape(*lead, d_model)
