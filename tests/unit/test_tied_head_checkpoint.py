"""A checkpoint whose config ties the output layer to the embeddings but whose file holds an ``lm_head.weight``
of other values: transformers' ``from_pretrained`` unties the two (with a warning), and every other build of
the folder does the same now. vlscale's ZeRO-3 loader kept them tied (the head silently became the embedding,
so a run's model depended on its ZeRO stage) and the meta builds behind counts and memory plans left the head
out; a tied checkpoint whose head equals the embedding stays tied everywhere."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "vlscale" / "assets" / "backbones"

WORKER = r'''
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import torch.distributed as dist
from vlscale.engine.distributed import skip_inference_shm_kernel
skip_inference_shm_kernel()  # as init_distributed does: no build of DeepSpeed-Inference's kernel
dist.init_process_group("gloo")
from vlscale.engine.sharded_loading import build_lm_zero3, gather_full_state_dict
from vlscale.modeling.backbones import build_lm
ds = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}
out = {}
for name, folder in zip(sys.argv[3::2], sys.argv[4::2]):
    whole = build_lm(name, path=folder, pretrained=True)
    sharded = build_lm_zero3(name, ds_config=ds, path=folder, pretrained=True)
    meta = build_lm(name, path=folder, device="meta")
    state = gather_full_state_dict(sharded)
    head = {id(p): n for n, p in sharded.named_parameters()}[id(sharded.lm_head.weight)]  # tied: the embedding's
    out[folder] = {
        "tied": [whole.lm_head.weight is whole.get_input_embeddings().weight,
                 sharded.lm_head.weight is sharded.get_input_embeddings().weight,
                 meta.lm_head.weight is meta.get_input_embeddings().weight],
        "numel": [sum(p.numel() for p in m.parameters()) for m in (whole, meta)],
        "same_head": torch.equal(state[head], whole.lm_head.weight.detach()),
        "same_all": all(k in state and torch.equal(state[k], v.detach()) for k, v in whole.named_parameters()),
    }
json.dump(out, open(sys.argv[2], "w"))
dist.destroy_process_group()
'''


def _with_head(src: Path, dst: Path, embedding: str, differ: bool) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    state["lm_head.weight"] = state[embedding].clone() + (0.5 if differ else 0.0)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.skipif(not (ASSETS / "mini-t5").is_dir() or not (ASSETS / "mini-bart").is_dir(),
                    reason="miniature backbones not made")
def test_a_head_of_its_own_in_a_tied_checkpoint_is_untied_by_every_build(tmp_path, preloaded):
    """The builds run in one rank forked from the preloaded server (zero.Init needs a process group)."""
    from vlscale.modeling.backbones import head_of_its_own

    folders = {
        "t5-own": ("mini-t5", _with_head(ASSETS / "mini-t5", tmp_path / "t5-own", "shared.weight", True)),
        "t5-same": ("mini-t5", _with_head(ASSETS / "mini-t5", tmp_path / "t5-same", "shared.weight", False)),
        "bart-own": ("mini-bart", _with_head(ASSETS / "mini-bart", tmp_path / "bart-own", "model.shared.weight", True)),
        "shipped": ("mini-t5", ASSETS / "mini-t5"),
    }
    assert [head_of_its_own(f) for _, f in folders.values()] == [True, False, True, False]

    env = preloaded.one_rank_env(OMP_NUM_THREADS="1")
    result = tmp_path / "result.json"
    argv = [str(x) for name, folder in folders.values() for x in (name, folder)]
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    proc = preloaded.run(script, [ROOT, result, *argv], env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    out = json.loads(result.read_text())
    for key, (_, folder) in folders.items():
        got = out[str(folder)]
        own = key.endswith("-own")
        assert got["tied"] == [not own] * 3, (key, got)
        assert got["numel"][0] == got["numel"][1], (key, got)  # counts and plans see the head the load builds
        assert got["same_head"] and got["same_all"], (key, got)  # ZeRO-3 loads what from_pretrained loads
    t5_extra = out[str(folders["t5-own"][1])]["numel"][0] - out[str(folders["shipped"][1])]["numel"][0]
    assert t5_extra == torch.Size([721, 128]).numel()  # the head's own vocab x d_model


def test_which_tied_checkpoints_hold_a_head_of_their_own(tmp_path):
    """head_of_its_own: only a config that ties the head, with an lm_head.weight in the file other than the
    embedding's (or no embedding to compare with), holds a head of its own; a config untied already does not."""
    from safetensors.torch import save_file

    from vlscale.modeling.backbones import head_of_its_own

    emb = torch.randn(4, 3)

    def folder(name, config, **tensors):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(config))
        save_file({k.replace("__", "."): v for k, v in tensors.items()}, str(d / "model.safetensors"))
        return d

    bart, t5 = {"model_type": "bart"}, {"model_type": "t5"}
    assert head_of_its_own(folder("differs", bart, model__shared__weight=emb, lm_head__weight=emb + 0.5))
    assert not head_of_its_own(folder("equal", bart, model__shared__weight=emb, lm_head__weight=emb.clone()))
    assert not head_of_its_own(folder("no_head", bart, model__shared__weight=emb))
    assert head_of_its_own(folder("head_only", bart, lm_head__weight=emb))
    assert head_of_its_own(folder("t5", t5, shared__weight=emb, lm_head__weight=emb + 0.5))
    assert not head_of_its_own(folder("untied", dict(bart, tie_word_embeddings=False), model__shared__weight=emb,
                                      lm_head__weight=emb + 0.5))
    assert not head_of_its_own(folder("t5_v1_1", dict(t5, scale_decoder_outputs=False), shared__weight=emb,
                                      lm_head__weight=emb + 0.5))


def test_an_unreadable_folder_holds_no_head_of_its_own(tmp_path):
    """A folder whose files cannot be read (no config.json, no weights, a config that is not JSON) is not called
    untied: head_of_its_own answers False and leaves the load's own checks to name the file."""
    from safetensors.torch import save_file

    from vlscale.modeling.backbones import head_of_its_own

    (tmp_path / "empty").mkdir()
    bad = tmp_path / "bad_config"
    bad.mkdir()
    (bad / "config.json").write_text("{")
    save_file({"lm_head.weight": torch.randn(4, 3)}, str(bad / "model.safetensors"))
    assert not head_of_its_own(tmp_path / "empty") and not head_of_its_own(bad)
