"""Which scaled_dot_product_attention kernel PyTorch picks on this GPU, and why the others refuse.

    python benchmarks/sdpa_backends.py [--json OUT]

The profiler's tape (vlscale.profiling.analytic._Tape.sdpa) must know what each attention call keeps
for backward, and that depends on the kernel: a fused one (flash, memory-efficient, cuDNN) keeps q, k,
v, the output and row statistics; the math fallback keeps the score matrices, and computes half inputs
in fp32. For each case (the attention calls of T5 and BART in training, with and without dropout,
with a mask that requires grad or not) this prints the kernel the default dispatcher took (from the
output's grad_fn) and the reasons ``torch.backends.cuda.can_use_*(params, debug=True)`` gives for the
kernels it did not take. Needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

import torch

B, H, D = 32, 12, 64
# (name, Lq, Lk, mask shape or None) with the masks transformers builds (T5: the position bias plus the
# padding mask, (B, H, Lq, Lk); the decoder's self-attention bias, broadcast over the batch; BART: padding)
CASES = [
    ("t5 encoder self", 96, 96, (B, H, 96, 96)),
    ("t5 decoder self", 32, 32, (1, H, 32, 32)),
    ("t5 cross", 32, 96, (B, H, 32, 96)),
    ("t5 encoder self, L=128", 128, 128, (B, H, 128, 128)),
    ("t5 decoder self, batch mask", 32, 32, (B, H, 32, 32)),
    ("bart encoder self (padding mask)", 96, 96, (B, 1, 96, 96)),
    ("bart cross (padding mask)", 32, 96, (B, 1, 32, 96)),
    ("no mask", 96, 96, None),
]


def probe(lq: int, lk: int, mask_shape, dropout: float, mask_grad: bool, dtype) -> dict:
    dev = "cuda"
    q = torch.randn(B, H, lq, D, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(B, H, lk, D, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(B, H, lk, D, device=dev, dtype=dtype, requires_grad=True)
    mask = None
    if mask_shape is not None:
        mask = torch.randn(*mask_shape, device=dev, dtype=dtype).requires_grad_(mask_grad)
    reasons = {}
    params = torch.backends.cuda.SDPAParams(q, k, v, mask, dropout, False, False)
    for name, fn in (("flash", torch.backends.cuda.can_use_flash_attention),
                     ("efficient", torch.backends.cuda.can_use_efficient_attention),
                     ("cudnn", getattr(torch.backends.cuda, "can_use_cudnn_attention", None))):
        if fn is None:
            reasons[name] = "no can_use function in this torch"
            continue
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ok = fn(params, True)
            reasons[name] = "ok" if ok else " | ".join(str(w.message) for w in caught)[:400]
        except Exception as e:  # noqa: BLE001 - recorded
            reasons[name] = f"error: {type(e).__name__}: {e}"[:300]
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=1.0)
    node = out.grad_fn
    names = []
    while node is not None and len(names) < 4:  # the math path ends in a view/bmm chain
        names.append(node.name())
        node = node.next_functions[0][0] if node.next_functions else None
    return {"grad_fn": names, "reasons": reasons}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "cudnn": torch.backends.cudnn.version(), "cases": []}
    for name, lq, lk, mask_shape in CASES:
        for dropout in (0.1, 0.0):
            for mask_grad in ((False, True) if mask_shape is not None else (False,)):
                try:
                    r = probe(lq, lk, mask_shape, dropout, mask_grad, torch.bfloat16)
                except Exception as e:  # noqa: BLE001 - recorded, the other cases still run
                    r = {"grad_fn": [f"error: {type(e).__name__}: {e}"[:300]], "reasons": {}}
                res["cases"].append({"case": name, "lq": lq, "lk": lk, "mask": mask_shape, "dropout": dropout,
                                     "mask_requires_grad": mask_grad, **r})
                print(f"{name:34s} drop={dropout} mask_grad={mask_grad!s:5s} -> {r['grad_fn'][0]}", flush=True)
    text = json.dumps(res, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
