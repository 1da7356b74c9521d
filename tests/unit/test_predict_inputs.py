"""launchers/predict.py refuses what an adapter cannot answer in one line, before the model is built: an unknown
task or one it was not trained on (naming the tasks it was), the wrong number of images, a question task without
text, a caption with text, a missing or unreadable image, a --device the machine lacks; for video tasks, a missing,
empty or unreadable video, frame features of another width, QA without its answer options, a caption with text; a
list is answered in batches as each input alone, with its own images in order. (The answers themselves:
tests/integration/test_predict.py.)"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlscale.config import load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def adapter(monkeypatch, tmp_path):
    """An adapter of vqa and nlvr2 with one set of modules per task (only its config is read: nothing is built)."""
    from vlscale.engine import checkpoint
    from vlscale.modeling import vl_model

    saved = load_config("tiny", ["data.tasks=[vqa,nlvr2]", "peft.sharing=multiple"]).to_dict()
    monkeypatch.setattr(checkpoint, "read_adapter_config", lambda _: {"run_config": saved, "vocab_size": 1})
    monkeypatch.setattr(vl_model, "build_model", lambda *a, **k: pytest.fail("the model was built"))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    return tmp_path


@pytest.mark.parametrize("argv, message", [
    (["--task", "vqa2", "--image", "{a}", "--text", "q?"], "unknown task 'vqa2'; this adapter was trained on "
                                                           "['vqa', 'nlvr2']"),
    (["--task", "gqa", "--image", "{a}", "--text", "q?"], "the adapter was not trained on task 'gqa' and has no "
                                                          "weights for it; it was trained on ['vqa', 'nlvr2']"),
    (["--task", "tvqa", "--video", "{dir}", "--text", "q?"], "the adapter was not trained on task 'tvqa' and has no "
                                                             "weights for it; it was trained on ['vqa', 'nlvr2']"),
    (["--task", "tvqaa", "--video", "{dir}", "--text", "q?"], "unknown task 'tvqaa'; this adapter was trained on "
                                                              "['vqa', 'nlvr2']"),
    (["--task", "vqa", "--video", "{dir}", "--text", "q?"], "--video is for the video tasks (tvqa, how2qa, tvc, yc2c); "
                                                           "task 'vqa' takes --image"),
    (["--task", "vqa", "--text", "q?"], "task 'vqa' needs --image"),
    (["--task", "vqa", "--image", "{a}", "--text", "q?", "--option", "x"], "task 'vqa' takes no answer options (only "
                                                                          "video QA does: tvqa, how2qa), got 1"),
    (["--task", "vqa", "--image", "{a}", "--text", "q?", "--subtitle", "hi."], "task 'vqa' takes no subtitle"),
    (["--task", "nlvr2", "--image", "{a}", "--text", "s."], "task 'nlvr2' takes 2 image(s) per question, got 1"),
    (["--task", "vqa", "--image", "{a}", "--image", "{a}", "--text", "q?"],
     "task 'vqa' takes 1 image(s) per question, got 2"),
    (["--task", "vqa", "--image", "{a}"], "task 'vqa' needs a text (the question or statement), got ''"),
    (["--task", "vqa", "--image", "{dir}/none.jpg", "--text", "q?"], "--image {dir}/none.jpg: no such file"),
    (["--task", "vqa", "--image", "{dir}", "--text", "q?"], "--image {dir}: a folder, not an image file"),
    (["--task", "vqa", "--image", "{dir}/bad.jpg", "--text", "q?"], "cannot read image {dir}/bad.jpg"),
])
def test_bad_input_is_refused_naming_it_before_the_model_is_built(adapter, launcher, argv, message):
    (adapter / "bad.jpg").write_bytes(b"not an image")
    argv = [a.format(a=adapter / "a.png", dir=adapter) for a in argv]
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        launcher("predict").main(["--adapter", "unused", *argv])
    assert message.format(dir=adapter) in str(e.value)


@pytest.mark.parametrize("device, gpus, message", [
    ("gpu", 0, "--device 'gpu' is not a device; give cpu, cuda or cuda:N"),
    ("cuda", 0, "--device 'cuda': this machine has no usable CUDA GPU"),
    ("cuda:2", 2, "--device 'cuda:2': this machine has 2 GPU(s), cuda:0 to cuda:1"),
])
def test_a_device_the_machine_lacks_is_refused_naming_the_flag(adapter, launcher, monkeypatch, capsys, device, gpus,
                                                               message):
    """predict.py's and extract_features.py's --device: torch's errors from inside the build, and extract_features.py
    blamed them on --pretrained ("--pretrained None for tiny-clip-rn: cannot load it (... no NVIDIA driver ...)")."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    for name, argv in (("predict", ["--adapter", "unused", "--task", "vqa", "--image", str(adapter / "a.png"),
                                    "--text", "q?"]),
                       ("extract_features", ["--vision", "tiny-clip-rn", "--images", str(adapter), "--out",
                                             str(adapter / "cache")])):
        with pytest.raises(SystemExit) as e:
            launcher(name).main([*argv, "--device", device])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_caption_takes_no_text(monkeypatch, adapter, launcher):
    from vlscale.engine import checkpoint

    saved = load_config("tiny").to_dict()
    monkeypatch.setattr(checkpoint, "read_adapter_config", lambda _: {"run_config": saved, "vocab_size": 1})
    with pytest.raises(ValueError, match=r"task 'caption' takes no text \(the run's caption inputs are the prefix "
                                         r"'caption:' alone\), got 'a photo'"):
        launcher("predict").main(["--adapter", "unused", "--task", "caption", "--image", str(adapter / "a.png"),
                                  "--text", "a photo"])


def test_the_command_line_says_one_line(tmp_path):
    """Run as a script: the error is one line on stderr naming the file at fault, exit code 1."""
    done = subprocess.run([sys.executable, str(ROOT / "launchers" / "predict.py"), "--adapter", str(tmp_path / "nope"),
                           "--task", "vqa", "--image", "a.jpg", "--text", "q?"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"predict.py: CheckpointError: {tmp_path / 'nope'} does not exist (an adapter directory is a run's "
        f"output_dir/adapter)"]


@pytest.fixture
def video_adapter(monkeypatch, tmp_path):
    """An adapter of tvqa and tvc (tiny-clip-rn: 64-d frame embeddings); a video of two PNG frames in clip/."""
    from vlscale.engine import checkpoint
    from vlscale.modeling import vl_model

    saved = load_config("tiny", ["data.tasks=[tvqa,tvc]", "model.vision=tiny-clip-rn"]).to_dict()
    monkeypatch.setattr(checkpoint, "read_adapter_config", lambda _: {"run_config": saved, "vocab_size": 1})
    monkeypatch.setattr(vl_model, "build_model", lambda *a, **k: pytest.fail("the model was built"))
    (tmp_path / "clip").mkdir()
    for k in range(2):
        Image.fromarray(np.full((8, 8, 3), k, np.uint8)).save(tmp_path / "clip" / f"{k}.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no frames here")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "0.jpg").write_bytes(b"not an image")
    np.save(tmp_path / "wide.npy", np.zeros((3, 512), np.float32))
    (tmp_path / "clip.mp4").write_bytes(b"")
    return tmp_path


QA = ["--task", "tvqa", "--video", "{dir}/clip", "--text", "which way?"]


@pytest.mark.parametrize("argv, message", [
    (QA, "task 'tvqa' needs its answer options (--option / options=, at least 2: a0, a1, ...), got 0"),
    (QA + ["--option", "left"], "task 'tvqa' needs its answer options (--option / options=, at least 2: a0, a1, "
                                "...), got 1"),
    (QA + ["--option", "left", "--option", " "], "task 'tvqa': answer option a1 is empty"),
    (["--task", "tvqa", "--video", "{dir}/clip", "--option", "l", "--option", "r"],
     "task 'tvqa' needs a text (the question or statement), got ''"),
    (["--task", "tvqa", "--image", "{dir}/clip/0.png", "--text", "q?", "--option", "l", "--option", "r"],
     "task 'tvqa' is a video task: give the video as --video (a folder of frame images or a frame-features file), "
     "not --image"),
    (["--task", "tvc", "--video", "{dir}/clip", "--image", "{dir}/clip/0.png"],  # not an --image ignored
     "task 'tvc' is a video task: give the video as --video (a folder of frame images or a frame-features file), "
     "not --image"),
    (["--task", "tvc", "--video", "{dir}/clip", "--text", "a caption"], "task 'tvc' takes no text (the run's caption "
                                                                       "inputs are its subtitle (--subtitle / "
                                                                       "subtitle=), if any), got 'a caption'"),
    (["--task", "tvc", "--video", "{dir}/clip", "--option", "l"], "task 'tvc' takes no answer options"),
    (["--task", "tvc", "--video", "{dir}/none"], "--video {dir}/none: no such folder or file"),
    (["--task", "tvc", "--video", "{dir}/empty"], "--video {dir}/empty: no frame images (.jpg, .jpeg, .png, .bmp, "
                                                  ".webp) in {dir}/empty"),
    (["--task", "tvc", "--video", "{dir}/broken"], "--video {dir}/broken: cannot read image {dir}/broken/0.jpg"),
    (["--task", "tvc", "--video", "{dir}/wide.npy"], "--video {dir}/wide.npy: frame features are 512-d, but the "
                                                     "run's model.vision embeds frames in 64-d"),
    (["--task", "tvc", "--video", "{dir}/clip.mp4"], "--video {dir}/clip.mp4: a video is a folder of frame images or "
                                                     "a file of frame features (.npy, .npz, .safetensors); video "
                                                     "files are not decoded: write its frames into a folder first "
                                                     "(e.g. ffmpeg -i {dir}/clip.mp4 -vf fps=1 FOLDER/%05d.jpg)"),
])
def test_bad_video_input_is_refused_naming_it_before_the_model_is_built(video_adapter, launcher, argv, message):
    argv = [a.format(dir=video_adapter) for a in argv]
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        launcher("predict").main(["--adapter", "unused", *argv])
    assert message.format(dir=video_adapter) in str(e.value)
    assert "\n" not in str(e.value)


def test_a_video_qa_input_is_the_datas_and_its_answer_names_an_option_as_evaluation_decides(tmp_path):
    """The question, options and subtitle are formatted by the loader's own code (a TVQA record read from disk
    gives the same text); the option an answer names: its name or its text, as the submission and accuracy read it."""
    import json

    from vlscale.data.video import load_subtitles, load_video_qa, qa_text
    from vlscale.predict import chosen_option

    options = ["left", "Right ", "up", "down", "still"]
    (tmp_path / "qa.jsonl").write_text(json.dumps({"qid": 1, "q": " which way? ", "vid_name": "v", "ts": "0-2",
                                                   "answer_idx": 1, **{f"a{i}": o for i, o in enumerate(options)}}))
    (tmp_path / "subs.jsonl").write_text(json.dumps({"vid_name": "v", "sub": [{"text": "hi.", "start": 0, "end": 1}]}))
    example = load_video_qa("tvqa", tmp_path / "qa.jsonl", load_subtitles(tmp_path / "subs.jsonl"))[0]
    assert example.text == qa_text("which way?", [o.strip() for o in options], "hi.") == \
        "which way? a0: left a1: Right a2: up a3: down a4: still subtitle: hi."
    assert qa_text("q?", ["x", "y"]) == "q? a0: x a1: y"
    assert chosen_option("a1", options) == chosen_option(" A1.", options) == chosen_option("right", options) == \
        ("a1", "Right")
    assert chosen_option("a7", options) is None and chosen_option("sideways", options) is None


def test_images_and_videos_read_as_the_run_reads_them(tmp_path):
    """A PIL image of any mode comes as uint8 RGB; an array that is not uint8 (H, W, 3) is refused, naming its dtype
    and shape; a sequence of frames longer than model.max_frames gives the frames the collator picks."""
    from vlscale.data.collate import frame_indices
    from vlscale.predict import read_image, read_video

    gray = Image.fromarray(np.full((4, 5), 7, np.uint8))
    assert read_image(gray).shape == (4, 5, 3) and read_image(gray).dtype == np.uint8
    with pytest.raises(ValueError, match=r"uint8 \(H, W, 3\) RGB, got float32 \(4, 5, 3\)"):
        read_image(np.zeros((4, 5, 3), np.float32))
    with pytest.raises(ValueError, match=r"got uint8 \(4, 5, 4\)"):
        read_image(np.zeros((4, 5, 4), np.uint8))
    frames = [np.full((2, 2, 3), k, np.uint8) for k in range(10)]
    picked = read_video(frames, max_frames=4)
    assert [int(f[0, 0, 0]) for f in picked] == frame_indices(10, 4) == [1, 3, 6, 8]


def test_an_fp16_adapter_runs_in_fp32_on_a_cpu_and_in_fp16_elsewhere():
    import torch

    from vlscale.predict import inference_dtype

    cfg = load_config("tiny", ["train.precision=fp16"])
    assert inference_dtype(cfg, "cuda") == (torch.float16, True) and cfg.train.precision == "fp16"
    assert inference_dtype(cfg, "cpu") == (torch.float32, False) and cfg.train.precision == "fp32"
    assert inference_dtype(load_config("tiny", ["train.precision=bf16"]), "cpu") == (torch.bfloat16, True)


@pytest.mark.parametrize("gpu,capability", [("Tesla V100-SXM2-16GB", (7, 0)), ("NVIDIA A10", (8, 6))])
def test_a_bf16_adapter_evaluated_on_a_gpu_that_emulates_bf16_is_said_to_be(gpu, capability, monkeypatch, capsys):
    """Training bf16 on a V100 / T4 is refused (emulated, slowly); evaluating a bf16 adapter there went on in
    emulated bf16 unsaid. It goes on (fp32 takes twice the memory), saying so and how to evaluate in fp32."""
    import torch

    from vlscale.predict import inference_dtype

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu)
    cfg = load_config("tiny", ["train.precision=bf16"])
    assert inference_dtype(cfg, "cuda:0", "evaluate.py") == (torch.bfloat16, True)
    said = capsys.readouterr().err
    if capability < (8, 0):
        assert said == (f"evaluate.py: note: the adapter was trained in bf16, which {gpu} (compute capability 7.0) "
                        f"only emulates, slowly: evaluating in bf16; train.precision=fp32 evaluates in fp32 (twice "
                        f"bf16's memory for the model)\n")
    else:
        assert said == ""
    assert inference_dtype(cfg, "cuda:0") == (torch.bfloat16, True) and capsys.readouterr().err == ""  # no who
    fp16 = load_config("tiny", ["train.precision=fp16"])  # no bf16: no note ('dtype == bfloat16' dropped survived)
    assert inference_dtype(fp16, "cuda:0", "evaluate.py") == (torch.float16, True) and capsys.readouterr().err == ""


def test_an_evaluation_keeps_the_runs_seed_and_tokenizer(monkeypatch):
    """train.seed draws the random frozen weights the adapter was trained on: an override is refused; a rebuilt
    tokenizer of another size than the adapter's is refused, naming both sizes."""
    from vlscale.data import build_tokenizer
    from vlscale.engine import checkpoint
    from vlscale.predict import adapter_tokenizer, load_run_config

    cfg = load_config("tiny")
    monkeypatch.setattr(checkpoint, "read_adapter_config", lambda _: {"run_config": cfg.to_dict()})
    with pytest.raises(ValueError, match=rf"override train.seed=7 would change the model .* \(train.seed="
                                         rf"{cfg.train.seed}\)"):
        load_run_config("unused", ["train.seed=7"])
    n = len(build_tokenizer(cfg))
    assert len(adapter_tokenizer(cfg, {"vocab_size": n})) == n
    with pytest.raises(ValueError, match=rf"the rebuilt tokenizer has {n} tokens; the adapter was trained with "
                                         rf"{n + 1} \(t\)"):
        adapter_tokenizer(cfg, {"vocab_size": n + 1, "tokenizer": "t"})


def test_a_blank_question_is_no_question():
    from vlscale.predict import check_request

    with pytest.raises(ValueError, match=r"task 'vqa' needs a text \(the question or statement\), got '  '"):
        check_request(["vqa"], "vqa", 1, "  ")


def test_a_frame_folder_longer_than_max_frames_gives_the_collators_frames(tmp_path):
    from vlscale.predict import read_video

    for k in range(10):
        Image.fromarray(np.full((2, 2, 3), k, np.uint8)).save(tmp_path / f"{k:02d}.png")
    assert [int(f[0, 0, 0]) for f in read_video(tmp_path, max_frames=4)] == [1, 3, 6, 8]


def test_an_override_string_is_one_override(adapter):
    """Predictor(dir, "key=value") passed list("key=value"), one character per override."""
    from vlscale.predict import Predictor, load_run_config

    with pytest.raises(ValueError, match=r"^override peft\.method='lora' would change the model"):
        load_run_config(adapter, "peft.method=lora")
    with pytest.raises(ValueError, match=r"^override peft\.method='lora' would change the model"):
        Predictor(adapter, "peft.method=lora", device="cpu")


def test_a_text_that_is_no_string_or_one_image_for_a_list_of_texts_is_refused_naming_it(tmp_path):
    """predict("caption", None, img) was "'NoneType' object is not iterable"; a list of texts with one image path
    or array, "2 texts but 29 image inputs" (the path's characters, the array's rows)."""
    from vlscale.predict import Predictor

    predictor = Predictor.__new__(Predictor)  # checked before the model is asked
    image = np.zeros((8, 8, 3), np.uint8)
    for text, words in ((None, "got NoneType"), (3, "got int"), (["q?", None], r"^text\[1\] must be a string")):
        with pytest.raises(TypeError, match=words):
            predictor.predict("vqa", text, image)
    for one in (str(tmp_path / "a.png"), tmp_path / "a.png", image, Image.fromarray(image)):
        with pytest.raises(ValueError, match=rf"^2 texts take a list of 2 image inputs \(images\[i\]: the i-th "
                                             rf"text's\), got one {type(one).__name__}$"):
            predictor.predict("vqa", ["q1?", "q2?"], one)
    with pytest.raises(ValueError, match=r"^2 texts take a list of 2 image inputs .*, got one ndarray$"):
        predictor.predict("tvc", ["", ""], np.zeros((4, 16), np.float32))
    predictor.tasks, predictor.batch_size = ["vqa"], 2
    predictor._predict_batch = lambda task, texts, *_: [t.upper() for t in texts]
    assert predictor.predict("vqa", np.array(["q1?", "q2?"]), [image, image]) == ["Q1?", "Q2?"]  # np.str_ are str
    assert predictor.predict("vqa", ["q1?", "q2?"], np.stack([image, image])) == ["Q1?", "Q2?"]  # a stack: a list


def test_a_device_or_batch_size_that_cannot_be_is_refused_before_the_adapter_is_read(monkeypatch):
    """Predictor(dir, device="gpu") was torch's RuntimeError, "cuda" without a GPU torch's from inside the build;
    batch_size=-1 answered a list with None for every input, 0 was taken silently for the default."""
    from vlscale.engine import checkpoint
    from vlscale.predict import Predictor

    monkeypatch.setattr(checkpoint, "read_adapter_config", lambda _: pytest.fail("the adapter was read"))
    with pytest.raises(ValueError, match=r"^device 'gpu' is not a device; give cpu, cuda or cuda:N$"):
        Predictor("adapter", device="gpu")
    with pytest.raises(ValueError, match=r"^device 'cuda:99': this machine has"):
        Predictor("adapter", device="cuda:99")
    for size in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=rf"^batch_size={size!r} must be a positive integer"):
            Predictor("adapter", device="cpu", batch_size=size)
    with pytest.raises(pytest.fail.Exception, match="the adapter was read"):  # numpy's ints are ints
        Predictor("adapter", device="cpu", batch_size=np.int64(2))
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(pytest.fail.Exception, match="the adapter was read"):  # torch.device(1): cuda:1
        Predictor("adapter", device=1)
    with pytest.raises(ValueError, match=r"^device 2: this machine has 2 GPU\(s\), cuda:0 to cuda:1$"):
        Predictor("adapter", device=2)


def test_answer_options_or_subtitles_given_as_one_string_are_refused():
    """One options list for a list of two questions gave the first question the characters of "left" as its four
    options, and the second those of "right"; a string for options, or for chosen_option's, was read one character
    per option (chosen_option("a1", "xy") -> ("a1", "y")); a subtitle string for a list was "2 texts but 11
    subtitles"."""
    from vlscale.predict import Predictor, chosen_option

    predictor = Predictor.__new__(Predictor)  # checked before the model is asked
    predictor.tasks = ["tvqa", "tvc"]
    video = np.zeros((4, 16), np.float32)
    with pytest.raises(ValueError, match=r"^2 texts take a list of 2 option lists \(options\[i\]: the i-th text's "
                                         r"answer options\), got a list of strings$"):
        predictor.predict("tvqa", ["q1?", "q2?"], [video, video], options=["left", "right"])
    with pytest.raises(ValueError, match=r"^2 texts take a list of 2 option lists .*, got a list of strings$"):
        predictor.predict("tvqa", ["q1?", "q2?"], [video, video], options=[["up", "down"], "left right"])
    with pytest.raises(ValueError, match=r"^task 'tvqa': options are a list of the answer options' texts, got one "
                                         r"string 'left right'$"):
        predictor.predict("tvqa", "q?", video, options="left right")
    from vlscale.predict import check_request

    check_request(["vqa"], "vqa", 1, "q?", options="")  # no options, as [] and None are (a CSV's empty cell)
    with pytest.raises(ValueError, match=r"^2 texts take a list of 2 subtitles \(subtitle\[i\]: the i-th text's\), "
                                         r"got one str$"):
        predictor.predict("tvc", ["", ""], [video, video], subtitle="hello there")
    predictor.batch_size, predictor._predict_batch = 2, lambda task, texts, images, options, subs: options
    assert predictor.predict("tvqa", ["q1?", "q2?"], [video, video], options=(o for o in (["a", "b"], ["c", "d"]))) \
        == [["a", "b"], ["c", "d"]]  # a generator of option lists, read once (the check read it all)
    with pytest.raises(TypeError, match=r"^chosen_option: options are a list of .*, got one string 'xy'$"):
        chosen_option("a1", "xy")
    assert chosen_option("a1", ["x", "y"]) == ("a1", "y")


def test_lists_of_inputs_of_other_lengths_are_refused_before_anything_runs():
    from vlscale.predict import Predictor

    predictor = Predictor.__new__(Predictor)  # the lengths are checked before the model is asked
    with pytest.raises(ValueError, match=r"^2 texts but 1 image inputs$"):
        predictor.predict("vqa", ["q1?", "q2?"], ["a.png"])
    with pytest.raises(ValueError, match=r"^2 texts but 3 subtitles$"):
        predictor.predict("tvc", ["", ""], ["v1", "v2"], subtitle=["a", "b", "c"])


def test_a_list_is_answered_in_batches_as_each_input_alone_with_its_own_images_in_order(monkeypatch):
    """predict() of a list answers in batches of batch_size (here 5 NLVR2 inputs: 2, 2, 1) and a cache-trained
    run's Predictor encodes all of a batch's images at once, then regroups the features two by two (each input's
    pair, in the order given): the list's answers are those of each input alone, in the list's order, and each
    answer is about its own text and its own two images, first image first. The random tiny model's answers
    hardly vary with the input (all 'true' for 8 random NLVR2 inputs), so the answering is a stand-in for
    predict_task that names the text and the images (by their features) each row of a batch holds; the CLIP
    encoder, the batching, the regrouping and the collator are the Predictor's own."""
    import torch

    from vlscale.data import Collator, build_tokenizer
    from vlscale.data.features import grid_features
    from vlscale.engine import evaluation
    from vlscale.modeling.vision import build_vision_encoder, image_transform
    from vlscale.predict import Predictor

    cfg = load_config("tiny", ["data.tasks=[nlvr2]", "model.feature_source=cache"])
    torch.manual_seed(0)  # the random CLIP
    predictor = Predictor.__new__(Predictor)  # what __init__ sets, without an adapter folder or an LM
    predictor.device, predictor.dtype, predictor.cfg = torch.device("cpu"), torch.float32, cfg
    predictor.tasks = ["nlvr2"]
    predictor.tokenizer = build_tokenizer(cfg)
    predictor.collator, predictor.model, predictor.batch_size = Collator(predictor.tokenizer, cfg), None, 2
    predictor.encoder = build_vision_encoder(cfg.model.vision, None)

    rng = np.random.default_rng(0)
    texts = ["the cube is red", "a ball is left", "two blue cubes", "the sphere is big", "no red ball"]
    images = [[rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(2)] for _ in texts]
    flat = [x for pair in images for x in pair]
    alone = [grid_features(predictor.encoder, image_transform(cfg.model.vision), [x]) for x in flat]
    ids = [predictor.tokenizer(f"nlvr: {t}")["input_ids"] for t in texts]
    assert len({tuple(i) for i in ids}) == len(texts)  # the texts tell the rows apart
    batches = []

    def which(batch, row):  # "text k: images i, j", i and j the nearest of the images encoded alone
        n = int(batch["attention_mask"][row].sum())
        text = ids.index(batch["input_ids"][row, :n].tolist())
        near = [min(range(len(flat)), key=lambda i: float((feats - alone[i][0]).norm()))
                for feats in batch["vis_feats"][row]]
        return f"text {text}: images {', '.join(map(str, near))}"

    def stand_in(model, tokenizer, batches_, task, **kwargs):
        (batch,) = batches_
        batches.append(len(batch["input_ids"]))
        return [{"prediction": which(batch, row)} for row in range(len(batch["input_ids"]))]

    monkeypatch.setattr(evaluation, "predict_task", stand_in)
    answers = predictor.predict("nlvr2", texts, images)
    assert batches == [2, 2, 1]
    assert answers == [f"text {k}: images {2 * k}, {2 * k + 1}" for k in range(len(texts))]
    each = [predictor.predict("nlvr2", t, pair) for t, pair in zip(texts, images)]
    assert each == answers


def test_the_command_line_prints_the_option_the_answer_names(video_adapter, launcher, monkeypatch, capsys):
    """predict.py on video QA prints the option the answer names and its text (``a1: right``); an answer naming none
    is printed as it is, with a note on stderr; --json gives the video, its options and subtitle and the option. The
    Predictor is asked with the command line's adapter, overrides, device, text, options and subtitle. (It is
    replaced here: what a trained one answers is tests/integration/test_predict.py's.)"""
    from vlscale import predict

    asked, answers = [], iter(["a1", "sideways", "a0", "a circle moves."])

    class Answering:
        def __init__(self, adapter, overrides, device=None, who="vlscale"):
            asked.append((adapter, list(overrides), device))

        def predict(self, task, text, visual, options=None, subtitle=None):
            asked.append((task, text, options, subtitle))
            return next(answers)
    monkeypatch.setattr(predict, "Predictor", Answering)
    clip = str(video_adapter / "clip")
    argv = ["--adapter", "unused", "--task", "tvqa", "--video", clip, "--text", "which way?", "--option", "left",
            "--option", "right", "--subtitle", "look.", "--device", "cpu", "train.eval_batch_size=3"]
    assert launcher("predict").main(argv) == 0
    assert capsys.readouterr().out == "a1: right\n"
    assert asked == [("unused", ["train.eval_batch_size=3"], "cpu"), ("tvqa", "which way?", ["left", "right"], "look.")]
    assert launcher("predict").main(argv) == 0
    said = capsys.readouterr()
    assert said.out == "sideways\n"
    assert said.err == "predict.py: note: the answer 'sideways' names none of the 2 options\n"
    assert launcher("predict").main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "task": "tvqa", "text": "which way?", "video": clip, "options": ["left", "right"], "subtitle": "look.",
        "answer": "a0", "option": "a0", "option_text": "left"}
    # a video caption: the video, no options, no option named
    assert launcher("predict").main(["--adapter", "unused", "--task", "tvc", "--video", clip, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"task": "tvc", "text": "", "video": clip, "options": [],
                                                   "subtitle": "", "answer": "a circle moves."}


def test_an_empty_answer_is_printed_as_one_not_as_a_blank_line(video_adapter, launcher, monkeypatch, capsys):
    """A model's empty answer printed an empty line; --json keeps the empty string."""
    from vlscale import predict

    answers = iter(["", " ", "", ""])

    class Answering:
        def __init__(self, *a, **k):
            pass

        def predict(self, *a, **k):
            return next(answers)
    monkeypatch.setattr(predict, "Predictor", Answering)
    argv = ["--adapter", "unused", "--task", "tvc", "--video", str(video_adapter / "clip")]
    for printed in ("(empty answer)\n", "(empty answer: ' ')\n"):
        assert launcher("predict").main(argv) == 0
        assert capsys.readouterr().out == printed
    assert launcher("predict").main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["answer"] == ""
    qa = ["--adapter", "unused", "--task", "tvqa", "--video", str(video_adapter / "clip"), "--text", "which way?",
          "--option", "left", "--option", "right"]
    assert launcher("predict").main(qa) == 0
    said = capsys.readouterr()
    assert said.out == "(empty answer)\n"
    assert said.err == "predict.py: note: the answer '' names none of the 2 options\n"


def test_a_video_task_without_a_video_is_refused_naming_the_flag(video_adapter, launcher):
    with pytest.raises(ValueError) as e:
        launcher("predict").main(["--adapter", "unused", "--task", "tvc"])
    assert str(e.value) == ("task 'tvc' is a video task: give the video as --video (a folder of frame images or a "
                            "frame-features file)")


def test_a_features_array_of_another_width_or_an_empty_frame_sequence_is_refused():
    """read_video (the Predictor's): an (L, D) array is checked against the run's frame width, as a features file
    is, and a sequence of no frames is refused, naming the flag."""
    from vlscale.predict import read_video

    with pytest.raises(ValueError, match=r"^video features: frame features are 512-d, but the run's model.vision "
                                         r"embeds frames in 64-d"):
        read_video(np.zeros((3, 512), np.float32), 4, expect_dim=64)
    assert read_video(np.zeros((3, 64), np.float64), 4, expect_dim=64).dtype.is_floating_point
    with pytest.raises(ValueError, match=r"^video: no frames \(an empty sequence\)$"):
        read_video([], 4)


def test_a_video_file_s_hint_takes_any_case_of_its_suffix_and_a_path_with_spaces(tmp_path):
    """A phone's IMG_0001.MOV is a video file as clip.mp4 is, and the ffmpeg line of the hint runs as pasted where
    the path has a space (quoted)."""
    from vlscale.predict import read_video

    clip = tmp_path / "my videos" / "IMG_0001.MOV"
    clip.parent.mkdir()
    clip.touch()
    with pytest.raises(ValueError, match=rf"; video files are not decoded: .* \(e\.g\. ffmpeg -i "
                                         rf"'{re.escape(str(clip))}' -vf fps=1 FOLDER/%05d\.jpg\)$"):
        read_video(clip, 4)


def test_a_question_options_and_subtitle_are_stripped_as_the_data_s():
    """Predictor.batch formats what a user types (spaces around a question or statement, an option or the
    subtitle) as the loader formats a record (stripped fields; a video's qa_text of them; a blank subtitle is none):
    the examples it collates hold the data's text. (T5's SentencePiece would hide stray spaces; BART's byte-level
    BPE encodes them.)"""
    import torch

    from vlscale.data.video import qa_text
    from vlscale.predict import Predictor

    predictor = Predictor.__new__(Predictor)
    predictor.cfg = load_config("tiny", ["data.tasks=[tvqa,tvc]", "model.vision=tiny-clip-rn"])
    predictor.device, predictor.encoder = torch.device("cpu"), None
    predictor.collator = lambda examples, visuals: [e.text for e in examples]  # the texts the model would read
    feats = np.zeros((3, 64), np.float32)
    assert predictor.batch("tvqa", [" which way? ", "which way?"], [feats, feats], [[" left", "right "]] * 2,
                           [" alice: look.  ", "  "]) == [qa_text("which way?", ["left", "right"], "alice: look."),
                                                          "which way? a0: left a1: right"]
    assert predictor.batch("tvc", ["", ""], [feats, feats], None, ["  alice: look. ", " "]) == ["alice: look.", ""]
    # an image task's question too (the VQA, GQA and NLVR2 loaders strip a record's text)
    predictor.cfg = load_config("tiny", ["data.tasks=[vqa,nlvr2]", "model.vision=tiny-clip-rn"])
    img = np.zeros((4, 4, 3), np.uint8)
    assert predictor.batch("vqa", ["  is it red? ", "is it red?"], [[img], [img]]) == ["is it red?"] * 2
    assert predictor.batch("nlvr2", [" two dogs.\n"], [[img, img]]) == ["two dogs."]


def test_an_image_given_as_a_path_object_is_read_as_its_file(tmp_path):
    from vlscale.predict import read_image

    img = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    Image.fromarray(img).save(tmp_path / "a.png")
    assert np.array_equal(read_image(tmp_path / "a.png"), img) and np.array_equal(read_image(str(tmp_path / "a.png")),
                                                                                   img)
