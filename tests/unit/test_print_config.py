"""launchers/train.py --print-config: the run a preset, its base: chain and overrides make, seen before it starts.
The settings come out as YAML that --config reads back as the same run, each under its meaning (the docstring beside
its field in vlscale/config.py, the one place it is written), with its type, default and where it was set; then the
DeepSpeed config the run builds. Nothing starts, builds or is written; a bad setting is start-up's one-line refusal."""

import json
from pathlib import Path

import vlscale

from vlscale.config import load_config
from vlscale.engine.deepspeed_config import build_deepspeed_config, default_device_type, default_ds_file

ARGS = ["--config", "paper/clip_bart_single_lora", "peft.lora_rank=4", "output_dir=12:30",
        "description=a\nb # c\u2028d\x85e\x1b", "train.adam_eps=1e-7"]  # YAML's line breaks and a control character


def _print_config(launcher, capsys, argv):
    code = launcher("train").main(["--print-config", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_printed_settings_load_back_as_the_same_run_and_start_nothing(launcher, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # output_dir=12:30 is not made here
    code, out, err = _print_config(launcher, capsys, ARGS)
    assert code == 0 and err == ""
    assert not (tmp_path / "12:30").exists()
    assert "'description=a\\nb # c\\u2028d\\x85e\\x1b'" in out.replace("\n#   ", " ")  # escaped: it ended the comment
    lines = out.splitlines()
    assert lines[0].startswith("# launchers/train.py --config paper/clip_bart_single_lora peft.lora_rank=4 ")
    assert max(len(line) for line in lines if line.lstrip().startswith("#")) <= 120  # the comment lines wrapped
    assert "``" not in out  # rST's literals as Markdown's
    assert [line for line in lines if line and not line.startswith("#")][0].startswith("output_dir: ")  # then sections
    assert "# The V&L model: CLIP visual encoder, visual projection, encoder-decoder language model." in lines
    (tmp_path / "run.yaml").write_text(out)
    want = load_config(ARGS[1], ARGS[2:])
    assert load_config(str(tmp_path / "run.yaml")) == want
    ds = json.loads("".join(line.removeprefix("#   ") for line in out[out.index("\n#   {\n"):].splitlines()))
    assert ds == build_deepspeed_config(default_ds_file(want), want, 1, device_type=default_device_type())


def test_each_setting_says_where_it_was_set(launcher, capsys, tmp_path, monkeypatch):
    """The last file of the base: chain to set a key is named (not its base), an override over both."""
    (tmp_path / "mine.yaml").write_text("base: tiny\ntrain: {max_steps: 7, lr: 0.01}\n")
    code, out, _ = _print_config(launcher, capsys, ["--config", str(tmp_path / "mine.yaml"), "train.lr=0.02",
                                                    "peft.lora_rank=4"])
    lines = out.splitlines()
    assert code == 0
    assert "# peft.lora_rank=4 has no effect: it is read only with peft.method=lora (this run: peft.method=adapter)" \
        in lines  # start-up's notes
    assert f"  max_steps: 7  # int, default 300, set by file {tmp_path / 'mine.yaml'}" in lines
    assert "  lr: 0.02  # float or null, default null, set by override" in lines
    assert "  backbone: tiny-t5  # str, default tiny-t5, set by preset tiny" in lines
    assert "  max_frames: 64  # int, default" in lines
    assert f"name: {tmp_path / 'mine.yaml'}  # str, default default, set by --config" in lines
    assert "# Examples per rank per micro-batch." in [line.strip() for line in lines]
    assert "# note: ZeRO-3 on one process without offload partitions nothing but still pays its per-module gather " \
           "hooks (3-4x" in lines
    assert "  tasks: [vqa, gqa, nlvr2, caption]  # list of str, default [vqa, gqa, nlvr2, caption], set by preset " \
           "tiny" in lines and "  hf_columns: {}  # mapping, default" in lines
    code, out, _ = _print_config(launcher, capsys, [])
    assert "name: default  # str, default" in out.splitlines()  # no --config: the default's name
    odd = tmp_path / "a\u2028b.yaml"  # a line break to YAML, in "set by file ..."'s comment
    odd.write_text("base: tiny\nname: odd\ntrain: {max_steps: 7}\n")
    code, out, _ = _print_config(launcher, capsys, ["--config", str(odd)])
    assert f"  max_steps: 7  # int, default 300, set by file {tmp_path}/a\\u2028b.yaml" in out.splitlines()
    assert f"name: odd  # str, default default, set by file {tmp_path}/a\\u2028b.yaml" in out.splitlines()
    (tmp_path / "printed.yaml").write_text(out)
    assert load_config(str(tmp_path / "printed.yaml")) == load_config(str(odd))
    monkeypatch.chdir(Path(vlscale.__file__).parent)  # a shipped preset given by its path is named as a preset
    sources = {}
    load_config("configs/tiny.yaml", sources=sources)
    assert sources["model.backbone"] == "preset tiny"


def test_a_bad_setting_is_the_refusal_start_up_gives(launcher, capsys):
    code, out, err = _print_config(launcher, capsys, ["--config", "tiny", "peft.methd=lora"])
    assert (code, out) == (1, "")
    assert err.startswith("vlscale: rank 0: ConfigError: unknown key peft.methd; did you mean 'method'?")
    assert len(err.splitlines()) == 1


def test_the_world_size_is_the_launchers_and_rank_0_alone_prints(launcher, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    code, out, _ = _print_config(launcher, capsys, ["--config", "tiny", "train.global_batch_size=64",
                                                    "train.zero_stage=2"])
    heading = f"for world_size=4 (the launcher's WORLD_SIZE), on {default_device_type()}:"
    assert code == 0 and heading in out.replace("\n#   ", " ")
    assert '#     "gradient_accumulation_steps": 1,' in out.splitlines()  # 64 / (16 x 4)
    # the note wraps where the checkout's path falls: read as one line
    assert "# note: train.zero_stage=2 (from the config) overrides zero_optimization.stage=3 of" in \
        out.replace("\n#   ", " ")
    monkeypatch.setenv("RANK", "1")
    assert _print_config(launcher, capsys, ["--config", "tiny"]) == (0, "", "")


def test_a_gpu_run_is_seen_on_a_machine_without_one(launcher, capsys, monkeypatch):
    """fp16 is refused on DeepSpeed's CPU accelerator: the refusal says how to see the GPU run's config there."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    code, out, err = _print_config(launcher, capsys, ["--config", "tiny", "train.precision=fp16"])
    assert (code, out) == (1, "") and len(err.splitlines()) == 1
    assert err.rstrip().endswith("; to see a GPU run's config on a machine without one, set DS_ACCELERATOR=cuda")
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")  # nothing touches a GPU: the config is built, not run
    code, out, err = _print_config(launcher, capsys, ["--config", "tiny", "train.precision=fp16"])
    assert (code, err) == (0, "") and "on cuda:" in out.replace("\n#   ", " ")
    ds = json.loads("".join(line.removeprefix("#   ") for line in out[out.index("\n#   {\n"):].splitlines()))
    assert ds["fp16"]["enabled"] is True  # with its loss scaling
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # another refusal of the DeepSpeed config: the hint is not its fix
    code, out, err = _print_config(launcher, capsys, ["--config", "tiny", "--deepspeed", "nowhere.json"])
    assert (code, out) == (1, "") and "DeepSpeedConfigError: --deepspeed: DeepSpeed config file 'nowhere.json'" in err
    assert "DS_ACCELERATOR" not in err


def test_a_reader_that_stops_early_is_no_traceback(launcher, monkeypatch):
    """`--print-config | head`: head leaves, the write fails with BrokenPipeError; it was a traceback."""
    import sys

    class Closed:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self):
            raise ValueError("no file")

    monkeypatch.setattr(sys, "stdout", Closed())
    assert launcher("train").main(["--print-config", "--config", "tiny"]) == 0


def test_custom_tasks_print_as_one_mapping_setting_and_load_back(launcher, capsys, tmp_path):
    """data.custom_tasks, declared in a file and added to by an override, prints as one mapping setting that
    --config reads back as the same run."""
    mine = tmp_path / "mine.yaml"
    mine.write_text(f"base: tiny\ndata:\n  source: real\n  root: {tmp_path}\n  tasks: [vqa, okvqa, flickr]\n"
                    "  custom_tasks:\n    okvqa: {like: vqa, prefix: 'ok vqa:'}\n")
    args = ["--config", str(mine), "data.custom_tasks.flickr={like: caption}"]
    code, out, _ = _print_config(launcher, capsys, args)
    assert code == 0
    assert "  custom_tasks: {flickr: {like: caption}, okvqa: {like: vqa, prefix: 'ok vqa:'}}  # mapping, default {}, " \
           "set by override" in out.splitlines()
    (tmp_path / "printed.yaml").write_text(out)
    printed = load_config(str(tmp_path / "printed.yaml"))
    assert printed == load_config(args[1], args[2:])
    assert printed.data.custom_tasks == {"okvqa": {"like": "vqa", "prefix": "ok vqa:"}, "flickr": {"like": "caption"}}
