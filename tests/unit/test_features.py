"""Collation, visual sources, and the feature cache (cached features == features computed on the fly)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vlscale.config import load_config
from vlscale.data import build_tokenizer, build_train_loader, build_visual_source, eval_batches, load_examples
from vlscale.data.collate import Collator, fetch_visuals, frame_indices
from vlscale.data.features import FeatureCache, FeatureWriter, extract_features
from vlscale.data.synthetic import generate_split
from vlscale.data.visual import ImageFolder, SyntheticImages, VisualSource

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "launchers"))
VISION = "tiny-clip-rn"


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("VLSCALE_CACHE", str(tmp_path_factory.getbasetemp() / "vlscale_cache"))


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(load_config("tiny"))


def _plain_transform(images):
    return torch.stack([torch.from_numpy(np.asarray(i, dtype=np.float32) / 255).permute(2, 0, 1) for i in images])


def _collator(tok, *overrides):
    return Collator(tok, load_config("tiny", list(overrides)), vision_transform=_plain_transform)


# ----------------------------------------------------------------------------- collation

def test_collate_images_text_and_labels(tok):
    split = generate_split("vqa", "val", 6, image_size=16)
    ex = split.examples
    batch = _collator(tok)(ex, fetch_visuals(SyntheticImages(split.visuals), ex))
    assert batch["task"] == "vqa" and batch["uids"] == [e.uid for e in ex]
    assert batch["pixel_values"].shape == (6, 1, 3, 16, 16)
    assert torch.equal(batch["pixel_values"][2, 0], _plain_transform([split.visuals[ex[2].image_ids[0]]])[0])
    assert "vis_boxes" not in batch and "vis_feats" not in batch and "groups" not in batch
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    prefix = tok("vqa:", add_special_tokens=False)["input_ids"]
    for b, e in enumerate(ex):
        n = int(mask[b].sum())
        assert ids[b, :len(prefix)].tolist() == prefix and ids[b, n - 1] == tok.eos_token_id
        assert (ids[b, n:] == tok.pad_token_id).all()
        lab = labels[b][labels[b] != -100].tolist()
        assert lab == tok(e.target)["input_ids"] and lab[-1] == tok.eos_token_id
        assert (labels[b, len(lab):] == -100).all()
    assert batch["references"][0] == ex[0].references and batch["targets"] == [e.target for e in ex]
    short = _collator(tok, "data.max_input_length=5", "data.max_target_length=2")(
        ex, fetch_visuals(SyntheticImages(split.visuals), ex))
    assert short["input_ids"].shape[1] == 5 and (short["input_ids"][:, -1] == tok.eos_token_id).all()
    assert short["labels"].shape[1] <= 2


def test_collate_two_images_and_errors(tok):
    split = generate_split("nlvr2", "val", 4, image_size=16)
    src = SyntheticImages(split.visuals)
    batch = _collator(tok)(split.examples, fetch_visuals(src, split.examples))
    assert batch["pixel_values"].shape == (4, 2, 3, 16, 16)
    assert batch["groups"] == [e.extra["group"] for e in split.examples] and len(set(batch["groups"])) == 1
    e = split.examples[1]
    assert torch.equal(batch["pixel_values"][1, 1], _plain_transform([split.visuals[e.image_ids[1]]])[0])
    vqa = generate_split("vqa", "val", 2, image_size=16)
    with pytest.raises(ValueError, match="one task"):
        _collator(tok)([split.examples[0], vqa.examples[0]], [[None, None], [None]])
    with pytest.raises(ValueError, match="nlvr2_val_000000.*needs 2 image"):
        _collator(tok)(split.examples[:1], [[split.visuals[e.image_ids[0]]]])
    with pytest.raises(KeyError, match="vqa example 'vqa_val_000000'.*synthetic world.*'nope'"):
        bad = vqa.examples[0]
        fetch_visuals(src, [type(bad)(bad.task, bad.uid, bad.text, bad.target, ["nope"])])


def test_collate_video_frames_subsampled_and_padded(tok):
    split = generate_split("tvqa", "val", 6, image_size=16)
    lengths = [len(split.visuals[e.image_ids[0]]) for e in split.examples]
    assert max(lengths) > 5
    batch = _collator(tok, "data.tasks=[tvqa]", "model.max_frames=5")(
        split.examples, fetch_visuals(SyntheticImages(split.visuals), split.examples))
    frames = min(max(lengths), 5)
    assert batch["pixel_values"].shape == (6, 1, frames, 3, 16, 16)
    assert batch["vis_mask"].shape == (6, 1, frames)
    assert batch["vis_mask"].sum(-1).flatten().tolist() == [min(n, 5) for n in lengths]
    for b, n in enumerate(lengths):
        if n < frames:
            assert (batch["pixel_values"][b, 0, n:] == 0).all()
        vid = split.visuals[split.examples[b].image_ids[0]]
        first = frame_indices(n, 5)[-1]
        assert torch.equal(batch["pixel_values"][b, 0, min(n, 5) - 1], _plain_transform([vid[first]])[0])
    assert frame_indices(8, 4) == [1, 3, 5, 7] and frame_indices(3, 5) == [0, 1, 2]


def test_collate_cached_features(tok):
    split = generate_split("tvc", "val", 3, image_size=16)
    feats = [[torch.randn(n, 7)] for n in (3, 9, 5)]
    batch = _collator(tok, "data.tasks=[tvc]", "model.max_frames=6")(split.examples, feats)
    assert batch["vis_feats"].shape == (3, 1, 6, 7) and "pixel_values" not in batch
    assert batch["vis_mask"][:, 0].sum(-1).tolist() == [3, 6, 5]
    assert torch.equal(batch["vis_feats"][1, 0], feats[1][0][frame_indices(9, 6)])
    assert (batch["vis_feats"][0, 0, 3:] == 0).all()
    grid = generate_split("nlvr2", "val", 2, image_size=16)
    g = [[torch.randn(16, 8), torch.randn(16, 8)] for _ in range(2)]
    out = _collator(tok)(grid.examples, g)
    assert out["vis_feats"].shape == (2, 2, 16, 8) and torch.equal(out["vis_feats"][1, 0], g[1][0])
    with pytest.raises(ValueError, match="differ in shape"):
        _collator(tok)(grid.examples, [g[0], [torch.randn(9, 8), torch.randn(16, 8)]])


def test_a_batch_of_videos_shorter_than_max_frames_is_padded_to_its_longest(tok):
    """Frames (and frame features) are padded to the batch's longest video, not to model.max_frames."""
    split = generate_split("tvc", "val", 2, image_size=16)
    c = _collator(tok, "data.tasks=[tvc]", "model.max_frames=6")
    feats = c(split.examples, [[torch.randn(3, 7)], [torch.randn(2, 7)]])
    assert feats["vis_feats"].shape == (2, 1, 3, 7) and feats["vis_mask"].tolist() == [[[1, 1, 1]], [[1, 1, 0]]]
    frames = [[[np.full((16, 16, 3), k, np.uint8) for k in range(n)]] for n in (1, 2)]
    pixels = c(split.examples, frames)
    assert pixels["pixel_values"].shape == (2, 1, 2, 3, 16, 16) and pixels["vis_mask"].tolist() == [[[1, 0]], [[1, 1]]]
    assert (pixels["pixel_values"][0, 0, 1] == 0).all()  # the padding frame is zeros, as feature padding is
    assert (pixels["pixel_values"][1, 0, 1] == 1 / 255).all()


def test_each_example_gets_its_own_images_in_order(tok):
    """pixel_values[b, j] / vis_feats[b, j] is example b's j-th image, with more examples than images each (two
    NLVR2 pairs; three examples of grid features)."""
    split = generate_split("nlvr2", "val", 8, image_size=16)
    ex = split.examples
    assert len({tuple(e.image_ids) for e in ex}) == 2
    batch = _collator(tok)(ex, fetch_visuals(SyntheticImages(split.visuals), ex))
    for b, e in enumerate(ex):
        for j, i in enumerate(e.image_ids):
            assert torch.equal(batch["pixel_values"][b, j], _plain_transform([split.visuals[i]])[0]), (b, j)
    g = [[torch.randn(4, 8), torch.randn(4, 8)] for _ in range(3)]
    feats = _collator(tok)(ex[:3], g)["vis_feats"]
    assert all(torch.equal(feats[b, j], g[b][j]) for b in range(3) for j in range(2))


def test_collate_refuses_a_malformed_batch_naming_it(tok):
    from vlscale.data.tasks import Example

    ex = [Example("vqa", f"q{k}", "what", "red", [f"i{k}"]) for k in range(3)]
    grid = [[torch.randn(4, 8)] for _ in ex]
    with pytest.raises(ValueError, match="Collator: empty batch"):
        _collator(tok)([], [])
    with pytest.raises(ValueError, match="3 examples but 2 visual inputs"):  # zip would drop an example
        _collator(tok)(ex, grid[:2])
    two_ids = Example("vqa", "q9", "what", "red", ["i1", "i2"])
    with pytest.raises(ValueError, match="vqa example 'q9': needs 1 image id.*has 2 ids and 1 visual"):
        _collator(tok)([ex[0], two_ids], grid[:2])
    image = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="vqa: a batch mixes images and cached features"):
        _collator(tok)(ex[:2], [grid[0], [image]])
    assert _collator(tok)(ex, [[x.half() for x in g] for g in grid])["vis_feats"].dtype == torch.float32


def test_grid_features_of_another_shape_are_refused_naming_an_example_that_holds_them(tok):
    """The error names an example whose features differ from the batch's first (the third here), not one that
    matches it: that is the example whose cached file to look at."""
    from vlscale.data.tasks import Example

    ex = [Example("vqa", f"q{k}", "what", "red", [f"i{k}"]) for k in range(3)]
    grid = [[torch.randn(4, 8)], [torch.randn(4, 8)], [torch.randn(5, 8)]]
    with pytest.raises(ValueError, match=r"vqa: cached grid features differ in shape within a batch "
                                         r"\(\[\(4, 8\), \(5, 8\)\]; e\.g\. example 'q2'\)"):
        _collator(tok)(ex, grid)


def test_an_nlvr2_example_without_a_group_is_a_group_of_its_own(tok):
    """Consistency groups: where some examples of a batch carry ``extra["group"]`` and one does not, that one is
    its own group (its uid), neither merged into a shared placeholder group nor dropping the batch's groups."""
    from vlscale.data.tasks import Example

    ex = [Example("nlvr2", "n1", "two dogs", "true", ["a", "b"], extra={"group": "dev-1--0"}),
          Example("nlvr2", "n2", "one cat", "false", ["c", "d"]),
          Example("nlvr2", "n3", "no birds", "true", ["e", "f"])]
    batch = _collator(tok)(ex, [[torch.randn(4, 8), torch.randn(4, 8)] for _ in ex])
    assert batch["groups"] == ["dev-1--0", "n2", "n3"]


def test_collate_refuses_malformed_videos_naming_them(tok):
    split = generate_split("tvc", "val", 2, image_size=16)
    a, b = split.examples
    c = _collator(tok, "data.tasks=[tvc]")
    with pytest.raises(ValueError, match=rf"tvc example {b.uid!r}: video {b.image_ids[0]!r} has no frames"):
        c(split.examples, [[torch.randn(3, 7)], [torch.randn(0, 7)]])
    with pytest.raises(ValueError, match=r"tvc: frame features of different widths \[7, 9\] in one batch"):
        c(split.examples, [[torch.randn(3, 7)], [torch.randn(3, 9)]])
    frames = [np.zeros((16, 16, 3), np.uint8)] * 2
    with pytest.raises(ValueError, match="tvc: a batch mixes video frames and cached frame features"):
        c(split.examples, [[torch.randn(3, 7)], [frames]])

# ----------------------------------------------------------------------------- image folders

def test_image_folder(tmp_path):
    from PIL import Image

    img = (np.arange(8 * 8 * 3) % 255).astype(np.uint8).reshape(8, 8, 3)
    Image.fromarray(img).save(tmp_path / "img1.png")
    (tmp_path / "v1").mkdir()
    for k in range(3):
        Image.fromarray(img + k).save(tmp_path / "v1" / f"{k:03d}.png")
    folder = ImageFolder(tmp_path, "{id}.png")
    assert isinstance(folder, VisualSource) and folder.kind == "images"
    assert np.array_equal(folder["img1"], img) and "img1" in folder and "img2" not in folder
    assert folder.ids() == ["img1"]
    with pytest.raises(FileNotFoundError, match=r"image 'img2'.*img2\.png"):
        folder["img2"]
    video = ImageFolder(tmp_path, video=True)
    frames = video["v1"]
    assert len(frames) == 3 and np.array_equal(frames[2], img + 2)
    with pytest.raises(FileNotFoundError, match="video 'v9'"):
        video["v9"]
    # a frame folder without frame images is missing at the start-up check (check_visual_ids), not found
    # when its batch is built; a frame with an upper-case suffix counts
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "notes.txt").write_text("no frames here")
    (tmp_path / "v3").mkdir()
    Image.fromarray(img).save(tmp_path / "v3" / "1.PNG")
    assert video.missing(["v1", "v2", "v3", "v9"]) == ["v2", "v9"]
    assert "v1" in video and "v2" not in video and "v3" in video
    with pytest.raises(FileNotFoundError, match=r"video 'v2': no frame images \(\.jpg, \.jpeg, \.png, \.bmp, \.webp\)"):
        video["v2"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "missing")


def test_image_folder_reads_grey_and_rgba_files_as_rgb(tmp_path):
    """Every image comes out as uint8 (H, W, 3), whatever the file's mode (COCO holds grey-scale JPEGs)."""
    from PIL import Image

    grey = (np.arange(6 * 5) * 7 % 255).astype(np.uint8).reshape(6, 5)
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    rgba = np.dstack([np.full((6, 5, 3), 40, np.uint8), np.full((6, 5), 255, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    folder = ImageFolder(tmp_path, "{id}.png")
    assert np.array_equal(folder["grey"], np.repeat(grey[:, :, None], 3, axis=2))
    assert np.array_equal(folder["rgba"], np.full((6, 5, 3), 40, np.uint8))


def test_frame_folders_take_files_of_any_suffix_case_and_nothing_else(tmp_path):
    """A video's frames are the files with an image suffix in any case (``1.PNG``), never a folder named like
    an image; a frame folder holding only such a folder has no frames (missing at the start-up check)."""
    from PIL import Image

    for k, name in enumerate(("0.png", "1.PNG")):
        (tmp_path / "v").mkdir(exist_ok=True)
        Image.fromarray(np.full((4, 4, 3), 10 * (k + 1), np.uint8)).save(tmp_path / "v" / name, format="PNG")
    (tmp_path / "v" / "2.jpg").mkdir()
    (tmp_path / "w" / "0.jpg").mkdir(parents=True)
    (tmp_path / "lone.png").write_bytes(b"")  # a file is no video
    video = ImageFolder(tmp_path, video=True)
    assert [int(f[0, 0, 0]) for f in video["v"]] == [10, 20]
    assert video.missing(["v", "w"]) == ["w"] and "w" not in video
    assert video.ids() == ["v", "w"]
    with pytest.raises(FileNotFoundError, match=r"video 'w': no frame images"):
        video["w"]


def test_image_folder_patterns_ids_and_subfolders(tmp_path):
    """``ids()`` lists the ids of ``{id}<suffix>`` files in any suffix case (of any suffix), without folders or a
    bare suffix; a pattern with a sub-folder finds files there only (not a file of the same name in ``root``) and
    cannot list ids; a pattern without ``{id}`` is refused."""
    for name in ("a.JPG", "b.jpg", ".jpg", "x.jpg"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "c.jpg").mkdir()
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "y.jpg").write_bytes(b"")
    assert ImageFolder(tmp_path).ids() == ["a", "b", "x"]
    assert ImageFolder(tmp_path, "{id}.JPG").ids() == ["a", "b", "x"]
    assert ImageFolder(tmp_path).missing(["a", "c", "x"]) == ["c"]
    (tmp_path / "t.TIF").write_bytes(b"")  # any suffix, not only IMAGE_SUFFIXES': PIL reads more formats
    tif = ImageFolder(tmp_path, "{id}.tif")
    assert tif.ids() == ["t"] and "t" in tif and tif.missing(["t"]) == [] and tif.path("t").name == "t.TIF"
    sub = ImageFolder(tmp_path, "sub/{id}.jpg")
    assert "y" in sub and "x" not in sub and sub.missing(["x", "y"]) == ["x"]
    with pytest.raises(ValueError, match=r"cannot list ids for pattern 'sub/\{id\}\.jpg'"):
        sub.ids()
    with pytest.raises(ValueError, match=r"ImageFolder pattern 'image\.jpg' must contain '\{id\}'"):
        ImageFolder(tmp_path, "image.jpg")


def test_image_folder_ids_of_a_prefixed_pattern_and_a_folder_named_like_an_image(tmp_path):
    """With a prefixed pattern (extract_features.py --pattern 'COCO_val2014_{id}.jpg') ``ids()`` lists only the
    files with that prefix, each id without it; reading an id whose name is a folder is DataFileNotFound naming
    the file, as the start-up check calls it missing (not a "cannot read image" DataError)."""
    import re

    from vlscale.data.real import DataFileNotFound

    for name in ("COCO_val2014_1.jpg", "COCO_val2014_2.JPG", "COCO_train2014_3.jpg", "notes.jpg"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "c.jpg").mkdir()
    assert ImageFolder(tmp_path, "COCO_val2014_{id}.jpg").ids() == ["1", "2"]
    folder = ImageFolder(tmp_path)
    assert folder.missing(["c"]) == ["c"]
    gone = re.escape(str(tmp_path / "c.jpg"))
    with pytest.raises(DataFileNotFound, match=rf"^image 'c': file {gone} does not exist$"):
        folder["c"]


def test_missing_ids_of_a_source_without_a_bulk_check_are_the_ids_it_lacks_once_each():
    from vlscale.data.visual import missing_ids

    assert missing_ids(SyntheticImages({"x": 1, "y": 2}), ["n", "x", "n", "m", "y"]) == ["n", "m"]


def test_a_missing_image_file_is_file_not_found_naming_it_and_a_file_is_no_frame_folder(tmp_path):
    """load_image (predict.py's image paths, a video's frames) of a file that is not there raises DataFileNotFound,
    a FileNotFoundError, naming the file (it became "cannot read image"); a plain file where a video's frame folder
    belongs holds no frames (``has_frames`` is False, not NotADirectoryError)."""
    import re

    from PIL import Image

    from vlscale.data.real import DataFileNotFound
    from vlscale.data.visual import has_frames, load_image

    gone = tmp_path / "gone.png"
    with pytest.raises(DataFileNotFound, match=rf"^image 'g': file {re.escape(str(gone))} does not exist$"):
        load_image(gone, "image 'g'")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "lone.png")
    assert not has_frames(tmp_path / "lone.png") and not has_frames(tmp_path / "nowhere")
    assert "lone" not in ImageFolder(tmp_path, "{id}.png", video=True)


def test_the_start_up_check_and_the_reads_agree_on_a_file_added_after_a_lookup(tmp_path):
    """``missing`` (the start-up check) lists the folder afresh and the ``{id}.jpg`` lookup of an upper-case
    ``.JPG`` then uses that listing: an image it found is read, not refused at its batch from a listing made
    before the file was there."""
    from PIL import Image

    folder = ImageFolder(tmp_path)
    assert "late" not in folder  # lists the folder: no late.JPG yet
    Image.fromarray(np.full((4, 4, 3), 9, np.uint8)).save(tmp_path / "late.JPG", format="JPEG")
    assert folder.missing(["late"]) == []
    assert folder["late"].shape == (4, 4, 3)


# ----------------------------------------------------------------------------- feature cache

@pytest.fixture(scope="module")
def encoder():
    from vlscale.modeling.vision import build_vision_encoder, image_transform

    return build_vision_encoder(VISION), image_transform(VISION)


@pytest.fixture(scope="module")
def weights(encoder, tmp_path_factory):
    """The encoder's weights as a local checkpoint, so a second build has the same ones."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny_visual.pt"
    torch.save({f"visual.{k}": v for k, v in encoder[0].visual.state_dict().items()}, path)
    return str(path)


def test_an_unreadable_image_stops_the_extraction_keeping_the_rest_or_is_left_out(encoder, tmp_path, monkeypatch):
    """An id the source cannot read (DataError: a cut or empty file) stops the extraction with its line, the ids
    done before it kept and said so; with skip_unreadable it is left out and listed, the rest written (images, and a
    video with a bad frame), a batch of none not encoded, the progress bar counting it done."""
    from vlscale.data.real import DataError

    enc, tf = encoder
    split = generate_split("vqa", "val", 5, image_size=16)
    ids = list(split.visuals)
    line = f"image {ids[3]!r}: cannot read image /d/{ids[3]}.jpg (OSError: image file is truncated)"

    class Cut(SyntheticImages):
        def __getitem__(self, i):
            if i == ids[3]:
                raise DataError(line)
            return super().__getitem__(i)

    out, more = tmp_path / "cache", dict(vision=VISION, batch_size=2, shard_size=2, progress=False)
    with pytest.raises(DataError, match=rf"^image '{ids[3]}': cannot read image .*truncated\); the cache {out} keeps "
                                        r"the 2 ids done before it, .* once it is replaced, or -S$"):
        extract_features(enc, tf, Cut(split.visuals), ids, out, how_to_skip=", or -S", **more)
    assert len(FeatureCache(out, vision=VISION)) == 2
    stats = extract_features(enc, tf, Cut(split.visuals), ids, out, skip_unreadable=True, **more)
    assert stats == {"total": 5, "skipped": 2, "written": 2, "unreadable": [(ids[3], line)]}
    assert sorted(FeatureCache(out, vision=VISION).ids()) == sorted(ids[:3] + ids[4:])
    frames = {f"v{k}": [split.visuals[i] for i in ids[:2]] for k in range(3)}
    stats = extract_features(enc, tf, Cut(dict(frames, **{ids[3]: None})), ["v0", ids[3], "v1", "v2"],
                             tmp_path / "video", video=True, skip_unreadable=True, **more)
    assert (stats["written"], [i for i, _ in stats["unreadable"]]) == (3, [ids[3]])
    bars = []

    class Bar:
        def __init__(self, total=None, **kw):
            self.total, self.n = total, 0
            bars.append(self)

        def update(self, n=1):
            self.n += n

        def close(self):
            pass

    class Tower:  # a ViT's (open_clip) cannot take a batch of no images
        def __getattr__(self, name):
            return getattr(enc, name)

        def encode_grid(self, x):
            assert len(x), "a batch of no images was encoded"
            return enc.encode_grid(x)

    monkeypatch.setattr("vlscale.log.tqdm", Bar)
    stats = extract_features(Tower(), tf, Cut(split.visuals), [ids[3]], tmp_path / "none", skip_unreadable=True,
                             **more)
    assert stats == {"total": 1, "skipped": 0, "written": 0, "unreadable": [(ids[3], line)]}
    assert [(b.total, b.n) for b in bars] == [(1, 1)]


def test_threads_read_the_images_and_the_cache_is_what_one_thread_makes(encoder, tmp_path, capsys):
    """Images are read and transformed in threads (extract_features' ``workers``), the next batch's while one is
    encoded: with reads finishing out of order (later ids sooner), 4 threads write the same features under the same
    ids, shard by shard, as 1; an unreadable id still stops the extraction at its batch, the batches before it kept
    (the one after it was being read); --workers must be > 0."""
    import threading
    import time

    from vlscale.data.features import default_workers
    from vlscale.data.real import DataError

    enc, tf = encoder
    split = generate_split("vqa", "val", 8, image_size=16)
    ids = list(split.visuals)
    readers = set()

    class Slow(SyntheticImages):
        def __getitem__(self, i):
            time.sleep(0.004 * (len(ids) - ids.index(i)))  # the later an id, the sooner it is read
            readers.add((threading.current_thread().name, i))
            if i == ids[5] and self.name == "cut":
                raise DataError(f"image {i!r}: cannot read it")
            return super().__getitem__(i)

    more = dict(vision=VISION, batch_size=3, shard_size=2, progress=False)
    for workers in (1, 4):
        extract_features(enc, tf, Slow(split.visuals), ids, tmp_path / f"w{workers}", workers=workers, **more)
    one, four = FeatureCache(tmp_path / "w1", vision=VISION), FeatureCache(tmp_path / "w4", vision=VISION)
    assert one.ids() == four.ids() == ids and all(torch.equal(one[i], four[i]) for i in ids)
    assert json.loads((tmp_path / "w1" / "index.json").read_text()) == json.loads(
        (tmp_path / "w4" / "index.json").read_text())
    # read in the pool, but for the first id (nothing to read beside yet: the caller reads it)
    assert {i for name, i in readers if not name.startswith("extract_")} == {ids[0]}, readers
    assert {i for name, i in readers if name.startswith("extract_")} == set(ids[1:]), readers
    videos = {f"v{k}": [split.visuals[i] for i in ids[:k % 3 + 1]] for k in range(6)}  # 1-3 frames a video
    for workers in (1, 3):  # batches of 4 frames: a video that does not fit starts the next
        extract_features(enc, tf, SyntheticImages(videos), list(videos), tmp_path / f"v{workers}", video=True,
                         workers=workers, **dict(more, batch_size=4))
    one, three = FeatureCache(tmp_path / "v1", vision=VISION), FeatureCache(tmp_path / "v3", vision=VISION)
    assert one.ids() == three.ids() == list(videos)
    assert all(torch.equal(one[v], three[v]) and len(one[v]) == len(videos[v]) for v in videos)
    # the video's own embedding, encoded alone (its batch held others: equal up to the batch's float rounding)
    assert torch.allclose(one["v2"], enc.encode_global(tf(videos["v2"])), rtol=1e-5, atol=1e-6)
    with pytest.raises(DataError, match=rf"^image '{ids[5]}': cannot read it; the cache .* keeps the 3 ids done "):
        extract_features(enc, tf, Slow(split.visuals, name="cut"), ids, tmp_path / "cut", workers=4, **more)
    assert FeatureCache(tmp_path / "cut", vision=VISION).ids() == ids[:3]
    assert 1 <= default_workers() <= 8
    from extract_features import parse_args

    capsys.readouterr()
    with pytest.raises(SystemExit):
        parse_args(["--vision", VISION, "--images", str(tmp_path), "--out", str(tmp_path / "o"), "--workers", "0"])
    assert capsys.readouterr().err.strip().endswith("error: --workers must be > 0, got 0")
    assert parse_args(["--vision", VISION, "--images", str(tmp_path), "--out", str(tmp_path / "o")]).workers is None


def test_the_extraction_s_progress_bar_writes_whole_lines_into_a_log_file(encoder, tmp_path, capsys):
    """extract_features.py > log 2>&1 (stderr no terminal): its bar wrote a carriage-return redraw per batch onto one
    line, as the trainer's did; it writes whole lines now (vlscale.log.progress_bar)."""
    enc, tf = encoder
    split = generate_split("vqa", "val", 4, image_size=16)
    extract_features(enc, tf, split.visuals, list(split.visuals), tmp_path / "cache", vision=VISION, batch_size=1,
                     progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err and err.splitlines()[-1].startswith(f"features {VISION} -> ") and "4/4 [" in err
    assert "img" in err and "video" not in err, err  # its unit: images (the units swapped survived)


def test_copied_frame_features_a_file_that_cannot_be_read_stops_keeping_the_rest_or_is_left_out(tmp_path, capsys):
    """--real's precomputed frame features (.npy) are copied as images are extracted: a corrupt file stops the copy
    naming it, the videos copied before it kept; with skip_unreadable it is left out and listed. Its bar in a log
    file writes whole lines (tqdm.auto's in place of progress_bar survived)."""
    from extract_features import copy_frame_features

    from vlscale.data.real import DataError
    from vlscale.data.video import VideoFeatureFolder
    from vlscale.modeling.vision import vision_dims

    dim = int(vision_dims(VISION)["embed_dim"])
    (tmp_path / "feats").mkdir()
    for vid in ("a", "c"):
        np.save(tmp_path / "feats" / f"{vid}.npy", np.ones((3, dim), np.float32))
    (tmp_path / "feats" / "b.npy").write_bytes(b"\x93NUMPY cut")
    source, more = VideoFeatureFolder(tmp_path / "feats"), dict(vision=VISION, pretrained=None, dtype="float32",
                                                                shard_size=8, progress=False)
    with pytest.raises(DataError, match=r"b\.npy.*; the cache .*out keeps the 1 ids done before it, .*, or -S$"):
        copy_frame_features(source, ["a", "b", "c"], tmp_path / "out", how_to_skip=", or -S", **more)
    capsys.readouterr()
    more["progress"] = True
    stats = copy_frame_features(source, ["a", "b", "c"], tmp_path / "out", skip_unreadable=True, **more)
    assert (stats["written"], stats["skipped"], [v for v, _ in stats["unreadable"]]) == (1, 1, ["b"])
    err = capsys.readouterr().err
    assert "\r" not in err and err.splitlines()[-1].startswith("frame features ") and "2/2 [" in err, err
    assert sorted(FeatureCache(tmp_path / "out").ids()) == ["a", "c"]


def test_cache_roundtrip_resume_and_atomic_shards(encoder, tmp_path, capsys):
    enc, tf = encoder
    split = generate_split("vqa", "val", 10, image_size=16)
    ids = list(split.visuals)

    class Flaky(SyntheticImages):
        def __getitem__(self, i):
            if i == ids[7]:
                raise RuntimeError("interrupted")
            return super().__getitem__(i)

    out = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="interrupted"):
        extract_features(enc, tf, Flaky(split.visuals), ids, out, vision=VISION, batch_size=3, shard_size=2,
                         progress=False)
    partial = FeatureCache(out, vision=VISION)
    assert len(partial) == 6 and not list(out.glob("*.tmp"))  # whole batches done before the failure
    capsys.readouterr()
    stats = extract_features(enc, tf, SyntheticImages(split.visuals), ids, out, vision=VISION, batch_size=3,
                             shard_size=2, progress=True)
    assert stats == {"total": 10, "skipped": 6, "written": 4, "unreadable": []}
    err = capsys.readouterr().err  # the resumed extraction's bar: the ids left, not all (4/10 at its end)
    assert err.splitlines()[-1].startswith("features ") and "4/4 [" in err, err
    cache = FeatureCache(out, vision=VISION, pretrained=None, expect_kind="grid")
    assert cache.kind == "features" and len(cache) == 10 and len(list(out.glob("shard_*.safetensors"))) == 5
    want = enc.encode_grid(tf([split.visuals[i] for i in ids[:3]]))
    assert torch.equal(torch.stack([cache[i] for i in ids[:3]]), want)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["vision"] == VISION and meta["grid_shape"] == [enc.grid_side] * 2
    assert meta["tokens"] == enc.grid_side ** 2 and meta["dim"] == enc.grid_dim and meta["dtype"] == "float32"
    assert extract_features(enc, tf, SyntheticImages(split.visuals), ids, out, vision=VISION,
                            progress=False)["written"] == 0


def test_cache_errors_are_clear(encoder, tmp_path):
    enc, tf = encoder
    split = generate_split("vqa", "val", 2, image_size=16)
    out = tmp_path / "c"
    extract_features(enc, tf, SyntheticImages(split.visuals), list(split.visuals), out, vision=VISION,
                     pretrained="tag1", progress=False)
    with pytest.raises(ValueError, match=r"meta\.json.*vision='tiny-clip-rn'.*model\.vision='RN101'"):
        FeatureCache(out, vision="RN101")
    with pytest.raises(ValueError, match="pretrained='tag1'.*'tag2'"):
        FeatureCache(out, vision=VISION, pretrained="tag2")
    with pytest.raises(ValueError, match="kind='grid'"):
        FeatureCache(out, vision=VISION, expect_kind="frames")
    with pytest.raises(KeyError, match=r"feature cache .*c: no features for id 'vqa_train_000001'"):
        FeatureCache(out)["vqa_train_000001"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FeatureCache(tmp_path / "none")
    with pytest.raises(ValueError, match="different settings"):
        FeatureWriter(out, {"vision": "RN50", "pretrained": "tag1", "kind": "grid", "dtype": "float32"})
    cfg = load_config("tiny", ["model.feature_source=cache"])
    with pytest.raises(ValueError, match="data.feature_cache"):
        build_visual_source(cfg, "vqa", "val")


def test_fp16_storage_and_video_frames(encoder, tmp_path):
    enc, tf = encoder
    split = generate_split("tvqa", "val", 4, image_size=16)
    ids = list(split.visuals)
    assert [len(split.visuals[i]) for i in ids] == [8, 6, 8, 8]  # batches of 14 frames: [8 + 6], [8], [8]
    extract_features(enc, tf, SyntheticImages(split.visuals), ids, tmp_path / "v", vision=VISION, video=True,
                     batch_size=14, progress=False)
    cache = FeatureCache(tmp_path / "v", vision=VISION, expect_kind="frames")
    for i in ids:
        frames = split.visuals[i]
        assert cache[i].shape == (len(frames), enc.embed_dim)
        torch.testing.assert_close(cache[i], enc.encode_global(tf(frames)), rtol=1e-5, atol=1e-6)
    img = generate_split("vqa", "val", 3, image_size=16)
    extract_features(enc, tf, SyntheticImages(img.visuals), list(img.visuals), tmp_path / "h", vision=VISION,
                     dtype="float16", progress=False)
    half = FeatureCache(tmp_path / "h")
    x = half[next(iter(img.visuals))]
    assert half.meta["dtype"] == "float16" and x.dtype == torch.float32
    ref = enc.encode_grid(tf(list(img.visuals.values())))[0]
    torch.testing.assert_close(x, ref, rtol=1e-3, atol=1e-4)  # fp16 rounding
    assert torch.equal(x, x.half().float())


def test_launcher_cache_equals_on_the_fly_features(encoder, weights, tmp_path, tok):
    """Training from the cache sees exactly the features the frozen encoder computes on the fly."""
    import extract_features as launcher

    enc, tf = encoder
    overrides = ["data.tasks=[vqa,nlvr2]", "data.synthetic_train=8", "data.synthetic_eval=4", "data.image_size=32"]
    out = tmp_path / "feats"
    assert launcher.main(["--synthetic", "--vision", VISION, "--pretrained", weights, "--out", str(out),
                          "--batch-size", "64", "--quiet", *overrides]) == 0
    cfg = load_config("tiny", overrides + ["model.feature_source=cache", f"data.feature_cache={out}",
                                         f"model.vision_pretrained={weights}", "train.micro_batch_size=4"])
    cache = build_visual_source(cfg, "nlvr2", "train")
    assert isinstance(cache, FeatureCache)
    on_the_fly = build_visual_source(load_config("tiny", overrides), "nlvr2", "train")
    ids = on_the_fly.ids()
    # the same images in the same forward pass: bit-identical in fp32
    assert torch.equal(torch.stack([cache[i] for i in ids]), enc.encode_grid(tf([on_the_fly[i] for i in ids])))
    # a training batch from the cache == encoding that batch's images on the fly
    loader = build_train_loader(cfg, tok)
    for _ in range(3):
        batch = next(loader)
        ex = {e.uid: e for e in load_examples(cfg, batch["task"], "train")}
        images = [on_the_fly_source(cfg, overrides, batch["task"])[i] for u in batch["uids"] for i in ex[u].image_ids]
        want = enc.encode_grid(tf(images)).reshape(batch["vis_feats"].shape)
        torch.testing.assert_close(batch["vis_feats"], want, rtol=1e-5, atol=1e-6)
    # the --images source: a folder of files
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in ids[:3]:
        Image.fromarray(on_the_fly[i]).save(folder / f"{i}.png")
    assert launcher.main(["--images", str(folder), "--vision", VISION, "--pretrained", weights,
                          "--out", str(tmp_path / "folder_feats"), "--quiet"]) == 0
    from_files = FeatureCache(tmp_path / "folder_feats", vision=VISION, pretrained=weights)
    assert sorted(from_files.ids()) == sorted(ids[:3])
    torch.testing.assert_close(torch.stack([from_files[i] for i in ids[:3]]), torch.stack([cache[i] for i in ids[:3]]),
                               rtol=1e-5, atol=1e-6)


def on_the_fly_source(cfg, overrides, task):
    return build_visual_source(load_config("tiny", overrides), task, "train")


def test_a_second_writer_waits_for_the_first_and_skips_what_it_wrote(tmp_path, capfd):
    """Two extractions into one cache (e.g. two processes started together): the second writer waits
    on the folder's lock while the first writes, then sees its index; no shard is overwritten."""
    import threading

    meta = {"vision": VISION, "pretrained": None, "kind": "grid", "dtype": "float32"}
    first = FeatureWriter(tmp_path / "c", meta, shard_size=1)
    first.add("a", torch.ones(4, 3))  # flushed: shard_00000
    second = {}
    thread = threading.Thread(target=lambda: second.setdefault("w", FeatureWriter(tmp_path / "c", meta, shard_size=1)))
    thread.start()
    thread.join(timeout=1.0)
    assert thread.is_alive(), "the second writer did not wait for the first"
    first.add("b", 2 * torch.ones(4, 3))
    first.close()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert "another extraction is writing it; waiting" in capfd.readouterr().err
    w = second["w"]
    assert "a" in w and "b" in w
    w.add("c", 3 * torch.ones(4, 3))
    w.close()
    cache = FeatureCache(tmp_path / "c", vision=VISION)
    for i, v in (("a", 1), ("b", 2), ("c", 3)):
        torch.testing.assert_close(cache[i], v * torch.ones(4, 3))
    # a writer refused for other settings leaves the lock free
    with pytest.raises(ValueError, match="different settings"):
        FeatureWriter(tmp_path / "c", dict(meta, vision="RN50"))
    FeatureWriter(tmp_path / "c", meta).close()


# ----------------------------------------------------------------------------- cache checks

TINY = ["data.tasks=[vqa,nlvr2]", "data.synthetic_train=4", "data.synthetic_eval=2", "data.image_size=16"]


def test_synthetic_cache_records_the_world_and_refuses_other_settings(weights, tmp_path):
    """A cache of the synthetic world holds the images of one seed / image size: the same ids name
    other images under other settings, so such a run is refused (and so is resuming the extraction)."""
    import extract_features as launcher

    from vlscale.data.features import META_FILE
    from vlscale.data.real import DataError
    from vlscale.data.synthetic import GENERATOR_VERSION

    out = tmp_path / "feats"
    args = ["--synthetic", "--vision", VISION, "--pretrained", weights, "--out", str(out), "--quiet"]
    assert launcher.main(args + TINY) == 0
    meta = json.loads((out / META_FILE).read_text())
    assert meta["synthetic"] == {"generator": GENERATOR_VERSION, "seed": 0, "image_size": 16}

    def run(*more):
        return load_config("tiny", TINY + ["model.feature_source=cache", f"data.feature_cache={out}",
                                           f"model.vision_pretrained={weights}", *more])

    for task in ("vqa", "nlvr2"):
        assert isinstance(build_visual_source(run(), task, "val"), FeatureCache)
    with pytest.raises(DataError, match=r"meta\.json: was made from other synthetic-world images "
                                        r"\(data\.synthetic_seed: cached 0, run 5\)"):
        build_visual_source(run("data.synthetic_seed=5"), "nlvr2", "train")
    with pytest.raises(DataError, match=r"data\.image_size: cached 16, run 32"):
        build_visual_source(run("data.image_size=32"), "vqa", "train")
    # more examples than were extracted: found when the loader is built, not at the first batch that needs one
    with pytest.raises(DataError, match=r"vqa/train: 2 visual id\(s\) named by 2 of 6 examples are not in "
                                        r"FeatureCache.*first \['vqa_train_000004', 'vqa_train_000005'\]; extract them "
                                        r"into the cache \(launchers/extract_features.py over this split\)"):
        build_train_loader(run("data.synthetic_train=6"), None)
    loader = build_train_loader(run("data.synthetic_train=6", "data.skip_bad_records=true"), None)
    assert {t: len(e) for t, e in loader.examples.items()} == {"vqa": 4, "nlvr2": 4}
    # the real-data path refuses a synthetic cache; resuming the extraction with another seed is refused
    real = load_config("tiny", ["data.source=real", "data.root=.", "data.tasks=[vqa]", "model.feature_source=cache",
                                f"data.feature_cache={out}", f"model.vision_pretrained={weights}"])
    with pytest.raises(DataError, match="holds synthetic-world features .* but the run reads real data"):
        build_visual_source(real, "vqa", "train")
    with pytest.raises(SystemExit, match=r"DataError: .*different settings .*'seed': 3"):
        launcher.main(args + TINY + ["data.synthetic_seed=3"])
    # a cache from before the world was recorded: refused for the synthetic world, fine for real data
    (out / META_FILE).write_text(json.dumps({k: v for k, v in meta.items() if k != "synthetic"}))
    with pytest.raises(DataError, match="does not record which synthetic world .* Re-extract it"):
        build_visual_source(run(), "vqa", "train")
    assert isinstance(build_visual_source(real, "vqa", "train"), FeatureCache)


def test_a_synthetic_video_tasks_cache_is_read_as_frame_embeddings(encoder, weights, tmp_path):
    """The synthetic world's video tasks train from a cache of per-frame CLIP embeddings (kind "frames", one
    (F, E) matrix per video), not of image grids: build_visual_source opens such a cache for them."""
    import extract_features as launcher

    video = ["data.tasks=[tvqa]", "data.synthetic_train=2", "data.synthetic_eval=2", "data.image_size=16"]
    out = tmp_path / "frames"
    assert launcher.main(["--synthetic", "--vision", VISION, "--pretrained", weights, "--out", str(out), "--quiet",
                          *video]) == 0
    cfg = load_config("tiny", video + ["model.feature_source=cache", f"data.feature_cache={out}",
                                       f"model.vision_pretrained={weights}"])
    cache = build_visual_source(cfg, "tvqa", "val")
    assert isinstance(cache, FeatureCache) and cache.meta["kind"] == "frames"
    videos = build_visual_source(load_config("tiny", video), "tvqa", "val")
    assert videos.ids() and set(videos.ids()) <= set(cache.ids())
    for i in videos.ids():
        assert cache[i].shape == (len(videos[i]), encoder[0].embed_dim)


def test_cache_content_is_checked_and_errors_name_the_cache(tmp_path):
    from safetensors.torch import save_file

    from vlscale.data.real import DataError, DataFileNotFound

    meta = {"vision": VISION, "pretrained": None, "kind": "grid", "dtype": "float32"}
    w = FeatureWriter(tmp_path / "c", meta)
    w.add("a", torch.ones(16, 64))
    w.close()
    # meta.json claims tiny-clip-rn (256-d grid) but holds 64-d features: refused when opened for the run
    cfg = load_config("tiny", ["data.source=real", "data.root=.", "data.tasks=[vqa]", "model.feature_source=cache",
                               f"data.feature_cache={tmp_path / 'c'}"])
    with pytest.raises(DataError, match=r"feature cache .*c/meta\.json: holds 64-d features, but "
                                        r"model\.vision='tiny-clip-rn' takes 256-d"):
        build_visual_source(cfg, "vqa", "val")
    # a tensor that disagrees with meta.json, or is not 2-d: named with the cache, shard and id
    save_file({"a": torch.ones(16, 32), "b": torch.ones(2, 16, 64)}, str(tmp_path / "c" / "shard_00000.safetensors"))
    index = {"a": "shard_00000.safetensors", "b": "shard_00000.safetensors", "gone": "shard_00000.safetensors",
             "lost": "shard_00009.safetensors"}
    (tmp_path / "c" / "index.json").write_text(json.dumps(index))
    cache = FeatureCache(tmp_path / "c", vision=VISION)
    with pytest.raises(DataError, match=r"feature cache .*c: the features of id 'a' in shard "
                                        r".*shard_00000\.safetensors is 32-d, but meta\.json says dim=64"):
        cache["a"]
    with pytest.raises(DataError, match=r"id 'b' .* has shape \(2, 16, 64\), expected a non-empty 2-d"):
        cache["b"]
    with pytest.raises(DataError, match=r"feature cache .*c: cannot read the features of id 'gone' from shard "):
        cache["gone"]
    with pytest.raises(DataFileNotFound, match=r"shard .*shard_00009\.safetensors named in index\.json is missing"):
        cache["lost"]
    (tmp_path / "c" / "shard_00000.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(DataError, match=r"cannot read the features of id 'a' from shard .*SafetensorError"):
        FeatureCache(tmp_path / "c")["a"]
    # meta.json / index.json that are not JSON objects
    (tmp_path / "c" / "meta.json").write_text("[1, 2]")
    with pytest.raises(DataError, match=r"c/meta\.json: expected a JSON object .*got list"):
        FeatureCache(tmp_path / "c")
    with pytest.raises(DataError, match=r"c/meta\.json: expected a JSON object"):
        FeatureWriter(tmp_path / "c", meta)


# ----------------------------------------------------------------------------- extract_features.py input

def _save_images(folder, names):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        Image.fromarray(np.full((16, 16, 3), 40 * k, np.uint8)).save(folder / name)


def test_launcher_images_bad_input_is_one_line(tmp_path, weights, capsys):
    import extract_features as launcher

    from vlscale.data.visual import ImageFolder

    base = ["--vision", VISION, "--pretrained", weights, "--quiet"]
    _save_images(tmp_path / "dup", ["x.jpg", "x.png"])
    with pytest.raises(SystemExit, match=r"dup: x\.jpg and x\.png would both be id 'x'"):
        launcher.main(base + ["--images", str(tmp_path / "dup"), "--out", str(tmp_path / "f0")])
    # y.JPG is id y, and training's {id}.jpg finds it
    _save_images(tmp_path / "imgs", ["y.JPG", "z.png"])
    assert launcher.main(base + ["--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "f1")]) == 0
    assert sorted(FeatureCache(tmp_path / "f1").ids()) == ["y", "z"] and "y" in ImageFolder(tmp_path / "imgs")
    out = capsys.readouterr().out
    assert "of the 2 ids asked for, 2 written, 0 already there; the cache holds 2." in out and "left out" not in out
    # a full disk at the shard's write: one line naming the file and the reason (a traceback through safetensors'
    # writer), and the same command, once it can write, finishes the cache
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("safetensors.torch.save_file", full)
        with pytest.raises(SystemExit, match=rf"^extract_features.py: writing the feature cache {tmp_path / 'f4'} "
                                             rf"failed \(No space left on device: {tmp_path / 'f4'}/shard_00000"
                                             r"\.safetensors\.tmp; [^\n]* free on its file system\); the features "
                                             r"written before it are kept"):
            launcher.main(base + ["--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "f4")])
    assert launcher.main(base + ["--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "f4")]) == 0
    assert sorted(FeatureCache(tmp_path / "f4").ids()) == ["y", "z"]
    # an OSError that is no refused write (an images folder it may not read) is raised as it is, not told as the
    # cache's full disk
    refused = PermissionError(13, "Permission denied", str(tmp_path / "imgs"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(launcher, "image_folder_jobs", lambda args: (_ for _ in ()).throw(refused))
        with pytest.raises(PermissionError) as failed:
            launcher.main(base + ["--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "f5")])
    assert failed.value is refused
    with pytest.raises(SystemExit, match=r"--video: no sub-folders"):
        launcher.main(base + ["--images", str(tmp_path / "imgs"), "--video", "--out", str(tmp_path / "f2")])
    assert not (tmp_path / "f2" / "index.json").exists()
    with pytest.raises(SystemExit, match=r"--vision: unknown vision model 'RN999'"):
        launcher.main(["--vision", "RN999", "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "f3")])
    with pytest.raises(SystemExit) as info:
        launcher.main(base + ["--images", str(tmp_path / "imgs"), "--batch-size", "0", "--out", str(tmp_path / "f3")])
    assert info.value.code == 2 and "--batch-size must be > 0, got 0" in capsys.readouterr().err
    (tmp_path / "f.pt").write_bytes(b"kept")
    for more, words in ((["--pattern", "img.jpg", "--out", str(tmp_path / "f3")], "--pattern 'img.jpg' must contain "
                         "{id} where the id stands"),  # was a traceback
                        (["--out", str(tmp_path / "f.pt")], f"--out {tmp_path / 'f.pt'} cannot be created or "
                         f"written: {tmp_path / 'f.pt'} is a file, not a folder"),  # and one under a file: was a
                        # NotADirectoryError traceback after the build
                        (["--out", str(tmp_path / "f.pt" / "c")], f"--out {tmp_path / 'f.pt' / 'c'} cannot be created "
                         f"or written: {tmp_path / 'f.pt'} is a file, not a folder")):
        with pytest.raises(SystemExit) as info:
            launcher.main(base + ["--images", str(tmp_path / "imgs"), *more])
        assert info.value.code == 2 and words in capsys.readouterr().err
    assert (tmp_path / "f.pt").read_bytes() == b"kept" and not (tmp_path / "f3").exists()
    with pytest.raises(SystemExit, match=r"DataError: feature cache .*f1/meta\.json was made with different settings"):
        launcher.main(["--vision", "tiny-clip-vit", "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "f1"),
                       "--quiet"])
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(SystemExit, match=r"DataError: image 'broken': cannot read image .*imgs/broken\.jpg"):
        launcher.main(base + ["--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "f4")])
    # what is done is kept and said so, with the way on; --skip-bad-records leaves the image out, named at the end
    with pytest.raises(SystemExit, match=r"imgs/broken\.jpg \(UnidentifiedImageError: .*\); the cache .*f1 keeps "
                                         r"the 2 ids done before it, .* or leave unreadable ones out with "
                                         r"--skip-bad-records \(training with data\.skip_bad_records=true drops"):
        launcher.main(base + ["--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "f1")])
    capsys.readouterr()
    assert launcher.main(base + ["--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "f4"),
                                 "--skip-bad-records"]) == 0
    assert sorted(FeatureCache(tmp_path / "f4").ids()) == ["y", "z"]
    assert ("--skip-bad-records: left out 1 id(s) that could not be read, first: image 'broken': cannot read image "
            f"{tmp_path / 'imgs' / 'broken.jpg'} (UnidentifiedImageError") in capsys.readouterr().out
    (tmp_path / "empty").mkdir()  # more than five: the first five are named
    for k in range(6):
        (tmp_path / "empty" / f"e{k}.jpg").write_bytes(b"")
    assert launcher.main(base + ["--images", str(tmp_path / "empty"), "--out", str(tmp_path / "f5"),
                                 "--skip-bad-records"]) == 0
    said = "; ".join(f"image 'e{k}': cannot read image {tmp_path / 'empty' / f'e{k}.jpg'} (the file is empty: 0 bytes)"
                     for k in range(5))
    assert f"left out 6 id(s) that could not be read, first: {said}. Train with" in capsys.readouterr().out


def test_launcher_real_with_skip_bad_records_leaves_a_cut_image_out_and_training_drops_its_examples(tmp_path, weights,
                                                                                                    tok, capsys):
    """--real: a half-written image stops the extraction naming data.skip_bad_records=true as the way past it; with
    it, the image is left out (said at the end) and a run with the same setting drops the examples naming it; a
    video's cut frame-features file too."""
    import shutil

    import extract_features as launcher

    shutil.copytree(ROOT / "tests" / "fixtures" / "real_data" / "gqa", tmp_path / "gqa")
    whole = (tmp_path / "gqa" / "images" / "2375429.jpg").read_bytes()
    (tmp_path / "gqa" / "images" / "2375429.jpg").write_bytes(whole[:len(whole) // 2])
    real = ["--real", "--config", "tiny", "data.source=real", f"data.root={tmp_path}", "data.tasks=[gqa]",
            "--pretrained", weights, "--quiet", "--out", str(tmp_path / "cache")]
    with pytest.raises(SystemExit, match=r"image '2375429': cannot read image .*2375429\.jpg \(OSError: .*\); the "
                                         r"cache .* or leave unreadable ones out with data\.skip_bad_records=true "):
        launcher.main(real)
    assert launcher.main(real + ["data.skip_bad_records=true"]) == 0
    assert "data.skip_bad_records: left out 1 id(s) that could not be read, first: image '2375429'" in (
        capsys.readouterr().out)
    cfg = load_config("tiny", ["data.source=real", f"data.root={tmp_path}", "data.tasks=[gqa]",
                               "model.feature_source=cache", f"data.feature_cache={tmp_path / 'cache'}",
                               f"model.vision_pretrained={weights}", "data.skip_bad_records=true"])
    assert [e.image_ids for e in build_train_loader(cfg, tok).examples["gqa"]] == [["2354786"], ["2354786"]]
    # a video task's precomputed frame features, copied not encoded: a cut .npy is left out by the same setting
    shutil.copytree(ROOT / "tests" / "fixtures" / "real_data" / "tvqa", tmp_path / "tvqa")
    npy = tmp_path / "tvqa" / "features" / "house_s02e03_seg02_clip_05.npy"
    npy.write_bytes(npy.read_bytes()[:100])
    assert launcher.main(["--real", "--config", "tiny", "data.source=real", f"data.root={tmp_path}",
                          "data.tasks=[tvqa]", "model.vision=ViT-B-32", "model.vision_pretrained=openai",
                          "data.skip_bad_records=true", "--quiet", "--out", str(tmp_path / "video")]) == 0
    assert f"data.skip_bad_records: left out 1 id(s) that could not be read, first: {npy} (video " in (
        capsys.readouterr().out)
    assert list(FeatureCache(tmp_path / "video").ids()) == ["friends_s01e01_seg01_clip_00"]


def test_launcher_train_with_line_trains_on_the_cache_as_printed(tmp_path, weights, capsys):
    """The "Train with:" line named only the cache: after --real it lacked the data (data.root=...), after
    --images --pretrained FILE the CLIP (model.vision_pretrained=FILE), so a run given it as printed did not find
    the data or was refused by the cache. Its words, loaded as launchers/train.py loads them, now build a train
    loader whose every example's features are in the cache made with the run's CLIP."""
    import shlex

    import extract_features as launcher

    fixture = ROOT / "tests" / "fixtures" / "real_data"
    real = ["data.source=real", f"data.root={fixture}", "data.tasks=[vqa,gqa]"]

    def printed() -> list[str]:
        line = next(x for x in capsys.readouterr().out.splitlines() if "Train with: " in x)
        return shlex.split(line.split("Train with: ", 1)[1])

    out = tmp_path / "real"
    assert launcher.main(["--real", "--config", "tiny", *real, "--pretrained", weights, "--out", str(out),
                          "--quiet"]) == 0
    words = printed()
    assert words[:4] == ["python", "launchers/train.py", "--config", "tiny"]
    cfg = load_config("tiny", words[4:])
    assert (Path(cfg.data.root), cfg.data.feature_cache, cfg.model.feature_source) == (fixture, str(out), "cache")
    assert set(build_train_loader(cfg, None).examples) == {"vqa", "gqa"}  # every id found in the cache
    out = tmp_path / "images"
    assert launcher.main(["--images", str(fixture / "coco" / "images"), "--vision", VISION, "--pretrained", weights,
                          "--out", str(out), "--quiet"]) == 0
    words = printed()  # overrides for the run's own config
    assert f"model.vision={VISION}" in words and f"model.vision_pretrained={weights}" in words
    cfg = load_config("tiny", ["data.source=real", f"data.root={fixture}", "data.tasks=[vqa]", *words])
    assert cfg.data.feature_cache == str(out) and len(build_train_loader(cfg, None).examples["vqa"]) == 3


def test_launcher_hf_ids_are_trainings_ids(tmp_path, weights, tok):
    """Features extracted from each split of an HF dataset land under the ids training looks up
    (``<split>/<row>``, or the image_id column whose rows share an image)."""
    import extract_features as launcher

    hf = str(ROOT / "tests" / "fixtures" / "hf_multi")
    base = ["--vision", VISION, "--pretrained", weights, "--quiet", "--hf-dataset", hf, "--image-column", "image"]
    rows, named = tmp_path / "rows", tmp_path / "named"
    for split in ("train", "validation"):  # the dataset's split name or ours (val): the same ids
        assert launcher.main(base + ["--split", split, "--out", str(rows)]) == 0
    assert sorted(FeatureCache(rows).ids()) == ["train/0", "train/1", "train/2", "val/0", "val/1"]
    for split in ("train", "val"):
        assert launcher.main(base + ["--split", split, "--id-column", "image_name", "--out", str(named)]) == 0
    assert sorted(FeatureCache(named).ids()) == ["img_a", "img_b", "img_c", "img_d"]  # img_a: 2 rows, once
    columns = {rows: "{image: image, question: question, answers: answers, id: qid}",
               named: "{image: image, image_id: image_name, question: question, answers: answers, id: qid}"}
    for cache, mapping in columns.items():
        cfg = load_config("tiny", ["data.source=real", "data.tasks=[vqa]", f"data.hf_dataset={hf}",
                                   f"data.hf_columns={mapping}", "model.feature_source=cache",
                                   f"data.feature_cache={cache}", f"model.vision_pretrained={weights}"])
        for split, n in (("train", 3), ("val", 2)):
            batch = next(eval_batches(cfg, tok, "vqa", split, 8))
            assert batch["vis_feats"].shape[:2] == (n, 1)


def test_launcher_real_skips_a_split_an_hf_dataset_lacks_as_a_missing_annotation_file(tmp_path, weights, capsys):
    """--real over data.hf_dataset extracts the splits the dataset has and says which it skipped, as it skips a split
    without its annotation file; a dataset without a test split (hf_multi: train, validation) stopped the whole
    extraction. The cache records the dataset its <split>/<row> ids number, so the printed "Train with:" line trains
    (none was recorded: the line was refused as an older vlscale's cache). Both found by the bring-your-own-data
    audit."""
    import shlex

    import extract_features as launcher

    hf = ROOT / "tests" / "fixtures" / "hf_multi"
    assert launcher.main(["--real", "--config", "tiny", "data.source=real", "data.tasks=[vqa]", f"data.hf_dataset={hf}",
                          "data.hf_columns={image: image, question: question, answers: answers}", "--pretrained",
                          weights, "--out", str(tmp_path / "c"), "--quiet"]) == 0
    assert sorted(FeatureCache(tmp_path / "c").ids()) == ["train/0", "train/1", "train/2", "val/0", "val/1"]
    said = capsys.readouterr().out
    assert f"--real: vqa/test skipped (data.hf_dataset='{hf}' has no split for 'test'" in said
    line = next(x for x in said.splitlines() if "Train with: " in x)
    cfg = load_config("tiny", shlex.split(line.split("Train with: ", 1)[1])[4:])
    assert cfg.data.feature_cache == str(tmp_path / "c") and len(build_train_loader(cfg, None).examples["vqa"]) == 3


def test_a_row_numbered_cache_for_a_run_naming_images_by_an_id_column_says_to_extract_with_it(tmp_path):
    """With data.hf_columns.image_id the run names images by that column, so a cache of <split>/<row> ids lacks
    them: the start-up check says so and how to extract them (--id-column), whatever dataset the rows were of
    (not 'the run reads the rows of data.hf_dataset', which it does not)."""
    from vlscale.data.real import DataError

    cache = _tiny_cache(tmp_path / "c", ["train/0", "train/1", "train/2"], {"hf_rows": "other", "dim": 256},
                        shape=(4, 256))  # tiny-clip-rn's grid width
    hf = ROOT / "tests" / "fixtures" / "hf_multi"
    cfg = load_config("tiny", ["data.source=real", "data.tasks=[vqa]", f"data.hf_dataset={hf}",
                               "data.hf_columns={image: image, image_id: image_name, question: question, "
                               "answers: answers, id: qid}", "model.feature_source=cache",
                               f"data.feature_cache={cache}", "model.vision_pretrained=null"])
    with pytest.raises(DataError, match=r"first \['img_a', 'img_b'\]; the run names images by "
                                        r"data\.hf_columns\.image_id='image_name' and the cache's ids number rows "
                                        r"\(e\.g\. 'train/0'\): extract them into the cache with launchers/"
                                        r"extract_features\.py --hf-dataset .*hf_multi \.\.\. --id-column "
                                        r"image_name, or set data\.skip_bad_records=true"):
        build_train_loader(cfg, None)


def test_hf_row_ids_of_two_datasets_never_share_a_cache(tmp_path, weights):
    """Rows of an HF dataset without an image_id column are named <split>/<row>; extracting a second dataset's
    rows into a cache holding the first's skipped every id already there, silently keeping the first
    dataset's features for the second's images, and a run reading the second dataset from the first's
    cache took them too. meta.json now records the dataset (hf_rows): both are refused naming it."""
    import datasets
    import extract_features as launcher
    from PIL import Image

    from vlscale.data.real import DataError

    def save(name, seed):
        rng = np.random.default_rng(seed)
        images = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)) for _ in range(3)]
        path = tmp_path / name
        datasets.DatasetDict({"train": datasets.Dataset.from_dict(
            {"image": images}, features=datasets.Features({"image": datasets.Image()}))}).save_to_disk(str(path))
        return path

    first, second = save("first", 0), save("second", 1)
    cache = tmp_path / "cache"
    base = ["--vision", VISION, "--pretrained", weights, "--quiet", "--image-column", "image", "--out", str(cache)]
    assert launcher.main(base + ["--hf-dataset", str(first)]) == 0
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["hf_rows"] == "first"
    index = (cache / "index.json").read_text()
    with pytest.raises(SystemExit, match=r"holds rows of the HF dataset 'first'; the rows of 'second' have the same "
                                         r"ids \(<split>/<row>\) and would keep those features: use another --out"):
        launcher.main(base + ["--hf-dataset", str(second)])
    assert (cache / "index.json").read_text() == index  # nothing written
    assert launcher.main(base + ["--hf-dataset", str(first)]) == 0  # the same dataset again: already there
    FeatureCache(cache, hf_rows=str(first))
    with pytest.raises(DataError, match=r"holds rows of the HF dataset 'first', but the run reads the rows of "
                                        r"data.hf_dataset=.*second'"):
        FeatureCache(cache, hf_rows=str(second))
    # a cache made before hf_rows was recorded: its row ids' dataset is unknown
    del meta["hf_rows"]
    (cache / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"row-numbered ids \(<split>/<row>\) of an HF dataset it does not record"):
        FeatureCache(cache, hf_rows=str(first))
    with pytest.raises(SystemExit, match=r"row-numbered ids of an HF dataset it does not record \(e\.g\. 'train/0'"):
        launcher.main(base + ["--hf-dataset", str(first)])
    FeatureCache(cache)  # a run reading ids it names itself (files, an image_id column) is not concerned
    # a run: data.hf_dataset without an image_id column reads row ids, so the check applies
    cfg = load_config("tiny", ["data.source=real", "data.tasks=[vqa]", f"data.hf_dataset={second}",
                               "data.hf_columns={image: image, question: question, answer: answer}",
                               "model.feature_source=cache", f"data.feature_cache={cache}",
                               f"model.vision_pretrained={weights}"])
    from vlscale.data.real import real_visual_source

    with pytest.raises(DataError, match=r"data.hf_dataset=.*second"):
        real_visual_source(cfg, "vqa", "train")


def test_an_id_column_cache_records_no_hf_rows_so_other_datasets_images_extend_it(tmp_path, weights):
    """--id-column names each image itself, not by its row: such a cache records no dataset (hf_rows), so named
    images of a second dataset extend it, and so do a dataset's rows later (then recorded). Recording the first
    dataset refused both, as if its ids were <split>/<row>."""
    import datasets
    import extract_features as launcher
    from PIL import Image

    def save(name, seed, names):
        rng = np.random.default_rng(seed)
        images = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)) for _ in names]
        path = tmp_path / name
        datasets.DatasetDict({"train": datasets.Dataset.from_dict(
            {"image": images, "name": names},
            features=datasets.Features({"image": datasets.Image(), "name": datasets.Value("string")}))}).save_to_disk(
            str(path))
        return path

    first, second = save("first", 0, ["a0", "a1"]), save("second", 1, ["b0"])
    cache = tmp_path / "cache"
    base = ["--vision", VISION, "--pretrained", weights, "--quiet", "--image-column", "image", "--out", str(cache)]
    assert launcher.main(base + ["--hf-dataset", str(first), "--id-column", "name"]) == 0
    assert "hf_rows" not in json.loads((cache / "meta.json").read_text())
    assert launcher.main(base + ["--hf-dataset", str(second), "--id-column", "name"]) == 0
    assert "hf_rows" not in json.loads((cache / "meta.json").read_text())
    assert launcher.main(base + ["--hf-dataset", str(second)]) == 0  # its rows: now recorded
    assert json.loads((cache / "meta.json").read_text())["hf_rows"] == "second"
    assert sorted(FeatureCache(cache, hf_rows=str(second)).ids()) == ["a0", "a1", "b0", "train/0"]


def test_launcher_refuses_an_id_column_naming_two_images(tmp_path, weights):
    """--id-column naming the same id for two rows with different images cached the first row's features for
    both, without a word (training, since, refuses such rows): refused naming both rows, or skipped with
    --skip-bad-records."""
    import datasets
    import extract_features as launcher
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (side, side, 3), np.uint8)) for side in (8, 16, 8)]
    path = tmp_path / "shared_ids"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"image": images, "name": ["x", "x", "y"]},
        features=datasets.Features({"image": datasets.Image(), "name": datasets.Value("string")}))}).save_to_disk(
        str(path))
    base = ["--vision", VISION, "--pretrained", weights, "--quiet", "--hf-dataset", str(path), "--image-column",
            "image", "--id-column", "name", "--out", str(tmp_path / "cache")]
    with pytest.raises(SystemExit, match=r"shared_ids\[train\]: row 1: --id-column 'name' is 'x', the id of row 0's "
                                         r"image, but column 'image' holds another image here"):
        launcher.main(base)
    assert not (tmp_path / "cache" / "index.json").exists()
    assert launcher.main(base + ["--skip-bad-records"]) == 0
    assert sorted(FeatureCache(tmp_path / "cache").ids()) == ["x", "y"]


def test_launcher_refuses_an_id_column_that_names_no_id_or_skips_its_rows_in_row_order(tmp_path, weights, capsys):
    """An --id-column cell that is blank or not a string / integer (a bool) names no image: refused naming the row,
    or with --skip-bad-records skipped beside the rows without an image, reported in row order."""
    import datasets
    import extract_features as launcher
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)) for _ in range(4)]
    features = datasets.Features({"image": datasets.Image(), "name": datasets.Value("string"),
                                  "flag": datasets.Value("bool")})
    path = tmp_path / "odd_ids"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"image": images[:2] + [None] + images[3:], "name": ["a", " ", "c", "d"],
                                             "flag": [True, False, True, False]}, features=features),
        "validation": datasets.Dataset.from_dict({"image": images[:2], "name": ["a", " "], "flag": [True, False]},
                                                 features=features)}).save_to_disk(str(path))
    base = ["--vision", VISION, "--pretrained", weights, "--quiet", "--hf-dataset", str(path), "--image-column",
            "image", "--out", str(tmp_path / "cache")]
    with pytest.raises(SystemExit, match=r"odd_ids\[validation\]: row 0: --id-column 'flag' must hold a non-empty "
                                         r"string or integer id, got True"):
        launcher.main(base + ["--split", "val", "--id-column", "flag"])
    with pytest.raises(SystemExit, match=r"odd_ids\[validation\]: row 1: --id-column 'name' must hold a non-empty "
                                         r"string or integer id, got ' '"):
        launcher.main(base + ["--split", "val", "--id-column", "name"])
    assert not (tmp_path / "cache" / "index.json").exists()
    capsys.readouterr()
    assert launcher.main(base + ["--id-column", "name", "--skip-bad-records"]) == 0
    assert sorted(FeatureCache(tmp_path / "cache").ids()) == ["a", "d"]
    assert ("skipped 2 of 4 rows of " in (out := capsys.readouterr().out) and "odd_ids[train], first: row 1 "
            "(--id-column 'name' holds ' '); row 2 (column 'image' has no image)." in out), out


def _pairs_hf(path, none=()):
    """A local NLVR2-style DatasetDict (two Image columns per row) saved with ``save_to_disk``: train 4 rows,
    validation 2; ``none``: ``(split, row, column)`` cells left without an image."""
    import datasets
    from PIL import Image

    def split(name, n, seed):
        cells = {col: [None if (name, r, col) in none else
                       Image.fromarray(np.random.default_rng(seed + 10 * r + k).integers(0, 256, (8, 8, 3), np.uint8))
                       for r in range(n)] for k, col in enumerate(("left_image", "right_image"))}
        return datasets.Dataset.from_dict(
            dict(cells, sentence=[f"claim {name} {r}" for r in range(n)], label=[r % 2 for r in range(n)],
                 answer=[f"a{r}" for r in range(n)]),
            features=datasets.Features({"left_image": datasets.Image(), "right_image": datasets.Image(),
                                        "sentence": datasets.Value("string"), "label": datasets.Value("int64"),
                                        "answer": datasets.Value("string")}))

    datasets.DatasetDict({"train": split("train", 4, 0), "validation": split("validation", 2, 100)}).save_to_disk(
        str(path))
    return str(path)


NLVR2_COLUMNS = "{image: [left_image, right_image], text: sentence, label: label}"


def _hf_cfg(hf, task, columns, cache, weights, *more):
    return load_config("tiny", ["data.source=real", f"data.tasks=[{task}]", f"data.hf_dataset={hf}",
                                f"data.hf_columns={columns}", "model.feature_source=cache",
                                f"data.feature_cache={cache}", f"model.vision_pretrained={weights}", *more])


def test_launcher_hf_nlvr2_extracts_both_images_under_trainings_ids(tmp_path, encoder, weights, tok):
    """NLVR2's two image columns: each row's images land under training's ``<split>/<row>/<k>`` (k: the
    column's place in data.hf_columns.image), and training's loaders resolve every id from the cache."""
    import extract_features as launcher

    from vlscale.data.hf_dataset import load_hf_examples

    hf = _pairs_hf(tmp_path / "pairs")
    cache = tmp_path / "cache"
    base = ["--vision", VISION, "--pretrained", weights, "--quiet", "--hf-dataset", hf, "--out", str(cache)]
    for split in ("train", "validation"):
        assert launcher.main(base + ["--split", split, "--image-column", "left_image", "right_image"]) == 0
    cfg = _hf_cfg(hf, "nlvr2", NLVR2_COLUMNS, cache, weights)
    wanted = {i for split in ("train", "val") for e in load_examples(cfg, "nlvr2", split) for i in e.image_ids}
    assert sorted(FeatureCache(cache).ids()) == sorted(wanted) and len(wanted) == 12
    # the cached features are those of training's own images, left = 0, right = 1
    enc, tf = encoder
    _, images = load_hf_examples("nlvr2", hf, "train", {"image": ["left_image", "right_image"], "text": "sentence",
                                                        "label": "label"})
    for iid in ("train/3/0", "train/3/1"):
        assert torch.allclose(FeatureCache(cache)[iid], enc.encode_grid(tf([images[iid]]))[0].float(), atol=1e-5)
    for split, n in (("train", 4), ("val", 2)):
        batch = next(eval_batches(cfg, tok, "nlvr2", split, 8))
        assert batch["vis_feats"].shape[:2] == (n, 2)
    train_batch = next(iter(build_train_loader(cfg, tok)))
    assert train_batch["vis_feats"].shape[1] == 2
    with pytest.raises(SystemExit, match=r"--id-column applies to one --image-column only"):
        launcher.main(base + ["--image-column", "left_image", "right_image", "--id-column", "sentence"])
    with pytest.raises(SystemExit, match=r"--image-column takes one column, or NLVR2's two"):
        launcher.main(base + ["--image-column", "left_image", "right_image", "sentence"])


def test_launcher_hf_rows_without_an_image_error_or_skip_as_training(tmp_path, weights, tok, capsys):
    """A row without an image stops extraction with one line naming the dataset, split, row and column;
    ``--skip-bad-records`` skips it (counted, first rows reported) and training with
    data.skip_bad_records=true drops the same examples, every other id resolving from the cache."""
    import extract_features as launcher

    from vlscale.data.real import DataError

    hf = _pairs_hf(tmp_path / "holes", none={("train", 1, "left_image"), ("train", 3, "left_image"),
                                             ("train", 2, "right_image")})
    one, two = tmp_path / "one", tmp_path / "two"
    base = ["--vision", VISION, "--pretrained", weights, "--quiet", "--hf-dataset", hf]
    with pytest.raises(SystemExit, match=r"^extract_features\.py: DataError: --hf-dataset .*holes\[train\]: row 1, "
                                         r"column 'left_image' has no image \(2 such row\(s\), first \[1, 3\]\); "
                                         r"skip them with --skip-bad-records"):
        launcher.main(base + ["--image-column", "left_image", "--out", str(one)])
    assert not (one / "index.json").exists()
    with pytest.raises(SystemExit, match=r"holes\[train\]: row 1, column 'left_image' has no image \(3 such"):
        launcher.main(base + ["--image-column", "left_image", "right_image", "--out", str(two)])
    capsys.readouterr()
    for split in ("train", "val"):
        assert launcher.main(base + ["--image-column", "left_image", "--skip-bad-records", "--split", split,
                                     "--out", str(one)]) == 0
        assert launcher.main(base + ["--image-column", "left_image", "right_image", "--skip-bad-records",
                                     "--split", split, "--out", str(two)]) == 0
    out = capsys.readouterr().out
    assert ("--skip-bad-records: skipped 2 of 4 rows of " in out and "holes[train], first: row 1 (column "
            "'left_image' has no image); row 3 (column 'left_image' has no image)" in out)
    assert "skipped 3 of 4 rows" in out and "row 2 (column 'right_image' has no image); row 3" in out
    assert out.count("--skip-bad-records: skipped") == 2  # nothing skipped in the validation split
    assert sorted(FeatureCache(one).ids()) == ["train/0", "train/2", "val/0", "val/1"]
    named = tmp_path / "named"
    assert launcher.main(base + ["--image-column", "left_image", "--id-column", "answer", "--skip-bad-records",
                                 "--out", str(named)]) == 0
    assert sorted(FeatureCache(named).ids()) == ["a0", "a2"]
    assert sorted(FeatureCache(two).ids()) == ["train/0/0", "train/0/1", "val/0/0", "val/0/1", "val/1/0", "val/1/1"]
    # training skips the same rows, and every id it then names is in the cache: nothing more is dropped
    for task, columns, cache, rows in (("gqa", "{image: left_image, question: sentence, answer: answer}", one,
                                        [0, 2]), ("nlvr2", NLVR2_COLUMNS, two, [0])):
        cfg = _hf_cfg(hf, task, columns, cache, weights, "data.skip_bad_records=true")
        train = load_examples(cfg, task, "train")
        assert [e.extra["row"] for e in train] == rows and train.skipped == 4 - len(rows)
        assert next(eval_batches(cfg, tok, task, "train", 8))["vis_feats"].shape[0] == len(rows)
        assert next(eval_batches(cfg, tok, task, "val", 8))["vis_feats"].shape[0] == 2
        with pytest.raises(DataError, match=r"holes\[train\]: row 1: key 'left_image' has no image"):
            load_examples(_hf_cfg(hf, task, columns, cache, weights), task, "train")
    with pytest.raises(SystemExit) as info:
        launcher.main(["--synthetic", "--skip-bad-records", "--out", str(one)])
    assert info.value.code == 2 and "--skip-bad-records applies to --hf-dataset and --images" in capsys.readouterr().err
    # the other source-specific flags are refused where they would be ignored
    for flags, says in ((["--images", str(tmp_path), "--image-column", "image"], "--image-column applies"),
                        (["--images", str(tmp_path), "--id-column", "name"], "--id-column applies"),
                        (["--images", str(tmp_path), "--split", "val"], "--split applies"),
                        (["--synthetic", "--pattern", "{id}.jpg"], "--pattern applies")):
        with pytest.raises(SystemExit) as info:
            launcher.main(["--vision", VISION, *flags, "--out", str(one)])
        assert info.value.code == 2 and says in capsys.readouterr().err, flags


def test_launcher_hf_errors_name_the_flag_given(tmp_path, weights):
    """A split or dataset extract_features cannot open is named by the flag the user gave (--hf-dataset), not by
    training's data.hf_dataset, which this command has no such setting for."""
    import extract_features as launcher

    hf = str(ROOT / "tests" / "fixtures" / "hf_multi")
    base = ["--vision", VISION, "--pretrained", weights, "--quiet", "--image-column", "image", "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match=rf"^extract_features\.py: DataFileNotFound: --hf-dataset='{hf}' has no "
                                         r"split for 'test' \(tried \['test'\]\); its splits: \['train', 'validation'\]$"):
        launcher.main(base + ["--hf-dataset", hf, "--split", "test"])
    (tmp_path / "file.txt").write_text("not a dataset")
    with pytest.raises(SystemExit, match=r"^extract_features\.py: DataError: --hf-dataset='.*file\.txt' is a file"):
        launcher.main(base + ["--hf-dataset", str(tmp_path / "file.txt")])


def _replace_weights(src, dst, scale: float) -> None:
    """``src``'s checkpoint with its first float tensor scaled, written over ``dst`` (weights replaced in place)."""
    state = torch.load(src, weights_only=True)
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first] = state[first] * scale
    torch.save(state, dst)


def test_a_cache_is_continued_only_with_the_weights_it_was_made_with(tmp_path, encoder, weights, capsys):
    """meta.json named the weights (``pretrained``) but not which they were: a checkpoint replaced at the same path
    was accepted and its features added to the first CLIP's. The encoder's fingerprint is recorded; a continuation
    with other weights is one line naming the cache and both sources; a cache recording none (older vlscale) is
    continued with one note saying its weights are unchecked."""
    import shutil

    import extract_features as launcher

    from vlscale.engine.checkpoint import frozen_fingerprint

    clip, images, out = tmp_path / "clip.pt", tmp_path / "imgs", tmp_path / "cache"
    shutil.copy(weights, clip)
    _save_images(images, ["a.png", "b.png"])
    args = ["--images", str(images), "--vision", VISION, "--pretrained", str(clip), "--out", str(out), "--quiet"]
    assert launcher.main(args) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["fingerprint"] == frozen_fingerprint(encoder[0])  # the fixture's weights, saved to clip.pt
    _replace_weights(weights, clip, 1.5)
    _save_images(images, ["a.png", "b.png", "c.png"])
    with pytest.raises(SystemExit) as info:
        launcher.main(args)
    msg = str(info.value)
    assert "\n" not in msg and f"feature cache {out / 'meta.json'}: its features are of other {VISION} weights" in msg
    assert f"(pretrained={str(clip)!r} when made) than pretrained={str(clip)!r} gives now (visual." in msg
    assert "use another --out folder, or extract with the weights the cache was made with" in msg
    assert sorted(FeatureCache(out).ids()) == ["a", "b"]  # nothing of the other CLIP added
    capsys.readouterr()
    del meta["fingerprint"]  # a cache of an older vlscale: continued, said once
    (out / "meta.json").write_text(json.dumps(meta))
    assert launcher.main(args) == 0 and launcher.main(args) == 0
    err = capsys.readouterr().err
    assert err.count("records no fingerprint of the CLIP weights") == 1 and "is unchecked" in err
    assert sorted(FeatureCache(out).ids()) == ["a", "b", "c"] and "fingerprint" not in FeatureCache(out).meta


# ----------------------------------------------------------------------------- rules a plausible slip would break

def _tiny_cache(folder, ids, meta=None, kind="grid", shape=(4, 8)):
    """A cache written by FeatureWriter alone (no encoder): ``ids`` of ones of ``shape``."""
    w = FeatureWriter(folder, {"vision": VISION, "pretrained": None, "kind": kind, "dtype": "float32", **(meta or {})})
    for i in ids:
        w.add(i, torch.ones(*shape))
    w.close()
    return folder


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts /proc/self/fd")
def test_reading_every_shard_of_a_cache_holds_no_file_descriptor_open(tmp_path):
    """A cache's reader keeps one handle per shard it has read, for the run (each evaluated split's reader is kept to
    the end): safetensors maps the shard and closes its file, so its shards hold no descriptor (a tiny run on a cache
    of 300 shards, 4 evaluations, 1 and 2 ranks under ulimit -n 256: 13-19 a rank). A reader that kept each shard's
    file open would stop a COCO-size run (~240 shards a reader) with 'Too many open files' at an evaluation."""
    from safetensors.torch import save_file

    for i in range(32):  # as FeatureWriter lays them out, one id a shard (without its fsyncs: ~0.6 s)
        save_file({str(i): torch.full((4, 8), float(i))}, tmp_path / f"shard_{i:05d}.safetensors")
    (tmp_path / "meta.json").write_text(json.dumps({"vision": VISION, "kind": "grid", "dtype": "float32"}))
    (tmp_path / "index.json").write_text(json.dumps({str(i): f"shard_{i:05d}.safetensors" for i in range(32)}))
    cache = FeatureCache(tmp_path, vision=VISION)
    before = len(list(Path("/proc/self/fd").iterdir()))
    assert [cache[str(i)][0, 0].item() for i in range(32)] == list(range(32))
    assert len(cache._handles) == 32 and len(list(Path("/proc/self/fd").iterdir())) == before


@pytest.mark.parametrize("dtype", [torch.uint16, torch.bool, torch.complex64], ids=str)
def test_feature_cache_and_video_frame_files_share_one_dtype_rule(tmp_path, dtype):
    """Real numbers (integers of any width and sign) pass a cache's grid and a video's frame file (.safetensors or
    .npy) alike; bool and complex are refused by both, naming the file (uint16 was refused by the cache alone)."""
    from safetensors.torch import save_file

    from vlscale.data.real import DataError
    from vlscale.data.video import VideoFeatureFolder

    cache = _tiny_cache(tmp_path / "c", ["a"], shape=(4, 8))
    feats = torch.full((4, 8), 3).to(dtype)
    save_file({"a": feats}, str(cache / "shard_00000.safetensors"))
    save_file({"features": feats}, str(tmp_path / "st.safetensors"))
    np.save(tmp_path / "np.npy", feats.numpy())
    reads = [(lambda: FeatureCache(cache)["a"], r"id 'a' in shard .*shard_00000\.safetensors has"),
             (lambda: VideoFeatureFolder(tmp_path)["st"], r"st\.safetensors \(video 'st'\): frame features have"),
             (lambda: VideoFeatureFolder(tmp_path)["np"], r"np\.npy \(video 'np'\): frame features have")]
    name = str(dtype).removeprefix("torch.")  # .npy names numpy's dtype: bool, complex64
    for read, names_the_file in reads:
        if dtype == torch.uint16:
            assert torch.equal(read(), torch.full((4, 8), 3.0))
        else:
            with pytest.raises(DataError, match=rf"{names_the_file} dtype (torch\.)?{name}, expected real"):
                read()


@pytest.mark.skipif(np.dtype(np.longdouble).itemsize <= 8, reason="long double is float64 on this platform")
def test_a_frame_file_of_a_dtype_torch_cannot_hold_is_the_dtype_error(tmp_path):
    """A .npy of long double (real, but no torch dtype) is refused as other non-real dtypes are, not a TypeError."""
    from vlscale.data.real import DataError
    from vlscale.data.video import VideoFeatureFolder

    np.save(tmp_path / "ld.npy", np.ones((3, 8), np.longdouble))
    with pytest.raises(DataError, match=r"ld\.npy \(video 'ld'\): frame features have dtype float128, expected real"):
        VideoFeatureFolder(tmp_path)["ld"]


def test_a_cache_is_read_with_its_weights_file_elsewhere_but_not_with_another_file(tmp_path):
    """meta.json names a checkpoint path; the run may read the cache where that file lives at another path (same
    file name), and an unset pretrained is None or "" alike; another file name is refused, naming both."""
    from vlscale.data.real import DataError

    made = _tiny_cache(tmp_path / "c", ["a"], {"pretrained": "/made/here/clip.pt"})
    assert len(FeatureCache(made, vision=VISION, pretrained=str(tmp_path / "moved" / "clip.pt"))) == 1
    with pytest.raises(DataError, match=r"pretrained='/made/here/clip\.pt', but the run uses "
                                        r"model\.vision_pretrained='/made/here/other\.pt'; give the cache's weights "
                                        r"\(model\.vision_pretrained=/made/here/clip\.pt\), extract features with "
                                        r"the run's, or point data\.feature_cache at a matching cache$"):
        FeatureCache(made, vision=VISION, pretrained="/made/here/other.pt")
    unset = _tiny_cache(tmp_path / "u", ["a"], {"pretrained": ""})
    assert len(FeatureCache(unset, vision=VISION, pretrained=None)) == 1
    with pytest.raises(DataError, match=r"give the cache's weights \(model\.vision_pretrained=null\), extract "):
        FeatureCache(unset, vision=VISION, pretrained="/made/here/clip.pt")


def test_two_image_rows_of_an_hf_dataset_are_row_ids_too(tmp_path):
    """NLVR2's rows name two images, ``<split>/<row>/<k>``: a cache holding only such ids is still a cache of one
    HF dataset's rows, refused for another's, to read and to extend (a regex without the ``/<k>`` let it pass)."""
    from vlscale.data.real import DataError

    cache = _tiny_cache(tmp_path / "c", ["train/0/0", "train/0/1"], {"hf_rows": "nlvr2_a"})
    assert len(FeatureCache(cache, hf_rows="nlvr2_a")) == 2
    with pytest.raises(DataError, match=r"holds rows of the HF dataset 'nlvr2_a', but the run reads the rows of "
                                        r"data\.hf_dataset='nlvr2_b'"):
        FeatureCache(cache, hf_rows="nlvr2_b")
    older = _tiny_cache(tmp_path / "o", ["train/3/1"])  # an older vlscale's: hf_rows not recorded
    with pytest.raises(DataError, match=r"row-numbered ids of an HF dataset it does not record \(e\.g\. 'train/3/1'"):
        FeatureWriter(older, {"vision": VISION, "pretrained": None, "kind": "grid", "dtype": "float32",
                              "hf_rows": "nlvr2_b"})


def test_an_index_or_a_tensor_a_cache_cannot_serve_is_refused_naming_it(tmp_path):
    from vlscale.data.real import DataError

    cache = _tiny_cache(tmp_path / "c", ["a"])
    index = json.loads((cache / "index.json").read_text())
    (cache / "index.json").write_text(json.dumps(dict(index, b=3)))
    with pytest.raises(DataError, match=r"c/index\.json: id 'b' maps to 3, expected a shard file name"):
        FeatureCache(cache)
    # a video of no frames: a (0, E) matrix is refused as empty (frames caches record no token count)
    from safetensors.torch import save_file

    frames = _tiny_cache(tmp_path / "v", ["v1"], kind="frames", shape=(3, 8))
    save_file({"v1": torch.ones(0, 8)}, str(frames / "shard_00000.safetensors"))
    with pytest.raises(DataError, match=r"id 'v1' .* has shape \(0, 8\), expected a non-empty 2-d"):
        FeatureCache(frames, expect_kind="frames")["v1"]


def test_a_cache_is_continued_only_with_its_settings_and_fingerprints_must_be_well_formed(tmp_path):
    """Continuing a float32 cache asked for float16 is refused (it kept float32 silently); a writer with no
    fingerprint (copied precomputed frames) continues a fingerprinted cache; a meta.json whose fingerprint is
    not [sum of squares, sum of |w|] per tensor is refused naming it."""
    from vlscale.data.real import DataError

    base = {"vision": VISION, "pretrained": None, "kind": "frames", "dtype": "float32"}
    cache = _tiny_cache(tmp_path / "c", ["v1"], {"kind": "frames", "fingerprint": {"w": [2.0, 1.0]}})
    with pytest.raises(DataError, match=r"different settings .*'dtype': \('float32', 'float16'\)"):
        FeatureWriter(cache, dict(base, dtype="float16"))
    FeatureWriter(cache, base).close()  # nothing encoded: no weights to compare
    meta = json.loads((cache / "meta.json").read_text())
    (cache / "meta.json").write_text(json.dumps(dict(meta, fingerprint={"w": [2.0]})))
    with pytest.raises(DataError, match=r"c/meta\.json: fingerprint is not a fingerprint of CLIP weights"):
        FeatureWriter(cache, dict(base, fingerprint={"w": [2.0, 1.0]}))


def test_extraction_counts_each_id_once_and_an_empty_one_leaves_a_cache(encoder, tmp_path):
    enc, tf = encoder
    split = generate_split("vqa", "val", 2, image_size=16)
    ids = list(split.visuals)
    stats = extract_features(enc, tf, SyntheticImages(split.visuals), ids + ids[:1], tmp_path / "c", vision=VISION,
                             progress=False)
    # a repeated id is one image, not a skipped one
    assert stats == {"total": 2, "skipped": 0, "written": 2, "unreadable": []}
    with pytest.raises(ValueError, match="batch_size must be > 0, got 0"):
        extract_features(enc, tf, SyntheticImages(split.visuals), ids, tmp_path / "z", vision=VISION, batch_size=0,
                         progress=False)
    assert extract_features(enc, tf, SyntheticImages({}), [], tmp_path / "e", vision=VISION,
                            progress=False)["written"] == 0
    assert len(FeatureCache(tmp_path / "e", vision=VISION)) == 0  # meta.json and index.json written all the same


def test_a_video_extraction_counts_videos_written_and_skipped(encoder, tmp_path):
    """The counts the launcher prints ("N written") are of videos, not of encoding batches: 4 videos of 8, 6, 8 and
    8 frames in batches of up to 14 frames are 4 written (in 3 batches), and a re-run skips all 4."""
    enc, tf = encoder
    split = generate_split("tvqa", "val", 4, image_size=16)
    ids = list(split.visuals)
    run = dict(vision=VISION, video=True, batch_size=14, progress=False)
    stats = extract_features(enc, tf, SyntheticImages(split.visuals), ids, tmp_path / "v", **run)
    assert stats == {"total": 4, "skipped": 0, "written": 4, "unreadable": []}
    assert extract_features(enc, tf, SyntheticImages(split.visuals), ids, tmp_path / "v", **run) == {
        "total": 4, "skipped": 4, "written": 0, "unreadable": []}


def test_a_shard_left_half_written_by_an_interrupted_extraction_does_not_stop_the_next(tmp_path):
    """An extraction killed while saving a shard leaves ``shard_NNNNN.safetensors.tmp`` (the index never names
    it): the next writer numbers its shards after the complete ones, writes over the leftover, and the cache reads
    every id (a leftover counted as a shard made the next writer fail on its name)."""
    cache = _tiny_cache(tmp_path / "c", ["a"])
    (cache / "shard_00001.safetensors.tmp").write_bytes(b"cut short")
    _tiny_cache(cache, ["b"])
    assert sorted(p.name for p in cache.glob("shard_*")) == ["shard_00000.safetensors", "shard_00001.safetensors"]
    read = FeatureCache(cache, vision=VISION)
    assert sorted(read.ids()) == ["a", "b"] and torch.equal(read["b"], torch.ones(4, 8))


@pytest.mark.parametrize("key, value", [("dim", 0), ("tokens", 0), ("dim", True), ("tokens", 4.0)])
def test_a_meta_json_width_or_token_count_that_is_not_a_positive_integer_is_refused_at_open(tmp_path, key, value):
    from vlscale.data.real import DataError

    cache = _tiny_cache(tmp_path / "c", ["a"])
    meta = json.loads((cache / "meta.json").read_text())
    (cache / "meta.json").write_text(json.dumps(dict(meta, **{key: value})))
    with pytest.raises(DataError, match=rf"c/meta\.json: {key}={value!r} must be a positive integer"):
        FeatureCache(cache)


def test_a_tensor_of_other_tokens_width_or_kind_than_the_cache_says_is_refused_naming_it(tmp_path):
    """Each tensor is checked as it is read, naming the cache, shard and id: a grid of another token count than
    meta.json's, one of booleans or complex numbers (integers pass), and, where meta.json records no width (copied
    precomputed features), one of another width than the model takes."""
    from safetensors.torch import save_file

    from vlscale.data.real import DataError

    cache = _tiny_cache(tmp_path / "c", ["a"], shape=(4, 8))
    save_file({"a": torch.ones(3, 8), "b": torch.ones(4, 8, dtype=torch.bool),
               "i": torch.full((4, 8), -3, dtype=torch.int8), "z": torch.ones(4, 8, dtype=torch.complex64)},
              str(cache / "shard_00000.safetensors"))
    (cache / "index.json").write_text(json.dumps(dict.fromkeys("abiz", "shard_00000.safetensors")))
    with pytest.raises(DataError, match=r"feature cache .*c: the features of id 'a' in shard .*shard_00000\.safetensors "
                                        r"has 3 tokens, but meta\.json says tokens=4"):
        FeatureCache(cache)["a"]
    with pytest.raises(DataError, match=r"id 'b' in shard .* has dtype torch\.bool, expected real numbers"):
        FeatureCache(cache)["b"]
    with pytest.raises(DataError, match=r"id 'z' in shard .* has dtype torch\.complex64, expected real numbers"):
        FeatureCache(cache)["z"]  # float() would drop the imaginary part
    assert torch.equal(FeatureCache(cache)["i"], torch.full((4, 8), -3.0))  # integers are real numbers (quantised)
    meta = json.loads((cache / "meta.json").read_text())
    (cache / "meta.json").write_text(json.dumps(dict(meta, dim=None, tokens=None)))
    assert FeatureCache(cache, expect_dim=8)["a"].shape == (3, 8)
    with pytest.raises(DataError, match=r"id 'a' in shard .* is 8-d, but model\.vision='tiny-clip-rn' takes 16-d"):
        FeatureCache(cache, expect_dim=16)["a"]


def test_a_writer_refuses_what_it_cannot_store_and_leaves_a_readable_cache_at_each_shard(tmp_path):
    """FeatureWriter: a dtype it cannot store is refused at once (not a KeyError at the first feature), a grid of
    another width or token count than those the cache holds is refused naming the key (video frames vary in
    number), and each shard written leaves meta.json and index.json naming it, so an extraction killed before
    close() is a valid cache up to its last shard."""
    base = {"vision": VISION, "pretrained": None, "kind": "grid", "dtype": "float32"}
    with pytest.raises(ValueError, match=r"feature dtype 'bfloat16' is not one of \['float32', 'float16'\]"):
        FeatureWriter(tmp_path / "b", dict(base, dtype="bfloat16"))
    w = FeatureWriter(tmp_path / "c", base, shard_size=1)
    try:
        w.add("a", torch.ones(4, 8))
        assert FeatureCache(tmp_path / "c", vision=VISION, expect_kind="grid").ids() == ["a"]  # not closed yet
        with pytest.raises(ValueError, match=r"features for 'b': dim=6, the cache holds dim=8"):
            w.add("b", torch.ones(4, 6))
        with pytest.raises(ValueError, match=r"features for 'b': tokens=5, the cache holds tokens=4"):
            w.add("b", torch.ones(5, 8))
    finally:
        w.close()
    frames = _tiny_cache(tmp_path / "v", ["v1"], kind="frames", shape=(3, 8))
    _tiny_cache(frames, ["v2"], kind="frames", shape=(5, 8))
    assert FeatureCache(frames)["v2"].shape == (5, 8)


def test_a_writer_refuses_a_feature_tensor_that_is_not_a_matrix_naming_its_id(tmp_path):
    """A (1, T, D) grid (a batch dimension left on) or a flat vector is refused as it is added, naming the id and
    the shape; it was written, its shape[1] recorded as the cache's width, and refused only when training read it."""
    w = FeatureWriter(tmp_path / "c", {"vision": VISION, "pretrained": None, "kind": "grid", "dtype": "float32"})
    try:
        with pytest.raises(ValueError, match=r"features for 'a' must be 2-d \(T, D\) or \(F, E\), got \(1, 4, 8\)"):
            w.add("a", torch.ones(1, 4, 8))
        with pytest.raises(ValueError, match=r"features for 'b' must be 2-d .*got \(8,\)"):
            w.add("b", torch.ones(8))
        w.add("c", torch.ones(4, 8))
    finally:
        w.close()
    cache = FeatureCache(tmp_path / "c", vision=VISION)
    assert cache.ids() == ["c"] and (cache.meta["tokens"], cache.meta["dim"]) == (4, 8)


def test_a_cache_is_continued_only_with_the_pretrained_weights_it_names(tmp_path):
    """A cache made with ``pretrained='tag1'`` is not extended with features of ``tag2`` (of another CLIP
    checkpoint): the writer is refused naming the cache's meta.json and both, and the cache is left as it was."""
    from vlscale.data.real import DataError

    cache = _tiny_cache(tmp_path / "c", ["a"], {"pretrained": "tag1"})
    with pytest.raises(DataError, match=r"c/meta\.json was made with different settings \(key: \(cached, now\)\) "
                                        r"\{'pretrained': \('tag1', 'tag2'\)\}"):
        FeatureWriter(cache, {"vision": VISION, "pretrained": "tag2", "kind": "grid", "dtype": "float32"})
    assert FeatureCache(cache, vision=VISION, pretrained="tag1").ids() == ["a"]


def test_a_cache_is_continued_with_its_weights_file_elsewhere_as_it_is_read(tmp_path):
    """The writer compares ``pretrained`` as the reader does: a checkpoint moved (same file name) continues the cache
    (its fingerprint, where recorded, is what decides: ``_check_weights``); another file name is refused."""
    from vlscale.data.real import DataError

    made = _tiny_cache(tmp_path / "c", ["a"], {"pretrained": "/made/here/clip.pt"})
    _tiny_cache(made, ["b"], {"pretrained": str(tmp_path / "moved" / "clip.pt")})
    assert FeatureCache(made, vision=VISION, pretrained="/made/here/clip.pt").ids() == ["a", "b"]
    with pytest.raises(DataError, match=r"\{'pretrained': \('/made/here/clip\.pt', '/made/here/other\.pt'\)\}"):
        _tiny_cache(made, ["c"], {"pretrained": "/made/here/other.pt"})


@pytest.mark.parametrize("name, what", [("meta.json", "what model made the features"),
                                        ("index.json", "which shard holds each id")])
def test_a_folder_without_meta_json_or_index_json_is_no_cache_naming_the_file_missing(tmp_path, name, what):
    """data.feature_cache pointing at a folder that is not a cache (or one whose extraction never wrote a shard)
    is a DataFileNotFound naming the folder and the file it lacks and how to make one, not a bare
    FileNotFoundError."""
    from vlscale.data.real import DataFileNotFound

    cache = _tiny_cache(tmp_path / "c", ["a"])
    (cache / name).unlink()
    with pytest.raises(DataFileNotFound, match=rf"^feature cache {tmp_path / 'c'}: {name} is missing \({what}\); "
                                               r"make the cache with launchers/extract_features\.py$"):
        FeatureCache(cache, vision=VISION)


def test_what_a_cache_trained_run_records_of_its_caches_weights(tmp_path, capsys):
    """cache_weights: the folder, pretrained and fingerprint of data.feature_cache, the fingerprint checked as
    the cache's reader checks it (a malformed one is refused naming meta.json, not carried into the run's record);
    cache_changed of a run that recorded no fingerprint compares nothing and says nothing, even where the cache
    records none either (its note is for a run whose cache had one)."""
    from vlscale.data.features import cache_changed, cache_weights
    from vlscale.data.real import DataError

    fp = {"visual.w": [2.0, 1.0]}
    cache = _tiny_cache(tmp_path / "c", ["a"], {"pretrained": "p.pt", "fingerprint": fp})
    cfg = load_config("tiny", ["model.feature_source=cache", f"data.feature_cache={cache}"])
    assert cache_weights(cfg) == {"folder": str(cache), "pretrained": "p.pt", "fingerprint": fp}
    meta = json.loads((cache / "meta.json").read_text())
    (cache / "meta.json").write_text(json.dumps(dict(meta, fingerprint={"visual.w": [2.0]})))
    with pytest.raises(DataError, match=rf"^feature cache {cache / 'meta.json'}: fingerprint is not a fingerprint "
                                        r"of CLIP weights"):
        cache_weights(cfg)
    unset = _tiny_cache(tmp_path / "u", ["a"])
    cfg = load_config("tiny", ["model.feature_source=cache", f"data.feature_cache={unset}"])
    capsys.readouterr()
    assert cache_changed(cfg, {"folder": "/then", "pretrained": None, "fingerprint": None}, "fix it",
                         who="vlscale: resume") is None
    assert capsys.readouterr().err == ""


def test_a_clip_built_now_is_compared_with_the_caches_fingerprint_and_a_difference_named():
    """cache_encoder_problem (training's start-up check and the Predictor's): weights whose fingerprint is the cache's
    give None; other weights give one line naming model.vision_pretrained, the CLIP model, the cache as the caller
    names it, the cache's pretrained, the parameter that differs with its sums now and in the cache, and the fix."""
    from vlscale.data.features import cache_encoder_problem
    from vlscale.engine.checkpoint import frozen_fingerprint

    torch.manual_seed(0)
    encoder = torch.nn.Linear(3, 2).requires_grad_(False)
    cache = {"folder": "/c", "pretrained": "made.pt", "fingerprint": frozen_fingerprint(encoder)}
    cfg = load_config("tiny", ["model.vision_pretrained=now.pt"])
    named = "data.feature_cache='/c' was extracted with"
    assert cache_encoder_problem(encoder, cfg, cache, named, "fix it") is None
    with torch.no_grad():
        encoder.bias.mul_(2)
    now, then = frozen_fingerprint(encoder)["bias"], cache["fingerprint"]["bias"]
    assert now[0] == pytest.approx(4 * then[0]) and now[1] == pytest.approx(2 * then[1])
    assert cache_encoder_problem(encoder, cfg, cache, named, "fix it") == (
        f"model.vision_pretrained='now.pt' gives other {VISION} weights than data.feature_cache='/c' was extracted "
        f"with (pretrained='made.pt'): bias differs (sum of squares {now[0]:.10g} now, {then[0]:.10g} in the cache; "
        f"sum of |w| {now[1]:.10g} vs {then[1]:.10g}); fix it")


@pytest.mark.parametrize("name", ["meta.json", "index.json"])
def test_a_cache_file_that_is_not_json_is_refused_naming_it(tmp_path, name):
    """A meta.json or index.json cut short (a full disk, a copy interrupted) is a DataError naming the file, to
    read the cache and to extend it, not json's bare 'Expecting value: line 1 column 1'."""
    from vlscale.data.real import DataError

    cache = _tiny_cache(tmp_path / "c", ["a"])
    text = (cache / name).read_text()
    (cache / name).write_text(text[: len(text) // 2])
    with pytest.raises(DataError, match=rf"^feature cache {tmp_path / 'c' / name}: not valid JSON \("):
        FeatureCache(cache, vision=VISION)
    with pytest.raises(DataError, match=rf"^feature cache {tmp_path / 'c' / name}: not valid JSON \("):
        FeatureWriter(cache, {"vision": VISION, "pretrained": None, "kind": "grid", "dtype": "float32"})


def test_hf_rows_are_checked_against_row_ids_only_and_recorded_when_a_cache_first_takes_rows(tmp_path):
    """A cache of named images (no ``<split>/<row>`` ids) serves a run on any HF dataset: its ids name the images.
    Extending it with one dataset's rows records that dataset, so another's rows are then refused; extending it
    with named images again leaves that record as it is."""
    from vlscale.data.real import DataError

    named = _tiny_cache(tmp_path / "n", ["COCO_1"])
    assert len(FeatureCache(named, hf_rows="ds_a")) == 1
    _tiny_cache(named, ["train/0"], {"hf_rows": "ds_a"})
    assert json.loads((named / "meta.json").read_text())["hf_rows"] == "ds_a"
    with pytest.raises(DataError, match=r"holds rows of the HF dataset 'ds_a', but the run reads the rows of "
                                        r"data\.hf_dataset='ds_b'"):
        FeatureCache(named, hf_rows="ds_b")
    _tiny_cache(named, ["COCO_2"])
    assert json.loads((named / "meta.json").read_text())["hf_rows"] == "ds_a"
    assert sorted(FeatureCache(named, hf_rows="ds_a").ids()) == ["COCO_1", "COCO_2", "train/0"]


def test_feature_meta_records_the_encoders_geometry():
    """meta.json of an image cache: the grid's side, its token count (side squared), the image size; of a video
    cache: per-frame embeddings, no grid, no token count, no image size where the encoder has none."""
    from vlscale.data.features import feature_meta

    assert feature_meta("RN50", "openai", video=False, dtype="float16", image_size=224, grid_side=7, dim=2048) == {
        "vision": "RN50", "pretrained": "openai", "kind": "grid", "dtype": "float16", "image_size": 224,
        "grid_shape": [7, 7], "dim": 2048, "tokens": 49, "synthetic": None}
    fp = {"visual.w": [2.0, 1.0]}
    assert feature_meta("RN50", None, video=True, dtype="float32", image_size=0, grid_side=7, dim=1024,
                        synthetic={"seed": 1}, fingerprint=fp) == {
        "vision": "RN50", "pretrained": None, "kind": "frames", "dtype": "float32", "image_size": None,
        "grid_shape": None, "dim": 1024, "tokens": None, "synthetic": {"seed": 1}, "fingerprint": fp}


@pytest.mark.parametrize("fingerprint", [{"w": [2.0, 1.0, 0.5]}, [[2.0, 1.0]], {"w": [2.0, "1"]}])
def test_a_malformed_fingerprint_in_meta_json_is_refused_naming_it(tmp_path, fingerprint):
    from vlscale.data.features import cache_fingerprint
    from vlscale.data.real import DataError

    with pytest.raises(DataError, match=r"feature cache m\.json: fingerprint is not a fingerprint of CLIP weights"):
        cache_fingerprint({"fingerprint": fingerprint}, "m.json")
    assert cache_fingerprint({"fingerprint": {"w": [2.0, 1]}}, "m.json") == {"w": [2.0, 1]}


def test_cache_changed_compares_fingerprints_and_notes_a_cache_without_one(tmp_path, capsys):
    """Resume / evaluation of a cache-trained run: features of other weights at data.feature_cache are named; a cache
    recording no fingerprint is let through with one note from ``who`` (none without ``who``); a run that
    recorded none, or a config that reads no cache, has nothing to compare."""
    from vlscale.data.features import cache_changed

    fp = {"visual.w": [2.0, 1.0]}
    cache = _tiny_cache(tmp_path / "c", ["a"], {"fingerprint": fp})
    cfg = load_config("tiny", ["model.feature_source=cache", f"data.feature_cache={cache}"])
    recorded = {"folder": "/then", "pretrained": "p.pt", "fingerprint": fp}
    assert cache_changed(cfg, recorded, "fix it") is None
    assert cache_changed(cfg, dict(recorded, fingerprint=None), "fix it") is None
    other = dict(recorded, fingerprint={"visual.w": [3.0, 1.0]})
    assert cache_changed(cfg, other, "fix it") == (
        f"data.feature_cache={str(cache)!r} holds features of other {VISION} weights than the cache the run was "
        f"trained on (/then, pretrained='p.pt'): visual.w differs (sum of squares 2 now, 3 in the run's cache; sum of "
        f"|w| 1 vs 1); fix it")
    # a cache of another CLIP model (the audit: evaluate.py named it 'other tiny-clip-rn weights' of a ViT's cache)
    vit = _tiny_cache(tmp_path / "v", ["a"], {"vision": "tiny-clip-vit",
                                              "fingerprint": {"visual.conv1.weight": [1, 1]}})
    assert cache_changed(load_config("tiny", ["model.feature_source=cache", f"data.feature_cache={vit}"]), recorded,
                         "fix it") == (f"data.feature_cache={str(vit)!r} holds features of vision='tiny-clip-vit', but "
                                       f"the run was trained on model.vision='{VISION}' features (/then); fix it")
    images = load_config("tiny", ["model.feature_source=images", f"data.feature_cache={cache}"])
    assert cache_changed(images, other, "fix it", who="vlscale: resume") is None
    unset = _tiny_cache(tmp_path / "u", ["a"])
    cfg = load_config("tiny", ["model.feature_source=cache", f"data.feature_cache={unset}"])
    capsys.readouterr()
    assert cache_changed(cfg, other, "fix it") is None and capsys.readouterr().err == ""
    assert cache_changed(cfg, other, "fix it", who="vlscale: resume") is None
    assert capsys.readouterr().err.startswith(f"vlscale: resume: note: data.feature_cache={str(unset)!r} records no "
                                              f"fingerprint of the CLIP weights")


@pytest.mark.parametrize("argv, words", [
    (["--images", "d", "--vision", VISION, "model.vision=RN50"],
     "config overrides ['model.vision=RN50'] only apply with --synthetic or --real"),
    (["--images", "d", "--vision", VISION, "--config", "tiny"], "--config applies with --synthetic or --real only"),
    (["--real"], "--real needs --config (the preset that trains on the data"),
    (["--hf-dataset", "x", "--vision", VISION], "--hf-dataset needs --image-column"),
    (["--images", "d", "--vision", VISION, "--image-column", "image"], "--image-column applies to --hf-dataset only"),
    (["--images", "d", "--vision", VISION, "--id-column", "name"], "--id-column applies to --hf-dataset only"),
    (["--synthetic", "--skip-bad-records"], "--skip-bad-records applies to --hf-dataset and --images"),
    (["--real", "--config", "tiny", "--skip-bad-records"], "(with --real: data.skip_bad_records=true, as training"),
    (["--synthetic", "--split", "val"], "--split applies to --hf-dataset only (--synthetic extracts every split"),
    (["--synthetic", "--pattern", "{id}.jpg"], "--pattern applies to --images only"),
    (["--images", "d"], "--vision is required (e.g. --vision RN101)"),
    (["--images", "d", "--vision", VISION, "--shard-size", "0"], "--shard-size must be > 0, got 0"),
])
def test_launcher_refuses_flags_that_do_not_go_together(tmp_path, argv, words, capsys):
    """A flag that does not apply to the source given (and would be ignored), or a source without what it needs, is
    a usage error naming the flag, before anything is read or built."""
    import extract_features as launcher

    with pytest.raises(SystemExit) as info:
        launcher.parse_args([*argv, "--out", str(tmp_path / "cache")])
    assert info.value.code == 2 and words in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


def test_launcher_refuses_video_for_image_tasks_and_hf_columns_it_cannot_name(tmp_path):
    """--video over image tasks (--synthetic, --real), --hf-dataset with --video, three image columns, or
    --id-column beside NLVR2's two columns: one line naming the flag, before CLIP is built or a file written."""
    import extract_features as launcher

    out = ["--out", str(tmp_path / "cache"), "--quiet"]
    with pytest.raises(SystemExit, match=r"^--video, but data\.tasks=\['vqa', 'gqa', 'nlvr2', 'caption'\] are image "
                                         r"tasks$"):
        launcher.main(["--synthetic", "--config", "tiny", "--video", *out])
    fixture = ROOT / "tests" / "fixtures" / "real_data"
    with pytest.raises(SystemExit, match=r"DataError: --video, but data\.tasks=\['vqa'\] are image tasks$"):
        launcher.main(["--real", "--config", "tiny", "data.source=real", f"data.root={fixture}", "data.tasks=[vqa]",
                       "--video", *out])
    hf = ["--vision", VISION, "--hf-dataset", str(ROOT / "tests" / "fixtures" / "hf_multi"), *out]
    for more, words in ((["--image-column", "image", "--video"], "--video is not supported with --hf-dataset"),
                        (["--image-column", "a", "b", "c"], "--image-column takes one column, or NLVR2's two"),
                        (["--image-column", "a", "b", "--id-column", "n"], "--id-column applies to one --image-column "
                                                                            "only")):
        with pytest.raises(SystemExit, match=f"^{words}"):
            launcher.main(hf + more)
    assert not (tmp_path / "cache").exists()


def test_launcher_real_reads_the_images_whatever_the_configs_feature_source(tmp_path, weights):
    """--real reads the images training reads without a cache: a config (or an override, e.g. the "Train with:"
    line's own) that sets model.feature_source=cache and a data.feature_cache not made yet extracts the same ids
    as one that does not, and does not read the cache it names."""
    import extract_features as launcher

    fixture = ROOT / "tests" / "fixtures" / "real_data"
    base = ["--real", "--config", "tiny", "data.source=real", f"data.root={fixture}", "data.tasks=[vqa]",
            "--pretrained", weights, "--quiet"]
    assert launcher.main(base + ["--out", str(tmp_path / "plain")]) == 0
    assert launcher.main(base + ["model.feature_source=cache", f"data.feature_cache={tmp_path / 'later'}",
                                 "--out", str(tmp_path / "cache")]) == 0
    assert sorted(FeatureCache(tmp_path / "cache").ids()) == sorted(FeatureCache(tmp_path / "plain").ids())
    assert not (tmp_path / "later").exists()


def test_the_train_with_line_names_the_clip_only_where_the_config_does_not(tmp_path, monkeypatch):
    """After --synthetic / --real the line is the training command with the config's own overrides, less the two the
    cache replaces (model.feature_source, data.feature_cache: a stale one would point the run at another cache),
    plus model.vision / model.vision_pretrained only where the features are of another CLIP than the config's."""
    import shlex

    import extract_features as launcher

    args = launcher.parse_args(["--synthetic", "--config", "tiny", "train.seed=3", "model.feature_source=images",
                                "data.feature_cache=/old/cache", "--out", str(tmp_path / "cache")])
    cfg = load_config("tiny", args.overrides)
    tail = ["model.feature_source=cache", f"data.feature_cache={tmp_path / 'cache'}"]
    head = ["python", "launchers/train.py", "--config", "tiny", "train.seed=3"]
    assert shlex.split(launcher.train_with(args, cfg, cfg.model.vision, cfg.model.vision_pretrained)) == head + tail
    assert shlex.split(launcher.train_with(args, cfg, "tiny-clip-vit", "w.pt")) == head + [
        "model.vision=tiny-clip-vit", "model.vision_pretrained=w.pt", *tail]
    # launched from another folder: the training command names train.py as it can be run from there
    train = Path(launcher.__file__).resolve().parent / "train.py"
    monkeypatch.chdir(tmp_path)
    assert shlex.split(launcher.train_with(args, cfg, cfg.model.vision, cfg.model.vision_pretrained))[:2] == [
        "python", str(train)]


def test_launcher_fp16_stores_half_precision_features(tmp_path, weights):
    """--fp16 stores the features in fp16 (half the disk), recorded in meta.json; they read back as fp32."""
    import extract_features as launcher

    _save_images(tmp_path / "imgs", ["a.png", "b.png"])
    base = ["--images", str(tmp_path / "imgs"), "--vision", VISION, "--pretrained", weights, "--quiet"]
    assert launcher.main(base + ["--out", str(tmp_path / "half"), "--fp16"]) == 0
    assert launcher.main(base + ["--out", str(tmp_path / "full")]) == 0
    half, full = FeatureCache(tmp_path / "half"), FeatureCache(tmp_path / "full")
    assert json.loads((tmp_path / "half" / "meta.json").read_text())["dtype"] == "float16"
    assert json.loads((tmp_path / "full" / "meta.json").read_text())["dtype"] == "float32"
    assert half["a"].dtype == torch.float32
    torch.testing.assert_close(half["a"], full["a"].half().float())


def test_the_extraction_throughput_benchmark_compares_one_thread_with_several(script, capsys):
    """benchmarks/extract_throughput.py on a handful of made JPEGs: both thread counts extract every image, at a
    rate, into equal caches (its figures are BENCHMARKS.md's)."""
    bench = script("benchmarks/extract_throughput.py")
    assert bench.main(["--images", "6", "--rounds", "2", "--workers", "3", "--batch-size", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["features_equal"] is True and result["workers"] == 3 and result["images"] == 6
    assert set(result["images_per_s"]) == {"1", "3"} and all(
        len(rates) == 2 and all(r > 0 for r in rates) for rates in result["images_per_s"].values())
