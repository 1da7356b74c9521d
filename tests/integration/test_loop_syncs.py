"""The training loop's own host-device syncs per steady-state step, counted by benchmarks/loop_overhead.py.

On a GPU each ``.item()`` / ``.tolist()`` / ``float(tensor)``, blocking collective or tensor built from
Python data stalls the queue of kernels; the loop keeps only those it needs. DeepSpeed's and
transformers' own are counted by the benchmark too, but not pinned here.
"""

import json
import re

import pytest

from vlscale.engine.distributed import free_port

SCRIPT = "benchmarks/loop_overhead.py"
T, D = "vlscale/engine/trainer.py", "vlscale/engine/distributed.py"
EXPECTED = {  # (ZeRO stage, ranks) -> {"kind @ file function": calls per step}
    (0, 1): {f"Tensor.tolist @ {T} train_step": 1},  # the loss (NaN check, train_log.jsonl), stop flag and grad norm
    (3, 2): {f"torch.tensor @ {D} all_reduce_sum": 1, f"dist.all_reduce @ {D} all_reduce_sum": 1,
             f"Tensor.tolist @ {D} all_reduce_sum": 1,  # the global batch's target tokens, before the backward
             f"dist.all_reduce @ {D} all_reduce_sum_": 1, f"Tensor.tolist @ {T} train_step": 1,  # loss and stop flag
             "Tensor.__float__ @ vlscale/engine/half_precision.py unscaled_grad_norm": 1},  # DeepSpeed's, after the step
}


def vlscale_syncs(preloaded, tmp_path, stage: int, nproc: int) -> dict:
    """-> {"kind @ vlscale file function": calls per step} of a tiny run's steps 3-5 at ZeRO ``stage``."""
    from preloaded import ROOT, launch_env

    result = tmp_path / f"zero{stage}x{nproc}.json"
    env = dict(launch_env(), OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = preloaded.run(ROOT / SCRIPT, ["--child", str(stage), "--result", result, "--steps", "3", "--warmup", "2",
                                         "--threads", "1"], nproc=nproc, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0 and result.exists(), proc.stdout[-3000:]
    sites = json.loads(result.read_text())["syncs_by_site"]
    out = {}
    for site, n in sites.items():
        if " @ vlscale" in site:
            key = re.sub(r":\d+ ", " ", site)
            out[key] = out.get(key, 0) + n
    return out


@pytest.mark.parametrize("stage,nproc", [(0, 1), (3, 2)])
def test_the_loop_syncs_only_to_read_what_it_logs(preloaded, tmp_path, stage, nproc):
    """One process: the token count and the loss/stop flag needed no trip through a device tensor (each was a
    host-to-device copy and a .tolist() per step). The loss and the stop flag are summed over the ranks on the
    device and read once, with the gradient norm the loop computes at ZeRO stage 0 (they were read apart: the
    loss's .item(), a tensor built from it and the flag, its .tolist(), the norm's float())."""
    assert vlscale_syncs(preloaded, tmp_path, stage, nproc) == EXPECTED[stage, nproc]
