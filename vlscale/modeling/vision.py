"""The frozen CLIP visual encoder (open_clip) and its image transform.

RN models give the grid of the last conv stage (RN101 at 224 px: 7 x 7 x 2048), which the V&L
model adaptive-max-pools to ``pool_size``^2 tokens; ViT models give their patch tokens; video
frames use the CLIP image embedding (ViT-B/32: 512-d). Only the visual tower is built (of an open_clip
tag's file, the whole CLIP's weights, only its visual tensors are read; a hf-hub:/local-dir: name builds the
whole CLIP and keeps the tower). Weights are an open_clip tag or a
local checkpoint file (model.vision_pretrained); without them the tower is random and seeded (tests,
counting). The tiny models ``tiny-clip-rn`` / ``tiny-clip-vit`` (configs shipped in
``vlscale/registry/open_clip``) are registered with open_clip so they build by name like the real ones.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

_REGISTRY_DIR = Path(__file__).resolve().parent.parent / "registry" / "open_clip"
_registered = False


def register_tiny_models() -> None:
    """Make the tiny CLIP configs known to open_clip (idempotent)."""
    global _registered
    if _registered:
        return
    import open_clip

    open_clip.add_model_config(_REGISTRY_DIR)
    _registered = True


def _shipped_config(name: str) -> Optional[dict]:
    """The config open_clip would give for a name it ships (or vlscale's registry adds: the last file of a name, as
    ``add_model_config`` rescans), read without importing open_clip, which takes seconds: launchers/train.py builds
    the DeepSpeed config, whose bucket sizes need the tower's width, before start-up. None: open_clip decides."""
    import json

    from vlscale.config import _clip_config_files

    files = [f for f in _clip_config_files() if f.stem == name]
    try:
        cfg = json.loads(files[-1].read_text()) if files else None
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) and all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")) else None


def clip_config(name: str) -> dict:
    """open_clip's model config (offline: shipped with open_clip or with vlscale)."""
    shipped = _shipped_config(name)
    if shipped is not None:
        return shipped
    import open_clip

    register_tiny_models()
    try:  # local-dir:PATH / hf-hub:ID read a file: a folder without it was a FileNotFoundError traceback
        cfg = open_clip.get_model_config(name)
    except (OSError, ValueError) as e:
        from vlscale.config import SourceError

        raise SourceError(f"model.vision={name!r}: cannot read its open_clip config "
                          f"({' '.join(str(e).split())})") from None
    if cfg is None:
        from vlscale.config import common_visions

        raise KeyError(f"unknown vision model {name!r} (model.vision); e.g. {common_visions()}")
    return cfg


def vision_dims(name: str) -> dict:
    """Image size, grid/patch feature width and token count, global embedding width (offline)."""
    cfg = clip_config(name)
    v = cfg["vision_cfg"]
    # a timm tower (SigLIP, ConvNeXt), CoCa's pooled tokens: refused by the config; a hf-hub: / local-dir: one here
    if "layers" not in v or v.get("attentional_pool"):
        raise ValueError(f"model.vision={name!r}: its tower is not open_clip's own ResNet or ViT (vision_cfg "
                         f"{sorted(v)}), whose grid vlscale reads")
    size = v["image_size"] if isinstance(v["image_size"], int) else v["image_size"][0]
    if isinstance(v["layers"], (list, tuple)):  # ModifiedResNet
        grid_dim = v.get("width", 64) * 32
        side = size // 32
    else:
        grid_dim = v["width"]
        side = size // v["patch_size"]
    return {"image_size": size, "grid_dim": grid_dim, "grid_side": side, "grid_tokens": side * side,
            "embed_dim": cfg["embed_dim"], "is_resnet": isinstance(v["layers"], (list, tuple))}


class VisionEncoder(nn.Module):
    """Frozen CLIP visual tower: ``encode_grid`` (RN grid / ViT patches) and ``encode_global``."""

    def __init__(self, name: str, visual: nn.Module):
        super().__init__()
        self.name = name
        self.visual = visual
        dims = vision_dims(name)
        self.image_size = dims["image_size"]
        self.grid_dim = dims["grid_dim"]
        self.grid_side = dims["grid_side"]
        self.embed_dim = dims["embed_dim"]
        self.is_resnet = dims["is_resnet"]

    def encode_grid(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, T, D): the RN's last conv stage, or the ViT's patch tokens."""
        x = pixel_values.to(self._dtype())
        if self.is_resnet:
            v = self.visual
            x = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(x)))))
            return x.flatten(2).transpose(1, 2)
        self.visual.output_tokens = True
        _, tokens = self.visual(x)
        return tokens

    def encode_global(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, E): the CLIP image embedding (used for video frames)."""
        self.visual.output_tokens = False
        return self.visual(pixel_values.to(self._dtype()))

    def unused_parameter_names(self, video: bool) -> list[str]:
        """Names (as in ``self.named_parameters()``) of the parameters the path a run takes never runs:
        ``encode_grid`` (image tasks) stops at an RN's last conv stage (its attention pool is left out)
        and takes a ViT's patch tokens (its output projection, and whatever pools only the class token,
        are left out); ``encode_global`` (video) runs the whole tower. Such parameters get no gradient,
        so they cannot train (see vlscale/peft/trainable.py)."""
        if video:
            return []
        v = self.visual
        if self.is_resnet:
            unused = ["attnpool"]
        else:
            unused = ["proj"]
            if getattr(v, "attn_pool", None) is not None:
                if getattr(v, "attn_pool_contrastive", None) is not None:
                    unused.append("attn_pool_contrastive")  # pools the class embedding only
            elif getattr(v, "final_ln_after_pool", False):
                unused.append("ln_post")  # normalises the pooled embedding only
        names = {f"visual.{u}" for u in unused}
        return [n for n, _ in self.named_parameters()
                if n in names or any(n.startswith(f"{u}.") for u in names)]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.encode_grid(pixel_values)

    def _dtype(self):
        return next(self.visual.parameters()).dtype


def is_tag(name: str, pretrained: Optional[str]) -> bool:
    """``pretrained`` (model.vision_pretrained) names an open_clip tag of ``name``: not null, not the shipped
    ``synthetic`` weights, not a file, and ``name`` not a hf-hub:/local-dir: model (whose own weights it loads)."""
    from vlscale.config import CLIP_SCHEMAS

    return (bool(pretrained) and pretrained != "synthetic" and not Path(pretrained).is_file()
            and not name.startswith(CLIP_SCHEMAS))


def pretrained_weights(name: str, pretrained: Optional[str]) -> Optional[str]:
    """``pretrained`` (model.vision_pretrained) as :func:`build_vision_encoder` reads it, the shipped file for
    ``synthetic``, checked without building (launchers/train.py asks before start-up): a shipped file that is
    gone, a file (a name with a suffix or a path separator: open_clip's tags have neither) that is not there, a
    folder. Anything else is an open_clip tag, left to the build (open_clip's cache, or the network)."""
    if pretrained == "synthetic":  # the miniature CLIPs the project trains and ships
        from vlscale.modeling.backbones import ASSET_DIR

        asset = ASSET_DIR / f"{name}.safetensors"
        if not asset.exists():
            from vlscale.modeling.backbones import MissingWeights

            raise MissingWeights(f"model.vision_pretrained=synthetic: no shipped weights for {name!r} "
                                 f"(expected {asset}; made by scripts/pretrain_backbones.py)")
        pretrained = str(asset)
    path_like = pretrained and (Path(pretrained).suffix or "/" in pretrained or os.sep in pretrained)
    if path_like and not Path(pretrained).exists():
        from vlscale.modeling.backbones import MissingWeights

        raise MissingWeights(f"model.vision_pretrained={pretrained!r}: no such file")
    if pretrained and Path(pretrained).is_dir():
        raise _source_error(f"model.vision_pretrained={pretrained!r} is a directory; give the checkpoint file "
                            f"in it (.safetensors, or a .pt/.bin state dict) or an open_clip tag")
    return pretrained


def build_vision_encoder(name: str, pretrained: Optional[str] = None, device="cpu",
                         dtype: torch.dtype = torch.float32) -> VisionEncoder:
    """Build the visual tower of an open_clip model by name.

    ``pretrained``: an open_clip tag (its file from open_clip's cache, or the network) or a local checkpoint file
    (offline); a full CLIP checkpoint or one of only the visual tower (keys prefixed ``visual.``) both load. A tag's
    file is the whole CLIP's; only its ``visual.*`` tensors are read into the tower, built alone (the text tower is
    never built: ViT-L-14's is 123 M parameters a rank). A ViT whose MLP activation is not the one the tag's weights
    were trained with is refused (:func:`check_tag_activation`).
    """
    import open_clip

    from vlscale.config import CLIP_SCHEMAS

    register_tiny_models()
    cfg = clip_config(name)  # clear error for unknown names
    pretrained = pretrained_weights(name, pretrained)
    load_file = bool(pretrained) and Path(pretrained).exists()
    tag = is_tag(name, pretrained)
    if tag:
        check_tag_activation(name, pretrained)
    file = None
    if str(device) == "meta":
        with torch.device("meta"):
            visual = _visual_tower(name, cfg)
    elif name.startswith(CLIP_SCHEMAS):
        # a hf-hub:/local-dir: name: open_clip builds the whole CLIP with the weights its repo or folder holds (or
        # those of a tag, or a file loaded into the tower after), the tower is taken from it
        file = pretrained if load_file else None
        with _quiet_open_clip(active=load_file), torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(0)
            try:
                visual = open_clip.create_model(name, pretrained=None if load_file else pretrained).visual
            except RuntimeError as e:  # open_clip: a tag it does not know for this model, or one it cannot fetch
                if load_file or not pretrained:
                    raise
                raise _source_error(f"model.vision_pretrained={pretrained!r} for {name}: open_clip cannot load it "
                                    f"({' '.join(str(e).split())}); give a CLIP checkpoint file, or null for the "
                                    f"weights {name} names") from None
    else:
        file = _tag_file(name, pretrained) if tag else pretrained
        if file:  # built on meta: the file's tensors become the tower's (no random tower beside them)
            with torch.device("meta"):
                visual = _visual_tower(name, cfg)
        else:
            # Random towers are seeded so that every build of the same name is the same model: a
            # feature cache made from a random tiny CLIP then matches encoding on the fly. Only the host's
            # generator (the tower is built on the host; fork_rng restores only it): torch.manual_seed would
            # also reseed every GPU's generator to 0, for good, and a run's dropout and its ZeRO-3 build's
            # draws on the GPU would no longer follow train.seed
            with torch.random.fork_rng(devices=[]):
                torch.random.default_generator.manual_seed(0)
                visual = _visual_tower(name, cfg)
    if file:
        _load_visual_checkpoint(visual, file, name, f"model.vision_pretrained={pretrained!r} ({file})" if tag else "")
    enc = VisionEncoder(name, visual)  # its input is normalised by image_transform (normalisation())
    enc.requires_grad_(False).eval()
    enc = enc.to(device=device, dtype=dtype)  # a meta build too (in the dtype asked for, as build_lm's)
    return enc


def check_tag_activation(name: str, tag: str, then: str = "") -> None:
    """Refuse a ViT tower whose MLP activation is not the one the open_clip ``tag``'s weights were trained with:
    OpenAI's CLIPs (and a few others) use QuickGELU, and open_clip's plain names (``ViT-B-32``, ``ViT-L-14``) build
    GELU; open_clip only warns, and the frozen tower's features would be off in every layer. Its ``-quickgelu``
    names build the same tower with QuickGELU. A ResNet tower (ModifiedResNet) has no such activation: any tag
    goes. An unknown tag is left to :func:`_tag_file`'s error. ``then``: what the fix also needs (a cache-trained
    run: a cache extracted with the name given)."""
    import open_clip

    register_tiny_models()
    cfg = clip_config(name)
    trained = open_clip.get_pretrained_cfg(name, tag)
    if not trained or isinstance(cfg["vision_cfg"].get("layers"), (list, tuple)):
        return
    want, have = bool(trained.get("quick_gelu")), bool(cfg.get("quick_gelu"))
    if want == have:
        return
    act = {True: "QuickGELU", False: "GELU"}
    other = f"{name}-quickgelu" if want else name.removesuffix("-quickgelu")
    fix = (f"model.vision={other} (open_clip's name for the same tower with {act[want]})"
           if open_clip.get_model_config(other) and open_clip.get_pretrained_cfg(other, tag) else
           f"a model.vision whose open_clip config has quick_gelu={str(want).lower()}")
    raise _source_error(f"model.vision={name!r} with model.vision_pretrained={tag!r}: those weights were trained "
                        f"with {act[want]}, but {name}'s open_clip config builds {act[have]}, and every layer's "
                        f"features would be off; give {fix}{then}")


def _tag_file(name: str, tag: str) -> str:
    """The file of open_clip's ``tag`` for ``name`` (the whole CLIP's weights): from open_clip's cache (Hugging Face's)
    or the network. An unknown tag, or one that cannot be fetched, is one line naming model.vision_pretrained."""
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(name)
    hint = ("give " + (f"one of its tags {tags} (from the network or open_clip's local cache), " if tags else "")
            + "a CLIP checkpoint file, or null for random weights")
    trained = open_clip.get_pretrained_cfg(name, tag)
    if not trained:
        raise _source_error(f"model.vision_pretrained={tag!r} for {name}: open_clip cannot load it (not a known tag "
                            f"of {name}); {hint}")
    try:
        file = open_clip.download_pretrained(trained)
    except Exception as e:  # huggingface_hub's offline / not-found errors, urllib's, OSError
        raise _source_error(f"model.vision_pretrained={tag!r} for {name}: open_clip cannot load it (cannot fetch "
                            f"its weights: {type(e).__name__}: {' '.join(str(e).split())}); {hint}") from None
    if not file or not Path(file).is_file():
        raise _source_error(f"model.vision_pretrained={tag!r} for {name}: open_clip cannot load it (its weights "
                            f"came as {file!r}, not a file); {hint}")
    return str(file)


def _visual_tower(name: str, cfg: dict) -> nn.Module:
    """The visual tower of ``name`` (model config ``cfg``, :func:`clip_config`) alone, on the current default device:
    what ``open_clip.create_model(name).visual`` is, without building the text tower it is then taken from (for a
    Hugging Face text tower that fetches the text model's config: offline it fails; for ViT-L-14 it drew 123 M
    random numbers the build threw away). Every open_clip model class (CLIP, CustomTextCLIP, CoCa) builds its tower
    first, with ``_build_vision_tower(embed_dim, vision_cfg, quick_gelu, cast_dtype)``, so a seeded build of the
    tower alone draws the same numbers as the whole model's; ``create_model`` leaves those keys as they are without
    ``force_*`` arguments, and ``cast_dtype`` is None at its default fp32 precision (the encoder is cast to the
    dtype asked for afterwards). The other keys (``text_cfg``, ``custom_text``, ``multimodal_cfg``,
    ``init_logit_bias``) do not reach the tower. ``_build_vision_tower`` is private to open_clip (3.3): where it is
    gone, the whole model is built as before. tests/unit/test_model.py checks the towers against that."""
    import open_clip
    from open_clip import model as open_clip_model

    build = getattr(open_clip_model, "_build_vision_tower", None)
    if build is not None:
        return build(cfg["embed_dim"], cfg["vision_cfg"], cfg.get("quick_gelu", False), None)
    with _quiet_open_clip():  # create_model warns at the root logger of a build without weights
        return open_clip.create_model(name, pretrained=None, load_weights=False,
                                      device=torch.get_default_device()).visual


@contextlib.contextmanager
def _quiet_open_clip(active: bool = True):
    """open_clip's create_model warns at the root logger when no weights are asked for: our intent where ``active``
    (a random tower, or a checkpoint file loaded right after)."""
    if not active:
        yield
        return
    level = logging.root.level
    logging.root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logging.root.setLevel(level)


def _source_error(msg: str):
    from vlscale.config import SourceError

    return SourceError(msg)


def _is_torchscript(path: str) -> bool:
    """A TorchScript archive: a zip holding the scripted model's code and constants (torch.load refuses it with
    weights_only=True, as if the file were broken)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _openai_repo(name: str) -> str:
    """`` (REPO)``: the Hugging Face repo of open_clip's 'openai' weights of ``name``, or "" where it has none."""
    import open_clip

    repo = (open_clip.get_pretrained_cfg(name, "openai") or {}).get("hf_hub", "").rstrip("/") if name else ""
    return f" ({repo})" if repo else ""


def _read_checkpoint(path: str, source: str = "", keep=None, name: str = "") -> dict:
    """The tensors of a checkpoint file (of a .safetensors file, only the names ``keep`` accepts are read); one
    line naming ``source`` (default: model.vision_pretrained=PATH) when it cannot be read (a TorchScript archive,
    OpenAI's own release of the CLIP ``name``: where open_clip's tensors of the same weights are)."""
    source = source or f"model.vision_pretrained={path!r}"
    if not path.endswith(".safetensors") and _is_torchscript(path):
        raise _source_error(f"{source}: a TorchScript archive (OpenAI's own CLIP release, as the clip package "
                            f"downloads it), which vlscale does not load (loading one loads its code); the same "
                            f"weights as tensors are open_clip's: the tag 'openai' (from Hugging Face's cache or the "
                            f"network), or offline the open_clip_model.safetensors (or open_clip_pytorch_model.bin) "
                            f"of the Hugging Face repo open_clip fetches for it{_openai_repo(name)}")
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                state = {k: f.get_tensor(k) for k in f.keys() if keep is None or keep(k)}
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
    except Exception as e:  # safetensors' SafetensorError, pickle/zip errors of torch.load, OSError
        first = " ".join(str(e).split("\n")[0].split()) or repr(e)
        raise _source_error(f"{source}: cannot read the checkpoint "
                            f"({type(e).__name__}: {first}); is the file truncated or corrupt? (a .safetensors "
                            f"file, or a .pt/.bin state dict torch.load reads with weights_only=True)") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise _source_error(f"{source}: not a state dict of tensors (got {type(state).__name__})")
    return state


def _load_visual_checkpoint(visual: nn.Module, path: str, name: str = "", source: str = "") -> None:
    """Load the ``visual.*`` tensors of a CLIP checkpoint (full, or visual tower only) into the tower ``visual``.

    Only the visual tower is kept (of a .safetensors file only its tensors are read). The file must be the
    visual tower of this architecture: a missing, extra or differently shaped tensor is an error
    naming ``source`` (default: model.vision_pretrained=PATH; a checkpoint of another CLIP would otherwise load
    partly, or not at all)."""
    state = _read_checkpoint(path, source, keep=lambda k: k.removeprefix("module.").startswith("visual."), name=name)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    tower = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    if not tower:
        raise _source_error(f"{path}: no 'visual.*' keys; not an open_clip CLIP checkpoint "
                            f"({source or 'model.vision_pretrained'})")
    source = source or f"model.vision_pretrained={path!r}"
    expected = visual.state_dict()
    optional = ("num_batches_tracked",)  # BatchNorm counters: not part of the model's function
    missing = [k for k in expected if k not in tower and not k.endswith(optional)]
    unexpected = [k for k in tower if k not in expected and not k.endswith(optional)]
    shapes = [f"visual.{k} {list(v.shape)} (model {list(expected[k].shape)})"
              for k, v in tower.items() if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or shapes:
        what = "; ".join(f"{label}: {', '.join(items[:3])}{f' and {len(items) - 3} more' if len(items) > 3 else ''}"
                         for label, items in (("shapes differ", shapes),
                                              ("missing", [f"visual.{k}" for k in missing]),
                                              ("not in the model", [f"visual.{k}" for k in unexpected]))
                         if items)
        raise _source_error(f"{source} is not a checkpoint of {name or 'this model'}'s "
                            f"visual tower ({what}); model.vision must name the architecture it was trained with")
    on_meta = any(t.is_meta for t in expected.values())
    visual.load_state_dict({k: v for k, v in tower.items() if k in expected}, strict=False, assign=on_meta)
    for module in visual.modules():  # a tower built on meta: what the file may leave out (BatchNorm's counters)
        for key, buf in module.named_buffers(recurse=False):
            if buf.is_meta and key == "num_batches_tracked":
                setattr(module, key, torch.zeros((), dtype=buf.dtype))
    left = [n for n, t in [*visual.named_parameters(), *visual.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{path}: the tower's {left[:3]} were not loaded (built on meta for the file's tensors)")


def normalisation(name: str, pretrained: Optional[str] = None) -> tuple[tuple, tuple]:
    """(mean, std) the tower of ``name`` with ``pretrained`` normalises its input with, as open_clip sets them: the
    tag's own (ViT-L-14 laion2b_s32b_b82k: 0.5 and 0.5; the CLIPA towers: ImageNet's), else OpenAI's (a checkpoint file,
    the shipped ``synthetic`` weights, random ones, and most tags)."""
    import open_clip

    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    if is_tag(name, pretrained):
        tag = open_clip.get_pretrained_cfg(name, pretrained) or {}
        mean, std = tag.get("mean") or mean, tag.get("std") or std
    return tuple(mean), tuple(std)


def image_transform(name: str, pretrained: Optional[str] = None):
    """Callable: list of uint8 (H, W, 3) arrays or PIL images -> (N, 3, S, S) normalised as the tower of ``name``
    with ``pretrained`` weights expects (:func:`normalisation`).

    Bicubic resize of the whole image to S x S (the synthetic world's images are square; real
    images are centre-cropped first, as CLIP's own transform does).
    """
    from PIL import Image

    size = vision_dims(name)["image_size"]
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in normalisation(name, pretrained))

    def transform(images: Sequence) -> torch.Tensor:
        out = []
        for i, img in enumerate(images):
            if isinstance(img, np.ndarray) and img.dtype != np.uint8:  # PIL: "Cannot handle this data type"
                raise TypeError(f"image {i}: an image array must be uint8 (H, W, 3), got {img.dtype} (a float image "
                                "in [0, 1]: (img * 255).round().astype(np.uint8))")
            if isinstance(img, np.ndarray):
                img = Image.fromarray(img)
            if not hasattr(img, "convert"):  # a path: "'str' object has no attribute 'convert'"
                raise TypeError(f"image {i}: an image is a uint8 (H, W, 3) array or a PIL image, got "
                                f"{type(img).__name__} (a file: vlscale.predict.read_image(path))")
            img = img.convert("RGB")
            w, h = img.size
            if w != h:
                s = min(w, h)
                img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            if img.size != (size, size):
                img = img.resize((size, size), Image.BICUBIC)
            out.append(np.asarray(img, dtype=np.uint8))
        if not out:
            return torch.zeros(0, 3, size, size)
        batch = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float().div_(255.0)
        return batch.sub_(mean).div_(std)

    return transform


def pool_grid(feats: torch.Tensor, side: int, pool_size: int) -> torch.Tensor:
    """(N, side*side, D) grid -> (N, pool_size^2, D) by adaptive max pooling (RN101: 7x7 -> 6x6)."""
    n, t, d = feats.shape
    if t != side * side:
        raise ValueError(f"grid has {t} tokens, expected {side}x{side}")
    if side == pool_size:
        return feats
    x = feats.transpose(1, 2).reshape(n, d, side, side)
    x = torch.nn.functional.adaptive_max_pool2d(x, pool_size)
    return x.flatten(2).transpose(1, 2)
