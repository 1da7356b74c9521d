"""Run configuration: typed dataclasses, YAML presets, dotted ``key=value`` overrides.

A run is described by one :class:`RunConfig` with four sections (``model``, ``peft``, ``data``,
``train``) and a few top-level keys. Presets are YAML files shipped in ``vlscale/configs`` and are
selected by name (``paper/clip_bart_single_adapter``) or by path. A preset may name another with
``base:`` (a path, relative to the naming file's folder, or a preset name); its keys are merged on top.
Overrides use dotted keys (``train.max_steps=10``); values are parsed as YAML scalars/lists. Unknown
keys and bad values raise :class:`ConfigError` naming the key and the valid choices.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import importlib.util
import inspect
import json
import logging
import math
import numbers
import os
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

log = logging.getLogger(__name__)

PRESET_DIR = Path(__file__).parent / "configs"
DEFAULT_PRESET = "default"

PEFT_METHODS = ("adapter", "hyperformer", "compacter", "lora", "prompt", "none")
ADAPTER_METHODS = ("adapter", "hyperformer", "compacter")
"""The bottleneck methods: modules after sublayers, run through vlscale.kernels.fused_adapter."""
SHARING_MODES = ("multiple", "half_shared", "single")
BIAS_CHOICES = ("none", "lora_only", "all")
PRECISIONS = ("fp32", "bf16", "fp16")
EVAL_GATHER = ("auto", "always", "decoder", "never")  # train.eval_gather: vlscale.engine.gathered
PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
"""Bytes per element of each of :data:`PRECISIONS`."""
DTYPE_NAMES = {"fp32": "fp32", "float32": "fp32", "float": "fp32", "bf16": "bf16", "bfloat16": "bf16",
               "fp16": "fp16", "float16": "fp16", "half": "fp16"}
"""DeepSpeed's names of the three dtypes (its ``DtypeEnum``: ``data_types.grad_accum_dtype``) -> :data:`PRECISIONS`.
``communication_data_type`` takes only :data:`PRECISIONS` (case aside)."""
IMAGE_TASKS = ("vqa", "gqa", "nlvr2", "caption")
VIDEO_TASKS = ("tvqa", "how2qa", "tvc", "yc2c")
ALL_TASKS = IMAGE_TASKS + VIDEO_TASKS
SYNTHETIC_MIN_IMAGE_SIZE = 16
"""The smallest ``data.image_size`` the synthetic world draws its scenes at."""


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names it."""


class SourceError(ConfigError, OSError):
    """A model or tokenizer the config names cannot be loaded (a hub id without network or local cache,
    a folder without the files): the key and its value are the report."""


def torch_dtype(precision: str):
    """The torch dtype of ``precision`` (one of :data:`PRECISIONS`)."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def offline_hint(source: str, what: str) -> str:
    """What to do where ``source`` (``what``'s value, e.g. ``model.backbone``) did not load as a hub id: no network
    (HF_HUB_OFFLINE=1, a cluster's compute nodes). "" for a local folder."""
    if os.path.exists(source):
        return ""
    key = "model.backbone_path" if what == "model.backbone" else what
    return (f"; to use a hub id without network here, download it once where there is (hf download {source} "
            f"--local-dir DIR) and give {key}=DIR")


def is_hub_id(source: str) -> bool:
    """Whether ``source`` has a hub id's shape: a name, or ``owner/name``, of letters, digits, '-', '_' and '.'."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


def owner_here(source: str) -> str:
    """For a hub id ``owner/name`` not there (the caller's :func:`missing_source` said so) whose owner is a folder
    here (``weights/t5`` beside ``weights/``), the words saying so for an error: a folder missing in it was meant, not
    a hub id. "" otherwise."""
    parent = Path(source).parent
    if len(Path(source).parts) != 2 or not parent.is_dir() or not is_hub_id(source):
        return ""
    return f"not looked up on the hub: its folder {str(parent)!r} is here"


def missing_source(source: str) -> bool:
    """A model or tokenizer source that is neither there nor a hub id (``/data/hf/t5-11b``, ``./x``), or an
    ``owner/name`` whose owner is a folder here (:func:`owner_here`): a folder that is missing, to be said so, not
    looked up on the hub (nor told to be downloaded from it). Another ``owner/name`` is a hub id."""
    return not os.path.exists(source) and (not is_hub_id(source) or bool(owner_here(source)))


MAPPING_SETTINGS = ("hf_columns", "custom_tasks")
"""The settings whose value is a mapping (``data.hf_columns``, ``data.custom_tasks``): one setting each."""


def flat_settings(d: dict, prefix: str = "") -> dict:
    """A config dict as ``{"train.max_steps": 300, ...}`` (:data:`MAPPING_SETTINGS` kept whole: a mapping value)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flat_settings(v, key + ".") if isinstance(v, dict) and k not in MAPPING_SETTINGS else {key: v})
    return out


def _check_choice(section: str, name: str, value: Any, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{section}.{name}={value!r} is not valid; choose one of {list(choices)}")


def _check_positive(section: str, name: str, value, allow_zero: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # a dataclass built in Python: not coerced
        raise ConfigError(f"{section}.{name}={value!r} must be a number")
    if not math.isfinite(value):  # .nan / .inf in YAML: NaN passes every comparison below
        raise ConfigError(f"{section}.{name}={value!r} must be a finite number")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{section}.{name}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


SEED_RANGE = 2**32  # np.random.seed takes [0, 2**32) only; default_rng refuses negatives, torch wraps them


def _check_seed(section: str, name: str, value) -> int:
    """A seed numpy takes as it is (``seed_everything``, the sampler's and the synthetic world's generators)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < SEED_RANGE:
        raise ConfigError(f"{section}.{name}={value!r} is not a seed numpy takes; set an integer from 0 to "
                          f"{SEED_RANGE - 1} (2**32 - 1), e.g. {section}.{name}=0")
    return int(value)


def did_you_mean(value, choices) -> str:
    close = difflib.get_close_matches(str(value), list(choices), n=1)
    return f"did you mean {close[0]!r}? " if close else ""


def registry_backbones() -> tuple[str, ...]:
    """Every name ``model.backbone`` may take (``vlscale.modeling.backbones``, importable without torch):
    hub ids, tiny/mini names and the short forms (``t5-small``). Even with model.backbone_path the
    architecture comes from the registry."""
    from vlscale.modeling.backbones import LM_REGISTRY

    return tuple(sorted(set(LM_REGISTRY) | {n.split("/")[-1] for n in LM_REGISTRY}))


# The fields of an HF config.json that fix a backbone's architecture (vocabulary, dropout and token ids
# are not among them: the embeddings are resized, dropout is model.dropout).
_ARCH_KEYS = ("model_type", "d_model", "d_ff", "d_kv", "num_heads", "num_layers", "num_decoder_layers",
              "feed_forward_proj", "encoder_layers", "decoder_layers", "encoder_ffn_dim", "decoder_ffn_dim",
              "encoder_attention_heads", "decoder_attention_heads")


def _folder_config(path) -> Optional[dict]:
    """The ``config.json`` of a local model folder, or None when there is none to read."""
    file = Path(path) / "config.json"
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{file}: not a readable JSON config ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: a model config must be a JSON object")
    vocab = data.get("vocab_size", 1)  # the embeddings' rows: from_pretrained fails on these (shapes, types)
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
        raise ConfigError(f"{file}: vocab_size={vocab!r} must be a positive integer (the embeddings' rows)")
    if data.get("num_layers") is not None and data.get("num_decoder_layers") is None:
        data["num_decoder_layers"] = data["num_layers"]  # T5Config's default
    return data


def _arch_differences(name: str, folder: dict) -> list[str]:
    """``key: folder value vs registry value`` for each architecture field the folder's config sets
    differently from registry backbone ``name``."""
    from vlscale.modeling.backbones import LM_REGISTRY, canonical_lm_name

    entry = LM_REGISTRY[canonical_lm_name(name)]
    return [f"{k}={folder[k]!r} (registry {entry[k]!r})" for k in _ARCH_KEYS
            if k in entry and k in folder and folder[k] != entry[k]]


def matching_backbones(folder: dict) -> list[str]:
    """The registry backbones (short names) whose architecture is the one of a folder's ``config.json``."""
    from vlscale.modeling.backbones import LM_REGISTRY

    return [n.split("/")[-1] for n, e in LM_REGISTRY.items()
            if e.get("model_type") == folder.get("model_type") and not _arch_differences(n, folder)]


def _folder_hint(folder: dict) -> str:
    match = matching_backbones(folder)
    if match:
        return f"its config.json is the registry's {match[0]!r}"
    dims = ", ".join(f"{k}={folder[k]}" for k in _ARCH_KEYS if k in folder)
    return (f"its config.json ({dims}) is no registry backbone's architecture (vlscale builds, counts and "
            f"plans memory for those of vlscale/modeling/backbones.py only)")


def _clip_config_files() -> list[Path]:
    """The model config files open_clip builds offline: those it ships and those in ``vlscale/registry/open_clip``,
    found without importing open_clip (none where it is missing: building the model says so)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return []
    folders = [Path(p) / "model_configs" for p in spec.submodule_search_locations]
    folders.append(Path(__file__).parent / "registry" / "open_clip")
    return [f for folder in folders for f in folder.glob("*.json")]


@functools.lru_cache(maxsize=None)
def registry_visions() -> tuple[str, ...]:
    """Every model config name open_clip builds offline (``vlscale.modeling.vision.clip_config``)."""
    return tuple(sorted({f.stem for f in _clip_config_files()}))


def common_visions() -> list[str]:
    """The :func:`registry_visions` an error names as examples: the plain ResNet and ViT names and the shipped towers
    (no -quickgelu / -SigLIP variants, no timm towers)."""
    return [v for v in registry_visions() if re.fullmatch(r"RN\d+(x\d+)?|ViT-\w+-\d+|(tiny|mini)-.*", v)]


@functools.lru_cache(maxsize=None)
def foreign_visions() -> dict[str, str]:
    """Model configs of :func:`registry_visions` whose tower is not open_clip's own ResNet or ViT (a timm model:
    the SigLIP and ConvNeXt towers, ...) or whose tokens are not its grid (CoCa's attentional pooler) -> what it is;
    vlscale reads the grid of those two only."""
    out = {}
    for f in _clip_config_files():
        try:
            vision = json.loads(f.read_text()).get("vision_cfg", {})
        except (OSError, ValueError):
            continue
        if vision.get("timm_model_name"):
            out[f.stem] = f"timm's {vision['timm_model_name']!r}"
        elif vision.get("attentional_pool"):
            out[f.stem] = "a ViT whose tokens are CoCa's attentional pooler's learned queries, not its patch grid"
    return out


CLIP_SCHEMAS = ("hf-hub:", "local-dir:")  # open_clip names that load from elsewhere


@dataclass
class ModelConfig:
    """The V&L model: CLIP visual encoder, visual projection, encoder-decoder language model."""

    backbone: str = "tiny-t5"
    """Registry name of the language model (``t5-small``, ``google-t5/t5-11b``, ``bart-base``, ...)."""
    backbone_path: Optional[str] = None
    """Where weights load from (hub id or local directory); ``None`` uses the registry's hub id."""
    pretrained: bool = False
    """Load the backbone's pretrained weights (``from_pretrained``); False builds it randomly."""
    vision: str = "tiny-clip-rn"
    """open_clip model name (``RN101``, ``ViT-B-32``, ``ViT-L-14``; a ViT with OpenAI's weights: its ``-quickgelu``
    name, ``ViT-B-32-quickgelu``) or a tiny test name."""
    vision_pretrained: Optional[str] = None
    """open_clip ``pretrained=`` tag or local checkpoint file; ``None`` means random weights."""
    feature_source: str = "images"
    """``images``: encode with the frozen CLIP on the fly; ``cache``: read precomputed features."""
    pool_size: int = 6
    """Grid features are adaptive-max-pooled to pool_size x pool_size tokens (RN101: 7x7 -> 6x6)."""
    max_frames: int = 64
    """Video inputs: at most this many frame features."""
    extra_special_tokens: int = 0
    """Extra ``<extra_id_N>``-style tokens added to the vocabulary (200 in the paper's BART setup)."""
    tokenizer: Optional[str] = None
    """Tokenizer name or path, or ``synthetic`` (the synthetic world's, offline: e.g. random-weight
    runs of real architectures); ``None`` uses the backbone's (the synthetic one for tiny/mini models)."""
    dropout: Optional[float] = None
    """Override the backbone's dropout rate; ``None`` keeps the config's value."""

    def __post_init__(self):
        backbones = registry_backbones()
        if self.backbone not in backbones and Path(self.backbone).is_dir():
            folder = _folder_config(self.backbone)
            match = matching_backbones(folder) if folder else []
            use = match[0] if match else "NAME"
            raise ConfigError(
                f"model.backbone={self.backbone!r} is a folder; model.backbone names a registry architecture and "
                f"the weights load from model.backbone_path with model.pretrained=true: "
                + (f"{_folder_hint(folder)}, so set " if folder else "its config.json is missing; set ")
                + f"model.backbone={use} model.backbone_path={self.backbone} model.pretrained=true")
        if self.backbone not in backbones:
            short = [b for b in backbones if "/" not in b]
            raise ConfigError(f"model.backbone={self.backbone!r} is not in the registry; "
                              f"{did_you_mean(self.backbone, backbones)}valid: {short} or their hub ids "
                              f"(weights from elsewhere: one of these plus model.backbone_path=DIR "
                              f"model.pretrained=true)")
        if self.backbone_path and not self.pretrained:
            raise ConfigError(f"model.backbone_path={self.backbone_path!r} is read only with model.pretrained=true; "
                              f"model.pretrained=false builds {self.backbone} with random weights. Set "
                              f"model.pretrained=true to train on its weights, or model.backbone_path=null "
                              f"(a tokenizer from a folder: model.tokenizer=DIR)")
        visions = registry_visions()
        if visions and self.vision not in visions and not self.vision.startswith(CLIP_SCHEMAS):
            shown = common_visions()
            raise ConfigError(f"model.vision={self.vision!r} is not an open_clip model; "
                              f"{did_you_mean(self.vision, visions)}valid: {shown}, {len(visions) - len(shown)} more "
                              f"(open_clip.list_models()), or 'hf-hub:ID' / 'local-dir:PATH'")
        if self.vision in foreign_visions():
            raise ConfigError(f"model.vision={self.vision!r} is a tower vlscale does not read "
                              f"({foreign_visions()[self.vision]}, in open_clip's config); it takes the grid of "
                              f"open_clip's own ResNet (RN50, RN101, ...) and ViT (ViT-B-32, ViT-L-14, ...) towers: "
                              f"choose one of those")
        _check_choice("model", "feature_source", self.feature_source, ("images", "cache"))
        _check_positive("model", "pool_size", self.pool_size)
        _check_positive("model", "max_frames", self.max_frames)
        if self.max_frames > 64:
            raise ConfigError(f"model.max_frames={self.max_frames} exceeds the supported 64 frames")
        _check_positive("model", "extra_special_tokens", self.extra_special_tokens, allow_zero=True)
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout!r} must be in [0, 1)")

    def check_backbone_path(self) -> None:
        """A local model.backbone_path holds model.backbone's architecture. Training loads the folder's
        own config.json, while inspect_model, profile_memory and the checkpoint-size check build the
        registry's: a folder of another architecture would train one model and report another. Checked
        when a run's config is loaded (:func:`load_config`, :func:`config_from_dict`); a folder that is
        not there (yet) or has no config.json is left to the loader's error."""
        if not (self.pretrained and self.backbone_path and Path(self.backbone_path).is_dir()):
            return
        folder = _folder_config(self.backbone_path)
        if folder is None:
            return
        diff = _arch_differences(self.backbone, folder)
        if diff:
            match = matching_backbones(folder)
            fix = (f"set model.backbone={match[0]}" if match else
                   f"point model.backbone_path at a {self.backbone} checkpoint")
            raise ConfigError(f"model.backbone_path={self.backbone_path!r} is not a {self.backbone} checkpoint: "
                              f"{', '.join(diff)}; {_folder_hint(folder)}; {fix}")


@dataclass
class PeftConfig:
    """Which parameter-efficient method is inserted into the language model, and what trains."""

    method: str = "adapter"
    """One of adapter, hyperformer, compacter, lora, prompt, none."""
    sharing: str = "single"
    """``multiple`` (one set per task), ``half_shared`` (share one projection), ``single`` (one set)."""
    half_shared: str = "down"
    """With sharing=half_shared: which projection is shared across tasks (``down`` or ``up``)."""
    reduction_factor: int = 8
    """Bottleneck adapters / Compacter: hidden = d_model // reduction_factor."""
    fused: bool = True
    """Bottleneck adapters run through vlscale.kernels.fused_adapter where supported."""
    activation: str = "gelu"
    """Adapter non-linearity: ``gelu`` (exact) or ``gelu_tanh``."""
    # Hyperformer
    task_embedding_dim: int = 512
    """Hyperformer: width of each task's embedding, one half of the hypernetwork's input."""
    layer_embedding_dim: int = 512
    """Hyperformer: width of each layer's embedding, the other half of the hypernetwork's input."""
    hypernet_hidden_dim: int = 128
    """Hyperformer: hidden width of the hypernetwork's projector (task + layer embedding -> this -> projected)."""
    hypernet_projected_dim: int = 8
    """Hyperformer: width of the projected embedding the adapter weights are generated from."""
    # Compacter
    phm_dim: int = 2
    """Compacter: number n of Kronecker terms (W = sum_i A_i kron B_i)."""
    shared_phm_rule: bool = False
    """Compacter: share the A_i ("rule") matrices across all layers (off in the paper)."""
    factorized_phm: bool = False
    """Compacter: low-rank factorisation of the B_i matrices (off in the paper)."""
    phm_rank: int = 1
    """Compacter: rank of each B_i with factorized_phm=true."""
    # LoRA
    lora_rank: int = 128
    """LoRA: rank r of the update B A of each adapted q / v projection."""
    lora_alpha: float = 32.0
    """LoRA: the update is scaled by lora_alpha / lora_rank."""
    lora_dropout: float = 0.1
    """LoRA: dropout on the input of the low-rank path, in [0, 1)."""
    # Biases (HF PEFT's LoraConfig.bias)
    bias: str = "lora_only"
    """Which biases of the language model train besides the groups below: ``none``; ``lora_only``, the biases of
    the LoRA-adapted projections (BART's q_proj / v_proj; T5's have none) under peft.method=lora; ``all``, every
    bias of its linear layers and layer norms (BitFit's set; with train_layer_norms=false the layer norms' biases
    train without their weights). The paper's LoRA presets take ``all``: the reference trains every parameter
    named "bias" under LoRA and no layer-norm weight (BENCHMARKS.md, updated parameters)."""
    # Prompt tuning
    n_prompts: int = 40
    """Prompt tuning: number of prompt vectors prepended to the encoder's input."""
    prompt_hidden_dim: int = 800
    """Prompt tuning: hidden width of the MLP the prompt vectors go through (Linear -> tanh -> Linear)."""
    extra_prompts: bool = False
    """Add task-specific encoder prompts on top of another method (adapters + prompts)."""
    # Trainable set
    train_layer_norms: bool = True
    """Every layer norm of the language model trains (the paper's default)."""
    train_projection: bool = True
    """The visual projection trains (always, in the paper; false: benchmarks that time a PEFT method alone)."""
    train_lm: bool = False
    """Full fine-tuning of the language model (output layer included)."""
    train_vision: bool = False
    """Full fine-tuning of the CLIP visual encoder (needs feature_source=images)."""

    @staticmethod
    def upgrade_earlier_keys(data: dict, prefix: str) -> dict:
        """Read the keys of earlier versions (saved run configs, adapter_config.json) as today's:
        ``lora_train_bias: true|false`` is ``bias: lora_only|none``."""
        if "lora_train_bias" not in data:
            return data
        data = dict(data)
        old = _coerce(f"{prefix}.lora_train_bias", bool, data.pop("lora_train_bias"))
        if "bias" in data:
            raise ConfigError(f"{prefix}.lora_train_bias (an earlier name) and {prefix}.bias are both given; "
                              f"keep {prefix}.bias")
        data["bias"] = "lora_only" if old else "none"
        log.warning("%s.lora_train_bias=%s is an earlier name: read as %s.bias=%s", prefix, str(old).lower(),
                    prefix, data["bias"])
        return data

    def __post_init__(self):
        _check_choice("peft", "method", self.method, PEFT_METHODS)
        _check_choice("peft", "sharing", self.sharing, SHARING_MODES)
        _check_choice("peft", "half_shared", self.half_shared, ("down", "up"))
        _check_choice("peft", "activation", self.activation, ("gelu", "gelu_tanh"))
        _check_choice("peft", "bias", self.bias, BIAS_CHOICES)
        for name in ("reduction_factor", "phm_dim", "phm_rank", "lora_rank", "n_prompts",
                     "prompt_hidden_dim", "task_embedding_dim", "layer_embedding_dim",
                     "hypernet_hidden_dim", "hypernet_projected_dim"):
            _check_positive("peft", name, getattr(self, name))
        _check_positive("peft", "lora_alpha", self.lora_alpha)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"peft.lora_dropout={self.lora_dropout!r} must be in [0, 1)")
        if self.method == "hyperformer" and self.sharing != "single":
            raise ConfigError(
                f"peft.sharing={self.sharing} does not apply to peft.method=hyperformer: Hyperformer shares one "
                "hypernetwork across tasks by construction (each task's adapters come from its task embedding); "
                "set peft.sharing=single (the default)")
        if self.method == "none" and self.sharing != "single":
            raise ConfigError(
                f"peft.sharing={self.sharing} does not apply to peft.method=none, which adds no PEFT modules to share "
                "(what trains is set by peft.train_lm, train_layer_norms, train_projection, bias); set "
                "peft.sharing=single (the default) or a peft.method")
        if self.sharing == "half_shared" and self.method not in ("adapter", "compacter", "lora"):
            raise ConfigError(
                f"peft.sharing=half_shared applies to adapter, compacter and lora, not peft.method={self.method!r}")
        if self.extra_prompts and self.method == "prompt":
            raise ConfigError(
                "peft.extra_prompts adds task-specific prompts on top of another method; peft.method=prompt is "
                "prompt tuning itself (peft.sharing=multiple gives each task its prompts): drop peft.extra_prompts")
        if self.train_lm and (not self.train_layer_norms or self.bias == "none"):
            key = "train_layer_norms=false" if not self.train_layer_norms else "bias=none"
            raise ConfigError(
                f"peft.train_lm=true trains every parameter of the language model, its layer norms and biases "
                f"included: peft.{key} contradicts it; drop one of the two")


@dataclass
class DataConfig:
    """Tasks, where their data comes from, and how batches are drawn."""

    tasks: list[str] = field(default_factory=lambda: list(IMAGE_TASKS))
    """Tasks trained together: image tasks (vqa, gqa, nlvr2, caption) or video tasks (tvqa, how2qa, tvc, yc2c),
    and the custom tasks of ``custom_tasks``."""
    custom_tasks: dict = field(default_factory=dict)
    """Tasks of your own in a built-in task's format, trained beside the built-in ones (name them in ``tasks``):
    ``{okvqa: {like: vqa, prefix: "okvqa:"}}`` reads ``root/okvqa/`` with VQA's file names (its images in
    ``root/okvqa/images/``) and is trained, evaluated and scored as VQA is, as a task of its own (its own per-task
    modules, prefix, scores). ``like``: a built-in task; ``prefix``: the text put before its inputs (default
    ``"<name>:"``). Needs source=real with ``root`` (docs/datasets.md, "Your own task")."""
    source: str = "synthetic"
    """``synthetic`` (the embedded world, no download) or ``real`` (files under ``root``)."""
    root: Optional[str] = None
    """Root folder of real datasets (layout and formats: docs/datasets.md); needs source=real."""
    feature_cache: Optional[str] = None
    """Folder of precomputed CLIP features (launchers/extract_features.py)."""
    synthetic_train: int = 600
    """Synthetic world: training examples per task."""
    synthetic_eval: int = 100
    """Synthetic world: validation and test examples per task."""
    synthetic_seed: int = 0
    """Synthetic world: the seed of every example (an integer in [0, 2**32))."""
    image_size: int = 64
    """Synthetic world: image side in pixels, at least 16 (resized to the CLIP input size)."""
    sampling: str = "proportional"
    """``proportional`` to task size (the reference round-robin) or ``temperature``."""
    temperature: float = 1.0
    """``sampling=temperature`` only: p_t ∝ n_t^(1/T) (refused with ``proportional``, which would ignore it)."""
    max_input_length: int = 40
    """Text input tokens per example (task prefix included); longer inputs are cut and counted."""
    max_target_length: int = 20
    """Target tokens per example (end-of-sequence included); longer targets are cut and counted."""
    vqa_targets: str = "best"
    """VQA training targets (and those of custom tasks like vqa): ``best``, the highest-scoring answer of each
    question's soft ``label`` at full weight; ``sampled``, as VL-T5 / VL-Adapter train VQA: each time a question is
    drawn, one answer drawn in proportion to its score, the example's loss multiplied by that score (no scored answer:
    weight 0). Needs ``train.loss_reduction=example``. Questions without a ``label`` (the synthetic world's) keep
    their target at weight 1."""
    skip_bad_records: bool = False
    """Skip malformed records (counted and reported) instead of failing."""
    hf_dataset: Optional[str] = None
    """Any HF ``datasets`` dataset (name or local path) with image and text columns; needs source=real."""
    hf_columns: dict = field(default_factory=dict)
    """Column mapping for hf_dataset, e.g. {image: img, question: q, answer: a}."""
    read_ahead_threads: Optional[int] = None
    """Threads that read and transform the images of the next batches (training and evaluation) while the current
    one runs, per process; ``0`` reads them in the training thread. Default: on a GPU, this rank's share of the
    machine's CPUs (CPUs / ranks on it), 1 to 4; on the CPU 0 (the ranks' compute keeps the cores busy). Batches
    are the same either way. Cached features are read in the training thread (mapped, nothing to decode)."""

    def __post_init__(self):
        if not isinstance(self.custom_tasks, dict):
            raise ConfigError(f"data.custom_tasks={self.custom_tasks!r} must be a mapping (task name: {{like: ...}})")
        if not self.tasks:
            raise ConfigError("data.tasks is empty; name at least one of " + str(list(ALL_TASKS)))
        for t in self.tasks:
            if t not in ALL_TASKS + tuple(self.custom_tasks):
                raise ConfigError(f"data.tasks={t!r} is not valid; choose one of {list(ALL_TASKS)}, or of the custom "
                                  f"tasks declared in data.custom_tasks ({list(self.custom_tasks) or 'none'}; "
                                  "docs/datasets.md, 'Your own task')")
        repeated = [t for i, t in enumerate(self.tasks) if t in self.tasks[:i]]
        if repeated:
            raise ConfigError(f"data.tasks={self.tasks} names {repeated[0]!r} twice; list each task once")
        _check_choice("data", "source", self.source, ("synthetic", "real"))
        if self.source == "synthetic":
            for name in ("root", "hf_dataset"):
                if getattr(self, name):
                    raise ConfigError(f"data.{name}={getattr(self, name)!r} is ignored with data.source=synthetic "
                                      f"(the embedded world); set data.source=real to train on it, or data.{name}=null")
        if self.custom_tasks:
            self._declare_custom_tasks()
        if self.hf_columns and not self.hf_dataset:
            raise ConfigError(f"data.hf_columns={self.hf_columns!r} is read only with data.hf_dataset (the columns of an "
                              f"HF dataset), which is not set; set data.hf_dataset, or data.hf_columns={{}}")
        _check_choice("data", "sampling", self.sampling, ("proportional", "temperature"))
        _check_choice("data", "vqa_targets", self.vqa_targets, ("best", "sampled"))
        _check_positive("data", "temperature", self.temperature)
        if self.temperature != 1.0 and self.sampling != "temperature":
            raise ConfigError(f"data.temperature={self.temperature!r} is ignored with data.sampling={self.sampling!r} "
                              f"(tasks drawn in proportion to their size); set data.sampling=temperature to sample "
                              f"with p ~ n^(1/T), or leave data.temperature at 1.0")
        self.synthetic_seed = _check_seed("data", "synthetic_seed", self.synthetic_seed)
        _check_positive("data", "synthetic_train", self.synthetic_train)
        _check_positive("data", "synthetic_eval", self.synthetic_eval)
        for name in ("image_size", "max_input_length", "max_target_length"):
            _check_positive("data", name, getattr(self, name))
        _check_positive("data", "read_ahead_threads", self.read_ahead_threads, allow_zero=True)
        if self.source == "synthetic" and self.image_size < SYNTHETIC_MIN_IMAGE_SIZE:
            raise ConfigError(f"data.image_size={self.image_size} is too small for the synthetic world: set an "
                              f"integer >= {SYNTHETIC_MIN_IMAGE_SIZE} (default 64)")

    def _declare_custom_tasks(self) -> None:
        """Check ``custom_tasks`` and make them known to ``vlscale.data.tasks.get_task`` in this process (its
        docstring says why there)."""
        names = list(self.custom_tasks)
        if self.source == "synthetic":
            raise ConfigError(f"data.custom_tasks declares {names}, but data.source=synthetic: the synthetic world "
                              "generates its own tasks only and cannot generate a custom task; set data.source=real "
                              "and data.root=DIR, or data.custom_tasks={}")
        if self.hf_dataset:
            raise ConfigError(f"data.custom_tasks declares {names}, which read files under data.root; "
                              f"data.hf_dataset={self.hf_dataset!r} is one dataset read for the built-in tasks: "
                              "drop one of the two")
        from vlscale.data.tasks import declare_custom_tasks

        try:
            declare_custom_tasks(self.custom_tasks)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def format_of(self, task: str) -> str:
        """The built-in task whose format ``task`` has: itself, or a custom task's ``like`` (its spec's ``format``;
        imported only then, keeping this module's import light)."""
        if task not in self.custom_tasks:
            return task
        from vlscale.data.tasks import get_task

        return get_task(task).format

    def is_video(self) -> bool:
        """Whether the run's tasks are video tasks (a run holds one kind)."""
        return self.format_of(self.tasks[0]) in VIDEO_TASKS

    def check_source(self) -> None:
        """data.source=real needs data.root or data.hf_dataset. Checked when a run's config is loaded
        (:func:`load_config`, :func:`config_from_dict`), not in ``__post_init__``: code may build a
        DataConfig first and set its root later (the loaders' tests build one without, to see their error)."""
        if self.source == "real" and not self.root and not self.hf_dataset:
            raise ConfigError("data.source=real needs data.root (a folder in the layout of docs/datasets.md) "
                              "or data.hf_dataset; neither is set")


@dataclass
class TrainConfig:
    """Optimisation, precision and the loop's schedule."""

    max_steps: int = 300
    """Optimizer steps of the run."""
    micro_batch_size: int = 16
    """Examples per rank per micro-batch."""
    gradient_accumulation_steps: Optional[int] = None
    """Micro-batches per optimizer step. ``None``: 1, or with ``global_batch_size`` derived from it at start-up."""
    global_batch_size: Optional[int] = None
    """Examples per optimizer step over all ranks, kept on any number of ranks: the run derives
    ``gradient_accumulation_steps = global_batch_size / (micro_batch_size x world_size)`` at start-up
    (``vlscale.engine.deepspeed_config.resolve_batch``; a remainder is an error). ``None``: the global batch
    is ``micro_batch_size x world_size x gradient_accumulation_steps``. Both set: they must agree."""
    lr: Optional[float] = None
    """``None``: the method's default (1e-3 for PEFT methods, 1e-4 for full fine-tuning)."""
    peft_lr: Optional[float] = None
    """The learning rate of the PEFT method's own weights (every parameter of ``model.peft``: adapters,
    Hyperformer, Compacter, LoRA's A and B, prompts); the layer norms, the visual projection and any backbone
    weights (LoRA's trained q/v biases too: they are the backbone's) keep ``train.lr``. ``None``: ``train.lr``
    for everything, as the paper trains. Both follow the same warm-up and decay."""
    weight_decay: float = 0.01
    """AdamW's decoupled weight decay."""
    warmup_ratio: float = 0.05
    """Linear warm-up over this fraction of max_steps, then linear decay to 0; in [0, 1)."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW's (beta1, beta2)."""
    adam_eps: float = 1e-6
    """AdamW's epsilon."""
    clip_grad_norm: float = 5.0
    """Clip the global gradient norm to this (DeepSpeed's gradient_clipping; 0: no clipping)."""
    precision: str = "fp32"
    """``fp32``, ``bf16`` or ``fp16`` (dynamic loss scaling): DeepSpeed's fp16 / bf16 blocks and the model's dtype."""
    gradient_checkpointing: bool = False
    """Recompute the language model's activations in backward (HF's non-reentrant checkpointing)."""
    loss_reduction: str = "token"
    """``token``: the cross-entropy's mean over the global batch's target tokens; ``example``: each
    example's mean over its tokens, then the mean over the global batch's examples, as VL-T5 /
    VL-Adapter's ``train_step`` reduces it (short targets weigh more). VL-Adapter's VQA loss also
    multiplies each example by its answer's soft score, which neither reduction does."""
    init_adapter: Optional[str] = None
    """A trained ``adapter/`` (another run's ``output_dir/adapter``) whose trainable tensors, and trained buffers, the
    model takes after its build, before the first step (a warm start: multi-task then one task, or training on at
    another learning rate); optimizer, schedule, step and data order start afresh. The adapter's model.* / peft.*
    settings must be this run's, and its tasks too where it holds per-task weights (``peft.sharing=multiple``):
    refused before the run starts. ``--resume`` does not read it (the checkpoint holds the weights). ``None``: the
    freshly built weights. Relative paths are from the working directory."""
    seed: int = 0
    """Seeds python, numpy and torch (random frozen weights, dropout) and the multitask sampler; an integer
    in [0, 2**32)."""
    eval_every: int = 0
    """Evaluate every N steps (0: only at the end)."""
    eval_batch_size: int = 32
    """Examples per rank per generation batch in evaluation."""
    eval_max_examples: Optional[int] = None
    """Score at most this many examples per task (``None``: all). Those examples are read once and held for the run
    (~300 MiB for 200,000 VQA questions; docs/datasets.md)."""
    eval_gather: str = "auto"
    """Under ZeRO-3, generate with the model gathered whole on each rank (one all-gather per evaluation instead of
    one per module per new token; :mod:`vlscale.engine.gathered`), or with its decoding parameters gathered around
    each batch's decoding (all but the encoder and the visual side: one all-gather of the decoder per batch):
    ``auto`` the whole model where it fits in half of the device's free memory, else the decoding parameters where
    they do, else neither; ``always`` (the whole model), ``decoder``, or ``never`` (ZeRO-3's per-module gathers).
    No effect at other stages."""
    test_eval: bool = False
    """After the final validation, also evaluate the test split in the same process, writing what
    ``launchers/evaluate.py --split test`` writes (``output_dir/eval_test/``)."""
    log_every: int = 1
    """Write the TensorBoard training scalars every N steps; ``train_log.jsonl`` gets every step."""
    save_every: int = 0
    """Write a resumable checkpoint every N steps (0: only at the end)."""
    zero_stage: Optional[int] = None
    """Override the DeepSpeed file's ZeRO stage."""
    deepspeed: Optional[str] = None
    """The DeepSpeed file launchers/train.py and profile_memory.py use when ``--deepspeed`` is not given
    (relative paths: from the working directory, else the repository root); None: ds_configs/zero3.json
    at every stage (``vlscale.engine.deepspeed_config.default_ds_file``). The scale presets name the file
    their plan needs (e.g. zero3_offload.json)."""
    zero3_leaf_layers: bool = True
    """ZeRO-3: gather each LM layer's parameters as one unit (DeepSpeed leaf modules) instead of module
    by module (``vlscale.engine.sharded_loading.mark_zero3_leaf_layers``)."""

    def __post_init__(self):
        _check_choice("train", "precision", self.precision, PRECISIONS)
        _check_choice("train", "loss_reduction", self.loss_reduction, ("token", "example"))
        _check_choice("train", "eval_gather", self.eval_gather, EVAL_GATHER)
        _check_positive("train", "max_steps", self.max_steps)
        _check_positive("train", "micro_batch_size", self.micro_batch_size)
        _check_positive("train", "gradient_accumulation_steps", self.gradient_accumulation_steps)
        _check_positive("train", "global_batch_size", self.global_batch_size)
        if self.gradient_accumulation_steps is None and self.global_batch_size is None:
            self.gradient_accumulation_steps = 1
        _check_positive("train", "lr", self.lr)
        _check_positive("train", "peft_lr", self.peft_lr)
        _check_positive("train", "eval_batch_size", self.eval_batch_size)
        _check_positive("train", "eval_max_examples", self.eval_max_examples)
        _check_positive("train", "log_every", self.log_every)
        for name in ("eval_every", "save_every", "weight_decay", "clip_grad_norm"):
            _check_positive("train", name, getattr(self, name), allow_zero=True)
        _check_positive("train", "adam_eps", self.adam_eps)
        self.seed = _check_seed("train", "seed", self.seed)
        if self.init_adapter is not None and not str(self.init_adapter).strip():
            raise ConfigError(f"train.init_adapter={self.init_adapter!r} is empty; name an adapter directory (a "
                              "run's output_dir/adapter), or null to start from the freshly built weights")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"train.warmup_ratio={self.warmup_ratio!r} must be in [0, 1)")
        if self.zero_stage is not None:
            _check_choice("train", "zero_stage", self.zero_stage, (0, 1, 2, 3))
        if len(self.adam_betas) != 2:
            raise ConfigError(f"train.adam_betas={self.adam_betas!r} must hold two numbers")
        if not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ConfigError(f"train.adam_betas={self.adam_betas!r}: each must be in [0, 1)")


@dataclass
class RunConfig:
    """A whole run. ``name`` is the preset it came from."""

    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = "runs/default"
    """The run's folder: logs, metrics, run_config.yaml, adapter/, checkpoints/ (from the working directory)."""
    name: str = DEFAULT_PRESET
    """The preset the run came from (--config's name, unless the file sets one); shown in logs and summaries."""
    description: str = ""
    """Free text about the run."""

    def __post_init__(self):
        if not self.output_dir.strip():
            raise ConfigError(f"output_dir={self.output_dir!r} is empty; name the run's folder "
                              f"(e.g. output_dir=runs/{self.name})")
        if self.peft.train_vision and self.model.feature_source == "cache":
            raise ConfigError("peft.train_vision=true needs model.feature_source=images "
                              "(cached features cannot be fine-tuned)")
        if self.train.peft_lr is not None and self.peft.method == "none" and not self.peft.extra_prompts:
            raise ConfigError(f"train.peft_lr={self.train.peft_lr!r} sets the learning rate of the PEFT weights, and "
                              "peft.method=none adds none (nor peft.extra_prompts): drop train.peft_lr, or set train.lr")
        video = [t for t in self.data.tasks if self.data.format_of(t) in VIDEO_TASKS]
        if video and len(video) != len(self.data.tasks):
            raise ConfigError(f"data.tasks={self.data.tasks} mixes image and video tasks; train them separately")
        if self.data.vqa_targets == "sampled" and self.train.loss_reduction != "example":
            raise ConfigError("data.vqa_targets=sampled weighs each example's loss by its answer's score, which "
                              f"needs per-example losses: set train.loss_reduction=example (it is "
                              f"{self.train.loss_reduction!r}), as VL-T5 / VL-Adapter train")

    def ignored_settings(self) -> list[str]:
        """One line per setting given away from its default that this run does not read (a method's widths
        under another method, ``peft.half_shared`` without half_shared sharing, the synthetic world's sizes
        with real data, ``model.pool_size`` on a ViT or past an RN's grid, a custom task ``data.tasks`` does not
        name). launchers/train.py prints them as notes at start-up, on rank 0. Noted, not refused: an override
        that switches the method or the sharing keeps the preset's other values
        (``--config paper/clip_bart_half_shared_adapters peft.sharing=single`` leaves ``half_shared: up``),
        override lists shared by every method carry each method's widths (the benchmarks; replicate.py's rows
        once), and saved run configs must keep loading."""
        notes = []
        for key, (is_read, needs, now) in self._reads().items():
            section, name = key.split(".")
            value = getattr(getattr(self, section), name)
            if value != _default(type(getattr(self, section)), name) and not is_read:
                shown = str(value).lower() if isinstance(value, bool) else value  # as an override writes it
                notes.append(f"{key}={shown} has no effect: it is read only with {needs} (this run: {now})")
        pool = self.model.pool_size
        if pool != _default(ModelConfig, "pool_size"):
            notes += [f"model.pool_size={pool} {why}" for why in [self._pool_size_unread()] if why]
        untrained = [t for t in self.data.custom_tasks if t not in self.data.tasks]
        if untrained:
            notes.append(f"data.custom_tasks declares {untrained}, which data.tasks={self.data.tasks} does not name: "
                         "not trained or evaluated in this run")
        return notes

    def unread_settings(self) -> set[str]:
        """The settings (``peft.lora_rank``, ...) this run does not read whatever their values (see
        :meth:`ignored_settings`; ``model.pool_size`` aside)."""
        return {key for key, (is_read, _, _) in self._reads().items() if not is_read}

    def _reads(self) -> dict[str, tuple[bool, str, str]]:
        p, d = self.peft, self.data
        method, prompts = f"peft.method={p.method}", p.method == "prompt" or p.extra_prompts
        return {  # key: (is it read in this run, what reads it, what this run has instead)
            "peft.half_shared": (p.sharing == "half_shared", "peft.sharing=half_shared", f"peft.sharing={p.sharing}"),
            **{f"peft.{k}": (p.method in ADAPTER_METHODS, f"peft.method={'|'.join(ADAPTER_METHODS)}", method)
               for k in ("reduction_factor", "activation", "fused")},
            **{f"peft.{k}": (p.method == "hyperformer", "peft.method=hyperformer", method)
               for k in ("task_embedding_dim", "layer_embedding_dim", "hypernet_hidden_dim", "hypernet_projected_dim")},
            **{f"peft.{k}": (p.method == "compacter", "peft.method=compacter", method)
               for k in ("phm_dim", "shared_phm_rule", "factorized_phm")},
            "peft.phm_rank": (p.method == "compacter" and p.factorized_phm,
                              "peft.method=compacter and peft.factorized_phm=true",
                              f"{method}, peft.factorized_phm={str(p.factorized_phm).lower()}"),
            **{f"peft.{k}": (p.method == "lora", "peft.method=lora", method)
               for k in ("lora_rank", "lora_alpha", "lora_dropout")},
            **{f"peft.{k}": (prompts, "peft.method=prompt or peft.extra_prompts=true", method + ", no extra_prompts")
               for k in ("n_prompts", "prompt_hidden_dim")},
            "model.max_frames": (d.is_video(), "video tasks", f"data.tasks={d.tasks}"),
            **{f"data.{k}": (d.source == "synthetic", "data.source=synthetic", f"data.source={d.source}")
               for k in ("synthetic_train", "synthetic_eval", "synthetic_seed", "image_size")},
        }

    def _pool_size_unread(self) -> Optional[str]:
        """Why ``model.pool_size`` does not give pool_size x pool_size visual tokens in this run, or None."""
        if self.data.is_video():
            return "has no effect: video tasks take model.max_frames frame features"
        if self.model.vision.startswith(CLIP_SCHEMAS):  # hf-hub: / local-dir: models: their grid is known once
            return None  # built (looking their config up here went to the hub, and raised offline)
        try:
            from vlscale.modeling.vision import vision_dims

            dims = vision_dims(self.model.vision)
        except (ImportError, KeyError):
            return None
        side = dims["grid_side"]
        if not dims["is_resnet"]:
            return (f"has no effect: model.vision={self.model.vision} is a ViT, whose {side}x{side} patch tokens "
                    f"are not pooled (pooling applies to an RN's grid)")
        if self.model.pool_size > side:
            return (f"is capped at model.vision={self.model.vision}'s {side}x{side} grid: the run takes "
                    f"{side * side} visual tokens per image, not {self.model.pool_size ** 2}")
        return None

    @property
    def lr(self) -> float:
        if self.train.lr is not None:
            return self.train.lr
        return 1e-4 if (self.peft.train_lm or self.peft.train_vision) else 1e-3

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- building

def check_run_config(cfg, who: str) -> None:
    """TypeError naming ``who`` where ``cfg`` is no RunConfig (a preset's name, a dict: an AttributeError inside)."""
    if not isinstance(cfg, RunConfig):
        raise TypeError(f"{who} takes a RunConfig (vlscale.config.load_config(name, overrides)), got "
                        f"{type(cfg).__name__}" + (f" {cfg!r}" if isinstance(cfg, str) else ""))


def _default(cls, name: str):
    """The default of dataclass ``cls``'s field ``name``."""
    f = cls.__dataclass_fields__[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _strip_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp, True
    return tp, False


def _coerce(key: str, tp, value):
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} may not be null")
    origin = typing.get_origin(tp) or tp
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return _build(tp, value, key)
    if origin is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false")
    if origin is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}={value!r} must be an integer")
        return value
    if origin is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"{key}={value!r} must be a number")
        return float(value)
    if origin is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be a string")
        return str(value)
    if origin is list:
        if isinstance(value, (str, int, float)):
            value = [v.strip() for v in str(value).split(",")] if isinstance(value, str) else [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list")
        (inner,) = typing.get_args(tp) or (Any,)
        return [v if inner is Any else _coerce(f"{key}[{i}]", inner, v) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} must be a mapping")
        return dict(value)
    return value


def _build(cls, data: dict, prefix: str = ""):
    upgrade = getattr(cls, "upgrade_earlier_keys", None)
    if upgrade is not None:
        data = upgrade(data, prefix)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f"{prefix}." if prefix else ""
        error = ConfigError(f"unknown key {where}{unknown[0]}; {did_you_mean(unknown[0], names)}"
                            f"valid keys{' in ' + prefix if prefix else ''}: {names}")
        error.key = f"{where}{unknown[0]}"
        raise error
    kwargs = {k: _coerce(f"{prefix}.{k}" if prefix else k, hints[k], v) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as e:  # pragma: no cover - defensive
        raise ConfigError(f"{prefix or 'config'}: {e}") from e


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "hf_columns":
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def list_presets() -> list[str]:
    """The shipped presets' names, as ``load_config`` and ``--config`` take them (``tiny``, ``paper/...``)."""
    return sorted(str(p.relative_to(PRESET_DIR).with_suffix("")) for p in PRESET_DIR.rglob("*.yaml"))


def _preset_path(name_or_path: str) -> Path:
    p = Path(name_or_path).expanduser()  # --config=~/x.yaml and base: ~/x.yaml reach here unexpanded
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    q = PRESET_DIR / f"{name_or_path}.yaml"
    if q.exists():
        return q
    if p.is_dir():  # a run's folder (--config runs/a) was "Is a directory"
        own = p / "run_config.yaml"
        raise ConfigError(f"{name_or_path!r} is a folder, not a preset or YAML file"
                          + (f"; the settings of the run there are {own}" if own.is_file() else ""))
    if p.exists():
        return p
    if p.suffix in (".yaml", ".yml") or os.sep in name_or_path:  # a file meant
        from vlscale.files import cwd_note

        raise ConfigError(f"no file {name_or_path!r}{cwd_note(p)}, and no shipped preset of that name; "
                          f"{did_you_mean(name_or_path, list_presets())}shipped presets: {list_presets()}")
    raise ConfigError(f"no preset or file named {name_or_path!r}; {did_you_mean(name_or_path, list_presets())}shipped "
                      f"presets: {list_presets()}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (PyYAML keeps the last one, silently)."""

    def construct_mapping(self, node, deep=False):
        keys = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: later keys override merged ones
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # SafeLoader's own error names an unhashable key
            if key in keys:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping (the first would be ignored)",
                    key_node.start_mark)
            keys.add(key)
        return super().construct_mapping(node, deep)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error on one line: where, and what."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    what = " ".join(str(getattr(e, "problem", None) or e).split())
    context = getattr(e, "context", None)
    return f"{where}{what}" + (f" ({' '.join(context.split())})" if context else "")


def _load_yaml(name_or_path: str, seen: tuple = (), named_by: Optional[Path] = None,
               sources: Optional[dict] = None) -> dict:
    """The settings of a preset and the chain of its ``base:`` files, merged; ``sources`` (where given) gets, for
    each dotted key, the file that set it last (:func:`load_config`'s ``sources``)."""
    try:
        path = _preset_path(name_or_path)
    except ConfigError as e:
        if named_by is None:
            raise
        raise ConfigError(f"{named_by}: base {name_or_path!r}: {e}") from None
    if str(path) in seen:
        raise ConfigError(f"preset {path} includes itself through 'base'")
    try:
        data = yaml.load(text := path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(e)}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read as a YAML preset ({e})") from e
    if data is None:  # an empty file (or comments only), e.g. truncated: it trained the bare defaults
        raise ConfigError(f"{path}: is empty (no settings); a preset names its base or at least one section")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a preset must be a mapping of sections, got {type(data).__name__}")
    _keep_text(data, yaml.load(text, Loader=yaml.BaseLoader))
    base = data.pop("base", None)
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"{path}: base={base!r} must be one preset name or YAML path")
    if base:
        beside = path.parent / str(base)  # a relative base is first looked up beside the file naming it
        if not Path(str(base)).is_absolute() and beside.is_file():
            base = str(beside)
        base_data = _load_yaml(base, seen + (str(path),), named_by=path, sources=sources)
    if sources is not None:
        sources.update(dict.fromkeys(flat_settings(data), _file_label(path)))
    return _deep_merge(base_data, data) if base else data


def _file_label(path: Path) -> str:
    """``preset paper/clip_bart_single_adapter`` for a shipped preset, ``file PATH`` for another YAML file."""
    try:
        return f"preset {path.resolve().relative_to(PRESET_DIR.resolve()).with_suffix('')}"
    except ValueError:
        return f"file {path}"


def _keep_text(data: dict, text: dict, prefix: str = "") -> None:
    """A string setting of a YAML file is its text (``text``: the file read with every scalar a string), as an
    override's is: ``output_dir: 12:30`` trained into 750 (YAML 1.1's base 60), ``name: 007`` was 7. A null and the
    other settings keep YAML's reading. A key a merge (``<<:``) brought is read from the merged mapping's text (the
    first of a list that holds it, as YAML merges)."""
    for key, value in data.items():
        raw = _text_of(text, key)
        if isinstance(value, dict):
            _keep_text(value, raw, f"{prefix}{key}.")
        elif value is not None and not isinstance(value, str) and isinstance(raw, str) and _takes_text(
                f"{prefix}{key}") or value is None and raw == "~" and _is_home_path(f"{prefix}{key}"):
            data[key] = raw


def _text_of(text, key: str):
    """``key``'s text in a mapping read with every scalar a string (BaseLoader keeps a merge's ``<<`` as a key), or
    None."""
    if not isinstance(text, dict):
        return None
    if key in text:
        return text[key]
    merged = text.get("<<")
    for source in merged if isinstance(merged, list) else [merged]:
        if isinstance(source, dict) and key in source:
            return source[key]
    return None


def _is_home_path(key: str) -> bool:
    """Whether the dotted ``key`` is a path setting (:data:`HOME_PATHS`), where a bare '~' is the home folder, not
    YAML's null (``data.root=~``: no shell expands it there, and it was 'data.root is not set')."""
    return key.strip() in {f"{section}.{name}" if section else name for section, name in HOME_PATHS}


def _takes_text(key: str) -> bool:
    """Whether the dotted ``key`` names a string setting of :class:`RunConfig` (``output_dir``, ``model.tokenizer``)."""
    *sections, name = key.strip().split(".")
    cls = RunConfig
    for part in sections:
        cls = typing.get_type_hints(cls).get(part) if dataclasses.is_dataclass(cls) else None
    return dataclasses.is_dataclass(cls) and _strip_optional(typing.get_type_hints(cls).get(name))[0] is str


def parse_overrides(overrides) -> dict:
    """``["train.max_steps=5", "data.tasks=[vqa,gqa]"]`` -> nested dict. From Python also one ``"key=value"``
    string, or a dict whose keys are dotted or nested (``{"train.max_steps": 5}``, ``{"train": {"max_steps": 5}}``),
    its values taken as given (a string of the list form was read one character at a time, a dict by its keys)."""
    if isinstance(overrides, dict):
        pairs = [(key, f"{key}={value!r}", value) for key, value in flat_settings(overrides).items()]
    else:
        pairs = []
        for item in [overrides] if isinstance(overrides, str) else overrides or []:
            if not isinstance(item, str) or "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.max_steps=10)")
            key, raw = item.split("=", 1)
            try:
                value = yaml.safe_load(raw) if raw.strip() else ""
            except yaml.YAMLError:
                value = raw
            if re.search(r"(^|\s)#", raw) and raw.lstrip()[:1] not in "\"'[{":  # YAML reads a comment there
                value = raw  # output_dir="runs/run #2" was runs/run, output_dir=#2 null
            elif value is not None and not isinstance(value, str) and _takes_text(key):
                value = raw.strip()  # output_dir=12:30 was 750 (YAML 1.1's base 60), =007 7, ="a: b" a mapping
            elif value is None and raw.strip() == "~" and _is_home_path(key):
                value = "~"  # the home folder (expanded with the other path settings), not YAML's null
            pairs.append((key, item, value))
    nested: dict = {}
    for key, item, value in pairs:
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        parts = key.split(".")
        d = nested
        for part in parts[:-1]:
            d = d.setdefault(part, {})
            if not isinstance(d, dict):
                raise ConfigError(f"override {key!r} conflicts with another override")
        d[parts[-1]] = value
    return nested


def load_config(name_or_path: Optional[str] = None, overrides=None, sources: Optional[dict] = None) -> RunConfig:
    """Load a preset by name or path (default: the embedded default) and apply overrides: ``["key=value", ...]``
    as the launchers take them, or a dict (see :func:`parse_overrides`). ``sources`` (where given) gets where each
    setting was taken from: dotted key -> ``override``, ``preset NAME`` or ``file PATH`` (the last of the ``base:``
    chain to set it), ``--config`` for a ``name`` it gave; a key absent keeps its default."""
    name = name_or_path or DEFAULT_PRESET
    from_file = _load_yaml(name, sources=sources)
    given = parse_overrides(overrides)
    data = _deep_merge(from_file, given)
    if sources is not None:
        if name_or_path and "name" not in data:
            sources["name"] = "--config"
        sources.update(dict.fromkeys(flat_settings(given), "override"))
    data.setdefault("name", str(name))
    try:
        cfg = _build(RunConfig, data)
    except ConfigError as e:  # an unknown key: say where it was written
        key = getattr(e, "key", None)
        if key is None or any(k == key or k.startswith(key + ".") for k in flat_settings(given)):
            raise
        head, rest = str(e).split("; ", 1)
        raise ConfigError(f"{head} (written in --config {name}, or a preset it builds on); {rest}") from None
    return _checked(cfg)


# the settings that name a local file or folder (some may also be a hub id or an open_clip tag, never with a '~')
HOME_PATHS = (("model", "backbone_path"), ("model", "vision_pretrained"), ("model", "tokenizer"), ("data", "root"),
              ("data", "feature_cache"), ("data", "hf_dataset"), (None, "output_dir"))


def _checked(cfg: RunConfig) -> RunConfig:
    """``cfg`` with '~' in its path settings expanded (the home folder, as the shell makes it of key=~/x; a YAML
    file keeps it, and a reader that did not expand it read './~/x'), its data source and backbone folder checked."""
    for section, key in HOME_PATHS:
        owner = getattr(cfg, section) if section else cfg
        value = getattr(owner, key)
        if isinstance(value, str) and value.startswith("~"):
            setattr(owner, key, os.path.expanduser(value))
    if cfg.model.vision.startswith("local-dir:~"):  # open_clip reads the folder after the schema: './~/x' there
        cfg.model.vision = "local-dir:" + os.path.expanduser(cfg.model.vision[len("local-dir:"):])
    cfg.data.check_source()
    cfg.model.check_backbone_path()
    return cfg


def config_from_dict(data: dict) -> RunConfig:
    """A RunConfig from a whole nested dict (``RunConfig.to_dict()``'s, an adapter's saved ``run_config``): checked
    as a preset is, with no preset below it (absent keys take the dataclasses' defaults, not the default preset's)."""
    return _checked(_build(RunConfig, dict(data)))


def save_config(cfg: RunConfig, path) -> None:
    """Write ``cfg`` as YAML (every key: ``load_config(path)`` reads the same config back)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)


@functools.lru_cache(maxsize=None)
def field_docs(cls) -> dict[str, str]:
    """The meaning of each field of config dataclass ``cls``: the docstring under it in this file (the one place
    it is written), as one line."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {node.target.id: " ".join(after.value.value.split()) for node, after in zip(body, body[1:])
            if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)}


def _type_name(tp) -> str:
    tp, optional = _strip_optional(tp)
    origin, args = typing.get_origin(tp) or tp, typing.get_args(tp)
    name = "mapping" if origin is dict else origin.__name__
    name = f"list of {args[0].__name__}" if origin is list and args else name
    return f"{name} or null" if optional else name


def _yaml_value(value) -> str:
    """``value`` as YAML that reads back as it, on one line (a string with a line break aside)."""
    return yaml.safe_dump(value, default_flow_style=True, width=math.inf).removesuffix("\n...\n").strip()


def printable(text: str) -> str:
    """``text`` with the characters a YAML comment may not hold (control characters) or reads as a line break
    (U+2028, U+0085) escaped as Python writes them: a path or a value in --print-config's comments broke the file."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def config_text(cfg: RunConfig, sources: Optional[dict] = None, width: int = 120) -> str:
    """``cfg`` as YAML that :func:`load_config` reads back as the same config: each section under its docstring,
    each setting under its meaning (:func:`field_docs`) and ending with its type, its default, and where
    ``sources`` (:func:`load_config`'s) says it was set (a key absent there: nowhere, it is the default)."""
    sources = sources or {}
    lines: list[str] = []

    def comment(text: str, pad: str) -> list[str]:
        return textwrap.wrap(text.replace("``", "`"), width - len(pad) - 2, initial_indent=f"{pad}# ",
                             subsequent_indent=f"{pad}# ")

    def section(obj, prefix: str, pad: str) -> None:
        cls, docs = type(obj), field_docs(type(obj))
        hints = typing.get_type_hints(cls)
        for f in sorted(dataclasses.fields(cls), key=lambda f: dataclasses.is_dataclass(getattr(obj, f.name))):
            value = getattr(obj, f.name)  # the top-level settings first, above the sections
            if dataclasses.is_dataclass(value):
                lines.extend(["", *comment(" ".join(inspect.getdoc(type(value)).split()), pad), f"{pad}{f.name}:"])
                section(value, f"{prefix}{f.name}.", pad + "  ")
                continue
            where = sources.get(prefix + f.name)
            default = _default(cls, f.name)
            shown = "" if where is None and value == default else f" {_yaml_value(default)}"
            lines.extend(comment(docs.get(f.name, ""), pad))
            lines.append(f"{pad}{f.name}: {_yaml_value(value)}  # {_type_name(hints[f.name])}, default{shown}"
                         + (f", set by {where}" if where else ""))

    section(cfg, "", "")
    return "".join(f"{printable(line)}\n" for line in lines)  # a --config path ends a line's comment
