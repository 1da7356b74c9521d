"""Bytes autograd keeps for backward, by the op that keeps them: the real graph against the profiler's tape.

    python benchmarks/saved_by_op.py [--device cuda|cpu] [--json OUT] [overrides ...]

Builds the model as ``vlscale.profiling.measure.measure_torch_bf16`` does (bf16 weights, the config's
worst-case batch), runs one forward and the trainer's loss, then walks the autograd graph from the
loss: every node's saved tensors (``_saved_*`` attributes, and a custom Function's ``saved_tensors``),
each storage counted once, parameters and buffers left out, summed by node name (``MmBackward0``,
``NativeDropoutBackward0``, ...). Beside it, the profiler's prediction of the same saved bytes
(``vlscale.profiling.analytic.activation_report``) for that device. Run on a GPU and on the CPU with the
same overrides, the two tables say which op keeps what on each; the defaults are the GPU suite's
``t5-base adapters`` row (benchmarks/gpu_suite.py's ``profiler`` section), where the allocator's peak
was 15% above the prediction on an H200.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vlscale.config import load_config  # noqa: E402
from vlscale.profiling import analytic  # noqa: E402
from vlscale.profiling.measure import GPU_COMMON, GPU_CONFIGS, _trainer_loss, synthetic_batch  # noqa: E402


def saved_by_node(loss: torch.Tensor, exclude: set[int]) -> tuple[dict, dict, dict]:
    """-> (bytes by node name, node count by name, bytes by (node name, dtype, shape) for the largest)."""
    seen_storage: set[int] = set()
    by_name: dict[str, int] = defaultdict(int)
    count: dict[str, int] = defaultdict(int)
    detail: dict[str, int] = defaultdict(int)
    # nodes are keyed by themselves, not id(): Python wrappers of autograd nodes are made on access, and
    # the id of a freed wrapper is reused by the next one (a walk that kept ids stopped early on a GPU)
    stack, visited = [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        name = node.name()
        count[name] += 1
        tensors = []
        for attr in dir(node):
            if attr.startswith("_saved_"):
                try:
                    v = getattr(node, attr)
                except Exception:  # noqa: BLE001 - a freed or unreadable slot holds nothing alive
                    continue
                tensors += [v] if torch.is_tensor(v) else [t for t in v if torch.is_tensor(t)] \
                    if isinstance(v, (tuple, list)) else []
        if hasattr(node, "saved_tensors"):  # custom autograd Functions
            try:
                tensors += [t for t in node.saved_tensors if torch.is_tensor(t)]
            except Exception:  # noqa: BLE001
                pass
        for t in tensors:
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if st.nbytes() == 0 or ptr in exclude or ptr in seen_storage:
                continue
            seen_storage.add(ptr)
            by_name[name] += st.nbytes()
            detail[f"{name} {str(t.dtype).replace('torch.', '')} {tuple(t.shape)}"] += st.nbytes()
        stack += [f for f, _ in node.next_functions]
    return dict(by_name), dict(count), dict(detail)


def _site() -> str:
    """The innermost frame of the model's code (vlscale, transformers, open_clip) that is running."""
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if any(k in name for k in ("/vlscale/", "/transformers/", "/open_clip/")):
            short = name.split("/site-packages/")[-1].split("/work/main/")[-1]
            return f"{short}:{f.f_lineno} {f.f_code.co_name}"
        f = f.f_back
    return "?"


class SavedBySite:
    """saved_tensors_hooks: each saved storage once, by the code line that saved it."""

    def __init__(self, exclude: set[int]):
        self.exclude, self.seen = exclude, {}
        self.by_site: dict[str, int] = defaultdict(int)

    def pack(self, t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if st.nbytes() and ptr not in self.exclude and ptr not in self.seen:
            self.seen[ptr] = st  # kept alive: the pointer stays this storage's
            self.by_site[f"{_site()} {str(t.dtype).replace('torch.', '')}"] += st.nbytes()
        return t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", help="write the result here as JSON")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("overrides", nargs="*", help="config overrides (default: the GPU suite's t5-base adapters row)")
    args = ap.parse_args()
    overrides = GPU_COMMON + (args.overrides or GPU_CONFIGS[0][1])
    cfg = load_config("tiny", overrides)
    vocab = analytic.default_vocab_size(cfg)
    from vlscale.modeling.vl_model import build_model

    dev = torch.device(args.device)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, vocab_size=vocab, device="cpu", dtype=torch.bfloat16).to(dev)
    model.train()
    exclude = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    batch = synthetic_batch(cfg, cfg.train.micro_batch_size, vocab, device=dev, dtype=torch.bfloat16)
    sites = SavedBySite(exclude)
    with torch.autograd.graph.saved_tensors_hooks(sites.pack, lambda t: t):
        out = model(batch)
        loss = _trainer_loss(out, batch["labels"])
    by_name, count, detail = saved_by_node(loss, exclude)
    shapes = analytic.run_shapes(cfg, vocab)
    rep = analytic.activation_report(cfg, shapes, analytic.TapeOptions(device=dev.type, b=2, padded=True))
    res = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
           "overrides": overrides, "saved_total": sum(by_name.values()),
           "hooked_total": sum(sites.by_site.values()),
           "by_site": dict(sorted(sites.by_site.items(), key=lambda kv: -kv[1])[:args.top]),
           "logits_grad_fn": out.logits.grad_fn.name() if out.logits.grad_fn is not None else None,
           "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
           "by_node": dict(sorted(by_name.items(), key=lambda kv: -kv[1])), "node_count": count,
           "largest": dict(sorted(detail.items(), key=lambda kv: -kv[1])[:args.top]),
           "tape": {k: v for k, v in vars(rep).items() if isinstance(v, (int, float, dict))}}
    text = json.dumps(res, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
