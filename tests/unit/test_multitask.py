"""Multitask sampling and the train / eval loaders: same task on every rank, world-size independent,
deterministic, exactly resumable."""

import collections

import numpy as np
import pytest
import torch

from vlscale.config import load_config
from vlscale.data import build_train_loader, build_tokenizer, eval_batches, load_examples
from vlscale.data.multitask import MultitaskSampler, shard, task_probabilities

SIZES = {"vqa": 50, "gqa": 30, "nlvr2": 13}


def test_same_task_on_every_rank_and_world_size_independent():
    sampler = MultitaskSampler(SIZES, global_batch_size=8, seed=0)
    for i in range(40):
        task, indices = sampler.step(i)
        assert len(indices) == 8 and all(0 <= x < SIZES[task] for x in indices)
        for world, micro, accum in ((1, 2, 4), (2, 2, 2), (4, 2, 1), (8, 1, 1), (2, 1, 4)):
            # every rank computes the step itself: the task is the same, the examples differ
            per_rank = [MultitaskSampler(SIZES, 8, seed=0).step(i) for _ in range(world)]
            assert {t for t, _ in per_rank} == {task}
            parts = [shard(idx, r, world, micro, accum) for r, (_, idx) in enumerate(per_rank)]
            assert all(len(p) == accum and all(len(m) == micro for m in p) for p in parts)
            union = [x for p in parts for m in p for x in m]
            assert sorted(union) == sorted(indices)  # the global batch, whatever the world size
            if world > 1:
                assert parts[0] != parts[1]


def test_deterministic_from_seed():
    a = [MultitaskSampler(SIZES, 8, seed=5).step(i) for i in range(30)]
    b = [MultitaskSampler(SIZES, 8, seed=5).step(i) for i in range(30)]
    c = [MultitaskSampler(SIZES, 8, seed=6).step(i) for i in range(30)]
    assert a == b and a != c
    # random access gives what sequential iteration gives, also past a chunk of task draws
    s = MultitaskSampler(SIZES, 8, seed=5)
    seq = [next(s) for _ in range(5000)]
    assert MultitaskSampler(SIZES, 8, seed=5).step(4999) == seq[4999]
    assert MultitaskSampler(SIZES, 8, seed=5).step(4096) == seq[4096]


def test_epochs_without_replacement_and_reshuffled():
    sampler = MultitaskSampler({"vqa": 12, "gqa": 7}, 4, seed=1)
    stream = collections.defaultdict(list)
    for i in range(200):
        task, idx = sampler.step(i)
        stream[task].extend(idx)
    for task, n in (("vqa", 12), ("gqa", 7)):
        epochs = [stream[task][k:k + n] for k in range(0, len(stream[task]) - n + 1, n)]
        assert len(epochs) >= 3
        assert all(sorted(e) == list(range(n)) for e in epochs)
        assert len({tuple(e) for e in epochs}) > 1  # a fresh shuffle each epoch


def test_task_probabilities():
    p = task_probabilities({"a": 300, "b": 100})
    assert p == pytest.approx({"a": 0.75, "b": 0.25})
    t = task_probabilities({"a": 300, "b": 100}, "temperature", 2.0)
    assert t["a"] == pytest.approx(300 ** 0.5 / (300 ** 0.5 + 100 ** 0.5))
    s = MultitaskSampler({"a": 300, "b": 100}, 4, seed=0)
    counts = collections.Counter(s.step(i)[0] for i in range(4000))
    assert counts["a"] / 4000 == pytest.approx(0.75, abs=0.03)
    with pytest.raises(ValueError, match="sampling='round_robin'"):
        task_probabilities({"a": 1}, "round_robin")
    with pytest.raises(ValueError, match="task 'b' has 0 examples"):
        MultitaskSampler({"a": 3, "b": 0}, 4)
    with pytest.raises(ValueError, match="global batch of 8 indices != micro 2 x world_size 2 x accum 1"):
        shard(list(range(8)), 0, 2, 2, 1)
    with pytest.raises(ValueError, match="rank 2 is outside"):
        shard(list(range(8)), 2, 2, 2, 2)


def test_sampler_resumes_exactly_mid_epoch():
    full = MultitaskSampler(SIZES, 8, seed=2)
    expected = [next(full) for _ in range(25)]
    first = MultitaskSampler(SIZES, 8, seed=2)
    head = [next(first) for _ in range(11)]
    state = first.state_dict()
    resumed = MultitaskSampler(SIZES, 8, seed=2)
    resumed.load_state_dict(state)
    assert head + [next(resumed) for _ in range(14)] == expected
    with pytest.raises(ValueError, match="global_batch_size"):
        MultitaskSampler(SIZES, 16, seed=2).load_state_dict(state)


# ----------------------------------------------------------------------------- loaders

@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("vlscale_cache")


@pytest.fixture(autouse=True)
def _cache(cache_dir, monkeypatch):
    monkeypatch.setenv("VLSCALE_CACHE", str(cache_dir))


def _plain_transform(images):
    """Stand-in for the CLIP transform (fast): uint8 HWC -> float CHW."""
    return torch.stack([torch.from_numpy(np.asarray(i, dtype=np.float32) / 255).permute(2, 0, 1) for i in images])


def _cfg(*extra):
    return load_config("tiny", ["data.synthetic_train=24", "data.synthetic_eval=10", "data.image_size=16",
                              "data.tasks=[vqa,gqa,nlvr2]", *extra])


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(load_config("tiny"))


def _uids(loader, n):
    out = []
    for _ in range(n):
        b = next(loader)
        out.append((b["task"], tuple(b["uids"])))
    return out


def test_train_loader_ranks_share_the_task_and_split_the_global_batch(tok):
    one = build_train_loader(_cfg("train.micro_batch_size=2", "train.gradient_accumulation_steps=4"), tok,
                             vision_transform=_plain_transform)
    two = [build_train_loader(_cfg("train.micro_batch_size=2", "train.gradient_accumulation_steps=2"), tok,
                              rank=r, world_size=2, vision_transform=_plain_transform) for r in range(2)]
    assert one.global_batch_size == two[0].global_batch_size == 8
    for step in range(6):
        single = _uids(one, 4)
        ranks = [_uids(loader, 2) for loader in two]
        tasks = {t for t, _ in single} | {t for r in ranks for t, _ in r}
        assert len(tasks) == 1  # one task per step, on every rank and micro-batch
        assert sorted(u for _, b in single for u in b) == sorted(u for r in ranks for _, b in r for u in b)
        assert one.step == two[0].step == two[1].step == step + 1


def test_train_loader_batches_and_resume(tok):
    cfg = _cfg("train.micro_batch_size=3", "train.gradient_accumulation_steps=2")
    loader = build_train_loader(cfg, tok, vision_transform=_plain_transform)
    b = next(loader)
    assert b["pixel_values"].shape[0] == 3 and b["pixel_values"].shape[2:] == (3, 16, 16)
    assert b["pixel_values"].shape[1] == (2 if b["task"] == "nlvr2" else 1)
    assert loader.step == 0  # one of two micro-batches of step 0
    expected = _uids(loader, 9)

    again = build_train_loader(cfg, tok, vision_transform=_plain_transform)
    _uids(again, 4)  # stop mid-step (after 2 steps and 0 micro-batches + 2 more = mid step 2)
    _uids(again, 1)
    state = again.state_dict()
    assert state["micro_index"] == 1
    resumed = build_train_loader(cfg, tok, vision_transform=_plain_transform)
    resumed.load_state_dict(state)
    assert _uids(resumed, 5) == expected[4:]
    with pytest.raises(ValueError, match="mid-step"):
        build_train_loader(_cfg("train.micro_batch_size=3", "train.gradient_accumulation_steps=1"), tok,
                           rank=0, world_size=2, vision_transform=_plain_transform).load_state_dict(state)


@pytest.mark.parametrize("world", [1, 3, 4])
def test_eval_batches_cover_every_example_once_with_equal_counts(tok, world):
    cfg = _cfg()
    n = len(load_examples(cfg, "nlvr2", "val"))
    made = [eval_batches(cfg, tok, "nlvr2", "val", 2, r, world, vision_transform=_plain_transform)
            for r in range(world)]
    counts = [len(b) for b in made]  # known before iterating (an evaluation progress bar's total)
    assert all(b.examples == made[0].examples for b in made) and len(made[0].examples) == n
    per_rank = [list(b) for b in made]
    assert [len(b) for b in per_rank] == counts and len(set(counts)) == 1  # same number of batches on every rank
    assert len({tuple(len(x["uids"]) for x in b) for b in per_rank}) == 1
    valid = [u for batches in per_rank for x in batches for u, v in zip(x["uids"], x["valid"].tolist()) if v]
    assert sorted(valid) == sorted(e.uid for e in load_examples(cfg, "nlvr2", "val")) and len(valid) == n
    for r, batches in enumerate(per_rank):  # strided, as documented: rank r gets examples r, r + world, ...
        mine = [u for x in batches for u, v in zip(x["uids"], x["valid"].tolist()) if v]
        assert mine == [e.uid for e in made[0].examples[r::world]]
    limited = list(eval_batches(cfg, tok, "vqa", "val", 4, max_examples=5, vision_transform=_plain_transform))
    assert [len(x["uids"]) for x in limited] == [4, 1] and all(x["valid"].all() for x in limited)
    assert all(len(r) == 10 for x in limited for r in x["references"])


def test_temperature_sampling_does_not_overflow_with_real_sizes_and_a_small_temperature():
    sizes = {"vqa": 443_757, "gqa": 943_000, "nlvr2": 86_373}  # the real training sets
    p = task_probabilities(sizes, "temperature", 0.01)  # sharpened: n^100 overflows float64
    assert all(np.isfinite(list(p.values()))) and sum(p.values()) == pytest.approx(1.0)
    assert p["gqa"] == pytest.approx(1.0)
    s = MultitaskSampler(sizes, 8, sampling="temperature", temperature=0.01)
    assert {s.step(i)[0] for i in range(50)} == {"gqa"}


def test_sampler_state_of_other_training_data_is_a_one_line_data_error():
    from vlscale.data.real import DataError

    state = MultitaskSampler({"vqa": 50, "gqa": 30}, 8).state_dict()
    with pytest.raises(DataError, match="the tasks were in the order"):  # another order draws other tasks
        MultitaskSampler({"gqa": 30, "vqa": 50}, 8).load_state_dict(state)
    with pytest.raises(DataError, match="'gqa' had 30 examples, now 29"):  # a record more or less
        MultitaskSampler({"vqa": 50, "gqa": 29}, 8).load_state_dict(state)


def test_a_task_smaller_than_the_global_batch_is_logged(caplog):
    with caplog.at_level("WARNING", logger="vlscale.data.multitask"):
        MultitaskSampler({"vqa": 50, "nlvr2": 3}, 8)
    assert "{'nlvr2': 3}" in caplog.text and "global batch of 8" in caplog.text


def test_sampler_refuses_a_batch_or_temperature_it_cannot_sample_with():
    with pytest.raises(ValueError, match="temperature=0 must be > 0"):  # n^(1/0): NaN probabilities
        task_probabilities({"a": 3, "b": 1}, "temperature", 0)
    with pytest.raises(ValueError, match="global_batch_size=0 must be > 0"):  # steps of no examples
        MultitaskSampler({"a": 3}, 0)
    with pytest.raises(ValueError, match="micro=2 and accum=0 must be > 0"):
        shard([], 0, 1, 2, 0)
    with pytest.raises(IndexError, match="step -1 must be >= 0"):  # not the last step drawn so far
        MultitaskSampler(SIZES, 8).step(-1)


def test_shard_layout_is_the_documented_one():
    """Micro-batch a of rank r is indices[(a * world + r) * micro : ... + micro]."""
    world, micro, accum = 2, 2, 3
    idx = list(range(100, 100 + world * micro * accum))
    for r in range(world):
        assert shard(idx, r, world, micro, accum) == [idx[(a * world + r) * micro:(a * world + r + 1) * micro]
                                                      for a in range(accum)]


def test_each_task_s_example_order_depends_on_the_seed_and_the_task():
    def order(sampler, task, n_steps=300):
        return [x for t, idx in (sampler.step(i) for i in range(n_steps)) if t == task for x in idx][:40]

    # two tasks of the same size: their examples are shuffled independently
    s = MultitaskSampler({"a": 40, "b": 40}, 4, seed=3)
    assert sorted(order(s, "a")) == sorted(order(s, "b")) == list(range(40))
    assert order(s, "a") != order(s, "b")
    # another seed shuffles a task's examples otherwise (not only its draws of tasks)
    assert order(MultitaskSampler({"a": 40}, 4, seed=3), "a") != order(MultitaskSampler({"a": 40}, 4, seed=4), "a")


@pytest.mark.parametrize("key,value", [("seed", 3), ("sampling", "temperature"), ("temperature", 2.0)])
def test_sampler_state_of_another_seed_or_sampling_is_refused(key, value):
    state = dict(MultitaskSampler(SIZES, 8, seed=2).state_dict(), **{key: value})
    with pytest.raises(ValueError, match=rf"sampler differs .*'{key}': \({value!r}, "):
        MultitaskSampler(SIZES, 8, seed=2).load_state_dict(state)


def test_sampler_state_of_other_tasks_names_them():
    from vlscale.data.real import DataError

    state = MultitaskSampler({"vqa": 50, "gqa": 30}, 8).state_dict()
    with pytest.raises(DataError, match=r"the tasks were \['vqa', 'gqa'\], now \['vqa', 'gqa', 'nlvr2'\]"):
        MultitaskSampler({"vqa": 50, "gqa": 30, "nlvr2": 13}, 8).load_state_dict(state)


def test_a_task_exactly_the_size_of_the_global_batch_is_not_logged(caplog):
    with caplog.at_level("WARNING", logger="vlscale.data.multitask"):
        s = MultitaskSampler({"vqa": 50, "nlvr2": 8}, 8)
    assert "fewer training examples" not in caplog.text
    assert all(len(set(idx)) == 8 for t, idx in (s.step(i) for i in range(40)) if t == "nlvr2")  # no repeats


def test_a_rank_outside_the_world_is_refused_before_anything_loads(tok):
    for rank, world in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ValueError, match=rf"^rank {rank} is outside \[0, world_size={world}\)$"):
            build_train_loader(_cfg(), tok, rank=rank, world_size=world)
        with pytest.raises(ValueError, match=rf"^rank {rank} is outside \[0, world_size={world}\)$"):
            eval_batches(_cfg(), tok, "vqa", "val", 2, rank, world)
    with pytest.raises(ValueError, match=r"^eval batch_size=0 must be > 0$"):
        eval_batches(_cfg(), tok, "vqa", "val", 0)


def test_each_copy_of_an_index_in_a_step_counts_its_earlier_copies(tok):
    """A task smaller than the global batch repeats its examples in a step: the k-th copy is copy k (its own
    VQA answer draw), on one rank as on several."""
    cfg = _cfg("train.micro_batch_size=6", "train.gradient_accumulation_steps=2", "data.tasks=[vqa]",
               "data.synthetic_train=3")
    for step in range(3):
        _, parts = build_train_loader(cfg, tok, vision_transform=_plain_transform)._step_parts(step)
        pairs = [p for micro in parts for p in micro]
        assert len(pairs) == 12
        assert sorted(pairs) == [(i, c) for i in range(3) for c in range(4)]


def test_each_task_s_epochs_continue_across_chunks_of_task_draws():
    """Task draws are made 4096 steps at a time; a task's examples continue where its last step left them, past
    the first and second chunk: every epoch of a task is a permutation of its examples, each one shuffled anew
    (an index stream restarted at a chunk boundary would break an epoch, or replay epoch 0)."""
    sizes = {"a": 40, "b": 24}
    s = MultitaskSampler(sizes, 8, seed=0)
    stream = collections.defaultdict(list)
    for i in range(2 * 4096 + 800):
        task, idx = s.step(i)
        stream[task].extend(idx)
    for task, n in sizes.items():
        epochs = [tuple(stream[task][k:k + n]) for k in range(0, len(stream[task]) - n + 1, n)]
        assert all(sorted(e) == list(range(n)) for e in epochs), task
        assert len(set(epochs)) == len(epochs), task


def test_the_task_draws_depend_on_the_seed_and_differ_from_chunk_to_chunk():
    """The sequence of tasks is the seed's (not only each task's example order), and the draws of steps 4096..8191
    are not those of steps 0..4095 again."""
    def tasks(seed, start, n=4096):
        s = MultitaskSampler(SIZES, 8, seed=seed)
        return [s.step(i)[0] for i in range(start, start + n)]

    assert tasks(0, 0) != tasks(1, 0)
    assert tasks(0, 0) != tasks(0, 4096)


def test_shard_refuses_a_micro_batch_of_none_and_a_negative_rank():
    with pytest.raises(ValueError, match=r"^micro=0 and accum=1 must be > 0$"):  # steps of empty micro-batches
        shard([], 0, 1, 0, 1)
    with pytest.raises(ValueError, match=r"^rank -1 is outside \[0, world_size=2\)$"):  # slices from the end
        shard(list(range(8)), -1, 2, 2, 2)


def test_sharpened_temperature_keeps_the_largest_task_when_sizes_differ_by_orders_of_magnitude():
    """n^(1/T) is normalised by the largest log-weight: sizes 10^6 and 10 at T=0.01 differ by ~1150 in log space,
    past float64's exp (709); normalising by another task's weight would overflow to inf and NaN."""
    p = task_probabilities({"big": 1_000_000, "small": 10}, "temperature", 0.01)
    assert p == {"big": 1.0, "small": 0.0}


@pytest.mark.parametrize("key,value", [("seed", 3), ("sampling", "temperature"), ("temperature", 2.0)])
def test_sampler_state_records_the_seed_and_sampling_it_was_built_with(key, value):
    """A checkpoint's sampler state holds the sampler's own seed / sampling / temperature, so a run resumed with
    another one is refused (not only a state edited by hand)."""
    base = {"seed": 2, "sampling": "proportional", "temperature": 1.0}
    state = MultitaskSampler(SIZES, 8, **dict(base, **{key: value})).state_dict()
    assert state[key] == value
    with pytest.raises(ValueError, match=rf"sampler differs .*'{key}': \({value!r}, {base[key]!r}\)"):
        MultitaskSampler(SIZES, 8, **base).load_state_dict(state)


def test_sampler_state_of_renamed_or_resized_tasks_says_what_changed_and_only_that():
    """A renamed task (same count of tasks) is named as other tasks, not as a reordering; a resized task in the same
    order is named as resized, not also as a reordering."""
    from vlscale.data.real import DataError

    state = MultitaskSampler({"vqa": 50, "gqa": 30}, 8).state_dict()
    with pytest.raises(DataError, match=r"the tasks were \['vqa', 'gqa'\], now \['vqa', 'okvqa'\]") as e:
        MultitaskSampler({"vqa": 50, "okvqa": 30}, 8).load_state_dict(state)
    assert "order" not in str(e.value)
    with pytest.raises(DataError, match="'gqa' had 30 examples, now 29") as e:
        MultitaskSampler({"vqa": 50, "gqa": 29}, 8).load_state_dict(state)
    assert "order" not in str(e.value) and "the tasks were" not in str(e.value)


@pytest.mark.parametrize("key", ["position", "seed", "task_sizes"])
def test_sampler_state_without_a_key_it_reads_is_a_data_error_naming_it(key):
    """Not a bare KeyError ('position'), nor a 'sampler differs' of (None, now) for a signature key."""
    from vlscale.data.real import DataError

    state = MultitaskSampler(SIZES, 8, seed=2).state_dict()
    del state[key]
    with pytest.raises(DataError, match=rf"sampler state lacks \['{key}'\]"):
        MultitaskSampler(SIZES, 8, seed=2).load_state_dict(state)


@pytest.mark.parametrize("key", ["sampler", "step"])
def test_loader_state_without_a_key_it_reads_is_a_data_error_naming_it(tok, key):
    """The loader's own keys are checked as the sampler's are: a DataError naming the key, not a bare KeyError."""
    from vlscale.data.real import DataError

    loader = build_train_loader(_cfg(), tok, vision_transform=_plain_transform)
    state = loader.state_dict()
    del state[key]
    with pytest.raises(DataError, match=rf"TrainLoader.load_state_dict: the saved loader state lacks \['{key}'\]"):
        loader.load_state_dict(state)
