"""A researcher's own task in a built-in task's format (data.custom_tasks): declared in the run config, it is a
task of its own everywhere a task name is looked up (vlscale.data.tasks.get_task), reads its own folder under
data.root with its format's file names, is scored and written as its format is, and gets per-task modules of its
own; bad declarations are refused naming the key and the value. The fixtures: tests/fixtures/real_data's vqa/ copied
to okvqa/ (COCO's images copied into okvqa/images/) and coco/ copied to flickr/."""

import json
import shutil
from pathlib import Path

import pytest

from vlscale.config import ConfigError, load_config
from vlscale.data import check_split_found, load_examples
from vlscale.data.real import DataError, real_visual_source
from vlscale.data.tasks import get_task

REAL = Path(__file__).resolve().parents[1] / "fixtures" / "real_data"
DECLARED = "data.custom_tasks={okvqa: {like: vqa}, flickr: {like: caption, prefix: 'flickr caption:'}}"
TINY = ["model.vision=tiny-clip-rn", "model.vision_pretrained=null", "model.feature_source=images"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("custom_root")
    for name in ("vqa", "coco"):
        shutil.copytree(REAL / name, root / name)
    shutil.copytree(REAL / "vqa", root / "okvqa")
    shutil.copytree(REAL / "coco" / "images", root / "okvqa" / "images")
    shutil.copytree(REAL / "coco", root / "flickr")
    return root


def config(root, tasks="[vqa,okvqa,flickr]", *more):
    return load_config("tiny", [*TINY, "data.source=real", f"data.root={root}", f"data.tasks={tasks}", DECLARED,
                                *more])


def test_a_custom_task_is_its_format_under_its_own_name_and_prefix(root):
    config(root)
    okvqa, flickr = get_task("okvqa"), get_task("flickr")
    assert (okvqa.format, okvqa.prefix, okvqa.metric, okvqa.target) == ("vqa", "okvqa:", "vqa_score", "answer")
    assert (flickr.format, flickr.prefix, flickr.metric, flickr.num_beams) == ("caption", "flickr caption:", "cider", 5)
    assert get_task("vqa").format == "vqa"  # a built-in is its own format


def test_it_reads_its_own_folder_with_its_formats_file_names(root):
    cfg = config(root)
    (root / "okvqa" / "karpathy_val.json").write_text(json.dumps(
        json.loads((REAL / "vqa" / "karpathy_val.json").read_text())[:1]))  # okvqa's own file, not vqa's
    try:
        vqa, okvqa = load_examples(cfg, "vqa", "val"), load_examples(cfg, "okvqa", "val")
        assert len(okvqa) == 1 < len(vqa) and {e.task for e in okvqa} == {"okvqa"}
        assert okvqa[0].uid == vqa[0].uid
    finally:
        shutil.copy(REAL / "vqa" / "karpathy_val.json", root / "okvqa" / "karpathy_val.json")
    assert {e.task for e in load_examples(cfg, "flickr", "train")} == {"flickr"}
    assert real_visual_source(cfg, "okvqa", "val").root == root / "okvqa" / "images"
    assert real_visual_source(cfg, "flickr", "val").root == root / "flickr" / "images"
    assert real_visual_source(cfg, "vqa", "val").root == root / "coco" / "images"


def test_a_declared_task_without_its_folder_is_the_start_up_data_check_naming_the_file(root):
    cfg = load_config("tiny", [*TINY, "data.source=real", f"data.root={root}", "data.tasks=[vqa,vizwiz]",
                               "data.custom_tasks={vizwiz: {like: vqa}}"])
    with pytest.raises(DataError, match=r"vizwiz train annotations: .*/vizwiz/karpathy_train.json does not exist"):
        check_split_found(cfg, cfg.data.tasks, "train")


@pytest.mark.parametrize("declared, error", [
    ("{vqa: {like: gqa}}", r"data.custom_tasks.vqa: 'vqa' is a built-in task"),
    ("{x: {like: nope}}", r"data.custom_tasks.x.like='nope' is not a built-in task; choose one of \['vqa'"),
    ("{a: {like: vqa}, b: {like: a}}", r"data.custom_tasks.b.like='a' is not a built-in task but a custom task"),
    ("{x: {prefix: 'x:'}}", r"data.custom_tasks.x needs 'like'"),
    ("{x: vqa}", r"data.custom_tasks.x='vqa' must be a mapping"),
    ("{x: {like: vqa, prefx: 'x:'}}", r"unknown key data.custom_tasks.x.prefx; valid keys: \['like', 'prefix'\]"),
    ("{x: {like: vqa, prefix: ''}}", r"data.custom_tasks.x.prefix='' must be a non-empty string"),
    ("{ok.vqa: {like: vqa}}", r"data.custom_tasks: task name 'ok.vqa' is not usable"),
    ("{shared: {like: vqa}}", r"data.custom_tasks: task name 'shared' is not usable"),
    ("{a/b: {like: vqa}}", r"data.custom_tasks: task name 'a/b' is not usable"),
])
def test_bad_declarations_are_refused_naming_the_key_and_value(root, declared, error):
    with pytest.raises(ConfigError, match=error):
        load_config("tiny", ["data.source=real", f"data.root={root}", f"data.custom_tasks={declared}"])


def test_the_synthetic_world_an_hf_dataset_and_undeclared_names_are_refused(root):
    with pytest.raises(ConfigError, match=r"data.custom_tasks declares \['x'\], but data.source=synthetic: the "
                                          r"synthetic world .* cannot generate a custom task"):
        load_config("tiny", ["data.tasks=[vqa,x]", "data.custom_tasks={x: {like: vqa}}"])
    with pytest.raises(ConfigError, match=r"data.custom_tasks declares \['x'\], .*data.hf_dataset='some/set'"):
        load_config("tiny", ["data.source=real", "data.hf_dataset=some/set", "data.custom_tasks={x: {like: vqa}}"])
    with pytest.raises(ConfigError, match=r"data.tasks='undeclared' is not valid; .*data.custom_tasks \(none"):
        load_config("tiny", ["data.source=real", f"data.root={root}", "data.tasks=[vqa,undeclared]"])


def test_a_video_custom_task_is_a_video_task(root):
    cfg = load_config("tiny", ["data.source=real", f"data.root={root}", "data.tasks=[tvqa,myqa]",
                               "data.custom_tasks={myqa: {like: how2qa}}"])
    assert cfg.data.is_video() and get_task("myqa").modality == "video"
    with pytest.raises(ConfigError, match="mixes image and video tasks"):
        load_config("tiny", ["data.source=real", f"data.root={root}", "data.tasks=[vqa,myqa]",
                             "data.custom_tasks={myqa: {like: how2qa}}"])


@pytest.mark.parametrize("method, sharing, own", [
    ("adapter", "multiple", "peft.adapter.sites.encoder_0_self_attn.down_weight_okvqa"),
    ("adapter", "half_shared", "peft.adapter.sites.encoder_0_self_attn.up_weight_okvqa"),
    ("hyperformer", "single", "peft.hyperformer.task_embeddings.task_embedding_okvqa"),
    ("prompt", "multiple", "peft.prompt.embedding_okvqa"),
    ("adapter", "single", None),
])
def test_per_task_modules_are_the_custom_tasks_own(root, method, sharing, own):
    from vlscale.modeling.vl_model import build_model

    cfg = config(root, "[vqa,okvqa]", f"peft.method={method}", f"peft.sharing={sharing}")
    names = [n for n, p in build_model(cfg, vocab_size=64).named_parameters() if p.requires_grad]
    mine = [n for n in names if n.endswith("_okvqa")]
    if own is not None:
        assert own in names
    if sharing == "single" and method != "hyperformer":
        assert not mine
    else:  # as many of its own as vqa has
        assert len(mine) == len([n for n in names if n.endswith("_vqa")]) > 0


def test_its_submission_is_its_formats_under_its_name(root, tmp_path):
    from vlscale.engine.evaluation import write_submission

    cfg = config(root)
    examples = load_examples(cfg, "okvqa", "val")
    records = [{"uid": e.uid, "prediction": "yes"} for e in examples]
    path = write_submission(tmp_path, "okvqa", records, examples, split="val")
    assert path == tmp_path / "okvqa.json"
    assert json.loads(path.read_text()) == [{"question_id": int(e.uid), "answer": "yes"} for e in examples]


def test_the_feature_cache_refuses_one_image_id_naming_two_images(root, launcher):
    extract = launcher("extract_features")
    cfg = config(root)
    jobs, _ = extract.real_jobs(cfg)  # okvqa's images are copies of COCO's: each id extracted once
    ids = [i for _, named, _ in jobs for i in named]
    assert len(ids) == len(set(ids)) == 5 and {str(source.root) for source, _, _ in jobs} == {str(root / "coco/images")}
    image = root / "okvqa" / "images" / "COCO_val2014_000000000042.jpg"
    saved = image.read_bytes()
    try:
        shutil.copy(root / "okvqa" / "images" / "COCO_val2014_000000000073.jpg", image)  # another image, same id
        with pytest.raises(DataError, match=r"image id 'COCO_val2014_000000000042' names .*coco/images/"
                                            r"COCO_val2014_000000000042.jpg for vqa and another image, .*okvqa/"
                                            r"images/COCO_val2014_000000000042.jpg, for okvqa/"):
            extract.real_jobs(cfg)
    finally:
        image.write_bytes(saved)


def test_two_predictors_declaring_one_name_otherwise_each_build_their_own_inputs(root, tmp_path):
    """The registry is one a process: a Predictor of an adapter whose okvqa has another prefix, loaded later,
    replaced the first one's declaration, and the first built its inputs with the second's prefix."""
    from vlscale.data import build_tokenizer
    from vlscale.engine.checkpoint import save_adapter
    from vlscale.modeling.vl_model import build_model
    from vlscale.predict import Predictor

    predictors = []
    for name, prefix in (("a", "okvqa:"), ("b", "outside knowledge:")):
        cfg = load_config("tiny", [*TINY, "data.source=real", f"data.root={root}", "data.tasks=[okvqa]",
                                   f"data.custom_tasks={{okvqa: {{like: vqa, prefix: '{prefix}'}}}}"])
        tokenizer = build_tokenizer(cfg)
        save_adapter(build_model(cfg, vocab_size=len(tokenizer)), tmp_path / name, cfg, tokenizer=tokenizer)
        predictors.append(Predictor(tmp_path / name, device="cpu"))
    image = root / "okvqa" / "images" / "COCO_val2014_000000000073.jpg"
    for p, prefix in zip(predictors, ("okvqa:", "outside knowledge:")):
        ids = p.batch("okvqa", ["what is this?"], [[image]])["input_ids"][0]
        assert p.tokenizer.decode(ids, skip_special_tokens=True) == f"{prefix} what is this?"


def test_what_its_format_decides_beyond_loading_is_its_formats(root, tmp_path, caplog):
    """Decided by get_task(task).format, not by the task's name (each was a surviving mutant): VQA's answer types
    scored per type, sampled VQA targets with their loss weights, the submission's numeric-id warning, NLVR2's
    consistency, a video task's subtitles file."""
    from vlscale.data import build_tokenizer, build_train_loader
    from vlscale.data.real import subtitle_path
    from vlscale.engine.evaluation import score_records, write_submission
    from vlscale.metrics import score_task

    cfg = config(root, "[okvqa]", "data.vqa_targets=sampled", "train.loss_reduction=example")
    examples = load_examples(cfg, "okvqa", "val")
    records = [{"uid": e.uid, "prediction": "yes", "references": e.references} for e in examples]
    assert {"vqa_score_yes_no", "vqa_score_other"} <= set(score_records("okvqa", records, examples=examples))
    assert "loss_weights" in next(build_train_loader(cfg, build_tokenizer(cfg)))
    with caplog.at_level("WARNING", logger="vlscale.engine.evaluation"):
        write_submission(tmp_path, "okvqa", [{"uid": "q1", "prediction": "yes"}], [type(examples[0])(
            task="okvqa", uid="q1", text="", target="", image_ids=[])])
    assert "okvqa submission: 1 of 1 question_ids are not numbers" in caplog.text

    shutil.copytree(REAL / "how2qa", tmp_path / "myqa")
    video = load_config("tiny", ["data.source=real", f"data.root={tmp_path}", "data.tasks=[myqa]",
                                 "data.custom_tasks={myqa: {like: how2qa}, mynlvr: {like: nlvr2}}"])
    assert subtitle_path(video, "myqa") == tmp_path / "myqa" / "how2_subtitles.jsonl"
    scores = score_task("mynlvr", {"a": "true", "b": "false"}, {"a": ["true"], "b": ["true"]}, {"a": "g", "b": "g"})
    assert scores == {"accuracy": 0.5, "consistency": 0.0}
