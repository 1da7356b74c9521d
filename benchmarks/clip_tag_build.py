"""Peak host memory and time of building a frozen CLIP tower from an open_clip tag's file (the whole CLIP's weights):
vlscale's build (the visual tower alone, only the file's ``visual.*`` tensors read) against open_clip's own
``create_model(name, pretrained=FILE).visual`` (the whole CLIP built and loaded, the tower kept), which vlscale used
before. Each build runs in a fresh process; its peak RSS (``ru_maxrss``) is taken after every tensor of the tower
has been read once (a safetensors file's tensors may be mapped, read in only when used); so is the time.
The file is made once, from a random whole CLIP, as a tag's ``open_clip_model.safetensors``.

    python benchmarks/clip_tag_build.py [--vision ViT-L-14-quickgelu] [--repeat 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
import torch, open_clip
from open_clip import pretrained as P
from vlscale.modeling.vision import build_vision_encoder, register_tiny_models
register_tiny_models()
name, file, how = {name!r}, {file!r}, {how!r}
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
if how == "vlscale":
    tag = {{"file": file, "quick_gelu": "quickgelu" in name}}
    P._PRETRAINED[name] = {{**P._PRETRAINED.get(name, {{}}), "benchtag": tag}}
    tower = build_vision_encoder(name, "benchtag").visual
else:
    tower = open_clip.create_model(name, pretrained=file).visual
with torch.no_grad():  # every tensor read once, as the first forward does (a file's pages come in only when read)
    total = sum(float(t.double().sum()) for t in tower.state_dict().values())
took = time.perf_counter() - t0
params = sum(p.numel() for p in tower.parameters())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"peak_rss_mib": peak / 1024, "imports_rss_mib": base / 1024, "seconds": took,
                  "tower_params": params}}))
"""


def build(name: str, file: str, how: str) -> dict:
    code = CHILD.format(root=str(ROOT), name=name, file=file, how=how)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        raise SystemExit(f"{how} build of {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--vision", default="ViT-B-32-quickgelu", help="open_clip model name (default ViT-B-32-quickgelu)")
    ap.add_argument("--repeat", type=int, default=2, help="builds of each kind, alternating (default 2)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="clip_tag_build_") as tmp:
        file = str(Path(tmp) / "open_clip_model.safetensors")
        made = subprocess.run([sys.executable, "-c", (
            "import sys, torch, open_clip; from safetensors.torch import save_file; "
            f"m = open_clip.create_model({args.vision!r}); "
            f"save_file({{k: v.contiguous() for k, v in m.state_dict().items()}}, {file!r})")],
            capture_output=True, text=True, check=False)
        if made.returncode:
            raise SystemExit(f"cannot make a {args.vision} checkpoint:\n{made.stderr[-3000:]}")
        runs = {"vlscale": [], "open_clip": []}
        for _ in range(args.repeat):
            for how in runs:
                runs[how].append(build(args.vision, file, how))
        size_mib = os.path.getsize(file) / 2**20
    best = {how: {k: min(r[k] for r in rs) for k in ("peak_rss_mib", "imports_rss_mib", "seconds")}
            | {"tower_params": rs[0]["tower_params"]} for how, rs in runs.items()}
    ratio = {k: best["vlscale"][k] / best["open_clip"][k] for k in ("peak_rss_mib", "seconds")}
    extra = {how: best[how]["peak_rss_mib"] - best[how]["imports_rss_mib"] for how in best}
    result = {"vision": args.vision, "file_mib": size_mib, "builds": best, "above_imports_mib": extra,
              "vlscale_over_open_clip": ratio, "repeat": args.repeat}
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{args.vision}: a tag's file of {size_mib:.0f} MiB (the whole CLIP), best of {args.repeat} fresh builds "
          "each")
    for how, b in best.items():
        print(f"  {how:9s} peak RSS {b['peak_rss_mib']:7.0f} MiB ({extra[how]:6.0f} above the imports), "
              f"{b['seconds']:5.2f} s, tower {b['tower_params'] / 1e6:.1f} M parameters")
    print(f"  vlscale / open_clip: peak RSS x{ratio['peak_rss_mib']:.2f}, above the imports "
          f"x{extra['vlscale'] / extra['open_clip']:.2f}, time x{ratio['seconds']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
