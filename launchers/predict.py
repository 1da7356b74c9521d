"""Ask a trained adapter about your own image(s): prints the answer.

    python launchers/predict.py --adapter runs/default/adapter --task vqa --image a.jpg --text "what color is the circle?"
    python launchers/predict.py --adapter DIR --task caption --image a.png
    python launchers/predict.py --adapter DIR --task nlvr2 --image left.png --image right.png --text "there are two circles."
    python launchers/predict.py --adapter DIR ... [--json] [--device cpu|cuda] [key=value ...]

The model is rebuilt as launchers/evaluate.py rebuilds it and the inputs go through the evaluation's own path
(task prefix, the run's CLIP transform; a cache-trained run's images encoded as its cache was; the task's decoding
settings, NLVR2's larger of the true/false logits): :class:`vlscale.predict.Predictor`. Image tasks (vqa, gqa,
nlvr2 with two ``--image``, caption without ``--text``) the adapter was trained on. ``key=value`` overrides as
evaluate.py takes them (``model.backbone_path=...`` where the run's weights moved). ``--json`` prints
``{"task", "text", "images", "answer"}``. Bad input (a missing or unreadable image, the wrong number of images, a
task the adapter was not trained on) ends with one line naming it, before the model is built.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from vlscale.log import logs_to_console  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", required=True, help="an adapter/ directory written by launchers/train.py")
    p.add_argument("--task", required=True, help="vqa, gqa, nlvr2 or caption (one the adapter was trained on)")
    p.add_argument("--image", action="append", required=True, metavar="FILE",
                   help="an image file (any format PIL reads); nlvr2: give it twice, left then right")
    p.add_argument("--text", default="", help="the question (vqa, gqa) or statement (nlvr2); none for caption")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if there is one, else cpu)")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of the bare answer")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_intermixed_args(argv)


@logs_to_console
def main(argv=None) -> int:
    args = parse_args(argv)
    from vlscale.engine.distributed import quiet_library_warnings

    quiet_library_warnings()
    import transformers

    from vlscale.predict import Predictor, check_request, load_run_config, read_image

    cfg, _ = load_run_config(args.adapter, args.overrides)  # cheap: every input is checked before the build
    check_request(cfg.data.tasks, args.task, len(args.image), args.text)
    images = []
    for path in args.image:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--image {path}: no such file")
        images.append(read_image(path))
    transformers.utils.logging.disable_progress_bar()  # from_pretrained's "Loading weights" bar
    predictor = Predictor(args.adapter, args.overrides, device=args.device, who="predict.py")
    answer = predictor.predict(args.task, args.text, images)
    if args.json:
        print(json.dumps({"task": args.task, "text": args.text, "images": args.image, "answer": answer}))
    else:
        print(answer)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, KeyError, FileNotFoundError, RuntimeError, TypeError) as e:
        print(f"predict.py: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
