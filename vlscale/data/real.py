"""Real datasets: the on-disk layout, the dispatch by task, and the record checks every loader shares.

``load_real_examples(cfg, task, split)`` and ``real_visual_source(cfg, task, split)`` read under
``cfg.data.root`` (or from ``cfg.data.hf_dataset``); split names are ``train``/``val``/``test``
and map to each dataset's own file names (VQA's ``test2015`` too: VL-T5's ``test.json``, EvalAI's
test-dev/test-std questions; another name is used as the file stem, e.g. ``split="minival"`` reads
``vqa/minival.json``)::

    root/vqa/karpathy_{train,val,test}.json        VQAv2, Karpathy splits (VL-T5 release)
    root/vqa/test.json                             VQAv2 test2015 for EvalAI, no answers (split test2015)
    root/gqa/{train,valid,testdev}.json            GQA (VL-T5 release)
    root/nlvr2/{train,valid,test}.json             NLVR2 (VL-T5 release)
    root/coco/dataset_coco.json                    COCO captions, Karpathy split (restval -> train)
    root/coco/images/[train2014|val2014|test2015/]<id>.jpg  COCO images (vqa and caption)
    root/gqa/images/<img_id>.jpg                   GQA images
    root/nlvr2/images/[train|dev|test1/]<id>.png   NLVR2 images, e.g. dev-850-0-img0.png
    root/<video task>/{train,val,test}.jsonl       VALUE annotations (or <task>_<split>[_release].jsonl)
    root/<video task>/subtitles.jsonl              subtitles (or tv_/how2_/yc2_subtitles.jsonl)
    root/<video task>/features/<vid_name>.npy      per-video frame features, L x D (.npz, .safetensors too)
    root/<custom task>/...                         a custom task (data.custom_tasks): its ``like``'s files, by the
                                                   same names, in its own folder (images in its images/)

Images go through ``vlscale.data.visual.ImageFolder``; with ``model.feature_source=cache`` (or,
for video, ``data.feature_cache`` set) features come from ``vlscale.data.features.FeatureCache``.
VL-T5 / VL-Adapter's own ``datasets/`` folder works as the root too (``GQA``, ``nlvr``, ``COCO``
are accepted for ``gqa``, ``nlvr2``, ``coco``). Video frames may also be
``root/<video task>/frames/<vid_name>/*.jpg`` (``ImageFolder(video=True)``).
See docs/datasets.md for every format and where to download it.

Bad input never disappears silently: a missing file, or a malformed record (missing key, wrong
type, bad value, duplicate id), raises :class:`DataError` naming the file, the record (index or
line, and its id) and the key. With ``data.skip_bad_records=true`` malformed records are skipped,
counted in the returned list's ``skipped`` attribute and reported in a logged warning.

Answers (a record's ``label``, ``answers``, ``sentences``, ``answer_idx``, ``descs``) are required, as
training and scoring need them, unless the caller passes ``require_answers=False``, which
``launchers/evaluate.py --predict-only`` alone does (a leaderboard's split whose answers are withheld):
then a record without its answer keys gives an example with an empty ``target`` and no ``references``
(:meth:`Record.answers` decides this for every parser); every other check stays.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

from vlscale.data.tasks import Example, get_task
from vlscale.files import cwd_note

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


# ----------------------------------------------------------------------------- errors

class DataError(ValueError):
    """A dataset file or record is missing or malformed; the message names the file and record."""


class DataFileNotFound(DataError, FileNotFoundError):
    """An annotation, subtitle or feature file is not where the layout says."""


class RecordError(DataError):
    """One record is malformed. ``path``, ``where`` (record index / line), ``record_id``, ``key``."""

    def __init__(self, path, where: str, record_id, key: Optional[str], problem: str):
        self.path, self.where, self.record_id, self.key, self.problem = str(path), where, record_id, key, problem
        rid = f" (id {record_id!r})" if record_id is not None else ""
        what = f"key {key!r} {problem}" if key else problem
        super().__init__(f"{path}: {where}{rid}: {what}")


def no_text(value: str) -> str:
    """What a string field without text holds, for an error: nothing, or whitespace only (shown: a tab, a newline)."""
    return f"holds only whitespace ({value!r:.20})" if value else "is an empty string"


class ExampleList(list):
    """A ``list[Example]`` that also says which file it came from and how many records were skipped."""

    def __init__(self, items: Iterable = (), source: Optional[str] = None):
        super().__init__(items)
        self.source = source
        self.skipped = 0
        self.skip_messages: list[str] = []

    def note_skip(self, err: DataError) -> None:
        self.skipped += 1
        if len(self.skip_messages) < 20:
            self.skip_messages.append(str(err))

    def merge_skips(self, other: "ExampleList") -> None:
        self.skipped += other.skipped
        self.skip_messages.extend(other.skip_messages[: max(0, 20 - len(self.skip_messages))])

    def report(self) -> None:
        if self.skipped:
            logger.warning(f"{self.source}: skipped {self.skipped} malformed record(s) "
                           f"(data.skip_bad_records=true); first: {self.skip_messages[0]}")


# ----------------------------------------------------------------------------- records

_REQUIRED = object()
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "an object",
               bool: "true/false"}


class Record:
    """One raw record plus where it came from, so every check can name file, record and key."""

    def __init__(self, path, where: str, data: Any, id_keys: tuple = (), require_answers: bool = True):
        self.path, self.where, self.data = str(path), where, data
        self.require_answers = require_answers
        self.record_id = None
        if isinstance(data, dict):
            for k in id_keys:
                if isinstance(data.get(k), (str, int)) and not isinstance(data.get(k), bool):
                    self.record_id = data[k]
                    break

    def error(self, key: Optional[str], problem: str) -> RecordError:
        return RecordError(self.path, self.where, self.record_id, key, problem)

    def answers(self, *keys: str) -> bool:
        """Whether the record carries its answers (any of ``keys``): if it does, the parser reads and checks them
        as ever. If none is there (or each is null, withheld as well): False where answers are not required
        (``evaluate.py --predict-only``: the parser makes an example without target or references), else a
        RecordError naming the first key written as null, or the first key."""
        if not isinstance(self.data, dict):
            raise self.error(None, f"is {type(self.data).__name__}, expected a JSON object")
        given = [k for k in keys if k in self.data]
        if any(self.data[k] is not None for k in given):
            return True
        if self.require_answers:
            raise self.error((given or keys)[0], f"is {'null' if given else 'missing'} (a split without its answers, "
                             "such as a leaderboard's test split, can only be predicted: launchers/evaluate.py "
                             "--predict-only)")
        return False

    def get(self, key: str, types=str, default=_REQUIRED):
        """``data[key]`` checked to be of ``types``; missing -> ``default`` or an error."""
        if not isinstance(self.data, dict):
            raise self.error(None, f"is {type(self.data).__name__}, expected a JSON object")
        if key not in self.data:
            if default is _REQUIRED:  # its keys: a field named otherwise ('question' for 'sent') shows there
                keys = list(self.data)
                raise self.error(key, f"is missing (the record's keys: {keys[:12]}{' ...' if len(keys) > 12 else ''})")
            return default
        value = self.data[key]
        types = types if isinstance(types, tuple) else (types,)
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if float in types and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            names = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
            raise self.error(key, f"must be {names}, got {type(value).__name__} {_short(value)}")
        return value

    def text(self, key: str, default=_REQUIRED) -> str:
        """A non-empty string field."""
        value = self.get(key, str, default)
        if value is default and default is not _REQUIRED:
            return value
        if not value.strip():
            raise self.error(key, no_text(value))
        return value.strip()

    def ident(self, key: str, default=_REQUIRED) -> str:
        """An id field (string or integer), returned as a string."""
        value = self.get(key, (str, int), default)
        if value is default and default is not _REQUIRED:
            return value
        if not str(value).strip():
            raise self.error(key, no_text(value))
        return str(value)

    def score_map(self, key: str, allow_empty: bool) -> dict[str, float]:
        """An ``{answer: score}`` object with finite, non-negative numeric scores."""
        label = self.get(key, dict)
        if not label and not allow_empty:
            raise self.error(key, "is empty")
        for a, s in label.items():
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
                raise self.error(key, f"score of answer {a!r} must be a finite number, got {_short(s)}")
            if s < 0:
                raise self.error(key, f"score of answer {a!r} must be >= 0, got {_short(s)}")
        return {str(a): float(s) for a, s in label.items()}


def _short(value, n: int = 60) -> str:
    s = repr(value)
    return s if len(s) <= n else s[: n - 3] + "..."


def best_answer(scores: dict[str, float], counts: Optional[dict[str, int]] = None) -> str:
    """Highest score; ties go to the answer given most often, then to the alphabetically first."""
    counts = counts or {}
    return min(scores, key=lambda a: (-scores[a], -counts.get(a, 0), a))


def parse_records(path, records: Iterable[tuple[str, Any]], parse: Callable[[Record], list[Example]],
                  skip_bad_records: bool, id_keys: tuple = (), require_answers: bool = True) -> ExampleList:
    """Run ``parse`` over ``(where, data)`` records with error context, skip mode and uid checks;
    ``require_answers``: see :meth:`Record.answers`.

    ``data`` may be a :class:`RecordError` (e.g. a JSONL line that is not JSON); it counts as bad.
    """
    out = ExampleList(source=str(path))
    seen: dict[str, str] = {}
    for where, data in records:
        rec = Record(path, where, data, id_keys, require_answers)
        try:
            if isinstance(data, RecordError):
                raise data
            examples = parse(rec)
            for ex in examples:
                if ex.uid in seen:
                    raise _repeated_uid(rec, id_keys, ex.uid, seen[ex.uid])
        except RecordError as e:
            if not skip_bad_records:
                raise
            out.note_skip(e)
            continue
        for ex in examples:
            seen[ex.uid] = where
        out.extend(examples)
    out.report()
    return out


def _repeated_uid(rec: Record, id_keys: tuple, uid: str, first: str) -> RecordError:
    """Names the id key the uid came from: where the record lacks the first (TVC/YC2C's clip_id), the fallback
    (vid_name), so that two clips of one video without their clip_ids are not blamed on a key they lack."""
    data = rec.data if isinstance(rec.data, dict) else {}
    key = next((k for k in id_keys if k in data), id_keys[0] if id_keys else None)
    why = (f"; the record has no {id_keys[0]!r}, so its uid is its {key!r}: give each record its own {id_keys[0]!r}"
           if id_keys and key != id_keys[0] else "")
    return rec.error(key, f"gives uid {uid!r} again (first from {first}){why}")


# ----------------------------------------------------------------------------- files

def require_file(path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataFileNotFound(f"{what}: {path} does not exist (layout: docs/datasets.md)")
    return path


def read_json(path, what: str = "annotation file") -> Any:
    path = require_file(path, what)
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Windows tools write one) is read past
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None


def _not_utf8(path, e: UnicodeDecodeError, where: str = "") -> DataError:
    """A JSON(-lines) file that is not UTF-8 text (UTF-16, as some editors save, or binary data)."""
    return DataError(f"{path}: {where}not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset {e.start} "
                     f"of the {'line' if where else 'file'}); save it as UTF-8")


def read_json_list(path, what: str = "annotation file") -> list[tuple[str, Any]]:
    """A JSON file holding a list of records -> ``[("record i", data), ...]``."""
    data = read_json(path, what)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return [(f"record {i}", d) for i, d in enumerate(data)]


def read_jsonl(path, what: str = "annotation file") -> Iterator[tuple[str, Any]]:
    """A JSON-lines file -> ``("line n", data)``; a line that is not JSON yields a RecordError."""
    path = require_file(path, what)
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # past a byte-order mark
            except UnicodeDecodeError as e:
                raise _not_utf8(path, e, f"line {n} is ") from None
            if not line.strip():
                continue
            listed = "; a .jsonl file holds one JSON object per line (json.dumps(record) for each), not a JSON list" \
                if line.lstrip().startswith("[") else ""
            try:
                data = json.loads(line)
            except json.JSONDecodeError as e:
                data = RecordError(path, f"line {n}", None, None, f"is not valid JSON ({e}){listed}")
            if isinstance(data, list):
                data = RecordError(path, f"line {n}", None, None, f"is a JSON list{listed}")
            yield f"line {n}", data


# ----------------------------------------------------------------------------- layout

# Dataset folders under root; the second spelling is VL-T5 / VL-Adapter's ``datasets/`` layout.
FOLDERS = {"vqa": ("vqa",), "gqa": ("gqa", "GQA"), "nlvr2": ("nlvr2", "nlvr"), "caption": ("coco", "COCO")}
ANNOTATIONS = {
    "vqa": {"train": "karpathy_train.json", "val": "karpathy_val.json", "test": "karpathy_test.json",
            "test2015": "test.json"},  # VL-T5's name for it, "test", is Karpathy's test here
    "gqa": {"train": "train.json", "val": "valid.json", "test": "testdev.json"},
    "nlvr2": {"train": "train.json", "val": "valid.json", "test": "test.json"},
}
# (folder names, pattern, sub-folders also searched: COCO's train2014/val2014/test2015, NLVR2's splits)
IMAGE_FOLDERS = {"vqa": (("coco", "COCO"), "{id}.jpg", ("train2014", "val2014", "test2015")),
                 "caption": (("coco", "COCO"), "{id}.jpg", ("train2014", "val2014", "test2015")),
                 "gqa": (("gqa", "GQA"), "{id}.jpg", ()),
                 "nlvr2": (("nlvr2", "nlvr"), "{id}.png", ("train", "dev", "test1"))}
SUBTITLE_FILES = {"tvqa": "tv_subtitles.jsonl", "tvc": "tv_subtitles.jsonl",
                  "how2qa": "how2_subtitles.jsonl", "yc2c": "yc2_subtitles.jsonl"}


def _root(cfg) -> Path:
    if not cfg.data.root:
        raise DataError("data.root is not set; point it at the folder of real datasets "
                        "(layout in docs/datasets.md) or set data.hf_dataset")
    root = Path(cfg.data.root).expanduser()
    if not root.is_dir():
        raise DataFileNotFound(f"data.root={cfg.data.root!r} is not a directory{cwd_note(root)}; give "
                               "data.root=DIR, the folder the datasets are in (layout: docs/datasets.md)")
    return root


def only_one(paths: list, what: str) -> Optional[Path]:
    """The one of ``paths`` that exists (None if none does); two that are different files (not one folder
    under two spellings, as on a case-insensitive file system, nor a link to the other) are ambiguous: refused,
    naming them, rather than one read silently."""
    found = [Path(p) for p in paths if Path(p).exists()]
    for other in found[1:]:
        if not os.path.samefile(found[0], other):
            kind = "folders" if found[0].is_dir() else "files"
            raise DataError(f"{what}: both {found[0]} and {other} exist as two {kind}; keep one of them (or link one "
                            f"to the other)")
    return found[0] if found else None


def task_folders(task: str) -> tuple:
    """The folder names ``task``'s files may be in under data.root: a built-in image task's (:data:`FOLDERS`), or
    the task's own name (a video task, a custom task)."""
    return FOLDERS.get(task, (task,))


def dataset_dir(root: Path, names: tuple) -> Path:
    """The one of ``root/<name>`` that exists (else the first, for the error message); two are refused."""
    found = only_one([root / name for name in names if (root / name).is_dir()], f"the {names[0]} data folder")
    return found if found is not None else root / names[0]


def _check_split(split: str) -> None:
    if not isinstance(split, str) or not split or "/" in split or split.startswith("."):
        raise DataError(f"split {split!r} is not valid; use one of {list(SPLITS)} or a file stem")


def video_annotation_candidates(task: str, split: str) -> list[str]:
    names = [f"{split}.jsonl", f"{task}_{split}.jsonl", f"{task}_{split}_release.jsonl"]
    if split == "test":
        names += [f"{task}_test_public.jsonl", f"{task}_test_public_release.jsonl"]
    return names


def annotation_path(cfg, task: str, split: str) -> Path:
    """The annotation file of ``task``/``split`` under ``data.root`` (must exist)."""
    fmt = get_task(task).format
    _check_split(split)
    root = _root(cfg)
    if fmt in ANNOTATIONS:
        name = ANNOTATIONS[fmt].get(split, f"{split}.json")
        return require_file(dataset_dir(root, task_folders(task)) / name, f"{task} {split} annotations")
    if fmt == "caption":
        what = "COCO Karpathy captions" if task == fmt else f"{task} captions (COCO's Karpathy format)"
        return require_file(dataset_dir(root, task_folders(task)) / "dataset_coco.json", what)
    candidates = [root / task / n for n in video_annotation_candidates(fmt, split)]  # a custom task: its format's
    found = only_one([p for p in candidates if p.is_file()], f"{task} {split} annotations")
    if found is not None:
        return found
    raise DataFileNotFound(f"{task} {split} annotations: none of {[str(p) for p in candidates]} exists "
                           "(layout: docs/datasets.md)")


_WARNED_NO_SUBTITLES: set = set()


def subtitle_path(cfg, task: str) -> Optional[Path]:
    root, other = _root(cfg), SUBTITLE_FILES[get_task(task).format]
    found = only_one([root / task / n for n in ("subtitles.jsonl", other) if (root / task / n).is_file()],
                     f"{task} subtitles")
    if found is not None:
        return found
    if (root, task) not in _WARNED_NO_SUBTITLES:
        _WARNED_NO_SUBTITLES.add((root, task))
        logger.warning(f"{task}: no subtitles file ({root / task / 'subtitles.jsonl'} or "
                       f"{other}); inputs will have no subtitle text")
    return None


# ----------------------------------------------------------------------------- dispatch

def load_real_examples(cfg, task: str, split: str, require_answers: bool = True) -> ExampleList:
    """Examples of ``task``/``split`` from the real data the config names (files or an HF dataset).
    ``require_answers=False`` (``evaluate.py --predict-only`` only): records without answers are read too
    (:meth:`Record.answers`; an HF dataset's rows with empty answer cells too)."""
    spec = get_task(task)  # unknown task -> KeyError listing the known ones
    _check_split(split)
    skip, need = cfg.data.skip_bad_records, require_answers
    if cfg.data.hf_dataset:
        from vlscale.data.hf_dataset import load_hf_examples

        return load_hf_examples(task, cfg.data.hf_dataset, split, cfg.data.hf_columns, skip, need)[0]
    path = annotation_path(cfg, task, split)
    if spec.format == "vqa":
        from vlscale.data.vqa import load_vqa

        examples = load_vqa(path, skip, need)
    elif spec.format == "gqa":
        from vlscale.data.gqa import load_gqa

        examples = load_gqa(path, skip, need)
    elif spec.format == "nlvr2":
        from vlscale.data.nlvr2 import load_nlvr2

        examples = load_nlvr2(path, skip, need)
    elif spec.format == "caption":
        from vlscale.data.caption import load_coco_karpathy

        examples = load_coco_karpathy(path, split, skip, need)
    else:
        from vlscale.data import video

        subs = subtitle_path(cfg, task)
        subtitles = video.load_subtitles(subs, skip) if subs else {}
        if spec.target == "choice":
            examples = video.load_video_qa(task, path, subtitles, skip, need)
        else:
            examples = video.load_video_captions(task, path, split, subtitles, skip, need)
    for e in examples:  # a custom task's records, read by its format's loader, are its own examples
        e.task = task
    return examples


def hf_row_source(cfg) -> Optional[str]:
    """The HF dataset whose rows the run's image ids number (``<split>/<row>``: data.hf_dataset without a
    data.hf_columns.image_id), or None: what a feature cache of them records as ``hf_rows``, and checks."""
    return cfg.data.hf_dataset if cfg.data.hf_dataset and not (cfg.data.hf_columns or {}).get("image_id") else None


def _feature_cache(cfg, kind: str):
    from vlscale.data.features import FeatureCache, model_feature_dim

    rows = hf_row_source(cfg)
    return FeatureCache(cfg.data.feature_cache, vision=cfg.model.vision, pretrained=cfg.model.vision_pretrained,
                        expect_kind=kind, synthetic=None, expect_dim=model_feature_dim(cfg, kind), hf_rows=rows)


def real_visual_source(cfg, task: str, split: str):
    """The VisualSource whose ``[image_id]`` gives the inputs of ``load_real_examples``' examples.

    Video: ``data.feature_cache`` if set, else ``root/<task>/features/`` (per-video L x D files,
    :class:`~vlscale.data.video.VideoFeatureFolder`), else ``root/<task>/frames/<vid_name>/``
    (frame images, ``ImageFolder(video=True)``). Images: ``FeatureCache`` with
    ``model.feature_source=cache``, else the HF dataset's images, else the dataset's image folder.
    """
    spec = get_task(task)
    _check_split(split)
    if spec.modality == "video":
        features, frames = _root(cfg) / task / "features", _root(cfg) / task / "frames"
        if cfg.data.feature_cache:
            if not Path(cfg.data.feature_cache).is_dir() and features.is_dir():
                raise DataFileNotFound(f"data.feature_cache={cfg.data.feature_cache} is not a folder, and {features} "
                                       "holds precomputed frame features: train from them with "
                                       "data.feature_cache=null, or copy them into it with launchers/"
                                       "extract_features.py --real --config ... data.root=... --out "
                                       f"{cfg.data.feature_cache}")
            return _feature_cache(cfg, "frames")
        from vlscale.data.features import model_feature_dim
        from vlscale.data.video import VideoFeatureFolder
        from vlscale.data.visual import ImageFolder

        if features.is_dir():
            return VideoFeatureFolder(features, max_frames=cfg.model.max_frames,
                                      expect_dim=model_feature_dim(cfg, "frames"))
        if frames.is_dir():
            if cfg.model.feature_source == "cache":
                raise DataError(f"{task}: {frames} holds frame images, but model.feature_source=cache builds no "
                                "CLIP to encode them; make a cache (launchers/extract_features.py --real --config "
                                "... data.root=... --out CACHE) and set data.feature_cache=CACHE, or set "
                                "model.feature_source=images")
            return ImageFolder(frames, pattern="{id}", video=True, max_frames=cfg.model.max_frames)
        raise DataFileNotFound(f"{task}: neither a frame-features folder {features} nor a frames folder "
                               f"{frames} exists, and data.feature_cache is not set; layout: docs/datasets.md")
    if cfg.model.feature_source == "cache":
        if not cfg.data.feature_cache:
            raise DataError("model.feature_source=cache needs data.feature_cache (the folder written by "
                            "launchers/extract_features.py)")
        return _feature_cache(cfg, "grid")
    if cfg.data.hf_dataset:
        from vlscale.data.hf_dataset import load_hf_examples

        # every row's images, answered or not (which rows are examples is load_real_examples' call)
        return load_hf_examples(task, cfg.data.hf_dataset, split, cfg.data.hf_columns,
                                cfg.data.skip_bad_records, require_answers=False)[1]
    names, pattern, subfolders = IMAGE_FOLDERS[spec.format]
    path = dataset_dir(_root(cfg), names if task == spec.format else task_folders(task)) / "images"
    if not path.is_dir():
        raise DataFileNotFound(f"{task}: image folder {path} does not exist; layout: docs/datasets.md")
    from vlscale.data.visual import ImageFolder

    folders = [ImageFolder(path, pattern=pattern)]
    for sub in subfolders:
        if (path / sub).is_dir():
            folders.append(ImageFolder(path / sub, pattern=pattern))
            # NLVR2's release keeps its training images in numbered folders: train/0 ... train/99
            folders += [ImageFolder(d, pattern=pattern) for d in sorted((path / sub).iterdir(), key=lambda d: d.name)
                        if d.is_dir() and d.name.isdigit()]
    return folders[0] if len(folders) == 1 else FirstOf(folders)


class FirstOf:
    """A VisualSource over several others: an id comes from the first source that holds it."""

    def __init__(self, sources: list):
        kinds = {s.kind for s in sources}
        if len(kinds) != 1:
            raise ValueError(f"FirstOf: sources of different kinds {sorted(kinds)}")
        self.sources = list(sources)
        self.kind = kinds.pop()

    def __contains__(self, image_id: str) -> bool:
        return any(image_id in s for s in self.sources)

    def __getitem__(self, image_id: str):
        for s in self.sources:
            if image_id in s:
                return s[image_id]
        raise KeyError(f"image id {image_id!r} is in none of {self.sources}")

    def ids(self) -> list[str]:
        return sorted({i for s in self.sources for i in s.ids()})

    def missing(self, ids: list[str]) -> list[str]:
        """Ids none of the sources holds (each answers in bulk, for the ids still missing)."""
        from vlscale.data.visual import missing_ids

        for s in self.sources:
            ids = missing_ids(s, ids) if ids else ids
        return ids

    def __repr__(self) -> str:
        return f"FirstOf({self.sources})"
