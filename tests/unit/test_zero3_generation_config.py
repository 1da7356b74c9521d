"""A pretrained backbone built under ZeRO-3 decodes with the checkpoint's generation defaults, as the same
checkpoint built whole (``from_pretrained``) does: facebook/bart-base's config.json carries
``no_repeat_ngram_size=3``, ``early_stopping`` and ``forced_bos_token_id``, which a model built from its
config object (under ``zero.Init``) lost, so training's evaluation under ZeRO-3 and ``launchers/evaluate.py``
without ``--deepspeed`` decoded the same adapter differently."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MINI_BART = ROOT / "vlscale" / "assets" / "backbones" / "mini-bart"

WORKER = r'''
import json, sys
sys.path.insert(0, sys.argv[1])
import torch.distributed as dist
from vlscale.engine.distributed import skip_inference_shm_kernel
skip_inference_shm_kernel()  # as init_distributed does: no build of DeepSpeed-Inference's kernel
dist.init_process_group("gloo")
from vlscale.engine.sharded_loading import build_lm_zero3
from vlscale.modeling.backbones import build_lm
ds = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}
out = {}
for folder in sys.argv[3:]:
    whole = build_lm("mini-bart", path=folder, pretrained=True).generation_config.to_dict()
    sharded = build_lm_zero3("mini-bart", ds_config=ds, path=folder, pretrained=True).generation_config.to_dict()
    out[folder] = [whole, sharded]
json.dump(out, open(sys.argv[2], "w"))
dist.destroy_process_group()
'''

BART_GENERATION = {"no_repeat_ngram_size": 3, "num_beams": 4, "early_stopping": True, "forced_bos_token_id": 3}


@pytest.mark.skipif(not MINI_BART.is_dir(), reason="miniature backbones not made")
def test_zero3_build_keeps_the_checkpoints_generation_defaults(tmp_path, preloaded):
    """The builds run in one rank forked from the preloaded server (zero.Init needs a process group)."""
    in_config = tmp_path / "in_config"  # bart-base's layout: the keys in config.json, no generation_config.json
    shutil.copytree(MINI_BART, in_config)
    (in_config / "generation_config.json").unlink()
    config = json.loads((in_config / "config.json").read_text())
    (in_config / "config.json").write_text(json.dumps({**config, **BART_GENERATION}))
    in_file = tmp_path / "in_file"  # a generation_config.json of its own
    shutil.copytree(MINI_BART, in_file)
    gen = json.loads((in_file / "generation_config.json").read_text())
    (in_file / "generation_config.json").write_text(json.dumps({**gen, **BART_GENERATION, "length_penalty": 2.0}))

    env = preloaded.one_rank_env(OMP_NUM_THREADS="1")
    result = tmp_path / "result.json"
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    proc = preloaded.run(script, [ROOT, result, in_config, in_file], env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    for folder, (whole, sharded) in json.loads(result.read_text()).items():
        for key, value in BART_GENERATION.items():
            assert whole[key] == value, (folder, key, whole[key])  # from_pretrained reads them
        ignore = {"transformers_version", "_from_model_config"}
        assert {k: v for k, v in sharded.items() if k not in ignore} == \
            {k: v for k, v in whole.items() if k not in ignore}, folder
