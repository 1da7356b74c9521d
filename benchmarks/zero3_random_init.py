"""Does a random-weight ZeRO-3 build equal a whole build with the same seed on this machine's accelerator?

    python benchmarks/zero3_random_init.py [--json OUT]      # one process; on a GPU, or on CPU

vlscale.engine.sharded_loading claims it does (tests/integration/test_sharded_loading.py checks it on CPU),
so that ``launchers/evaluate.py`` without ``--deepspeed`` rebuilds the frozen backbone a ZeRO-3 run trained
on. On a GPU, ``zero.Init`` creates the LM's tensors on the device, so their initialisation may draw from the
GPU's generator, not the host's, and differ (the 2026-12-04 GPU-readiness audit; not yet seen on a GPU).
For the adapter, LoRA and prompt methods: the names of the tensors that differ (LM, PEFT, other) and the
largest difference. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args()
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(k, v)
    from vlscale.engine.distributed import free_port, init_distributed

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    d = init_distributed()
    import torch

    from vlscale.config import load_config
    from vlscale.engine.deepspeed_config import build_deepspeed_config
    from vlscale.engine.sharded_loading import build_model_zero3, gather_full_state_dict
    from vlscale.engine.trainer import seed_everything
    from vlscale.modeling.vl_model import build_model

    base = ["model.backbone=tiny-t5", "model.vision=tiny-clip-rn", "model.pretrained=false",
            "model.vision_pretrained=null", "model.tokenizer=synthetic", "train.micro_batch_size=2"]
    res = {"device": str(d.device), "methods": {}}
    for method in ("adapter", "lora", "prompt"):
        cfg = load_config(None, base + [f"peft.method={method}"])
        ds = build_deepspeed_config(str(ROOT / "ds_configs/zero3.json"), cfg, 1, device_type=d.device.type)
        seed_everything(3)
        whole = build_model(cfg, vocab_size=64)
        seed_everything(3)
        zero3, _, _ = build_model_zero3(cfg, ds, 64, torch.float32)
        a, b = gather_full_state_dict(whole), gather_full_state_dict(zero3)
        differ = sorted(k for k in a if not torch.equal(a[k].float(), b[k].float()))
        res["methods"][method] = {
            "tensors": len(a), "differ": len(differ),
            "differ_lm": sum(k.startswith("lm.") for k in differ),
            "differ_peft": sum(k.startswith("peft.") for k in differ),
            "first": differ[:5],
            "max_abs_diff": max((float((a[k].float() - b[k].float()).abs().max()) for k in differ), default=0.0)}
    text = json.dumps(res, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
