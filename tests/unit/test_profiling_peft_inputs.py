"""The memory model on what the measured accuracy rows of benchmarks/profile_accuracy.py added: per-task
weight sets, Hyperformer, video frames and a trained CLIP (analytic only, against measured figures).

Measured with DeepSpeed 0.19.8 on CPU (3 steps, fp32, 1 rank, ZeRO-2, micro-batch 4), e.g.

    python benchmarks/profile_accuracy.py --only "1r zero2 multiple adapters" "1r zero2 tvqa" \\
        "1r zero2 train CLIP" "1r zero2 hyperformer"
"""

from __future__ import annotations

import pytest

from vlscale.config import load_config
from vlscale.profiling.analytic import estimate_memory, resolve_ds_config

COMMON = ["train.zero_stage=2", "train.micro_batch_size=4"]


def _estimate(extra):
    cfg = load_config("tiny", COMMON + extra)
    return estimate_memory(cfg, 1, resolve_ds_config(cfg, 1, None, device_type="cpu"), device="cpu").components


@pytest.mark.parametrize("extra,grads", [(["peft.sharing=multiple"], 667_776), (["peft.sharing=half_shared"], 418_176)],
                         ids=["multiple", "half_shared"])
def test_per_task_weights_get_zero_gradients_at_the_boundary(extra, grads):
    """A step trains one task: DeepSpeed's ZeRO-2 gives the other tasks' own weights a zero gradient each
    (get_all_grad_tensors), beside the gradient partition (the engine's averaged_gradients: exact)."""
    assert _estimate(extra)["grads"] == grads


@pytest.mark.parametrize("extra,peak,rel", [
    (["data.tasks=[tvqa]"], 162_093_996, 0.01),  # the batch holds max_frames (64) images per video
    (["peft.train_vision=true"], 27_340_132, 0.02),  # CLIP's own activations (batch norms, the images)
    (["peft.method=hyperformer"], 16_817_484, 0.05),  # the decoder hypernetwork's gradients accumulate in backward
], ids=["video-frames", "trained-clip", "hyperformer"])
def test_peak_of_frames_trained_clip_and_hypernetwork(extra, peak, rel):
    assert _estimate(extra)["peak"] == pytest.approx(peak, rel=rel)
