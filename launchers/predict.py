r"""Ask a trained adapter about your own image(s) or video: prints the answer.

    python launchers/predict.py --adapter runs/default/adapter --task vqa --image a.jpg --text "what color is the circle?"
    python launchers/predict.py --adapter DIR --task caption --image a.png
    python launchers/predict.py --adapter DIR --task nlvr2 --image left.png --image right.png --text "there are two circles."
    python launchers/predict.py --adapter DIR --task tvqa --video clip/ --text "which way does the red circle move?" \
        --option left --option right --option up --option down --option still [--subtitle "alice: look at this."]
    python launchers/predict.py --adapter DIR --task tvc --video clip.npy [--subtitle "..."]
    python launchers/predict.py --adapter DIR ... [--json] [--device cpu|cuda] [key=value ...]

The model is rebuilt as launchers/evaluate.py rebuilds it and the inputs go through the evaluation's own path
(task prefix, the run's CLIP transform; a cache-trained run's images or frames encoded as its cache was; the task's
decoding settings, NLVR2's larger of the true/false logits): :class:`vlscale.predict.Predictor`. Image tasks (vqa,
gqa, nlvr2 with two ``--image``, caption without ``--text``) and video tasks (tvqa, how2qa: ``--text`` the question
and its answer options, one ``--option`` each in order a0, a1, ...; tvc, yc2c without ``--text``; all with an
optional ``--subtitle``) the adapter was trained on. ``--video``: a folder of frame images (in name order, frames
2 before 10) or a frame-features file (``.npy``, ``.npz``, ``.safetensors``, L x D, of the run's CLIP width), the
frames picked as the run picks them (``model.max_frames``). ``key=value`` overrides as evaluate.py takes them
(``model.backbone_path=...`` where the run's weights moved). Video QA prints the option the answer names (as
evaluation decides it) and its text, ``a2: left``; an empty answer prints as ``(empty answer)``. ``--json`` prints
``{"task", "text", "images", "answer"}`` (video: ``"video"``, ``"options"``, ``"subtitle"`` instead of ``"images"``,
and for QA ``"option"``, ``"option_text"``: null when the answer names none; ``"answer"`` as it is, "" too). Bad
input (a missing or unreadable image or video, the wrong number of images, missing answer options, features of
another width, a task the adapter was not trained on) ends with one line naming it, before the model is built.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from vlscale.log import logs_to_console  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--adapter", required=True, type=os.path.expanduser,  # --adapter=~/x: no shell expands it there
                   help="an adapter/ directory written by launchers/train.py")
    p.add_argument("--task", required=True, help="vqa, gqa, nlvr2, caption, tvqa, how2qa, tvc, yc2c or a custom task "
                                                 "(one the adapter was trained on)")
    p.add_argument("--image", action="append", default=[], metavar="FILE", type=os.path.expanduser,
                   help="an image file (any format PIL reads); nlvr2: give it twice, left then right")
    p.add_argument("--video", metavar="PATH", type=os.path.expanduser,
                   help="video tasks: a folder of frame images, or a frame-features file (.npy, .npz, .safetensors)")
    p.add_argument("--text", default="", help="the question (vqa, gqa, tvqa, how2qa) or statement (nlvr2); none for "
                                              "caption, tvc, yc2c")
    p.add_argument("--option", action="append", default=[], metavar="TEXT",
                   help="tvqa, how2qa: an answer option (give each, in order: a0, a1, ...)")
    p.add_argument("--subtitle", default="", help="video tasks: the video's subtitle text (optional)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if there is one, else cpu)")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of the bare answer")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_intermixed_args(argv)
    if args.device is not None:
        from vlscale.engine.distributed import device_problem

        problem = device_problem(args.device)  # it was torch's error from inside the model's build
        if problem:
            p.error(f"--device {problem}")
    return args


def read_inputs(args, cfg):
    """The image arrays, or the video (frames or features), the command line names; refused in one line naming
    the flag before the model is built."""
    from vlscale.data.features import model_feature_dim
    from vlscale.data.tasks import get_task, is_task
    from vlscale.predict import check_request, read_image, read_video

    if not is_task(args.task):  # its line, not the flags' below: a video task's typo is no image task
        check_request(cfg.data.tasks, args.task, len(args.image), args.text)
    video = get_task(args.task).modality == "video"
    if video and (args.image or not args.video):
        raise ValueError(f"task {args.task!r} is a video task: give the video as --video (a folder of frame images "
                         f"or a frame-features file){', not --image' if args.image else ''}")
    if not video and args.video:
        raise ValueError(f"--video is for the video tasks (tvqa, how2qa, tvc, yc2c); task {args.task!r} takes --image")
    if not video and not args.image:
        raise ValueError(f"task {args.task!r} needs --image")
    check_request(cfg.data.tasks, args.task, len(args.image), args.text, args.option, args.subtitle)
    if video:
        return read_video(args.video, cfg.model.max_frames, model_feature_dim(cfg, "frames"), flag="--video")
    images = []
    for path in args.image:
        if not Path(path).is_file():
            what = "a folder, not an image file" if Path(path).is_dir() else "no such file"
            raise FileNotFoundError(f"--image {path}: {what}")
        images.append(read_image(path))
    return images


@logs_to_console
def main(argv=None) -> int:
    args = parse_args(argv)
    from vlscale.engine.distributed import quiet_library_warnings

    quiet_library_warnings()
    import transformers

    from vlscale.predict import Predictor, chosen_option, load_run_config

    cfg, _ = load_run_config(args.adapter, args.overrides)  # cheap: every input is checked before the build
    visual = read_inputs(args, cfg)
    transformers.utils.logging.disable_progress_bar()  # from_pretrained's "Loading weights" bar
    predictor = Predictor(args.adapter, args.overrides, device=args.device, who="predict.py")
    answer = predictor.predict(args.task, args.text, visual, options=args.option or None, subtitle=args.subtitle)
    out = {"task": args.task, "text": args.text, "answer": answer}
    if args.video:
        out.update(video=args.video, options=args.option, subtitle=args.subtitle)
    else:
        out["images"] = args.image
    if args.option:
        option = chosen_option(answer, args.option)
        out.update(option=option and option[0], option_text=option and option[1])
        if option is None:
            print(f"predict.py: note: the answer {answer!r} names none of the {len(args.option)} options",
                  file=sys.stderr)
    if args.json:
        print(json.dumps(out))
    else:
        blank = f"(empty answer{f': {answer!r}' if answer else ''})"  # not a blank line; --json keeps the string
        print(f"{out['option']}: {out['option_text']}" if out.get("option") else answer if answer.strip() else blank)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, KeyError, FileNotFoundError, RuntimeError, TypeError) as e:
        print(f"predict.py: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
