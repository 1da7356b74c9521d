"""The full-scale preset ``paper/clip_bart_single_adapter`` on real-format data, as a researcher runs it
(docs/datasets.md): the feature cache made with ``launchers/extract_features.py --real`` from the
dataset layout (COCO's ``train2014/`` / ``val2014/``, NLVR2's ``train/`` / ``dev/`` / ``test1/``
sub-folders), then training with the preset's objective (``train.loss_reduction=example``,
``data.vqa_targets=sampled``) on the shipped miniature backbones, and a resume.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pytest

from vlscale.config import load_config
from vlscale.data import build_tokenizer, build_train_loader, eval_examples, load_examples
from vlscale.data.features import FeatureCache

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "real_data"
PRESET = "paper/clip_bart_single_adapter"
VISION = ["model.vision=mini-clip-rn", "model.vision_pretrained=synthetic"]
# The tests' micro-batch of 2 on the fixture's few examples is the whole step: without the preset's global batch
# of 500 (train.global_batch_size), which would accumulate 250 micro-batches a step.
SMALL_BATCH = ["train.micro_batch_size=2", "train.global_batch_size=null"]


def downloaded_layout(root: Path) -> Path:
    """The fixture's image tasks laid out as the downloads are: images in their split sub-folders."""
    for name in ("vqa", "gqa", "nlvr2", "coco"):
        shutil.copytree(FIXTURE / name, root / name)
    coco, nlvr2 = root / "coco" / "images", root / "nlvr2" / "images"
    for image in list(coco.iterdir()):
        sub = coco / ("train2014" if "train2014" in image.name else "val2014")
        sub.mkdir(exist_ok=True)
        image.rename(sub / image.name)
    for image in list(nlvr2.iterdir()):
        sub = nlvr2 / {"train": "train", "dev": "dev", "test1": "test1"}[image.name.split("-")[0]]
        sub.mkdir(exist_ok=True)
        image.rename(sub / image.name)
    return root


@pytest.fixture(scope="module")
def real(tmp_path_factory, launcher):
    """(data root, feature cache) made as docs/datasets.md says."""
    root = downloaded_layout(tmp_path_factory.mktemp("paper_real") / "data")
    cache = root / "clip_features" / "mini-clip-rn"
    assert launcher("extract_features").main(["--real", "--config", PRESET, f"data.root={root}", *VISION,
                                              "--out", str(cache), "--quiet"]) == 0
    return root, cache


def preset(root, cache, *more):
    return load_config(PRESET, [f"data.root={root}", f"data.feature_cache={cache}", *VISION,
                                "model.backbone=mini-bart", *more])


def test_extract_real_caches_every_image_the_preset_trains_and_evaluates_on(real):
    root, cache = real
    cfg = preset(root, cache, *SMALL_BATCH)
    assert cfg.model.feature_source == "cache" and cfg.data.tasks == ["vqa", "gqa", "nlvr2", "caption"]
    wanted = {i for t in cfg.data.tasks for s in ("train", "val", "test")
              for e in load_examples(cfg, t, s) for i in e.image_ids}
    features = FeatureCache(cache, vision="mini-clip-rn", pretrained="synthetic")
    assert set(features.ids()) == wanted  # every id training looks up, nothing else
    assert features.meta["synthetic"] is None
    loader = build_train_loader(cfg, build_tokenizer(cfg))  # checks every training id is in the cache
    assert next(loader)["vis_feats"].shape[-1] == features.meta["dim"]
    for task in cfg.data.tasks:
        for split in ("val", "test"):
            eval_examples(cfg, task, split)


def test_extract_real_says_what_it_skips_and_refuses_what_it_cannot_do(real, tmp_path, launcher, capsys):
    root, _ = real
    data = tmp_path / "data"
    shutil.copytree(root / "gqa", data / "gqa")
    (data / "gqa" / "testdev.json").unlink()
    extract = launcher("extract_features").main
    base = ["--real", "--config", PRESET, *VISION, "data.tasks=[gqa]", "--quiet"]
    assert extract(base + [f"data.root={data}", "--out", str(tmp_path / "c1")]) == 0
    out = capsys.readouterr().out
    assert "--real: gqa/test skipped (" in out and "testdev.json" in out
    assert len(FeatureCache(tmp_path / "c1").ids()) == 3
    # a leaderboard's test split (answers withheld, for evaluate.py --predict-only) is extracted like the others
    shutil.copy(root / "gqa" / "testdev.json", data / "gqa" / "testdev.json")
    rows = json.loads((data / "gqa" / "testdev.json").read_text())
    (data / "gqa" / "testdev.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "label"} for r in rows]))
    assert extract(base + [f"data.root={data}", "--out", str(tmp_path / "c0")]) == 0
    assert len(FeatureCache(tmp_path / "c0").ids()) == 4
    (data / "gqa" / "testdev.json").unlink()
    (data / "gqa" / "images" / "2354786.jpg").unlink()  # named by a training record
    with pytest.raises(SystemExit, match=r"^extract_features\.py: DataError: gqa/train: 1 visual id\(s\) .*2354786"):
        extract(base + [f"data.root={data}", "--out", str(tmp_path / "c2")])
    assert extract(base + [f"data.root={data}", "data.skip_bad_records=true", "--out", str(tmp_path / "c2")]) == 0
    assert "2354786" not in FeatureCache(tmp_path / "c2").ids()
    with pytest.raises(SystemExit, match=r"DataError: --real: the config's data.source is 'synthetic'"):
        extract(["--real", "--config", "tiny", "--out", str(tmp_path / "c3")])
    with pytest.raises(SystemExit, match=r"DataError: --real: no videos to extract for data.tasks=\['tvqa'\] .*"
                                         r"tvqa/train skipped"):
        extract(base[:-2] + ["data.tasks=[tvqa]", f"data.root={data}", "--quiet", "--out", str(tmp_path / "c3")])
    with pytest.raises(SystemExit) as info:
        extract(["--real", "--out", str(tmp_path / "c3")])
    assert info.value.code == 2 and "--real needs --config" in capsys.readouterr().err


def test_the_preset_trains_from_that_cache_and_resumes_to_the_same_losses(real, tmp_path, h):
    """The preset's objective (sampled VQA targets, per-example loss) on the cache: finite losses, a VQA
    step among them, and a run stopped after step 1 and resumed logs the uninterrupted run's losses."""
    root, cache = real
    args = ["--config", PRESET, f"data.root={root}", f"data.feature_cache={cache}", *VISION,
            "model.backbone=mini-bart", "train.max_steps=3", *SMALL_BATCH, "train.eval_every=0",
            "train.precision=fp32", "train.zero_stage=0"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    started = [(h.start(args + [f"output_dir={out}", *extra], log_path=tmp_path / f"{out.name}.log"),
                tmp_path / f"{out.name}.log", time.monotonic())
               for out, extra in ((whole, []), (parts, ["--stop-after-steps", "1"]))]  # one core each
    for proc, log, t0 in started:
        h.finish(proc, log, t0)
    h.launch(args + [f"output_dir={parts}", "--resume"])
    log = h.read_log(whole)
    assert [r["step"] for r in log] == [1, 2, 3] and "vqa" in {r["task"] for r in log}
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in log)
    assert h.losses(parts) == h.losses(whole)


def test_sampled_targets_say_when_real_vqa_examples_have_no_soft_label(real, caplog):
    """The preset's data.vqa_targets=sampled needs soft labels: VL-T5's files carry them, an HF dataset's VQA
    rows get them from their human answers (vqa_soft_label), and rows with one answer only would train on it at
    weight 1 without a word: the loader says so for those alone."""
    root, _ = real
    hf = FIXTURE.parent / "hf_multi"
    common = ["data.tasks=[vqa]", "model.feature_source=images", *SMALL_BATCH]
    with caplog.at_level("WARNING", logger="vlscale.data"):
        cfg = preset(root, "", *common)
        build_train_loader(cfg, build_tokenizer(cfg))
        cfg = preset(root, "", *common, f"data.hf_dataset={hf}",
                     "data.hf_columns={image: image, question: question, answers: answers, id: qid}")
        loader = build_train_loader(cfg, build_tokenizer(cfg))
        batch = next(loader)
        assert "no soft 'label'" not in caplog.text
        labels = {e.uid: e.extra["label"] for e in loader.examples["vqa"]}
        assert labels["2"] == {"1": 1.0}  # 7 x "1" and 3 x "one", normalised as the official scorer does
        for uid, target, w in zip(batch["uids"], batch["targets"], batch["loss_weights"].tolist()):
            assert w == labels[uid][target]
        cfg = preset(root, "", *common, f"data.hf_dataset={hf}",
                     "data.hf_columns={image: image, question: question, answer: multiple_choice_answer, id: qid}")
        batch = next(build_train_loader(cfg, build_tokenizer(cfg)))
    assert batch["loss_weights"].tolist() == [1.0, 1.0]
    assert ("data.vqa_targets=sampled: 3 of 3 vqa training examples" in caplog.text
            and "have no soft 'label'" in caplog.text)
