"""The feature cache: frozen-CLIP features computed once, read back as a visual source.

Layout of a cache folder (written by launchers/extract_features.py through :func:`extract_features`):

    meta.json                   {"vision", "pretrained", "kind": "grid" | "frames", "tokens",
                                 "grid_shape", "dim", "dtype", "image_size", "format",
                                 "synthetic": null | {"generator", "seed", "image_size"},
                                 "hf_rows": the HF dataset whose row-numbered ids it holds (or absent),
                                 "fingerprint": the encoder's weights (or absent)}
    index.json                  {image_id: shard file name}
    shard_00000.safetensors     one tensor per id: (T, D) raw grid / patch tokens of an image,
    shard_00001.safetensors     or (F, E) per-frame CLIP embeddings of a video

Shards and the index are written to a temporary name and renamed, so an interrupted extraction
leaves a valid cache; a re-run skips the ids already in the index. One writer at a time per folder
(an exclusive lock on ``.lock``): a second extraction into the same cache waits for the first to
finish, then skips what it wrote. Features are stored in fp32 (or
fp16 on request) and always read back as fp32. :class:`FeatureCache` checks ``meta.json`` against
the run's vision model, so features of one CLIP model are never fed to a model built for another,
and (``synthetic``) against the synthetic world's settings that decide what an id's image is
(generator version, ``data.synthetic_seed``, ``data.image_size``): the world's ids name different
images under other settings. A cache made before ``synthetic`` was recorded is refused for the
synthetic world (re-extract it) and accepted for real data. Rows of an HF dataset without an
``image_id`` column are named by their place, ``<split>/<row>``, which names another image in any other
dataset: ``hf_rows`` records which dataset a cache's such ids come from, an extraction of another
dataset's rows into it is refused (it would have skipped every id already there and kept the first
dataset's features), and so is a run reading another dataset's rows from it. ``pretrained`` names where the weights
came from, not which they are (a file replaced at the same path keeps its name): ``fingerprint`` is the encoder's
:func:`~vlscale.engine.checkpoint.frozen_fingerprint`, and an extraction into the cache with weights of another
fingerprint is refused (it would mix two CLIPs' features); a cache without one (made by an older vlscale, or of
copied precomputed frame features) is continued with a note that its weights are unchecked. Every problem with a cache raises
``DataError`` (``DataFileNotFound`` for missing files) naming the cache folder or file.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch
from safetensors import SafetensorError, safe_open

from vlscale.data.real import DataError, DataFileNotFound
from vlscale.files import cwd_note, fsync_path, save_safetensors, write_text_atomic

META_FILE = "meta.json"
INDEX_FILE = "index.json"
LOCK_FILE = ".lock"
FORMAT_VERSION = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16}
_UNSET = object()


HF_ROWS = "hf_rows"
FINGERPRINT = "fingerprint"
_NOTED_UNCHECKED: set = set()  # caches whose missing fingerprint was said (once a process)
_ROW_ID = re.compile(r"^[A-Za-z_]+/\d+(/\d+)?$")  # <split>/<row>[/<k>]: vlscale.data.hf_dataset's row ids


def hf_rows_key(name: str) -> str:
    """How ``hf_rows`` names an HF dataset: a local ``save_to_disk`` folder by its folder name (the
    cache may be read where the folder lives elsewhere), a hub id as given."""
    path = Path(str(name)).expanduser()
    return path.resolve().name if path.is_dir() else str(name)


def first_row_id(index: dict) -> Optional[str]:
    """An id of ``index`` that numbers an HF dataset's row, or None."""
    return next((i for i in index if _ROW_ID.match(i)), None)


def _same_pretrained(a, b) -> bool:
    """Tags compare as given; checkpoint paths by file name (the cache may be read from elsewhere)."""
    norm = [None if x in (None, "") else (Path(x).name if ("/" in str(x) or Path(str(x)).suffix) else str(x))
            for x in (a, b)]
    return norm[0] == norm[1]


def _read_json(path: Path, what: str) -> dict:
    """A cache's JSON object file (meta.json, index.json)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (FileNotFoundError, NotADirectoryError):
        if not path.parent.is_dir():  # a data.feature_cache that is not there, or is a file
            raise DataFileNotFound(f"feature cache folder {path.parent} does not exist{cwd_note(path.parent)}; give "
                                   "data.feature_cache=DIR, the folder the cache is in, or make it with "
                                   "launchers/extract_features.py") from None
        from vlscale.data.video import VideoFeatureFolder

        videos = sorted(p.name for p in path.parent.iterdir() if p.suffix in VideoFeatureFolder.SUFFIXES
                        and not p.name.startswith("shard_"))
        fix = (f"it holds video frame-features files ({', '.join(videos[:2])}{', ...' if len(videos) > 2 else ''}), "
               "not a cache: put them in data.root/<task>/features/ and set data.feature_cache=null, or copy them "
               "into a cache with launchers/extract_features.py --real") if videos else \
            "make the cache with launchers/extract_features.py"
        raise DataFileNotFound(f"feature cache {path.parent}: {path.name} is missing ({what}); {fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"feature cache {path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise DataError(f"feature cache {path}: expected a JSON object ({what}), got {type(data).__name__} "
                        f"{json.dumps(data)[:60]}; make the cache with launchers/extract_features.py")
    return data


def cache_fingerprint(meta: dict, meta_file) -> Optional[dict]:
    """The fingerprint of the CLIP weights a cache's ``meta.json`` (``meta_file``) records, or None."""
    fp = meta.get(FINGERPRINT)
    if fp is not None and not (isinstance(fp, dict) and all(
            isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v) for v in fp.values())):
        raise DataError(f"feature cache {meta_file}: {FINGERPRINT} is not a fingerprint of CLIP weights ({{tensor "
                        f"name: [sum of squares, sum of |w|]}}), got {json.dumps(fp)[:60]}; re-extract the cache")
    return fp


def cache_weights(cfg) -> Optional[dict]:
    """What a run training on cached features (``model.feature_source=cache``) records of the CLIP weights they
    are of, so the images it is later asked about are encoded with those (:class:`vlscale.predict.Predictor`):
    ``{"folder", "pretrained", "fingerprint"}`` of ``data.feature_cache`` (fingerprint None: the cache records
    none); None for a run that encodes its images."""
    if cfg.model.feature_source != "cache" or not cfg.data.feature_cache:
        return None
    meta_file = Path(cfg.data.feature_cache) / META_FILE
    meta = _read_json(meta_file, "what model made the features")
    return {"folder": str(cfg.data.feature_cache), "pretrained": meta.get("pretrained"),
            "fingerprint": cache_fingerprint(meta, meta_file)}


def cache_changed(cfg, recorded: Optional[dict], fix: str, who: Optional[str] = None) -> Optional[str]:
    """Why ``data.feature_cache`` (as ``cfg`` names it) holds features of other CLIP weights than the cache a run
    was trained on (``recorded``: what :func:`cache_weights` read at its start), or None; ``fix`` ends the message.
    Read from meta.json, nothing built. No fingerprint on the run's side: nothing to compare; none in the cache now
    where the run had one: a note from ``who`` (None: no note)."""
    from vlscale.engine.checkpoint import frozen_mismatch

    if not (recorded or {}).get("fingerprint"):
        return None  # a run (or its cache) from before fingerprints
    now = cache_weights(cfg)
    if not now or not now["fingerprint"]:
        if now and who:
            print(f"{who}: note: data.feature_cache={now['folder']!r} records no fingerprint of the CLIP weights its "
                  f"features are of (the run's cache did): that they are the run's is unchecked", file=sys.stderr,
                  flush=True)
        return None
    vision = _read_json(Path(cfg.data.feature_cache) / META_FILE, "what model made the features").get("vision")
    if vision != cfg.model.vision:  # another CLIP model: its tensors differ by name, not "other weights" of this one
        return (f"data.feature_cache={now['folder']!r} holds features of vision={vision!r}, but the run was trained "
                f"on model.vision={cfg.model.vision!r} features ({recorded.get('folder')}); {fix}")
    problem = frozen_mismatch(recorded["fingerprint"], now["fingerprint"], then="in the run's cache")
    if problem:
        return (f"data.feature_cache={now['folder']!r} holds features of other {cfg.model.vision} weights than the "
                f"cache the run was trained on ({recorded.get('folder')}, pretrained={recorded.get('pretrained')!r}): "
                f"{problem}; {fix}")
    return None


def cache_encoder_problem(encoder, cfg, cache: dict, cache_named: str, fix: str) -> Optional[str]:
    """Why the CLIP ``encoder`` built now from ``model.vision_pretrained`` is not the one a feature cache was made with
    (``cache``: what :func:`cache_weights` read, ``{"folder", "pretrained", "fingerprint"}``, with a fingerprint), or
    None: the features are of these weights. ``cache_named`` names the cache in the message, with its verb
    (``"data.feature_cache='f' was extracted with"``); ``fix`` ends it: what the caller's user must do. Training's
    start-up check (:func:`vlscale.engine.trainer.check_cache_vision`) and the Predictor's
    (:func:`vlscale.predict.cache_weights_problem`) both compare with this."""
    from vlscale.engine.checkpoint import frozen_fingerprint, frozen_mismatch

    problem = frozen_mismatch(cache["fingerprint"], frozen_fingerprint(encoder), then="in the cache")
    if problem:
        return (f"model.vision_pretrained={cfg.model.vision_pretrained!r} gives other {cfg.model.vision} weights than "
                f"{cache_named} (pretrained={cache.get('pretrained')!r}): {problem}; {fix}")
    return None


def _check_weights(meta_file: Path, old: dict, meta: dict) -> None:
    """Continuing the cache of ``meta_file`` (``old``) with the encoder ``meta`` fingerprints: refused where its
    features are of other weights; a cache that records none is continued, said once."""
    from vlscale.engine.checkpoint import frozen_mismatch

    now, held = meta.get(FINGERPRINT), cache_fingerprint(old, meta_file)
    if now is None:  # nothing encoded (precomputed frame features copied): no weights to compare
        return
    if held is None:
        if meta_file not in _NOTED_UNCHECKED:
            _NOTED_UNCHECKED.add(meta_file)
            print(f"feature cache {meta_file}: note: records no fingerprint of the CLIP weights its features are of "
                  f"(made by an older vlscale, or copied precomputed features); that they are the weights of "
                  f"pretrained={meta.get('pretrained')!r} is unchecked", file=sys.stderr, flush=True)
        return
    problem = frozen_mismatch(held, now, then="in the cache")
    if problem:
        raise DataError(f"feature cache {meta_file}: its features are of other {meta.get('vision')} weights "
                        f"(pretrained={old.get('pretrained')!r} when made) than pretrained={meta.get('pretrained')!r} "
                        f"gives now ({problem}); adding to it would mix two CLIPs' features: use another --out "
                        f"folder, or extract with the weights the cache was made with")


def _synthetic_problem(cached, now) -> Optional[str]:
    """Why features made for the synthetic world ``cached`` (None: real images) don't fit ``now``."""
    if cached == now:
        return None
    if now is None:
        return f"holds synthetic-world features ({cached}) but the run reads real data"
    if cached is None:
        return f"holds features of real images but the run uses the synthetic world ({now})"
    names = {"seed": "data.synthetic_seed", "image_size": "data.image_size", "generator": "generator version"}
    diff = ", ".join(f"{names.get(k, k)}: cached {cached.get(k)!r}, run {now.get(k)!r}"
                     for k in now if cached.get(k) != now.get(k))
    return f"was made from other synthetic-world images ({diff or cached})"


class FeatureCache:
    """A :class:`~vlscale.data.visual.VisualSource` of kind ``"features"`` over a cache folder.

    ``vision`` (and ``pretrained``, ``synthetic``, when given) must match what the cache was made
    with; ``synthetic`` is the world's :func:`~vlscale.data.synthetic.content_params`, or None for
    real data. ``hf_rows``: the HF dataset whose rows the run names ``<split>/<row>``; the cache's
    row-numbered ids must be that dataset's. ``expect_dim``: the feature width the model takes (checked against ``meta.json`` here
    and against each tensor as it is read, with its shape).
    """

    kind = "features"

    def __init__(self, root, vision: Optional[str] = None, pretrained=_UNSET, expect_kind: Optional[str] = None,
                 synthetic=_UNSET, expect_dim: Optional[int] = None, hf_rows: Optional[str] = None):
        self.root = Path(root)
        self.meta = _read_json(self.root / META_FILE, "what model made the features")
        self.index = _read_json(self.root / INDEX_FILE, "which shard holds each id")
        meta_file = self.root / META_FILE
        if vision is not None and self.meta.get("vision") != vision:
            raise DataError(f"feature cache {meta_file}: features are from vision={self.meta.get('vision')!r}, "
                            f"but the run uses model.vision={vision!r}; extract features for {vision!r} "
                            "or point data.feature_cache at a matching cache")
        if pretrained is not _UNSET and not _same_pretrained(self.meta.get("pretrained"), pretrained):
            raise DataError(f"feature cache {meta_file}: features are from pretrained="
                            f"{self.meta.get('pretrained')!r}, but the run uses model.vision_pretrained="
                            f"{pretrained!r}; give the cache's weights (model.vision_pretrained="
                            f"{self.meta.get('pretrained') or 'null'}), extract features with the run's, or "
                            "point data.feature_cache at a matching cache")
        if expect_kind is not None and self.meta.get("kind") != expect_kind:
            raise DataError(f"feature cache {meta_file}: holds kind={self.meta.get('kind')!r} features, "
                            f"the task needs {expect_kind!r} ('grid' for images, 'frames' for video)")
        if synthetic is not _UNSET:
            if "synthetic" not in self.meta and synthetic is not None:
                raise DataError(f"feature cache {meta_file}: does not record which synthetic world it was made "
                                f"from (made by an older vlscale); the run's is {synthetic}. Re-extract it: "
                                "python launchers/extract_features.py --synthetic ... --out NEW_DIR")
            problem = _synthetic_problem(self.meta.get("synthetic"), synthetic)
            if problem:
                raise DataError(f"feature cache {meta_file}: {problem}; re-extract with launchers/"
                                "extract_features.py for this run's data, or point data.feature_cache elsewhere")
        if hf_rows is not None and first_row_id(self.index) is not None:
            held, now = self.meta.get(HF_ROWS), hf_rows_key(hf_rows)
            if held != now:
                what = (f"rows of the HF dataset {held!r}" if held is not None else
                        "row-numbered ids (<split>/<row>) of an HF dataset it does not record (made by an older "
                        "vlscale)")
                raise DataError(f"feature cache {meta_file}: holds {what}, but the run reads the rows of "
                                f"data.hf_dataset={hf_rows!r}, whose ids name other images; re-extract with "
                                f"launchers/extract_features.py --hf-dataset {hf_rows} ... --out NEW_DIR")
        for key in ("dim", "tokens"):
            value = self.meta.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise DataError(f"feature cache {meta_file}: {key}={value!r} must be a positive integer")
        self.expect_dim = expect_dim
        if expect_dim is not None and self.meta.get("dim") not in (None, expect_dim):
            raise DataError(f"feature cache {meta_file}: holds {self.meta['dim']}-d features, but "
                            f"model.vision={self.meta.get('vision')!r} takes {expect_dim}-d ones; the cache "
                            "was not made by launchers/extract_features.py for this model, re-extract it")
        bad = next((k for k, v in self.index.items() if not isinstance(v, str)), None)
        if bad is not None:
            raise DataError(f"feature cache {self.root / INDEX_FILE}: id {bad!r} maps to {self.index[bad]!r}, "
                            "expected a shard file name")
        self._handles: dict = {}

    @property
    def name(self) -> str:
        return f"feature cache {self.root}"

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.index

    def __len__(self) -> int:
        return len(self.index)

    def ids(self) -> list[str]:
        return list(self.index)

    def __getitem__(self, image_id: str) -> torch.Tensor:
        try:
            shard = self.index[image_id]
        except KeyError:
            raise KeyError(f"{self.name}: no features for id {image_id!r} ({len(self.index)} ids cached; "
                           "run launchers/extract_features.py over this split)") from None
        path = self.root / shard
        handle = self._handles.get(shard)
        try:
            if handle is None:
                if not path.exists():
                    raise DataFileNotFound(f"{self.name}: shard {path} named in {INDEX_FILE} is missing")
                handle = self._handles[shard] = safe_open(str(path), framework="pt")
            feats = handle.get_tensor(image_id)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            if isinstance(e, DataError):
                raise
            raise DataError(f"{self.name}: cannot read the features of id {image_id!r} from shard {path} "
                            f"({type(e).__name__}: {e}); re-extract the cache") from e
        self._check(feats, image_id, path)
        return feats.float()

    def _check(self, feats: torch.Tensor, image_id: str, path: Path) -> None:
        """A (T, D) grid or (F, E) frame matrix of real numbers, of the width meta.json (and the model) say."""
        want = {"dim": self.meta.get("dim"), "tokens": self.meta.get("tokens") if self.meta.get("kind") == "grid"
                else None}
        problem = None
        if feats.dim() != 2 or 0 in feats.shape:
            problem = f"has shape {tuple(feats.shape)}, expected a non-empty 2-d (tokens, dim) matrix"
        elif not real_numbers(feats.dtype):
            problem = f"has dtype {feats.dtype}, expected real numbers"
        elif want["dim"] is not None and feats.shape[1] != want["dim"]:
            problem = f"is {feats.shape[1]}-d, but {META_FILE} says dim={want['dim']}"
        elif self.expect_dim is not None and feats.shape[1] != self.expect_dim:
            problem = f"is {feats.shape[1]}-d, but model.vision={self.meta.get('vision')!r} takes {self.expect_dim}-d"
        elif want["tokens"] is not None and feats.shape[0] != want["tokens"]:
            problem = f"has {feats.shape[0]} tokens, but {META_FILE} says tokens={want['tokens']}"
        if problem:
            raise DataError(f"{self.name}: the features of id {image_id!r} in shard {path} {problem}")

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.root)!r}, vision={self.meta.get('vision')!r}, {len(self.index)} ids)"


def real_numbers(dtype: torch.dtype) -> bool:
    """The one dtype rule of feature files, image grids and video frames alike: real numbers, floats or integers of
    any width and sign (quantised features); not complex (``float()`` would drop the imaginary part), not bool."""
    return not (dtype.is_complex or dtype == torch.bool)


def model_feature_dim(cfg, kind: str) -> Optional[int]:
    """The feature width the V&L model built from ``cfg`` takes: the CLIP embedding (video frames) or
    grid width (images) of ``model.vision``; None when unknown here (the model's own check applies)."""
    from vlscale.data.tasks import get_task

    video = any(get_task(t).modality == "video" for t in cfg.data.tasks)
    if kind == "grid" and video:  # the model then takes one width for all its tasks: leave it to the model
        return None
    try:
        from vlscale.modeling.vision import vision_dims

        dims = vision_dims(cfg.model.vision)
    except (KeyError, ImportError):
        return None
    return int(dims["embed_dim"] if kind == "frames" else dims["grid_dim"])


def _lock_folder(root: Path):
    """Hold ``root/.lock`` exclusively (released by closing the returned file); wait, saying so, while
    another process holds it."""
    import fcntl
    import sys

    f = open(root / LOCK_FILE, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"feature cache {root}: another extraction is writing it; waiting for it to finish",
              file=sys.stderr, flush=True)
        fcntl.flock(f, fcntl.LOCK_EX)
    return f


class FeatureWriter:
    """Appends features to a cache folder shard by shard (atomic writes; resumable). Holds the folder's
    lock from construction to :meth:`close`, so its index and shard numbers are its own."""

    def __init__(self, root, meta: dict, shard_size: int = 512):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = _lock_folder(self.root)
        try:
            self._open(meta, shard_size)
        except BaseException:
            self._lock.close()
            raise

    def _open(self, meta: dict, shard_size: int) -> None:
        if meta.get("dtype") not in DTYPES:
            raise ValueError(f"feature dtype {meta.get('dtype')!r} is not one of {list(DTYPES)}")
        meta = dict(meta, format=FORMAT_VERSION)
        meta_path = self.root / META_FILE
        if meta_path.exists():
            old = _read_json(meta_path, "what model made the features")
            diff = {k: (old.get(k), v) for k, v in meta.items()
                    if k not in ("tokens", "dim", "grid_shape", HF_ROWS, FINGERPRINT) and old.get(k) != v
                    and not (k == "pretrained" and _same_pretrained(old.get(k), v))}  # a checkpoint moved
            if diff:
                raise DataError(f"feature cache {meta_path} was made with different settings "
                                f"(key: (cached, now)) {diff}; use another --out folder")
            _check_weights(meta_path, old, meta)
            self.meta = old
        else:
            self.meta = meta
        index_path = self.root / INDEX_FILE
        self.index: dict = _read_json(index_path, "") if index_path.exists() else {}
        rows, held = meta.get(HF_ROWS), self.meta.get(HF_ROWS)
        if rows is not None and rows != held:
            row_id = first_row_id(self.index)
            if held is not None or row_id is not None:
                what = (f"rows of the HF dataset {held!r}" if held is not None else
                        f"row-numbered ids of an HF dataset it does not record (e.g. {row_id!r}; "
                        f"made by an older vlscale)")
                raise DataError(f"feature cache {meta_path} holds {what}; the rows of {rows!r} have the same ids "
                                f"(<split>/<row>) and would keep those features: use another --out folder, or "
                                f"name each image with --id-column")
            self.meta[HF_ROWS] = rows
        self.shard_size = shard_size
        self._buffer: dict[str, torch.Tensor] = {}
        self._next = 1 + max([int(p.stem.split("_")[1]) for p in self.root.glob("shard_*.safetensors")],
                             default=-1)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.index or image_id in self._buffer

    def __len__(self) -> int:
        return len(self.index) + len(self._buffer)

    def add(self, image_id: str, feats: torch.Tensor) -> None:
        if feats.dim() != 2:
            raise ValueError(f"features for {image_id!r} must be 2-d (T, D) or (F, E), got {tuple(feats.shape)}")
        for key, value in (("dim", feats.shape[1]),) + ((("tokens", feats.shape[0]),)
                                                          if self.meta["kind"] == "grid" else ()):
            if self.meta.get(key) is None:
                self.meta[key] = int(value)
            elif self.meta[key] != value:
                raise ValueError(f"features for {image_id!r}: {key}={value}, the cache holds {key}={self.meta[key]}")
        self._buffer[image_id] = feats.detach().to("cpu", DTYPES[self.meta["dtype"]]).contiguous()
        if len(self._buffer) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return

        name = f"shard_{self._next:05d}.safetensors"
        tmp = self.root / (name + ".tmp")
        save_safetensors(self._buffer, tmp)
        fsync_path(tmp)  # on disk before the index, written durably next, names it
        os.replace(tmp, self.root / name)
        self._next += 1
        self.index.update({k: name for k in self._buffer})
        self._buffer = {}
        write_text_atomic(self.root / META_FILE, json.dumps(self.meta))
        write_text_atomic(self.root / INDEX_FILE, json.dumps(self.index))

    def close(self) -> None:
        try:
            self.flush()
            if not (self.root / META_FILE).exists():
                write_text_atomic(self.root / META_FILE, json.dumps(self.meta))
                write_text_atomic(self.root / INDEX_FILE, json.dumps(self.index))
        finally:
            self._lock.close()  # releases the lock


def _batches(items: Sequence, size: int) -> Iterable[Sequence]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


@torch.no_grad()
def grid_features(encoder, transform: Callable, images: Sequence, device="cpu") -> torch.Tensor:
    """(N, T, D) fp32 on the host: each image's grid as a cache stores it (``encoder.encode_grid`` of the CLIP
    transform). One place for the extraction and for :class:`vlscale.predict.Predictor`, which encodes a
    cache-trained run's images on the fly."""
    return encoder.encode_grid(transform(images).to(device)).float().cpu()


@torch.no_grad()
def frame_features(encoder, transform: Callable, frames: Sequence, device="cpu") -> torch.Tensor:
    """(F, E) fp32 on the host: each frame's CLIP embedding as a cache stores a video's (``encoder.encode_global``
    of the CLIP transform); the extraction's and :class:`vlscale.predict.Predictor`'s (a cache-trained run's
    video frames)."""
    return encoder.encode_global(transform(frames).to(device)).float().cpu()


def feature_meta(vision: str, pretrained, *, video: bool, dtype: str, image_size, grid_side, dim,
                 synthetic: Optional[dict] = None, fingerprint: Optional[dict] = None) -> dict:
    """The ``meta.json`` of a cache of ``vision``'s features: per-frame embeddings (``video``) or grids;
    ``fingerprint``: the encoder's weights (none where nothing is encoded)."""
    meta = {"vision": vision, "pretrained": pretrained, "kind": "frames" if video else "grid",
            "dtype": dtype, "image_size": int(image_size or 0) or None,
            "grid_shape": None if video or grid_side is None else [int(grid_side), int(grid_side)],
            "dim": dim, "tokens": None if video or grid_side is None else int(grid_side) ** 2, "synthetic": synthetic}
    if fingerprint is not None:
        meta[FINGERPRINT] = fingerprint
    return meta


def read_or_skip(source, i: str, writer: FeatureWriter, stats: dict, skip: bool, how_to_skip: str):
    """``source[i]``; one it cannot read (DataError) stops the extraction saying what the cache keeps and how to go on
    (``how_to_skip``), or with ``skip`` is None, listed in ``stats["unreadable"]``: [(id, why)]."""
    try:
        return source[i]
    except DataError as e:
        return _unreadable(i, e, writer, stats, skip, how_to_skip)


def _unreadable(i: str, e: DataError, writer: FeatureWriter, stats: dict, skip: bool, how_to_skip: str) -> None:
    if not skip:
        raise DataError(f"{e}; the cache {writer.root} keeps the {len(writer)} ids done before it, and the same "
                        f"command goes on from there once it is replaced{how_to_skip}") from e
    stats["unreadable"].append((i, str(e)))
    return None


def default_workers() -> int:
    """Threads that read and transform images for an extraction: this process's CPUs
    (:func:`~vlscale.engine.distributed.usable_cpu_count`), at most 8 (decoding a JPEG and resizing it release the
    GIL)."""
    from vlscale.engine.distributed import usable_cpu_count

    return min(8, usable_cpu_count())


def _read_ahead(prepare: Callable, ids: Sequence[str], reader):
    """(id, ``prepare(id)`` or the DataError it raised) for each of ``ids`` in order, the next ids being prepared in
    ``reader``'s threads (a :class:`~vlscale.data.read_ahead.ReadAhead`) meanwhile. Any other error preparing an id
    is raised when its turn comes, as a read in order would raise it."""

    def task(i):
        def run():
            try:
                return prepare(i)
            except DataError as e:
                return e
        return run

    for k, i in enumerate(ids):
        yield i, reader.get(k, task(i), lambda k=k: ((j, task(ids[j])) for j in range(k + 1, len(ids))))


def extract_features(encoder, transform: Callable, source, ids: Sequence[str], out_dir, *,
                     vision: str, pretrained: Optional[str] = None, video: bool = False,
                     batch_size: int = 32, dtype: str = "float32", shard_size: int = 512,
                     progress: bool = True, device="cpu", synthetic: Optional[dict] = None,
                     hf_rows: Optional[str] = None, skip_unreadable: bool = False, how_to_skip: str = "",
                     workers: Optional[int] = None) -> dict:
    """Encode ``source[id]`` for every id into the cache at ``out_dir``; ids already there are skipped.

    Images: ``encoder.encode_grid(transform(images))`` -> (T, D) each. Video (``video=True``):
    ``encoder.encode_global(transform(frames))`` -> (F, E) per video. ``batch_size`` counts images
    (video: frames; a video longer than that is one batch of its own). ``synthetic``: the synthetic
    world's :func:`~vlscale.data.synthetic.content_params` when the images are the world's (recorded
    in meta.json, checked by :class:`FeatureCache`), None for real images. ``hf_rows``: the HF dataset
    whose rows ``ids`` number (``<split>/<row>``), recorded as meta.json's ``hf_rows``. The encoder's weights
    are recorded as meta.json's ``fingerprint``; a cache of other weights is not continued.

    An id the source cannot read (a corrupt, half-written or empty image, a missing file: DataError) stops the
    extraction, the features written before it kept, with a DataError saying so (and ``how_to_skip``); with
    ``skip_unreadable`` it is left out and listed in the result's ``unreadable``: [(id, why)].

    Images are read and transformed in ``workers`` threads (default :func:`default_workers`), the next batch's
    while this one is encoded: the same features as one at a time (each image's transform is its own), in the same
    order, and an error surfaces at its batch as it did.
    """
    from vlscale.data.read_ahead import ReadAhead
    from vlscale.engine.checkpoint import frozen_fingerprint
    from vlscale.log import progress_bar

    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    meta = feature_meta(vision, pretrained, video=video, dtype=dtype, image_size=getattr(encoder, "image_size", 0),
                        grid_side=getattr(encoder, "grid_side", None),
                        dim=getattr(encoder, "embed_dim" if video else "grid_dim", None), synthetic=synthetic,
                        fingerprint=frozen_fingerprint(encoder))
    if hf_rows is not None:
        meta[HF_ROWS] = hf_rows_key(hf_rows)
    writer = FeatureWriter(out_dir, meta, shard_size=shard_size)
    todo = list(dict.fromkeys(i for i in ids if i not in writer))
    stats = {"total": len(set(ids)), "skipped": len(set(ids)) - len(todo), "written": 0, "unreadable": []}
    bar = progress_bar(total=len(todo), desc=f"features {vision} -> {out_dir}", unit="video" if video else "img",
                       disable=not progress)

    def skip(i, e):  # an id the source cannot read: stops the extraction, or is left out and listed
        _unreadable(i, e, writer, stats, skip_unreadable, how_to_skip)
        bar.update(1)

    def prepare(i):  # in a thread: decoding and resizing release the GIL
        item = source[i]
        if video:
            return transform(item) if len(item) else None
        return transform([item])[0]

    threads = max(1, workers or default_workers())
    reader = ReadAhead(threads, "extract", ahead=2 * threads if video else batch_size + threads)
    try:
        stream = _read_ahead(prepare, todo, reader)
        if video:
            group, parts, frames = [], [], 0

            def flush():
                emb = frame_features(encoder, torch.cat, parts, device) if parts else None
                start = 0
                for gid, n in group:
                    writer.add(gid, emb[start:start + n] if n else torch.empty(0, getattr(encoder, "embed_dim", 0)))
                    start += n
                stats["written"] += len(group)
                bar.update(len(group))

            for vid, got in stream:
                if isinstance(got, DataError):
                    skip(vid, got)
                    continue
                n = 0 if got is None else len(got)
                if group and frames + n > batch_size:
                    flush()
                    group, parts, frames = [], [], 0
                group.append((vid, n))
                parts += [got] if n else []
                frames += n
            if group:
                flush()
        else:
            for chunk in _batches(todo, batch_size):
                kept = []
                for i, got in (next(stream) for _ in chunk):
                    if isinstance(got, DataError):
                        skip(i, got)
                    else:
                        kept.append((i, got))
                if not kept:
                    continue
                feats = grid_features(encoder, torch.stack, [pixels for _, pixels in kept], device)
                for (i, _), f in zip(kept, feats):
                    writer.add(i, f)
                stats["written"] += len(kept)
                bar.update(len(kept))
    finally:
        reader.close()
        writer.close()
        bar.close()
    return stats
