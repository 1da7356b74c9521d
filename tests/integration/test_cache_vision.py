"""A cache-trained run (model.feature_source=cache) records model.vision_pretrained as the CLIP its adapter's images
are encoded with; nothing compared it with the weights its data.feature_cache was extracted with until the
Predictor, after training. Now checked at start-up where the weights build offline: another file is refused in
one line naming model.vision_pretrained and the cache, before the model is built; the same weights moved train."""

import pytest
import torch

from vlscale.config import ConfigError, load_config
from vlscale.engine import trainer
from vlscale.modeling.vision import build_vision_encoder


def test_a_cache_of_other_clip_weights_than_model_vision_pretrained_is_refused_at_start(h, launcher, tmp_path):
    """The cache's meta.json names its checkpoint file, compared by file name only: a file of that name elsewhere,
    or replaced in place, trained and recorded other weights."""
    cache, out = tmp_path / "features", tmp_path / "run"
    weights = {f"visual.{k}": v for k, v in build_vision_encoder("tiny-clip-rn").visual.state_dict().items()}
    first = next(k for k, v in weights.items() if v.is_floating_point())
    changed = dict(weights, **{first: weights[first] * 1.5})
    for folder, saved in (("made", weights), ("moved", weights), ("other", changed)):
        (tmp_path / folder).mkdir()
        torch.save(saved, tmp_path / folder / "clip.pt")
    tiny = [*h.TINY, f"model.vision_pretrained={tmp_path / 'made' / 'clip.pt'}"]
    assert launcher("extract_features").main(["--synthetic", "--quiet", "--out", str(cache), "--config", "tiny",
                                              *[a for a in tiny if a != "model.feature_source=images"]]) == 0
    uses_cache = [*h.TINY, "model.feature_source=cache", f"data.feature_cache={cache}"]

    other = f"model.vision_pretrained={tmp_path / 'other' / 'clip.pt'}"
    proc = h.launch(["--config", "tiny", *uses_cache, other, "train.max_steps=1", f"output_dir={out}"], check=False)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout, proc.stdout[-3000:]
    assert (f"vlscale: rank 0: ConfigError: model.vision_pretrained={str(tmp_path / 'other' / 'clip.pt')!r} gives "
            f"other tiny-clip-rn weights than data.feature_cache={str(cache)!r} was extracted with (pretrained="
            f"{str(tmp_path / 'made' / 'clip.pt')!r}): {first} differs") in proc.stdout
    assert proc.stdout.count("model.vision_pretrained=") == 1  # one line
    assert not (out / "train_log.jsonl").exists()

    trainer.check_cache_vision(load_config("tiny", [*uses_cache, f"model.vision_pretrained={tmp_path}/moved/clip.pt"]))
    with pytest.raises(ConfigError, match="gives other tiny-clip-rn weights"):
        trainer.check_cache_vision(load_config("tiny", [*uses_cache, other]))
