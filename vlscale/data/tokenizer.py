"""Tokenizers: the backbone's own, a named one, or the synthetic world's small SentencePiece model.

:func:`build_tokenizer` picks, in order: ``cfg.model.tokenizer`` (hub name or local directory,
through ``AutoTokenizer``); for tiny backbones (``tiny-t5``, ``tiny-bart``) the synthetic world's
vocabulary shipped in ``vlscale/assets/synthetic_spm.model`` (made by scripts/make_tokenizer.py);
otherwise the backbone's tokenizer (``cfg.model.backbone_path`` or the registry's hub id). It then
adds ``cfg.model.extra_special_tokens`` tokens ``<vis_extra_id_N>`` (the reference code's extra
visual sentinels). The synthetic tokenizer follows T5 (pad=0, eos=1, unk=2, 100 ``<extra_id_N>``
sentinels at the end) and also has ``<s>`` (id 3) as bos, so tiny BART models use it as well.
The tokenizer's pad and eos ids must be the language model's, and its decoder start one of the
tokenizer's pad / eos / bos (T5: pad, BART: eos); :func:`check_special_ids` refuses a pair that
disagrees, naming both, as targets would end in a token generation does not stop at. A local directory
must hold the tokenizer's files (transformers builds a tokenizer of special tokens only from a folder with
just a ``config.json``): one without them is refused, naming the files looked for.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

SYNTHETIC_SPM = Path(__file__).resolve().parent.parent / "assets" / "synthetic_spm.model"
SYNTHETIC_EXTRA_IDS = 100


@functools.lru_cache(maxsize=4)
def _synthetic_base(path: str):
    from transformers import T5Tokenizer

    if not Path(path).exists():
        raise FileNotFoundError(f"synthetic tokenizer model {path} is missing; "
                                "regenerate it with: python scripts/make_tokenizer.py")
    _check_sentencepiece(path)
    kwargs = dict(vocab_file=path, extra_ids=SYNTHETIC_EXTRA_IDS, bos_token="<s>", legacy=False)
    if hasattr(T5Tokenizer, "convert_to_native_format"):  # transformers >= 5: build the fast backend
        kwargs = T5Tokenizer.convert_to_native_format(**kwargs)
    tok = T5Tokenizer(**kwargs)
    ids = (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.bos_token_id)
    if ids != (0, 1, 2, 3):
        raise ValueError(f"{path}: expected pad/eos/unk/bos ids (0, 1, 2, 3), got {ids}")
    return tok


def _check_sentencepiece(path: str) -> None:
    """One line naming the file when it is no SentencePiece model (transformers would fall back to
    other formats and report a missing ``tiktoken`` instead)."""
    if not Path(path).is_file():
        raise ValueError(f"synthetic tokenizer model {path} is not a file (a SentencePiece .model file is needed)")
    import sentencepiece as spm

    try:
        spm.SentencePieceProcessor(model_file=path)
    except Exception as e:  # sentencepiece raises RuntimeError / OSError on a corrupt or truncated file
        raise ValueError(f"synthetic tokenizer model {path} is not a readable SentencePiece model "
                         f"({' '.join(str(e).split())}); truncated or corrupt? regenerate it with: "
                         f"python scripts/make_tokenizer.py") from None


def synthetic_tokenizer(path: str | Path = SYNTHETIC_SPM):
    """The synthetic world's tokenizer (a fresh copy: callers may add tokens to it)."""
    import copy

    return copy.deepcopy(_synthetic_base(str(path)))


def _backbone_source(cfg) -> str:
    if cfg.model.backbone_path:
        return cfg.model.backbone_path
    try:
        from vlscale.modeling.backbones import hub_id
    except ImportError:
        return cfg.model.backbone
    try:
        return hub_id(cfg.model.backbone)
    except KeyError:
        return cfg.model.backbone


def _is_tiny(name: str) -> bool:
    try:
        from vlscale.modeling.backbones import is_tiny
        return is_tiny(name)
    except (ImportError, KeyError):
        return name.startswith("tiny-")


def check_source(source: str, what: str) -> None:
    """A tokenizer source that is neither a local folder nor a hub id, or an ``owner/name`` not there whose owner is
    a folder here (a folder missing in it), refused (a SourceError naming ``what``) without loading anything:
    launchers/train.py asks before start-up, the build again."""
    from vlscale.config import SourceError, missing_source, owner_here
    from vlscale.files import cwd_note

    if missing_source(source):
        hub = owner_here(source)  # weights/tok beside weights/: a folder missing there
        raise SourceError(f"{what}={source!r} does not exist" + (f"{cwd_note(source)}; {hub}" if hub else
                                                                 " (expected a local folder, or a hub id)"))


def _auto(source: str, what: str):
    from transformers import AutoTokenizer

    from vlscale.config import SourceError, offline_hint

    check_source(source, what)
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise SourceError(f"cannot load the tokenizer for {what}={source!r} (a hub id needs the network "
                          f"or a local HF cache; a local directory needs its tokenizer files): "
                          f"{' '.join(str(e).split())}{offline_hint(source, what)}") from e
    # transformers builds a tokenizer with no vocabulary (special tokens only) from a folder holding a config.json
    # and none of the tokenizer class's files: every word would be <unk>
    files = sorted(set(getattr(tok, "vocab_files_names", {}).values()))
    if os.path.isdir(source) and files and not any(os.path.isfile(os.path.join(source, f)) for f in files):
        raise SourceError(f"{what}={source!r} holds no tokenizer vocabulary (none of {files}; transformers would "
                          f"build a {type(tok).__name__} of {len(tok)} special tokens from its config.json): copy "
                          f"the backbone's tokenizer files there, or name them with model.tokenizer")
    return tok


def add_visual_sentinels(tok, n: int):
    """Add ``<vis_extra_id_{n-1}> ... <vis_extra_id_0>`` as special tokens (reference order)."""
    if n > 0:
        tok.add_tokens([f"<vis_extra_id_{i}>" for i in range(n - 1, -1, -1)], special_tokens=True)
    return tok


def _model_config(cfg):
    """(the LM config the run builds, where it comes from): a local folder's config.json when the weights
    load from one (model.backbone_path, a shipped miniature), else the registry's (random weights, hub ids)."""
    import os

    from vlscale.modeling.backbones import hub_id, lm_config

    folder = cfg.model.backbone_path or hub_id(cfg.model.backbone)
    if cfg.model.pretrained and os.path.isfile(os.path.join(folder, "config.json")):
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(folder), os.path.join(folder, "config.json")
        except (OSError, ValueError):
            pass  # an unreadable config.json: the model's load reports it
    return lm_config(cfg.model.backbone), f"the registry's {cfg.model.backbone} config"


def check_special_ids(tok, config, tok_source: str, config_source: str) -> None:
    """One line naming both sources when the tokenizer's pad / eos ids are not the model config's, or the
    config's decoder start is none of the tokenizer's pad / eos / bos."""
    from vlscale.config import SourceError

    diff = []
    for key in ("pad_token_id", "eos_token_id"):
        want = getattr(config, key, None)
        if want is not None and getattr(tok, key, None) not in (want if isinstance(want, list) else [want]):
            diff.append(f"{key} {getattr(tok, key, None)} vs {want}")
    start = getattr(config, "decoder_start_token_id", None)
    ids = {tok.pad_token_id, tok.eos_token_id, getattr(tok, "bos_token_id", None)} - {None}
    if start is not None and start not in ids:
        diff.append(f"decoder_start_token_id {start} is none of the tokenizer's pad/eos/bos {sorted(ids)}")
    if diff:
        raise SourceError(f"tokenizer {tok_source} and model config {config_source} disagree: {'; '.join(diff)} "
                          f"(tokenizer vs model); give the backbone's own tokenizer (model.tokenizer)")


def build_tokenizer(cfg):
    """The run's tokenizer (see the module docstring for the order of choices), checked against the LM's
    config (:func:`check_special_ids`)."""
    from vlscale.config import check_run_config

    check_run_config(cfg, "build_tokenizer")
    if cfg.model.tokenizer == "synthetic":
        tok, source = synthetic_tokenizer(), str(SYNTHETIC_SPM)
    elif cfg.model.tokenizer:
        tok, source = _auto(cfg.model.tokenizer, "model.tokenizer"), f"model.tokenizer={cfg.model.tokenizer}"
    elif _is_tiny(cfg.model.backbone):
        tok, source = synthetic_tokenizer(), str(SYNTHETIC_SPM)
    else:
        key = "model.backbone_path" if cfg.model.backbone_path else "model.backbone"
        tok, source = _auto(_backbone_source(cfg), key), f"{key}={_backbone_source(cfg)}"
    if tok.pad_token_id is None:
        raise ValueError(f"tokenizer {getattr(tok, 'name_or_path', tok)!r} has no pad token")
    config, config_source = _model_config(cfg)
    check_special_ids(tok, config, source, config_source)
    return add_visual_sentinels(tok, cfg.model.extra_special_tokens)
