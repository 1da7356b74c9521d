"""Where the time of our adapter step and AdapterHub's goes, beside ``step_time.py``'s ratio.

Runs in the peer environment (``benchmarks/peer_env.sh`` builds it), on one thread, with
``step_time.py``'s model, batch and variants (``lm_adapter``: our fused adapters; ``lm_adapterhub``):

    ops       each variant's self CPU time per op (torch.profiler, input shapes recorded), summed over
              ``--steps`` steps each in alternation, the ops that differ most, and the matmul FLOPs
    overhead  the step time on a batch too small for compute to count (1 example, 4 + 2 tokens, a
              64-wide T5): what Python, hooks and dispatch cost per step; our unfused adapter too
    backbone  ``adapters.init`` replaces T5's attention and layer classes with AdapterHub's own: the
              same frozen T5 with only its layer norms training, with and without that swap
              (``hf_ln`` / ``ah_ln``, alternating rounds), shows whether the backbone code differs

    /tmp/vlscale-peer/bin/python benchmarks/peer_diagnostics.py [--sections ops,overhead,backbone]
        [--steps 6] [--rounds 20] [--json]
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import statistics
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_time as st  # noqa: E402  (benchmarks/step_time.py)

SECTIONS = ("ops", "overhead", "backbone")


def ops_section(steps: int, top: int = 12) -> dict:
    from torch.profiler import ProfilerActivity, profile

    args = st.parse_args([])
    base, _, batch = st.build_base(args)
    ours = st.ours_adapter_variant(args, base, batch)
    peer = st.adapterhub_variant(args, base, batch, ours)
    pair = (ours, peer)
    flops = {v.name: st.count_flops(v) / 1e9 for v in pair}
    by_op = {v.name: collections.Counter() for v in pair}
    by_shape = {v.name: collections.Counter() for v in pair}
    for v in pair:
        v.step(record=False)
    for r in range(2 * steps):
        v = pair[(r + r // 2) % 2]  # order ours, peer, peer, ours, ...: each leads half the time
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            v.step(record=False)
        for e in prof.key_averages(group_by_input_shape=True):
            by_op[v.name][e.key] += e.self_cpu_time_total / 1e3 / steps
            by_shape[v.name][f"{e.key} {e.input_shapes}"] += e.self_cpu_time_total / 1e3 / steps
    a, b = (by_shape[v.name] for v in pair)
    differ = sorted(set(a) | set(b), key=lambda k: -abs(a[k] - b[k]))[:top]
    return {"gflop_per_step": flops, "steps_each": steps,
            "self_cpu_ms_per_step": {v.name: sum(by_op[v.name].values()) for v in pair},
            "most_different_ops_ms_per_step": [{"op": k, ours.name: a[k], peer.name: b[k]} for k in differ]}


def overhead_section(rounds: int) -> dict:
    args = st.parse_args(["--batch", "1", "--text-len", "2", "--target-len", "2", "--d-model", "64",
                          "--d-ff", "128", "--heads", "2", "--d-kv", "32"])
    base, _, batch = st.build_base(args)
    ours = st.ours_adapter_variant(args, base, batch)
    variants = [ours, st.ours_adapter_variant(args, base, batch, fused=False),
                st.adapterhub_variant(args, base, batch, ours)]
    st.measure(variants, st.balanced_repeats(rounds, len(variants)), warmup=10)
    return {v.name: {ph: 1e3 * statistics.median(v.times["cpu"][ph]) for ph in st.PHASES} for v in variants}


def backbone_section(rounds: int) -> dict:
    import adapters

    args = st.parse_args([])
    base, _, batch = st.build_base(args)

    def layer_norms_only(name, lm):
        for n, p in lm.named_parameters():
            p.requires_grad_("layer_norm" in n)
        return st.Variant(name, lm.train(), st.lm_forward(lm, batch), 1e-3, args.optimizer)

    swapped = copy.deepcopy(base)
    adapters.init(swapped)
    variants = [layer_norms_only("hf_ln", copy.deepcopy(base)), layer_norms_only("ah_ln", swapped)]
    st.measure(variants, st.balanced_repeats(rounds, 2), warmup=1)
    hf, ah = variants
    return {"step_ms": {v.name: 1e3 * statistics.median(v.times["cpu"]["step"]) for v in variants},
            "ah_ln_over_hf_ln": st.paired_ratio(ah, hf, "cpu"), "ci95": st.paired_ratio_ci(ah, hf, "cpu"),
            "rounds": len(hf.times["cpu"]["step"])}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--steps", type=int, default=6, help="profiled steps per variant (ops)")
    p.add_argument("--rounds", type=int, default=20, help="alternating rounds (overhead x10, backbone)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        p.error(f"--sections: unknown {bad}; choose from {list(SECTIONS)}")
    problem = st.peer_status("adapterhub")
    if problem is not None:
        raise st.BenchmarkError(f"AdapterHub is not usable here ({problem}); run in benchmarks/peer_env.sh's venv")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    run = {"ops": lambda: ops_section(args.steps), "overhead": lambda: overhead_section(10 * args.rounds),
           "backbone": lambda: backbone_section(args.rounds)}
    out = {}
    for name in sections:
        out[name] = run[name]()
        if not args.json:
            print(f"== {name}\n{json.dumps(out[name], indent=1)}", flush=True)
    if args.json:
        print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
