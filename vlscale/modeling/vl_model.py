"""The V&L model: frozen CLIP (or cached features) -> projection -> encoder-decoder LM + PEFT.

    encoder input = [prompts (prompt tuning)] + [projected visual tokens] + [text embeddings]

Visual tokens: images give the CLIP grid adaptive-max-pooled to pool_size^2 tokens (RN101: 6x6 =
36) or ViT patch tokens, one block per image with an image-order embedding (NLVR2: two images);
videos give one token per frame (CLIP image embedding, up to 64 frames; a shorter video's padding slots are
masked and moved behind its text, so an example's output does not depend on its batch).
Every task is text generation: ``forward`` returns the LM's output with the cross-entropy loss,
``generate`` decodes. The batch's task selects the per-task PEFT modules.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, ContextManager, Optional

import torch
from torch import nn

from vlscale.config import RunConfig
from vlscale.modeling.backbones import build_lm
from vlscale.modeling.projector import VisualProjector, frame_boxes, grid_boxes
from vlscale.modeling.vision import build_vision_encoder, pool_grid, vision_dims


class VLModel(nn.Module):
    """CLIP (``vision``; None with cached features) -> ``projector`` -> ``lm`` with the PEFT modules in ``peft``.

    A batch is the collator's dict (:mod:`vlscale.data.collate`): ``task``, ``input_ids``, ``attention_mask``,
    ``labels`` (for the loss), and ``pixel_values`` (B, N_images, 3, S, S) or ``vis_feats`` (B, N_images, tokens,
    dim); video: (B, 1, F, ...) with ``vis_mask``. :func:`build_model` builds one from a run config.
    """

    def __init__(self, cfg: RunConfig, lm: nn.Module, vision: Optional[nn.Module]):
        super().__init__()
        from vlscale.peft import apply_peft

        self.cfg = cfg
        self.video = cfg.data.is_video()
        dims = vision_dims(cfg.model.vision)
        self.grid_side = dims["grid_side"]
        self.is_resnet = dims["is_resnet"]
        self.pool_size = min(cfg.model.pool_size, self.grid_side) if self.is_resnet else self.grid_side
        self.feat_dim = dims["embed_dim"] if self.video else dims["grid_dim"]
        self.lm = lm
        self.vision = vision
        self.d_model = lm.config.d_model
        param = next(lm.parameters())
        self.projector = VisualProjector(self.feat_dim, self.d_model, n_images=2).to(
            device=param.device, dtype=param.dtype)
        self.peft = apply_peft(lm, cfg.peft, list(cfg.data.tasks))
        self._check_positions()

    def _check_positions(self) -> None:
        """Learned absolute positions (BART) bound the encoder's input: prompts + visual tokens + text.
        Refused here, naming the settings, instead of an index error inside the LM's first forward."""
        from vlscale.config import ConfigError
        from vlscale.data.tasks import get_task

        limit = getattr(self.lm.config, "max_position_embeddings", None)
        if not limit:
            return  # T5: relative positions
        m, d, p = self.cfg.model, self.cfg.data, self.cfg.peft
        prompts = p.n_prompts if (p.method == "prompt" or p.extra_prompts) else 0
        images = max(get_task(t).n_images for t in d.tasks)
        visual = images * self.visual_tokens_per_image
        need = prompts + visual + d.max_input_length
        what = (f"model.max_frames={m.max_frames} frames" if self.video else
                f"{images} x {self.visual_tokens_per_image} visual tokens (model.pool_size={m.pool_size})")
        if need > limit:
            raise ConfigError(
                f"the encoder's input can be {need} tokens long ({what}"
                + (f" + peft.n_prompts={prompts}" if prompts else "") + f" + data.max_input_length="
                f"{d.max_input_length}), more than {m.backbone}'s {limit} positions "
                "(max_position_embeddings); lower one of them")
        if d.max_target_length + 1 > limit:
            raise ConfigError(f"data.max_target_length={d.max_target_length} (+1 for the start token) exceeds "
                              f"{m.backbone}'s {limit} positions (max_position_embeddings)")

    # ------------------------------------------------------------------ visual side
    @property
    def visual_tokens_per_image(self) -> int:
        return self.cfg.model.max_frames if self.video else self.pool_size ** 2

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, N, 3, S, S) images or (B, 1, F, 3, S, S) video frames -> raw features (B, N, T, D)."""
        if self.vision is None:
            raise ValueError("the batch holds pixel_values but the model was built without a vision "
                             "encoder (model.feature_source=cache); pass vis_feats instead")
        lead = pixel_values.shape[:-3]
        flat = pixel_values.reshape(-1, *pixel_values.shape[-3:])
        ctx = contextlib.nullcontext() if self.cfg.peft.train_vision else torch.no_grad()
        with ctx:
            out = self.vision.encode_global(flat) if self.video else self.vision.encode_grid(flat)
        return out.reshape(*lead, *out.shape[1:])

    def visual_embeds(self, batch: dict):
        """-> (B, N*V, d_model) projected visual tokens and their (B, N*V) mask."""
        key = "vis_feats" if batch.get("vis_feats") is not None else "pixel_values"
        if batch.get(key) is None:
            raise KeyError("batch has neither 'vis_feats' nor 'pixel_values'")
        given = batch[key]
        if not self.video and given.dim() != (4 if key == "vis_feats" else 5):  # the image axis left out
            raise ValueError(f"batch[{key!r}] has shape {tuple(given.shape)}; images are (B, N_images, "
                             + ("tokens, dim)" if key == "vis_feats" else "3, S, S)") + ", N_images 1 (NLVR2: 2)")
        feats = given if key == "vis_feats" else self.encode_images(given)
        if self.video:
            if feats.dim() == 3:
                feats = feats[:, None]
            b, n, f, d = feats.shape
            if f > self.cfg.model.max_frames:
                raise ValueError(f"video has {f} frames; model.max_frames={self.cfg.model.max_frames}")
            if d != self.feat_dim:
                raise ValueError(f"frame features are {d}-d; {self.cfg.model.vision} gives {self.feat_dim}-d "
                                 "image embeddings (frame features of another model?)")
            mask = batch.get("vis_mask")
            lengths = mask.reshape(b * n, f).sum(1) if mask is not None else torch.full((b * n,), f)
            boxes = frame_boxes(f, lengths.to(feats.device)).reshape(b, n, f, 5)
        else:
            b, n, t, d = feats.shape
            if t != self.grid_side ** 2:
                raise ValueError(f"visual features have {t} tokens per image; {self.cfg.model.vision} "
                                 f"gives {self.grid_side}x{self.grid_side} (wrong feature cache?)")
            if d != self.feat_dim:
                raise ValueError(f"visual features are {d}-d; {self.cfg.model.vision} gives {self.feat_dim}-d")
            if self.is_resnet:
                feats = pool_grid(feats.reshape(b * n, t, d), self.grid_side, self.pool_size).reshape(b, n, -1, d)
            boxes = grid_boxes(self.pool_size if self.is_resnet else self.grid_side)
        v = feats.shape[2]
        if boxes.dim() == 2:
            boxes = boxes.to(feats.device)[None, None].expand(b, n, v, 5)
        if n > self.projector.image_order.num_embeddings:
            raise ValueError(f"batch has {n} images per example; the visual projection has image-order "
                             f"embeddings for {self.projector.image_order.num_embeddings} (NLVR2's two)")
        embeds = self.projector(feats, boxes, torch.arange(n, device=feats.device))
        mask = batch.get("vis_mask")
        if mask is None:
            mask = torch.ones(b, n, v, dtype=torch.long, device=feats.device)
        return embeds.reshape(b, n * v, -1), mask.reshape(b, n * v).to(torch.long)

    # ------------------------------------------------------------------ encoder inputs
    def encoder_inputs(self, batch: dict):
        input_ids = batch["input_ids"]
        text = self.lm.get_encoder().embed_tokens(input_ids)
        vis, vis_mask = self.visual_embeds(batch)
        parts, masks = [vis.to(text.dtype)], [vis_mask]
        prompts = self.peft.prompts(input_ids.shape[0], text.dtype)
        if prompts is not None:
            parts.insert(0, prompts.to(text.device))
            masks.insert(0, torch.ones(prompts.shape[:2], dtype=torch.long, device=text.device))
        parts.append(text)
        masks.append(batch["attention_mask"].to(torch.long))
        embeds, mask = torch.cat(parts, dim=1), torch.cat(masks, dim=1)
        if batch.get("vis_mask") is not None:
            # Videos of a batch differ in length: move each example's padded frame slots behind its
            # text, so its tokens' positions (BART's absolute, T5's relative) do not depend on the
            # longest video of the batch. A stable sort keeps the order of the unmasked tokens.
            order = torch.argsort((mask == 0).to(torch.int8), dim=1, stable=True)
            embeds = embeds.gather(1, order[..., None].expand(-1, -1, embeds.shape[-1]))
            mask = mask.gather(1, order)
        return embeds, mask

    def forward(self, batch: dict):
        """The LM's output for the batch's task, with ``loss``: the cross-entropy of ``batch["labels"]`` (mean over
        their tokens). Answers come from :meth:`generate`, next-token logits from :meth:`next_token_logits`."""
        if batch.get("labels") is None:  # the LM then has no decoder input: a ValueError from inside it
            raise ValueError("VLModel.forward computes the loss of batch['labels'], which the batch lacks; for "
                             "answers use generate(batch), for logits next_token_logits(batch, target_prefix)")
        self.peft.set_task(batch["task"])
        embeds, mask = self.encoder_inputs(batch)
        return self.lm(inputs_embeds=embeds, attention_mask=mask, labels=batch.get("labels"),
                       use_cache=False)

    @torch.no_grad()
    def next_token_logits(self, batch: dict, target_prefix: list[int]) -> torch.Tensor:
        """(B, vocab) logits of the target token that follows ``target_prefix`` (target ids as the labels
        hold them: BART's ``<s>``, nothing for T5), from one decoder pass after the decoder start token."""
        self.peft.set_task(batch["task"])
        embeds, mask = self.encoder_inputs(batch)
        start = self.lm.config.decoder_start_token_id
        decoder_ids = torch.tensor([start, *target_prefix], dtype=torch.long, device=embeds.device)
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, use_cache=False,
                      decoder_input_ids=decoder_ids.expand(embeds.shape[0], -1))
        return out.logits[:, -1]

    @torch.no_grad()
    def generate(self, batch: dict, decode_block: Optional[Callable[[], ContextManager]] = None,
                 **generate_kwargs) -> torch.Tensor:
        """Decoded token ids (B, T) for the batch's task (``labels`` unused); ``generate_kwargs`` go to the LM's
        ``generate`` (``max_new_tokens``, ``num_beams``, ...). ``tokenizer.batch_decode(ids, skip_special_tokens=True)``
        gives the text. ``decode_block``: the encoder runs first, then the decoding runs inside ``decode_block()``
        (under ZeRO-3, :func:`vlscale.engine.gathered.gathered_for_generation`'s gather of the decoding parameters)."""
        self.peft.set_task(batch["task"])
        embeds, mask = self.encoder_inputs(batch)
        if decode_block is None:
            return self.lm.generate(inputs_embeds=embeds, attention_mask=mask, **generate_kwargs)
        encoded = self.lm.get_encoder()(inputs_embeds=embeds, attention_mask=mask, return_dict=True)
        with decode_block():
            return self.lm.generate(encoder_outputs=encoded, attention_mask=mask, **generate_kwargs)

    def encoding_modules(self) -> list[nn.Module]:
        """The modules besides the LM's encoder that ``generate`` runs once per batch, before the first new token
        (the vision tower, the projection, the prompts); every other parameter is used at each new token."""
        return [m for m in (self.vision, self.projector, getattr(self.peft, "prompt", None)) if m is not None]

    def train(self, mode: bool = True):
        super().train(mode)
        if self.vision is not None and not self.cfg.peft.train_vision:
            self.vision.eval()  # frozen CLIP (its BatchNorms too) stays in eval mode
        return self


def set_checkpointing(lm, on: bool) -> None:
    """Non-reentrant activation checkpointing of the LM's layers on or off."""
    if on:
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.activation_checkpointing_disable()


def checkpoint_vocab_size(cfg: RunConfig) -> Optional[int]:
    """The ``vocab_size`` of a local model.backbone_path folder's config.json (what ``from_pretrained`` builds,
    which may differ from the registry's: embeddings resized for added tokens), or None."""
    from vlscale.config import _folder_config

    if not (cfg.model.backbone_path and os.path.isdir(cfg.model.backbone_path)):
        return None
    return (_folder_config(cfg.model.backbone_path) or {}).get("vocab_size")  # a positive int: _folder_config checks


def build_model(cfg: RunConfig, vocab_size: Optional[int] = None, device="cpu",
                dtype: torch.dtype = torch.float32, lm_builder=None) -> VLModel:
    """Build the V&L model of a run config and decide what trains.

    ``device="meta"`` builds without memory (parameter counts, memory plans) and never loads weights; with
    ``model.pretrained`` and a local ``model.backbone_path`` it takes that folder's vocabulary, as the load would.
    ``vocab_size``: the tokenizer's length; the embeddings are resized when it is larger (extra
    special tokens) and tiny random backbones are built with exactly that vocabulary.
    ``lm_builder``: replaces :func:`~vlscale.modeling.backbones.build_lm` (same keyword arguments);
    the ZeRO-3 build (:func:`vlscale.engine.sharded_loading.build_model_zero3`) passes its own.
    """
    from vlscale.config import check_run_config
    from vlscale.modeling.backbones import contiguous_position_bias, is_tiny, lm_config
    from vlscale.peft.trainable import configure_trainable

    check_run_config(cfg, "build_model")
    meta = str(device) == "meta"
    pretrained = cfg.model.pretrained and not meta
    overrides = {}
    if cfg.model.dropout is not None:
        key = "dropout_rate" if lm_config(cfg.model.backbone).model_type == "t5" else "dropout"
        overrides[key] = cfg.model.dropout
    if vocab_size and not pretrained and (is_tiny(cfg.model.backbone) or
                                          vocab_size > lm_config(cfg.model.backbone).vocab_size):
        overrides["vocab_size"] = vocab_size
    folder_vocab = checkpoint_vocab_size(cfg) if meta and cfg.model.pretrained else None
    if folder_vocab:  # the meta build stands for a load of model.backbone_path: its vocabulary, resized as below
        overrides["vocab_size"] = max(folder_vocab, vocab_size or 0)
    path = cfg.model.backbone_path if cfg.model.pretrained else None  # (a meta build stands for its load)
    lm = (lm_builder or build_lm)(cfg.model.backbone, path=path, pretrained=pretrained,
                  device=device, dtype=dtype, config_overrides=overrides)
    contiguous_position_bias(lm)  # SDPA's fused kernels for T5's self-attention on a GPU
    if pretrained and vocab_size and vocab_size > lm.get_input_embeddings().num_embeddings:
        # on a forked RNG: under zero.Init transformers also initialises the untied lm_head's new rows, so
        # the draws differ from a plain build's, and the adapters built next must not start elsewhere
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
            lm.resize_token_embeddings(vocab_size)
    vision = None
    if cfg.model.feature_source == "images":
        vision = build_vision_encoder(cfg.model.vision, None if meta else cfg.model.vision_pretrained,
                                      device=device, dtype=dtype)
    model = VLModel(cfg, lm, vision)
    configure_trainable(model, cfg.peft)
    if cfg.train.gradient_checkpointing:
        set_checkpointing(lm, True)
        lm.config.use_cache = False
    return model


def check_sources(cfg: RunConfig) -> None:
    """The weight files :func:`build_model` reads, and model.tokenizer's source, checked as their builds check
    them, without building (a SourceError naming the key): launchers/train.py asks before start-up, where a
    model.backbone_path or a model.vision_pretrained that is not there was found only after the data had loaded
    (a model.tokenizer, after start-up). Hub ids and open_clip tags are left to the build (a local cache, or the
    network, may hold them); model.vision's open_clip config (a local-dir: folder's) is read by the DeepSpeed
    config's build (``model_widths``), after these: open_clip's import takes seconds."""
    from vlscale.data.tokenizer import check_source
    from vlscale.modeling.backbones import pretrained_source
    from vlscale.modeling.vision import pretrained_weights

    if cfg.model.tokenizer and cfg.model.tokenizer != "synthetic":  # the tokenizer's folder, found after start-up
        check_source(cfg.model.tokenizer, "model.tokenizer")
    if cfg.model.pretrained:
        pretrained_source(cfg.model.backbone, cfg.model.backbone_path)
    if cfg.model.feature_source == "images":
        pretrained_weights(cfg.model.vision, cfg.model.vision_pretrained)
