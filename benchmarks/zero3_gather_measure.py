"""The measured side of benchmarks/zero3_gather_replay.py: DeepSpeed's gathered set in a real 2-rank ZeRO-3 run.

    python benchmarks/zero3_gather_measure.py BACKBONE images|cache LEAF(true|false) KNOB

KNOB is a row of ``profile_accuracy.py --knobs`` (``"reuse 0"``, ``"default"``, ...; the same settings:
``knob_case``, 2 CPU ranks, fp32, micro-batch 1, 3 steps through ``measure_memory_cases``). Each rank's
worker also reads DeepSpeed's parameters after every ``fetch_sub_module`` (where the replay takes its
maximum), in the steps after the first (the trace complete):

  G  gathered: non-persistent parameters AVAILABLE (their full copies),
  I  in flight: parameters INFLIGHT (an all-gather not waited yet: its output buffer),
  F  flat buffers of coalesced all-gathers already waited (copies made) and still held by the
     coordinator's inflight registry (a set some of whose parameters are not fetched yet).

G + I + F is the replay's ``live``. Printed, per rank: the largest G + I + F over forward and over
backward fetches, and the G, I, F of the last fetch before the training peak the live-tensor tracker
measured (``peak_moment``); then the row as ``profile_accuracy.py --knobs`` prints it (measured and
predicted training peak). Counts of elements are deterministic; a t5-small row takes about a minute.
"""
import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def worker(spec_path: str, out_path: str) -> None:
    """One rank: ``vlscale.profiling.measure._worker`` with the reading above hooked in."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    from profile_accuracy import after_first_step
    from vlscale.profiling import measure

    st = {"module": None, "phase": "start", "last": None, "peak": -1, "cases": []}
    initialize = deepspeed.initialize

    def init(*args, **kwargs):
        out = initialize(*args, **kwargs)
        st.update(module=out[0].module, last=None, peak=-1)
        st["cases"].append({"forward_max": [0, None], "backward_max": [0, None], "peak_moment": None,
                            "peak_phase": None})
        return out

    def read(coord) -> tuple[int, int, int]:
        registry = getattr(coord, "_PartitionedParameterCoordinator__inflight_param_registry")
        flat = {}
        for handle in {id(h): h for h in registry.values()}.values():
            for sub in getattr(handle, "handles", [handle]):  # MultipleAllGatherHandles wraps one per dtype
                parts = getattr(sub, "partitions", None)
                if parts is not None and getattr(sub, "complete", False):
                    storage = parts[0].untyped_storage()
                    flat[id(storage)] = storage.nbytes() // parts[0].element_size()
        g = i = 0
        for p in st["module"].parameters():
            if not hasattr(p, "ds_status") or getattr(p, "ds_persist", False):
                continue
            if p.ds_status == ZeroParamStatus.AVAILABLE:
                g += p.ds_numel
            elif p.ds_status == ZeroParamStatus.INFLIGHT:
                i += p.ds_numel
        return g, i, sum(flat.values())

    fetch_sub_module = PartitionedParameterCoordinator.fetch_sub_module

    def fetch(self, submodule, forward):
        fetch_sub_module(self, submodule, forward)
        phase = st["phase"]
        if st["module"] is None or not after_first_step(phase):
            return
        st["last"] = read(self)
        case = st["cases"][-1]
        key = "forward_max" if phase.startswith("forward") else "backward_max"
        if sum(st["last"]) > case[key][0]:
            case[key] = [sum(st["last"]), list(st["last"])]

    tracker = measure.LiveTensorTracker
    phase_fn, bump_fn = tracker.phase, tracker._bump

    def phase(self, name):
        st["phase"] = name
        phase_fn(self, name)

    def bump(self):
        bump_fn(self)
        name = self.phase_name
        if after_first_step(name) and self.current > st["peak"] and st["cases"]:
            st["peak"] = self.current
            st["cases"][-1].update(peak_moment=list(st["last"]) if st["last"] else None, peak_phase=name)

    deepspeed.initialize = init
    PartitionedParameterCoordinator.fetch_sub_module = fetch
    tracker.phase, tracker._bump = phase, bump
    measure._worker(spec_path, out_path)
    with open(os.environ["ZERO3_GATHER_OUT"] + f".rank{os.environ.get('RANK', '0')}", "w") as f:
        json.dump(st["cases"], f)


def main(argv=None) -> int:
    import profile_accuracy as pa

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("backbone", help="registry backbone, e.g. t5-small")
    ap.add_argument("feats", choices=("images", "cache"), help="model.feature_source")
    ap.add_argument("leaf", choices=("true", "false"), help="train.zero3_leaf_layers")
    ap.add_argument("knob", choices=sorted(pa.KNOBS), help="a profile_accuracy.py --knobs setting")
    a = ap.parse_args(argv)
    from vlscale.profiling.measure import _launch, measure_memory_cases

    leaf = a.leaf == "true"
    case = pa.knob_case(a.backbone, a.feats, a.knob, leaf, 3)
    with tempfile.TemporaryDirectory(prefix="zero3_gather_") as tmp:
        out = os.path.join(tmp, "gathered")

        def launch(args, world, env, cwd, timeout_s):  # this file's worker instead of measure's
            script = str(Path(__file__).resolve())
            return _launch([script] + args[2:], world, dict(env, ZERO3_GATHER_OUT=out), cwd, timeout_s)

        meas = measure_memory_cases([case], 2, launch=launch)[0]
        ranks = [json.load(open(f"{out}.rank{r}"))[0] for r in range(2)]
    for r, c in enumerate(ranks):
        parts = {k: (round(c[k][0] / 1e6, 2), [round(x / 1e6, 2) for x in c[k][1] or []])
                 for k in ("forward_max", "backward_max")}
        moment = [round(x / 1e6, 2) for x in c["peak_moment"] or []]
        print(f"rank {r}: G+I+F (G, I, F) M elements: forward {parts['forward_max']}, backward "
              f"{parts['backward_max']}, at the peak ({c['peak_phase']}) {moment}")
    row = pa.knob_row(a.backbone, a.feats, a.knob, leaf, case, meas, 0.0)
    print(f"measured training peak {row['measured_train_peak'] / 2**20:.2f} MiB, predicted "
          f"{row['predicted_train_peak'] / 2**20:.2f} MiB ({row['error']:+.1%})")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        sys.exit(main())
