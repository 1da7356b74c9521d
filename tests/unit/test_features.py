"""Collation, visual sources, and the feature cache (cached features == features computed on the fly)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vlscale.config import load_config
from vlscale.data import build_tokenizer, build_train_loader, build_visual_source, load_examples
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
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "missing")


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


def test_cache_roundtrip_resume_and_atomic_shards(encoder, tmp_path):
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
    stats = extract_features(enc, tf, SyntheticImages(split.visuals), ids, out, vision=VISION, batch_size=3,
                             shard_size=2, progress=False)
    assert stats == {"total": 10, "skipped": 6, "written": 4}
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
    extract_features(enc, tf, SyntheticImages(split.visuals), ids, tmp_path / "v", vision=VISION, video=True,
                     batch_size=10, progress=False)
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
