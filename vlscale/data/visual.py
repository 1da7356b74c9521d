"""Visual sources: where an example's image (or video) comes from, by id.

A :class:`VisualSource` maps an image id to

* kind ``"images"``: a uint8 ``(H, W, 3)`` array, or for a video a list of such frames;
* kind ``"features"``: a float ``torch.Tensor`` ``(T, D)`` grid (image) or ``(F, E)`` frame
  embeddings (video), precomputed by launchers/extract_features.py.

Implementations: :class:`SyntheticImages` (the synthetic world), :class:`ImageFolder` (files on
disk, read with PIL) and :class:`~vlscale.data.features.FeatureCache`. An id the source does not
hold raises ``KeyError`` naming the source and the id; an id whose file is missing raises
``DataFileNotFound`` (a ``FileNotFoundError``) and a file that cannot be decoded ``DataError``,
both naming the file and the id. :func:`missing_ids` finds the ids a source lacks in bulk (file
existence / index membership, nothing decoded): the loaders check every example's ids up front.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Iterable, Mapping, Optional, Protocol, runtime_checkable

import numpy as np

from vlscale.data.real import DataError, DataFileNotFound

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@runtime_checkable
class VisualSource(Protocol):
    kind: str  # "images" | "features"

    def __getitem__(self, image_id: str): ...

    def __contains__(self, image_id: str) -> bool: ...


class SyntheticImages:
    """The synthetic world's images (or frame lists) of one (task, split), held in memory."""

    kind = "images"

    def __init__(self, visuals: Mapping[str, object], name: str = "synthetic world"):
        self.visuals = visuals
        self.name = name

    def __getitem__(self, image_id: str):
        try:
            return self.visuals[image_id]
        except KeyError:
            raise KeyError(f"{self.name}: no image with id {image_id!r} "
                           f"({len(self.visuals)} ids, e.g. {next(iter(self.visuals), None)!r})") from None

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.visuals

    def __len__(self) -> int:
        return len(self.visuals)

    def ids(self) -> list[str]:
        return list(self.visuals)

    def __repr__(self) -> str:
        return f"SyntheticImages({self.name!r}, {len(self.visuals)} ids)"


def missing_ids(source, ids: Iterable[str]) -> list[str]:
    """The distinct ids of ``ids`` that ``source`` does not hold, in first-seen order (nothing is read).

    Sources with a ``missing(ids)`` method answer in bulk (one folder listing instead of a stat per
    id); any other source is asked ``id in source``.
    """
    ids = list(dict.fromkeys(ids))
    if hasattr(source, "missing"):
        return source.missing(ids)
    return [i for i in ids if i not in source]


def other_suffix_files(source, ids: Iterable[str]) -> list[Path]:
    """The files that ``ids`` have under another image suffix than their ImageFolder's pattern reads (``x.png``
    where ``{id}.jpg`` is read), one listing per folder of ``source`` (an ImageFolder or a FirstOf of them): for
    the start-up check's message, as such an image is missing to the layout, not to the user."""
    found = []
    for folder in getattr(source, "sources", [source]):
        if not isinstance(folder, ImageFolder) or folder.video:
            continue
        folded = folder._listing()[1]
        for i in ids:
            stem = folder.pattern.format(id=i).rpartition(".")[0]
            found += [folder.root / folded[stem + s] for s in IMAGE_SUFFIXES if stem + s in folded]
    return found


def fold_suffix(name: str) -> str:
    """``name`` with its suffix lower-cased (``x.JPG`` -> ``x.jpg``): how ImageFolder matches files."""
    stem, _, suffix = name.rpartition(".")
    return f"{stem}.{suffix.lower()}" if stem else name


_SAID_TRUNCATED = []


def say_if_truncated_images_load() -> None:
    """Said once: PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES`` on (set by some code in this process; vlscale never
    sets it) makes a cut image file decode padded with grey instead of being refused, silently."""
    from PIL import ImageFile

    if ImageFile.LOAD_TRUNCATED_IMAGES and not _SAID_TRUNCATED:
        _SAID_TRUNCATED.append(True)
        logger.warning("PIL's ImageFile.LOAD_TRUNCATED_IMAGES is on (set by other code in this process): a cut "
                       "(half-written) image file is decoded padded with grey, not refused naming it")


def load_image(path: Path, what: str = "") -> np.ndarray:
    """An image file as uint8 RGB (H, W, 3); an unreadable file raises DataError naming it (and ``what``)."""
    from PIL import Image

    say_if_truncated_images_load()
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise DataFileNotFound(f"{what + ': ' if what else ''}file {path} does not exist") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{what + ': ' if what else ''}cannot read image {path} ({unreadable(path, e)})") from e


def unreadable(path: Path, e: Exception) -> str:
    """What is wrong with the image file ``path`` that PIL refused with ``e``: ``e``, or that the file is empty
    (PIL says "cannot identify image file" of a zero-byte file, a write that never happened)."""
    try:
        if path.stat().st_size == 0:
            return "the file is empty: 0 bytes"
    except OSError:
        pass
    return f"{type(e).__name__}: {e}"


def frame_order(path: Path) -> list:
    """Sort key of a frame image: its name with every run of digits compared as a number, so ``2.jpg``
    comes before ``10.jpg`` (plain name order put frame 10 between 1 and 2) and zero-padded names keep
    their order."""
    return [(0, int(part), part) if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", path.name)]


def frame_files(folder: Path, what: str) -> list[Path]:
    """A video's frame images: the files of ``folder`` with one of IMAGE_SUFFIXES (any case), in
    :func:`frame_order`; a missing folder or one without frames raises DataFileNotFound naming it (and ``what``)."""
    if not folder.is_dir():
        raise DataFileNotFound(f"{what}: frame folder {folder} does not exist")
    frames = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                    key=frame_order)
    if not frames:
        raise DataFileNotFound(f"{what}: no frame images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return frames


def read_frames(folder: Path, what: str, max_frames: Optional[int] = None) -> list:
    """A video's frame images (:func:`frame_files`) decoded; with ``max_frames`` only those
    :func:`~vlscale.data.collate.frame_indices` takes (the frames a batch uses), the others not read."""
    files = frame_files(folder, what)
    if max_frames:
        from vlscale.data.collate import frame_indices

        files = [files[k] for k in frame_indices(len(files), max_frames)]
    return [load_image(p, what) for p in files]


def has_frames(folder: Path) -> bool:
    """Whether ``folder`` exists and holds a frame image (a file with one of IMAGE_SUFFIXES, any case)."""
    try:
        with os.scandir(folder) as it:
            return any(Path(e.name).suffix.lower() in IMAGE_SUFFIXES and e.is_file() for e in it)
    except (FileNotFoundError, NotADirectoryError):
        return False


class ImageFolder:
    """Images in a folder: ``root / pattern.format(id=image_id)``, read with PIL as RGB uint8.

    With ``video=True`` the pattern names a folder of frame images (in :func:`frame_order`) and an
    item is the list of frames; with ``max_frames`` only the frames a batch takes are read (those of
    :func:`~vlscale.data.collate.frame_indices`: a video of 180 frames under ``model.max_frames=64`` decodes 64, not
    180), as :class:`~vlscale.data.video.VideoFeatureFolder` reads its features. Suffixes match in any case
    (``{id}.jpg`` finds ``x.JPG``), as launchers/extract_features.py names ``x.JPG`` id ``x``.
    """

    kind = "images"

    def __init__(self, root, pattern: str = "{id}.jpg", video: bool = False, max_frames: Optional[int] = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        if "{id}" not in pattern:
            raise ValueError(f"ImageFolder pattern {pattern!r} must contain '{{id}}'")
        self.pattern = pattern if not (video and pattern == "{id}.jpg") else "{id}"
        self.video, self.max_frames = video, max_frames
        self._folded = None  # fold_suffix(file name) -> file name, listed on the first miss

    def _listing(self) -> tuple[set, dict]:
        """One scan of ``root``: the names of its entries of our kind, and their suffix-folded names."""
        with os.scandir(self.root) as it:
            names = {e.name for e in it if (e.is_dir() if self.video else e.is_file())}
        return names, {fold_suffix(n): n for n in names}

    def path(self, image_id: str) -> Path:
        path = self.root / self.pattern.format(id=image_id)
        if self.video or path.is_file() or path.parent != self.root:
            return path
        if self._folded is None:
            self._folded = self._listing()[1]
        name = self._folded.get(fold_suffix(path.name))
        return self.root / name if name else path

    def __getitem__(self, image_id: str):
        path = self.path(image_id)
        if self.video:
            return read_frames(path, f"video {image_id!r}", self.max_frames)
        if not path.is_file():
            raise DataFileNotFound(f"image {image_id!r}: file {path} does not exist")
        return load_image(path, f"image {image_id!r}")

    def __contains__(self, image_id: str) -> bool:
        path = self.path(image_id)
        return has_frames(path) if self.video else path.is_file()

    def missing(self, ids: list[str]) -> list[str]:
        """Ids without a file (video: a frame folder holding at least one frame image), from one listing of
        ``root`` (and, for videos, one of each frame folder)."""
        names, folded = self._listing()
        self._folded = folded
        out = []
        for i in ids:
            name = self.pattern.format(id=i)
            if "/" in name:
                found = i in self
            elif self.video:
                found = name in names and has_frames(self.root / name)
            else:
                found = name in names or fold_suffix(name) in folded
            if not found:
                out.append(i)
        return out

    def ids(self) -> list[str]:
        """Ids found on disk (for patterns ``{id}<suffix>``, or folders with ``video``)."""
        if self.video:
            return sorted(p.name for p in self.root.iterdir() if p.is_dir())
        prefix, _, suffix = self.pattern.partition("{id}")
        if "/" in prefix or "{" in suffix:
            raise ValueError(f"cannot list ids for pattern {self.pattern!r}")
        suffix = fold_suffix("x" + suffix)[1:]
        names = (fold_suffix(n) for n in self._listing()[0])
        return sorted(n[len(prefix):len(n) - len(suffix)] for n in names
                      if n.startswith(prefix) and n.endswith(suffix) and len(n) > len(prefix) + len(suffix))

    def __repr__(self) -> str:
        return f"ImageFolder({str(self.root)!r}, pattern={self.pattern!r}, video={self.video})"
