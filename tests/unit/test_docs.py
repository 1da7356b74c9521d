"""README.md and docs/*.md, read as a new user types them: every setting (``train.max_steps``), preset and
``launchers/X.py --flag`` and file they name exists, every flag of a launcher is named somewhere, and docs/scaling.md's
table of the scale presets is the presets. A key or flag renamed in the code but not in the docs sends a reader to a
refusal; a flag the docs never name is one no reader finds. Read from the files and the launchers' sources (their
``add_argument`` calls): no launcher runs; ~0.8 s, most of it loading the ten scale presets."""

import dataclasses
import re
from pathlib import Path

import pytest

from vlscale.config import RunConfig, flat_settings, list_presets, load_config

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FILE_SUFFIXES = {"safetensors", "json", "jsonl", "py", "yaml"}
"""``model.safetensors``, ``train.jsonl``, ``train.py``: file names, not settings."""


def _text(doc: Path) -> str:
    return doc.read_text()


def _commands(doc: Path) -> list[str]:
    """Each line of a code block (``\\`` continuations joined, `` #`` comments cut), and each inline code span of
    the prose (a span may wrap a line); an indented command line is a block's."""
    commands, prose, in_block = [], [], False
    for line in _text(doc).splitlines():
        if line.lstrip().startswith("```"):
            in_block = not in_block
        elif commands and commands[-1].endswith("\\"):
            commands[-1] = commands[-1][:-1] + line.split(" #")[0].strip()
        elif in_block or re.match(r" {4}(python|deepspeed) ", line):
            commands.append(line.split(" #")[0])
        else:
            prose.append(line)
    return commands + [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", "\n".join(prose))]


def _script_flags(script: str) -> set[str]:
    """The --flags ``script`` (``launchers/train.py``) defines, from its add_argument calls."""
    src = (ROOT / script).read_text()
    calls = re.findall(r"add_argument\(((?:\s*\"-[^\"]+\",)+)", src)
    return {f for call in calls for f in re.findall(r"--[\w-]+", call)}


def _named_flags() -> dict[str, dict[str, list[str]]]:
    """{script: {flag: [where]}} for each --flag a command gives after ``launchers|benchmarks|scripts/X.py``."""
    out = {}
    for doc in DOCS:
        for command in _commands(doc):
            for m in re.finditer(r"((?:launchers|benchmarks|scripts)/\w+\.py)((?:(?!\s(?:&&|\||;|>)).)*)", command):
                if not (ROOT / m.group(1)).exists():
                    continue
                for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", m.group(2)):
                    out.setdefault(m.group(1), {}).setdefault(flag, []).append(f"{doc.name}: {command[:80]}")
    return out


def test_every_flag_a_command_gives_is_the_scripts_own():
    named = _named_flags()
    assert "launchers/train.py" in named and "--print-config" in named["launchers/train.py"]  # the parse reads them
    wrong = {(script, flag): where[0] for script, flags in named.items() for flag, where in flags.items()
             if flag not in _script_flags(script)}
    assert not wrong, wrong


def test_every_launcher_flag_is_named_in_the_docs():
    text = "\n".join(_text(doc) for doc in DOCS)
    hidden = ("--local_rank", "--local-rank")  # the launchers' own, argparse.SUPPRESS
    missing = {launcher.name: sorted(f for f in _script_flags(f"launchers/{launcher.name}")
                                     if f not in hidden and not re.search(rf"{f}(?![\w-])", text))
               for launcher in sorted((ROOT / "launchers").glob("*.py"))}
    assert missing.get("train.py") is not None  # the launchers were read
    assert not {k: v for k, v in missing.items() if v}


def test_every_setting_named_exists():
    keys = set(flat_settings(dataclasses.asdict(RunConfig())))
    unknown = {}
    for doc in DOCS:
        for m in re.finditer(r"(?<![\w./-])((?:model|peft|data|train)\.[a-z_]\w*)(\.[a-z_]\w*)?(?![\w(])",
                             _text(doc)):
            key, tail = m.group(1), m.group(2)
            if key.split(".")[1] in FILE_SUFFIXES or key in keys and (not tail or key == "data.hf_columns"):
                continue
            unknown.setdefault(key + (tail or ""), doc.name)
    assert "train.max_steps" in keys and not unknown, unknown


def test_every_preset_named_exists():
    presets = set(list_presets())
    unknown = {m.group(1): doc.name for doc in DOCS
               for m in re.finditer(r"(?<![\w./-])((?:paper|scale|mini)/\w*[a-z0-9])(?![\w{*/.-])", _text(doc))
               if m.group(1) not in presets}
    assert "scale/clip_t5_11b_single_adapter_8x24gb" in presets and not unknown, unknown


def test_the_scale_presets_table_is_the_presets():
    """docs/scaling.md's table of the scale presets, row by row, against each preset (its predicted peak: the one its
    description gives, which test_scale_presets.py checks against the estimator)."""
    rows = re.findall(r"^\| `(scale/\w+)` \| (.+) \+ (\S+) \| 8 x \d+GiB \| `(\S+)` \| (\d) \| (\d+) x (\d+) "
                      r"\| (on|off) \| (\w+) \| ([\d.]+ GiB) \|$", _text(ROOT / "docs" / "scaling.md"), re.M)
    assert sorted(r[0] for r in rows) == sorted(p for p in list_presets() if p.startswith("scale/"))
    for name, backbone, vision, ds_file, stage, micro, accum, ckpt, precision, peak in rows:
        cfg = load_config(name)
        t = cfg.train
        assert (cfg.model.backbone, cfg.model.vision, t.deepspeed, t.zero_stage, t.micro_batch_size,
                t.global_batch_size // (t.micro_batch_size * 8), t.gradient_checkpointing, t.precision) == \
            (backbone, vision, ds_file, int(stage), int(micro), int(accum), ckpt == "on", precision), name
        assert f"predicted peak {peak}" in cfg.description, (name, cfg.description)


def test_every_file_named_exists():
    """The scripts, configs, tests and results files the docs point to (``tests/unit/test_X.py``: a placeholder)."""
    named = {m.group(1): doc.name for doc in DOCS for m in re.finditer(
        r"(?<![\w./-])((?:launchers|benchmarks|scripts|tests|vlscale|ds_configs)/[\w/.-]*\.(?:py|json|jsonl|yaml|md))",
        _text(doc))}
    assert "launchers/train.py" in named and "benchmarks/results/replicate_table1.json" in named
    assert not {f: doc for f, doc in named.items() if not (ROOT / f).exists() and "test_X" not in f}


def test_every_launchers_help_works_without_docstrings(launcher, monkeypatch, capsys):
    """``python -OO`` (or PYTHONOPTIMIZE=2) strips docstrings: six launchers built their --help from ``__doc__``
    and failed with AttributeError before parsing anything."""
    for path in sorted((ROOT / "launchers").glob("*.py")):
        module = launcher(path.stem)
        monkeypatch.setattr(module, "__doc__", None)
        with pytest.raises(SystemExit) as stop:
            module.main(["--help"])
        assert stop.value.code == 0, path.name
        assert "--" in capsys.readouterr().out, path.name
