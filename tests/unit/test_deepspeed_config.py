"""build_deepspeed_config: batch arithmetic, precision, conflicts named, no "auto" left, fp16 on CPU."""

import json
import re
from pathlib import Path

import pytest

from vlscale.config import load_config
from vlscale.engine.deepspeed_config import (CPU_FP16_ENV, CPU_FP16_ERROR, DEEPSPEED_KEYS, DeepSpeedConfigError,
                                             build_deepspeed_config, model_widths, single_process_note)

DS_DIR = Path(__file__).resolve().parents[2] / "ds_configs"
SHIPPED = ["zero2.json", "zero3.json", "zero3_offload.json", "zero3_nvme.json"]


def cfg_with(*overrides):
    return load_config("tiny", list(overrides))


def walk(d, prefix=""):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from walk(v, f"{prefix}.{k}" if prefix else k)
    else:
        yield prefix, d


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_files_resolve_completely(name, monkeypatch):
    monkeypatch.setenv("VLSCALE_NVME_PATH", "/tmp/nvme")
    ds = build_deepspeed_config(DS_DIR / name, cfg_with("train.micro_batch_size=3"), 4, device_type="cuda")
    assert [k for k, v in walk(ds) if v == "auto"] == []
    assert ds["train_batch_size"] == 12 and ds["train_micro_batch_size_per_gpu"] == 3
    raw = json.loads((DS_DIR / name).read_text())
    assert raw["train_batch_size"] == "auto", "batch sizes are never typed in the shipped files"
    assert ds["zero_optimization"]["stage"] == (2 if name == "zero2.json" else 3)
    if "nvme" in name:
        assert ds["zero_optimization"]["offload_param"]["nvme_path"] == "/tmp/nvme"


def test_deepspeed_accepts_the_result():
    from deepspeed.runtime.config import DeepSpeedConfig

    ds = build_deepspeed_config(DS_DIR / "zero3.json", cfg_with("train.micro_batch_size=2",
                                                                "train.gradient_accumulation_steps=3"), 1,
                                device_type="cpu")
    parsed = DeepSpeedConfig(ds)
    assert (parsed.train_batch_size, parsed.train_micro_batch_size_per_gpu,
            parsed.gradient_accumulation_steps) == (6, 2, 3)
    assert parsed.zero_optimization_stage == 3


@pytest.mark.parametrize("micro,world,accum", [(1, 1, 1), (16, 2, 1), (4, 8, 3), (7, 3, 5)])
def test_batch_arithmetic(micro, world, accum):
    cfg = cfg_with(f"train.micro_batch_size={micro}", f"train.gradient_accumulation_steps={accum}")
    ds = build_deepspeed_config(DS_DIR / "zero2.json", cfg, world, device_type="cpu")
    assert ds["train_batch_size"] == micro * world * accum
    assert ds["train_micro_batch_size_per_gpu"] == micro
    assert ds["gradient_accumulation_steps"] == accum


def test_conflicting_batch_size_names_key_and_values():
    raw = json.loads((DS_DIR / "zero3.json").read_text())
    raw["train_batch_size"] = 64
    with pytest.raises(DeepSpeedConfigError) as e:
        build_deepspeed_config(raw, cfg_with("train.micro_batch_size=16"), 2, device_type="cpu")
    msg = str(e.value)
    assert "train_batch_size=64" in msg and "32" in msg and "train.micro_batch_size=16" in msg


def test_matching_concrete_values_are_accepted():
    raw = json.loads((DS_DIR / "zero3.json").read_text())
    raw.update(train_batch_size=32, train_micro_batch_size_per_gpu=16, gradient_clipping=5.0)
    ds = build_deepspeed_config(raw, cfg_with("train.micro_batch_size=16"), 2, device_type="cpu")
    assert ds["train_batch_size"] == 32


def test_conflicting_precision_block_is_named():
    raw = json.loads((DS_DIR / "zero3.json").read_text())
    raw["fp16"]["enabled"] = True
    with pytest.raises(DeepSpeedConfigError, match=r"fp16\.enabled=True conflicts .*False.*train\.precision='bf16'"):
        build_deepspeed_config(raw, cfg_with("train.precision=bf16"), 1, device_type="cuda")


def test_conflicting_clipping_and_lr_are_named():
    raw = json.loads((DS_DIR / "zero2.json").read_text())
    raw["gradient_clipping"] = 1.0
    with pytest.raises(DeepSpeedConfigError, match=r"gradient_clipping=1\.0 .* 5\.0 \(train\.clip_grad_norm\)"):
        build_deepspeed_config(raw, cfg_with("train.clip_grad_norm=5.0"), 1, device_type="cpu")
    raw = json.loads((DS_DIR / "zero2.json").read_text())
    raw["optimizer"]["params"]["lr"] = 0.5
    with pytest.raises(DeepSpeedConfigError, match=r"optimizer\.params\.lr=0\.5"):
        build_deepspeed_config(raw, cfg_with(), 1, device_type="cpu")


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_precision_blocks(precision):
    ds = build_deepspeed_config(DS_DIR / "zero3.json", cfg_with(f"train.precision={precision}"), 2,
                                device_type="cuda")
    assert ds["fp16"]["enabled"] is (precision == "fp16")
    assert ds["bf16"]["enabled"] is (precision == "bf16")
    if precision == "fp16":
        assert ds["fp16"]["loss_scale"] == 0, "fp16 uses dynamic loss scaling"
        assert ds["fp16"]["initial_scale_power"] > 0


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_the_block_of_a_precision_the_run_does_not_use_keeps_only_enabled_false(precision):
    """One file serves every train.precision: the bf16 block's own settings ("auto" ones too) mean nothing to an
    fp32 or fp16 run and are dropped, as the fp16 block's are for bf16 and fp32."""
    base = {"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto", "immediate_grad_update": "auto"},
            "fp16": {"enabled": "auto", "loss_scale_window": "auto"}}
    ds = build_deepspeed_config(base, cfg_with(f"train.precision={precision}"), 1, device_type="cuda")
    assert ds["bf16"] == {"enabled": False}
    if precision == "fp32":
        assert ds["fp16"] == {"enabled": False}


def test_torch_autocast_in_the_file_is_refused():
    """DeepSpeed's torch_autocast ran the forward in bf16 while the run trained, and reported, fp32."""
    raw = json.loads((DS_DIR / "zero3.json").read_text())
    raw["torch_autocast"] = {"enabled": True, "dtype": "torch.bfloat16"}
    with pytest.raises(DeepSpeedConfigError, match=r"torch_autocast\.enabled=True .* train\.precision"):
        build_deepspeed_config(raw, cfg_with(), 1, device_type="cpu")
    raw["torch_autocast"] = {"enabled": False}
    assert build_deepspeed_config(raw, cfg_with(), 1, device_type="cpu")["torch_autocast"] == {"enabled": False}


def test_blocks_that_would_do_nothing_or_be_read_past_are_refused():
    """An activation_checkpointing block applies to deepspeed.checkpointing calls, which no model here makes
    (accepted without a word, it checkpointed nothing); the old ZeRO offload keys (cpu_offload, ...) are mapped
    by DeepSpeed but not seen by the build's own offload reading (torch_adam stayed on, run_summary.json named
    no device). A block of defaults, as copied configs carry, passes."""
    raw = json.loads((DS_DIR / "zero3.json").read_text())
    raw["activation_checkpointing"] = {"partition_activations": True, "cpu_checkpointing": False}
    with pytest.raises(DeepSpeedConfigError, match=r"activation_checkpointing\.partition_activations=True would "
                                                   r"have no effect: .*train\.gradient_checkpointing=true"):
        build_deepspeed_config(raw, cfg_with(), 1, device_type="cpu")
    raw["activation_checkpointing"] = {"partition_activations": False, "number_checkpoints": None}
    build_deepspeed_config(raw, cfg_with(), 1, device_type="cpu")
    for key in ("cpu_offload", "cpu_offload_param"):
        raw = json.loads((DS_DIR / "zero3.json").read_text())
        raw["zero_optimization"][key] = True
        with pytest.raises(DeepSpeedConfigError, match=rf"zero_optimization\.{key} is DeepSpeed's old form; "
                                                       rf"write offload_"):
            build_deepspeed_config(raw, cfg_with(), 1, device_type="cpu")
    raw["zero_optimization"]["cpu_offload_param"] = False
    build_deepspeed_config(raw, cfg_with(), 1, device_type="cpu")


@pytest.mark.parametrize("stage", [True, 4, "3", 1.5])
def test_a_zero_stage_that_is_not_0_to_3_is_refused(stage):
    """``"stage": true`` equals 1 in Python and trained at ZeRO-1 without a word; "3" and 4 were refused already."""
    raw = json.loads((DS_DIR / "zero3.json").read_text())
    raw["zero_optimization"]["stage"] = stage
    with pytest.raises(DeepSpeedConfigError, match=rf"zero_optimization\.stage={stage!r} must be 0, 1, 2 or 3"):
        build_deepspeed_config(raw, cfg_with(), 1, device_type="cpu")


def test_fp16_on_cpu_is_a_clear_error(monkeypatch):
    monkeypatch.delenv(CPU_FP16_ENV, raising=False)
    with pytest.raises(DeepSpeedConfigError) as e:
        build_deepspeed_config(DS_DIR / "zero3.json", cfg_with("train.precision=fp16"), 1, device_type="cpu")
    assert str(e.value) == CPU_FP16_ERROR and f"{CPU_FP16_ENV}=1" in CPU_FP16_ERROR
    # VLSCALE_CPU_FP16=1 lets it through (tests/integration/test_half_precision.py trains that way)
    monkeypatch.setenv(CPU_FP16_ENV, "1")
    ds = build_deepspeed_config(DS_DIR / "zero3.json", cfg_with("train.precision=fp16"), 1, device_type="cpu")
    assert ds["fp16"]["enabled"] is True and ds["bf16"]["enabled"] is False
    monkeypatch.setenv(CPU_FP16_ENV, "yes")
    with pytest.raises(DeepSpeedConfigError, match=f"{CPU_FP16_ENV}='yes' must be 0 or 1"):
        build_deepspeed_config(DS_DIR / "zero3.json", cfg_with("train.precision=fp16"), 1, device_type="cpu")


def test_optimizer_and_clipping_come_from_the_run_config():
    cfg = cfg_with("train.clip_grad_norm=2.5", "train.weight_decay=0.1", "train.adam_eps=1e-8")
    ds = build_deepspeed_config(DS_DIR / "zero3.json", cfg, 1, device_type="cpu")
    assert ds["gradient_clipping"] == 2.5
    params = ds["optimizer"]["params"]
    assert params["lr"] == cfg.lr == 1e-3
    assert (params["weight_decay"], params["eps"], params["betas"]) == (0.1, 1e-8, [0.9, 0.999])
    full_ft = cfg_with("peft.method=none", "peft.train_lm=true")
    assert build_deepspeed_config(DS_DIR / "zero3.json", full_ft, 1, device_type="cpu")["optimizer"]["params"]["lr"] == 1e-4


def test_adam_with_l2_weight_decay_is_refused():
    """DeepSpeed's "Adam" with adam_w_mode=false is torch.optim.Adam: weight decay added to the gradient (and
    scaled by Adam's normalisation) instead of AdamW's decoupled decay, which was accepted without a word."""
    ds = {"optimizer": {"type": "Adam", "params": {"adam_w_mode": False}}}
    with pytest.raises(DeepSpeedConfigError, match=r"optimizer\.params\.adam_w_mode=false .*remove the key"):
        build_deepspeed_config(ds, cfg_with(), 1, device_type="cpu")
    ds = {"optimizer": {"type": "Adam", "params": {"adam_w_mode": True}}}  # AdamW under another name: fine
    assert build_deepspeed_config(ds, cfg_with(), 1, device_type="cpu")["optimizer"]["params"]["adam_w_mode"] is True


def test_optimizer_params_the_optimizer_does_not_take_are_named():
    """A key of optimizer.params that DeepSpeed's chosen optimizer does not take was a TypeError from
    deepspeed.initialize after the build, naming no file; max_grad_norm was DeepSpeed's refusal there too."""
    raw = json.loads((DS_DIR / "zero3.json").read_text())
    raw["optimizer"]["params"]["amsgrd"] = True
    with pytest.raises(DeepSpeedConfigError, match=r"^<DeepSpeed config dict>: unknown key optimizer\.params\.amsgrd "
                                                   r"\(AdamW does not take it\); did you mean 'amsgrad'\? valid: "):
        build_deepspeed_config(raw, cfg_with(), 1, device_type="cpu")
    raw["optimizer"]["params"] = {"lr": "auto", "bias_correction": False}  # DeepSpeed's Adams take it, torch's not
    with pytest.raises(DeepSpeedConfigError, match=r"optimizer\.params\.bias_correction \(AdamW does not take it\)"):
        build_deepspeed_config(raw, cfg_with(), 1, device_type="cpu")
    off = json.loads((DS_DIR / "zero3_offload.json").read_text())
    off["optimizer"]["params"].update(bias_correction=False, fp32_optimizer_states=True, amsgrad=False)
    assert build_deepspeed_config(off, cfg_with(), 2, device_type="cuda")["optimizer"]["params"]["bias_correction"] \
        is False
    raw["optimizer"]["params"] = {"max_grad_norm": 1.0}
    with pytest.raises(DeepSpeedConfigError, match=r"max_grad_norm: clipping comes from the run config"):
        build_deepspeed_config(raw, cfg_with(), 1, device_type="cpu")


def test_bucket_sizes_follow_the_composite_model():
    cfg = cfg_with("model.backbone=t5-large", "model.vision=RN101")
    d_model, visual = model_widths(cfg)
    assert (d_model, visual) == (1024, 2048)
    zero = build_deepspeed_config(DS_DIR / "zero3.json", cfg, 8, device_type="cuda")["zero_optimization"]
    assert zero["reduce_bucket_size"] == 2048 * 2048
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 2048 * 2048)
    # each LM layer gathered as one unit (the default): no persistent parameters, DeepSpeed would
    # re-gather each of them after every step; module by module, norms and biases stay whole
    assert zero["stage3_param_persistence_threshold"] == 0
    module = build_deepspeed_config(DS_DIR / "zero3.json", cfg_with("model.backbone=t5-large", "model.vision=RN101",
                                                                    "train.zero3_leaf_layers=false"), 8,
                                    device_type="cuda")["zero_optimization"]
    assert module["stage3_param_persistence_threshold"] == 10 * 1024


def test_zero_stage_override_and_offload_checks():
    ds = build_deepspeed_config(DS_DIR / "zero3.json", cfg_with("train.zero_stage=2"), 2, device_type="cpu")
    assert ds["zero_optimization"]["stage"] == 2
    with pytest.raises(DeepSpeedConfigError, match="offload_param needs ZeRO stage 3"):
        build_deepspeed_config(DS_DIR / "zero3_offload.json", cfg_with("train.zero_stage=2"), 2, device_type="cuda")
    off = build_deepspeed_config(DS_DIR / "zero3_offload.json", cfg_with(), 2, device_type="cuda")
    assert off["optimizer"]["params"]["torch_adam"] is False, "offloaded optimizer runs DeepSpeed's CPU Adam"
    assert build_deepspeed_config(DS_DIR / "zero3.json", cfg_with(), 2, device_type="cpu")[
        "optimizer"]["params"]["torch_adam"] is True


def test_a_file_of_the_other_zero_family_resolves_as_that_stage_needs():
    """zero2.json at train.zero_stage=3 (and zero3.json at 2) resolves completely: the other family's "auto"
    keys are dropped (allgather_bucket_size was left unresolved at stage 3, though nothing at stage 3 reads it)
    and this stage's are filled as the stage's own file fills them."""
    for name, stage, other in (("zero2.json", 3, "zero3.json"), ("zero3.json", 2, "zero2.json")):
        cfg = cfg_with(f"train.zero_stage={stage}")
        ds = build_deepspeed_config(DS_DIR / name, cfg, 2, device_type="cpu")
        assert not [k for k, v in walk(ds) if v == "auto"], name
        own = build_deepspeed_config(DS_DIR / other, cfg, 2, device_type="cpu")["zero_optimization"]
        z = ds["zero_optimization"]
        keys = ("stage3_prefetch_bucket_size", "stage3_param_persistence_threshold") if stage == 3 else (
            "allgather_bucket_size",)
        assert z["stage"] == stage and {k: z[k] for k in keys} == {k: own[k] for k in keys}, name
        assert ("allgather_bucket_size" in z) == (stage < 3), name


def test_unresolved_auto_and_unknown_file_are_errors(monkeypatch, tmp_path):
    monkeypatch.delenv("VLSCALE_NVME_PATH", raising=False)
    with pytest.raises(DeepSpeedConfigError, match="nvme_path is \"auto\"; set VLSCALE_NVME_PATH"):
        build_deepspeed_config(DS_DIR / "zero3_nvme.json", cfg_with(), 1, device_type="cuda")
    raw = json.loads((DS_DIR / "zero3.json").read_text())
    raw["zero_optimization"]["sub_group_size"] = "auto"
    with pytest.raises(DeepSpeedConfigError, match=r"unresolved for \['zero_optimization\.sub_group_size'\]"):
        build_deepspeed_config(raw, cfg_with(), 1, device_type="cpu")
    with pytest.raises(DeepSpeedConfigError, match="does not exist"):
        build_deepspeed_config(tmp_path / "nope.json", cfg_with(), 1)
    with pytest.raises(DeepSpeedConfigError, match=f"^DeepSpeed config file '{DS_DIR}' is a folder, not a file "):
        build_deepspeed_config(DS_DIR, cfg_with(), 1)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DeepSpeedConfigError, match="bad.json: not valid JSON"):
        build_deepspeed_config(bad, cfg_with(), 1)
    utf16 = tmp_path / "utf16.json"  # Windows editors' and PowerShell's encoding: was a UnicodeDecodeError traceback
    utf16.write_text((DS_DIR / "zero3.json").read_text(), encoding="utf-16")
    with pytest.raises(DeepSpeedConfigError, match=r"utf16\.json: cannot be read as a JSON DeepSpeed config \("
                                                   r"'utf-8' codec can't decode .*\); save it as UTF-8$"):
        build_deepspeed_config(utf16, cfg_with(), 1)
    bom = tmp_path / "bom.json"  # UTF-8 with a byte-order mark (Notepad, PowerShell's utf8BOM): read as UTF-8
    bom.write_bytes(b"\xef\xbb\xbf" + (DS_DIR / "zero3.json").read_bytes())
    assert build_deepspeed_config(bom, cfg_with(), 1) == build_deepspeed_config(DS_DIR / "zero3.json", cfg_with(), 1)
    raw = json.loads((DS_DIR / "zero3.json").read_text())
    raw["scheduler"] = {"type": "WarmupLR"}
    with pytest.raises(DeepSpeedConfigError, match="'scheduler' block"):
        build_deepspeed_config(raw, cfg_with(), 1, device_type="cpu")


def test_zero_stage_auto_is_an_error_unless_train_zero_stage_resolves_it():
    """vlscale does not choose the ZeRO stage: "stage": "auto" was filled with 0, so the run trained at ZeRO-0
    (the banner and run_summary.json said so, nothing said why)."""
    raw = json.loads((DS_DIR / "zero3.json").read_text())
    raw["zero_optimization"]["stage"] = "auto"
    with pytest.raises(DeepSpeedConfigError, match=r"zero_optimization\.stage is \"auto\".*train\.zero_stage"):
        build_deepspeed_config(raw, cfg_with(), 2, device_type="cpu")
    ds = build_deepspeed_config(raw, cfg_with("train.zero_stage=3"), 2, device_type="cpu")
    assert ds["zero_optimization"]["stage"] == 3


def test_a_key_given_twice_in_the_file_is_refused(tmp_path):
    """json keeps the last of two equal keys: a file with "stage": 3 then "stage": 0 trained at ZeRO-0 without a
    word (DeepSpeed, reading a file itself, refuses duplicates)."""
    text = (DS_DIR / "zero3.json").read_text().replace('"stage": 3,', '"stage": 3,\n    "stage": 0,', 1)
    path = tmp_path / "dup.json"
    path.write_text(text)
    with pytest.raises(DeepSpeedConfigError) as e:
        build_deepspeed_config(path, cfg_with(), 1, device_type="cpu")
    assert str(e.value) == f"{path}: key 'stage' appears twice in one object (the first would be ignored); keep one"


def test_unknown_top_level_key_names_the_file(tmp_path):
    """DeepSpeed ignores a top-level key it does not read: a misspelt zero_optimization trained at ZeRO-0."""
    raw = json.loads((DS_DIR / "zero3.json").read_text())
    raw["zero_optimizaton"] = raw.pop("zero_optimization")
    path = tmp_path / "typo.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(DeepSpeedConfigError) as e:
        build_deepspeed_config(path, cfg_with(), 1, device_type="cpu")
    msg = str(e.value)
    assert str(path) in msg and "'zero_optimizaton'" in msg and "did you mean 'zero_optimization'?" in msg
    assert "\n" not in msg


def test_deepspeed_reads_no_top_level_key_outside_the_list():
    """DEEPSPEED_KEYS holds every top-level key DeepSpeedConfig looks up (recorded as it parses a config),
    so no key DeepSpeed accepts is refused; a DeepSpeed upgrade that reads a new one fails here."""
    from deepspeed.runtime import config as ds_config_module
    from deepspeed.runtime.config import DeepSpeedConfig

    read = set()

    class Keys:
        def __init__(self, d):
            self.d = d

        def __contains__(self, k):
            read.add(k)
            return k in self.d

        def __iter__(self):
            return iter(self.d)

    class Recording(dict):
        def get(self, k, *default):
            read.add(k)
            return super().get(k, *default)

        def __getitem__(self, k):
            read.add(k)
            return super().__getitem__(k)

        def __contains__(self, k):
            read.add(k)
            return super().__contains__(k)

        def keys(self):
            return Keys(dict(self))

        def __copy__(self):
            return self

    ds = build_deepspeed_config(DS_DIR / "zero3.json", cfg_with(), 1, device_type="cpu")
    DeepSpeedConfig(Recording(ds))
    assert len(read) > 40 and "zero_optimization" in read
    removed = set(getattr(ds_config_module, "_REMOVED_TOP_LEVEL_CONFIG_KEYS", {}))  # DeepSpeed refuses these
    assert read - removed <= DEEPSPEED_KEYS, sorted(read - removed - DEEPSPEED_KEYS)
    # and the list holds no key DeepSpeed does not read (initialize's mesh sizes, the boolean ZeRO form's
    # allgather_size, and the amp block and bfloat16 alias build_deepspeed_config turns into bf16, aside)
    extra = {"data_parallel_size", "sequence_parallel_size", "allgather_size", "amp", "bfloat16"}
    assert DEEPSPEED_KEYS - extra <= read - removed, sorted(DEEPSPEED_KEYS - extra - read)


@pytest.mark.parametrize("edit, words", [
    (lambda z: z.update(stage3_prefetch_bucketsize=10), ["zero_optimization.stage3_prefetch_bucketsize",
                                                         "did you mean 'stage3_prefetch_bucket_size'?"]),
    (lambda z: z.update(offload_param={"device": "cpu", "pin_memroy": True}),
     ["zero_optimization.offload_param.pin_memroy", "did you mean 'pin_memory'?"]),
    (lambda z: z.update(overlap_comm="sometimes"), ["zero_optimization.overlap_comm='sometimes'", "boolean"]),
])
def test_zero_block_is_validated_before_the_model_is_built(tmp_path, edit, words):
    """DeepSpeed's own DeepSpeedZeroConfig refuses these only inside deepspeed.initialize, after the build,
    as a pydantic traceback without the file's name; here they are named up front."""
    raw = json.loads((DS_DIR / "zero3.json").read_text())
    edit(raw["zero_optimization"])
    path = tmp_path / "zero.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(DeepSpeedConfigError) as e:
        build_deepspeed_config(path, cfg_with(), 2, device_type="cpu")
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg
    for w in words:
        assert w in msg


@pytest.mark.parametrize("precision, edit, words", [
    ("bf16", {"immediate_grad_updat": True}, ["bf16.immediate_grad_updat", "did you mean 'immediate_grad_update'?"]),
    ("bf16", {"check_grad_overflow": "sometimes"}, ["bf16.check_grad_overflow='sometimes'", "boolean"]),
    ("fp16", {"initial_scale_powr": 12}, ["fp16.initial_scale_powr", "did you mean 'initial_scale_power'?"]),
])
def test_precision_block_is_validated_before_the_model_is_built(tmp_path, monkeypatch, precision, edit, words):
    """The enabled precision block as the ZeRO block: DeepSpeed refused a misspelt key only inside
    deepspeed.initialize, after the build, as a pydantic traceback without the file's name."""
    monkeypatch.setenv(CPU_FP16_ENV, "1")
    raw = json.loads((DS_DIR / "zero3.json").read_text())
    raw[precision].update(edit)
    path = tmp_path / "precision.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(DeepSpeedConfigError) as e:
        build_deepspeed_config(path, cfg_with(f"train.precision={precision}"), 2, device_type="cpu")
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg
    for w in words:
        assert w in msg


def test_input_dict_is_not_modified():
    raw = json.loads((DS_DIR / "zero3.json").read_text())
    before = json.dumps(raw, sort_keys=True)
    build_deepspeed_config(raw, cfg_with(), 2, device_type="cpu")
    assert json.dumps(raw, sort_keys=True) == before


@pytest.mark.parametrize("name,world,stage,noted", [
    ("zero3.json", 1, None, True), ("zero3.json", 2, None, False), ("zero3.json", 1, 0, False),
    ("zero3_offload.json", 1, None, False), ("zero2.json", 1, None, False)])
def test_single_process_zero3_note(name, world, stage, noted):
    """ZeRO-3 on one process without offload partitions nothing: the launcher prints a note saying so."""
    extra = [] if stage is None else [f"train.zero_stage={stage}"]
    ds = build_deepspeed_config(DS_DIR / name, cfg_with(*extra), world, device_type="cpu")
    note = single_process_note(ds, world)
    assert (note is not None) == noted
    if noted:
        assert "train.zero_stage=0" in note


@pytest.mark.parametrize("available", [False, True])
def test_nvme_offload_without_async_io_is_a_clear_error(monkeypatch, tmp_path, available):
    """ZeRO-Infinity needs DeepSpeed's async_io op (libaio): without it the run stops before the model is
    built, naming the key, the missing library and the CPU-offload alternative; CPU offload is not checked."""
    from deepspeed.ops.op_builder import AsyncIOBuilder

    from vlscale.engine.deepspeed_config import check_nvme_support

    calls = []
    monkeypatch.setattr(AsyncIOBuilder, "is_compatible", lambda self, verbose=False: calls.append(1) or available)
    monkeypatch.setenv("VLSCALE_NVME_PATH", str(tmp_path))
    nvme = build_deepspeed_config(DS_DIR / "zero3_nvme.json", cfg_with(), 2, device_type="cuda")
    if available:
        check_nvme_support(nvme)
    else:
        with pytest.raises(DeepSpeedConfigError, match=r"offload_\w+\.device='nvme'.*libaio.*zero3_offload\.json"):
            check_nvme_support(nvme)
    assert calls
    calls.clear()
    check_nvme_support(build_deepspeed_config(DS_DIR / "zero3_offload.json", cfg_with(), 2, device_type="cuda"))
    assert not calls, "CPU offload needs no async_io"


def test_aio_keys_deepspeed_ignores_are_refused(monkeypatch, tmp_path):
    """DeepSpeed reads the aio block key by key and ignores the rest: the shipped zero3_nvme.json's
    ``thread_count`` (the old name of ``intra_op_parallelism``) was dropped without a word."""
    from deepspeed.runtime.swap_tensor.aio_config import get_aio_config

    monkeypatch.setenv("VLSCALE_NVME_PATH", str(tmp_path))
    raw = json.loads((DS_DIR / "zero3_nvme.json").read_text())
    read = get_aio_config({"aio": raw["aio"]})
    assert {k: read[k] for k in raw["aio"]} == raw["aio"], "every aio key of the shipped file is read by DeepSpeed"
    build_deepspeed_config(DS_DIR / "zero3_nvme.json", cfg_with(), 2, device_type="cuda")
    for key, match in (("thread_count", "aio.thread_count is DeepSpeed's old name.*aio.intra_op_parallelism"),
                       ("queue_dpeth", "unknown key aio.queue_dpeth.*queue_depth")):
        ds = dict(raw, aio={**raw["aio"], key: 8})
        with pytest.raises(DeepSpeedConfigError, match=match):
            build_deepspeed_config(ds, cfg_with(), 2, device_type="cuda")


def test_nvme_path_must_be_a_writable_folder(monkeypatch, tmp_path):
    """ZeRO-Infinity writes its swap files under nvme_path: a folder that does not exist or a file there is refused
    before the model is built, naming the key and the path (it was a traceback from inside DeepSpeed after the build)."""
    from deepspeed.ops.op_builder import AsyncIOBuilder

    from vlscale.engine.deepspeed_config import check_nvme_support

    monkeypatch.setattr(AsyncIOBuilder, "is_compatible", lambda self, verbose=False: True)
    (tmp_path / "a_file").write_text("")
    for path, why in ((tmp_path / "missing", "does not exist"), (tmp_path / "a_file", "is not a folder")):
        monkeypatch.setenv("VLSCALE_NVME_PATH", str(path))
        ds = build_deepspeed_config(DS_DIR / "zero3_nvme.json", cfg_with(), 2, device_type="cuda")
        with pytest.raises(DeepSpeedConfigError, match=rf"offload_optimizer\.nvme_path='{path}' {why}"):
            check_nvme_support(ds)
    monkeypatch.setenv("VLSCALE_NVME_PATH", str(tmp_path))
    check_nvme_support(build_deepspeed_config(DS_DIR / "zero3_nvme.json", cfg_with(), 2, device_type="cuda"))


def test_offload_refused_at_a_stage_from_the_run_config_names_it():
    """A scale preset's train.zero_stage (1 or 2) overrides the file's stage: zero3_offload.json with such a preset was
    refused as "the run uses stage 1" while the file says 3; the refusal names the run config's value and the fix."""
    for stage in (1, 2):
        with pytest.raises(DeepSpeedConfigError, match=rf"the run uses stage {stage} \(train\.zero_stage={stage} "
                                                       r"overrides the file's stage 3; set train\.zero_stage=3"):
            build_deepspeed_config(DS_DIR / "zero3_offload.json", cfg_with(f"train.zero_stage={stage}"), 2,
                                   device_type="cuda")
    raw = json.loads((DS_DIR / "zero2.json").read_text())
    raw["zero_optimization"]["offload_param"] = {"device": "cpu"}
    with pytest.raises(DeepSpeedConfigError, match=r"offload_param needs ZeRO stage 3\+, the run uses stage 2$"):
        build_deepspeed_config(raw, cfg_with(), 2, device_type="cuda")  # the file's own stage: nothing to add


def test_nvme_optimizer_offload_below_zero3_is_refused(tmp_path):
    """DeepSpeed's ZeRO-1/2 optimizer has no NVMe swapper: "device": "nvme" there offloads to host memory as "cpu"
    does (stage_1_and_2.py: any device but none is cpu_offload), so a run asking for NVMe at stage 2 held the whole
    optimizer state in host memory, unsaid, and the profiler predicted NVMe. Refused, naming the fix."""
    for stage in (2,):  # (stage 1 refuses any optimizer offload: test_zero_stage_override_and_offload_checks)
        raw = {"zero_optimization": {"stage": stage, "offload_optimizer": {"device": "nvme", "nvme_path": str(tmp_path)}}}
        with pytest.raises(DeepSpeedConfigError, match=rf"offload_optimizer\.device=\"nvme\" at ZeRO stage {stage}: "
                                                       r"DeepSpeed swaps to NVMe only under ZeRO-3 .*write \"cpu\""):
            build_deepspeed_config(raw, cfg_with(), 2, device_type="cuda")
    raw["zero_optimization"]["offload_optimizer"]["device"] = "cpu"
    assert build_deepspeed_config(raw, cfg_with(), 2, device_type="cuda")["zero_optimization"]["offload_optimizer"][
        "device"] == "cpu"


def test_partial_optimizer_offload_is_refused():
    """offload_optimizer.ratio < 1 (DeepSpeed's partial offload) trained, unsaid, as a whole offload at ZeRO-1/2
    (only stage3.py reads it); at ZeRO-3 the sub-groups it keeps on the GPU are stepped by a second optimizer
    (backup_optimizer) whose Adam moments DeepSpeed 0.19's checkpoint leaves out (_rigid_state_dict), so a resume
    would not continue the run. Refused in one line naming the key and value; ratio 1 is the whole offload."""
    for stage, why in ((2, "DeepSpeed reads the ratio only at ZeRO-3"), (3, "--resume would restart them")):
        raw = {"zero_optimization": {"stage": stage, "offload_optimizer": {"device": "cpu", "ratio": 0.5}}}
        with pytest.raises(DeepSpeedConfigError, match=r"zero_optimization\.offload_optimizer\.ratio=0\.5: partial "
                                                       rf"offload is not supported: .*{re.escape(why)}"):
            build_deepspeed_config(raw, cfg_with(), 2, device_type="cuda")
        raw["zero_optimization"]["offload_optimizer"]["ratio"] = 1.0
        assert build_deepspeed_config(raw, cfg_with(), 2, device_type="cuda")["zero_optimization"]["stage"] == stage


@pytest.mark.parametrize("backbone", ["google-t5/t5-3b", "google/flan-t5-xl", "facebook/bart-large"])
def test_nvme_file_leaves_deepspeed_swap_buffers_for_a_layer(backbone, monkeypatch, tmp_path):
    """ZeRO-Infinity swaps a parameter partition in from NVMe into one of offload_param.buffer_count pinned buffers and
    holds it until the parameter is released. With zero3_nvme.json's former settings (5 buffers, the parameters kept
    gathered by stage3_max_reuse_distance 1e9 and prefetched) every run whose parameters reached NVMe stopped in its
    first forward with DeepSpeed's "AssertionError: Not enough buffers 5 for swapping 6" (t5-small, max_in_cpu 0, one
    CPU rank; then "already assigned swap buffer" module by module): a layer gathered as one unit
    (train.zero3_leaf_layers) swaps all its matrices at once, and nothing may stay gathered past its use."""
    import torch

    from vlscale.modeling.backbones import lm_class, lm_config

    monkeypatch.setenv("VLSCALE_NVME_PATH", str(tmp_path))
    zero = build_deepspeed_config(DS_DIR / "zero3_nvme.json", cfg_with(f"model.backbone={backbone}"), 1,
                                  device_type="cuda")["zero_optimization"]
    assert zero["stage3_max_reuse_distance"] == 0 and zero["stage3_prefetch_bucket_size"] == 0
    with torch.device("meta"):
        lm = lm_class(lm_config(backbone))(lm_config(backbone))
    units = [m for m in lm.modules() if type(m).__name__ in lm._no_split_modules]
    assert units
    matrices = max(sum(p.dim() >= 2 for p in m.parameters()) for m in units)  # biases and norms stay below aio's size
    assert zero["offload_param"]["buffer_count"] >= matrices


def test_a_missing_deepspeed_file_names_where_it_was_named(tmp_path, monkeypatch):
    """A DeepSpeed file that is not there is refused naming the flag or key that named it: the message named only
    the file, and train.deepspeed in a preset or an override read as a --deepspeed typo."""
    from vlscale.engine.deepspeed_config import default_ds_file

    monkeypatch.chdir(tmp_path)
    with pytest.raises(DeepSpeedConfigError, match=r"^train\.deepspeed: DeepSpeed config file 'nope\.json' does not "
                                                   r"exist \(shipped: "):
        default_ds_file(cfg_with("train.deepspeed=nope.json"))
    with pytest.raises(DeepSpeedConfigError, match=r"^--deepspeed: DeepSpeed config file 'gone\.json' does not exist"):
        default_ds_file(cfg_with("train.deepspeed=nope.json"), "gone.json")
    with pytest.raises(DeepSpeedConfigError, match=r"^--deepspeed: DeepSpeed config file '.*' is a folder, not a file"):
        default_ds_file(cfg_with(), str(tmp_path))
    assert Path(default_ds_file(cfg_with("train.deepspeed=ds_configs/zero2.json"))).name == "zero2.json"  # found from elsewhere
    assert Path(default_ds_file(cfg_with())).name == "zero3.json"
    # launched from another folder, a relative path found nowhere names the folders it was read from (it named none)
    with pytest.raises(DeepSpeedConfigError) as e:
        default_ds_file(cfg_with(), "ds_configs/zero4.json")
    assert str(e.value).endswith(f"does not exist (shipped: ds_configs/zero2.json, zero3.json, zero3_offload.json, "
                                 f"zero3_nvme.json); read from the working directory {tmp_path}, then from "
                                 f"{DS_DIR.parent} and {DS_DIR.parent / 'vlscale'}")
    # --deepspeed=~/x.json and train.deepspeed=~/x.json reach Python unexpanded (bash expands NAME=~ words only)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    mine = tmp_path / "home" / "mine.json"
    mine.parent.mkdir()
    mine.write_text((DS_DIR / "zero3.json").read_text())
    assert default_ds_file(cfg_with("train.deepspeed=~/mine.json")) == default_ds_file(None, "~/mine.json") == str(mine)


def test_a_relative_deepspeed_file_is_the_working_directorys_then_the_checkouts_then_the_packages(tmp_path,
                                                                                                    monkeypatch):
    """resolve_ds_file: a relative file there from the working directory is that one, even where the checkout has one
    of that name; an absolute path is as given (load_ds_file says it is not there, no folders tried); a relative one
    the checkout lacks is the installed package's."""
    from vlscale.engine import deepspeed_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ds_configs").mkdir()
    (tmp_path / "ds_configs" / "zero3.json").write_text("{}")
    assert deepspeed_config.resolve_ds_file("ds_configs/zero3.json") == "ds_configs/zero3.json"
    assert deepspeed_config.resolve_ds_file(str(tmp_path / "gone.json")) == str(tmp_path / "gone.json")
    monkeypatch.chdir(tmp_path / "ds_configs")
    monkeypatch.setattr(deepspeed_config, "REPO_ROOT", tmp_path / "ds_configs")
    monkeypatch.setattr(deepspeed_config, "PACKAGE_DIR", tmp_path)
    assert deepspeed_config.resolve_ds_file("ds_configs/zero3.json") == str(tmp_path / "ds_configs" / "zero3.json")


@pytest.mark.parametrize("key, value, ours, why", [
    ("train_micro_batch_size_per_gpu", 8, 16, "train.micro_batch_size"),
    ("gradient_accumulation_steps", 2, 1, "train.gradient_accumulation_steps"),
    ("gradient_accumulation_steps", True, 1, "train.gradient_accumulation_steps"),  # true == 1 in Python
    ("bf16.enabled", True, False, "train.precision='fp32'"),
    ("optimizer.params.betas", [0.8, 0.9], [0.9, 0.999], "train.adam_betas"),
    ("optimizer.params.betas", [0.9], [0.9, 0.999], "train.adam_betas"),  # a prefix is not equal
    ("optimizer.params.eps", 1e-8, 1e-6, "train.adam_eps"),
    ("optimizer.params.weight_decay", 0.5, 0.01, "train.weight_decay"),
    ("optimizer.params.lr", 1.001e-3, 1e-3, "train.lr"),  # close is not equal
])
def test_every_value_the_run_config_owns_conflicts_when_the_file_differs(key, value, ours, why):
    """Each value the run config owns, written concretely in the file and different, is refused naming the key, both
    values and where the run's value comes from (tests covered only the batch size, clipping, lr and fp16.enabled). A
    bool is not the int it equals, and close is not equal."""
    raw = json.loads((DS_DIR / "zero3.json").read_text())
    *parents, last = key.split(".")
    d = raw
    for p in parents:
        d = d[p]
    d[last] = value
    with pytest.raises(DeepSpeedConfigError, match=rf"^<DeepSpeed config dict>: {re.escape(key)}={re.escape(repr(value))} "
                                                   rf"conflicts with the run config's value {re.escape(repr(ours))} "
                                                   rf"\({re.escape(why)}"):
        build_deepspeed_config(raw, cfg_with(), 1, device_type="cpu")


def test_an_auto_inside_a_list_is_left_unresolved_and_named():
    """No key of the run config resolves an "auto" inside a list (comms_logger.prof_ops here): it is refused with
    its place in the list, as an "auto" in an object is, instead of reaching DeepSpeed as the op name "auto"."""
    with pytest.raises(DeepSpeedConfigError, match=r"\"auto\" left unresolved for \['comms_logger\.prof_ops\[1\]'\]"):
        build_deepspeed_config({"comms_logger": {"prof_ops": ["all_reduce", "auto"]}}, cfg_with(), 1,
                               device_type="cpu")


@pytest.mark.parametrize("world", [0, -2, True, 2.0])
def test_a_world_size_that_is_not_a_positive_int_is_refused(world):
    """Below one, or not an int (a bool is an int to isinstance: True passed as 1 rank)."""
    with pytest.raises(DeepSpeedConfigError, match=rf"^world_size={world} must be a positive integer$"):
        build_deepspeed_config(DS_DIR / "zero3.json", cfg_with(), world, device_type="cpu")


def test_the_bfloat16_alias_and_the_amp_block():
    """DeepSpeed reads "bfloat16" as "bf16": its settings are kept under bf16 and checked as bf16's, and a file with
    both is refused; an enabled amp block (DeepSpeed's apex AMP) is refused, a disabled one dropped."""
    ds = build_deepspeed_config({"bfloat16": {"enabled": "auto", "immediate_grad_update": True}},
                                cfg_with("train.precision=bf16"), 1, device_type="cpu")
    assert ds["bf16"] == {"enabled": True, "immediate_grad_update": True} and "bfloat16" not in ds
    with pytest.raises(DeepSpeedConfigError, match=r"bf16\.enabled=False conflicts .*train\.precision='bf16'"):
        build_deepspeed_config({"bfloat16": {"enabled": False}}, cfg_with("train.precision=bf16"), 1, device_type="cpu")
    with pytest.raises(DeepSpeedConfigError, match=r"has both 'bf16' and its alias 'bfloat16'; keep one"):
        build_deepspeed_config({"bf16": {"enabled": "auto"}, "bfloat16": {"enabled": "auto"}}, cfg_with(), 1,
                               device_type="cpu")
    with pytest.raises(DeepSpeedConfigError, match=r"amp\.enabled=True is not supported; precision comes from "
                                                   r"train\.precision"):
        build_deepspeed_config({"amp": {"enabled": True}}, cfg_with(), 1, device_type="cpu")
    assert "amp" not in build_deepspeed_config({"amp": {"enabled": False}}, cfg_with(), 1, device_type="cpu")


def test_allgather_bucket_below_zero3_is_at_least_deepspeeds_default():
    """ZeRO-1/2 all-gather buckets: DeepSpeed's 2e8 elements, or h*h for a model wider than that."""
    for name, cfg in (("zero2.json", cfg_with()), ("zero3.json", cfg_with("train.zero_stage=2"))):
        assert build_deepspeed_config(DS_DIR / name, cfg, 2, device_type="cpu")["zero_optimization"][
            "allgather_bucket_size"] == 2 * 10 ** 8, name
    wide = build_deepspeed_config(DS_DIR / "zero2.json", cfg_with(), 2, device_type="cpu", hidden_size=20000)
    assert wide["zero_optimization"]["allgather_bucket_size"] == 20000 * 20000


def test_optimizer_offload_below_zero2_and_offload_device_none():
    """ZeRO-1 refuses optimizer offload, naming the run config's stage; "device": "none" is no offload at any stage
    (torch's AdamW stays, no stage is required)."""
    raw = json.loads((DS_DIR / "zero2.json").read_text())
    raw["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    with pytest.raises(DeepSpeedConfigError, match=r"offload_optimizer needs ZeRO stage 2\+ \(DeepSpeed also offloads "
                                                   r"at stage 1; vlscale's memory model and tests cover stages 2 and "
                                                   r"3\), the run uses stage 1 \(train\.zero_stage=1 overrides the "
                                                   r"file's stage 2; set train\.zero_stage=2"):
        build_deepspeed_config(raw, cfg_with("train.zero_stage=1"), 2, device_type="cuda")
    raw["zero_optimization"]["offload_optimizer"] = {"device": "none"}
    raw["zero_optimization"]["offload_param"] = {"device": "none"}
    ds = build_deepspeed_config(raw, cfg_with("train.zero_stage=1"), 2, device_type="cuda")
    assert ds["optimizer"]["params"]["torch_adam"] is True


def test_an_nvme_offload_without_nvme_path_reads_the_environment(monkeypatch, tmp_path):
    """A missing nvme_path means "auto" (DeepSpeed's default is no path at all: a failure inside zero.Init)."""
    raw = json.loads((DS_DIR / "zero3_nvme.json").read_text())
    for key in ("offload_optimizer", "offload_param"):
        del raw["zero_optimization"][key]["nvme_path"]
    monkeypatch.setenv("VLSCALE_NVME_PATH", str(tmp_path))
    zero = build_deepspeed_config(raw, cfg_with(), 2, device_type="cuda")["zero_optimization"]
    assert zero["offload_optimizer"]["nvme_path"] == zero["offload_param"]["nvme_path"] == str(tmp_path)
    monkeypatch.delenv("VLSCALE_NVME_PATH")
    with pytest.raises(DeepSpeedConfigError, match=r"offload_optimizer\.nvme_path is \"auto\"; set VLSCALE_NVME_PATH"):
        build_deepspeed_config(raw, cfg_with(), 2, device_type="cuda")


def test_an_nvme_path_given_resolves_auto_before_the_environment(monkeypatch, tmp_path):
    """build_deepspeed_config(nvme_path=...) is what an "auto" nvme_path becomes (the profiler's predictions pass a
    placeholder: they swap nothing, and needed VLSCALE_NVME_PATH set); the variable stays the default, and a path
    the file writes is the file's."""
    monkeypatch.setenv("VLSCALE_NVME_PATH", str(tmp_path))
    raw = json.loads((DS_DIR / "zero3_nvme.json").read_text())
    raw["zero_optimization"]["offload_param"]["nvme_path"] = "/own"
    zero = build_deepspeed_config(raw, cfg_with(), 2, device_type="cuda", nvme_path="/given")["zero_optimization"]
    assert (zero["offload_optimizer"]["nvme_path"], zero["offload_param"]["nvme_path"]) == ("/given", "/own")
    monkeypatch.delenv("VLSCALE_NVME_PATH")
    zero = build_deepspeed_config(DS_DIR / "zero3_nvme.json", cfg_with(), 2, device_type="cuda",
                                  nvme_path=tmp_path)["zero_optimization"]
    assert zero["offload_optimizer"]["nvme_path"] == zero["offload_param"]["nvme_path"] == str(tmp_path)


def test_the_optimizer_must_be_adamw_and_its_params_fit_deepspeeds_cpu_adam():
    """An optimizer type other than Adam/AdamW is refused; with the optimizer off-loaded DeepSpeed builds its CPU
    Adam, which takes neither FusedAdam's set_grad_none nor adamw_mode (DeepSpeed passes that one itself)."""
    with pytest.raises(DeepSpeedConfigError, match=r"optimizer\.type='SGD'; vlscale trains with AdamW"):
        build_deepspeed_config({"optimizer": {"type": "SGD"}}, cfg_with(), 1, device_type="cpu")
    for key in ("set_grad_none", "adamw_mode"):
        off = json.loads((DS_DIR / "zero3_offload.json").read_text())
        off["optimizer"]["params"][key] = True
        with pytest.raises(DeepSpeedConfigError, match=rf"unknown key optimizer\.params\.{key} \(DeepSpeedCPUAdam "
                                                       r"does not take it\)"):
            build_deepspeed_config(off, cfg_with(), 2, device_type="cuda")


def test_a_null_block_is_an_empty_one_and_a_non_object_block_is_named():
    ds = build_deepspeed_config({"optimizer": None, "fp16": None, "zero_optimization": {"stage": 0}}, cfg_with(), 1,
                                device_type="cpu")
    assert ds["optimizer"]["type"] == "AdamW" and ds["fp16"] == {"enabled": False}
    with pytest.raises(DeepSpeedConfigError, match=r"^<DeepSpeed config dict>: optimizer must be an object, "
                                                   r"got 'AdamW'$"):
        build_deepspeed_config({"optimizer": "AdamW"}, cfg_with(), 1, device_type="cpu")


def test_the_old_pin_memory_key_is_refused_and_cpu_fp16_0_is_off(monkeypatch):
    raw = json.loads((DS_DIR / "zero3_offload.json").read_text())
    raw["zero_optimization"]["cpu_offload_use_pin_memory"] = True
    with pytest.raises(DeepSpeedConfigError, match=r"zero_optimization\.cpu_offload_use_pin_memory is DeepSpeed's "
                                                   r"old form; write offload_optimizer / offload_param's pin_memory"):
        build_deepspeed_config(raw, cfg_with(), 2, device_type="cuda")
    monkeypatch.setenv(CPU_FP16_ENV, "0")
    with pytest.raises(DeepSpeedConfigError) as e:
        build_deepspeed_config(DS_DIR / "zero3.json", cfg_with("train.precision=fp16"), 1, device_type="cpu")
    assert str(e.value) == CPU_FP16_ERROR


def test_a_dict_config_and_a_file_that_is_not_an_object_are_checked_as_files_are(tmp_path):
    """A config passed as a dict (the profiler, tests, benchmarks) gets the file's top-level key check; a JSON file
    that is not an object, and an aio value that is not one, are refused naming the file (were a TypeError or an
    AttributeError from inside the build)."""
    with pytest.raises(DeepSpeedConfigError, match=r"^<DeepSpeed config dict>: unknown top-level key "
                                                   r"'zero_optimizaton' .*did you mean 'zero_optimization'\?"):
        build_deepspeed_config({"zero_optimizaton": {"stage": 3}}, cfg_with(), 1, device_type="cpu")
    for text, kind in (("[]", "list"), ("3", "int")):
        path = tmp_path / "not_object.json"
        path.write_text(text)
        with pytest.raises(DeepSpeedConfigError, match=rf"not_object\.json: a DeepSpeed config must be a JSON object, "
                                                       rf"got {kind}$"):
            build_deepspeed_config(path, cfg_with(), 1, device_type="cpu")
    with pytest.raises(DeepSpeedConfigError, match=r"^<DeepSpeed config dict>: aio must be an object, got 8$"):
        build_deepspeed_config({"aio": 8}, cfg_with(), 1, device_type="cpu")


def test_an_empty_nvme_path_variable_is_unset(monkeypatch):
    """VLSCALE_NVME_PATH="" (an unset variable in a launcher script) leaves "auto" unresolved: refused here, naming
    the variable, rather than written into the config as the path ""."""
    monkeypatch.setenv("VLSCALE_NVME_PATH", "")
    with pytest.raises(DeepSpeedConfigError, match=r"nvme_path is \"auto\"; set VLSCALE_NVME_PATH"):
        build_deepspeed_config(DS_DIR / "zero3_nvme.json", cfg_with(), 2, device_type="cuda")


def test_a_files_own_fp16_scaler_settings_are_kept_and_missing_ones_defaulted(monkeypatch):
    """The fp16 loss-scaler settings are the file's to choose (a static loss_scale, a shorter window): an fp16 run
    keeps what the file says and fills only what it leaves out, with dynamic scaling's defaults."""
    monkeypatch.setenv(CPU_FP16_ENV, "1")
    raw = {"fp16": {"enabled": "auto", "loss_scale": 128, "loss_scale_window": "auto"}}
    fp16 = build_deepspeed_config(raw, cfg_with("train.precision=fp16"), 1, device_type="cpu")["fp16"]
    assert fp16 == {"enabled": True, "loss_scale": 128, "loss_scale_window": 1000, "initial_scale_power": 16,
                    "hysteresis": 2, "min_loss_scale": 1}


def test_given_hidden_size_sets_buckets_and_persistence_alike():
    """hidden_size replaces the registry's widths for every derived size: the buckets' h and, module by module,
    the persistence threshold's d_model (not the run config's model)."""
    cfg = cfg_with("train.zero3_leaf_layers=false")
    assert model_widths(cfg)[0] != 512
    zero = build_deepspeed_config(DS_DIR / "zero3.json", cfg, 2, device_type="cpu", hidden_size=512)[
        "zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"],
            zero["stage3_param_persistence_threshold"]) == (512 * 512, int(0.9 * 512 * 512), 10 * 512)


def test_parameter_offload_alone_keeps_the_optimizer_on_the_device():
    """Only an off-loaded optimizer needs DeepSpeed's CPU Adam: with offload_param alone the optimizer stays torch's
    AdamW, and with torch_adam=false (DeepSpeed's FusedAdam) its params are checked against FusedAdam, not CPU Adam."""
    raw = json.loads((DS_DIR / "zero3.json").read_text())
    raw["zero_optimization"]["offload_param"] = {"device": "cpu"}
    ds = build_deepspeed_config(raw, cfg_with(), 2, device_type="cuda")
    assert ds["optimizer"]["params"]["torch_adam"] is True
    raw["optimizer"]["params"].update(torch_adam=False, set_grad_none=True)  # FusedAdam's, not DeepSpeedCPUAdam's
    ds = build_deepspeed_config(raw, cfg_with(), 2, device_type="cuda")
    assert ds["optimizer"]["params"]["set_grad_none"] is True


def test_a_minimal_file_trains_zero0_quietly_and_fp16_on_a_detected_cpu_is_refused(monkeypatch):
    """A file with no ZeRO stage trains ZeRO-0 (DeepSpeed's default), prints no per-step log line, and with no
    device_type given the device is detected: fp16 on DeepSpeed's CPU accelerator is refused as when it is named."""
    ds = build_deepspeed_config({}, cfg_with(), 1, device_type="cpu")
    assert (ds["zero_optimization"]["stage"], ds["steps_per_print"], ds["wall_clock_breakdown"]) == (0, 10 ** 6, False)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.delenv(CPU_FP16_ENV, raising=False)
    with pytest.raises(DeepSpeedConfigError) as e:
        build_deepspeed_config({}, cfg_with("train.precision=fp16"), 1)
    assert str(e.value) == CPU_FP16_ERROR


def test_a_conflicting_global_batch_names_every_factor():
    """The batch-size conflict shows the product it expected, factor by factor, with the run's world size."""
    with pytest.raises(DeepSpeedConfigError, match=r"train_batch_size=64 conflicts with the run config's value 24 "
                                                   r"\(train\.micro_batch_size=4 x world_size=2 x "
                                                   r"train\.gradient_accumulation_steps=3\)"):
        build_deepspeed_config({"train_batch_size": 64}, cfg_with("train.micro_batch_size=4",
                                                                  "train.gradient_accumulation_steps=3"), 2,
                               device_type="cpu")


def test_offload_refusals_name_the_block_at_fault():
    """A train.zero_stage equal to the file's stage overrides nothing, so the stage refusal claims no override; a ratio
    in offload_param (DeepSpeed reads it only in offload_optimizer) is named as offload_param's unknown key, not
    refused as a partial optimizer offload."""
    raw = json.loads((DS_DIR / "zero2.json").read_text())
    raw["zero_optimization"]["offload_param"] = {"device": "cpu"}
    with pytest.raises(DeepSpeedConfigError, match=r"offload_param needs ZeRO stage 3\+, the run uses stage 2$"):
        build_deepspeed_config(raw, cfg_with("train.zero_stage=2"), 2, device_type="cuda")
    raw = json.loads((DS_DIR / "zero3.json").read_text())
    raw["zero_optimization"]["offload_param"] = {"device": "cpu", "ratio": 0.5}
    with pytest.raises(DeepSpeedConfigError, match=r"^<DeepSpeed config dict>: unknown key "
                                                   r"zero_optimization\.offload_param\.ratio; "):
        build_deepspeed_config(raw, cfg_with(), 2, device_type="cuda")


def test_a_bf16_run_drops_the_fp16_block_and_an_auto_amp_block():
    """bf16 keeps only fp16's enabled flag (as fp32 does: the scaler's settings and their "auto"s mean nothing there);
    amp.enabled "auto" is no request for apex AMP and the block is dropped; an lr conflict says the run's value may be
    the method's default."""
    base = {"fp16": {"enabled": "auto", "loss_scale_window": "auto"}, "amp": {"enabled": "auto"}}
    ds = build_deepspeed_config(base, cfg_with("train.precision=bf16"), 1, device_type="cpu")
    assert ds["fp16"] == {"enabled": False} and ds["bf16"]["enabled"] is True and "amp" not in ds
    with pytest.raises(DeepSpeedConfigError, match=r"optimizer\.params\.lr=0\.5 conflicts with the run config's value "
                                                   r"0\.001 \(train\.lr or the method's default\)"):
        build_deepspeed_config({"optimizer": {"params": {"lr": 0.5}}}, cfg_with(), 1, device_type="cpu")
