"""Probe (not used by the estimator yet): replay DeepSpeed's ZeRO-3 PartitionedParameterCoordinator over a
meta-device module trace and report the most parameter elements held gathered in forward and in backward.

    python benchmarks/zero3_gather_replay.py BACKBONE images|cache LEAF(true|false) REUSE_DISTANCE(-1: the file's)

The trace: one forward and backward on the meta device with hooks placed and triggered as DeepSpeed's
(vlscale.engine.comm.trace_zero3_step, LM layers marked as leaf units as the trainer marks them): on every
module DeepSpeed hooks (all of them, a leaf module's descendants excepted; a leaf's parameters are its whole
subtree), parameterless ones included (each fetch prefetches), a fetch at its pre-forward hook and at its
pre-backward hook (a gradient reached one of its output tensors: once per such tensor; so a module comes
before the modules it called, whose outputs' gradients come after its own), a release at its post-forward hook
and at its post-backward hook (the gradients of all its input tensors that need one are made; never, for a
module none of whose inputs needs one, such as the projection fed CLIP's features: DeepSpeed releases those
when backward ends). The replay follows deepspeed/runtime/zero/partitioned_param_coordinator.py (0.19.8):
a fetch gathers what is not there (one all-gather; a set of several parameters keeps its flat buffer until
the last of them is fetched and makes torch.cat copies of all of them at the first wait), pops the
module's parameters off the trace queue (each module's in ds_id order, the model's registration order),
prefetches up to min(stage3_max_live_parameters - gathered, bucket) elements of not-gathered parameters
(remembering, for every parameter it passes, the latest step it was passed for); a release, with the step
counter then (the fetches begun before it: a layer's release comes after the fetches of the adapters it
calls, in forward and in backward alike), lets a module's parameters go unless a later use was passed by the
prefetcher, comes within stage3_max_reuse_distance elements, or another module fetched and not released
yet holds them (ds_active_sub_modules). Not modelled: parameters a module reads without owning them
(DeepSpeed's external parameters), the frozen parameters a gradient-checkpointing recompute leaves to the
backward module then running (a recompute's fetches count as backward), the reuse-distance walk's
leaf-ness (DeepSpeed counts each later module's parameters recursively or not as the released module is a
leaf or not; here each module's own; only reuse distances > 0 see it), gathered counts only (no
activations, so not the peak moment).

Against DeepSpeed, 2026-12-06 (2 CPU ranks, `benchmarks/profile_accuracy.py --knobs` settings): replay =
`python benchmarks/zero3_gather_replay.py BACKBONE images|cache true|false 0`, its forward and backward
figures; measured = `python benchmarks/zero3_gather_measure.py BACKBONE images|cache true|false "reuse 0"`,
the largest gathered + in-flight parameters + live flat buffers after a forward / backward fetch (steps after
the first), in M elements, forward / backward (the measured parts: G + I + F):
  t5-small, CLIP on the fly, module units:  replay 81.1 / 64.8 M   measured 81.1 (35.7 + 28.8 + 16.6)
                                                                    / 64.8 M (63.4 + 1.2 + 0.3)
  t5-small, CLIP on the fly, leaf units:    replay 71.6 / 57.6 M   measured 71.6 (43.9 + 11.1 + 16.6)
                                                                    / 57.6 M (43.9 + 13.8 + 0)
  t5-small, cached features, leaf units:    replay 38.7 / 23.1 M   measured 38.7 (20.9 + 1.2 + 16.6)
                                                                    / 23.1 M (20.9 + 2.2 + 0)
  t5-base, CLIP on the fly, leaf units:     replay 119.4 / 39.7 M  measured 119.4 (8.0 + 110.8 + 0.6)
                                                                    / 39.7 M (34.7 + 5.0 + 0);
                                   at the training peak 118.2 M (0.6 + 116.7 + 0.9) on rank 0, 119.4 M on rank 1;
equal to 0.01 M in each phase. Until this change (2026-12-06) the backward was the reverse of the forward calls whose
output needs a gradient, each released right after its fetch: 64.8, 55.5, 22.5 and 38.3 M backward, and
38.5 M forward on the cached row (the forward's prefetches reach into the backward's queue). That order put
the modules that call others (the model, the LM) last in backward, where their pre-backward hooks run
first, and each of those parameterless fetches prefetches: lm_head's fetch, the first with parameters and
the backward maximum, found 2.1 M fewer in flight (t5-small leaf). The release moment alone moves none of
the four rows: with the traced order and each backward module released right after its fetch they read
the same; `tests/unit/test_zero3_gather_replay.py` has a case where it does.
Before 2026-12-06 the replay released a forward module right after its fetch: 67.4 M and 34.5 M on the
two t5-small leaf rows, each short by the first decoder layer (4.2 M), which DeepSpeed keeps because the
adapters inside it prefetched past its backward use before its post-forward release. That did not show
on 2026-12-01 (replay 65.0 M, measured 64.9 M, recorded then as 64.5 M without the flat buffers; the
cached row 35.3 M against 39.4 M): 50c2633 (leaf layers keep no persistent parameters, so norms and
biases gather with their layer; replay 67.8 M, measured 70.9 M) and f08ce07 (PEFT hooks call the adapter
containers' forward directly: no DeepSpeed hooks on them, fewer parameterless fetches, each a prefetch;
replay 67.4 M, cached 34.5 M) made it show. The queue also listed a module's parameters by name, not
by ds_id as DeepSpeed does, which moves where a prefetch bucket ends: t5-base 119.1 M (118.2 M on
2026-12-01) -> 119.4 M.
The analytic rule in vlscale/profiling/analytic.py (_zero3_gathered_numel) assumes all 241 M for the
t5-base case (+54.3 % on the peak; +52.6 % on 2026-12-01, before 50c2633) and 16.4 M + a unit for the
cached t5-small case (-21.4 %; -22.1 % then): (predicted - measured) / measured of the training peaks of
`python benchmarks/profile_accuracy.py --knobs --only "t5-base images reuse 0 leaf" "t5-small cache reuse 0 leaf"`
(1640.05 MiB against 1062.73 MiB, 267.37 against 340.13; BENCHMARKS.md's 2026-12-02 table has the same).
This replay, combined with the activations along the trace, is the way to close both (docs/scaling.md).
"""
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from vlscale.config import load_config  # noqa: E402
from vlscale.engine.comm import trace_zero3_step  # noqa: E402
from vlscale.engine.sharded_loading import mark_zero3_leaf_layers  # noqa: E402
from vlscale.modeling.vl_model import build_model  # noqa: E402
from vlscale.profiling.analytic import ZeroSettings, default_vocab_size, resolve_ds_config  # noqa: E402
from vlscale.profiling.measure import synthetic_batch  # noqa: E402


def trace(cfg):
    """One micro-batch's forward and backward as DeepSpeed's hooks see it (vlscale.engine.comm.trace_zero3_step,
    on the meta device, LM layers as leaf units as the trainer marks them) -> (events, numel) for
    ``replay_events``."""
    vocab = default_vocab_size(cfg)
    model = build_model(cfg, vocab_size=vocab, device="meta")
    mark_zero3_leaf_layers(model, cfg)
    batch = synthetic_batch(cfg, cfg.train.micro_batch_size, vocab, device=torch.device("meta"), dtype=torch.float32)
    t = trace_zero3_step(model, batch)
    units = [(u.name, u.nested if u.leaf else u.direct) for u in t.units]
    events = [(kind, *units[u], phase) for kind, u, phase in t.events if kind in ("fetch", "release")]
    return events, {n: i.numel for n, i in t.info.items()}


def replay(cfg, ds, world=2):
    events, numel = trace(cfg)
    return replay_events(events, numel, ZeroSettings.from_ds_config(ds))


def replay_events(events, numel, z, volume=None):
    """The replay over a trace (``trace``'s events, in the order the hooks ran: ("fetch", module, its
    parameters, "forward" | "backward"), a pre-forward or pre-backward hook, and ("release", module, its
    parameters, phase), a post-forward or post-backward hook) -> the most elements held gathered after a
    fetch, {"f": forward, "b": backward}. ``numel``: {parameter: elements} in the model's parameters() order
    (DeepSpeed's ds_id order). ``volume`` (a dict): filled with the elements all-gathered per phase."""
    thr = z.param_persistence_threshold
    persist = {n for n, k in numel.items() if k <= thr}
    # the module trace: every fetch in order (DeepSpeed's step counter counts them)
    order = [(m, [p for p in ps if p not in persist]) for kind, m, ps, _ in events if kind == "fetch"]
    # the trace queue lists a module's parameters in DeepSpeed's ds_id order: the model's parameters() order
    rank = {n: i for i, n in enumerate(numel)}
    ptrace = [(p, s) for s, (m, ps) in enumerate(order) for p in sorted(set(ps), key=rank.__getitem__)]
    queue = collections.deque(ptrace)
    status = {}  # param -> "A" available / "I" inflight
    active = collections.defaultdict(set)  # param -> modules fetched and not released (ds_active_sub_modules)
    recent = collections.defaultdict(lambda: -10**10)
    handle_of = {}  # param -> its all-gather's id while not fetched
    handles = {}  # id -> the set's parameters, remaining, total elements, several parameters, copies made
    n_avail = 0
    live = 0
    best = {"f": 0, "b": 0}
    hid = 0

    def gather(params, phase):
        nonlocal n_avail, live, hid
        ps = [p for p in params if p not in status]
        if not ps:
            return None
        hid += 1
        total = sum(numel[p] for p in ps)
        if volume is not None:
            volume[phase] = volume.get(phase, 0) + total
        handles[hid] = {"rem": set(ps), "all": list(ps), "total": total, "multi": len(ps) > 1, "copied": False}
        for p in ps:
            status[p] = "I"; handle_of[p] = hid
        n_avail += total
        live += total  # the all-gather output (a single parameter's buffer is its data)
        return hid

    def wait(p):
        nonlocal live
        h = handle_of.pop(p, None)
        if h is None:
            return
        H = handles[h]
        if H["multi"] and not H["copied"]:
            live += H["total"]; H["copied"] = True  # torch.cat copies of every parameter of the set
        for q in H["all"]:
            if status.get(q) == "I":
                status[q] = "A"
        H["rem"].discard(p)
        if H["multi"] and not H["rem"]:
            live -= H["total"]; del handles[h]  # the flat buffer dies with the last reference

    def release(m, need, step_id):
        """DeepSpeed's release_sub_module of module ``m`` at step counter ``step_id``: a parameter goes unless
        a prefetch passed a later use, a use comes within the reuse distance, or another module still holds it."""
        nonlocal n_avail, live
        rel = {p for p in need if not recent[p] > step_id}
        trav = 0
        for m2, ps2 in order[step_id:]:
            if trav >= z.max_reuse_distance:
                break
            for p in ps2:
                rel.discard(p); trav += numel[p]
        for p in need:
            active[p].discard(m)
            if p in rel and not active[p] and status.get(p) == "A":
                del status[p]; n_avail -= numel[p]; live -= numel[p]

    step = 0
    for kind, m, ps, phase in events:
        need = sorted(set(p for p in ps if p not in persist))
        if kind == "release":
            release(m, need, step)
            continue
        phase = "f" if phase == "forward" else "b"
        gather(need, phase)
        for p in need:
            wait(p); active[p].add(m)
        # pop the current module's params off the queue
        not_fetched = {p for p in need if recent[p] < step}
        popped = set()
        while queue and len(popped) < len(not_fetched):
            p, s = queue.popleft(); recent[p] = s; popped.add(p)
        if z.prefetch_bucket_size > 0:
            cap = min(z.max_live_parameters - n_avail, z.prefetch_bucket_size)
            got, num = [], 0
            while queue and num < cap:
                p, s = queue.popleft()
                recent[p] = max(recent[p], s)
                if p not in status and p not in got:
                    got.append(p); num += numel[p]
            if got:
                gather(got, phase)
        best[phase] = max(best[phase], live)
        step += 1
    return best


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Replay ZeRO-3's gather/release over a module trace (see the docstring).")
    ap.add_argument("backbone", help="registry backbone, e.g. t5-small")
    ap.add_argument("feats", choices=("images", "cache"), help="model.feature_source")
    ap.add_argument("leaf", choices=("true", "false"), help="train.zero3_leaf_layers")
    ap.add_argument("reuse", type=int, help="stage3_max_reuse_distance (-1: the DeepSpeed file's)")
    a = ap.parse_args()
    backbone, feats, leaf, reuse = a.backbone, a.feats, a.leaf, a.reuse
    cfg = load_config("tiny", [f"model.backbone={backbone}", f"model.feature_source={feats}", "train.zero_stage=3",
                               "train.micro_batch_size=1", f"train.zero3_leaf_layers={leaf}"])
    ds = resolve_ds_config(cfg, 2, None, device_type="cpu")
    if reuse >= 0:
        ds["zero_optimization"]["stage3_max_reuse_distance"] = reuse
    b = replay(cfg, ds)
    print(backbone, feats, leaf, reuse, {k: round(v / 1e6, 2) for k, v in b.items()}, "M elements")
