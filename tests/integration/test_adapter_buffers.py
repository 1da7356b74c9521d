"""adapter/ and checkpoints/ keep the buffers training changes: with ``peft.train_vision=true`` the CLIP
ResNet trains in train mode, so its BatchNorm running statistics move every step. adapter/ (format 2)
holds them beside the trainable parameters; loading it onto a freshly built model reproduces the
trained model's outputs; a format-1 adapter (no buffers) still loads, with a warning; and a --resume
from checkpoints/ (DeepSpeed's module state) continues with the statistics of the uninterrupted run.
"""

import json
import logging

import pytest
import torch

from vlscale.config import load_config
from vlscale.engine import checkpoint as ckpt

TRAIN_VISION = ["model.backbone=tiny-t5", "model.vision=tiny-clip-rn", "model.pretrained=false",
                "model.vision_pretrained=null", "model.dropout=0.0", "model.feature_source=images",
                "peft.method=adapter", "peft.train_vision=true", "train.precision=fp32"]
VOCAB = 1100


def batch(i: int) -> dict:
    g = torch.Generator().manual_seed(i)
    return {"task": "vqa", "input_ids": torch.randint(5, 100, (2, 8), generator=g),
            "attention_mask": torch.ones(2, 8, dtype=torch.long),
            "pixel_values": torch.rand(2, 1, 3, 128, 128, generator=g), "labels": torch.randint(5, 100, (2, 4), generator=g)}


def build(cfg):
    from vlscale.engine.trainer import seed_everything
    from vlscale.modeling.vl_model import build_model

    seed_everything(0)
    return build_model(cfg, vocab_size=VOCAB)


def bn_buffers(model) -> dict:
    return {n: b.clone() for n, b in model.named_buffers() if ".bn" in n or "downsample.2" in n}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny model trained 3 steps with CLIP (train mode), its adapter/ written. -> (cfg, model, dir)."""
    cfg = load_config("tiny", TRAIN_VISION)
    model = build(cfg)
    model.train()
    assert model.vision.training, "a trained CLIP runs in train mode"
    opt = torch.optim.AdamW([p for _, p in ckpt.trainable_parameters(model)], lr=1e-3)
    for i in range(3):
        opt.zero_grad()
        model(batch(i)).loss.backward()
        opt.step()
    adapter = tmp_path_factory.mktemp("bn") / "adapter"
    ckpt.save_adapter(model, adapter, cfg, vocab_size=VOCAB)
    model.eval()
    return cfg, model, adapter


def test_adapter_reloads_the_trained_batchnorm_statistics(trained):
    cfg, model, adapter = trained
    fresh = build(cfg)
    before = bn_buffers(fresh)
    assert before and any(not torch.equal(before[n], b) for n, b in bn_buffers(model).items()), \
        "training moved the running statistics"
    meta = ckpt.load_adapter(fresh, adapter)
    fresh.eval()
    for n, b in bn_buffers(model).items():
        assert torch.equal(dict(fresh.named_buffers())[n], b), n
    with torch.no_grad():
        x = batch(99)
        assert torch.allclose(fresh(x).logits, model(x).logits, rtol=0, atol=1e-6)
    assert meta["format_version"] == ckpt.ADAPTER_FORMAT_VERSION == 2
    # the buffers are listed apart: the trainable parameters and their count are unchanged
    trainable = dict(ckpt.trainable_parameters(model))
    assert set(meta["parameters"]) == set(trainable)
    assert meta["trainable_params"] == sum(p.numel() for p in trainable.values())
    assert set(meta["buffers"]) == {n for n, _ in ckpt.trained_buffers(model)}
    assert {n.rsplit(".", 1)[1] for n in meta["buffers"]} == {"running_mean", "running_var", "num_batches_tracked"}
    assert not any(n in meta["buffers"] for n in ("vision.mean", "vision.std")), "constants of no trained module"


def test_a_frozen_clip_adapter_holds_no_buffers(tmp_path):
    cfg = load_config("tiny", [o for o in TRAIN_VISION if "train_vision" not in o])
    model = build(cfg)
    assert ckpt.trained_buffers(model) == []
    ckpt.save_adapter(model, tmp_path / "adapter", cfg, vocab_size=VOCAB)
    assert ckpt.read_adapter_config(tmp_path / "adapter")["buffers"] == {}


def test_an_adapter_without_buffers_still_loads_with_a_warning(trained, tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    cfg, model, adapter = trained
    meta = ckpt.read_adapter_config(adapter)
    tensors = load_file(str(adapter / ckpt.ADAPTER_WEIGHTS))
    old = tmp_path / "v1"
    old.mkdir()
    # written by an earlier vlscale: no buffers, and CLIP's attention pool, which image tasks never run,
    # trained (without effect) and saved
    pool = {n: torch.zeros(p.shape) for n, p in model.vision.named_parameters(prefix="vision")
            if ".attnpool." in n}
    assert pool
    save_file({**{n: t for n, t in tensors.items() if n in meta["parameters"]}, **pool},
              str(old / ckpt.ADAPTER_WEIGHTS), metadata={"format": ckpt.ADAPTER_FORMAT})
    v1 = {k: v for k, v in meta.items() if k != "buffers"}
    (old / ckpt.ADAPTER_CONFIG).write_text(json.dumps(dict(v1, format_version=1)))
    fresh = build(cfg)
    before = bn_buffers(fresh)
    with caplog.at_level(logging.WARNING, logger="vlscale.engine.checkpoint"):
        ckpt.load_adapter(fresh, old)
    assert "saved no buffers" in caplog.text and "running_mean" in caplog.text
    assert f"holds {len(pool)} parameters the model's visual path never runs" in caplog.text
    assert all(torch.equal(before[n], b) for n, b in bn_buffers(fresh).items()), "freshly built statistics kept"
    name = next(iter(meta["parameters"]))
    assert torch.equal(dict(fresh.named_parameters())[name], dict(model.named_parameters())[name])

    # a format-2 adapter missing a buffer does not fit
    broken = tmp_path / "broken"
    broken.mkdir()
    gone = next(iter(meta["buffers"]))
    save_file({n: t for n, t in tensors.items() if n != gone}, str(broken / ckpt.ADAPTER_WEIGHTS))
    (broken / ckpt.ADAPTER_CONFIG).write_text(json.dumps(meta))
    with pytest.raises(ckpt.CheckpointError, match=rf"1 buffers of trained modules missing from the file .*{gone}"):
        ckpt.load_adapter(build(cfg), broken)


RESUME_PROBE = """
import json, sys
import torch, deepspeed
from vlscale.engine.distributed import init_distributed
init_distributed()
sys.path.insert(0, sys.argv[2])
from test_adapter_buffers import TRAIN_VISION, batch, build, bn_buffers
from vlscale.config import load_config
from vlscale.engine import checkpoint as ckpt
from vlscale.engine.trainer import optimizer_groups

def engine(stage):
    model = build(load_config("tiny", TRAIN_VISION))
    opt = torch.optim.AdamW(optimizer_groups(model), lr=1e-3)
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
          "zero_optimization": {"stage": stage}}
    e, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    e.train()
    return e

def steps(e, first, last):
    out = []
    for i in range(first, last):
        loss = e(batch(i)).loss
        e.backward(loss)
        e.step()
        out.append(loss.item())
    return out

result = {}
for stage in (3,):
    out = f"{sys.argv[1]}/stage{stage}"
    e = engine(stage)
    losses = steps(e, 0, 2)
    state = {"step": 2, "loader": {"sampler": {"global_batch_size": 2}, "accum": 1}, "world_size": 1}
    ckpt.save_checkpoint(e, out, 2, state, rank=0)
    saved = bn_buffers(e.module)
    losses += steps(e, 2, 4)
    whole = bn_buffers(e.module)
    r = engine(stage)
    ckpt.load_checkpoint(r, out, 0, 1)
    restored = all(torch.equal(saved[n], b) for n, b in bn_buffers(r.module).items())
    resumed = steps(r, 2, 4)
    same = all(torch.equal(whole[n], b) for n, b in bn_buffers(r.module).items())
    result[stage] = {"losses": losses[2:], "resumed": resumed, "restored": restored, "same": same, "n": len(saved)}
print("RESULT " + json.dumps(result))
"""


def test_a_resume_restores_the_batchnorm_statistics(tmp_path, preloaded):
    """checkpoints/ holds DeepSpeed's module state, buffers included: a run resumed at step 2 (ZeRO-3;
    stage 0 measured the same) has the statistics the run had then, and continues as the uninterrupted run does."""
    from pathlib import Path


    env = preloaded.one_rank_env()
    script = tmp_path / "resume_probe.py"
    script.write_text(RESUME_PROBE)
    proc = preloaded.run(script, [str(tmp_path), str(Path(__file__).parent)], env=env, cwd=tmp_path, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:]
    for stage, r in json.loads(lines[-1][len("RESULT "):]).items():
        assert r["n"] > 0 and r["restored"] and r["same"], (stage, r)
        assert r["resumed"] == pytest.approx(r["losses"], rel=1e-6), stage


def test_two_ranks_evaluate_and_save_the_same_statistics(h, tmp_path):
    """DeepSpeed syncs no buffers: each rank's batch-norm statistics follow its own batches. The trainer
    averages them over the ranks after every step (trainer.sync_trained_buffers), so both
    ranks' module states in the ZeRO-3 checkpoint hold the same statistics (before: they differed)."""
    out = tmp_path / "run"
    h.launch([*h.TINY, "peft.train_vision=true", "train.micro_batch_size=2", "train.max_steps=2",
              "data.tasks=[vqa]", f"output_dir={out}"], nproc=2)
    step = out / "checkpoints" / ckpt.latest_tag(out / "checkpoints")
    states = [ckpt._safe_load(torch.load, step / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt",
                              map_location="cpu")["module"] for r in range(2)]
    names = [n for n in states[0] if "running_mean" in n or "running_var" in n]
    assert names and all(n in states[1] for n in names)
    assert all(torch.equal(states[0][n], states[1][n]) for n in names), \
        [n for n in names if not torch.equal(states[0][n], states[1][n])][:3]
    assert any(not torch.equal(states[0][n], torch.zeros_like(states[0][n])) for n in names if "mean" in n)


def test_an_adapter_of_this_vlscale_loads_onto_a_trained_clip_without_a_warning(trained, caplog):
    """The warning about parameters the visual path never runs (CLIP's attention pool under image tasks) is for
    files of an earlier vlscale that hold them: this vlscale's adapter, which holds none, loads without a word."""
    cfg, _, adapter = trained
    fresh = build(cfg)
    from vlscale.peft.trainable import unused_vision_parameters

    assert unused_vision_parameters(fresh), "the model has parameters its visual path never runs"
    with caplog.at_level(logging.WARNING, logger="vlscale.engine.checkpoint"):
        ckpt.load_adapter(fresh, adapter)
    assert not caplog.records, [r.getMessage() for r in caplog.records]
