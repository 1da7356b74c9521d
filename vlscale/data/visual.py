"""Visual sources: where an example's image (or video) comes from, by id.

A :class:`VisualSource` maps an image id to

* kind ``"images"``: a uint8 ``(H, W, 3)`` array, or for a video a list of such frames;
* kind ``"features"``: a float ``torch.Tensor`` ``(T, D)`` grid (image) or ``(F, E)`` frame
  embeddings (video), precomputed by launchers/extract_features.py.

Implementations: :class:`SyntheticImages` (the synthetic world), :class:`ImageFolder` (files on
disk, read with PIL) and :class:`~vlscale.data.features.FeatureCache`. An id the source does not
hold raises ``KeyError`` naming the source and the id; an id whose file is missing raises
``FileNotFoundError`` naming the file and the id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Protocol, runtime_checkable

import numpy as np

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


def load_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


class ImageFolder:
    """Images in a folder: ``root / pattern.format(id=image_id)``, read with PIL as RGB uint8.

    With ``video=True`` the pattern names a folder of frame images (sorted by file name) and an
    item is the list of frames.
    """

    kind = "images"

    def __init__(self, root, pattern: str = "{id}.jpg", video: bool = False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        if "{id}" not in pattern:
            raise ValueError(f"ImageFolder pattern {pattern!r} must contain '{{id}}'")
        self.pattern = pattern if not (video and pattern == "{id}.jpg") else "{id}"
        self.video = video

    def path(self, image_id: str) -> Path:
        return self.root / self.pattern.format(id=image_id)

    def __getitem__(self, image_id: str):
        path = self.path(image_id)
        if self.video:
            if not path.is_dir():
                raise FileNotFoundError(f"video {image_id!r}: frame folder {path} does not exist")
            frames = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not frames:
                raise FileNotFoundError(f"video {image_id!r}: no frame images ({IMAGE_SUFFIXES}) in {path}")
            return [load_image(p) for p in frames]
        if not path.is_file():
            raise FileNotFoundError(f"image {image_id!r}: file {path} does not exist")
        try:
            return load_image(path)
        except OSError as e:
            raise OSError(f"image {image_id!r}: cannot read {path}: {e}") from e

    def __contains__(self, image_id: str) -> bool:
        path = self.path(image_id)
        return path.is_dir() if self.video else path.is_file()

    def ids(self) -> list[str]:
        """Ids found on disk (for patterns ``{id}<suffix>``, or folders with ``video``)."""
        if self.video:
            return sorted(p.name for p in self.root.iterdir() if p.is_dir())
        prefix, _, suffix = self.pattern.partition("{id}")
        if "/" in prefix or "{" in suffix:
            raise ValueError(f"cannot list ids for pattern {self.pattern!r}")
        return sorted(p.name[len(prefix):len(p.name) - len(suffix)] for p in self.root.iterdir()
                      if p.is_file() and p.name.startswith(prefix) and p.name.endswith(suffix))

    def __repr__(self) -> str:
        return f"ImageFolder({str(self.root)!r}, pattern={self.pattern!r}, video={self.video})"
