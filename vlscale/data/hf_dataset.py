"""Any Hugging Face ``datasets`` dataset with image and text columns, through a column mapping.

``data.hf_dataset`` is a local folder written by ``DatasetDict.save_to_disk`` (read with
``load_from_disk``), a local folder of data files, or a hub name (``load_dataset``; that needs the
network or the local HF cache; a clear local path that is not there is not looked up). It must have splits:
``train``; ``val`` = validation / val / valid / dev; ``test``. ``data.hf_columns`` maps our roles to its column names:

    image      the image column (an ``Image`` feature, image bytes/path dicts, file paths, or an ``Array3D`` /
               ``Array2D`` of 0-255 pixels);
               NLVR2: a list of two columns
    image_id   optional: a column naming the image (rows sharing an image share its id and its
               cached features; a row whose image differs from its id's first row's, by its bytes' digest
               or the file it names, is malformed); default "<split>/<row>" (NLVR2 "<split>/<row>/<k>")
    question | text            the text input (vqa, gqa, nlvr2)
    answer | answers           vqa / gqa: one gold answer and/or the list of human answers
                               (strings or {"answer": ...}, also as a ``Sequence`` of such structs,
                               which ``datasets`` gives as a dict of lists); VQA's target is ``answer`` or the most
                               frequent of ``answers`` (counted normalised: vqa_target), its references are
                               ``answers``, and its soft ``label`` (data.vqa_targets=sampled) is scored from them
    caption | captions         caption: one caption or a list (train: one example per caption)
    label                      nlvr2: 0/1, true/false
    (answer, answers and label may be ``ClassLabel`` columns, also in a ``Sequence``: read as their names)
    id                         optional: the uid column (default "<split>-<row>")
    group                      optional, nlvr2: the consistency-group column
    answer_type                optional, vqa: VQA v2's answer type ("yes/no", "number", "other"): evaluation
                               then scores each type too; a split without the column (a test split) has none

A row whose answer columns (answer / answers, label, caption / captions: those the task reads) hold
nothing (None, "" or an empty list; a label of -1, the datasets convention for a withheld label), or a
split without those columns, has no answers: refused (naming what the cell holds, e.g. an empty list; a None
reads as a missing key), or skipped with ``data.skip_bad_records=true``, unless ``require_answers=False``
(``launchers/evaluate.py --predict-only``, a leaderboard's test split), which reads it as the JSON loaders
read a record without its answer keys (:meth:`Record.answers` decides): one example per row (captions: per
image) with an empty ``target``, no ``references`` and no soft ``label``. Every other check stays.

The images become a :class:`HFImageSource` (a VisualSource of kind "images"): ``source[image_id]``
decodes that row's image to a uint8 (H, W, 3) RGB array on demand from the memory-mapped Arrow table, so nothing is held twice in memory.
Relative image paths in a local dataset resolve against its folder (then the current directory); a row whose
image cell names a file that is not there (or an empty one, 0 bytes) is refused when the split is read (at start-up),
or skipped and counted with ``data.skip_bad_records=true``, as a row without an image is.
An image that cannot be read raises DataError naming the dataset, split, row and column. Video
tasks are not supported through this path.
"""

from __future__ import annotations

import difflib
import functools
import io
import itertools
import logging
import os
from collections import Counter
from pathlib import Path
from stat import S_ISREG
from typing import Any

from vlscale.config import is_hub_id, missing_source
from vlscale.data.real import (DataError, DataFileNotFound, ExampleList, Record, best_answer, no_text,
                               parse_records)
from vlscale.data.tasks import Example, get_task
from vlscale.files import cwd_note

logger = logging.getLogger(__name__)

COLUMN_ROLES = ("image", "image_id", "question", "text", "answer", "answers", "caption", "captions",
                "label", "id", "group", "answer_type")
SPLIT_NAMES = {"train": ("train",), "val": ("validation", "val", "valid", "dev"), "test": ("test",)}
HF_TASKS = ("vqa", "gqa", "caption", "nlvr2")
ANSWER_ROLES = ("answer", "answers", "caption", "captions", "label")
TASK_ROLES = {"vqa": ("image", "image_id", "question", "text", "answer", "answers", "id", "answer_type"),
              "gqa": ("image", "image_id", "question", "text", "answer", "answers", "id"),
              "caption": ("image", "image_id", "caption", "captions", "id"),
              "nlvr2": ("image", "image_id", "question", "text", "label", "answer", "id", "group")}
"""The roles each task reads (nlvr2's image_id is refused with a message of its own)."""
_WARNED_UNREAD: set = set()


def _folder_contents(path: Path) -> str:
    """What a local dataset folder holds, for error messages: its splits and their data files, or its files."""
    import json

    info = path / "dataset_dict.json"
    if info.is_file():
        try:
            splits = json.loads(info.read_text()).get("splits", [])
        except (ValueError, AttributeError):
            splits = []
        parts = []
        for name in splits:
            try:
                n = len(json.loads((path / name / "state.json").read_text()).get("_data_files", []))
            except (OSError, ValueError, AttributeError):
                n = "?"
            parts.append(f"{name!r} ({n} data file{'' if n == 1 else 's'})")
        return "a saved DatasetDict with splits " + (", ".join(parts) or "none")
    entries = sorted(path.iterdir(), key=lambda p: p.name)
    names = [p.name + ("/" if p.is_dir() else "") for p in entries[:10]]
    return f"{len(entries)} entries {names}" if entries else "nothing (an empty folder)"


def _no_rows(file: Path) -> bool:
    """Whether a data file holds no rows: 0 bytes, a parquet file of 0 rows, or a small JSON(L) / CSV / TSV file of
    blank lines (CSV / TSV: and its header line; JSON: or ``[]``)."""
    try:
        size = file.stat().st_size
        if size == 0:
            return True
        if file.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_metadata(file).num_rows == 0
        if file.suffix in (".json", ".jsonl", ".csv", ".tsv") and size <= 65536:
            lines = [line for line in file.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
            header = 1 if file.suffix in (".csv", ".tsv") else 0
            return len(lines) <= header or file.suffix == ".json" and "".join(lines).replace(" ", "") == "[]"
    except Exception:  # an unreadable file: the library's error says why
        return False
    return False


DATA_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".txt", ".parquet", ".arrow")
"""The files the datasets library reads rows from in a folder of data files (its packaged builders')."""


def _empty_data_files(path: Path, limit: int = 2000) -> list[str]:
    """The data files under a local folder (in its subfolders too, as the library reads them; not hidden ones) that
    hold no rows, as paths relative to it, of its first ``limit`` data files: the library's errors for them name no
    file (a 0-byte JSON file: a bare StopIteration; a split of such files: 'Instruction "validation" corresponds to
    no data')."""
    files = sorted(f for f in path.rglob("*") if f.suffix in DATA_FILE_SUFFIXES and f.is_file()
                   and not any(part.startswith((".", "__")) for part in f.relative_to(path).parts))
    return [f.relative_to(path).as_posix() for f in files[:limit] if _no_rows(f)]


def _why(e: Exception) -> str:
    """An error of the datasets library in one line, with the error it wraps: its DatasetGenerationError says
    only "An error occurred while generating the dataset" (the cause, e.g. pyarrow's, is what to fix)."""
    def one(err: BaseException) -> str:  # "StopIteration", not "StopIteration: ", for an error without a message
        said = " ".join(str(err).split())
        return f"{type(err).__name__}: {said}" if said else type(err).__name__

    cause = e.__cause__
    return one(e) + (f", from {one(cause)}" if cause is not None else "")


def _splits_one_by_one(path: Path) -> dict | None:
    """A saved DatasetDict with a split of 0 rows, which ``save_to_disk`` writes without a data file and
    ``load_from_disk`` then cannot load (IndexError, every split with it): ``{split: its Dataset, loaded alone, or
    None for a split without data files}``; None for any other folder, or where a split cannot be loaded alone."""
    import json

    import datasets

    try:
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        files = {s: json.loads((path / s / "state.json").read_text())["_data_files"] for s in splits}
        if all(files.values()):
            return None
        return {s: datasets.load_from_disk(str(path / s)) if f else None for s, f in files.items()}
    except Exception:  # not such a folder: the caller's error says what the library found
        return None


def _data_files_one_by_one(path: Path) -> tuple[dict, dict] | None:
    """A folder of data files where a split's files all hold no rows (:func:`_no_rows`: a CSV of its header alone,
    a 0-byte JSON file), which the library cannot load, nor any split with it ('Instruction "validation"
    corresponds to no data'): ``({split: its Dataset, loaded from its own files alone, or None for such a split},
    {such split: its files, as paths in the folder})``, as :func:`_splits_one_by_one` gives a saved DatasetDict's;
    None where no split or every split is so, or where another split cannot be loaded alone."""
    import datasets

    try:
        files = {str(s): list(fs) for s, fs in datasets.load_dataset_builder(str(path)).config.data_files.items()}
        empty = {s: [Path(os.path.relpath(f, path)).as_posix() for f in fs] for s, fs in files.items()
                 if all(_no_rows(Path(f)) for f in fs)}
        if not empty or len(empty) == len(files):
            return None
        return {s: None if s in empty else datasets.load_dataset(str(path), data_files={s: fs}, split=s)
                for s, fs in files.items()}, empty
    except Exception:  # not such a folder: the caller's error says what the library found
        return None


def _warn_zero_byte_files(path: Path, split: str, key: str, name_or_path: str) -> None:
    """Warn of a folder of data files' 0-byte files of ``split`` beside files of rows: the library reads each as no
    rows, and an empty file where the others hold rows is almost always a download or copy that failed (a split
    whose files all hold none is a missing split, refused when asked for)."""
    import datasets

    try:
        files = [Path(f) for f in datasets.load_dataset_builder(str(path)).config.data_files.get(split, [])]
    except Exception:  # the folder loaded: its files resolve as they did
        return
    zero = [Path(os.path.relpath(f, path)).as_posix() for f in files if f.stat().st_size == 0]
    if zero:
        them, they = ("it", "it") if len(zero) == 1 else ("them", "they")
        logger.warning(f"{key}={name_or_path!r}: its {_files_are(zero)} empty (0 bytes) where split {split!r}'s "
                       f"other files hold rows (a download or copy that failed?): the split is read without {them}; "
                       f"copy {them} again, or remove {them} if {they} should hold no rows")


def _files_are(files: list[str]) -> str:
    """``data file 'x' is`` / ``data files [...] are`` (the first 10 of more, counted), for an error."""
    if len(files) == 1:
        return f"data file {files[0]!r} is"
    if len(files) <= 10:
        return f"data files {files} are"
    return f"{len(files)} data files (the first 10: {files[:10]}) are"


def open_hf_split(name_or_path: str, split: str, key: str = "data.hf_dataset"):
    """The ``datasets.Dataset`` of ``split`` (ours, train / val / test, or the dataset's own name), the dataset's
    name of it, and ours: the name its ids use (``val`` for the dataset's ``validation``, ``dev``, ... where
    that is the split ours reads; the name given otherwise, e.g. ``dev`` beside a ``validation`` split).
    ``key``: the setting errors name (``--hf-dataset`` for launchers/extract_features.py)."""
    import datasets

    path, no_rows = Path(name_or_path).expanduser(), {}  # no_rows: a folder of data files' splits of none, their files
    data_files = False  # whether it is a folder of data files (not a saved DatasetDict, not a hub name)
    try:
        there = path.exists()
    except OSError as e:  # Python 3.11's exists() raises where a folder on the way may not be entered, a name too long
        hint = "; check the permissions of the folders on its path" if isinstance(e, PermissionError) else ""
        raise DataError(f"{key}={name_or_path!r}: cannot be looked at ({e.strerror or e}){hint}") from e
    if there:
        if not path.is_dir():
            raise DataError(f"{key}={name_or_path!r} is a file; give a dataset folder or a hub name")
        try:
            try:
                obj = datasets.load_from_disk(str(path))
            except FileNotFoundError:  # not a save_to_disk folder: a folder of data files
                data_files = True
                obj = datasets.load_dataset(str(path))
        except Exception as e:  # the datasets library's own errors (EmptyDatasetError, IndexError, ValueError...)
            obj = _splits_one_by_one(path)
            if obj is None and (found := _data_files_one_by_one(path)):
                obj, no_rows = found
            empty = [] if obj is not None else _empty_data_files(path)
            if empty:  # the library's error names no file
                it = "it" if len(empty) == 1 else "them"
                raise DataError(f"{key}={name_or_path!r}: its {_files_are(empty)} empty (no rows), and the datasets "
                                f"library cannot load the folder with {it} ({_why(e)}); remove {it} or give {it} "
                                "rows") from e
            if obj is None:
                raise DataError(f"{key}={name_or_path!r}: the datasets library cannot load it "
                                f"({_why(e)}); the folder holds {_folder_contents(path)}") from e
    elif missing_source(name_or_path):  # no hub id, or an owner/name whose owner is a folder here
        # a path, not a hub id: the hub is not asked (without HF_HUB_OFFLINE=1 and no network, ~30 s of retries)
        path_like = name_or_path.startswith(("/", "./", "../", "~"))
        why = ("it is a path (absolute, or starting with ./, ../ or ~)" if path_like else
               "it is no hub id (a name, or owner/name, of letters, digits, '-', '_' and '.')"
               if not is_hub_id(name_or_path) else
               f"its folder {str(path.parent)!r} is here (so is a hub id owner/name whose owner is a local folder: "
               "run from another folder)")
        try:  # a near name, for "did you mean"
            folders = [p.name for p in itertools.islice(path.parent.iterdir(), 10000) if p.is_dir()] \
                if path.parent.is_dir() else []
        except OSError:  # a folder this process may not list: the line without it
            folders = []
        near = difflib.get_close_matches(path.name, folders, 1)
        raise DataError(f"{key}={name_or_path!r}: no such folder{cwd_note(path)}"
                        + (f" ({path})" if path != Path(name_or_path) else "") + f"; not looked up on the hub, as {why}"
                        + (f"; did you mean {str(Path(name_or_path).parent / near[0])!r}?" if near else ""))
    else:
        try:
            obj = datasets.load_dataset(name_or_path)
        except Exception as e:
            raise DataError(f"{key}={name_or_path!r}: not a local folder{cwd_note(path)}, and "
                            f"datasets.load_dataset failed ({_why(e)})") from e
    if isinstance(obj, datasets.Dataset):
        raise DataError(f"{key}={name_or_path!r} holds one Dataset without splits; save a "
                        "DatasetDict with train / validation / test splits")
    names = SPLIT_NAMES.get(split, (split,))
    # _splits_one_by_one's splits of 0 rows (None) are passed over for the next name (an empty validation beside dev)
    first = {ours: next((n for n in aliases if obj.get(n) is not None), None) for ours, aliases in SPLIT_NAMES.items()}
    for name in names:
        if obj.get(name) is not None:
            ours = next((o for o, aliases in SPLIT_NAMES.items() if split in (o, *aliases) and first[o] == name), split)
            if data_files:
                _warn_zero_byte_files(path, name, key, name_or_path)
            return obj[name], name, ours
    empty = [name for name in names if name in obj]
    if empty:  # missing, as a split not there is
        it, has, them = ("split", "has", "it") if len(empty) == 1 else ("splits", "have", "them")
        files = [f for name in empty for f in no_rows.get(name, [])]
        why, fix = ((f"its {_files_are(files)} empty", "remove " + ("that file" if len(files) == 1 else "those files"))
                    if files else (f"saved without a data file: {empty[0]}/state.json lists none",
                                   f"save the DatasetDict without {them}"))
        raise DataFileNotFound(f"{key}={name_or_path!r}: its {it} {', '.join(map(repr, empty))} {has} no rows ({why}); "
                               f"give {them} rows, or {fix}")
    # a split not there is a missing file, as an annotation file is (extract_features.py --real skips it, says so)
    raise DataFileNotFound(f"{key}={name_or_path!r} has no split for {split!r} (tried {list(names)}); "
                           f"its splits: {list(obj)}")


def _roles(task: str, columns: dict, dataset_columns: list[str], require_answers: bool = True,
           where: str = "the dataset") -> dict[str, Any]:
    """The checked column mapping. An answer role's column may be missing from the split (``where``) only
    where answers are not required (its rows then have none); else the error names ``--predict-only``."""
    if task not in HF_TASKS:
        raise DataError(f"data.hf_dataset supports tasks {list(HF_TASKS)}, not {task!r}")
    unknown = [k for k in columns if k not in COLUMN_ROLES]
    if unknown:
        raise DataError(f"data.hf_columns has unknown role {unknown[0]!r}; valid roles: {list(COLUMN_ROLES)}")
    roles = dict(columns)
    unread = [r for r in roles if r not in TASK_ROLES[task]]
    if unread and (task, tuple(unread)) not in _WARNED_UNREAD:
        _WARNED_UNREAD.add((task, tuple(unread)))
        logger.warning(f"data.hf_columns: task {task!r} does not read the role(s) {unread} "
                       f"(its roles: {list(TASK_ROLES[task])}); they are ignored")
    need = {"vqa": [("image",), ("question", "text"), ("answer", "answers")],
            "gqa": [("image",), ("question", "text"), ("answer", "answers")],
            "caption": [("image",), ("caption", "captions")],
            "nlvr2": [("image",), ("question", "text"), ("label", "answer")]}[task]
    for options in need:
        if not any(roles.get(o) for o in options):
            form = ", ".join(f"{o[0]}: COLUMN" for o in need)
            raise DataError(f"data.hf_columns for task {task!r} needs {' or '.join(options)}; got {columns}: map each "
                            f"role to a column of {where} ({dataset_columns}), e.g. data.hf_columns=\"{{{form}}}\"")
    images = roles["image"]
    n_images = get_task(task).n_images
    images = [images] if isinstance(images, str) else list(images)
    if len(images) != n_images:
        raise DataError(f"data.hf_columns.image for task {task!r} must name {n_images} column(s), got {roles['image']!r}")
    roles["image"] = images
    if n_images > 1 and roles.get("image_id"):
        raise DataError("data.hf_columns.image_id applies to single-image tasks only")
    for role, col in roles.items():
        for c in (col if isinstance(col, list) else [col]):
            if c in dataset_columns or (role in (*ANSWER_ROLES, "answer_type") and not require_answers):
                continue
            if role in ANSWER_ROLES:
                raise DataError(f"data.hf_columns.{role}={c!r} is not a column of {where} (its columns: "
                                f"{dataset_columns}); a split without its answers, such as a leaderboard's test "
                                "split, can only be predicted: launchers/evaluate.py --predict-only")
            raise DataError(f"data.hf_columns.{role}={c!r} is not a column of the dataset; "
                            f"its columns: {dataset_columns}")
    return roles


def _answer_columns(task: str, roles: dict) -> list[str]:
    """The columns the task reads its answers from (as :func:`_load_cached`'s parser reads them)."""
    if task in ("vqa", "gqa"):
        return [roles[r] for r in ("answers", "answer") if roles.get(r)]
    if task == "nlvr2":
        return [roles.get("label") or roles["answer"]]
    return [roles.get("captions") or roles["caption"]]


def _class_label_names(features, columns) -> dict:
    """{column: its ClassLabel's names} for the answer ``columns`` that are ``ClassLabel`` (also as a
    ``Sequence``): their integers were refused for VQA / GQA ("must be a string") and read as NLVR2's 0 / 1,
    which inverts a label whose names are ``["True", "False"]``."""
    import datasets

    lists = (datasets.Sequence, getattr(datasets, "List", datasets.Sequence))  # List: datasets >= 4
    out = {}
    for col in columns:
        feature = features.get(col)
        inner = feature.feature if isinstance(feature, lists) else feature
        if isinstance(inner, datasets.ClassLabel):
            out[col] = list(inner.names)
    return out


def _named(value, names: list):
    """A ClassLabel cell (an int, or a list of them) as its name(s); -1 (withheld) and None as None."""
    if isinstance(value, list):
        return [_named(v, names) for v in value]
    return names[value] if isinstance(value, int) and 0 <= value < len(names) else None


def _has_answer(value) -> bool:
    """Whether an answer cell holds anything: not None, "", an empty list, or -1 (a withheld ClassLabel)."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value == -1):
        return False
    if isinstance(value, (str, list, tuple, dict)):
        return bool(value.strip() if isinstance(value, str) else value)
    return True


def _blank(value) -> str | None:
    """What an answer cell holding nothing (:func:`_has_answer`) holds, for the error: None for None, the
    datasets library's missing value (then the column reads as missing)."""
    if value is None:
        return None
    if isinstance(value, str):
        return no_text(value)
    if isinstance(value, int):
        return f"is {value} (the datasets library's mark of a withheld label)"
    return "is an empty list"


class HFImageSource:
    """VisualSource over image columns of an HF dataset: ``source[image_id]`` -> uint8 (H, W, 3).

    ``name`` (e.g. ``path[train]``) and ``base_dir`` (a local dataset's folder, against which relative
    image paths resolve) come into error messages and path lookups.
    """

    kind = "images"

    def __init__(self, dataset, locations: dict[str, tuple[int, str]], name: str = "HF dataset",
                 base_dir=None):
        self.dataset = dataset
        self.locations = locations
        self.name = name
        self.base_dir = base_dir
        self._columns: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.locations)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.locations

    def ids(self) -> list[str]:
        return list(self.locations)

    def __repr__(self) -> str:
        return f"HFImageSource({len(self.locations)} images)"

    def __getitem__(self, image_id: str):
        try:
            row, column = self.locations[image_id]
        except KeyError:
            raise KeyError(f"image id {image_id!r} is not in this HF dataset split") from None
        if column not in self._columns:
            import datasets

            data = self.dataset.select_columns([column])
            if isinstance(data.features[column], datasets.Image):  # decode here, where errors get context
                data = data.cast_column(column, datasets.Image(decode=False))
            self._columns[column] = data
        return decode_image(self._columns[column][row][column],
                            f"{self.name}: row {row}, column {column!r} (image id {image_id!r})", self.base_dir)


def decode_image(value, where: str = "", base_dir=None):
    """An HF image cell (PIL image, {bytes|path} dict, file path, or an array or an Array2D / Array3D column's
    nested lists, of 0-255 integers) -> uint8 (H, W, 3).

    Relative paths resolve against ``base_dir`` when given (then the current directory). Anything
    unreadable raises DataError starting with ``where`` (the dataset, split, row and column).
    """
    import numpy as np
    from PIL import Image

    from vlscale.data.visual import say_if_truncated_images_load

    say_if_truncated_images_load()
    where = where or "HF dataset"
    opened = []  # the image file a path cell named, for the error: the cell's repr cut at 60 characters lost its name

    def open_path(p: str):
        full, tries = find_image_file(p, base_dir)
        if full is None:
            raise DataFileNotFound(f"{where}: holds {p!r}, which is neither image data nor an existing image "
                                   f"file (looked for {' and '.join(map(str, tries))})")
        opened.append(full)
        return Image.open(full)

    try:
        if isinstance(value, Image.Image):
            img = value
        elif isinstance(value, dict) and value.get("bytes"):
            img = Image.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, dict) and value.get("path"):
            img = open_path(value["path"])
        elif isinstance(value, str) and value:
            img = open_path(value)
        elif isinstance(value, (bytes, bytearray)) and value:
            img = Image.open(io.BytesIO(value))
        elif hasattr(value, "__array__") or isinstance(value, list) and value:  # an array, or an Array2D /
            pixels = np.asarray(value)  # Array3D column's cell: nested lists of pixels
            if pixels.size == 0:
                raise DataError(f"{where}: an array image cell holds no pixels (shape {pixels.shape})")
            if pixels.dtype != np.uint8 and (pixels.dtype.kind not in "iu" or pixels.min() < 0 or pixels.max() > 255):
                # PIL would read floats in [0, 1] as black and clip 16-bit values to 255, without a word
                span = f" values in [{pixels.min()}, {pixels.max()}]" if pixels.dtype.kind in "iufb" else ""
                raise DataError(f"{where}: an array image cell must hold 0-255 integers, got {pixels.dtype}{span}")
            img = Image.fromarray(pixels.astype(np.uint8))
        else:
            raise DataError(f"{where}: cannot read an image from {type(value).__name__} {value!r:.60}")
        return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except DataError:
        raise
    except (OSError, ValueError, TypeError, SyntaxError, Image.DecompressionBombError) as e:
        if opened:
            from vlscale.data.visual import unreadable

            raise DataError(f"{where}: cannot read image {opened[0]} ({unreadable(opened[0], e)})") from e
        what = f"{len(value['bytes'])} bytes" if isinstance(value, dict) and value.get("bytes") else f"{value!r:.60}"
        raise DataError(f"{where}: cannot read an image from {what} ({type(e).__name__}: {e})") from e


def find_image_file(path: str, base_dir=None) -> tuple[Path | None, list[Path]]:
    """(the file an image cell's path names, or None; the places looked at): a relative path against
    ``base_dir`` (a local dataset's folder) first, then the current directory."""
    tries = _places(path, base_dir)
    return next((t for t in tries if t.is_file()), None), tries


def _places(path: str, base_dir=None) -> list[Path]:
    """Where :func:`find_image_file` looks for ``path``, in order."""
    return ([Path(base_dir) / path] if base_dir is not None and not Path(path).is_absolute() else []) + [Path(path)]


def _path_only(value) -> str | None:
    """The file path an image cell names when it holds no image data itself (a path string, or a
    ``{bytes, path}`` dict without bytes), else None."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, dict) and not value.get("bytes") and isinstance(value.get("path"), str) and value["path"]:
        return value["path"]
    return None


def missing_image_file(value, base_dir=None) -> str | None:
    """Why an image cell that names a file cannot be read (the file is not there, or is empty: 0 bytes), or None:
    checked when the split is read (each named file is looked up anyway, so its size costs no extra pass), so such
    a file stops the run at start-up (or its row is skipped with data.skip_bad_records=true) instead of failing when
    a batch reaches it."""
    path = _path_only(value)
    if path is None:
        return None
    tries = _places(path, base_dir)
    for place in tries:  # find_image_file's look-up, with the file's size from the same stat
        try:
            found = place.stat()
        except (OSError, ValueError):
            continue
        if S_ISREG(found.st_mode):
            return f"holds {path!r}, whose file {place} is empty (0 bytes)" if found.st_size == 0 else None
    return (f"holds {path!r}, which is neither image data nor an existing image file "
            f"(looked for {' and '.join(map(str, tries))})")


def _image_present(value) -> bool:
    if value is None:
        return False
    if isinstance(value, dict):
        return bool(value.get("bytes") or value.get("path"))
    if isinstance(value, str):
        return bool(value)
    return True


def _no_image_mask(column):
    """Per cell of an Arrow array: True where :func:`_image_present` finds no image, read from the
    Arrow data without decoding; None for a type not handled here (then check the Python values)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    def is_text(t) -> bool:
        return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
                or pa.types.is_large_binary(t))

    def blank(a):  # None, "" or b"" (a falsy str / dict value)
        return pc.fill_null(pc.equal(pc.binary_length(a), 0), True)

    t = column.type
    if pa.types.is_struct(t):  # {bytes, path} dicts (the Image feature's storage): no image unless one is set
        mask = pa.array([True] * len(column))
        for field in ("bytes", "path"):
            if t.get_field_index(field) >= 0:
                value = pc.struct_field(column, field)
                if not (is_text(value.type) or pa.types.is_null(value.type)):
                    return None
                mask = pc.and_(mask, pc.is_null(value) if pa.types.is_null(value.type) else blank(value))
        return pc.or_(pc.is_null(column), mask)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return blank(column)
    return pc.is_null(column)  # bytes, arrays, lists: only None is no image


def rows_without_image(dataset, columns, batch_size: int = 10_000, base_dir=None) -> list[tuple[int, str, str]]:
    """``(row, column, why)`` for each row of ``dataset`` where one of ``columns`` holds no image, or names an
    image file that is not there or is empty (the first such column): the rows training's loader refuses (and skips with
    ``data.skip_bad_records=true``). Read from the Arrow data in batches, nothing decoded; only cells that
    name a file are looked up on disk (``base_dir`` as :func:`find_image_file`)."""
    import numpy as np
    import pyarrow as pa

    columns = list(columns)
    out: list[tuple[int, str, str]] = []
    start = 0
    for table in dataset.select_columns(columns).with_format("arrow").iter(batch_size=batch_size):
        first = np.full(table.num_rows, -1)
        why: dict[int, str] = {}
        for k in reversed(range(len(columns))):
            column = table.column(columns[k]).combine_chunks()
            mask = _no_image_mask(column)
            t = column.type
            names_files = pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_struct(t)
            values = column.to_pylist() if mask is None or names_files else None  # once, for both uses
            missing = (np.array([not _image_present(v) for v in values], bool) if mask is None
                       else mask.to_numpy(zero_copy_only=False).astype(bool))
            if names_files:
                for r, value in enumerate(values):
                    problem = None if missing[r] else missing_image_file(value, base_dir)
                    if problem:
                        first[r], why[r] = k, problem
            first[missing] = k
            for r in np.flatnonzero(missing):
                why[int(r)] = "has no image"
        out.extend((start + int(r), columns[first[r]], why[int(r)]) for r in np.flatnonzero(first >= 0))
        start += table.num_rows
    return out


def _image_mark(value, base_dir=None) -> tuple | None:
    """What tells an image cell's image from another's without decoding it: a digest of its bytes (their length
    alone took two images of one size, e.g. uncompressed ones, for the same), or the file it names; None for a
    cell of another kind (not compared)."""
    import hashlib

    data = value.get("bytes") if isinstance(value, dict) else value if isinstance(value, (bytes, bytearray)) else None
    if data:
        return ("bytes", f"{len(data)} bytes, blake2b {hashlib.blake2b(data, digest_size=8).hexdigest()}")
    path = _path_only(value)
    if path is not None:
        found = find_image_file(path, base_dir)[0]
        return ("file", str(found.resolve()) if found is not None else path)
    return None


def other_image(marks: dict, image_id: str, row: int, cell, base_dir=None) -> tuple[int, str] | None:
    """Rows naming one image_id must hold one image: ``row``'s image cell against the first row's of ``image_id``
    (kept in ``marks``) -> ``(first row, "this vs that")`` where they differ, else None (the training loader and
    ``extract_features.py --id-column`` check the same way)."""
    mark = _image_mark(cell, base_dir)
    first_row, first = marks.setdefault(image_id, (row, mark))
    if mark is not None and first is not None and mark[0] == first[0] and mark != first:
        return first_row, f"{mark[1]} vs {first[1]}"
    return None


def _rows_of(value):
    """A ``Sequence`` of structs as ``datasets`` hands it back, a dict of equal-length lists
    (``{"answer": [...], "answer_confidence": [...]}``), as the list of dicts it stands for; anything else as is."""
    if (isinstance(value, dict) and value and all(isinstance(v, list) for v in value.values())
            and len({len(v) for v in value.values()}) == 1):
        return [dict(zip(value, items)) for items in zip(*value.values())]
    return value


def _one_or_many(rec: Record, roles: dict, role: str) -> None:
    """A column mapped to the other one of a pair of roles (``answer`` / ``answers``, ``caption`` / ``captions``): one
    string a row where the role takes a list, or a list where it takes one string, refused naming the role to map it
    to; it was "must be a list, got str" of the column, which the mapping, not the data, got wrong."""
    one, many = role.rstrip("s"), role.rstrip("s") + "s"
    value = rec.data.get(roles[role])
    if (role == many) == isinstance(value, str) and isinstance(value, (str, list)):
        holds, takes, other = (("one string", "a list", one) if role == many else ("a list", "one string", many))
        raise rec.error(roles[role], f"holds {holds} a row, and data.hf_columns.{role} takes {takes}: map this "
                                     f"column to {other} instead")


def _strings(rec: Record, key: str, inner: tuple = ("answer",)) -> list[str]:
    """A list column of strings (or of objects holding the string under one of ``inner``)."""
    items = rec.get(key, list)
    if not items:
        raise rec.error(key, "is empty")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, dict):
            item = next((item[k] for k in inner if isinstance(item.get(k), str)), None)
        if not isinstance(item, str) or not item.strip():
            raise rec.error(key, f"item {i} must be a non-empty string, got {items[i]!r:.60}")
        out.append(item.strip())
    return out


_ANSWERED: set = set()  # the _load_cached keys whose read requiring answers found every row's answers


def load_hf_examples(task: str, name_or_path: str, split: str, columns: dict, skip_bad_records: bool = False,
                     require_answers: bool = True) -> tuple[ExampleList, HFImageSource]:
    """Examples of ``task`` from one split of an HF dataset, and the VisualSource of its images.
    ``require_answers=False`` (``evaluate.py --predict-only`` only): rows without answers are read too (see the
    module docstring)."""
    frozen = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in (columns or {}).items()))
    key = (task, str(name_or_path), split, frozen, bool(skip_bad_records))
    # A split whose rows all have their answers reads the same either way: the read that required them (training's,
    # evaluation's) serves a later one that does not (their visual source's) without reading every row again.
    need = bool(require_answers) or key in _ANSWERED
    examples, source = _load_cached(*key, need)
    if need and not examples.unanswered:
        _ANSWERED.add(key)
    out = ExampleList(examples, source=examples.source)
    out.merge_skips(examples)
    return out, source


@functools.lru_cache(maxsize=8)
def _load_cached(task: str, name_or_path: str, split: str, frozen: tuple, skip: bool, require_answers: bool):
    import datasets

    columns = {k: list(v) if isinstance(v, tuple) else v for k, v in frozen}
    ds, hf_split, split = open_hf_split(name_or_path, split)  # split: ours (the ids extract_features.py gives)
    source_name = f"{name_or_path}[{hf_split}]"
    roles = _roles(task, columns, list(ds.column_names), require_answers, source_name)
    answer_columns = _answer_columns(task, roles)
    needed = sorted({c for v in roles.values() for c in (v if isinstance(v, list) else [v]) if c in ds.column_names})
    raw = ds.select_columns(needed)
    for col in roles["image"]:
        if isinstance(raw.features[col], datasets.Image):
            raw = raw.cast_column(col, datasets.Image(decode=False))
    class_names = _class_label_names(raw.features, answer_columns)
    locations: dict[str, tuple[int, str]] = {}
    marks: dict[str, tuple] = {}  # image_id -> (first row, its image's mark): other_image
    train = split == "train"
    current = {"row": -1, "unanswered": 0, "blank": None}  # set by records() just before parse_records parses it
    base_dir = Path(name_or_path).expanduser() if Path(name_or_path).expanduser().is_dir() else None

    def parse(rec: Record) -> list[Example]:
        row = current["row"]
        for col in roles["image"]:
            if not _image_present(rec.data.get(col)):
                raise rec.error(col, "has no image")
            problem = missing_image_file(rec.data.get(col), base_dir)
            if problem:
                raise rec.error(col, problem)
        uid = rec.ident(roles["id"]) if roles.get("id") else f"{split}-{row}"
        if roles.get("image_id"):
            image_ids = [rec.ident(roles["image_id"])]
        elif len(roles["image"]) == 1:
            image_ids = [f"{split}/{row}"]
        else:
            image_ids = [f"{split}/{row}/{k}" for k in range(len(roles["image"]))]
        text_col = roles.get("question") or roles.get("text")
        extra: dict = {"row": row}
        text = rec.text(text_col) if task != "caption" else ""
        if task == "nlvr2":
            extra["group"] = rec.ident(roles["group"]) if roles.get("group") else uid
        if current["blank"] and require_answers:  # an empty list, say, not a missing column
            col, what = current["blank"]
            raise rec.error(col, f"{what}: the row has no answers (data.skip_bad_records=true skips such rows; a "
                                 "split without its answers, such as a leaderboard's test split, can only be "
                                 "predicted: launchers/evaluate.py --predict-only)")
        if not rec.answers(*answer_columns):  # withheld (evaluate.py --predict-only): no target, no references
            examples = [Example(task=task, uid=uid, text=text, target="", image_ids=image_ids, extra=extra,
                                source=source_name)]
        elif task in ("vqa", "gqa"):
            for role in ("answers", "answer"):
                if roles.get(role):
                    _one_or_many(rec, roles, role)
            answers = _strings(rec, roles["answers"]) if roles.get("answers") else None
            if roles.get("answer"):
                target = rec.text(roles["answer"])
            elif task == "vqa":
                from vlscale.data.vqa import vqa_target

                target = vqa_target(answers)
            else:
                target = best_answer({a: float(c) for a, c in Counter(answers).items()})
            refs = answers if (task == "vqa" and answers) else [target]
            if task == "vqa" and answers:  # for data.vqa_targets=sampled, as VL-T5's files carry one
                from vlscale.data.vqa import vqa_soft_label

                extra["label"] = vqa_soft_label(answers)
            if task == "vqa" and roles.get("answer_type"):
                extra["answer_type"] = rec.text(roles["answer_type"])
            examples = [Example(task=task, uid=uid, text=text, target=target, image_ids=image_ids,
                                references=refs, extra=extra, source=source_name)]
        elif task == "nlvr2":
            from vlscale.data.nlvr2 import parse_bool_label

            target = "true" if parse_bool_label(rec, roles.get("label") or roles["answer"]) else "false"
            examples = [Example(task=task, uid=uid, text=text, target=target, image_ids=image_ids,
                                references=[target], extra=extra, source=source_name)]
        else:  # caption
            _one_or_many(rec, roles, "captions" if roles.get("captions") else "caption")
            if roles.get("captions"):
                captions = _strings(rec, roles["captions"], inner=("raw", "caption", "text"))
            else:
                captions = [rec.text(roles["caption"])]
            if train:
                examples = [Example(task=task, uid=f"{uid}#{k}", text="", target=c, image_ids=image_ids,
                                    references=list(captions), extra=dict(extra), source=source_name)
                            for k, c in enumerate(captions)]
            else:
                examples = [Example(task=task, uid=uid, text="", target=captions[0], image_ids=image_ids,
                                    references=captions, extra=extra, source=source_name)]
        if roles.get("image_id"):  # rows sharing an id share its image (and its cached features): not another one
            col = roles["image"][0]
            other = other_image(marks, image_ids[0], row, rec.data.get(col), base_dir)
            if other:
                raise rec.error(roles["image_id"], f"is {image_ids[0]!r}, the id of row {other[0]}'s image, but "
                                f"column {col!r} holds another image here ({other[1]}); rows sharing an id must "
                                "share the image: map data.hf_columns.image_id to a column naming each image, or "
                                "leave it out")
        for iid, col in zip(image_ids, roles["image"]):
            locations.setdefault(iid, (row, col))
        return examples

    list_columns = [roles[r] for r in ("answers", "captions") if roles.get(r)]

    def records():
        for row, data in enumerate(raw):
            current["row"], current["blank"] = row, None
            cells = {c: data.get(c) for c in answer_columns}  # before ClassLabel names: -1 is said as -1
            data.update({c: _rows_of(data[c]) for c in list_columns if c in data})
            data.update({c: _named(data[c], names) for c, names in class_names.items() if c in data})
            if not any(_has_answer(data.get(c)) for c in answer_columns):
                # no answers: the record leaves their (empty) cells out, as a JSON record without its answer
                # keys, so Record.answers decides (refused, naming --predict-only, where answers are required)
                current["unanswered"] += 1
                current["blank"] = next(((c, _blank(v)) for c, v in cells.items() if _blank(v)), None)
                data = {k: v for k, v in data.items() if k not in answer_columns}
            yield f"row {row}", data

    examples = parse_records(source_name, records(), parse, skip, (roles.get("id") or "id",), require_answers)
    examples.unanswered = current["unanswered"]  # rows without answers (read, or skipped as bad records)
    logger.info(f"{source_name}: {len(examples)} {task} examples, {len(locations)} images")
    return examples, HFImageSource(ds, locations, source_name, base_dir)
