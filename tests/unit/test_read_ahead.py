"""Images read ahead in threads (``data.read_ahead_threads``): the same batches as read in the training thread, in
order, through accumulation, VQA's sampled targets and a resume; errors at their batch; the tokenizer only in the
calling thread; cached features read in the training thread."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from vlscale.config import ConfigError, load_config
from vlscale.data import build_tokenizer, build_train_loader, eval_batches
from vlscale.data.collate import fetch_visuals
from vlscale.data.read_ahead import ReadAhead
from vlscale.data.real import DataError

ROOT = Path(__file__).resolve().parents[1] / "fixtures" / "real_data"

REAL = ["data.source=real", f"data.root={ROOT}", "data.tasks=[vqa,gqa,nlvr2,caption]", "model.vision=tiny-clip-rn",
        "model.vision_pretrained=null", "model.feature_source=images", "train.micro_batch_size=2",
        "train.gradient_accumulation_steps=2", "train.seed=7"]


def _cfg(threads, *extra):
    return load_config("tiny", REAL + [f"data.read_ahead_threads={threads}", *extra])


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def _batches(loader, n):
    return [next(loader) for _ in range(n)]


# ----------------------------------------------------------------------------- ReadAhead


def test_read_ahead_hands_out_in_order_runs_ahead_in_threads_and_drops_a_jump():
    ran: dict[int, str] = {}

    def work(k):
        def run():
            if k == 3:
                raise DataError("image 3 is corrupt")
            ran[k] = threading.current_thread().name
            return k * 10
        return run

    ahead = ReadAhead(2, "t-read")
    upcoming = lambda k: lambda: ((j, work(j)) for j in range(k + 1, 6))  # noqa: E731
    assert [ahead.get(k, work(k), upcoming(k)) for k in (0, 1, 2)] == [0, 10, 20]
    assert ran[1].startswith("t-read") and ran[2].startswith("t-read")  # read while 0 and 1 were handed out
    assert set(ahead._pending) == {3, 4}  # 3's error waits for its turn
    with pytest.raises(DataError, match="image 3 is corrupt"):
        ahead.get(3, work(3), upcoming(3))
    # a jump back (a resume): what was read ahead for 4 and 5 is dropped, 0 is read again
    assert ahead.get(0, work(0), lambda: iter(())) == 0 and not ahead._pending
    ahead.close()
    assert ahead.get(4, work(4), upcoming(4)) == 40 and not ahead._pending  # closed: read in the caller

    inline = ReadAhead(0)
    ran.clear()
    assert inline.get(1, work(1), upcoming(1)) == 10 and ran == {1: threading.current_thread().name}
    with pytest.raises(ValueError, match="threads=-1"):
        ReadAhead(-1)


@pytest.mark.parametrize("device, cpus, ranks, threads", [("cuda", 2, None, 2), ("cuda", 16, "8", 2),
                                                          ("cuda", 2, "2", 1), ("cuda", 2, "4", 1),
                                                          ("cuda", 64, "1", 4), ("cpu", 16, "1", 0)])
def test_the_default_is_this_ranks_share_of_the_cpus_on_a_gpu(monkeypatch, device, cpus, ranks, threads):
    from vlscale.data import read_ahead

    monkeypatch.setattr("vlscale.engine.distributed.local_device_type", lambda: device)
    monkeypatch.setattr("vlscale.engine.distributed.usable_cpu_count", lambda: cpus)
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    if ranks is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", ranks)
    assert read_ahead.default_threads() == threads


@pytest.mark.parametrize("value, why", [("-1", ">= 0"), ("1.5", "must be an integer")])
def test_read_ahead_threads_setting_refused(value, why):
    with pytest.raises(ConfigError, match=f"data.read_ahead_threads.*{why}"):
        _cfg(value)


# ----------------------------------------------------------------------------- the train loader and eval batches


def test_train_loader_reads_ahead_the_same_batches_on_real_images_and_resumes():
    cfg0, cfg3 = _cfg(0), _cfg(3, "data.vqa_targets=sampled", "train.loss_reduction=example")
    tok = build_tokenizer(cfg0)
    inline = build_train_loader(cfg0, tok, rank=1, world_size=2)
    assert inline.read_ahead.threads == 0
    expected = _batches(inline, 12)
    assert {b["task"] for b in expected} == {"vqa", "gqa", "nlvr2", "caption"}

    cfg0s = _cfg(0, "data.vqa_targets=sampled", "train.loss_reduction=example")
    sampled = _batches(build_train_loader(cfg0s, tok, rank=1, world_size=2), 13)
    ahead = build_train_loader(cfg3, tok, rank=1, world_size=2)
    assert ahead.read_ahead.threads == 3
    got = _batches(ahead, 5)
    state = ahead.state_dict()  # mid-step: micro-batch 1 of step 2, three micro-batches read ahead
    assert state["micro_index"] == 1 and len(ahead.read_ahead._pending) == 3
    assert set(ahead._micro_batches) == set(ahead.read_ahead._pending)  # drawn once, kept until handed out
    got += _batches(ahead, 7)
    for a, b in zip(got, sampled[:12], strict=True):
        _same(a, b)
    assert any("loss_weights" in b for b in got)

    ahead.load_state_dict(state)  # back to step 2: the batches read ahead for step 6 are dropped
    for a, b in zip(_batches(ahead, 7), sampled[5:12], strict=True):
        _same(a, b)
    ahead.close()  # then read in the training thread
    _same(next(ahead), sampled[12])


def test_an_unreadable_image_read_ahead_stops_at_its_batch():
    cfg = _cfg(2, "data.tasks=[vqa]", "train.gradient_accumulation_steps=1", "train.micro_batch_size=1")
    loader = build_train_loader(cfg, build_tokenizer(cfg))
    order = [b["uids"][0] for b in _batches(build_train_loader(_cfg(0, "data.tasks=[vqa]",
                                                                    "train.gradient_accumulation_steps=1",
                                                                    "train.micro_batch_size=1"),
                                                               build_tokenizer(cfg)), 3)]
    bad = {e.uid: e for e in loader.examples["vqa"]}[order[2]].image_ids[0]
    good = [e.uid for e in loader.examples["vqa"] if bad not in e.image_ids]
    assert order[0] in good and order[1] in good, "the first two batches must not read the bad image"
    source = loader.sources["vqa"]

    class Failing:
        kind = "images"

        def __getitem__(self, i):
            if i == bad:
                raise DataError(f"image {i!r}: cannot identify image file")
            return source[i]

    loader.sources["vqa"] = Failing()
    assert [b["uids"][0] for b in _batches(loader, 2)] == order[:2]
    assert (2, 0) in loader.read_ahead._pending  # batch 3 was read ahead meanwhile, and failed there
    with pytest.raises(DataError, match=f"vqa example {order[2]!r}.*image {bad!r}: cannot identify"):
        next(loader)
    loader.close()


def test_only_the_calling_thread_tokenises_and_eval_batches_read_ahead_alike():
    cfg0, cfg2 = _cfg(0), _cfg(2)
    tok = build_tokenizer(cfg0)
    threads = set()
    real_call = type(tok).__call__

    class Recording(type(tok)):
        def __call__(self, *a, **k):
            threads.add(threading.current_thread().name)
            return real_call(self, *a, **k)

    tok.__class__ = Recording
    try:
        for task, rank, world in (("vqa", 0, 1), ("nlvr2", 0, 1), ("caption", 0, 1), ("vqa", 2, 3)):
            inline = list(eval_batches(cfg0, tok, task, "val", 1, rank=rank, world_size=world))
            ahead = list(eval_batches(cfg2, tok, task, "val", 1, rank=rank, world_size=world))
            assert len(ahead) == len(inline) >= 1
            for a, b in zip(ahead, inline):
                _same(a, b)
        assert [bool(b["valid"]) for b in ahead] == [False]  # vqa's 2 val questions: rank 2 of 3 pads
        _batches(build_train_loader(cfg2, tok, 0, 1), 6)
    finally:
        tok.__class__ = Recording.__mro__[1]
    assert threads == {threading.current_thread().name}


def test_an_hf_dataset_s_images_are_read_ahead_alike():
    """``data.hf_dataset`` rows (images decoded from the dataset's columns, the columns opened on first use, here by
    the threads): the same training and evaluation batches."""
    hf = ROOT.parent / "hf_multi"
    columns = ('data.hf_columns={image: image, image_id: image_name, question: question, answers: answers, '
               'id: qid}')
    args = ["data.root=null", f"data.hf_dataset={hf}", columns, "data.tasks=[vqa]",
            "train.gradient_accumulation_steps=1"]
    inline, ahead = _cfg(0, *args), _cfg(3, *args)
    tok = build_tokenizer(inline)
    loader = build_train_loader(ahead, tok)
    assert loader.read_ahead.threads == 3
    for a, b in zip(_batches(loader, 5), _batches(build_train_loader(inline, tok), 5), strict=True):
        _same(a, b)
    loader.close()
    evaluated = list(eval_batches(ahead, tok, "vqa", "val", 1))
    assert len(evaluated) >= 2 and "pixel_values" in evaluated[0]
    for a, b in zip(evaluated, eval_batches(inline, tok, "vqa", "val", 1), strict=True):
        _same(a, b)


def test_video_frames_are_read_ahead_alike(tmp_path, monkeypatch, frame_folders):
    """A video task's frame images (``root/<task>/frames/<vid>/*.jpg``) read ahead: the same frames, masks and order;
    of a video longer than model.max_frames only the frames the batch takes are decoded, and they are those a
    folder read whole gives the collator."""
    import shutil

    from vlscale.data import visual

    root = tmp_path / "root"
    shutil.copytree(ROOT / "tvqa", root / "tvqa", ignore=shutil.ignore_patterns("features"))
    frame_folders(root / "tvqa", {"friends_s01e01_seg01_clip_00": 9, "house_s02e03_seg02_clip_05": 3})
    args = [f"data.root={root}", "data.tasks=[tvqa]", "model.max_frames=4"]
    inline, ahead = _cfg(0, *args), _cfg(2, *args)
    tok = build_tokenizer(inline)
    loader = build_train_loader(ahead, tok)
    assert loader.read_ahead.threads == 2
    for a, b in zip(_batches(loader, 6), _batches(build_train_loader(inline, tok), 6), strict=True):
        assert a["pixel_values"].dim() == 6 and a["vis_mask"].sum() > 0
        _same(a, b)
    loader.close()

    decoded = []
    load_image = visual.load_image
    monkeypatch.setattr(visual, "load_image", lambda p, *a: decoded.append(p.name) or load_image(p, *a))
    inline = build_train_loader(inline, tok)
    lengths = {"friends_s01e01_seg01_clip_00": 9, "house_s02e03_seg02_clip_05": 3}
    examples = [next(e for e in inline.examples["tvqa"] if e.image_ids[0] == vid) for vid in lengths]
    fetched = fetch_visuals(inline.sources["tvqa"], examples)
    assert [len(v[0]) for v in fetched] == [4, 3] and len(decoded) == 7  # of 9 + 3 frames
    whole = visual.ImageFolder(root / "tvqa" / "frames", pattern="{id}", video=True)  # every frame, as extraction
    whole_frames = [[whole[e.image_ids[0]]] for e in examples]
    assert [len(v[0]) for v in whole_frames] == [9, 3] and len(decoded) == 7 + 12
    _same(inline.collator.visual_inputs(examples, fetched), inline.collator.visual_inputs(examples, whole_frames))


def test_cached_features_are_read_in_the_training_thread():
    """The video fixtures are frame features (mapped, nothing to decode): no threads, whatever the setting. With
    one task's source a cache, only the other tasks' batches are read ahead."""
    video = _cfg(2, "data.tasks=[tvqa,how2qa]", "model.vision=ViT-B-32-quickgelu")  # 512-d, as the fixture
    loader = build_train_loader(video, build_tokenizer(video))
    assert loader.read_ahead.threads == 0 and len(_batches(loader, 4)) == 4

    cfg = _cfg(2, "data.tasks=[vqa,caption]")
    loader = build_train_loader(cfg, build_tokenizer(cfg))
    caption = loader.sources["caption"]

    class Cached:  # as a FeatureCache says of itself
        kind = "features"

        def __getitem__(self, i):
            return caption[i]

    loader.sources["caption"] = Cached()
    tasks, ahead = [], set()
    for _ in range(10):
        tasks.append(next(loader)["task"])
        ahead |= {loader._micro_batch(*k)[0] for k in loader.read_ahead._pending}
    assert set(tasks) == {"vqa", "caption"} and ahead == {"vqa"}
    loader.close()


def test_the_read_ahead_benchmark_compares_the_training_thread_with_threads(script, capsys):
    """benchmarks/read_ahead.py on a handful of made JPEGs: both settings give a time and the same batches (its
    figures are BENCHMARKS.md's)."""
    import json

    bench = script("benchmarks/read_ahead.py")
    assert bench.main(["--images", "6", "--rounds", "1", "--batches", "3", "--micro-batch", "2", "--threads", "2",
                       "--step-ms", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["batches_equal"] is True and result["threads"] == 2
    assert set(result["ms_per_micro_batch"]) == {"0", "2"} and all(v > 0 for v in result["ms_per_micro_batch"].values())
