"""Peak host memory of ``vlscale.engine.checkpoint.load_adapter`` per rank, at ZeRO-3, for a full fine-tuning adapter
(``peft.method=none peft.train_lm=true``: every weight of the language model is in ``adapter/``).

Each rank builds the model under ``zero.Init`` with random weights (``model.pretrained=false``; tiny CLIP), saves its
adapter, builds it again with other weights, and loads the adapter, while a thread samples the process's
anonymous resident memory (``RssAnon``: tensors; the file's pages, mapped by safetensors, are ``RssFile``, page cache
the kernel can drop) every millisecond. Printed per rank: the peak of ``RssAnon`` during the load above its value
before, the peak of ``RssFile`` likewise, the largest number of elements gathered at once (``GatheredParameters``),
and the load's wall time. One JSON line on rank 0.

    MALLOC_MMAP_THRESHOLD_=131072 torchrun --nproc_per_node 2 --master_port PORT benchmarks/adapter_load_memory.py \
        [key=value ...]     (default model.backbone=t5-base: 223 M trained parameters, 0.9 GB in fp32)

The fixed malloc threshold returns freed tensors to the system (a dynamic one kept the first build's memory for
reuse, hiding the load's), so ``RssAnon`` is what is live.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import threading
import time
from pathlib import Path


def rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


class Peak(threading.Thread):
    """The highest RssAnon and RssFile (kB) while it runs."""

    def __init__(self):
        super().__init__(daemon=True)
        self.anon, self.file, self.done = rss_kb("RssAnon"), rss_kb("RssFile"), threading.Event()

    def run(self):
        while not self.done.is_set():
            self.anon, self.file = max(self.anon, rss_kb("RssAnon")), max(self.file, rss_kb("RssFile"))
            time.sleep(0.001)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="run-config overrides (after the defaults above)")
    overrides = ap.parse_args(argv).overrides

    import torch

    from vlscale.config import load_config
    from vlscale.engine import checkpoint as ckpt
    from vlscale.engine.distributed import all_gather_object, broadcast_object, init_distributed
    from vlscale.engine.sharded_loading import build_model_zero3

    dist = init_distributed()
    cfg = load_config(None, ["model.backbone=t5-base", "model.vision=tiny-clip-rn", "model.pretrained=false",
                             "model.vision_pretrained=null", "model.tokenizer=synthetic", "peft.method=none",
                             "peft.train_lm=true", *overrides])
    ds = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}
    folder = broadcast_object(tempfile.mkdtemp(prefix="adapter_load_memory_") if dist.rank == 0 else None)
    adapter = Path(folder) / "adapter"

    torch.manual_seed(1)
    model, keep = build_model_zero3(cfg, ds, 32128)[:2]
    ckpt.save_adapter(model, adapter, cfg, vocab_size=32128, rank=dist.rank)
    del model, keep
    gc.collect()
    torch.manual_seed(2)
    model, keep = build_model_zero3(cfg, ds, 32128)[:2]
    trained = sum(int(getattr(p, "ds_numel", p.numel())) for _, p in ckpt.trainable_parameters(model))

    gathered, real = [], ckpt._gathered

    def counted(params, modifier_rank):
        gathered.append(sum(int(p.ds_numel) for p in params if ckpt.is_partitioned(p)))
        return real(params, modifier_rank)

    ckpt._gathered = counted
    gc.collect()
    peak = Peak()
    before_anon, before_file = peak.anon, peak.file
    peak.start()
    t0 = time.perf_counter()
    ckpt.load_adapter(model, adapter)
    seconds = time.perf_counter() - t0
    peak.done.set()
    peak.join()
    ckpt._gathered = real
    mine = {"rank": dist.rank, "load_s": round(seconds, 2), "peak_anon_mb": round((peak.anon - before_anon) / 1024),
            "peak_file_mb": round((peak.file - before_file) / 1024), "most_gathered": max(gathered, default=0),
            "gathers": len(gathered)}
    ranks = all_gather_object(mine)
    if dist.rank == 0:
        size = (adapter / ckpt.ADAPTER_WEIGHTS).stat().st_size
        print(json.dumps({"backbone": cfg.model.backbone, "trained_params": trained, "file_mb": round(size / 2**20),
                          "world_size": dist.world_size, "ranks": ranks}))
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
