"""A trained adapter, rebuilt for inference: the model launchers/evaluate.py evaluates, and :class:`Predictor`,
which asks it about your own images.

    from vlscale.predict import Predictor

    model = Predictor("runs/default/adapter")                  # device: cuda if there is one, else cpu
    model.predict("vqa", "what color is the circle?", "a.png")  # -> "red"
    model.predict("caption", "", "a.png")                       # -> "a small red circle ..."
    model.predict("nlvr2", "there are two circles.", ["left.png", "right.png"])   # -> "true" / "false"
    model.predict("vqa", ["q1?", "q2?"], ["a.png", "b.png"])    # a list of questions -> a list of answers
    model.predict("tvqa", "which way does the red circle move?", "clip/",          # a folder of frame images
                  options=["left", "right", "up", "down", "still"], subtitle="alice: look at this.")  # -> "a0"
    model.predict("tvc", "", "clip.npy", subtitle="alice: look at this.")         # frame features -> a caption

The model is rebuilt from the adapter's ``adapter_config.json`` by :func:`load_run_config` and
:func:`load_trained_model`, as evaluate.py rebuilds it (the frozen weights checked against the run's
fingerprint). Images (file paths PIL reads, uint8 ``(H, W, 3)`` arrays or PIL images) and text go through the
evaluation's own path: an :class:`~vlscale.data.tasks.Example` per input, the run's
:class:`~vlscale.data.collate.Collator` (task prefix, text formatting, the run's CLIP transform and image size)
and :func:`vlscale.engine.evaluation.predict_task` (the task's beams and token budget; NLVR2's larger of the
true/false logits). A run trained on cached features (``model.feature_source=cache``) has no CLIP in its model:
its images are encoded with ``model.vision`` + ``model.vision_pretrained`` as launchers/extract_features.py
encodes them (:func:`vlscale.data.features.grid_features`), the weights checked against the fingerprint of those the
run's cache was made with (:func:`cache_weights_problem`).

Video tasks (tvqa, how2qa, tvc, yc2c): a video is a folder of frame images (in name order), a sequence of images,
or a frame-features file (``.npy`` / ``.npz`` / ``.safetensors``, as :class:`~vlscale.data.video.VideoFeatureFolder`
reads them; of ``model.vision``'s width) or (L, D) array (:func:`read_video`), as training reads a video from either;
its frames are the ones the collator picks (``model.max_frames``), and a cache-trained run's frames are encoded as
the extraction encodes them (:func:`vlscale.data.features.frame_features`). The question, options and subtitle are formatted as the data's
(:func:`vlscale.data.video.qa_text`); video QA's answer is the prediction evaluation records ("a2" when the model
names an option), and :func:`chosen_option` the option it names as evaluation decides (name and text).
"""

from __future__ import annotations

import numbers
import shlex
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Optional, Sequence, Union

MODEL_SECTIONS = ("model", "peft")
# Where the frozen weights load from may change (the same files elsewhere), as on --resume (trainer.RESUMABLE_CHANGES):
# the weights built from there are compared with the fingerprint in the run's checkpoint (frozen_weights_problem).
RELOCATABLE = (("model", "backbone_path"), ("model", "vision_pretrained"))


def load_run_config(adapter_dir, overrides, who: Optional[str] = None):
    """The adapter's run config with evaluation overrides; refuses overrides that change the model. With ``who``
    (the program that will use the adapter), a note from it where the adapter was trained with another vlscale
    version or torch major (:func:`vlscale.provenance.print_version_note`); None notes nothing."""
    from vlscale.config import _deep_merge, config_from_dict, parse_overrides
    from vlscale.engine.checkpoint import read_adapter_config
    from vlscale.provenance import print_version_note

    meta = read_adapter_config(adapter_dir)
    saved = meta["run_config"]
    cfg = config_from_dict(_deep_merge(saved, parse_overrides(overrides)))
    new = cfg.to_dict()
    meta["relocated"] = [f"{s}.{k}" for s, k in RELOCATABLE if k in saved[s] and new[s][k] != saved[s][k]]
    fixed = [(s, k) for s in MODEL_SECTIONS for k in saved[s] if (s, k) not in RELOCATABLE] + \
        [("data", "tasks"), ("train", "seed")]
    for section, key in fixed:
        if new[section][key] != saved[section][key]:
            hint = ("use --tasks to evaluate a subset of tasks" if (section, key) == ("data", "tasks") else
                    "drop the override: an adapter is evaluated on the model it was trained with")
            raise ValueError(f"override {section}.{key}={new[section][key]!r} would change the model the adapter "
                             f"was trained with ({section}.{key}={saved[section][key]!r}); {hint}")
    if who is not None:
        print_version_note(meta, who)
    return cfg, meta


def frozen_weights_problem(model, adapter_dir, meta, device=None, who: str = "evaluate.py") -> Optional[str]:
    """Why the frozen weights built now are not the training run's (compared with the fingerprint the adapter,
    else the run's latest checkpoint, recorded), or None: with model.backbone_path / model.vision_pretrained
    changed, and also where they did not, since the files there (or a hub id's cache) may have changed since
    training. Without a fingerprint to compare with, a note (from ``who``) says moved weights are not checked."""
    from vlscale.engine import checkpoint as ckpt

    saved = meta.get("frozen")
    root = Path(adapter_dir).resolve().parent / "checkpoints"
    if saved is None:
        try:
            tag = ckpt.latest_tag(root)
            saved = ckpt.read_client_state(root / tag / "client_state_rank0.json").get("frozen") if tag else None
        except ckpt.CheckpointError:
            saved = None
    changed = ", ".join(meta["relocated"])
    if not saved:
        if changed:
            print(f"{who}: note: {changed} changed; no checkpoint of the run in {root} to check the frozen "
                  f"weights against: they are assumed to be the training run's", file=sys.stderr)
        return None
    problem = ckpt.frozen_mismatch(saved, ckpt.frozen_fingerprint(model, device))
    if problem and changed:
        return (f"{changed} changed, and the frozen weights built from there are not the training run's: "
                f"{problem}; point them at the weights the adapter was trained on")
    if problem:
        m = meta["run_config"]["model"]
        where = ", ".join(f"model.{k}={m[k]!r}" for k in ("backbone", "backbone_path", "vision_pretrained") if m.get(k))
        return (f"the frozen weights built now ({where}) are not the ones the adapter was trained on: {problem}; "
                f"the files changed since training? point model.backbone_path / model.vision_pretrained at the "
                f"weights the adapter was trained on")
    return None


def cache_weights_problem(encoder, cfg, meta, who: str = "vlscale") -> Optional[str]:
    """Why the CLIP ``encoder`` built now for a cache-trained run (``model.vision_pretrained``) is not the one the
    run's feature cache was made with (the fingerprint the adapter recorded: ``feature_cache``), or None: its
    features are what the adapter learned from. Without a fingerprint (an older run or cache), a note (from
    ``who``) where model.vision_pretrained changed says the weights are not checked."""
    from vlscale.data.features import cache_encoder_problem

    cache = meta.get("feature_cache") or {}
    if not cache.get("fingerprint"):
        if "model.vision_pretrained" in meta["relocated"]:
            print(f"{who}: note: model.vision_pretrained changed; the run's feature cache records no fingerprint of "
                  f"the CLIP weights it was made with: they are assumed to be those", file=sys.stderr)
        return None
    return cache_encoder_problem(encoder, cfg, cache, f"the run's feature cache {cache.get('folder')} was made with",
                                 "the adapter learned from that cache's features: point model.vision_pretrained at "
                                 "the weights the cache was made with")


def cache_changed_problem(cfg, meta) -> Optional[str]:
    """Why the feature cache an evaluation of a cache-trained run reads (``data.feature_cache``, as the adapter's
    config or an override names it) holds features of other CLIP weights than the cache the run learned from (the
    fingerprint its adapter recorded: ``feature_cache``), or None (:func:`vlscale.data.features.cache_changed`). A
    cache re-extracted at the same path with other weights scored the adapter on features it never saw."""
    from vlscale.data.features import cache_changed

    return cache_changed(cfg, meta.get("feature_cache"), "evaluate with that cache, or one extracted with the same "
                                                         "weights")


def adapter_tokenizer(cfg, meta):
    """The run's tokenizer, rebuilt; refused when its size is not the adapter's."""
    from vlscale.data import build_tokenizer

    tokenizer = build_tokenizer(cfg)
    if len(tokenizer) != meta["vocab_size"]:
        raise ValueError(f"the rebuilt tokenizer has {len(tokenizer)} tokens; the adapter was trained with "
                         f"{meta['vocab_size']} ({meta.get('tokenizer')}); check model.tokenizer / extra tokens")
    return tokenizer


def inference_dtype(cfg, device, who: Optional[str] = None) -> tuple["torch.dtype", bool]:  # noqa: F821
    """(the dtype the model runs in on ``device``, whether it is ``train.precision``'s). fp16 has no CPU kernels:
    there the model runs in fp32 (which holds fp16-trained weights exactly), ``cfg.train.precision`` is set to
    fp32 and ``who`` (when given) says so."""
    import torch

    from vlscale.config import torch_dtype

    dtype = torch_dtype(cfg.train.precision)
    if dtype == torch.bfloat16 and who and torch.device(device).type == "cuda":
        from vlscale.engine.distributed import precision_problem

        if precision_problem("bf16", device):  # training there is refused; evaluating goes on, said
            dev = torch.device(device)
            print(f"{who}: note: the adapter was trained in bf16, which {torch.cuda.get_device_name(dev)} (compute "
                  f"capability {'.'.join(map(str, torch.cuda.get_device_capability(dev)))}) only emulates, slowly: "
                  f"evaluating in bf16; train.precision=fp32 evaluates in fp32 (twice bf16's memory for the model)",
                  file=sys.stderr, flush=True)
    if dtype == torch.float16 and torch.device(device).type == "cpu":
        cfg.train.precision = "fp32"
        if who:
            print(f"{who}: note: the adapter was trained in fp16, which has no CPU kernels: evaluating in fp32",
                  file=sys.stderr, flush=True)
        return torch.float32, False
    return dtype, True


def load_trained_model(cfg, meta, adapter_dir, device, dtype, check_frozen: bool = True, build=None,
                       who: str = "evaluate.py", collective: bool = False):
    """The adapter's model: built as the run built it (``build``: a callable that builds it otherwise, e.g.
    evaluate.py's ZeRO-3 build; by default one process's model, on ``device``, the random frozen weights drawn
    from ``train.seed``), the adapter loaded strictly and, with ``check_frozen`` (the model in the run's
    dtype: :func:`inference_dtype`), the frozen weights checked against the run's fingerprint. A file that
    does not fit is named before anything is built (on the meta device). ``collective``: every rank of the process
    group calls it (evaluate.py on several ranks): a rank that cannot read the adapter's files is refused on every
    rank (:func:`vlscale.engine.checkpoint.load_adapter`)."""
    from vlscale.engine.checkpoint import load_adapter
    from vlscale.engine.trainer import seed_everything
    from vlscale.modeling.vl_model import build_model

    load_adapter(build_model(cfg, vocab_size=meta["vocab_size"], device="meta"), adapter_dir, check_only=True,
                 meta=meta, collective=collective)
    if build is None:
        seed_everything(cfg.train.seed)  # the same frozen random weights as the training run built
        model = build_model(cfg, vocab_size=meta["vocab_size"], device="cpu", dtype=dtype).to(device)
    else:
        model = build()
    load_adapter(model, adapter_dir, meta=meta, collective=collective)  # weights of meta's step, or refused
    if check_frozen:  # fingerprints are of the run's dtype; the files may have changed even where unmoved
        problem = frozen_weights_problem(model, adapter_dir, meta, device, who)
        if problem:
            raise ValueError(problem)
    return model


Image = Union[str, Path, "numpy.ndarray", "PIL.Image.Image"]  # noqa: F821
Video = Union[str, Path, Sequence[Image], "torch.Tensor", "numpy.ndarray"]  # noqa: F821


VIDEO_FILES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv")


def check_request(tasks: Sequence[str], task: str, n_images: int, text: str,
                  options: Optional[Sequence[str]] = None, subtitle: Optional[str] = None) -> None:
    """Refuse, in one line, what an adapter trained on ``tasks`` cannot answer: an unknown task, one it was not
    trained on (no weights for it with per-task modules), the wrong number of images, a question task without a
    question, a caption with text (the run's captions are the prefix alone, a video's its subtitle); video QA
    (tvqa, how2qa) without its answer options (at least two, as the data's a0, a1, ...), options or a subtitle
    for a task whose inputs have none. ``n_images`` is not checked for a video task (one video per input)."""
    from vlscale.data.tasks import get_task, is_task

    if not is_task(task):
        raise ValueError(f"unknown task {task!r}; this adapter was trained on {list(tasks)}")
    spec = get_task(task)
    if isinstance(options, str) and options:  # read one character per option ("": none, as [] is)
        raise ValueError(f"task {task!r}: options are a list of the answer options' texts, got one string {options!r}")
    if task not in tasks:
        raise ValueError(f"the adapter was not trained on task {task!r} and has no weights for it; it was trained "
                         f"on {list(tasks)} (data.tasks)")
    choice = spec.modality == "video" and spec.target == "choice"
    if options and not choice:
        raise ValueError(f"task {task!r} takes no answer options (only video QA does: tvqa, how2qa), "
                         f"got {len(options)}")
    if subtitle and spec.modality != "video":
        raise ValueError(f"task {task!r} takes no subtitle (only the video tasks do), got {subtitle!r}")
    if choice:
        options = list(options or [])
        if len(options) < 2:
            raise ValueError(f"task {task!r} needs its answer options (--option / options=, at least 2: a0, a1, "
                             f"...), got {len(options)}")
        empty = [f"a{i}" for i, o in enumerate(options) if not isinstance(o, str) or not o.strip()]
        if empty:
            raise ValueError(f"task {task!r}: answer option {empty[0]} is empty (options {options!r})")
    elif spec.modality == "image" and n_images != spec.n_images:
        raise ValueError(f"task {task!r} takes {spec.n_images} image(s) per question, got {n_images}")
    if spec.target == "caption" and text:
        inputs = "its subtitle (--subtitle / subtitle=), if any" if spec.modality == "video" else \
            f"the prefix {spec.prefix!r} alone"
        raise ValueError(f"task {task!r} takes no text (the run's caption inputs are {inputs}), got {text!r}")
    if spec.target != "caption" and not text.strip():
        raise ValueError(f"task {task!r} needs a text (the question or statement), got {text!r}")


def chosen_option(prediction: str, options: Sequence[str]) -> Optional[tuple[str, str]]:
    """The answer option a video QA prediction names, as evaluation decides it (its name "a2", or an option's text:
    :func:`vlscale.engine.evaluation.option_index`): (name, text), or None when it names none."""
    from vlscale.engine.evaluation import option_index

    if isinstance(options, str):  # ("a1", "xy") named "y"
        raise TypeError(f"chosen_option: options are a list of the answer options' texts, got one string {options!r}")
    options = [o.strip() for o in options]
    i = option_index(prediction, options)
    return None if i is None else (f"a{i}", options[i])


def _frame_features_given(video: Video) -> bool:
    """Whether :func:`read_video` reads ``video`` as frame features (a file, an array), not frames."""
    if isinstance(video, (str, Path)):
        return not Path(video).is_dir()
    return hasattr(video, "shape")  # a tensor or an array; a sequence of frames has none


def read_video(video: Video, max_frames: int, expect_dim: Optional[int] = None, flag: str = "video"):
    """A video as the run's sources give it: a folder of frame images (in name order, as ImageFolder and
    launchers/extract_features.py read them) or a sequence of images -> the uint8 (H, W, 3) frames the collator
    picks (:func:`~vlscale.data.collate.frame_indices`, ``model.max_frames``), only those read; a ``.npy`` /
    ``.npz`` / ``.safetensors`` file of frame features (as VideoFeatureFolder reads them) or an (L, D) array ->
    float32 (L, D), D checked against ``expect_dim`` (the collator picks their frames). Errors name ``flag``."""
    import numpy as np
    import torch

    from vlscale.data.collate import frame_indices
    from vlscale.data.video import VideoFeatureFolder, check_frame_features, read_frame_features
    from vlscale.data.visual import read_frames

    if isinstance(video, (str, Path)):
        path = Path(video)
        if path.is_dir():
            return read_frames(path, f"{flag} {path}", max_frames)
        if not path.exists():
            raise FileNotFoundError(f"{flag} {path}: no such folder or file")
        if path.suffix not in VideoFeatureFolder.SUFFIXES:
            decode = ("; video files are not decoded: write its frames into a folder first (e.g. ffmpeg -i "
                      f"{shlex.quote(str(path))} -vf fps=1 FOLDER/%05d.jpg)") \
                if path.suffix.lower() in VIDEO_FILES else ""
            raise ValueError(f"{flag} {path}: a video is a folder of frame images or a file of frame features "
                             f"({', '.join(VideoFeatureFolder.SUFFIXES)}){decode}")
        return read_frame_features(path, expect_dim, f"{flag} {path}")
    if isinstance(video, (torch.Tensor, np.ndarray)):
        feats = torch.as_tensor(video)
        check_frame_features(f"{flag} features", tuple(feats.shape), expect_dim)
        return feats.float()
    frames = list(video)
    if not frames:
        raise ValueError(f"{flag}: no frames (an empty sequence)")
    return [read_image(frames[i]) for i in frame_indices(len(frames), max_frames)]


def read_image(image: Image) -> "numpy.ndarray":  # noqa: F821
    """A file path (any format PIL reads), a PIL image or a uint8 (H, W, 3) array -> uint8 RGB (H, W, 3)."""
    import numpy as np

    from vlscale.data.visual import load_image

    if isinstance(image, (str, Path)):
        return load_image(Path(image))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"an image array must be uint8 (H, W, 3) RGB, got {image.dtype} {image.shape}")
        return image
    if hasattr(image, "convert"):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    raise TypeError(f"an image is a file path, a PIL image or a uint8 (H, W, 3) array, got {type(image).__name__}")


class Predictor:
    """Answers a trained adapter gives to your own images and text (see the module docstring).

    ``adapter_dir``: a run's ``adapter/``; ``overrides``: ``key=value`` as evaluate.py takes them (only those
    that keep the model: ``model.backbone_path`` / ``model.vision_pretrained`` where the run's weights moved);
    ``device``: default cuda if there is one, else cpu. ``batch_size`` (default ``train.eval_batch_size``):
    inputs per forward pass when :meth:`predict` gets lists."""

    def __init__(self, adapter_dir, overrides: Sequence[str] = (), device=None, batch_size: Optional[int] = None,
                 who: str = "vlscale"):
        import torch

        from vlscale.data import Collator
        from vlscale.engine.distributed import device_problem, local_device_type

        # torch's error, after the config's read; an int is torch's (and HF pipelines') cuda:N
        problem = None if device is None else device_problem(device if isinstance(device, int) else str(device))
        if problem:
            raise ValueError(f"device {problem}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral)
                                       or batch_size < 1):  # -1 answered nothing: a list of None
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer (inputs per forward pass)")
        self.device = torch.device(device or local_device_type())
        self.cfg, self.meta = load_run_config(adapter_dir, overrides, who)
        self.tasks = list(self.cfg.data.tasks)
        self.tokenizer = adapter_tokenizer(self.cfg, self.meta)
        self.dtype, same = inference_dtype(self.cfg, self.device, who)
        self.model = load_trained_model(self.cfg, self.meta, adapter_dir, self.device, self.dtype, same, who=who)
        self.model.eval()
        self.batch_size = batch_size or self.cfg.train.eval_batch_size
        self.collator = Collator(self.tokenizer, self.cfg)
        self.encoder = None
        if self.model.vision is None:  # trained on cached features: the images are encoded as the cache's were
            from vlscale.modeling.vision import build_vision_encoder

            self.encoder = build_vision_encoder(self.cfg.model.vision, self.cfg.model.vision_pretrained,
                                                device=self.device)
            problem = cache_weights_problem(self.encoder, self.cfg, self.meta, who)
            if problem:
                raise ValueError(problem)

    def predict(self, task: str, text: Union[str, Sequence[str]], images, options=None,
                subtitle=None) -> Union[str, list[str]]:
        """The answer to ``text`` about ``images``: one image (NLVR2: a list of two; a video task: one video, see
        :func:`read_video`) for a string, or lists of them for a list of strings (``images[i]`` is the i-th
        input's), answered in batches. Video tasks: ``text`` is TVQA's / How2QA's question (empty for TVC, YC2C),
        ``options`` its answer options and ``subtitle`` the video's subtitle text (lists of them with a list of
        strings). The answer is the prediction evaluation records (video QA: the option's name, "a2", when the
        model names one: :func:`chosen_option` gives its text)."""
        from vlscale.data.tasks import get_task, is_task

        self._declare_custom_tasks(task)

        single = isinstance(text, str)
        if not single and not isinstance(text, Iterable):  # a list, a tuple, an array of strings (pandas' .values)
            raise TypeError(f"text must be a string (the question; '' for a caption) or a list of them, got "
                            f"{type(text).__name__}")
        texts = [text] if single else list(text)
        n = len(texts)
        wrong = [(i, t) for i, t in enumerate(texts) if not isinstance(t, str)]
        if wrong:
            i, t = wrong[0]
            raise TypeError(f"text[{i}] must be a string (the question; '' for a caption), got {t!r}")
        video = is_task(task) and get_task(task).modality == "video"
        if not single and (isinstance(images, (str, Path)) or hasattr(images, "convert") or
                           len(getattr(images, "shape", ())) == (2 if video else 3)):  # one input's, not a list
            raise ValueError(f"{n} texts take a list of {n} image inputs (images[i]: the i-th text's), got one "
                             f"{type(images).__name__}")
        if not single and isinstance(subtitle, str):
            raise ValueError(f"{n} texts take a list of {n} subtitles (subtitle[i]: the i-th text's), got one str")
        per_input = [images] if single else list(images)
        options = [options] if single else list(options) if options is not None else [None] * n
        subtitles = [subtitle] if single else list(subtitle) if subtitle is not None else [None] * n
        if not single and any(isinstance(o, str) for o in options):  # each text's, its own (read once: a generator)
            raise ValueError(f"{n} texts take a list of {n} option lists (options[i]: the i-th text's answer options), "
                             "got a list of strings")
        for what, given in (("image inputs", per_input), ("option lists", options), ("subtitles", subtitles)):
            if len(given) != n:
                raise ValueError(f"{n} texts but {len(given)} {what}")
        if not video:
            per_input = [list(x) if isinstance(x, (list, tuple)) else [x] for x in per_input]
        for t, imgs, o, sub in zip(texts, per_input, options, subtitles):
            check_request(self.tasks, task, 1 if video else len(imgs), t, o, sub)
        # a batch holds frames or frame features, not both: videos of each kind are batched apart (in their order)
        groups: dict[bool, list[int]] = {}
        for i, v in enumerate(per_input):
            groups.setdefault(video and _frame_features_given(v), []).append(i)
        answers: list = [None] * n
        for idx in groups.values():
            for start in range(0, len(idx), self.batch_size):
                part = idx[start:start + self.batch_size]
                got = self._predict_batch(task, [texts[i] for i in part], [per_input[i] for i in part],
                                          [options[i] for i in part], [subtitles[i] for i in part])
                for i, answer in zip(part, got):
                    answers[i] = answer
        return answers[0] if single else answers

    def batch(self, task: str, texts: list[str], images: list, options: Optional[list] = None,
              subtitles: Optional[list] = None) -> dict:
        """The model's batch of these inputs, as evaluation collates a split's examples (:meth:`predict`)."""
        import torch

        from vlscale.data.features import frame_features, grid_features, model_feature_dim
        from vlscale.data.tasks import Example, get_task
        from vlscale.data.video import qa_text
        from vlscale.modeling.vision import image_transform

        self._declare_custom_tasks(task)
        transform = (image_transform(self.cfg.model.vision, self.cfg.model.vision_pretrained)
                     if self.encoder is not None else None)
        texts = [t.strip() for t in texts]  # as the loaders read a record's text
        if get_task(task).modality == "video":  # one video per input, its text formatted as the data's
            visuals = [read_video(v, self.cfg.model.max_frames, model_feature_dim(self.cfg, "frames")) for v in images]
            if self.encoder is not None:  # frames encoded as the cache's were
                visuals = [v if isinstance(v, torch.Tensor) else frame_features(self.encoder, transform, v, self.device)
                           for v in visuals]
            visuals = [[v] for v in visuals]
            subs = [(s or "").strip() for s in subtitles or [None] * len(texts)]
            texts = [qa_text(t, [o.strip() for o in opts], sub) if opts else sub
                     for t, opts, sub in zip(texts, options or [None] * len(texts), subs)]
        else:
            visuals = [[read_image(x) for x in imgs] for imgs in images]
            if self.encoder is not None:
                flat = grid_features(self.encoder, transform, [x for v in visuals for x in v], self.device)
                n = len(visuals[0])
                visuals = [list(flat[i * n:(i + 1) * n]) for i in range(len(visuals))]
        examples = [Example(task=task, uid=str(i), text=t, target="", image_ids=[f"image{k}" for k in range(len(v))])
                    for i, (t, v) in enumerate(zip(texts, visuals))]
        return self.collator(examples, visuals)

    def _declare_custom_tasks(self, task: str) -> None:
        """This adapter's ``data.custom_tasks`` as the process's declarations (vlscale.data.tasks' registry) before
        a custom ``task`` is looked up: a Predictor loaded later (or any config) that declares the same name otherwise
        (another prefix or like) replaced them, and this adapter's inputs would have been built as that one's. A
        built-in task's spec is fixed (and the arguments' checks run before anything of the adapter is read)."""
        from vlscale.data.tasks import TASKS, declare_custom_tasks

        if task not in TASKS and self.cfg.data.custom_tasks:
            declare_custom_tasks(self.cfg.data.custom_tasks)

    def _predict_batch(self, task: str, texts: list[str], images: list, options: list, subtitles: list) -> list[str]:
        from vlscale.engine.evaluation import predict_task

        records = predict_task(self.model, self.tokenizer, [self.batch(task, texts, images, options, subtitles)], task,
                               device=self.device, float_dtype=self.dtype)
        return [r["prediction"] for r in records]
