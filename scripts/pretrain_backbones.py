"""Make the miniature pretrained backbones shipped in ``vlscale/assets/backbones``.

    python scripts/pretrain_backbones.py [--only clip,t5,bart] [--clip-steps N] [--lm-steps N]
                                         [--out DIR] [--threads N] [--seed S]
    python scripts/pretrain_backbones.py --check [--out DIR]     # held-out scores of the shipped files

The paper's setting has a CLIP and a BART pretrained on web data; the miniature has the same kind
of backbones, pretrained here on *synthetic-world* data that never shows a downstream example:

* ``mini-clip-rn`` (open_clip ModifiedResNet, 96 px -> a 3 x 3 x 512 grid, plus a 2-layer text
  transformer over the world's SentencePiece vocabulary) is trained contrastively with open_clip's
  ``ClipLoss`` on freshly drawn scenes and their descriptions ("a small red circle at the top left
  and a large blue square at the bottom."). Images come from the world's own renderer
  (:func:`vlscale.data.synthetic.render_scene`, 64 px, resized by the CLIP transform), but from a
  random stream seeded apart from every downstream split.
* ``mini-t5`` / ``mini-bart`` (4+4 layers, d_model 128, registry entries in
  vlscale/modeling/backbones.py) are pretrained on the world's *text*: paragraphs describing
  scenes (object lists, counts, spatial relations, attributes), never the tasks' questions or
  answers. T5 by span corruption (15 % of tokens in spans of mean length 3, each replaced by a
  sentinel ``<extra_id_N>``; the target lists the spans after their sentinels), BART by text
  infilling (30 % of tokens in Poisson(3)-long spans, each span -> one mask token, here
  ``<extra_id_0>``, as the synthetic vocabulary has no ``<mask>``) plus sentence permutation;
  BART's target is the original paragraph.

Outputs (``--out``, default vlscale/assets/backbones): ``mini-clip-rn.safetensors`` (the whole
open_clip state dict, ``visual.*`` and the text tower), ``mini-t5/`` and ``mini-bart/``
(``save_pretrained`` folders: config.json, model.safetensors, generation_config.json and the
synthetic tokenizer, so ``AutoTokenizer`` loads it from the folder) and ``pretraining.json``
(settings, losses, held-out scores, times). Weights are stored in fp16 to keep the files small;
the configs say float32 and every loader casts them to fp32 on load. Into the shipped folder only
the shipped files' settings (pretraining.json) run, remaking the same bytes; other settings there
are refused without ``--replace-shipped`` (an experiment goes to ``--out DIR``).

``--check`` recomputes the held-out scores of the files in ``--out`` (the parts ``--only`` names; a
missing one fails): CLIP image->text retrieval accuracy among 100 held-out pairs (chance 1 %) and
each LM's denoising loss next to that of the same architecture with the random weights its
pretraining started from. The same seed gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "vlscale" / "assets" / "backbones"
CLIP_NAME = "mini-clip-rn"
LM_NAMES = {"t5": "mini-t5", "bart": "mini-bart"}
BART_MASK = "<extra_id_0>"

# Streams of the random generator: every pretraining draw is keyed by one of these, so none
# coincides with the downstream splits (keyed by seed, task, split, index in vlscale.data.synthetic).
STREAMS = {"clip-train": 101, "clip-heldout": 102, "lm-train": 201, "lm-heldout": 202}


# ----------------------------------------------------------------------------- the world's text

POSITIONS = {(0, 0): "top left", (0, 1): "top", (0, 2): "top right",
             (1, 0): "left", (1, 1): "center", (1, 2): "right",
             (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right"}


def stream_rng(seed: int, stream: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, STREAMS[stream], zlib.crc32(stream.encode()), index])


def random_scene(rng: np.random.Generator, max_objects: int = 4) -> list[dict]:
    """1..max_objects objects in distinct cells of the world's 3 x 3 layout (as its tasks place them)."""
    from vlscale.data.synthetic import COLOR_NAMES, GRID, SHAPES, SIZES

    k = int(rng.integers(1, max_objects + 1))
    cells = rng.permutation(GRID * GRID)[:k]
    objs = []
    for cell in cells:
        row, col = divmod(int(cell), GRID)
        jx, jy = rng.uniform(-0.03, 0.03, size=2)
        objs.append({"color": COLOR_NAMES[rng.integers(len(COLOR_NAMES))],
                     "shape": SHAPES[rng.integers(len(SHAPES))],
                     "size": SIZES[rng.integers(len(SIZES))], "row": row, "col": col,
                     "x": float((col + 0.5) / GRID + jx), "y": float((row + 0.5) / GRID + jy)})
    return objs


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _phrase(o: dict, with_size: bool = True) -> str:
    return f"a {o['size']} {o['color']} {o['shape']}" if with_size else f"a {o['color']} {o['shape']}"


def _at(o: dict) -> str:
    return f"at the {POSITIONS[(o['row'], o['col'])]}"


def describe(objs: list[dict], rng: np.random.Generator) -> str:
    """A full description (every object, its size, colour, shape and cell): a CLIP caption."""
    order = sorted(objs, key=lambda o: (o["row"], o["col"])) if rng.random() < 0.5 else \
        [objs[i] for i in rng.permutation(len(objs))]
    body = _join([f"{_phrase(o)} {_at(o)}" for o in order])
    opener = ("", "there is ", "an image of ", "a picture with ")[rng.integers(4)]
    return f"{opener}{body}."


def _count_sentence(objs, rng) -> str:
    from vlscale.data.synthetic import NUMBER_WORDS, PLURAL

    n = len(objs)
    kind = rng.integers(3)
    if kind == 0:
        return f"there {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} {'object' if n == 1 else 'objects'}."
    if kind == 1:
        shape = objs[rng.integers(n)]["shape"]
        m = sum(o["shape"] == shape for o in objs)
        return f"there {'is' if m == 1 else 'are'} {NUMBER_WORDS[m]} {shape if m == 1 else PLURAL[shape]}."
    color = objs[rng.integers(n)]["color"]
    m = sum(o["color"] == color for o in objs)
    return f"{NUMBER_WORDS[m]} of the shapes {'is' if m == 1 else 'are'} {color}." if n > 1 else \
        f"the only shape is {color}."


def _relation_sentence(objs, rng) -> str | None:
    unique = [o for o in objs if sum((p["color"], p["shape"]) == (o["color"], o["shape"]) for p in objs) == 1]
    if len(unique) < 2:
        return None
    i, j = rng.permutation(len(unique))[:2]
    a, b = unique[i], unique[j]
    rels = []
    if a["col"] < b["col"]:
        rels.append("to the left of")
    if a["col"] > b["col"]:
        rels.append("to the right of")
    if a["row"] < b["row"]:
        rels.append("above")
    if a["row"] > b["row"]:
        rels.append("below")
    rel = rels[rng.integers(len(rels))]
    return f"the {a['color']} {a['shape']} is {rel} the {b['color']} {b['shape']}."


def _attribute_sentence(objs, rng) -> str:
    o = objs[rng.integers(len(objs))]
    kind = rng.integers(3)
    if kind == 0:
        return f"the {o['shape']} {_at(o)} is {o['color']}."
    if kind == 1:
        return f"the {o['color']} object {_at(o)} is a {o['shape']}."
    return f"the {o['color']} {o['shape']} is {o['size']}."


def paragraph(objs: list[dict], rng: np.random.Generator) -> list[str]:
    """2-4 sentences about one scene: a description plus counts, a relation, an attribute."""
    sentences = [describe(objs, rng)]
    extra = [_count_sentence(objs, rng), _relation_sentence(objs, rng), _attribute_sentence(objs, rng)]
    extra = [s for s in extra if s]
    keep = rng.permutation(len(extra))[:int(rng.integers(1, len(extra) + 1))]
    sentences += [extra[i] for i in sorted(keep)]
    return sentences


def scene_image(objs: list[dict], rng: np.random.Generator, image_size: int = 64) -> np.ndarray:
    from vlscale.data.synthetic import render_scene

    return render_scene(objs, image_size, rng)


# ----------------------------------------------------------------------------- CLIP

def clip_pairs(seed: int, stream: str, start: int, n: int):
    """``n`` (image uint8 HxWx3, caption) pairs, index ``start``.. of a stream (deterministic)."""
    images, captions = [], []
    for i in range(start, start + n):
        rng = stream_rng(seed, stream, i)
        objs = random_scene(rng)
        images.append(scene_image(objs, rng))
        captions.append(describe(objs, rng))
    return images, captions


def tokenize_captions(tokenizer, captions: list[str], context_length: int):
    """SentencePiece ids + eos, right-padded with 0 to the CLIP context (pool_type 'eos' reads eos)."""
    import torch

    ids = tokenizer(captions, add_special_tokens=True).input_ids
    out = torch.zeros(len(ids), context_length, dtype=torch.long)
    for i, seq in enumerate(ids):
        if len(seq) > context_length:
            raise ValueError(f"caption {captions[i]!r} has {len(seq)} tokens > CLIP context {context_length}")
        out[i, :len(seq)] = torch.tensor(seq)
    return out


def build_clip(seed: int):
    import open_clip
    import torch

    from vlscale.modeling.vision import register_tiny_models

    register_tiny_models()
    torch.manual_seed(seed)
    return open_clip.create_model(CLIP_NAME, pretrained=None)


def clip_retrieval_accuracy(model, tokenizer, seed: int, n: int = 100) -> dict:
    """Held-out image->text and text->image top-1 accuracy among ``n`` pairs (chance 1/n)."""
    import torch

    from vlscale.modeling.vision import image_transform

    images, captions = clip_pairs(seed, "clip-heldout", 0, n)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        img = model.encode_image(image_transform(CLIP_NAME)(images), normalize=True)
        txt = model.encode_text(tokenize_captions(tokenizer, captions, model.context_length), normalize=True)
    model.train(was_training)
    sim = img @ txt.T
    target = torch.arange(n)
    return {"n": n, "image_to_text": float((sim.argmax(1) == target).float().mean()),
            "text_to_image": float((sim.argmax(0) == target).float().mean()), "chance": 1.0 / n}


def train_clip(args, tokenizer, log) -> dict:
    import open_clip
    import torch

    from vlscale.modeling.vision import image_transform

    model = build_clip(args.seed)
    transform = image_transform(CLIP_NAME)
    loss_fn = open_clip.ClipLoss()
    opt, sched = adamw_cosine(model, lambda n, p: p.ndim >= 2 and "logit_scale" not in n, 0.1, args.clip_lr,
                              args.clip_steps)
    start, losses = time.time(), []
    model.train()
    for step in range(args.clip_steps):
        images, captions = clip_pairs(args.seed, "clip-train", step * args.clip_batch, args.clip_batch)
        pixels = transform(images)
        tokens = tokenize_captions(tokenizer, captions, model.context_length)
        img_f, txt_f, scale = model(pixels, tokens)[:3]
        loss = loss_fn(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.clip_steps:
            log(f"clip step {step + 1}/{args.clip_steps} loss {np.mean(losses[-args.log_every:]):.4f} "
                f"scale {scale.item():.1f} ({time.time() - start:.0f}s)")
    heldout = clip_retrieval_accuracy(model, tokenizer, args.seed)
    log(f"clip held-out retrieval: {heldout}")
    out = Path(args.out) / f"{CLIP_NAME}.safetensors"
    save_fp16_state(model.state_dict(), out, {"objective": "open_clip ClipLoss", "steps": str(args.clip_steps)})
    return {"file": out.name, "steps": args.clip_steps, "batch": args.clip_batch, "lr": args.clip_lr,
            "final_loss": float(np.mean(losses[-args.log_every:])), "heldout_retrieval": heldout,
            "seconds": round(time.time() - start, 1),
            "params": sum(p.numel() for p in model.parameters()),
            "visual_params": sum(p.numel() for p in model.visual.parameters())}


def save_fp16_state(state: dict, path: Path, metadata: dict) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.detach().half() if v.is_floating_point() else v.detach()).contiguous() for k, v in state.items()}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", **metadata})
    _sort_safetensors_metadata(tmp)
    tmp.replace(path)
    path.chmod(0o644)


def _sort_safetensors_metadata(path: Path) -> None:
    """Write the header's ``__metadata__`` with sorted keys, in place (same length: the same pairs).

    safetensors writes metadata in hash-map order, which changes from process to process: the same
    weights would give files of other bytes, hence other sha256 fingerprints (vlscale.replicate
    refuses feature caches and results made from "other" weights)."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = f.read(n).decode("utf-8")
        key = '"__metadata__":'
        start = header.find(key)
        if start < 0:
            return
        start += len(key)
        meta, end = json.JSONDecoder().raw_decode(header, start)
        canonical = json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        if len(canonical.encode("utf-8")) != len(header[start:end].encode("utf-8")):
            raise RuntimeError(f"{path}: unexpected safetensors header layout; cannot sort its metadata")
        f.seek(8 + len(header[:start].encode("utf-8")))
        f.write(canonical.encode("utf-8"))


def load_clip(path: Path, seed: int = 0):
    """The whole open_clip model (visual + text tower) from a shipped file, in fp32."""
    from safetensors.torch import load_file

    model = build_clip(seed)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.float().eval()


def adamw_cosine(model, decays, weight_decay: float, lr: float, steps: int):
    """AdamW (betas 0.9/0.98, weight decay only where ``decays(name, param)``) + 5 % warm-up, cosine."""
    import torch

    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if decays(n, p)], "weight_decay": weight_decay},
              {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, cosine_schedule(steps, warmup=steps // 20))


# ----------------------------------------------------------------------------- LM denoising

def cosine_schedule(total: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * 0.9 + 0.1

    return f


class TextStream:
    """Packed sequences of scene paragraphs (token ids without eos), of random lengths <= max_len: a length is
    drawn from [min_len, max_len] and a sequence ends before the sentence that would pass it, so it may be
    shorter than min_len (not a floor; the shipped backbones were made so)."""

    MIN_LEN = 12

    def __init__(self, tokenizer, seed: int, stream: str, max_len: int, min_len: int = MIN_LEN):
        self.tok, self.seed, self.stream = tokenizer, seed, stream
        self.max_len, self.min_len = max_len, min_len

    def sequence(self, index: int) -> tuple[list[int], list[int]]:
        """-> (ids, sentence boundaries): paragraphs of consecutive scenes until the drawn length."""
        rng = stream_rng(self.seed, self.stream, index)
        target = int(rng.integers(self.min_len, self.max_len + 1))
        ids, bounds = [], []
        while True:
            sentences = paragraph(random_scene(rng), rng)
            for s in sentences:
                piece = self.tok(s, add_special_tokens=False).input_ids
                if ids and len(ids) + len(piece) > target:
                    return ids, bounds
                ids += piece[:self.max_len]
                bounds.append(len(ids))
                if len(ids) >= target:
                    return ids[:self.max_len], bounds


def random_spans_noise_mask(length: int, density: float, mean_span: float, rng) -> np.ndarray:
    """T5's noise mask: round(length*density) noise tokens in round(noise/mean_span) spans, alternating."""
    num_noise = int(min(max(round(length * density), 1), length - 1))
    num_spans = max(1, int(round(num_noise / mean_span)))
    num_spans = min(num_spans, num_noise, length - num_noise)

    def segments(total, n):
        cuts = np.sort(rng.choice(np.arange(1, total), size=n - 1, replace=False)) if n > 1 else np.array([], int)
        return np.diff(np.concatenate([[0], cuts, [total]]))

    noise, keep = segments(num_noise, num_spans), segments(length - num_noise, num_spans)
    mask = np.zeros(length, bool)
    pos = 0
    for k, n in zip(keep, noise):
        pos += k
        mask[pos:pos + n] = True
        pos += n
    return mask


def t5_span_corruption(ids: list[int], rng, sentinel_ids: list[int], eos: int,
                       density: float = 0.15, mean_span: float = 3.0) -> tuple[list[int], list[int]]:
    """-> (input ids, target ids): spans replaced by <extra_id_i>; target = sentinel + span, ... + eos."""
    mask = random_spans_noise_mask(len(ids), density, mean_span, rng)
    inp, tgt, s, prev = [], [], 0, False
    for tok, m in zip(ids, mask):
        if m and not prev:
            inp.append(sentinel_ids[s])
            tgt.append(sentinel_ids[s])
            s += 1
        (tgt if m else inp).append(tok)
        prev = m
    return inp + [eos], tgt + [eos]


def bart_text_infilling(ids: list[int], bounds: list[int], rng, mask_id: int, eos: int,
                        ratio: float = 0.3, poisson: float = 3.0) -> tuple[list[int], list[int]]:
    """-> (input, target): sentences permuted, then Poisson(3)-long spans (``ratio`` of the tokens)
    each replaced by one mask token, zero-length spans inserting one; the target is the original."""
    sentences, start = [], 0
    for b in bounds:
        sentences.append(ids[start:b])
        start = b
    if start < len(ids):
        sentences.append(ids[start:])
    permuted = [tok for i in rng.permutation(len(sentences)) for tok in sentences[i]]
    n = len(permuted)
    masked, inserts = np.zeros(n, bool), set()
    budget = int(round(n * ratio))
    while budget > 0:
        span, pos = min(int(rng.poisson(poisson)), budget), int(rng.integers(0, n))
        if span == 0:
            inserts.add(pos)
            budget -= 1
        else:
            masked[pos:pos + span] = True
            budget -= span
    inp, prev = [], False
    for j, tok in enumerate(permuted):
        if j in inserts and not masked[j]:
            inp.append(mask_id)
        if masked[j]:
            if not prev:
                inp.append(mask_id)
            prev = True
            continue
        prev = False
        inp.append(tok)
    return inp + [eos], list(ids) + [eos]


def bart_positions() -> int:
    from vlscale.modeling.backbones import LM_REGISTRY

    return LM_REGISTRY[LM_NAMES["bart"]]["max_position_embeddings"]


def lm_batch(kind: str, stream: TextStream, start: int, n: int, tokenizer, seed: int):
    import torch

    sentinels = [tokenizer.convert_tokens_to_ids(f"<extra_id_{i}>") for i in range(100)]
    mask_id = tokenizer.convert_tokens_to_ids(BART_MASK)
    eos = tokenizer.eos_token_id
    pairs = []
    for i in range(start, start + n):
        ids, bounds = stream.sequence(i)
        rng = np.random.default_rng([seed, 7, i])
        if kind == "t5":
            pairs.append(t5_span_corruption(ids, rng, sentinels, eos))
            continue
        inp, tgt = bart_text_infilling(ids, bounds, rng, mask_id, eos)
        if len(inp) > bart_positions():  # masks inserted into a long text: cut it to BART's positions
            inp = inp[:bart_positions() - 1] + [eos]
        pairs.append((inp, tgt))
    li, lt = max(len(p[0]) for p in pairs), max(len(p[1]) for p in pairs)
    input_ids = torch.zeros(n, li, dtype=torch.long)
    attention = torch.zeros(n, li, dtype=torch.long)
    labels = torch.full((n, lt), -100, dtype=torch.long)
    for b, (inp, tgt) in enumerate(pairs):
        input_ids[b, :len(inp)] = torch.tensor(inp)
        attention[b, :len(inp)] = 1
        labels[b, :len(tgt)] = torch.tensor(tgt)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def denoising_loss(lm, kind: str, tokenizer, seed: int, n: int = 64, batch: int = 32, max_len: int = 100) -> float:
    """Mean per-token cross-entropy of the pretraining objective on held-out text."""
    import torch

    stream = TextStream(tokenizer, seed, "lm-heldout", max_len)
    was_training = lm.training
    lm.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, n, batch):
            b = lm_batch(kind, stream, start, min(batch, n - start), tokenizer, seed + 1)
            logits = lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).logits
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                             b["labels"].reshape(-1), ignore_index=-100,
                                                             reduction="sum"))
            tokens += int((b["labels"] != -100).sum())
    lm.train(was_training)
    return total / tokens


def sinusoidal_positions_(lm, scale: float = 0.1) -> None:
    """Start BART's learned position embeddings (encoder and decoder) from sinusoids.

    With N(0, init_std) positions the decoder has no usable position signal to align with the
    encoder and learns a plain language model first (measured: the held-out loss did not change
    when the encoder input was swapped for another example's, after 800 steps); sinusoids give
    the alignment a start. They stay trainable, as in BART. Row r holds position r - 2 (BART's offset).
    """
    import torch

    for emb in (lm.model.encoder.embed_positions, lm.model.decoder.embed_positions):
        n, d = emb.weight.shape
        pos = torch.arange(n, dtype=torch.float32)[:, None] - 2
        freq = 10000 ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
        table = torch.zeros(n, d)
        table[:, 0::2], table[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
        with torch.no_grad():
            emb.weight.copy_(table * scale)


def encoder_use(lm, kind: str, tokenizer, seed: int, n: int = 64) -> dict:
    """Held-out denoising loss with each example's own encoder input, and with another example's.

    A model that uses its encoder does much worse when the input is swapped."""
    import torch

    stream = TextStream(tokenizer, seed, "lm-heldout", 100)
    b = lm_batch(kind, stream, 0, n, tokenizer, seed + 1)
    perm = torch.roll(torch.arange(n), 1)
    swapped = dict(b, input_ids=b["input_ids"][perm], attention_mask=b["attention_mask"][perm])
    was_training = lm.training
    lm.eval()
    with torch.no_grad():
        own, other = float(lm(**b).loss), float(lm(**swapped).loss)
    lm.train(was_training)
    return {"own_input": own, "swapped_input": other}


def initial_lm(kind: str, seed: int):
    """The LM pretraining starts from (its random-weight baseline, in training and in ``--check``)."""
    import torch

    from vlscale.modeling.backbones import build_lm

    torch.manual_seed(seed)
    lm = build_lm(LM_NAMES[kind])
    if kind == "bart":
        sinusoidal_positions_(lm, scale=0.1)
    return lm


def train_lm(kind: str, args, tokenizer, log) -> dict:
    import torch

    name = LM_NAMES[kind]
    lm = initial_lm(kind, args.seed)
    if lm.config.vocab_size != len(tokenizer):
        raise ValueError(f"{name}: registry vocab_size {lm.config.vocab_size} != synthetic tokenizer length "
                         f"{len(tokenizer)} (vlscale/modeling/backbones.py)")
    random_loss = denoising_loss(lm, kind, tokenizer, args.seed)
    stream = TextStream(tokenizer, args.seed, "lm-train", args.lm_max_len)
    opt, sched = adamw_cosine(lm, lambda n, p: p.ndim >= 2, 0.01, args.lm_lr, args.lm_steps)
    start, losses = time.time(), []
    lm.train()
    for step in range(args.lm_steps):
        b = lm_batch(kind, stream, step * args.lm_batch, args.lm_batch, tokenizer, args.seed)
        loss = lm(**b).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.lm_steps:
            use = encoder_use(lm, kind, tokenizer, args.seed, n=32)
            log(f"{name} step {step + 1}/{args.lm_steps} loss {np.mean(losses[-args.log_every:]):.4f} "
                f"held-out {use['own_input']:.4f} (swapped encoder input {use['swapped_input']:.4f}) "
                f"({time.time() - start:.0f}s)")
    heldout = denoising_loss(lm, kind, tokenizer, args.seed)
    use = encoder_use(lm, kind, tokenizer, args.seed)
    log(f"{name} held-out denoising loss {heldout:.4f} (random weights: {random_loss:.4f}); "
        f"encoder use {use}")
    save_lm(lm, tokenizer, Path(args.out) / name)
    return {"dir": name, "objective": "span corruption" if kind == "t5" else "text infilling + sentence permutation",
            "steps": args.lm_steps, "batch": args.lm_batch, "lr": args.lm_lr, "max_len": args.lm_max_len,
            "final_loss": float(np.mean(losses[-args.log_every:])), "heldout_loss": heldout,
            "heldout_loss_random_weights": random_loss, "encoder_use": use,
            "seconds": round(time.time() - start, 1),
            "params": sum(p.numel() for p in lm.parameters())}


def save_lm(lm, tokenizer, path: Path) -> None:
    """save_pretrained in fp16 (small files), config dtype float32 (loaders cast), plus the tokenizer."""
    import copy

    path.mkdir(parents=True, exist_ok=True)
    half = copy.deepcopy(lm).half()
    half.save_pretrained(str(path), safe_serialization=True)
    cfg_path = path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in cfg:
            cfg[key] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(str(path))
    for f in path.iterdir():
        f.chmod(0o644)


# ----------------------------------------------------------------------------- main

def check(out: Path, seed: int, log, parts=("clip", "t5", "bart")) -> dict:
    """Held-out scores of the files in ``out`` (what tests/unit/test_pretrained_assets.py asserts), for
    each of ``parts`` present there; the random-weight baselines start as training does."""
    from vlscale.data.tokenizer import synthetic_tokenizer
    from vlscale.modeling.backbones import build_lm

    tok = synthetic_tokenizer()
    report = {}
    clip_file = out / f"{CLIP_NAME}.safetensors"
    if "clip" in parts and clip_file.exists():
        report["clip"] = clip_retrieval_accuracy(load_clip(clip_file), tok, seed)
        log(f"{CLIP_NAME}: {report['clip']}")
    for kind, name in LM_NAMES.items():
        if kind not in parts or not (out / name).is_dir():
            continue
        lm = build_lm(name, path=str(out / name), pretrained=True)
        report[kind] = {"heldout_loss": denoising_loss(lm, kind, tok, seed),
                        "heldout_loss_random_weights": denoising_loss(initial_lm(kind, seed), kind, tok, seed),
                        "encoder_use": encoder_use(lm, kind, tok, seed)}
        log(f"{name}: {report[kind]}")
    return report


def expected_files(out: Path, parts) -> list[Path]:
    return [out / (f"{CLIP_NAME}.safetensors" if p == "clip" else LM_NAMES[p]) for p in parts]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--only", default="clip,t5,bart", help="comma-separated subset of clip,t5,bart")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--clip-steps", type=int, default=1000)
    ap.add_argument("--clip-batch", type=int, default=128)
    ap.add_argument("--clip-lr", type=float, default=1e-3)
    ap.add_argument("--lm-steps", type=int, default=800)
    ap.add_argument("--lm-batch", type=int, default=32)
    ap.add_argument("--lm-lr", type=float, default=1e-3)
    ap.add_argument("--lm-max-len", type=int, default=100, help="longest packed pretraining text, tokens")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--check", action="store_true", help="only report held-out scores of the files in --out")
    ap.add_argument("--replace-shipped", action="store_true",
                    help="allow other settings than the shipped files' when --out is the shipped folder")
    args = ap.parse_args(argv)
    parts = list(dict.fromkeys(p.strip() for p in args.only.split(",") if p.strip()))
    bad = [p for p in parts if p not in ("clip", "t5", "bart")]
    if bad or not parts:
        ap.error(f"--only {args.only!r}: choose from clip, t5, bart")
    args.parts = parts
    least = {"--clip-steps": 1, "--lm-steps": 1, "--log-every": 1, "--lm-batch": 1,
             "--clip-batch": 2,  # a contrastive loss needs other pairs in the batch: batch 1 is a loss of 0
             "--lm-max-len": TextStream.MIN_LEN}
    for flag, low in least.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value < low:
            ap.error(f"{flag} {value}: must be at least {low}")
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads {args.threads}: must be at least 1")
    for flag in ("--clip-lr", "--lm-lr"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if not (math.isfinite(value) and value > 0):
            ap.error(f"{flag} {value}: must be a positive number")
    positions = bart_positions()
    if "bart" in parts and args.lm_max_len + 1 > positions:  # the target is the text and eos
        ap.error(f"--lm-max-len {args.lm_max_len}: {LM_NAMES['bart']} has {positions} learned positions, "
                 f"so at most {positions - 1} tokens of text (and eos)")
    return args


def settings_of(part: str, args) -> dict:
    """The settings of ``part`` as pretraining.json records them (what decides the weights, threads aside)."""
    if part == "clip":
        return {"steps": args.clip_steps, "batch": args.clip_batch, "lr": args.clip_lr, "seed": args.seed}
    return {"steps": args.lm_steps, "batch": args.lm_batch, "lr": args.lm_lr, "max_len": args.lm_max_len,
            "seed": args.seed}


def shipped_overwrite_problem(args) -> str | None:
    """Making parts into the shipped folder with other settings than the shipped files' would replace the
    backbones every run and test loads: refused without --replace-shipped (the same settings remake them)."""
    if args.replace_shipped or args.out.resolve() != DEFAULT_OUT.resolve():
        return None
    path = DEFAULT_OUT / "pretraining.json"
    shipped = json.loads(path.read_text()) if path.is_file() else {}
    for part in args.parts:
        name = CLIP_NAME if part == "clip" else LM_NAMES[part]
        want, had = settings_of(part, args), shipped.get(name)
        if had is None:
            continue
        diff = {k: (had.get(k), v) for k, v in want.items() if had.get(k) != v}
        if diff:
            said = ", ".join(f"{k} {v} (shipped: {h})" for k, (h, v) in diff.items())
            return (f"--out is the shipped folder {DEFAULT_OUT.relative_to(ROOT)}, whose {name} the embedded default "
                    f"and the tests load, and this run's {said} differ from the shipped file's ({path.name}): pass "
                    f"--out DIR to make an experiment's backbones, or --replace-shipped to replace the shipped ones")
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.check:
        problem = shipped_overwrite_problem(args)
        if problem:
            print(f"pretrain_backbones.py: {problem}", file=sys.stderr)
            return 2
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from vlscale.data.tokenizer import synthetic_tokenizer

    def log(msg: str) -> None:
        print(f"[pretrain] {msg}", flush=True)

    if args.check:
        missing = [str(f) for f in expected_files(args.out, args.parts) if not f.exists()]
        if missing:
            print(f"pretrain_backbones.py --check: missing {', '.join(missing)} (--out {args.out}; --only "
                  f"{','.join(args.parts)}: name the parts made there)", file=sys.stderr)
            return 1
        print(json.dumps(check(args.out, args.seed, log, args.parts), indent=1))
        return 0
    tokenizer = synthetic_tokenizer()
    args.out.mkdir(parents=True, exist_ok=True)
    report_path = args.out / "pretraining.json"
    for part in args.parts:
        result = train_clip(args, tokenizer, log) if part == "clip" else train_lm(part, args, tokenizer, log)
        result.update(seed=args.seed, threads=torch.get_num_threads(),
                      command="python scripts/pretrain_backbones.py " + " ".join(sys.argv[1:]))
        # read just before writing: several parts may be made by concurrent processes
        report = json.loads(report_path.read_text()) if report_path.exists() else {}
        report[CLIP_NAME if part == "clip" else LM_NAMES[part]] = result
        tmp = report_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
        tmp.replace(report_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
