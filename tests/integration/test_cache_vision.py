"""A cache-trained run (model.feature_source=cache) records model.vision_pretrained as the CLIP its adapter's images
are encoded with; nothing compared it with the weights its data.feature_cache was extracted with until the
Predictor, after training. Now checked at start-up where the weights build offline: another file is refused in
one line naming model.vision_pretrained and the cache, before the model is built; the same weights moved train."""

import pytest
import torch

from vlscale.config import ConfigError, load_config
from vlscale.engine import trainer
from vlscale.modeling.vision import build_vision_encoder


@pytest.fixture(scope="module")
def made(h, launcher, tmp_path_factory):
    """A folder with three CLIP checkpoint files, made/ moved/ (the same weights) and other/ (one tensor scaled), and
    features/: a synthetic cache extracted with made/clip.pt, its meta.json naming that file."""
    folder = tmp_path_factory.mktemp("cache_vision")
    weights = {f"visual.{k}": v for k, v in build_vision_encoder("tiny-clip-rn").visual.state_dict().items()}
    first = next(k for k, v in weights.items() if v.is_floating_point())
    changed = dict(weights, **{first: weights[first] * 1.5})
    for name, saved in (("made", weights), ("moved", weights), ("other", changed)):
        (folder / name).mkdir()
        torch.save(saved, folder / name / "clip.pt")
    tiny = [*h.TINY, f"model.vision_pretrained={folder / 'made' / 'clip.pt'}"]
    assert launcher("extract_features").main(["--synthetic", "--quiet", "--out", str(folder / "features"), "--config",
                                              "tiny", *[a for a in tiny if a != "model.feature_source=images"]]) == 0
    return folder, first


def test_a_cache_of_other_clip_weights_than_model_vision_pretrained_is_refused_at_start(h, made, tmp_path):
    """The cache's meta.json names its checkpoint file, compared by file name only: a file of that name elsewhere,
    or replaced in place, trained and recorded other weights."""
    (folder, first), out = made, tmp_path / "run"
    cache = folder / "features"
    uses_cache = [*h.TINY, "model.feature_source=cache", f"data.feature_cache={cache}"]

    other = f"model.vision_pretrained={folder / 'other' / 'clip.pt'}"
    proc = h.launch(["--config", "tiny", *uses_cache, other, "train.max_steps=1", f"output_dir={out}"], check=False)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout, proc.stdout[-3000:]
    assert (f"vlscale: rank 0: ConfigError: model.vision_pretrained={str(folder / 'other' / 'clip.pt')!r} gives "
            f"other tiny-clip-rn weights than data.feature_cache={str(cache)!r} was extracted with (pretrained="
            f"{str(folder / 'made' / 'clip.pt')!r}): {first} differs") in proc.stdout
    assert proc.stdout.count("model.vision_pretrained=") == 1  # one line
    assert not (out / "train_log.jsonl").exists()

    trainer.check_cache_vision(load_config("tiny", [*uses_cache, f"model.vision_pretrained={folder}/moved/clip.pt"]))
    with pytest.raises(ConfigError, match="gives other tiny-clip-rn weights"):
        trainer.check_cache_vision(load_config("tiny", [*uses_cache, other]))


def test_a_run_records_its_caches_weights_where_model_vision_pretrained_is_not_built_to_compare(h, made, tmp_path):
    """The start-up check builds only weights it can build offline; where model.vision_pretrained is an open_clip tag
    it compares nothing, and the run must still record the cache's fingerprint in its checkpoint and adapter (what
    --resume and the Predictor compare with): a run that recorded none would leave its CLIP unchecked there."""
    import json
    import shutil

    cache, out = tmp_path / "features", tmp_path / "run"
    shutil.copytree(made[0] / "features", cache)
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["fingerprint"]
    (cache / "meta.json").write_text(json.dumps(dict(meta, pretrained="openai")))  # as made with the tag's weights
    h.launch(["--config", "tiny", *h.TINY, "model.feature_source=cache", f"data.feature_cache={cache}",
              "model.vision_pretrained=openai", "train.max_steps=1", f"output_dir={out}"])
    recorded = {"folder": str(cache), "pretrained": "openai", "fingerprint": meta["fingerprint"]}
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["feature_cache"] == recorded
    assert json.loads((out / "checkpoints" / "step1" / "client_state_rank0.json").read_text())["feature_cache"] == \
        recorded


def test_another_open_clip_tag_than_the_caches_is_refused_by_name(h, made, tmp_path):
    """An open_clip tag is not built at start-up (it may need the network); two tags of one model name two sets of
    weights, so a run naming another tag than its cache's is refused from the names alone. The cache's own tag, a tag
    beside a cache made from a file, and a name open_clip does not know as a tag of the model, are not refused."""
    import json
    import shutil

    cache = tmp_path / "features"
    shutil.copytree(made[0] / "features", cache)
    meta = json.loads((cache / "meta.json").read_text())
    (cache / "meta.json").write_text(json.dumps(dict(meta, pretrained="openai")))
    uses_cache = [*h.TINY, "model.feature_source=cache", f"data.feature_cache={cache}", "model.vision=RN50"]
    with pytest.raises(ConfigError) as e:
        trainer.check_cache_vision(load_config("tiny", [*uses_cache, "model.vision_pretrained=yfcc15m"]))
    assert str(e.value) == (
        f"model.vision_pretrained='yfcc15m' names other RN50 weights than data.feature_cache={str(cache)!r} was "
        "extracted with (pretrained='openai'): the run would record CLIP weights its adapter never saw features of: "
        "set model.vision_pretrained='openai', or extract a cache with 'yfcc15m' (launchers/extract_features.py)")
    for same in ("openai", "not-a-tag"):
        assert trainer.check_cache_vision(load_config("tiny", [*uses_cache, f"model.vision_pretrained={same}"]))
    (cache / "meta.json").write_text(json.dumps(dict(meta, pretrained="/elsewhere/rn50.pt")))
    assert trainer.check_cache_vision(load_config("tiny", [*uses_cache, "model.vision_pretrained=yfcc15m"]))


def test_a_cache_trained_vit_with_a_tag_of_another_activation_is_refused(h, tmp_path):
    """A cache-trained run builds no tower for an open_clip tag, so the check a build makes (a ViT whose MLP activation
    is not its tag's weights': ViT-L-14 with 'openai' builds GELU, the weights were trained with QuickGELU) is made at
    start-up, with or without a fingerprint in the cache, naming the cache to extract again. The -quickgelu name
    passes, and so does a ResNet (no such activation)."""
    import json

    cache = tmp_path / "features"
    cache.mkdir()
    uses_cache = [*h.TINY, "model.feature_source=cache", f"data.feature_cache={cache}",
                  "model.vision_pretrained=openai"]
    for vision in ("ViT-L-14", "ViT-L-14-quickgelu", "RN101"):
        (cache / "meta.json").write_text(json.dumps({"vision": vision, "pretrained": "openai"}))
        cfg = load_config("tiny", [*uses_cache, f"model.vision={vision}"])
        if vision != "ViT-L-14":
            assert trainer.check_cache_vision(cfg) == {"folder": str(cache), "pretrained": "openai",
                                                       "fingerprint": None}
            continue
        with pytest.raises(ConfigError) as e:
            trainer.check_cache_vision(cfg)
        assert str(e.value) == (
            "model.vision='ViT-L-14' with model.vision_pretrained='openai': those weights were trained with "
            "QuickGELU, but ViT-L-14's open_clip config builds GELU, and every layer's features would be off; give "
            "model.vision=ViT-L-14-quickgelu (open_clip's name for the same tower with QuickGELU); "
            f"data.feature_cache={str(cache)!r} holds features made by the tower named: extract them with the name "
            "given (launchers/extract_features.py)")
