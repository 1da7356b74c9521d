"""data.temperature without temperature sampling, and seeds numpy cannot take: one ConfigError line naming the
key and what to set, when the config loads (before: the temperature was silently ignored, and a negative or
>= 2**32 seed failed in numpy's seeding once the run had started)."""

import numpy as np
import pytest

from vlscale.config import ConfigError, config_from_dict, load_config
from vlscale.data.multitask import MultitaskSampler
from vlscale.data.synthetic import generate_split
from vlscale.engine.trainer import seed_everything


@pytest.mark.parametrize("temperature", ["2", "0.5"])
def test_a_temperature_with_proportional_sampling_is_refused(temperature, tmp_path):
    T = float(temperature)
    message = (rf"^data\.temperature={T!r} is ignored with data\.sampling='proportional' \(tasks drawn in proportion "
               r"to their size\); set data\.sampling=temperature to sample with p ~ n\^\(1/T\), or leave "
               r"data\.temperature at 1\.0$")
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [f"data.temperature={temperature}"])
    preset = tmp_path / "mine.yaml"  # a preset file, and a run's saved settings (evaluate.py, --resume)
    preset.write_text(f"base: tiny\ndata:\n  temperature: {temperature}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(str(preset))
    saved = load_config("tiny").to_dict()
    saved["data"]["temperature"] = T
    with pytest.raises(ConfigError, match=message):
        config_from_dict(saved)
    cfg = load_config(str(preset), ["data.sampling=temperature"])
    assert (cfg.data.sampling, cfg.data.temperature) == ("temperature", T)


def test_the_default_temperature_stays_accepted_with_either_sampling():
    assert load_config("tiny", ["data.temperature=1"]).data.sampling == "proportional"
    assert load_config("tiny", ["data.sampling=temperature"]).data.temperature == 1.0


@pytest.mark.parametrize("key", ["train.seed", "data.synthetic_seed"])
@pytest.mark.parametrize("value", ["-1", str(2**32), str(2**64)])
def test_a_seed_numpy_cannot_take_is_refused(key, value):
    with pytest.raises(ConfigError, match=rf"^{key}={value} is not a seed numpy takes; set an integer from 0 to "
                                          rf"4294967295 \(2\*\*32 - 1\), e.g\. {key}=0$"):
        load_config("tiny", [f"{key}={value}"])
    with pytest.raises(ConfigError, match=rf"^{key}=1\.5 must be an integer$"):
        load_config("tiny", [f"{key}=1.5"])


def test_the_seed_range_is_what_the_run_seeds_with():
    """Both ends of the range load and seed what the run seeds; one past either end is what numpy refuses."""
    for seed in (0, 2**32 - 1):
        cfg = load_config("tiny", [f"train.seed={seed}", f"data.synthetic_seed={seed}"])
        assert (cfg.train.seed, cfg.data.synthetic_seed) == (seed, seed)
        seed_everything(cfg.train.seed)
        MultitaskSampler({"vqa": 5, "gqa": 3}, 2, seed=cfg.train.seed).step(3)
        assert len(generate_split("vqa", "train", 2, cfg.data.synthetic_seed, image_size=16).examples) == 2
    for seed in (-1, 2**32):
        with pytest.raises(ValueError):
            np.random.seed(seed)
