"""Video tasks in the VALUE benchmark format: TVQA, How2QA (multiple-choice QA), TVC, YC2C (captioning).

Annotations are JSON lines, one record per line::

    TVQA / How2QA  {"qid": 7, "q": "What did Ross do?", "a0": "...", ..., "a4": "...",
                    "answer_idx": 2, "vid_name": "friends_s01e01_seg01_clip_00",
                    "ts": "12.3-18.9" or [12.3, 18.9], ...}          (How2QA: a0..a3)
    TVC / YC2C     {"clip_id": 3, "vid_name": "...", "ts": [12.3, 18.9],
                    "descs": [{"desc": "Ross hugs Rachel."}, ...], ...}

Subtitles (optional, one JSON line per video)::

    {"vid_name": "friends_s01e01_seg01_clip_00", "sub": [{"text": "Hi.", "start": 0.5, "end": 1.2}, ...]}

Inputs follow the synthetic world's format: QA ``text`` is
``"<q> a0: <a0> a1: <a1> ... subtitle: <sub>"`` and ``target`` is the right option's name ("a2"),
scored by accuracy; captioning ``text`` is ``<sub>`` (empty without subtitles). ``<sub>`` joins
the subtitle lines overlapping ``ts`` (all lines when ``ts`` is absent or "NaN-NaN"); it comes
last so it is what truncation cuts. Examples whose video has no entry in a subtitles file are
counted and logged once per annotation file (a subtitles file keyed by other video names would
otherwise leave every input without its subtitles, silently). Caption splits work as COCO's:
``train`` gives one example per description (``uid`` "<clip_id>#<k>"), val/test one per clip
(``uid`` = ``clip_id``, else ``vid_name``) with all descriptions as ``references``. ``image_ids`` =
``[vid_name]``; ``extra`` keeps ``ts`` (seconds), ``subtitle`` and, for QA, ``question``,
``candidates``, ``answer_text``. A record without its answer (``answer_idx``, ``descs``) is malformed,
except for ``launchers/evaluate.py --predict-only`` (``require_answers=False``): one example per
question or clip, in any split, with an empty ``target`` and no ``references``.

Frame features: :class:`VideoFeatureFolder` (a VisualSource of kind "features") reads
``dir/<vid_name>.npy`` (an L x D array of real numbers), ``dir/<vid_name>.npz`` (array ``features``, or its only
array: the VALUE release's CLIP-ViT features, as VL-Adapter reads them) or ``dir/<vid_name>.safetensors`` (tensor
``features``, or its only tensor) and returns a float32 tensor (L, D); a video of more than
``max_frames`` frames gives ``max_frames`` of them, the frames the collator picks from a feature
cache or a folder of frame images (:func:`vlscale.data.collate.frame_indices`, the centre of each
of ``max_frames`` equal segments), so the three sources give the same batches. Two files for one
video is ambiguous and refused; with ``expect_dim`` (the run's CLIP embedding width) D is checked
as each file is read, and by :meth:`VideoFeatureFolder.missing` (the start-up check) on the first
video's file, so features of another CLIP model (or dtype) stop a run before its first step.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Optional

from vlscale.data.real import (DataError, ExampleList, Record, RecordError, parse_records, read_jsonl)
from vlscale.data.tasks import Example
from vlscale.metrics.classification import normalize_answer

logger = logging.getLogger(__name__)


class Subtitles(dict):
    """``vid_name -> [(start, end, text), ...]``; ``source``: the file they were read from (None: none)."""

    def __init__(self, *args, source: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.source = source


_REPORTED: set = set()  # (annotation file, subtitles file), ("options" | "ts", file): reported in this process


def report_uncovered(task: str, path, examples: list, subtitles: dict) -> None:
    """Log (once per annotation and subtitles file) how many examples name a video the subtitles file has no
    entry for: their inputs carry no subtitle text."""
    source = getattr(subtitles, "source", None)
    key = (str(path), str(source))
    if not source or not examples or key in _REPORTED:  # a file read again: said already, not walked again
        return
    lost = [e for e in examples if e.image_ids[0] not in subtitles]
    if not lost:
        return
    _REPORTED.add(key)
    vids = list(dict.fromkeys(e.image_ids[0] for e in lost))
    logger.warning(f"{task}: {len(lost)} of {len(examples)} examples of {path} name a video that {source} has no "
                   f"subtitles for ({len(vids)} video(s), first {vids[:3]}); their inputs carry no subtitle text "
                   "(check that both files name videos alike)")


def report_ts_outside(task: str, path, examples: list, subtitles: dict) -> None:
    """Log (once per annotation file) how many examples have a ``ts`` wholly before or after their video's subtitle
    lines (a ts in milliseconds, or another clip's): it selects none of them, so their inputs carry no subtitle text.
    A ts inside the lines' span that meets none (a silent moment) is not counted."""
    if ("ts", str(path)) in _REPORTED:  # a file read again (another split's check, evaluation): said already
        return
    out, spans = [], {}  # spans: video -> (its lines' first start, last end), once per video
    for e in examples:
        vid, ts = e.image_ids[0], e.extra.get("ts")
        if ts is None or not subtitles.get(vid):
            continue
        if vid not in spans:
            spans[vid] = (min(ln[0] for ln in subtitles[vid]), max(ln[1] for ln in subtitles[vid]))
        first, last = spans[vid]
        if ts[1] < first or ts[0] > last:
            out.append((e, ts, first, last))
    if not out:
        return
    _REPORTED.add(("ts", str(path)))
    e, ts, first, last = out[0]
    logger.warning(f"{task}: {len(out)} of {len(examples)} examples of {path} have a ts outside their video's subtitle "
                   f"lines (first: {e.uid!r}, ts {ts[0]}-{ts[1]} s, the lines {first}-{last} s); their inputs carry no "
                   "subtitle text (ts is in seconds)")


# ----------------------------------------------------------------------------- subtitles

def load_subtitles(path, skip_bad_records: bool = False) -> Subtitles:
    """``vid_name -> [(start, end, text), ...]`` sorted by start time (a :class:`Subtitles` naming ``path``)."""
    subs = Subtitles(source=str(path))
    bad = ExampleList(source=str(path))
    for where, data in read_jsonl(path, "subtitles"):
        rec = Record(path, where, data, ("vid_name",))
        try:
            if isinstance(data, RecordError):
                raise data
            vid = rec.text("vid_name")
            lines = []
            for i, item in enumerate(rec.get("sub", list)):
                ok = isinstance(item, dict) and isinstance(item.get("text"), str) and all(
                    isinstance(item.get(k), (int, float)) and not isinstance(item.get(k), bool)
                    for k in ("start", "end"))
                if not ok:
                    raise rec.error("sub", f"item {i} needs 'text' (string), 'start' and 'end' (numbers), "
                                           f"got {item!r:.80}")
                start, end = float(item["start"]), float(item["end"])
                if end < start:  # refused as a ts that does: read, it overlaps nothing or the wrong span
                    raise rec.error("sub", f"item {i} ends before it starts (start {start}, end {end}); fix its times")
                lines.append((start, end, item["text"].strip()))
            if vid in subs:
                raise rec.error("vid_name", "appears twice in the subtitles file")
        except RecordError as e:
            if not skip_bad_records:
                raise
            bad.note_skip(e)
            continue
        subs[vid] = sorted(lines)
    bad.report()
    return subs


def parse_ts(rec: Record) -> Optional[tuple[float, float]]:
    """``ts`` as "start-end" or [start, end]; None when absent or NaN."""
    value = rec.get("ts", (str, list), None)
    if value is None:
        return None
    try:
        parts = value.split("-") if isinstance(value, str) else value
        if len(parts) != 2 or any(isinstance(p, bool) for p in parts):
            raise ValueError
        start, end = (float(p) for p in parts)
    except (TypeError, ValueError):
        raise rec.error("ts", f"must be 'start-end' or [start, end] in seconds, got {value!r}") from None
    if math.isnan(start) or math.isnan(end):
        return None
    if end < start:
        raise rec.error("ts", f"ends before it starts: {value!r}")
    return start, end


def subtitle_text(lines: list[tuple[float, float, str]], ts: Optional[tuple[float, float]]) -> str:
    if ts is not None:
        lines = [ln for ln in lines if ln[1] >= ts[0] and ln[0] <= ts[1]]
    return " ".join(t for _, _, t in lines if t)


# ----------------------------------------------------------------------------- QA

def qa_text(question: str, options: list[str], subtitle: str = "") -> str:
    """A multiple-choice input: ``"<q> a0: <a0> a1: <a1> ... subtitle: <sub>"`` (no subtitle part without one)."""
    text = question + " " + " ".join(f"a{i}: {o}" for i, o in enumerate(options))
    return f"{text} subtitle: {subtitle}" if subtitle else text


def _options(rec: Record) -> list[str]:
    data = rec.data if isinstance(rec.data, dict) else {}
    options = []
    while f"a{len(options)}" in data:
        options.append(rec.text(f"a{len(options)}"))
    if len(options) < 2:
        raise rec.error("a0" if not options else "a1", "is missing (need answer options a0, a1, ...)")
    later = sorted(int(k[1:]) for k in data if k[:1] == "a" and k[1:].isdigit() and int(k[1:]) > len(options))
    if later:
        raise rec.error(f"a{len(options)}", f"is missing but a{later[0]} is present (answer options must be "
                                            "a0, a1, ... without gaps)")
    return options


def load_video_qa(task: str, path, subtitles: Subtitles, skip_bad_records: bool = False,
                  require_answers: bool = True) -> ExampleList:
    """TVQA / How2QA: one example per question; target = the right option's name ("a0".."a4"). Its references
    are the name and the option's text: the submission writes a prediction of an option's text as that option
    (:func:`vlscale.engine.evaluation.write_submission`), so the local accuracy counts it too (not when an
    earlier option has the same text: the submission names the first)."""

    def parse(rec: Record) -> list[Example]:
        qid = rec.ident("qid")
        question = rec.text("q")
        options = _options(rec)
        answer = rec.get("answer_idx", (int, str)) if rec.answers("answer_idx") else None
        if isinstance(answer, str) and answer.strip().isdigit():
            answer = int(answer)
        if answer is not None and (not isinstance(answer, int) or not 0 <= answer < len(options)):
            raise rec.error("answer_idx", f"must be an option index 0..{len(options) - 1}, got {answer!r}")
        vid = rec.text("vid_name")
        ts = parse_ts(rec)
        sub = subtitle_text(subtitles.get(vid, []), ts)
        text = qa_text(question, options, sub)
        extra = {"ts": ts, "question": question, "candidates": options, "subtitle": sub}
        if answer is None:
            return [Example(task=task, uid=qid, text=text, target="", image_ids=[vid], extra=extra, source=rec.path)]
        label = f"a{answer}"
        texts = [normalize_answer(o) for o in options]  # the answer's text also names it, as in the submission
        refs = [label, options[answer]] if texts.index(texts[answer]) == answer else [label]
        return [Example(task=task, uid=qid, text=text, target=label, image_ids=[vid], references=refs,
                        extra={**extra, "answer_text": options[answer]}, source=rec.path)]

    examples = parse_records(path, read_jsonl(path, f"{task} annotations"), parse, skip_bad_records, ("qid",),
                             require_answers)
    report_uncovered(task, path, examples, subtitles)
    report_ts_outside(task, path, examples, subtitles)
    report_option_counts(task, path, examples)
    return examples


def report_option_counts(task: str, path, examples: list) -> None:
    """Log (once per annotation file) how many questions have another number of answer options than most of the
    file's (TVQA's have 5, How2QA's 4): such a question most likely lost or gained an option in a conversion."""
    if ("options", str(path)) in _REPORTED:  # a file read again: said already, not walked again
        return
    counts = [len(e.extra["candidates"]) for e in examples]
    usual = max(set(counts), key=counts.count, default=None)
    odd = [(e, n) for e, n in zip(examples, counts) if n != usual]
    if not odd:
        return
    _REPORTED.add(("options", str(path)))
    logger.warning(f"{task}: {len(odd)} of {len(examples)} questions of {path} have another number of answer options "
                   f"than the file's usual {usual} (first: qid {odd[0][0].uid!r}, {odd[0][1]} options); check them "
                   "for a lost or extra option")


# ----------------------------------------------------------------------------- captioning

def _descriptions(rec: Record) -> list[str]:
    descs = rec.get("descs", list)
    if not descs:
        raise rec.error("descs", "is empty")
    out = []
    for i, d in enumerate(descs):
        text = d.get("desc") if isinstance(d, dict) else d
        if not isinstance(text, str) or not text.strip():
            raise rec.error("descs", f"item {i} needs a non-empty string 'desc', got {d!r:.80}")
        out.append(text.strip())
    return out


def load_video_captions(task: str, path, split: str, subtitles: Subtitles,
                        skip_bad_records: bool = False, require_answers: bool = True) -> ExampleList:
    """TVC / YC2C: one example per description (train) or per clip with all descriptions (val/test)."""
    train = split == "train"

    def parse(rec: Record) -> list[Example]:
        vid = rec.text("vid_name")
        clip = rec.ident("clip_id", None) or vid
        descs = _descriptions(rec) if rec.answers("descs") else []
        ts = parse_ts(rec)
        sub = subtitle_text(subtitles.get(vid, []), ts)
        text = sub
        extra = {"ts": ts, "clip_id": clip, "subtitle": sub}
        if not descs:
            return [Example(task=task, uid=clip, text=text, target="", image_ids=[vid], extra=extra, source=rec.path)]
        if train:
            return [Example(task=task, uid=f"{clip}#{k}", text=text, target=d, image_ids=[vid],
                            references=list(descs), extra=dict(extra), source=rec.path)
                    for k, d in enumerate(descs)]
        return [Example(task=task, uid=clip, text=text, target=descs[0], image_ids=[vid],
                        references=descs, extra=extra, source=rec.path)]

    examples = parse_records(path, read_jsonl(path, f"{task} annotations"), parse, skip_bad_records,
                             ("clip_id", "vid_name"), require_answers)
    report_uncovered(task, path, examples, subtitles)
    report_ts_outside(task, path, examples, subtitles)
    return examples


# ----------------------------------------------------------------------------- frame features

def _features_key(path, keys: list[str]) -> str:
    """The frame features' tensor in a ``.safetensors`` (or array in a ``.npz``) file: ``features``, or its only one."""
    if "features" in keys:
        return "features"
    if len(keys) != 1:
        what = "arrays" if Path(path).suffix == ".npz" else "tensors"
        raise DataError(f"{path}: holds {what} {sorted(keys)}; expected one named 'features'")
    return keys[0]


def _load_npz(path):
    """The frame features array of a ``.npz`` file (VALUE's / VL-Adapter's ``np.load(path)["features"]``)."""
    import numpy as np

    z = np.load(path, allow_pickle=False)
    if not isinstance(z, np.lib.npyio.NpzFile):  # a plain .npy's array: no context manager to open
        raise ValueError("not a .npz archive")
    with z:
        return z[_features_key(path, list(z.files))]


class VideoFeatureFolder:
    """VisualSource of per-video frame features: ``source[vid_name]`` -> float32 tensor (L, D)."""

    kind = "features"

    SUFFIXES = (".npy", ".npz", ".safetensors")

    def __init__(self, root, max_frames: Optional[int] = None, expect_dim: Optional[int] = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"video features folder {self.root} does not exist")
        self.max_frames = max_frames
        self.expect_dim = expect_dim

    def _ambiguous(self, vid: str, found: list) -> DataError:
        return DataError(f"video {vid!r}: both {found[0]} and {found[1]} exist; keep one of them")

    def _path(self, vid: str) -> Optional[Path]:
        found = [p for p in (self.root / f"{vid}{s}" for s in self.SUFFIXES) if p.is_file()]
        if len(found) > 1:
            raise self._ambiguous(vid, found)
        return found[0] if found else None

    def __contains__(self, vid: str) -> bool:
        return self._path(vid) is not None

    def missing(self, ids: list[str]) -> list[str]:
        """Videos without a features file, from one listing of the folder (two files for one: DataError).

        The first video found also has its file read (one file, whole): a matrix of real numbers of the width the
        run takes, or DataError, so features of another CLIP model, or of a dtype every file shares, stop a run at
        start-up, not at its batch."""
        names = {n for n in os.listdir(self.root) if n.endswith(self.SUFFIXES)}
        out, first = [], None
        for vid in ids:
            found = [self.root / f"{vid}{s}" for s in self.SUFFIXES if f"{vid}{s}" in names]
            if len(found) > 1:
                raise self._ambiguous(vid, found)
            if not found:
                out.append(vid)
            elif first is None:
                first = (vid, found[0])
        if first is not None:
            vid, path = first
            read_frame_features(path, self.expect_dim, f"{path} (video {vid!r})")
        return out

    def ids(self) -> list[str]:
        return sorted({p.stem for p in self.root.iterdir() if p.suffix in self.SUFFIXES})

    def __repr__(self) -> str:
        return f"VideoFeatureFolder({str(self.root)!r}, max_frames={self.max_frames})"

    def __getitem__(self, vid: str):
        from vlscale.data.collate import frame_indices

        path = self._path(vid)
        if path is None:
            raise KeyError(f"no frame features for video {vid!r}: none of {self.root / (vid + '.npy')}, "
                           ".npz, .safetensors exists")
        feats = read_frame_features(path, self.expect_dim, f"{path} (video {vid!r})")
        if self.max_frames and feats.shape[0] > self.max_frames:
            # the frames the collator takes from a feature cache or from frame images (same batches)
            feats = feats[frame_indices(feats.shape[0], self.max_frames)]
        return feats


def check_frame_features(where: str, shape: tuple, expect_dim: Optional[int] = None) -> None:
    """DataError (naming ``where``) unless ``shape`` is a non-empty L x D matrix, D = ``expect_dim`` when given."""
    if len(shape) != 2 or shape[0] == 0:
        raise DataError(f"{where}: frame features must be a non-empty L x D matrix, got shape {tuple(shape)}")
    if expect_dim is not None and shape[1] != expect_dim:
        fix = (f"their shape {tuple(shape)} is D x L: save them transposed (L x D, one row per frame)"
               if shape[0] == expect_dim else "extract the features with that CLIP model, or set model.vision to "
               "the one that made them")
        raise DataError(f"{where}: frame features are {shape[1]}-d, but the run's model.vision embeds frames in "
                        f"{expect_dim}-d; {fix}")


def read_frame_features(path: Path, expect_dim: Optional[int] = None, where: Optional[str] = None):
    """A ``.npy`` / ``.npz`` / ``.safetensors`` file of frame features (module docstring) as a float32 tensor (L, D),
    every frame; an unreadable file or one of another shape raises DataError naming ``where`` (default: the path)."""
    import zipfile

    import numpy as np
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from vlscale.data.features import real_numbers

    where = where or str(path)
    try:
        if path.suffix in (".npy", ".npz"):
            array = np.load(path, allow_pickle=False) if path.suffix == ".npy" else _load_npz(path)
            if not isinstance(array, np.ndarray):
                raise DataError(f"{where}: holds {type(array).__name__}, expected one L x D array")
            dtype = array.dtype
            try:
                feats = torch.from_numpy(array)
            except TypeError:  # no torch dtype: strings, records, long double
                feats = None
        else:
            tensors = load_file(str(path))
            feats = tensors[_features_key(path, list(tensors))]
            dtype = feats.dtype
        if feats is None or not real_numbers(feats.dtype):
            raise DataError(f"{where}: frame features have dtype {dtype}, expected real numbers (a float or integer "
                            "array)")
    except DataError:
        raise
    except (OSError, ValueError, EOFError, SafetensorError, zipfile.BadZipFile) as e:
        raise DataError(f"{where}: cannot read frame features ({type(e).__name__}: {e})") from e
    check_frame_features(where, tuple(feats.shape), expect_dim)
    return feats.float()
