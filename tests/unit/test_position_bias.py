"""T5's position bias reaches SDPA contiguous, so the fused kernels can take T5's self-attention on a GPU.

On an H200 with transformers 5.17, the mask T5 built from its permuted position bias had a strided
last dimension; every fused SDPA kernel refused it and T5's self-attention ran the math path in fp32
(benchmarks/saved_by_op.py, benchmarks/sdpa_backends.py). ``contiguous_position_bias`` fixes the layout
at its source for every transformers version; the values are unchanged.
"""

from __future__ import annotations

import torch

from vlscale.config import load_config
from vlscale.modeling.backbones import build_lm, contiguous_position_bias
from vlscale.modeling.vl_model import build_model

OVERRIDES = ["model.backbone=tiny-t5", "model.vision=tiny-clip-rn", "model.pretrained=false",
             "model.vision_pretrained=null", "model.tokenizer=synthetic"]


def _bias_modules(lm):
    return [m for m in lm.modules() if getattr(m, "has_relative_attention_bias", False)]


def test_build_model_gives_contiguous_position_bias_with_the_same_values():
    cfg = load_config(None, OVERRIDES)
    model = build_model(cfg, vocab_size=64)
    plain = build_lm("tiny-t5", config_overrides={"vocab_size": 64})
    plain.load_state_dict(model.lm.state_dict())
    ours, theirs = _bias_modules(model.lm), _bias_modules(plain)
    assert len(ours) == 2  # the encoder's and the decoder's first self-attention
    for a, b in zip(ours, theirs):
        got, ref = a.compute_bias(7, 5), b.compute_bias(7, 5)
        assert not ref.is_contiguous()  # what transformers returns: a permuted view
        assert got.is_contiguous() and got.stride(-1) == 1
        assert torch.equal(got, ref)


def test_every_sdpa_mask_of_a_t5_forward_is_contiguous(monkeypatch):
    lm = build_lm("tiny-t5", config_overrides={"vocab_size": 64})
    assert contiguous_position_bias(lm) == 2
    assert contiguous_position_bias(lm) == 0  # wrapping twice would be harmless, and is not done
    masks = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return real(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    lm.train()
    ids = torch.randint(4, 60, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, -3:] = 0
    lm(input_ids=ids, attention_mask=mask, labels=torch.randint(4, 60, (2, 4))).loss.backward()
    assert lm.config._attn_implementation == "sdpa"
    assert masks and all(m is None or m.stride(-1) == 1 for m in masks), [m.stride() for m in masks if m is not None]
