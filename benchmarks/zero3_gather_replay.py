"""Probe (not used by the estimator yet): replay DeepSpeed's ZeRO-3 PartitionedParameterCoordinator over a
meta-device module trace and report the most parameter elements held gathered in forward and in backward.

    python benchmarks/zero3_gather_replay.py BACKBONE images|cache LEAF(true|false) REUSE_DISTANCE(-1: the file's)

The trace: forward pre-hooks on every module DeepSpeed hooks (all of them, a leaf module's descendants
excepted; a leaf's parameters are its whole subtree), parameterless ones included (each module call
prefetches), backward = the reverse of the calls whose output needs a gradient. The replay follows
deepspeed/runtime/zero/partitioned_param_coordinator.py (0.19.8): a fetch gathers what is not there
(one all-gather; a set of several parameters keeps its flat buffer until the last of them is fetched and
makes torch.cat copies of all of them at the first wait), pops the module's parameters off the trace
queue (each module's in ds_id order, the model's registration order), prefetches up to
min(stage3_max_live_parameters - gathered, bucket) elements of not-gathered parameters (remembering,
for every parameter it passes, the latest step it was passed for), and releases a module's parameters
after it unless a later use was passed by the prefetcher or comes within
stage3_max_reuse_distance elements. In forward that release comes where DeepSpeed's post-forward hook
runs, after the modules called inside the module (an adapter inside a leaf LM layer) have fetched and
prefetched, with the step counter then. Approximations: in backward a module releases right after its
fetch (DeepSpeed: once its inputs' gradients are made), no gradient-checkpointing recompute, gathered
counts only (no activations, so not the peak moment).

Against DeepSpeed, 2026-12-06 (2 CPU ranks, `benchmarks/profile_accuracy.py --knobs` settings): replay =
`python benchmarks/zero3_gather_replay.py BACKBONE images|cache true|false 0`, its forward figure; measured =
`python benchmarks/zero3_gather_measure.py BACKBONE images|cache true|false "reuse 0"`, the largest gathered +
in-flight parameters + live flat buffers after a forward fetch (steps after the first), in M elements:
  t5-small, CLIP on the fly, module units, reuse 0:  replay 81.1 M   measured 81.1 M (35.7 + 28.8 + 16.6)
  t5-small, CLIP on the fly, leaf units, reuse 0:    replay 71.6 M   measured 71.6 M (43.9 + 11.1 + 16.6)
  t5-small, cached features, leaf units, reuse 0:    replay 38.5 M   measured 38.7 M (20.9 + 1.2 + 16.6)
  t5-base, CLIP on the fly, leaf units, reuse 0:     replay 119.4 M  measured 119.4 M (8.0 + 110.8 + 0.6);
                                                      118.2 M at the training peak (0.6 + 116.7 + 0.9)
Backward (the replay's "b", the measure's backward maximum) stays approximate: 64.8 M against 64.8 M,
55.5 M against 57.6 M, 22.5 M against 23.1 M, 38.3 M against 39.7 M.
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
from vlscale.engine.comm import _MetaScalars  # noqa: E402
from vlscale.modeling.vl_model import build_model  # noqa: E402
from vlscale.profiling.analytic import ZeroSettings, default_vocab_size, resolve_ds_config  # noqa: E402
from vlscale.profiling.measure import synthetic_batch  # noqa: E402


def trace(cfg):
    vocab = default_vocab_size(cfg)
    model = build_model(cfg, vocab_size=vocab, device="meta")
    leaf_classes = set(getattr(model.lm, "_no_split_modules", None) or []) if cfg.train.zero3_leaf_layers else set()
    names = {id(p): n for n, p in model.named_parameters()}
    numel = {n: p.numel() for n, p in model.named_parameters()}
    hooked, skip = [], set()
    for name, m in model.named_modules():
        if any(name.startswith(s + ".") for s in skip):
            continue
        leaf = type(m).__name__ in leaf_classes and name.startswith("lm.")
        if leaf:
            skip.add(name)
        own = [names[id(p)] for p in m.parameters(recurse=leaf) if id(p) in names]
        hooked.append((name, m, own))
    events = []
    handles = []
    for name, m, own in hooked:
        handles.append(m.register_forward_pre_hook(lambda mod, a, name=name, own=own: events.append(["pre", name, own, False])))
        def post(mod, a, out, name=name):
            from torch.utils._pytree import tree_flatten
            flat, _ = tree_flatten(out)
            g = any(isinstance(t, torch.Tensor) and t.requires_grad for t in flat)
            # mark the matching pre event
            for e in reversed(events):
                if e[0] == "pre" and e[1] == name and e[3] is False:
                    e[3] = g or "n"; break
            events.append(["post", name, None, g])
        handles.append(m.register_forward_hook(post))
    batch = synthetic_batch(cfg, cfg.train.micro_batch_size, vocab, device=torch.device("meta"), dtype=torch.float32)
    model.train()
    with _MetaScalars():
        model(batch)
    for h in handles:
        h.remove()
    return events, numel


def replay(cfg, ds, world=2):
    events, numel = trace(cfg)
    return replay_events(events, numel, ZeroSettings.from_ds_config(ds))


def replay_events(events, numel, z, volume=None):
    """The replay over a trace (``trace``'s events: ["pre", module, its parameters, output needs a gradient
    (True, or False / "n")] and ["post", module, None, _]) -> the most elements held gathered, {"f": forward,
    "b": backward}. ``numel``: {parameter: elements} in the model's parameters() order (DeepSpeed's ds_id
    order). ``volume`` (a dict): filled with the elements all-gathered per phase."""
    thr = z.param_persistence_threshold
    persist = {n for n, k in numel.items() if k <= thr}
    # module fetch order: forward pre events, then backward: reverse of modules whose output needs grad
    fwd = [(e[1], [p for p in e[2] if p not in persist]) for e in events if e[0] == "pre"]
    bwd = [(e[1], [p for p in e[2] if p not in persist]) for e in reversed(events) if e[0] == "pre" and e[3] is True]
    order = [(m, ps, "f") for m, ps in fwd] + [(m, ps, "b") for m, ps in bwd]
    # forward: DeepSpeed releases a module in its post-forward hook, after the modules called inside it
    # fetched (and prefetched): release_at[step] = the step counter then (the fetches begun before it)
    release_at, begun, open_calls = {}, 0, []
    for e in events:
        if e[0] == "pre":
            open_calls.append((e[1], begun)); begun += 1
            continue
        for j in range(len(open_calls) - 1, -1, -1):
            if open_calls[j][0] == e[1]:
                release_at[open_calls.pop(j)[1]] = begun
                break
    pending = collections.defaultdict(list)  # step counter -> the modules' parameters released then
    # the trace queue lists a module's parameters in DeepSpeed's ds_id order: the model's parameters() order
    rank = {n: i for i, n in enumerate(numel)}
    ptrace = [(p, s) for s, (m, ps, _) in enumerate(order) for p in sorted(set(ps), key=rank.__getitem__)]
    queue = collections.deque(ptrace)
    status = {}  # param -> "A" available / "I" inflight
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

    def release(p):
        nonlocal n_avail, live
        if status.get(p) == "A":
            del status[p]; n_avail -= numel[p]; live -= numel[p]

    def release_after(need, step_id):
        """DeepSpeed's release of a module's parameters, its step counter at ``step_id``."""
        rel = {p for p in need if not recent[p] > step_id}
        trav = 0
        for m2, ps2, _ in order[step_id:]:
            if trav >= z.max_reuse_distance:
                break
            for p in ps2:
                rel.discard(p); trav += numel[p]
        for p in rel:
            release(p)

    for step, (m, ps, phase) in enumerate(order):
        for need in pending.pop(step, []):
            release_after(need, step)
        need = sorted(set(ps))
        gather(need, phase)
        for p in need:
            wait(p)
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
        if phase == "f" and step in release_at:  # after the modules called inside it
            pending[release_at[step]].append(need)
        else:  # backward: right after its fetch (approximation)
            release_after(need, step + 1)
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
