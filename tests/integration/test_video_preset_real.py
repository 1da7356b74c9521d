"""The full-scale video preset ``paper/video_clip_bart_single_adapter`` (TVQA, How2QA, TVC, YC2C on CLIP ViT-B/32
frame features + BART) on real-format data, as a researcher runs it from README and docs/datasets.md: the
feature cache made with ``launchers/extract_features.py --real`` from the VALUE layout (precomputed frame
features copied as they are, frame images encoded), training on the shipped miniature BART from that cache, a
resume, and ``launchers/evaluate.py`` decoding training's own final predictions for every video task. The frame
features keep the preset's ViT-B/32 width (512), so ``model.vision`` stays the preset's; only the language model
and the lengths are the miniature's.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path

import pytest
import torch

from vlscale.config import load_config
from vlscale.data import build_tokenizer, build_train_loader, load_examples
from vlscale.data.features import FeatureCache
from vlscale.data.real import DataError, RecordError
from vlscale.data.video import VideoFeatureFolder

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "real_data"
PRESET = "paper/video_clip_bart_single_adapter"
TASKS = ("tvqa", "how2qa", "tvc", "yc2c")
# mini-bart has 128 positions: 2 frames + 100 text tokens. The fixtures' videos have 3-4 frames, so the
# run subsamples them (the frames every source must agree on).
MINI = ["model.backbone=mini-bart", "model.max_frames=2", "data.max_input_length=100"]
# The tests' micro-batch of 2 on the fixture's few videos is the whole step: without the preset's global batch of 50
# (train.global_batch_size), which would accumulate 25 micro-batches a step.
SMALL_BATCH = ["train.micro_batch_size=2", "train.global_batch_size=null"]


def release_layout(root: Path) -> Path:
    """The fixture's four video tasks as the VALUE release lays them out (docs/datasets.md): annotations,
    subtitles (yc2c has none: loaded with a warning) and ``features/<vid_name>.npy`` / ``.safetensors``."""
    for task in TASKS:
        shutil.copytree(FIXTURE / task, root / task)
    return root


@pytest.fixture(scope="module")
def real(tmp_path_factory, launcher):
    """(data root, feature cache) made as docs/datasets.md says, with the preset's own CLIP settings
    (ViT-B-32-quickgelu, openai): the features are precomputed, so no CLIP may be built (its weights are not on this
    machine)."""
    root = release_layout(tmp_path_factory.mktemp("video_real") / "data")
    cache = root / "clip_features" / "ViT-B-32-quickgelu_frames"
    extract = launcher("extract_features")
    built = []
    real_load, extract.load_encoder = extract.load_encoder, lambda *a: built.append(a)
    try:
        assert extract.main(["--real", "--config", PRESET, f"data.root={root}", "--out", str(cache), "--quiet"]) == 0
    finally:
        extract.load_encoder = real_load
    assert built == []
    return root, cache


def preset(root, *more):
    return load_config(PRESET, [f"data.root={root}", *MINI, *more])


def test_extract_real_copies_every_video_the_preset_reads(real):
    """``--real`` with the video preset (refused before: "--real extracts image tasks"): every video any split
    names, under its vid_name, every frame exactly as in its file, with the meta a frame extraction by the
    preset's CLIP writes, so training's cache checks (vision, pretrained, width) pass."""
    root, cache = real
    cfg = preset(root, f"data.feature_cache={cache}")
    wanted = {e.image_ids[0] for t in TASKS for s in ("train", "val", "test") for e in load_examples(cfg, t, s)}
    features = FeatureCache(cache, vision="ViT-B-32-quickgelu", pretrained="openai", expect_kind="frames",
                            expect_dim=512)
    assert set(features.ids()) == wanted
    for vid in wanted:
        task = next(t for t in TASKS if vid in VideoFeatureFolder(root / t / "features"))
        assert torch.equal(features[vid], VideoFeatureFolder(root / task / "features")[vid])  # all frames
    assert {k: features.meta[k] for k in ("vision", "pretrained", "kind", "dim", "synthetic")} == {
        "vision": "ViT-B-32-quickgelu", "pretrained": "openai", "kind": "frames", "dim": 512, "synthetic": None}


def test_extract_real_says_which_task_a_shared_video_is_stored_from(launcher):
    """TVQA and TVC name the same videos: the cache stores each once, from the first task's folder; the other
    task's own files are not read, which --real now says (it did not), and only for videos named twice."""
    cfg = preset(FIXTURE, "data.feature_cache=null")
    jobs, notes = launcher("extract_features").real_jobs(cfg)
    stored_from = {}  # each video asked for once (a second ask counted it twice and "already there" on a new cache)
    for source, ids, _ in jobs:
        assert not set(ids) & set(stored_from), (source.root, sorted(set(ids) & set(stored_from)))
        stored_from.update((i, Path(source.root)) for i in ids)
    shared = [n for n in notes if "stored once" in n]
    assert shared and all(n.startswith("tvc/") and "also named by tvqa" in n and str(FIXTURE / "tvqa" / "features") in n
                          and f"not from {FIXTURE / 'tvc' / 'features'}" in n for n in shared), notes
    tvc = {e.image_ids[0] for e in load_examples(cfg, "tvc", "train")}
    assert f"tvc/train: {len(tvc)} video(s) also named by tvqa" in " ".join(shared)
    assert {stored_from[v] for v in tvc} == {FIXTURE / "tvqa" / "features"}
    # every tvc split names only tvqa's videos: each is said, the later splits' too (not only the first to name them)
    assert sorted(n.split(":", 1)[0] for n in shared) == ["tvc/test", "tvc/train", "tvc/val"], shared


def test_extract_real_encodes_frame_images_as_the_images_video_command(real, tmp_path, launcher, frame_folders):
    """A task laid out as frame images (``root/<task>/frames/<vid_name>/*.jpg``) is encoded by ``--real`` into
    the same features ``--images DIR --video`` gives; a folder of videos of another width is refused."""
    root = tmp_path / "data"
    shutil.copytree(FIXTURE / "yc2c", root / "yc2c", ignore=shutil.ignore_patterns("features"))
    frame_folders(root / "yc2c", {"yc_a": 5, "yc_b": 3}, size=(40, 60))
    extract = launcher("extract_features").main
    vision = ["model.vision=mini-clip-rn", "model.vision_pretrained=synthetic", "data.tasks=[yc2c]"]
    assert extract(["--real", "--config", PRESET, f"data.root={root}", *vision, "--out", str(tmp_path / "a"),
                    "--quiet"]) == 0
    assert extract(["--images", str(root / "yc2c" / "frames"), "--video", "--vision", "mini-clip-rn", "--pretrained",
                    "synthetic", "--out", str(tmp_path / "b"), "--quiet"]) == 0
    a, b = FeatureCache(tmp_path / "a"), FeatureCache(tmp_path / "b")
    assert sorted(a.ids()) == ["yc_a", "yc_b"] and a.meta == b.meta
    assert all(torch.equal(a[v], b[v]) for v in a.ids()) and a["yc_a"].shape == (5, 128)
    # the preset's 512-d release features with a 128-d CLIP: the first file names the mismatch, nothing is written
    with pytest.raises(SystemExit, match=r"DataError: .*tvqa/features/.*\.npy \(video '.*'\): frame features are "
                                         r"512-d, but the run's model.vision embeds frames in 128-d"):
        extract(["--real", "--config", PRESET, f"data.root={real[0]}", *vision[:2], "--out", str(tmp_path / "c")])
    assert not (tmp_path / "c" / "index.json").exists()


def test_the_frames_a_long_video_gives_are_the_same_from_its_file_and_from_the_cache(real):
    """A video of more frames than model.max_frames: the features folder (``features/<vid_name>.npy``, read with
    ``data.feature_cache=null``) and the cache made from it give the same batches. The folder subsampled with
    rounded linspace endpoints (4 frames -> [0, 3]) while the collator takes every other source's frames at the
    segments' centres (-> [1, 3]): the same data trained on other frames depending on where it was read."""
    root, cache = real
    batches = {}
    for name, where in (("folder", "data.feature_cache=null"), ("cache", f"data.feature_cache={cache}")):
        cfg = preset(root, where, *SMALL_BATCH, "train.max_steps=6")
        loader = build_train_loader(cfg, build_tokenizer(cfg))
        batches[name] = [next(loader) for _ in range(6)]
    assert any(b["vis_mask"].sum() < 2 * 4 for b in batches["cache"])  # 4-frame videos were cut to 2
    for a, b in zip(batches["folder"], batches["cache"], strict=True):
        assert a["uids"] == b["uids"]
        assert torch.equal(a["vis_mask"], b["vis_mask"]) and torch.equal(a["vis_feats"], b["vis_feats"])


@pytest.fixture(scope="module")
def runs(real, tmp_path_factory, h):
    """The preset (bf16, its reference objective) from the cache on 1 process, 3 steps: whole, and stopped after
    step 1 then resumed. (On 2 ranks under ZeRO-3 and with ``evaluate.py --deepspeed`` the same commands were run
    by hand; the suite's sharded runs are test_engine.py's and test_evaluate_sharded.py's.)"""
    root, cache = real
    out = tmp_path_factory.mktemp("video_runs")
    args = ["--config", PRESET, f"data.root={root}", f"data.feature_cache={cache}", *MINI, "train.max_steps=3",
            *SMALL_BATCH, "train.zero_stage=0", "train.eval_every=0",
            "train.seed=3"]  # seed 3 draws tvc, how2qa, tvc
    started = [(h.start(args + [f"output_dir={out / name}", *extra], log_path=out / f"{name}.log"),
                out / f"{name}.log", time.monotonic())
               for name, extra in (("whole", []), ("parts", ["--stop-after-steps", "1"]))]  # one core each
    for proc, log, t0 in started:
        h.finish(proc, log, t0)
    h.launch(args + [f"output_dir={out / 'parts'}", "--resume"])
    return out


def test_the_preset_trains_from_the_cache_and_resumes_to_the_same_losses(runs, h):
    whole = h.read_log(runs / "whole")
    assert [r["step"] for r in whole] == [1, 2, 3] and {r["task"] for r in whole} == {"tvc", "how2qa"}
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in whole)
    parts = h.read_log(runs / "parts")
    assert [(r["loss"], r["grad_norm"]) for r in parts] == [(r["loss"], r["grad_norm"]) for r in whole]


def test_evaluate_decodes_trainings_final_predictions_for_every_video_task(runs, tmp_path, launcher):
    """evaluate.py on the run's adapter: the predictions training wrote at its end, byte for byte, for the four
    tasks; the scores docs/datasets.md promises (accuracy; CIDEr, BLEU-4, ROUGE-L), over every val example."""
    assert launcher("evaluate").main(["--adapter", str(runs / "whole" / "adapter"), "--out", str(tmp_path / "p"),
                                      "--no-progress"]) == 0
    for task in TASKS:
        assert ((tmp_path / "p" / "predictions" / f"{task}.jsonl").read_text()
                == (runs / "whole" / "predictions" / f"{task}.jsonl").read_text())
    report = json.loads((tmp_path / "p" / "eval_metrics.json").read_text())
    assert {t: sorted(s) for t, s in report["tasks"].items()} == {
        "tvqa": ["accuracy"], "how2qa": ["accuracy"], "tvc": ["bleu4", "cider", "rouge_l"],
        "yc2c": ["bleu4", "cider", "rouge_l"]}
    assert report["examples"] == {"tvqa": 2, "how2qa": 1, "tvc": 1, "yc2c": 1}


def test_predict_only_writes_the_value_submission_files(runs, tmp_path, launcher, capsys):
    """``--predict-only`` on the test split: the predictions as written, and VALUE's files (How2QA's test is
    ``test_public`` there): QA ids to option indices, one caption line per clip (the formats, in detail:
    tests/unit/test_value_submission.py)."""
    out = tmp_path / "p"
    assert launcher("evaluate").main(["--adapter", str(runs / "whole" / "adapter"), "--split", "test", "--out",
                                      str(out), "--predict-only", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    files = {"tvqa": "tvqa/tvqa_test_predictions.json", "how2qa": "how2qa/how2qa_test_public_predictions.json",
             "tvc": "tvc/tvc_test_predictions.jsonl", "yc2c": "yc2c/yc2c_test_predictions.jsonl"}
    for task, name in files.items():
        predicted = [json.loads(line) for line in (out / "predictions" / f"{task}.jsonl").read_text().splitlines()]
        many = "example" if len(predicted) == 1 else "examples"
        assert f"{task:8s} {len(predicted)} {many}: {out / 'predictions' / (task + '.jsonl')}; " \
               f"{out / 'submission' / name}" in printed
        text = (out / "submission" / name).read_text()
        if task in ("tvqa", "how2qa"):
            assert {k: type(v) for k, v in json.loads(text).items()} == {r["uid"]: int for r in predicted}
        else:
            lines = [json.loads(line) for line in text.splitlines()]
            assert [(str(c["clip_id"]), c["descs"]) for c in lines] == [
                (r["uid"], [{"desc": r["prediction"]}]) for r in predicted]
    assert not (out / "eval_metrics.json").exists()


def loader(data_root, *more):
    cfg = preset(data_root, "data.feature_cache=null", *SMALL_BATCH, *more)
    return build_train_loader(cfg, build_tokenizer(cfg))


def test_plausible_mistakes_are_named_when_the_loader_is_built(real, tmp_path):
    """Before a run's first step, in one line naming the file: features of another CLIP (the release's 512-d files
    with model.vision=mini-clip-rn: was raised at the first batch holding a video, possibly hours in), a missing
    feature file, an answer index out of range."""
    root, _ = real
    with pytest.raises(DataError, match=r"features/.*\.(npy|safetensors) \(video '.*'\): frame features are 512-d, "
                                        r"but the run's model.vision embeds frames in 128-d"):
        loader(root, "model.vision=mini-clip-rn", "model.vision_pretrained=synthetic")

    data = release_layout(tmp_path / "data")
    (data / "tvc" / "features" / "house_s02e03_seg02_clip_05.npy").unlink()
    with pytest.raises(DataError, match=r"tvc/train: 1 visual id\(s\) named by 1 of 3 examples .*"
                                        r"\['house_s02e03_seg02_clip_05'\]; add their files, or set "
                                        r"data.skip_bad_records=true"):
        loader(data)
    shutil.copy(FIXTURE / "tvc" / "features" / "house_s02e03_seg02_clip_05.npy", data / "tvc" / "features")

    lines = (data / "tvqa" / "train.jsonl").read_text().replace('"answer_idx": 3', '"answer_idx": 5')
    (data / "tvqa" / "train.jsonl").write_text(lines)
    with pytest.raises(RecordError, match=r"tvqa/train\.jsonl: line 3 \(id 3\): key 'answer_idx' must be an option "
                                          r"index 0\.\.4, got 5"):
        loader(data)


def test_a_subtitles_file_naming_other_videos_is_said(tmp_path, caplog):
    """A subtitles file whose vid_names are not the annotations' (another naming of the same videos) left every
    input without its subtitles, silently; the loader now says how many examples have none, once per file."""
    data = release_layout(tmp_path / "data")
    subs = data / "how2qa" / "how2_subtitles.jsonl"
    subs.write_text(subs.read_text().replace('"vid_name": "how2_v', '"vid_name": "v'))
    with caplog.at_level(logging.WARNING, logger="vlscale.data"):
        assert next(loader(data, "data.tasks=[how2qa]"))["task"] == "how2qa"
        load_examples(preset(data), "how2qa", "train")
    assert "subtitle:" not in " ".join(e.text for e in load_examples(preset(data), "how2qa", "train"))
    said = [r.getMessage() for r in caplog.records if "has no subtitles for" in r.getMessage()]
    assert [m for m in said if "how2qa_train_release.jsonl" in m] == [
        f"how2qa: 2 of 2 examples of {data / 'how2qa' / 'how2qa_train_release.jsonl'} name a video that {subs} has "
        "no subtitles for (1 video(s), first ['how2_v001']); their inputs carry no subtitle text (check that both "
        "files name videos alike)"]
    # the fixture's own files agree: nothing said
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vlscale.data"):
        load_examples(preset(FIXTURE), "how2qa", "train")
    assert "has no subtitles for" not in caplog.text


def test_where_the_preset_looks_for_frames_is_said_before_the_model_is_built(real, tmp_path):
    """The preset's cache path (relative to the working directory) absent while the tasks' features/ folders
    exist: the message names the way to use them; frame images with model.feature_source=cache (no CLIP
    built): refused when the loader is built (was a traceback at step 1, "the batch holds pixel_values")."""
    from vlscale.data.real import real_visual_source

    root, _ = real
    cfg = preset(root, f"data.feature_cache={tmp_path / 'not_made'}")
    with pytest.raises(DataError, match=r"data.feature_cache=.*not_made is not a folder, and .*tvqa/features holds "
                                        r"precomputed frame features: train from them with data.feature_cache=null, "
                                        r"or copy them into it with launchers/extract_features\.py --real --config "
                                        rf"\.\.\. data\.root=\.\.\. --out {tmp_path / 'not_made'}$"):
        real_visual_source(cfg, "tvqa", "train")
    data = tmp_path / "data"
    shutil.copytree(FIXTURE / "yc2c", data / "yc2c", ignore=shutil.ignore_patterns("features"))
    (data / "yc2c" / "frames" / "yc_a").mkdir(parents=True)
    frames = ["data.feature_cache=null", "data.tasks=[yc2c]"]
    with pytest.raises(DataError, match=r"yc2c: .*frames holds frame images, but model.feature_source=cache builds no "
                                        r"CLIP .* data\.root=\.\.\. --out CACHE\) and set data\.feature_cache=CACHE"):
        real_visual_source(preset(data, *frames), "yc2c", "train")
    assert real_visual_source(preset(data, *frames, "model.feature_source=images"), "yc2c", "train").kind == "images"
