"""Offline architecture registry: the configs (never the weights) of every supported backbone.

Parameter counts and memory plans for t5-11b must work on a laptop with no network, so the HF
configs of the supported language models ship here and models are built from them on the ``meta``
device in seconds. Weights load only for training and evaluation, through ``from_pretrained``
(a hub id or a local directory). CLIP configs come from open_clip's own shipped model configs,
plus the tiny test models registered by :mod:`vlscale.modeling.vision`.

Names are hub ids (``google-t5/t5-11b``, ``facebook/bart-base``, ``google/flan-t5-xxl``); the
short forms (``t5-11b``, ``bart-base``, ``flan-t5-xxl``) are accepted too. ``tiny-t5``,
``tiny-t5-wide`` and ``tiny-bart`` are small random architectures for tests and the embedded default.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from vlscale.config import SourceError, missing_source, offline_hint, owner_here

if TYPE_CHECKING:
    import torch


class MissingWeights(SourceError, FileNotFoundError):
    """Pretrained weights the config asks for do not exist (a ConfigError: the launchers print its line)."""

# Values are the published configs of each checkpoint (architecture fields only).
_T5_V1 = dict(feed_forward_proj="relu", tie_word_embeddings=True, vocab_size=32128, d_kv=64,
              relative_attention_num_buckets=32, dropout_rate=0.1, layer_norm_epsilon=1e-6,
              decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
_FLAN = dict(_T5_V1, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
             relative_attention_max_distance=128)
_BART = dict(vocab_size=50265, max_position_embeddings=1024, activation_function="gelu",
             dropout=0.1, attention_dropout=0.0, activation_dropout=0.0, scale_embedding=False,
             pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
             forced_eos_token_id=2, tie_word_embeddings=True)


def _t5(d_model, d_ff, heads, layers, d_kv=64, base=_T5_V1):
    return dict(base, model_type="t5", d_model=d_model, d_ff=d_ff, num_heads=heads,
                num_layers=layers, num_decoder_layers=layers, d_kv=d_kv)


def _bart(d_model, ffn, heads, layers):
    return dict(_BART, model_type="bart", d_model=d_model, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn,
                encoder_attention_heads=heads, decoder_attention_heads=heads,
                encoder_layers=layers, decoder_layers=layers)


LM_REGISTRY: dict[str, dict] = {
    "google-t5/t5-small": _t5(512, 2048, 8, 6),
    "google-t5/t5-base": _t5(768, 3072, 12, 12),
    "google-t5/t5-large": _t5(1024, 4096, 16, 24),
    "google-t5/t5-3b": _t5(1024, 16384, 32, 24, d_kv=128),
    "google-t5/t5-11b": _t5(1024, 65536, 128, 24, d_kv=128),
    "google/flan-t5-small": _t5(512, 1024, 6, 8, base=_FLAN),
    "google/flan-t5-base": _t5(768, 2048, 12, 12, base=_FLAN),
    "google/flan-t5-large": _t5(1024, 2816, 16, 24, base=_FLAN),
    "google/flan-t5-xl": _t5(2048, 5120, 32, 24, base=_FLAN),
    "google/flan-t5-xxl": _t5(4096, 10240, 64, 24, base=_FLAN),
    "facebook/bart-base": _bart(768, 3072, 12, 6),
    "facebook/bart-large": _bart(1024, 4096, 16, 12),
    # Tiny random architectures (tests, the embedded default). Vocabulary is resized to the
    # tokenizer's length when the model is built.
    "tiny-t5": _t5(64, 128, 4, 2, d_kv=16, base=dict(_T5_V1, vocab_size=1100, dropout_rate=0.0)),
    # T5-3B's proportions (d_ff = 16 d_model, heads x d_kv = 4 d_model): a layer outweighs the
    # embedding, as in t5-3b / t5-11b, for the ZeRO-3 memory profiler's tests.
    "tiny-t5-wide": _t5(128, 2048, 4, 2, d_kv=128, base=dict(_T5_V1, vocab_size=1100, dropout_rate=0.0)),
    "tiny-bart": dict(_bart(64, 128, 4, 2), vocab_size=1100, max_position_embeddings=256,
                      dropout=0.0, pad_token_id=0, bos_token_id=3, eos_token_id=1,
                      decoder_start_token_id=1, forced_eos_token_id=1),
    # Miniature pretrained backbones the project makes and ships (scripts/pretrain_backbones.py,
    # weights in vlscale/assets/backbones/<name>/): 4+4 layers, d_model 128, the synthetic world's
    # 721-token vocabulary (621 SentencePiece pieces + 100 <extra_id_N>). Dropout as in T5 / BART.
    # mini-bart's init_std is BART-base's 0.02 relative to width (0.02 * sqrt(768 / 128)); with
    # 0.02 its decoder learns to ignore the encoder during pretraining (T5 scales its init itself).
    "mini-t5": _t5(128, 512, 4, 4, d_kv=32, base=dict(_T5_V1, vocab_size=721)),
    "mini-bart": dict(_bart(128, 512, 4, 4), vocab_size=721, max_position_embeddings=128,
                      pad_token_id=0, bos_token_id=3, eos_token_id=1, decoder_start_token_id=1,
                      forced_eos_token_id=1, init_std=0.05),
}

_SHORT = {name.split("/")[-1]: name for name in LM_REGISTRY}


def canonical_lm_name(name: str) -> str:
    """``t5-11b`` -> ``google-t5/t5-11b``; hub ids and tiny names map to themselves."""
    if name in LM_REGISTRY:
        return name
    if name in _SHORT:
        return _SHORT[name]
    raise KeyError(f"unknown backbone {name!r} (model.backbone); registry: {sorted(_SHORT)} (or their hub ids; "
                   f"weights from elsewhere: model.backbone_path)")


ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "backbones"


def hub_id(name: str) -> str:
    """Where ``from_pretrained`` finds a registry backbone: the hub id, or for the miniature
    backbones the project makes and ships, their folder in ``vlscale/assets/backbones``."""
    canon = canonical_lm_name(name)
    local = ASSET_DIR / canon
    return str(local) if local.is_dir() else canon


def is_shipped(name: str) -> bool:
    """The miniature pretrained backbones whose weights ship in ``vlscale/assets/backbones`` (not on the hub)."""
    return canonical_lm_name(name).startswith("mini-")


def pretrained_source(name: str, path: Optional[str] = None) -> str:
    """Where ``from_pretrained`` reads registry backbone ``name``: ``path`` (model.backbone_path), else
    :func:`hub_id`, checked without loading anything (launchers/train.py asks before start-up, the builds again):
    a path that is neither there nor a hub id (:func:`~vlscale.config.missing_source`; a hub id is left to the
    load, which may find it in the local cache), a miniature whose shipped folder is gone (it is on no hub), a
    local folder :func:`check_local_checkpoint` refuses."""
    if path is not None and missing_source(path):
        from vlscale.files import cwd_note

        hub = owner_here(path)
        raise MissingWeights(f"model.backbone_path={path!r} does not exist{cwd_note(path)}; give "
                             f"model.backbone_path=DIR, the folder the weights are in now{f' ({hub})' if hub else ''}")
    source = path or hub_id(name)
    if not path and canonical_lm_name(name).startswith("tiny-"):
        raise MissingWeights(f"model.backbone={name} is a random test architecture with no pretrained weights "
                             f"(on no hub): set model.pretrained=false, or model.backbone_path to a folder")
    if not path and is_shipped(name) and not Path(source).is_dir():
        raise MissingWeights(f"model.backbone={name}: no shipped weights (expected {ASSET_DIR / canonical_lm_name(name)}/; "
                             f"made by scripts/pretrain_backbones.py), and {name!r} is not on the hub")
    if os.path.isdir(source):
        check_local_checkpoint(name, source, "model.backbone_path" if path is not None else "model.backbone")
    return source


def check_local_checkpoint(name: str, folder, key: str = "model.backbone_path") -> None:
    """A local ``from_pretrained`` folder that cannot give registry backbone ``name`` its weights, as one
    line naming the file: no config.json (transformers would build a default architecture), a config
    of another model type (it would load nothing and leave the model random), or a safetensors file
    whose header does not parse (truncated or corrupt). Headers only: the tensors are not read."""
    import json

    folder = Path(folder)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        weights = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
        if weights:  # (without weights either, from_pretrained's own message says what is missing)
            raise SourceError(f"{key}={str(folder)!r} has weights ({', '.join(weights[:2])}) but no config.json "
                              f"(a save_pretrained folder is needed)")
        return
    try:
        model_type = json.loads(cfg_file.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise SourceError(f"{cfg_file}: not a readable JSON model config ({' '.join(str(e).split())})") from e
    want = LM_REGISTRY[canonical_lm_name(name)]["model_type"]
    if model_type != want:
        raise SourceError(f"{key}={str(folder)!r}: its config.json is a {model_type!r} model, model.backbone={name} "
                          f"is a {want!r} one")
    from safetensors import safe_open

    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception as e:  # safetensors' SafetensorError: a truncated or corrupt file
            raise SourceError(f"{f}: not a readable safetensors file ({' '.join(str(e).split())}); "
                              f"truncated or corrupt? ({key}={str(folder)!r})") from None


def _missing_parameters(model, info: dict) -> list[str]:
    """Parameters ``from_pretrained`` found no tensor for (and so left at their random initialisation), each by its
    first name: a tied embedding is one parameter, not four (transformers lists every alias). A missing buffer is no
    weight left random: a non-persistent one is never loaded, BART's final_logits_bias starts at its zeros."""
    params = {n for n, _ in model.named_parameters()}
    return sorted(k for k in info.get("missing_keys") or () if k in params)


def fp16_note(backbone: str, pretrained: bool, precision: str) -> Optional[str]:
    """A note for fp16 on a pretrained T5 (t5-*, flan-t5-*): T5 was pretrained on TPUs in bf16, and its activations
    exceed fp16's range (65,504): NaN losses are reported from t5-large up, flan-t5 included (transformers#23918;
    flan-t5's model cards advise bf16 or fp32), which transformers' clamping of T5's hidden states does not always
    prevent. None for bf16 / fp32, BART, and the project's own tiny and mini backbones."""
    try:
        name = canonical_lm_name(backbone)
    except KeyError:
        return None
    if precision != "fp16" or not pretrained or is_tiny(name) or LM_REGISTRY[name]["model_type"] != "t5":
        return None
    return (f"note: train.precision=fp16 with {name}: T5 was pretrained in bf16 and its activations can exceed fp16's "
            f"range (NaN losses are reported from t5-large up, flan-t5 included); train.precision=bf16 where the GPU "
            f"has it (compute capability 8.0+: A100, A10, RTX 30xx and later), else fp32 (a NaN or inf loss stops "
            f"the run at its step, the last good checkpoint kept)")


def is_tiny(name: str) -> bool:
    """The project's own small backbones (``tiny-*`` random, ``mini-*`` shipped pretrained): they
    use the synthetic world's tokenizer."""
    return canonical_lm_name(name).startswith(("tiny-", "mini-"))


def lm_config(name: str, **overrides):
    """The HF config of a registry backbone (offline)."""
    from transformers import BartConfig, T5Config

    data = dict(LM_REGISTRY[canonical_lm_name(name)])
    data.update(overrides)
    model_type = data.pop("model_type")
    cls = T5Config if model_type == "t5" else BartConfig
    cfg = cls(**data)
    cfg.name_or_path = canonical_lm_name(name)
    return cfg


def lm_class(config, own_head: bool = False):
    """The HF class of a backbone config. T5 v1.1 / Flan-T5 (configs with ``tie_word_embeddings: false``)
    have an output layer of their own: transformers 5's T5Config forces ``tie_word_embeddings=True``
    (keeping the false as ``scale_decoder_outputs=False``), and only its ``from_pretrained`` unties a
    separate ``lm_head`` it finds in a checkpoint. :func:`with_own_head`'s class keeps it untied on
    every build, so parameter counts, memory plans and vlscale's ZeRO-3 loading see and load it.
    ``own_head``: the same for a tied config whose checkpoint holds a head of its own
    (:func:`head_of_its_own`)."""
    if config.model_type != "t5":
        from transformers import BartForConditionalGeneration

        return with_own_head(BartForConditionalGeneration) if own_head else BartForConditionalGeneration
    from transformers import T5ForConditionalGeneration

    untied = own_head or not getattr(config, "scale_decoder_outputs", True)
    return with_own_head(T5ForConditionalGeneration) if untied else T5ForConditionalGeneration


@functools.lru_cache(maxsize=None)
def with_own_head(cls):
    """``cls`` whose lm_head is a parameter of its own (the input embeddings stay tied as in ``cls``)."""
    keys = {k: v for k, v in cls._tied_weights_keys.items() if k != "lm_head.weight"}
    return type(f"{cls.__name__}WithOwnHead", (cls,), {"_tied_weights_keys": keys, "__module__": __name__})


def head_of_its_own(folder) -> bool:
    """Whether a local checkpoint folder whose config ties the output layer to the embeddings holds an
    ``lm_head.weight`` with other values: transformers' ``from_pretrained`` then unties them (with a
    warning), so every other build of the folder (ZeRO-3's loader, the meta builds of counts and plans)
    must too, or the model would depend on how it was launched."""
    import json

    import torch
    from safetensors import safe_open

    from vlscale.engine.sharded_loading import checkpoint_files

    folder = Path(folder)
    try:
        where = {k: f for f, keys in checkpoint_files(folder).items() for k in keys}
        config = json.loads((folder / "config.json").read_text())
    except Exception:  # unreadable: the load's own checks name the file
        return False
    if "lm_head.weight" not in where or config.get("tie_word_embeddings", True) is False:
        return False
    if config.get("model_type") == "t5" and config.get("scale_decoder_outputs") is False:
        return False  # T5 v1.1 in transformers 5's terms: untied already
    embedding = next((k for k in ("shared.weight", "model.shared.weight", "encoder.embed_tokens.weight",
                                  "model.encoder.embed_tokens.weight") if k in where), None)
    if embedding is None:
        return True

    def read(key):
        with safe_open(str(where[key]), framework="pt") as f:
            return f.get_tensor(key)

    return not torch.equal(read("lm_head.weight"), read(embedding))


def build_lm(name: str, *, path: Optional[str] = None, pretrained: bool = False,
             device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None,
             config_overrides: Optional[dict] = None):
    """Build a registry backbone.

    ``pretrained=False``: random weights from the shipped config (on ``device``; ``meta`` builds in
    seconds whatever the size). ``pretrained=True``: ``from_pretrained(path or hub id)``; a local
    directory with (sharded) safetensors works offline. Under an active ``deepspeed.zero.Init``
    context, ``from_pretrained`` partitions as it loads so no rank holds the whole model.
    ``dtype`` defaults to float32.
    """
    import pickle

    import torch

    dtype = dtype or torch.float32
    config = lm_config(name, **(config_overrides or {}))
    meta_of_folder = str(device) == "meta" and path is not None and os.path.isdir(path)
    cls = lm_class(config, own_head=meta_of_folder and head_of_its_own(path))  # (from_pretrained unties itself)
    if pretrained:
        source = pretrained_source(name, path)
        key = "model.backbone_path" if path is not None else "model.backbone"
        try:  # a tensor whose shape disagrees with config.json is reported below, naming it
            model, info = cls.from_pretrained(source, dtype=dtype, **(config_overrides or {}), output_loading_info=True,
                                              ignore_mismatched_sizes=True)
        except pickle.UnpicklingError:  # torch's message would advise weights_only=False, never naming the file
            bins = sorted(str(f) for f in Path(source).glob("*.bin")) if os.path.isdir(source) else []
            raise SourceError(f"{', '.join(bins) or source}: not a readable PyTorch weights file (torch.load could not "
                              f"unpickle it as tensors); truncated or corrupt? ({key}={source!r})") from None
        except (OSError, RuntimeError) as e:
            where = ("a local directory needs config.json and the weights" if os.path.isdir(source) else
                     "a hub id needs the network or a local HF cache")
            if path is not None and not os.path.exists(source):  # a folder meant, given relative from elsewhere?
                from vlscale.files import cwd_note

                where = f"not a local folder{cwd_note(source)}; a hub id needs the network or a local HF cache"
            raise SourceError(f"cannot load the weights for {key}={source!r} ({where}): "
                              f"{' '.join(str(e).split())}{offline_hint(source, key)}") from e
        mismatched = sorted(info.get("mismatched_keys") or ())
        if mismatched:
            tensor, found, expected = mismatched[0]
            more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
            raise SourceError(f"{key}={source!r}: tensor {tensor!r} has shape {list(found)}, the model (its "
                              f"config.json) expects {list(expected)}{more}: config.json and the weights disagree")
        missing = _missing_parameters(model, info)
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise SourceError(f"{key}={source!r}: the checkpoint has no tensor for {len(missing)} parameter(s) "
                              f"({', '.join(missing[:3])}{more}), which would stay random; an incomplete file or "
                              f"another architecture's checkpoint")
        return model
    ctx = torch.device(device) if str(device) == "meta" else contextlib.nullcontext()
    with ctx:
        model = cls(config)
    if str(device) != "meta":
        model = model.to(device=device, dtype=dtype)
    elif dtype != torch.float32:
        model = model.to(dtype=dtype)
    return model


def contiguous_position_bias(lm) -> int:
    """Make T5's relative position bias contiguous, so SDPA's fused kernels take T5's self-attention on a GPU.

    ``T5Attention.compute_bias`` returns a permuted view, (1, heads, q, k) over a (q, k, heads) tensor.
    transformers 5.17's ``create_position_bias_mask`` added the padding mask to it without
    ``.contiguous()``, and the sum kept the permuted layout: a mask whose last dimension has stride
    ``heads``, which every fused kernel (flash, memory-efficient, cuDNN) refuses. On an H200 every
    encoder and decoder self-attention call of a T5 fell back to the math path, which computes
    bf16/fp16 inputs in fp32 and keeps the score matrices: 831 MB of 2.65 GB of saved activations for
    t5-base at batch 32 (``benchmarks/saved_by_op.py``; the cross-attention, whose bias is a
    contiguous zeros tensor, took cuDNN). transformers 5.25 makes the mask contiguous itself; this
    gives every supported version that behaviour. Wraps ``compute_bias`` of each module that has a
    relative bias (the first layer of each stack; the others reuse its bias). -> modules wrapped."""
    wrapped = 0
    for module in lm.modules():
        fn = getattr(module, "compute_bias", None)
        if not getattr(module, "has_relative_attention_bias", False) or fn is None or \
                getattr(fn, "vlscale_contiguous", False):
            continue

        def compute_bias(*args, _inner=fn, **kwargs):
            return _inner(*args, **kwargs).contiguous()

        compute_bias.vlscale_contiguous = True
        module.compute_bias = compute_bias
        wrapped += 1
    return wrapped

