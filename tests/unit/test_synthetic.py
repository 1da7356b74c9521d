"""The synthetic world: deterministic, cached, image-dependent tasks; its tokenizer."""

import collections
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from vlscale.config import load_config
from vlscale.data import load_examples
from vlscale.data import synthetic as syn
from vlscale.data.synthetic import (ANSWER_SPACES, COLORS, answer_prior_baseline, generate_split,
                                    load_split, split_cache_dir, split_params)
from vlscale.data.tasks import Example, get_task

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VLSCALE_CACHE", str(tmp_path / "cache"))


def _same(a, b):
    assert [asdict(e) for e in a.examples] == [asdict(e) for e in b.examples]
    assert list(a.visuals) == list(b.visuals)
    for k in a.visuals:
        va, vb = a.visuals[k], b.visuals[k]
        if isinstance(va, list):
            assert len(va) == len(vb) and all(np.array_equal(x, y) for x, y in zip(va, vb))
        else:
            assert np.array_equal(va, vb)


@pytest.mark.parametrize("task", ["vqa", "nlvr2", "tvqa"])
def test_generation_is_deterministic_and_seeded(task):
    a, b = generate_split(task, "train", 12, seed=3), generate_split(task, "train", 12, seed=3)
    _same(a, b)
    other = generate_split(task, "train", 12, seed=4)
    assert [e.text for e in other.examples] != [e.text for e in a.examples]
    # each example has its own seed: the first n do not depend on how many are asked for
    _same(generate_split(task, "train", 8, seed=3), type(a)(task, "train", a.examples[:8],
                                                            {k: a.visuals[k] for e in a.examples[:8] for k in e.image_ids}))
    # splits differ
    assert [e.text for e in generate_split(task, "val", 12, seed=3).examples] != [e.text for e in a.examples]


@pytest.mark.parametrize("task", ["gqa", "how2qa"])
def test_disk_cache_gives_the_same_data(task, monkeypatch):
    fresh = generate_split(task, "val", 10, seed=1, image_size=32)
    params = split_params(task, "val", 10, 1, 32)
    path = split_cache_dir(params)
    assert not path.exists()
    first = load_split(task, "val", 10, seed=1, image_size=32)
    assert (path / "params.json").exists() and (path / "visual.npz").exists()
    _same(fresh, first)

    def boom(*a, **k):
        raise AssertionError("regenerated although the cache exists")

    monkeypatch.setattr(syn, "generate_split", boom)
    _same(fresh, load_split(task, "val", 10, seed=1, image_size=32))
    # another size / seed / image size is another cache entry
    assert split_cache_dir(split_params(task, "val", 10, 2, 32)) != path
    assert split_cache_dir(split_params(task, "val", 10, 1, 64)) != path


def test_vqa_questions_carry_vqa_v2_answer_types_also_from_a_cache_written_without_them():
    """Existence questions are VQA v2's "yes/no", counting "number", colour and shape "other" (evaluation scores
    each type, the official evaluation's breakdown, which shows what the miniature learns); a cache written before
    the types were recorded reads with the same types."""
    import json

    fresh = generate_split("vqa", "val", 40, seed=1, image_size=16)
    kinds = {(e.extra["qtype"], e.extra["answer_type"]) for e in fresh.examples}
    assert kinds == {("exist", "yes/no"), ("count", "number"), ("color", "other"), ("shape", "other")}
    assert all(e.target in ("yes", "no") for e in fresh.examples if e.extra["answer_type"] == "yes/no")
    load_split("vqa", "val", 40, seed=1, image_size=16)
    path = split_cache_dir(split_params("vqa", "val", 40, 1, 16))
    records = json.loads((path / "examples.json").read_text())
    for r in records:
        del r["extra"]["answer_type"]
    (path / "examples.json").write_text(json.dumps(records))
    _same(fresh, load_split("vqa", "val", 40, seed=1, image_size=16))


def test_a_cache_that_cannot_be_written_names_vlscale_cache(tmp_path, monkeypatch):
    """VLSCALE_CACHE naming a file (or a read-only folder) was a NotADirectoryError traceback naming neither the
    variable nor what to do; the launchers print a DataError in one line."""
    from vlscale.data.real import DataError

    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("VLSCALE_CACHE", str(tmp_path / "a_file" / "sub"))
    with pytest.raises(DataError, match=r"the synthetic world's cache .*a_file/sub/synthetic cannot be written "
                                        r"\(Not a directory\); set VLSCALE_CACHE to a writable folder \(it is '"):
        load_split("vqa", "val", 2, seed=1, image_size=32)


def test_content_params_name_what_decides_an_ids_image():
    """Feature caches of the world record content_params: every generator input but those the id
    carries (task, split, index) and the split size (the first n examples do not depend on it)."""
    cfg = load_config("tiny", ["data.synthetic_seed=3", "data.image_size=32", "data.synthetic_train=7"])
    assert syn.content_params(cfg) == {"generator": syn.GENERATOR_VERSION, "seed": 3, "image_size": 32}
    assert set(split_params("vqa", "train", 7, 3, 32)) - {"task", "split", "n"} == {"version", "seed", "image_size"}
    one = generate_split("vqa", "train", 1, seed=3, image_size=32).visuals["vqa_train_000000"]
    assert not np.array_equal(one, generate_split("vqa", "train", 1, seed=4, image_size=32).visuals["vqa_train_000000"])
    assert one.shape != generate_split("vqa", "train", 1, seed=3, image_size=16).visuals["vqa_train_000000"].shape


def test_shapes_and_record_structure():
    vqa = generate_split("vqa", "train", 40)
    for e in vqa.examples:
        img = vqa.visuals[e.image_ids[0]]
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        assert len(e.references) == 10
        counts = collections.Counter(e.references)
        assert counts[e.target] >= 7 and len(counts) <= 2 and e.target in ANSWER_SPACES[e.extra["qtype"]]
    nlvr = generate_split("nlvr2", "train", 16)
    groups = collections.defaultdict(list)
    for e in nlvr.examples:
        assert e.target in ("true", "false") and len(e.image_ids) == 2
        groups[e.extra["group"]].append(e)
    assert all(len(g) == 4 and len({tuple(x.image_ids) for x in g}) == 1 for g in groups.values())
    assert all(len({x.text for x in g}) == 4 for g in groups.values())
    cap = generate_split("caption", "train", 10)
    assert all(len(e.references) == 5 and len(set(e.references)) >= 4 and e.target == e.references[0]
               for e in cap.examples)
    for task in ("tvqa", "how2qa"):
        sp = generate_split(task, "train", 20)
        for e in sp.examples:
            frames = sp.visuals[e.image_ids[0]]
            assert 4 <= len(frames) <= 8 and frames[0].shape == (64, 64, 3)
            assert len(e.extra["candidates"]) == 5 and e.target in [f"a{i}" for i in range(5)]
            assert e.extra["candidates"][int(e.target[1])] == e.extra["answer_text"]
            assert "subtitle:" in e.text
    for task, has_text in (("tvc", True), ("yc2c", False)):
        for e in generate_split(task, "train", 5).examples:
            assert len(e.references) == 5 and bool(e.text) == has_text


def _oracle(e: Example) -> str:
    """Answer a question from the scene alone (the generator's ground truth), independently."""
    objs = [dict(zip(("color", "shape", "size", "row", "col"), o)) for o in e.extra["scene"][0]]
    words = e.text.rstrip("?").split()
    q = e.extra["qtype"]
    if q == "color":
        return next(o["color"] for o in objs if o["shape"] == words[-1])
    if q == "shape":
        return next(o["shape"] for o in objs if o["color"] == words[-2])
    if q == "count":
        return str(sum(o["shape"] + "s" == words[2] for o in objs))
    if q == "exist":
        return "yes" if any((o["color"], o["shape"]) == (words[-2], words[-1]) for o in objs) else "no"
    ref = next(o for o in objs if (o["color"], o["shape"]) == (words[-2], words[-1]))
    test = {"left": lambda o: o["col"] < ref["col"], "right": lambda o: o["col"] > ref["col"],
            "above": lambda o: o["row"] < ref["row"], "below": lambda o: o["row"] > ref["row"]}[e.extra["relation"]]
    (hit,) = [o for o in objs if test(o)]  # exactly one object stands in the relation
    return hit["color"] if q == "rel_color" else hit["shape"]


@pytest.mark.parametrize("task", ["vqa", "gqa"])
def test_the_scene_determines_the_answer(task):
    sp = generate_split(task, "test", 200)
    for e in sp.examples:
        assert _oracle(e) == e.target, e
    # and the pixels show it: a colour answer's colour is drawn in the image
    for e in sp.examples:
        if e.extra["qtype"] in ("color", "rel_color"):
            img = sp.visuals[e.image_ids[0]].reshape(-1, 3)
            assert (np.abs(img.astype(int) - COLORS[e.target]).sum(1) < 20).sum() >= 20, e.uid


def test_nlvr2_statements_are_true_of_their_images():
    sp = generate_split("nlvr2", "test", 80)
    for e in sp.examples:
        left, right = ([dict(zip(("color", "shape", "size", "row", "col"), o)) for o in s] for s in e.extra["scene"])
        params, fn, text = syn.NLVR_TEMPLATES[e.extra["template"]]
        (p,) = [p for p in params if text(p) == e.text]
        assert fn(left, right, p) == (e.target == "true")


def chance_level(examples: list[Example], task: str) -> float:
    """Expected score of guessing uniformly within each example's answer space (by question type)."""
    scores = []
    for e in examples:
        space = ANSWER_SPACES[e.extra["qtype"]]
        if get_task(task).metric == "vqa_score":
            scores.append(np.mean([syn._mean_score(task, [a], [e]) for a in space]))
        else:
            scores.append(1.0 / len(space))
    return float(np.mean(scores))


@pytest.mark.parametrize("task", ["vqa", "gqa", "nlvr2", "tvqa", "how2qa"])
def test_text_only_baseline_is_near_chance(task):
    # the smallest images: the baseline reads no pixel, and a scene, its question and answer are drawn before its
    # pixels (a video's subtitle, drawn after them, is another draw of the same kind); rendering was most of the time
    train = generate_split(task, "train", 1200, image_size=16).examples
    test = generate_split(task, "test", 400, image_size=16).examples
    base, chance = answer_prior_baseline(train, test, task), chance_level(test, task)
    assert base <= chance + 0.06, (task, base, chance)
    # no question type gives its answer away either (large sample, answer frequencies per type)
    by_type = collections.defaultdict(collections.Counter)
    for e in train:
        key = e.extra.get("question", e.text).split()[:3]
        by_type[(e.extra["qtype"], tuple(key))][e.target] += 1
    for (qtype, key), counts in by_type.items():
        n = sum(counts.values())
        if n >= 100:
            assert max(counts.values()) / n <= 1 / len(ANSWER_SPACES[qtype]) + 0.12, (task, key, counts)


def test_baseline_catches_a_leak():
    """The baseline is not blind: answers written into the question are found."""
    train = generate_split("gqa", "train", 300).examples
    test = generate_split("gqa", "test", 100).examples
    leak = lambda ex: [Example(e.task, e.uid, f"{e.text} {e.target}", e.target, e.image_ids, e.references, e.extra)
                       for e in ex]
    assert answer_prior_baseline(leak(train), leak(test), "gqa") > 0.6
    assert answer_prior_baseline(train, test, "gqa") < 0.35


def test_load_examples_from_config_and_errors():
    cfg = load_config("tiny", ["data.synthetic_train=12", "data.synthetic_eval=6", "data.image_size=32"])
    ex = load_examples(cfg, "vqa", "train")
    assert len(ex) == 12 and len(load_examples(cfg, "vqa", "val")) == 6
    with pytest.raises(KeyError, match="unknown task 'vqa2'"):
        load_examples(cfg, "vqa2", "train")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        generate_split("vqa", "dev", 5)


def test_bad_sizes_are_refused_naming_the_value():
    with pytest.raises(ValueError, match=r"synthetic vqa/train: number of examples must be > 0, got 0"):
        generate_split("vqa", "train", 0)
    with pytest.raises(ValueError, match=r"data.image_size=15 is too small for the synthetic world \(>= 16\)"):
        generate_split("vqa", "train", 2, image_size=15)
    assert generate_split("vqa", "train", 1, image_size=16).visuals["vqa_train_000000"].shape == (16, 16, 3)


@pytest.mark.parametrize("n", [1, 6, 7])
def test_nlvr2_sizes_that_are_not_a_multiple_of_a_group(n):
    """n examples exactly, also when n is not a multiple of the 4 statements of an image pair: the last pair
    gives the statements that are left, and both its images are there."""
    sp = generate_split("nlvr2", "train", n, image_size=16)
    assert [e.uid for e in sp.examples] == [f"nlvr2_train_{i:06d}" for i in range(n)]
    groups = -(-n // syn.NLVR_STATEMENTS_PER_PAIR)
    assert sorted(sp.visuals) == sorted(f"nlvr2_train_{g:06d}_{side}" for g in range(groups) for side in "01")
    assert all(i in sp.visuals for e in sp.examples for i in e.image_ids)


def test_a_shapes_size_is_drawn():
    """Captions say "a small / a large X": the pixels show which (a large shape covers over twice the area)."""
    rng = np.random.default_rng(0)
    area = {}
    for size in ("small", "large"):
        img = syn.render_scene([{"color": "red", "shape": "circle", "size": size, "x": 0.5, "y": 0.5}], 64, rng)
        area[size] = int((np.abs(img.astype(int) - COLORS["red"]).sum(-1) == 0).sum())
    assert area["small"] > 0 and area["large"] > 2 * area["small"], area


def test_an_unreadable_cache_is_named_and_a_finished_one_is_kept(monkeypatch):
    """A cache entry another process finished first (the rename onto it fails) is kept, and the temporary
    folder removed; a corrupt entry is a RuntimeError naming its folder, not a bare numpy error."""
    data = generate_split("vqa", "val", 3, seed=1, image_size=16)
    params = split_params("vqa", "val", 3, 1, 16)
    path = split_cache_dir(params)
    syn._save(data, params, path)
    syn._save(data, params, path)  # a second writer: its data are the same
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    _same(data, load_split("vqa", "val", 3, seed=1, image_size=16))
    (path / "visual.npz").write_bytes(b"not a zip file")
    with pytest.raises(RuntimeError, match=rf"synthetic cache {path} is unreadable .*; delete it to regenerate"):
        load_split("vqa", "val", 3, seed=1, image_size=16)


def test_a_config_split_is_loaded_once_per_cache_folder(tmp_path, monkeypatch):
    cfg = load_config("tiny", ["data.synthetic_eval=3", "data.image_size=16"])
    first = syn.synthetic_split(cfg, "gqa", "val")
    assert syn.synthetic_split(cfg, "gqa", "val") is first
    monkeypatch.setenv("VLSCALE_CACHE", str(tmp_path / "other"))
    other = syn.synthetic_split(cfg, "gqa", "val")
    assert other is not first and (split_cache_dir(split_params("gqa", "val", 3, cfg.data.synthetic_seed, 16))
                                   / "params.json").exists()
    _same(first, other)


def test_baselines_refuse_what_they_cannot_score():
    with pytest.raises(ValueError, match=r"answer_prior_baseline\('vqa'\): need non-empty train and test"):
        answer_prior_baseline([], generate_split("vqa", "test", 2, image_size=16).examples, "vqa")


# ----------------------------------------------------------------------------- tokenizer

def test_synthetic_tokenizer_ids_and_world_text():
    from vlscale.data.synthetic import world_corpus
    from vlscale.data.tokenizer import build_tokenizer

    tok = build_tokenizer(load_config("tiny"))
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.bos_token_id) == (0, 1, 2, 3)
    assert 600 <= len(tok) <= 1100
    assert tok.convert_tokens_to_ids("<extra_id_0>") == len(tok) - 1
    for line in world_corpus(30, seed=99):
        ids = tok(line)["input_ids"]
        assert ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids, line
        assert tok.decode(ids, skip_special_tokens=True) == line
    # whole words of the world are single pieces
    assert len(tok("what color is the diamond?")["input_ids"]) == 7
    bart = build_tokenizer(load_config("tiny", ["model.backbone=tiny-bart", "model.extra_special_tokens=3"]))
    assert len(bart) == len(tok) + 3 and bart.bos_token_id == 3
    ids = bart.convert_tokens_to_ids(["<vis_extra_id_2>", "<vis_extra_id_0>"])
    assert ids == [len(tok), len(tok) + 2]
    assert bart("<vis_extra_id_1> red")["input_ids"][0] == len(tok) + 1


def test_tokenizer_errors_name_the_source(tmp_path):
    from vlscale.data.tokenizer import build_tokenizer

    cfg = load_config("tiny", [f"model.tokenizer={tmp_path / 'nope'}"])
    from vlscale.config import ConfigError

    with pytest.raises(OSError, match="model.tokenizer=") as info:  # still an OSError, and a ConfigError:
        build_tokenizer(cfg)                                           # train.py prints its one line
    assert isinstance(info.value, ConfigError)


def test_a_hub_backbones_tokenizer_is_asked_for_under_the_registrys_hub_id(monkeypatch):
    """model.backbone=t5-small (no backbone_path, no model.tokenizer) takes its tokenizer from the hub id its weights
    load from (google-t5/t5-small, what an offline HF cache holds), and a failure names that id and the key."""
    from transformers import AutoTokenizer

    from vlscale.config import SourceError
    from vlscale.data.tokenizer import build_tokenizer

    asked = []

    def from_pretrained(source, *args, **kwargs):
        asked.append(source)
        raise OSError("no network here")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", from_pretrained)
    with pytest.raises(SourceError, match=r"cannot load the tokenizer for model\.backbone='google-t5/t5-small' \(a "
                                          r"hub id needs the network.*; to use a hub id without network here, download "
                                          r"it once where there is \(hf download google-t5/t5-small --local-dir DIR\) "
                                          r"and give model\.backbone_path=DIR$"):  # it said no more than 'network'
        build_tokenizer(load_config("tiny", ["model.backbone=t5-small"]))
    assert asked == ["google-t5/t5-small"]
    # model.tokenizer's hub id: the folder goes there (model.backbone_path=DIR would leave the tokenizer on the hub)
    with pytest.raises(SourceError, match=r"\(hf download google/flan-t5-base --local-dir DIR\) and give "
                                          r"model\.tokenizer=DIR$"):
        build_tokenizer(load_config("tiny", ["model.backbone=t5-small", "model.tokenizer=google/flan-t5-base"]))


def _bart_convention_tokenizer(folder):
    """A small tokenizer folder with BART's special ids: <s> 0, <pad> 1, </s> 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<s>", "<pad>", "</s>", "<unk>", "what", "color", "red", "?"])}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)
    return folder


def test_tokenizer_whose_special_ids_are_not_the_models_is_refused(tmp_path):
    """Targets end in the tokenizer's eos and generation stops at the config's: a tokenizer of other
    conventions trained a model that never stops. One line naming both, before anything is built."""
    from vlscale.config import ConfigError
    from vlscale.data.tokenizer import build_tokenizer

    folder = _bart_convention_tokenizer(tmp_path / "bart_tok")
    with pytest.raises(ConfigError) as info:
        build_tokenizer(load_config("tiny", ["model.backbone=mini-t5", "model.pretrained=true",
                                             f"model.tokenizer={folder}"]))
    msg = str(info.value)
    assert "\n" not in msg and f"model.tokenizer={folder}" in msg and "mini-t5/config.json" in msg
    assert "pad_token_id 1 vs 0" in msg and "eos_token_id 2 vs 1" in msg
    with pytest.raises(ConfigError, match=r"synthetic_spm.model and model config the registry's bart-base config "
                                          r"disagree: pad_token_id 0 vs 1; eos_token_id 1 vs 2; decoder_start"):
        build_tokenizer(load_config("tiny", ["model.backbone=bart-base", "model.tokenizer=synthetic"]))
    # the conventions that belong together pass: BART's with bart-base, T5's (the synthetic one) with T5,
    # the shipped miniatures with the tokenizer files they ship
    assert build_tokenizer(load_config("tiny", ["model.backbone=bart-base", f"model.tokenizer={folder}"]))
    assert build_tokenizer(load_config("tiny", ["model.backbone=t5-base", "model.tokenizer=synthetic"]))
    for name in ("mini-t5", "mini-bart"):
        for extra in ([], [f"model.tokenizer={ROOT / 'vlscale/assets/backbones' / name}"]):
            assert build_tokenizer(load_config("tiny", [f"model.backbone={name}", "model.pretrained=true", *extra]))


def test_special_ids_may_be_a_list_in_the_config_and_the_decoder_may_start_at_bos():
    """A config may list several eos ids (generation stops at any): the tokenizer's one among them passes, one
    outside them is named. The decoder start may be the tokenizer's bos as well as its pad or eos."""
    from types import SimpleNamespace

    from vlscale.config import ConfigError
    from vlscale.data.tokenizer import check_special_ids

    tok = SimpleNamespace(pad_token_id=0, eos_token_id=1, bos_token_id=3)
    check_special_ids(tok, SimpleNamespace(pad_token_id=0, eos_token_id=[5, 1], decoder_start_token_id=3), "t", "c")
    with pytest.raises(ConfigError, match=r"^tokenizer t and model config c disagree: eos_token_id 1 vs \[5, 6\] "
                                          r"\(tokenizer vs model\)"):
        check_special_ids(tok, SimpleNamespace(pad_token_id=0, eos_token_id=[5, 6], decoder_start_token_id=0), "t", "c")
    with pytest.raises(ConfigError, match=r"decoder_start_token_id 4 is none of the tokenizer's pad/eos/bos "
                                          r"\[0, 1, 3\]"):
        check_special_ids(tok, SimpleNamespace(pad_token_id=0, eos_token_id=1, decoder_start_token_id=4), "t", "c")


def test_a_folder_given_as_the_sentencepiece_model_or_a_tokenizer_without_pad_is_named(tmp_path):
    """A folder where the .model file belongs is said to be no file (not "unreadable"); a tokenizer without a
    pad token (batches could not be padded) is refused naming it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from vlscale.data.tokenizer import build_tokenizer, synthetic_tokenizer

    with pytest.raises(ValueError, match=rf"^synthetic tokenizer model {tmp_path} is not a file"):
        synthetic_tokenizer(tmp_path)
    vocab = {w: i for i, w in enumerate(["<s>", "<unk>", "</s>", "red"])}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder = tmp_path / "no_pad"
    PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(
        folder)
    with pytest.raises(ValueError, match=r"tokenizer '.*no_pad' has no pad token"):
        build_tokenizer(load_config("tiny", ["model.backbone=bart-base", f"model.tokenizer={folder}"]))


def test_a_missing_sentencepiece_model_is_file_not_found_saying_how_to_remake_it(tmp_path):
    """The shipped synthetic_spm.model deleted (or a path to none): FileNotFoundError naming it and the script that
    makes it, not the "is not a file" of a folder given in its place."""
    from vlscale.data.tokenizer import synthetic_tokenizer

    gone = tmp_path / "gone.model"
    with pytest.raises(FileNotFoundError, match=rf"^synthetic tokenizer model {gone} is missing; regenerate it with: "
                                                r"python scripts/make_tokenizer\.py$"):
        synthetic_tokenizer(gone)


def test_a_sentencepiece_model_with_other_special_ids_is_refused_naming_the_file_and_its_ids(tmp_path):
    """The synthetic tokenizer's ids are T5's (pad 0, eos 1, unk 2) and bos 3, as the tiny backbones' configs take
    them. A model trained with other ids (here SentencePiece's own order: unk 0, bos 1, eos 2, then pad 3) would
    give batches the model reads otherwise; it is refused naming the file and the ids it has."""
    import io
    import re

    import sentencepiece as spm

    from vlscale.data.tokenizer import synthetic_tokenizer

    lines = ["the red cube is left of the blue ball", "a dog runs on the grass", "what color is the cube"] * 5
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, model_type="unigram",
                                   vocab_size=40, hard_vocab_limit=False, character_coverage=1.0,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=3, num_threads=1, minloglevel=2)
    other = tmp_path / "other_ids.model"
    other.write_bytes(model.getvalue())
    with pytest.raises(ValueError, match=rf"^{re.escape(str(other))}: expected pad/eos/unk/bos ids \(0, 1, 2, 3\), "
                                         r"got \(3, 2, 0, 1\)$"):
        synthetic_tokenizer(other)
    tok = synthetic_tokenizer()  # the shipped model passes the check
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.bos_token_id) == (0, 1, 2, 3)


def test_shipped_tokenizer_covers_the_world():
    """Every word the generator writes is one piece of the shipped model (re-run
    scripts/make_tokenizer.py after changing the generator's wording)."""
    import sentencepiece as spm

    from vlscale.data.synthetic import world_corpus
    from vlscale.data.tokenizer import SYNTHETIC_SPM

    sp = spm.SentencePieceProcessor(model_file=str(SYNTHETIC_SPM))
    words = {w.strip(".,:?!") for line in world_corpus(60, seed=7) for w in line.split()}
    split = sorted(w for w in words if w and not any(c.isdigit() for c in w) and len(sp.encode(w)) > 1)
    assert not split, f"words split into several pieces: {split[:20]}"


def test_the_special_ids_are_checked_against_the_backbone_folders_config_and_a_folder_without_tokenizer_is_named(
        tmp_path):
    """With model.backbone_path the weights load with that folder's config.json: the tokenizer is checked against
    it, not against the registry's config of the backbone's name. A tokenizer folder without tokenizer files is
    one line naming the key and the folder."""
    import json

    from vlscale.config import ConfigError
    from vlscale.data.tokenizer import build_tokenizer

    folder = tmp_path / "lm"
    folder.mkdir()
    config = json.loads((ROOT / "vlscale/assets/backbones/mini-t5/config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, eos_token_id=5)))
    with pytest.raises(ConfigError, match=r"lm/config\.json disagree: eos_token_id 1 vs 5 \(tokenizer vs model\)"):
        build_tokenizer(load_config("tiny", ["model.backbone=mini-t5", f"model.backbone_path={folder}",
                                             "model.pretrained=true", "model.tokenizer=synthetic"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"^cannot load the tokenizer for model\.tokenizer='.*empty' \(a hub id "):
        build_tokenizer(load_config("tiny", [f"model.tokenizer={tmp_path / 'empty'}"]))
    # a folder with the model's config.json and no tokenizer files: transformers builds a tokenizer of special
    # tokens only from it (every word <unk>), refused naming the files looked for
    from vlscale.modeling.backbones import lm_config

    lm_config("t5-small").save_pretrained(tmp_path / "t5")
    for key in ("model.tokenizer", "model.backbone_path"):
        with pytest.raises(ConfigError, match=rf"^{re.escape(key)}='.*t5' holds no tokenizer vocabulary \(none of "
                                              r"\['spiece\.model', 'tokenizer\.json'\]; transformers would build a "
                                              r"T5Tokenizer of \d+ special tokens"):
            build_tokenizer(load_config("tiny", ["model.backbone=t5-small", "model.tokenizer=null",
                                                 f"{key}={tmp_path / 't5'}", "model.pretrained=true"]))


def test_random_weights_check_the_tokenizer_against_the_registrys_config_not_a_folder_of_the_hub_ids_name(
        tmp_path, monkeypatch):
    """model.pretrained=false builds the LM from the registry's config: a folder in the working directory named
    like the backbone's hub id (whose config.json from_pretrained would read) is not what the run builds, so its
    other eos id is no reason to refuse; with model.pretrained=true it is, and the refusal names its config.json."""
    import json

    from vlscale.config import ConfigError
    from vlscale.data.tokenizer import build_tokenizer
    from vlscale.modeling.backbones import lm_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "google-t5").mkdir()
    lm_config("t5-small").save_pretrained(tmp_path / "google-t5/t5-small")
    config = json.loads((tmp_path / "google-t5/t5-small/config.json").read_text())
    (tmp_path / "google-t5/t5-small/config.json").write_text(json.dumps(dict(config, eos_token_id=5)))
    overrides = ["model.backbone=t5-small", "model.tokenizer=synthetic"]
    assert build_tokenizer(load_config("tiny", [*overrides, "model.pretrained=false"])).eos_token_id == 1
    with pytest.raises(ConfigError, match=r"t5-small/config\.json disagree: eos_token_id 1 vs 5"):
        build_tokenizer(load_config("tiny", [*overrides, "model.pretrained=true"]))


def test_visual_sentinels_are_special_tokens_down_to_one():
    """model.extra_special_tokens=N adds <vis_extra_id_{N-1}> ... <vis_extra_id_0>, each one token and special: a
    prediction decoded with skip_special_tokens drops them as it drops eos; N=1 adds its one sentinel too."""
    from vlscale.data.tokenizer import build_tokenizer

    base = len(build_tokenizer(load_config("tiny")))
    one = build_tokenizer(load_config("tiny", ["model.extra_special_tokens=1"]))
    assert len(one) == base + 1 and one.convert_tokens_to_ids("<vis_extra_id_0>") == base
    two = build_tokenizer(load_config("tiny", ["model.extra_special_tokens=2"]))
    ids = two("red <vis_extra_id_1> blue <vis_extra_id_0>")["input_ids"]
    assert ids.count(base) == 1 and ids.count(base + 1) == 1
    assert two.decode(ids, skip_special_tokens=True) == "red blue"


# ----------------------------------------------------------------------------- what the pixels show

def _centroid(img, color):
    """(x, y) in [0, 1] of the pixels drawn in exactly ``color`` (the background's noise never is), and their count."""
    ys, xs = np.nonzero((img.astype(int) == COLORS[color]).all(-1))
    s = img.shape[0]
    return ((xs.mean() + 0.5) / s, (ys.mean() + 0.5) / s, len(xs)) if len(xs) else (None, None, 0)


@pytest.mark.parametrize("task", ["vqa", "gqa"])
def test_each_object_is_drawn_in_the_cell_its_scene_record_names(task):
    """GQA's "left of" / "above" and the oracle read (row, col) from the scene record: the image must put the object
    there, column across and row down (a transposed image turns "left of" into "above")."""
    sp = generate_split(task, "test", 60, image_size=48)
    checked = 0
    for e in sp.examples:
        scene = e.extra["scene"][0]
        colors = collections.Counter(o[0] for o in scene)
        for color, _shape, _size, row, col in scene:
            if colors[color] == 1:
                x, y, _ = _centroid(sp.visuals[e.image_ids[0]], color)
                assert (int(x * 3), int(y * 3)) == (col, row), (e.uid, color, row, col, x, y)
                checked += int(row != col)
    assert checked > 50


def test_a_videos_objects_move_the_way_its_labels_say_and_stay_in_the_frame():
    """tvqa / how2qa answers and tvc / yc2c captions say which way each object moves: in the frames it moves that
    way (up is towards the top row) by a visible distance, or stands still, and stays whole in every frame."""
    moved = collections.Counter()
    for task in ("tvqa", "tvc"):
        sp = generate_split(task, "train", 60, image_size=48)
        for e in sp.examples:
            if len(e.extra["motions"]) != 1:  # one object: no other object passes over it
                continue
            (direction,) = e.extra["motions"]
            color = e.extra["scene"][0][0][0]
            frames = sp.visuals[e.image_ids[0]]
            path = [_centroid(f, color) for f in frames]
            dx, dy = path[-1][0] - path[0][0], path[-1][1] - path[0][1]
            want = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}[direction]
            for got, sign in ((dx, want[0]), (dy, want[1])):
                ok = got > 0.2 if sign > 0 else got < -0.2 if sign < 0 else abs(got) < 0.02
                assert ok, (e.uid, direction, dx, dy)
            assert min(p[2] for p in path) >= 0.8 * max(p[2] for p in path), (e.uid, direction, [p[2] for p in path])
            moved[direction] += 1
    assert set(moved) == {"left", "right", "up", "down", "still"}, moved


def test_annotators_give_the_gold_7_to_10_times_and_otherwise_one_alternative_from_the_answer_space():
    """The other answers are one plausible alternative of the question's type (a count one off, within 0-3), never
    the gold itself: a question's 10 answers are all gold in about a quarter of the examples (7-10 drawn evenly)."""
    sp = generate_split("vqa", "train", 400, image_size=16)
    all_gold = collections.defaultdict(list)
    for e in sp.examples:
        space = ANSWER_SPACES[e.extra["qtype"]]
        assert set(e.references) <= set(space), (e.uid, e.references)
        counts = collections.Counter(e.references)
        assert 7 <= counts[e.target] <= 10 and len(counts) <= 2, (e.uid, e.references)
        if e.extra["qtype"] == "count" and len(counts) == 2:
            (alt,) = set(counts) - {e.target}
            assert abs(int(alt) - int(e.target)) == 1, (e.uid, e.references)
        all_gold[e.extra["qtype"]].append(counts[e.target] == 10)
    for qtype, flags in all_gold.items():
        assert 0.1 <= np.mean(flags) <= 0.4, (qtype, np.mean(flags), len(flags))


def test_gqa_scenes_hold_other_objects_besides_the_two_the_question_names():
    """The question needs its relation: 0-2 distractors stand outside it, so a scene holds 2, 3 or 4 objects."""
    examples = generate_split("gqa", "train", 100, image_size=16).examples
    sizes = collections.Counter(len(e.extra["scene"][0]) for e in examples)
    assert set(sizes) == {2, 3, 4}, sizes


def test_a_cache_of_examples_with_other_fields_is_named(monkeypatch):
    """An examples.json whose records have fields Example does not (written by other code) is the cache's fault:
    a RuntimeError naming the folder, not a TypeError from the Example constructor."""
    import json

    load_split("vqa", "val", 2, seed=1, image_size=16)
    path = split_cache_dir(split_params("vqa", "val", 2, 1, 16))
    records = json.loads((path / "examples.json").read_text())
    (path / "examples.json").write_text(json.dumps([dict(r, answer_type="other") for r in records]))
    with pytest.raises(RuntimeError, match=rf"synthetic cache {path} is unreadable .*answer_type.*; delete it"):
        load_split("vqa", "val", 2, seed=1, image_size=16)


def test_nlvr2_draws_again_statements_no_image_pair_can_meet():
    """Some drawn statement sets cannot all hold of one pair (three true "exactly" statements need three sides):
    they are drawn again rather than tried until the generator gives up, so a large split (500 pairs here, which
    meet such sets) is generated."""
    sp = generate_split("nlvr2", "train", 2000, seed=0, image_size=16)
    assert len(sp) == 2000 and len(sp.visuals) == 1000


# ----------------------------------------------------------------------------- truth read from the text

def _nlvr2_oracle(text: str, left: list, right: list) -> bool:
    """A statement's truth read from its words and the two scenes alone (not from NLVR_TEMPLATES)."""
    side = {"left": left, "right": right}
    if m := re.fullmatch(r"the (left|right) image contains a (\w+) (\w+)\.", text):
        return any((o["color"], o["shape"]) == (m[2], m[3]) for o in side[m[1]])
    if m := re.fullmatch(r"both images contain a (\w+)\.", text):
        return all(any(o["shape"] == m[1] for o in objs) for objs in (left, right))
    if m := re.fullmatch(r"each image contains a (\w+) object\.", text):
        return all(any(o["color"] == m[1] for o in objs) for objs in (left, right))
    if m := re.fullmatch(r"there are more (\w+)s in the left image than in the right image\.", text):
        return sum(o["shape"] == m[1] for o in left) > sum(o["shape"] == m[1] for o in right)
    m = re.fullmatch(r"the (left|right) image has exactly (\w+) objects?\.", text)
    return len(side[m[1]]) == ("zero", "one", "two", "three", "four").index(m[2])


def test_each_nlvr2_statement_says_what_its_image_pair_shows():
    """The label of every template ("contains" on the side it names, "both" / "each" of both images, "more" strictly,
    "exactly" of the side it names) agrees with the statement's words read against the scenes; every template
    occurs both true and false."""
    seen = set()
    for e in generate_split("nlvr2", "test", 400, image_size=16).examples:
        left, right = ([dict(zip(("color", "shape", "size", "row", "col"), o)) for o in s] for s in e.extra["scene"])
        assert _nlvr2_oracle(e.text, left, right) == (e.target == "true"), (e.uid, e.text, e.extra["scene"])
        seen.add((e.extra["template"], e.target))
    assert seen == {(t, v) for t in syn.NLVR_TEMPLATES for v in ("true", "false")}, seen


@pytest.mark.parametrize("task", ["tvqa", "how2qa"])
def test_a_video_question_names_one_object_and_is_answered_by_it(task):
    """"Which colour moves left" has one mover going left (another going the same way would make two right answers);
    "which way does the red circle move" names one object, and the answer is its motion."""
    phrases = syn._VIDEO_Q[task]["answers"]  # direction -> the answer's words
    kinds = collections.Counter()
    for e in generate_split(task, "train", 200, image_size=16).examples:
        objs = [dict(color=o[0], shape=o[1], direction=d) for o, d in zip(e.extra["scene"][0], e.extra["motions"])]
        words = e.extra["question"].rstrip("?").split()
        if e.extra["answer_text"] in COLORS:
            (d,) = [d for d, p in phrases.items() if e.extra["question"].rstrip("?").endswith(" " + p)]
            movers = [o for o in objs if o["direction"] == d]
            assert len(movers) == 1 and movers[0]["color"] == e.extra["answer_text"], (e.uid, e.text, objs)
        else:
            at = words.index("the")
            named = [o for o in objs if (o["color"], o["shape"]) == tuple(words[at + 1:at + 3])]
            assert len(named) == 1 and phrases[named[0]["direction"]] == e.extra["answer_text"], (e.uid, e.text, objs)
        kinds[e.extra["answer_text"] in COLORS] += 1
    assert set(kinds) == {True, False}, kinds


def test_chance_level_is_the_expected_score_of_a_uniform_guess():
    """1 / |answer space| per question type (nlvr2 1/2, tvqa 1/5, gqa 1/6 or 1/4); VQA scores each guess against
    the 10 answers, so a question all ten annotators answered "red" is 1/6 too."""
    def ex(task, qtype, refs=()):
        return Example(task, "u", "q", refs[0] if refs else "x", ["i"], list(refs), {"qtype": qtype})
    assert chance_level([ex("nlvr2", "statement")], "nlvr2") == pytest.approx(1 / 2)
    assert chance_level([ex("tvqa", "choice")], "tvqa") == pytest.approx(1 / 5)
    assert chance_level([ex("gqa", "rel_color"), ex("gqa", "rel_shape")], "gqa") == pytest.approx((1 / 6 + 1 / 4) / 2)
    assert chance_level([ex("vqa", "color", ["red"] * 10)], "vqa") == pytest.approx(1 / 6)
    assert chance_level([ex("vqa", "count", ["2"] * 10)], "vqa") == pytest.approx(1 / 4)


def _qa(uid, question, target, text=None):
    extra = {"qtype": "rel_color"} if text is None else {"qtype": "rel_color", "question": question}
    return Example("gqa", uid, text if text is not None else question, target, ["i"], [target], extra)


def test_the_baseline_keys_answers_on_the_first_words_and_on_the_whole_question():
    """Each prior is tried: an answer told by the first two words (the rest unseen words) is found by the first-2
    prior alone; one told by the order of words 4-5 (the bag of words the same) by the whole-question prior alone,
    which reads extra["question"] where a loader gives it (the text then also holds words the question has not)."""
    def pairs(a, b, n):
        return [_qa(f"{a}{i}", f"aa bb {a}{i}", "x") for i in range(n)] + [_qa(f"{b}{i}", f"bb aa {b}{i}", "y")
                                                                         for i in range(n)]
    assert answer_prior_baseline(pairs("t", "u", 10), pairs("e", "f", 5), "gqa") == 1.0
    order = [("q q q aa bb", "x"), ("q q q bb aa", "y")]
    train = [_qa(f"t{i}{j}", q, a, f"{q} n{i}{j}") for i in range(6) for j, (q, a) in enumerate(order)]
    test = [_qa(f"e{i}{j}", q, a, f"{q} m{i}{j}") for i in range(3) for j, (q, a) in enumerate(order)]
    assert answer_prior_baseline(train, test, "gqa") == 1.0


def test_the_baseline_tries_how_often_a_candidates_text_was_gold_when_offered():
    """For multiple choice, "blue" gold each of the 2 times it was offered beats "red" gold 4 times of 10 (naive Bayes
    over the answer texts counts golds, not the rate); positions alone are at chance here."""
    def choice(uid, cands, gold, shift):
        cands = cands[shift % 5:] + cands[:shift % 5]
        return Example("tvqa", uid, "q", f"a{cands.index(gold)}", ["i"], [f"a{cands.index(gold)}"],
                       {"qtype": "choice", "question": "q", "candidates": cands})

    def fill(i, n):  # candidates named nowhere else
        return [f"w{i}x{k}" for k in range(n)]
    train = ([choice(f"r{i}", ["red"] + fill(i, 4), "red", i) for i in range(4)]
             + [choice(f"b{i}", ["red", "blue"] + fill(4 + i, 3), "blue", i) for i in range(2)]
             + [choice(f"g{i}", ["red"] + fill(6 + i, 4), f"w{6 + i}x0", i) for i in range(4)])
    test = [choice(f"e{i}", ["red", "blue"] + fill(10 + i, 3), "blue", i) for i in range(5)]
    assert answer_prior_baseline(train, test, "tvqa") == 1.0


def test_naive_bayes_smooths_add_one_and_weighs_the_class_prior():
    """Worked by hand: "x" is trained on "p" twice, "y" on "q" once (vocabulary {p, q}). "p q" scores x 3/4 * 1/4 *
    prior 2/3 = 1/8 and y 1/3 * 2/3 * prior 1/3 = 2/27: "x". Without the prior y wins (2/9 > 3/16); without the add-one
    both are 0 (a tie goes to the larger label, y); without the vocabulary's size in the denominator x scores
    3/2 * 1/2 * 2/3 = 1/2 < y's 2 * 1/3 = 2/3. Words unseen in training are skipped: "z z p q" is "x" too (counted,
    each z would multiply x by 1/4 and y by 1/3, and y would win: 1/128 < 2/243)."""
    train = [_qa("t0", "p", "x"), _qa("t1", "p", "x"), _qa("t2", "q", "y")]
    test = [_qa("e0", "p q", "x"), _qa("e1", "z z p q", "x")]
    assert syn._naive_bayes(train, test, lambda e: e.target) == ["x", "x"]


def test_a_question_unseen_in_training_falls_back_to_the_most_frequent_answer():
    """"aa bb" -> x three times, "bb aa" -> y twice: the whole-question prior answers "bb aa" with y and the unseen
    "cc dd" with the overall majority, x; no other prior gets both (the overall one says x twice, naive Bayes reads
    the same bag of words in both orders and says x). The majority's tie-break does not depend on the order."""
    train = [_qa(f"x{i}", "aa bb", "x") for i in range(3)] + [_qa(f"y{i}", "bb aa", "y") for i in range(2)]
    assert answer_prior_baseline(train, [_qa("e0", "bb aa", "y"), _qa("e1", "cc dd", "x")], "gqa") == 1.0
    assert syn._majority("yxx") == "x" and syn._majority("xyyx") == syn._majority("yxxy")


def test_a_caption_names_each_object_of_its_scene_where_it_is_drawn():
    """Every caption reference names each object of the scene ("a small red circle") and no other; the counting
    reference says how many there are and puts each at the top / middle / bottom of its row in the scene (the row
    is what the image shows down the picture, see test_each_object_is_drawn_in_the_cell_its_scene_record_names)."""
    numbers, rows = ("zero", "one", "two", "three"), ("top", "middle", "bottom")
    seen_rows = set()
    for e in generate_split("caption", "train", 60, image_size=16).examples:
        objs = [dict(zip(("color", "shape", "size", "row", "col"), o)) for o in e.extra["scene"][0]]
        phrases = [f"a {o['size']} {o['color']} {o['shape']}" for o in objs]
        for ref in e.references[:4]:
            found = re.findall(r"a (?:small|large) \w+ \w+", ref)
            assert sorted(found) == sorted(phrases), (e.uid, ref, objs)
        m = re.fullmatch(r"(\w+) shapes?: (.*)\.", e.references[4])
        assert m and m[1] == numbers[len(objs)], (e.uid, e.references[4], objs)
        placed = re.findall(r"(a (?:small|large) \w+ \w+) at the (\w+)", m[2])
        assert sorted(placed) == sorted((p, rows[o["row"]]) for p, o in zip(phrases, objs)), (e.uid, m[2], objs)
        seen_rows.update((o["row"], o["col"]) for o in objs if o["row"] != o["col"])
    assert len(seen_rows) >= 4, seen_rows  # objects off the diagonal: a row read as a column is told apart


def test_a_video_caption_says_how_each_object_moves():
    """tvc / yc2c references name each object of the clip with its motion (the one the frames show, see
    test_a_videos_objects_move_the_way_its_labels_say_and_stay_in_the_frame): "moves left", "goes up", "standing
    still"; a caption without the direction cannot be learned from the video. Each task's clips show all five motions
    the world has (the module's docstring: left / right / up / down or standing still)."""
    still = ("stays still", "does not move", "standing still")
    for task in ("tvc", "yc2c"):
        motions = collections.Counter()
        for e in generate_split(task, "train", 30, image_size=16).examples:
            objs = [(o[0], o[1], d) for o, d in zip(e.extra["scene"][0], e.extra["motions"])]
            for ref in e.references:
                said = re.findall(r"(\w+) (\w+) (?:moves|goes|moving) (left|right|up|down)\b", ref)
                said += [(c, s, "still") for c, s, _ in re.findall(rf"(\w+) (\w+) ({'|'.join(still)})", ref)]
                assert sorted(said) == sorted(objs), (e.uid, ref, objs)
            motions.update(e.extra["motions"])
        assert set(motions) == {"left", "right", "up", "down", "still"}, (task, motions)
