"""Predictor / launchers/predict.py answer a question about image files as the evaluation answers it about the same
example: the synthetic world's val images saved as PNG files, predicted, and compared with the evaluation's
predictions/<task>.jsonl, so files, text and decoding go through one path.

Two adapters: tests/integration/learning_run.py's (the embedded default trained on cached features, whose answers
depend on image and question: the images are encoded on the fly as the cache's were) and a tiny run that encodes
images in its model (the batches compared tensor for tensor: its random model's answers hardly vary).

Video (tvqa, tvc): two 1-step tiny runs on the synthetic world's videos, one encoding frames in its model, one trained
on a cache of frame features (extract_features.py --synthetic); each val video given as a folder of PNG frames (and,
to the cache-trained run, as a .npy file of its cached features) with the question, options and subtitle as a user
types them; the answers are the evaluation's (and the frame run's batches are its, tensor for tensor).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlscale.data.synthetic import synthetic_split
from vlscale.predict import Predictor

TASKS = ("vqa", "gqa", "nlvr2", "caption")


def evaluation_predictions(out: Path, task: str) -> dict[str, str]:
    lines = (out / "predictions" / f"{task}.jsonl").read_text().splitlines()
    return {r["uid"]: r["prediction"] for r in map(json.loads, lines)}


def png_files(split, examples, folder: Path) -> list[list[Path]]:
    """Each example's images written as PNG files (lossless: the same uint8 arrays read back)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for e in examples:
        paths = []
        for i in e.image_ids:
            Image.fromarray(split.visuals[i]).save(folder / f"{i}.png")
            paths.append(folder / f"{i}.png")
        out.append(paths)
    return out


@pytest.fixture(scope="module")
def learned(learning_job):
    out = learning_job.folder / "run"
    return out, Predictor(out / "adapter", device="cpu")


@pytest.mark.parametrize("task", TASKS)
def test_answers_about_png_files_are_the_evaluations(learned, task, tmp_path):
    out, predictor = learned
    assert predictor.model.vision is None and predictor.encoder is not None  # trained on the feature cache
    split = synthetic_split(predictor.cfg, task, "val")
    examples = split.examples  # all 100: a second or two a task
    files = png_files(split, examples, tmp_path)
    expected = evaluation_predictions(out, task)
    answers = predictor.predict(task, [e.text for e in examples], files)
    assert answers == [expected[e.uid] for e in examples]
    assert len(set(answers)) > 1  # the answers depend on the input: a wrong prefix or image would show
    # one at a time, as the command line asks
    assert predictor.predict(task, examples[0].text, files[0] if task == "nlvr2" else files[0][0]) == answers[0]


def test_the_command_line_prints_the_answer(learned, launcher, tmp_path, capsys):
    out, _ = learned
    split = synthetic_split(learned[1].cfg, "nlvr2", "val")
    expected = evaluation_predictions(out, "nlvr2")
    e = next(e for e in split.examples if expected[e.uid] == "true")  # the run says "false" to most
    files = png_files(split, [e], tmp_path)[0]
    args = ["--adapter", str(out / "adapter"), "--task", "nlvr2", "--image", str(files[0]), "--image", str(files[1]),
            "--text", e.text, "--device", "cpu"]
    assert launcher("predict").main(args) == 0
    assert capsys.readouterr().out == "true\n"
    assert launcher("predict").main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"task": "nlvr2", "text": e.text, "images": list(map(str, files)),
                                                   "answer": "true"}


def test_a_run_encoding_images_in_its_model_gets_the_evaluations_batches(h, tmp_path):
    """A model with its CLIP (model.feature_source=images): the batch of the PNG files and texts is the
    evaluation's batch of those examples (token ids, mask, pixels), and so are the answers."""
    from vlscale.data import eval_batches
    from vlscale.engine.evaluation import generation_inputs

    run = tmp_path / "run"
    h.launch(h.TINY + ["data.tasks=[vqa,nlvr2,caption]", "peft.sharing=multiple", "train.micro_batch_size=2",
                       "train.max_steps=1", f"output_dir={run}"])
    predictor = Predictor(run / "adapter", device="cpu")
    assert predictor.model.vision is not None and predictor.encoder is None
    for task in ("vqa", "nlvr2", "caption"):
        split = synthetic_split(predictor.cfg, task, "val")
        examples = split.examples
        files = png_files(split, examples, tmp_path / task)
        mine = generation_inputs(predictor.batch(task, [e.text for e in examples], files))
        theirs = generation_inputs(next(iter(eval_batches(predictor.cfg, predictor.tokenizer, task, "val",
                                                          len(examples), 0, 1))))
        assert mine.keys() == theirs.keys() == {"task", "input_ids", "attention_mask", "pixel_values", "uids",
                                                "targets"}
        for key in ("input_ids", "attention_mask", "pixel_values"):
            assert mine[key].equal(theirs[key]), key
        answers = predictor.predict(task, [e.text for e in examples], files)
        expected = evaluation_predictions(run, task)
        assert answers == [expected[e.uid] for e in examples]
    with pytest.raises(ValueError, match=r"the adapter was not trained on task 'gqa' and has no weights for it; it "
                                         r"was trained on \['vqa', 'nlvr2', 'caption'\]"):
        predictor.predict("gqa", "what color is the circle?", np.zeros((8, 8, 3), np.uint8))


VIDEO_TASKS = ("tvqa", "tvc")


def frame_folders(split, examples, folder: Path) -> list[Path]:
    """Each example's video as a folder of PNG frames named 0.png, 1.png, ... (lossless)."""
    out = []
    for e in examples:
        vid = folder / e.image_ids[0]
        vid.mkdir(parents=True, exist_ok=True)
        for k, frame in enumerate(split.visuals[e.image_ids[0]]):
            Image.fromarray(frame).save(vid / f"{k}.png")
        out.append(vid)
    return out


def user_inputs(examples) -> dict:
    """The question, options and subtitle of each example as a user gives them (not the formatted input)."""
    qa = "candidates" in examples[0].extra
    return {"text": [e.extra["question"] if qa else "" for e in examples],
            "options": [e.extra["candidates"] for e in examples] if qa else None,
            "subtitle": [e.extra["subtitle"] if e.text else "" for e in examples]}


@pytest.fixture(scope="module")
def video_runs(h, launcher, tmp_path_factory):
    """1-step runs on tvqa and tvc: "frames" encodes frames in its model, "cache" was trained on cached features
    (the first trains while the cache is made, then beside the second: one core each)."""
    folder = tmp_path_factory.mktemp("video_predict")
    # 4 training videos a task, not TINY's 64: one step of 2 reads 2 of them, and the extraction encodes every
    # split's frames (a synthetic video does not depend on the split's size); val keeps TINY's 8, which the tests ask
    tiny = [a for a in h.TINY if not a.startswith(("data.tasks=", "data.synthetic_train="))] + [
        "data.tasks=[tvqa,tvc]", "data.synthetic_train=4"]
    cache = folder / "features"
    started = {}

    def start(name, args):
        log = folder / f"{name}.log"
        started[name] = (h.start(args + ["peft.sharing=multiple", "train.micro_batch_size=2", "train.max_steps=1",
                                         f"output_dir={folder / name}"], log_path=log), log, time.monotonic())

    start("frames", tiny)
    assert launcher("extract_features").main(["--synthetic", "--quiet", "--out", str(cache), "--config", "tiny",
                                              *tiny]) == 0
    start("cache", tiny + ["model.feature_source=cache", f"data.feature_cache={cache}"])
    for proc, log, t0 in started.values():
        h.finish(proc, log, t0)
    return {name: (folder / name, Predictor(folder / name / "adapter", device="cpu")) for name in started}


@pytest.mark.parametrize("task", VIDEO_TASKS)
def test_answers_about_frame_folders_are_the_evaluations(video_runs, task, tmp_path):
    """From frame folders and the user's question / options / subtitle: the evaluation's batch (token ids, pixels,
    frame mask) and answers, for a run with its CLIP."""
    from vlscale.data import eval_batches
    from vlscale.engine.evaluation import generation_inputs

    run, predictor = video_runs["frames"]
    assert predictor.model.vision is not None and predictor.encoder is None
    split = synthetic_split(predictor.cfg, task, "val")
    examples = split.examples
    videos, given = frame_folders(split, examples, tmp_path), user_inputs(examples)
    mine = generation_inputs(predictor.batch(task, given["text"], videos, given["options"], given["subtitle"]))
    theirs = generation_inputs(next(iter(eval_batches(predictor.cfg, predictor.tokenizer, task, "val",
                                                      len(examples), 0, 1))))
    assert mine.keys() == theirs.keys() >= {"input_ids", "attention_mask", "pixel_values", "vis_mask"}
    for key in ("input_ids", "attention_mask", "pixel_values", "vis_mask"):
        assert mine[key].equal(theirs[key]), key
    answers = predictor.predict(task, given["text"], videos, options=given["options"], subtitle=given["subtitle"])
    expected = evaluation_predictions(run, task)
    assert answers == [expected[e.uid] for e in examples]
    assert len(set(answers)) > 1  # the answers depend on the input


@pytest.mark.parametrize("task", VIDEO_TASKS)
def test_a_cache_trained_run_answers_frames_and_features_files_as_its_evaluation(video_runs, task, tmp_path):
    """A run trained on cached frame features: frame folders encoded on the fly as the extraction encoded them,
    and the cache's features saved as .npy files, answered as the evaluation answered those examples."""
    from vlscale.data.features import FeatureCache

    run, predictor = video_runs["cache"]
    assert predictor.model.vision is None and predictor.encoder is not None
    split = synthetic_split(predictor.cfg, task, "val")
    examples = split.examples
    cache = FeatureCache(predictor.cfg.data.feature_cache)
    files = []
    for e in examples:
        np.save(tmp_path / f"{e.image_ids[0]}.npy", cache[e.image_ids[0]].numpy())
        files.append(tmp_path / f"{e.image_ids[0]}.npy")
    given = user_inputs(examples)
    expected = evaluation_predictions(run, task)
    for videos in (frame_folders(split, examples, tmp_path / "frames"), files):
        answers = predictor.predict(task, given["text"], videos, options=given["options"], subtitle=given["subtitle"])
        assert answers == [expected[e.uid] for e in examples]
    assert len(set(answers)) > 1


def test_a_run_with_its_clip_answers_frames_and_features_files_in_one_call(video_runs, tmp_path):
    """Frame folders and frame-features files in one predict() call (a batch holds one kind: the collator refuses a
    mix, which it was given): each kind is batched apart and the answers come back in the inputs' order, the
    answers each kind gets alone."""
    from vlscale.data.features import FeatureCache

    _, predictor = video_runs["frames"]
    assert predictor.model.vision is not None
    split = synthetic_split(predictor.cfg, "tvqa", "val")
    examples = split.examples[:6]
    cache = FeatureCache(video_runs["cache"][1].cfg.data.feature_cache)  # the same tiny CLIP's frame features
    folders = frame_folders(split, examples, tmp_path / "frames")
    files = []
    for e in examples:
        np.save(tmp_path / f"{e.image_ids[0]}.npy", cache[e.image_ids[0]].numpy())
        files.append(tmp_path / f"{e.image_ids[0]}.npy")
    given = user_inputs(examples)
    as_frames, as_features = [0, 2, 3], [1, 4, 5]
    videos = [folders[i] if i in as_frames else files[i] for i in range(len(examples))]

    def alone(idx):
        return predictor.predict("tvqa", [given["text"][i] for i in idx], [videos[i] for i in idx],
                                 options=[given["options"][i] for i in idx],
                                 subtitle=[given["subtitle"][i] for i in idx])

    expected = dict(zip(as_frames, alone(as_frames))) | dict(zip(as_features, alone(as_features)))
    assert alone(range(len(examples))) == [expected[i] for i in range(len(examples))]
    # and one batch of a size that splits each kind: the same
    predictor.batch_size, size = 2, predictor.batch_size
    try:
        assert alone(range(len(examples))) == [expected[i] for i in range(len(examples))]
    finally:
        predictor.batch_size = size


def test_the_command_line_answers_about_a_video(video_runs, launcher, tmp_path, capsys):
    from vlscale.predict import chosen_option

    run, predictor = video_runs["cache"]
    split = synthetic_split(predictor.cfg, "tvqa", "val")
    e = split.examples[0]
    video = frame_folders(split, [e], tmp_path)[0]
    args = ["--adapter", str(run / "adapter"), "--task", "tvqa", "--video", str(video), "--text", e.extra["question"],
            *[a for o in e.extra["candidates"] for a in ("--option", o)], "--subtitle", e.extra["subtitle"],
            "--device", "cpu", "--json"]
    assert launcher("predict").main(args) == 0
    answer = evaluation_predictions(run, "tvqa")[e.uid]
    option = chosen_option(answer, e.extra["candidates"])
    assert json.loads(capsys.readouterr().out) == {
        "task": "tvqa", "text": e.extra["question"], "video": str(video), "options": e.extra["candidates"],
        "subtitle": e.extra["subtitle"], "answer": answer, "option": option and option[0],
        "option_text": option and option[1]}


def test_a_cache_trained_run_encodes_only_with_the_weights_its_cache_was_made_with(video_runs, tmp_path):
    """A cache-trained run encodes the user's images with model.vision + model.vision_pretrained, and nothing
    checked they were the weights its cache was made with (a file replaced at that path, or an override pointing
    elsewhere, answered from another CLIP's features). The run records the cache's fingerprint in its adapter, and
    the Predictor compares the encoder it builds with it: weights moved with the same content are accepted, others
    refused in one line naming model.vision_pretrained and the cache."""
    import torch

    from vlscale.data.features import FeatureCache

    run, predictor = video_runs["cache"]
    meta = json.loads((run / "adapter" / "adapter_config.json").read_text())
    cache = FeatureCache(predictor.cfg.data.feature_cache)
    assert meta["feature_cache"] == {"folder": predictor.cfg.data.feature_cache, "pretrained": None,
                                     "fingerprint": cache.meta["fingerprint"]}
    weights = {f"visual.{k}": v for k, v in predictor.encoder.visual.state_dict().items()}
    torch.save(weights, tmp_path / "moved.pt")  # the run's (random, seeded) CLIP, as a file elsewhere
    moved = Predictor(run / "adapter", [f"model.vision_pretrained={tmp_path / 'moved.pt'}"], device="cpu")
    assert moved.encoder is not None
    first = next(k for k, v in weights.items() if v.is_floating_point())
    torch.save(dict(weights, **{first: weights[first] * 1.5}), tmp_path / "other.pt")
    with pytest.raises(ValueError) as e:
        Predictor(run / "adapter", [f"model.vision_pretrained={tmp_path / 'other.pt'}"], device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"model.vision_pretrained={str(tmp_path / 'other.pt')!r} gives other "
                                              f"tiny-clip-rn weights than the run's feature cache {cache.root} was made "
                                              f"with (pretrained=None): {first} differs")
    assert msg.endswith("point model.vision_pretrained at the weights the cache was made with")


def test_evaluating_a_cache_trained_run_on_a_cache_of_other_weights_is_refused(video_runs, launcher, tmp_path):
    """evaluate.py reads a cache-trained run's features from data.feature_cache; a cache there of other CLIP weights
    (re-extracted at the same path, or another one named by an override) scored the adapter on features it never
    saw. Refused in one line naming the key and the cache before the model is built; the run's own cache, and a copy
    of it, are evaluated."""
    import shutil

    from vlscale.predict import cache_changed_problem, load_run_config

    run, predictor = video_runs["cache"]
    cache = Path(predictor.cfg.data.feature_cache)
    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    cfg, meta = load_run_config(run / "adapter", [f"data.feature_cache={copy}"])
    assert cache_changed_problem(cfg, meta) is None  # the same features elsewhere
    other = tmp_path / "other"
    shutil.copytree(cache, other)
    meta_file = other / "meta.json"
    held = json.loads(meta_file.read_text())
    first = sorted(held["fingerprint"])[0]
    held["fingerprint"][first] = [v * 1.5 for v in held["fingerprint"][first]]
    meta_file.write_text(json.dumps(held))
    with pytest.raises(ValueError) as e:
        launcher("evaluate").main(["--adapter", str(run / "adapter"), "--out", str(tmp_path / "eval"), "--no-progress",
                                   f"data.feature_cache={other}"])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"data.feature_cache={str(other)!r} holds features of other "
                                              f"tiny-clip-rn weights than the cache the run was trained on ({cache}")
    assert f"{first} differs" in msg and not (tmp_path / "eval").exists()
