"""The synthetic world: coloured shapes and tasks over them, generated offline and deterministically.

The embedded default needs no download. Images are small uint8 RGB arrays (``data.image_size``,
64 px by default) of 1-4 shapes (6 colours x 4 shapes x 2 sizes) placed on a 3x3 layout; videos
are 4-8 frames of shapes moving left/right/up/down or standing still, with a subtitle line. Tasks
mirror the real ones, as :class:`~vlscale.data.tasks.Example` records:

    vqa      what color is the X / how many Xs / is there a C X / what shape is the C object;
             10 annotator answers (7-10 give the gold, the rest one plausible alternative)
    gqa      what color / shape is the object left of / right of / above / below the C X
    nlvr2    a statement about two images, "true" / "false"; 4 statements share an image pair
             (``extra["group"]``, for consistency scoring)
    caption  5 templated references; the target is the first
    tvqa, how2qa   a question about the motion + 5 candidates in the text, target "a0".."a4"
    tvc, yc2c      a caption of the motion (tvc also reads the subtitle)

Answers are drawn first (uniformly over the question type's answer space) and the scene is built
to match, so the text alone carries no information about the answer: the best answer-prior
baseline (:func:`answer_prior_baseline`) stays at chance (a uniform guess) while the image
determines the answer. Every example is seeded by (seed, task, split, index), so the first ``n``
examples do not depend on how many are asked for. Generated splits are cached under
``$VLSCALE_CACHE/synthetic/<hash>`` (default ``~/.cache/vlscale``); the hash covers the generator's
parameters and :data:`GENERATOR_VERSION`, and a missing cache is regenerated to the same data.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zlib
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np

from vlscale.config import SYNTHETIC_MIN_IMAGE_SIZE
from vlscale.data.tasks import Example, get_task

GENERATOR_VERSION = "1"
"""Bump whenever generated data changes; it is part of the cache key."""

SPLITS = ("train", "val", "test")
COLORS = {
    "red": (220, 45, 45), "green": (50, 180, 70), "blue": (55, 90, 225),
    "yellow": (235, 215, 50), "purple": (155, 65, 200), "orange": (245, 140, 30),
}
COLOR_NAMES = tuple(COLORS)
SHAPES = ("circle", "square", "triangle", "diamond")
PLURAL = {s: s + "s" for s in SHAPES}
SIZES = ("small", "large")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
DIRECTIONS = ("left", "right", "up", "down", "still")
RELATIONS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
GRID = 3
BACKGROUND = (40, 40, 40)
NLVR_STATEMENTS_PER_PAIR = 4

# Answer space of each question type (what uniform guessing picks from).
ANSWER_SPACES = {
    "color": COLOR_NAMES, "shape": SHAPES, "count": ("0", "1", "2", "3"), "exist": ("yes", "no"),
    "rel_color": COLOR_NAMES, "rel_shape": SHAPES, "statement": ("true", "false"),
    "choice": ("a0", "a1", "a2", "a3", "a4"),
}

VQA_ANSWER_TYPES = {"exist": "yes/no", "count": "number", "color": "other", "shape": "other"}
"""Each VQA question type's answer type as VQA v2 annotates them (``extra["answer_type"]``): evaluation scores
each type too, as the official evaluation does."""


# ----------------------------------------------------------------------------- rendering

def render_scene(objects: Sequence[dict], image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw objects ``{color, shape, size, x, y}`` (x, y in [0, 1]) on a dark, lightly noisy canvas."""
    s = image_size
    img = np.empty((s, s, 3), np.int16)
    img[:] = BACKGROUND
    img += rng.integers(-6, 7, size=(s, s, 1), dtype=np.int16)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
    for o in objects:
        r = (0.075 if o["size"] == "small" else 0.125) * s
        dx, dy = xx - o["x"] * s, yy - o["y"] * s
        shape = o["shape"]
        if shape == "circle":
            mask = dx * dx + dy * dy <= r * r
        elif shape == "square":
            mask = (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
        elif shape == "triangle":
            mask = (dy >= -r) & (dy <= 0.8 * r) & (np.abs(dx) <= (dy + r) / 1.8)
        elif shape == "diamond":
            mask = np.abs(dx) + np.abs(dy) <= 1.1 * r
        else:
            raise ValueError(f"unknown shape {shape!r}; shapes: {SHAPES}")
        img[mask] = COLORS[o["color"]]
    return np.clip(img, 0, 255).astype(np.uint8)


def _cell_xy(row: int, col: int, rng: np.random.Generator) -> tuple[float, float]:
    jitter = rng.uniform(-0.03, 0.03, size=2)
    return float((col + 0.5) / GRID + jitter[0]), float((row + 0.5) / GRID + jitter[1])


def _obj(rng, color, shape, cell, size=None) -> dict:
    x, y = _cell_xy(cell[0], cell[1], rng)
    return {"color": color, "shape": shape, "size": size or SIZES[rng.integers(len(SIZES))],
            "row": int(cell[0]), "col": int(cell[1]), "x": x, "y": y}


def _cells(rng, k: int, allowed=None) -> list[tuple[int, int]]:
    allowed = allowed if allowed is not None else [(r, c) for r in range(GRID) for c in range(GRID)]
    if k > len(allowed):
        raise ValueError(f"cannot place {k} objects in {len(allowed)} cells")
    idx = rng.permutation(len(allowed))[:k]
    return [allowed[i] for i in idx]


def _pick(rng, seq, exclude=()):
    opts = [v for v in seq if v not in exclude]
    return opts[rng.integers(len(opts))]


def _random_objects(rng, k: int, cells=None, avoid=lambda c, s: False) -> list[dict]:
    cells = cells if cells is not None else _cells(rng, k)
    out = []
    for cell in cells[:k]:
        while True:
            c, s = _pick(rng, COLOR_NAMES), _pick(rng, SHAPES)
            if not avoid(c, s):
                break
        out.append(_obj(rng, c, s, cell))
    return out


def _scene_record(objects) -> list[list]:
    return [[o["color"], o["shape"], o["size"], o["row"], o["col"]] for o in objects]


def _rng(seed: int, task: str, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(task.encode()), zlib.crc32(split.encode()), index])


# ----------------------------------------------------------------------------- image tasks

def _annotators(rng, gold: str, qtype: str) -> list[str]:
    """10 raw answers: 7-10 give the gold, the rest one plausible alternative of the same type."""
    n_gold = int(rng.integers(7, 11))
    if qtype == "count":
        g = int(gold)
        alt = str(g + 1 if g == 0 or (g < 3 and rng.random() < 0.5) else g - 1)
    else:
        alt = _pick(rng, ANSWER_SPACES[qtype], exclude=(gold,))
    answers = [gold] * n_gold + [alt] * (10 - n_gold)
    return [answers[i] for i in rng.permutation(10)]


def _vqa(rng, image_size):
    qtype = ("color", "count", "exist", "shape")[rng.integers(4)]
    if qtype == "color":
        shape, gold = _pick(rng, SHAPES), _pick(rng, COLOR_NAMES)
        k = int(rng.integers(1, 5))
        cells = _cells(rng, k)
        objs = [_obj(rng, gold, shape, cells[0])]
        objs += _random_objects(rng, k - 1, cells[1:], avoid=lambda c, s: s == shape)
        question = f"what color is the {shape}?"
    elif qtype == "count":
        shape, n = _pick(rng, SHAPES), int(rng.integers(0, 4))
        k = int(rng.integers(max(n, 1), 5))
        cells = _cells(rng, k)
        objs = [_obj(rng, _pick(rng, COLOR_NAMES), shape, cell) for cell in cells[:n]]
        objs += _random_objects(rng, k - n, cells[n:], avoid=lambda c, s: s == shape)
        gold, question = str(n), f"how many {PLURAL[shape]} are there?"
    elif qtype == "exist":
        color, shape = _pick(rng, COLOR_NAMES), _pick(rng, SHAPES)
        gold = ("yes", "no")[rng.integers(2)]
        k = int(rng.integers(1, 5))
        cells = _cells(rng, k)
        objs = [_obj(rng, color, shape, cells[0])] if gold == "yes" else []
        rest = cells[1:] if gold == "yes" else cells
        # near misses (same colour or same shape) make the question need the conjunction
        for cell in rest:
            if rng.random() < 0.5:
                c, s = (color, _pick(rng, SHAPES, (shape,))) if rng.random() < 0.5 else \
                    (_pick(rng, COLOR_NAMES, (color,)), shape)
                objs.append(_obj(rng, c, s, cell))
            else:
                objs += _random_objects(rng, 1, [cell], avoid=lambda c, s: (c, s) == (color, shape))
        question = f"is there a {color} {shape}?"
    else:
        color, gold = _pick(rng, COLOR_NAMES), _pick(rng, SHAPES)
        k = int(rng.integers(1, 5))
        cells = _cells(rng, k)
        objs = [_obj(rng, color, gold, cells[0])]
        objs += _random_objects(rng, k - 1, cells[1:], avoid=lambda c, s: c == color)
        question = f"what shape is the {color} object?"
    objs = [objs[i] for i in rng.permutation(len(objs))]
    refs = _annotators(rng, gold, qtype)
    majority = Counter(refs).most_common(1)[0][0]
    image = render_scene(objs, image_size, rng)
    return question, majority, refs, [image], {"qtype": qtype, "answer_type": VQA_ANSWER_TYPES[qtype],
                                               "scene": [_scene_record(objs)]}


def _relation_cells(rel: str, ref: tuple[int, int]):
    r0, c0 = ref
    cells = [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) != ref]
    test = {"left": lambda r, c: c < c0, "right": lambda r, c: c > c0,
            "above": lambda r, c: r < r0, "below": lambda r, c: r > r0}[rel]
    return [x for x in cells if test(*x)], [x for x in cells if not test(*x)]


def _gqa(rng, image_size):
    rel = tuple(RELATIONS)[rng.integers(4)]
    ask = ("color", "shape")[rng.integers(2)]
    gold = _pick(rng, COLOR_NAMES if ask == "color" else SHAPES)
    ref_c, ref_s = _pick(rng, COLOR_NAMES), _pick(rng, SHAPES)
    if ask == "color":
        tgt_c, tgt_s = gold, _pick(rng, SHAPES, (ref_s,) if gold == ref_c else ())
    else:
        tgt_c, tgt_s = _pick(rng, COLOR_NAMES, (ref_c,) if gold == ref_s else ()), gold
    all_cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    feasible = [x for x in all_cells if _relation_cells(rel, x)[0]]
    ref_cell = feasible[rng.integers(len(feasible))]
    inside, outside = _relation_cells(rel, ref_cell)
    tgt_cell = inside[rng.integers(len(inside))]
    n_extra = int(rng.integers(0, min(2, len(outside)) + 1))
    objs = [_obj(rng, ref_c, ref_s, ref_cell), _obj(rng, tgt_c, tgt_s, tgt_cell)]
    objs += _random_objects(rng, n_extra, _cells(rng, n_extra, outside),
                            avoid=lambda c, s: (c, s) == (ref_c, ref_s))
    objs = [objs[i] for i in rng.permutation(len(objs))]
    where = RELATIONS[rel]
    question = (f"what color is the object {where} the {ref_c} {ref_s}?" if ask == "color"
                else f"what shape is {where} the {ref_c} {ref_s}?")
    image = render_scene(objs, image_size, rng)
    return question, gold, [gold], [image], {"qtype": "rel_" + ask, "relation": rel,
                                             "scene": [_scene_record(objs)]}


# NLVR2 statement templates: name -> (parameter choices, truth function(left, right, params), text)
def _count(objs, **kw):
    return sum(all(o[k] == v for k, v in kw.items()) for o in objs)


def _nlvr_templates():
    sides = ("left", "right")
    return {
        "contains": (
            [(side, c, s) for side in sides for c in COLOR_NAMES for s in SHAPES],
            lambda L, R, p: _count(L if p[0] == "left" else R, color=p[1], shape=p[2]) > 0,
            lambda p: f"the {p[0]} image contains a {p[1]} {p[2]}."),
        "both_shape": (
            [(s,) for s in SHAPES],
            lambda L, R, p: _count(L, shape=p[0]) > 0 and _count(R, shape=p[0]) > 0,
            lambda p: f"both images contain a {p[0]}."),
        "both_color": (
            [(c,) for c in COLOR_NAMES],
            lambda L, R, p: _count(L, color=p[0]) > 0 and _count(R, color=p[0]) > 0,
            lambda p: f"each image contains a {p[0]} object."),
        "more": (
            [(s,) for s in SHAPES],
            lambda L, R, p: _count(L, shape=p[0]) > _count(R, shape=p[0]),
            lambda p: f"there are more {PLURAL[p[0]]} in the left image than in the right image."),
        "exactly": (
            [(side, n) for side in sides for n in range(1, 5)],
            lambda L, R, p: len(L if p[0] == "left" else R) == p[1],
            lambda p: f"the {p[0]} image has exactly {NUMBER_WORDS[p[1]]} "
                      f"{'object' if p[1] == 1 else 'objects'}."),
    }


NLVR_TEMPLATES = _nlvr_templates()


def _nlvr_group(rng, image_size, k: int):
    """One image pair and ``k`` statements; template and truth are drawn before the images."""
    names = list(NLVR_TEMPLATES)
    for attempt in range(10_000):
        if attempt % 100 == 0:  # some combinations (three true "exactly" statements) cannot be met
            wanted = [(names[rng.integers(len(names))], bool(rng.integers(2))) for _ in range(k)]
        left = _random_objects(rng, int(rng.integers(1, 5)))
        right = _random_objects(rng, int(rng.integers(1, 5)))
        statements, used = [], set()
        for name, truth in wanted:  # distinct statements with the wanted truth values, if this pair allows
            params, fn, text = NLVR_TEMPLATES[name]
            opts = [p for p in params if fn(left, right, p) == truth and (name, p) not in used]
            if not opts:
                break
            p = opts[rng.integers(len(opts))]
            used.add((name, p))
            statements.append((text(p), "true" if truth else "false", name))
        if len(statements) == k:
            break
    else:  # pragma: no cover - the templates are satisfiable within a few tries
        raise RuntimeError("synthetic nlvr2: could not build an image pair for the statements")
    images = [render_scene(left, image_size, rng), render_scene(right, image_size, rng)]
    return statements, images, [_scene_record(left), _scene_record(right)]


def _phrase(o) -> str:
    return f"a {o['size']} {o['color']} {o['shape']}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _caption(rng, image_size):
    k = int(rng.integers(1, 4))
    objs = sorted(_random_objects(rng, k), key=lambda o: (o["x"], o["y"]))
    ph = [_phrase(o) for o in objs]
    where = ("top", "middle", "bottom")
    refs = [
        _join(ph) + ".",
        "there is " + _join(ph) + ".",
        "an image of " + _join(ph) + ".",
        _join(ph[::-1]) + ".",
        f"{NUMBER_WORDS[k]} {'shape' if k == 1 else 'shapes'}: "
        + _join([f"{p} at the {where[o['row']]}" for p, o in zip(ph, objs)]) + ".",
    ]
    image = render_scene(objs, image_size, rng)
    return "", refs[0], refs, [image], {"qtype": "caption", "scene": [_scene_record(objs)]}


# ----------------------------------------------------------------------------- video tasks

_VIDEO_Q = {
    "tvqa": {
        "direction": "which way does the {color} {shape} move?",
        "mover_color": "what color is the shape that moves {direction}?",
        "answers": {"left": "left", "right": "right", "up": "up", "down": "down", "still": "still"},
    },
    "how2qa": {
        "direction": "where does the {color} {shape} go?",
        "mover_color": "which color is the thing going {direction}?",
        "answers": {"left": "to the left", "right": "to the right", "up": "upwards",
                    "down": "downwards", "still": "nowhere"},
    },
}
_SPEAKERS = ("alice", "bob", "carol", "dave")
_FILLERS = ("look at this.", "watch closely now.", "here we go again.", "what do you see?",
            "keep your eyes on the screen.", "this one is tricky.")
_MOTION = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}


def _video_scene(rng, k: int, fixed: list[tuple[str, str, str]]):
    """Objects with motions. ``fixed``: (color, shape, direction) that must appear; the rest random.

    Objects start in distinct rows and columns, so horizontal movers never run into a still object
    or another horizontal mover (only a horizontal and a vertical path can cross).
    """
    cells = list(zip(rng.permutation(GRID)[:k].tolist(), rng.permutation(GRID)[:k].tolist()))
    objs = []
    for i, cell in enumerate(cells):
        if i < len(fixed):
            c, s, d = fixed[i]
        else:
            c, s, d = _pick(rng, COLOR_NAMES), _pick(rng, SHAPES), None
        objs.append(dict(_obj(rng, c, s, cell), direction=d))
    return objs


def _render_video(rng, objs, image_size):
    n_frames = int(rng.integers(4, 9))
    travel = rng.uniform(0.25, 0.4)
    for o in objs:  # start where the whole path stays inside the frame
        dx, dy = _MOTION[o["direction"]]
        lo, hi = 0.13, 0.87
        if dx:
            o["x"] = float(rng.uniform(lo, hi - travel) if dx > 0 else rng.uniform(lo + travel, hi))
        if dy:
            o["y"] = float(rng.uniform(lo, hi - travel) if dy > 0 else rng.uniform(lo + travel, hi))
    frames = []
    for f in range(n_frames):
        t = f / (n_frames - 1)
        moved = [dict(o, x=o["x"] + _MOTION[o["direction"]][0] * travel * t,
                      y=o["y"] + _MOTION[o["direction"]][1] * travel * t) for o in objs]
        frames.append(render_scene(moved, image_size, rng))
    return frames


def _subtitle(rng, objs) -> str:
    speaker = _SPEAKERS[rng.integers(len(_SPEAKERS))]
    if rng.random() < 0.5:
        line = _FILLERS[rng.integers(len(_FILLERS))]
    else:
        n = len(objs)
        line = f"there {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} {'shape' if n == 1 else 'shapes'} here."
    return f"{speaker}: {line}"


def _video_qa(rng, image_size, task):
    q = _VIDEO_Q[task]
    qtype = ("direction", "mover_color")[rng.integers(2)]
    k = int(rng.integers(1, 4))
    if qtype == "direction":
        color, shape, gold_dir = _pick(rng, COLOR_NAMES), _pick(rng, SHAPES), _pick(rng, DIRECTIONS)
        objs = _video_scene(rng, k, [(color, shape, gold_dir)])
        for o in objs[1:]:
            while (o["color"], o["shape"]) == (color, shape):
                o["color"] = _pick(rng, COLOR_NAMES)
        for o in objs[1:]:
            o["direction"] = _pick(rng, DIRECTIONS)
        question = q["direction"].format(color=color, shape=shape)
        gold = q["answers"][gold_dir]
        candidates = [q["answers"][d] for d in DIRECTIONS]
    else:
        direction, gold = _pick(rng, DIRECTIONS[:4]), _pick(rng, COLOR_NAMES)
        objs = _video_scene(rng, k, [(gold, _pick(rng, SHAPES), direction)])
        for o in objs[1:]:
            o["direction"] = _pick(rng, DIRECTIONS, (direction,))
        question = q["mover_color"].format(direction=q["answers"][direction]
                                           if task == "how2qa" else direction)
        candidates = [gold] + [COLOR_NAMES[i] for i in rng.permutation(len(COLOR_NAMES))
                               if COLOR_NAMES[i] != gold][:4]
    candidates = [candidates[i] for i in rng.permutation(len(candidates))]
    label = f"a{candidates.index(gold)}"
    frames = _render_video(rng, objs, image_size)
    sub = _subtitle(rng, objs)
    text = question + " " + " ".join(f"a{i}: {c}" for i, c in enumerate(candidates)) + " subtitle: " + sub
    return text, label, [label], frames, {
        "qtype": "choice", "question": question, "candidates": candidates, "subtitle": sub,
        "answer_text": gold, "scene": [_scene_record(objs)], "motions": [o["direction"] for o in objs]}


def _video_caption(rng, image_size, task):
    k = int(rng.integers(1, 3))
    objs = _video_scene(rng, k, [])
    for o in objs:
        o["direction"] = _pick(rng, DIRECTIONS)
    frames = _render_video(rng, objs, image_size)

    def motion(o, style):
        d = o["direction"]
        if style == 0:
            return f"the {o['color']} {o['shape']} " + ("stays still" if d == "still" else f"moves {d}")
        if style == 1:
            return f"a {o['color']} {o['shape']} " + ("does not move" if d == "still" else f"goes {d}")
        return f"a {o['color']} {o['shape']} " + ("standing still" if d == "still" else f"moving {d}")

    refs = [
        " and ".join(motion(o, 0) for o in objs) + ".",
        " and ".join(motion(o, 1) for o in objs) + ".",
        "we see " + " and ".join(motion(o, 2) for o in objs) + ".",
        " while ".join(motion(o, 0) for o in objs[::-1]) + ".",
        "a video of " + " and ".join(motion(o, 2) for o in objs) + ".",
    ]
    sub = _subtitle(rng, objs)
    text = sub if task == "tvc" else ""
    return text, refs[0], refs, frames, {"qtype": "caption", "subtitle": sub,
                                         "scene": [_scene_record(objs)],
                                         "motions": [o["direction"] for o in objs]}


# ----------------------------------------------------------------------------- splits

class SyntheticSplit:
    """Examples of one (task, split) and their visual inputs (id -> image, or id -> frames)."""

    def __init__(self, task: str, split: str, examples: list[Example], visuals: dict):
        self.task, self.split, self.examples, self.visuals = task, split, examples, visuals

    def __len__(self):
        return len(self.examples)


def generate_split(task: str, split: str, n: int, seed: int = 0, image_size: int = 64) -> SyntheticSplit:
    """Generate ``n`` examples of ``task`` for ``split`` (no cache)."""
    spec = get_task(task)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for the synthetic world; splits: {list(SPLITS)}")
    if n <= 0:
        raise ValueError(f"synthetic {task}/{split}: number of examples must be > 0, got {n}")
    if image_size < SYNTHETIC_MIN_IMAGE_SIZE:
        raise ValueError(f"data.image_size={image_size} is too small for the synthetic world "
                         f"(>= {SYNTHETIC_MIN_IMAGE_SIZE})")
    examples, visuals = [], {}
    if task == "nlvr2":
        k = NLVR_STATEMENTS_PER_PAIR
        for g in range((n + k - 1) // k):
            statements, images, scenes = _nlvr_group(_rng(seed, task, split, g), image_size, k)
            ids = [f"{task}_{split}_{g:06d}_{side}" for side in ("0", "1")]
            visuals.update(zip(ids, images))
            for j, (text, target, template) in enumerate(statements):
                i = g * k + j
                if i >= n:
                    break
                examples.append(Example(task, f"{task}_{split}_{i:06d}", text, target, ids, [target],
                                        {"group": f"{split}_{g:06d}", "qtype": "statement",
                                         "template": template, "scene": scenes}))
        return SyntheticSplit(task, split, examples, visuals)
    for i in range(n):
        rng = _rng(seed, task, split, i)
        if task == "vqa":
            out = _vqa(rng, image_size)
        elif task == "gqa":
            out = _gqa(rng, image_size)
        elif task == "caption":
            out = _caption(rng, image_size)
        elif task in ("tvqa", "how2qa"):
            out = _video_qa(rng, image_size, task)
        elif task in ("tvc", "yc2c"):
            out = _video_caption(rng, image_size, task)
        else:  # pragma: no cover - every registered task is handled above
            raise KeyError(f"the synthetic world has no generator for task {task!r}")
        text, target, refs, vis, extra = out
        vid = f"{task}_{split}_{i:06d}"
        visuals[vid] = vis if spec.modality == "video" else vis[0]
        examples.append(Example(task, vid, text, target, [vid], refs, extra))
    return SyntheticSplit(task, split, examples, visuals)


# ----------------------------------------------------------------------------- disk cache

def cache_root() -> Path:
    """``$VLSCALE_CACHE`` or ``~/.cache/vlscale``."""
    return Path(os.environ.get("VLSCALE_CACHE") or Path.home() / ".cache" / "vlscale")


def split_params(task: str, split: str, n: int, seed: int, image_size: int) -> dict:
    return {"version": GENERATOR_VERSION, "task": task, "split": split, "n": int(n),
            "seed": int(seed), "image_size": int(image_size)}


def split_cache_dir(params: dict) -> Path:
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "synthetic" / f"{params['task']}-{params['split']}-{key}"


def _save(split: SyntheticSplit, params: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp-", dir=path.parent))
    try:
        ids = list(split.visuals)
        arrays = {"ids": np.array(ids)}
        if get_task(split.task).modality == "video":
            lengths = np.array([len(split.visuals[i]) for i in ids])
            frames = np.zeros((len(ids), int(lengths.max()), *split.visuals[ids[0]][0].shape), np.uint8)
            for j, i in enumerate(ids):
                frames[j, :lengths[j]] = np.stack(split.visuals[i])
            arrays.update(pixels=frames, lengths=lengths)
        else:
            arrays["pixels"] = np.stack([split.visuals[i] for i in ids])
        np.savez_compressed(tmp / "visual.npz", **arrays)
        with open(tmp / "examples.json", "w") as f:
            json.dump([asdict(e) for e in split.examples], f)
        with open(tmp / "params.json", "w") as f:
            json.dump(params, f, indent=1)
        try:
            os.rename(tmp, path)
        except OSError:  # another process finished first: its data are the same
            if not (path / "params.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _load(path: Path, task: str, split: str) -> SyntheticSplit:
    with open(path / "examples.json") as f:
        examples = [Example(**d) for d in json.load(f)]
    if task == "vqa":  # a cache written before answer types were recorded: the same data, typed as generated now
        for e in examples:
            e.extra.setdefault("answer_type", VQA_ANSWER_TYPES[e.extra["qtype"]])
    with np.load(path / "visual.npz") as z:
        ids = [str(i) for i in z["ids"]]
        pixels = z["pixels"]
        if "lengths" in z:
            lengths = z["lengths"]
            visuals = {i: [pixels[j, f] for f in range(lengths[j])] for j, i in enumerate(ids)}
        else:
            visuals = {i: pixels[j] for j, i in enumerate(ids)}
    return SyntheticSplit(task, split, examples, visuals)


def load_split(task: str, split: str, n: int, seed: int = 0, image_size: int = 64,
               use_cache: bool = True) -> SyntheticSplit:
    """The (task, split) data, from the disk cache when present, else generated (and cached)."""
    params = split_params(task, split, n, seed, image_size)
    if not use_cache:
        return generate_split(task, split, n, seed, image_size)
    path = split_cache_dir(params)
    if (path / "params.json").exists():
        try:
            return _load(path, task, split)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RuntimeError(f"synthetic cache {path} is unreadable ({e}); delete it to regenerate") from e
    data = generate_split(task, split, n, seed, image_size)
    try:
        _save(data, params, path)
    except OSError as e:  # VLSCALE_CACHE naming a file, read-only, a full disk: a bare OSError traceback
        from vlscale.data.real import DataError

        now = repr(os.environ["VLSCALE_CACHE"]) if os.environ.get("VLSCALE_CACHE") else "unset: ~/.cache/vlscale"
        raise DataError(f"the synthetic world's cache {path.parent} cannot be written ({e.strerror or e}); set "
                        f"VLSCALE_CACHE to a writable folder (it is {now})") from None
    return data


def content_params(cfg) -> dict:
    """What decides the image (or video) behind a synthetic id: the generator version, the seed and
    the image size (not the split sizes: the first ``n`` examples do not depend on ``n``). Feature
    caches record it, and one made with other values is refused (vlscale.data.features)."""
    return {"generator": GENERATOR_VERSION, "seed": int(cfg.data.synthetic_seed),
            "image_size": int(cfg.data.image_size)}


def split_size(cfg, split: str) -> int:
    return cfg.data.synthetic_train if split == "train" else cfg.data.synthetic_eval


_MEMO: dict = {}


def synthetic_split(cfg, task: str, split: str) -> SyntheticSplit:
    """The split a run config asks for (memoised in-process: examples and images load once)."""
    params = split_params(task, split, split_size(cfg, split), cfg.data.synthetic_seed, cfg.data.image_size)
    key = json.dumps(params, sort_keys=True) + str(cache_root())
    if key not in _MEMO:
        _MEMO[key] = load_split(task, split, params["n"], params["seed"], params["image_size"])
    return _MEMO[key]


def world_corpus(n_per_task: int = 400, seed: int = 12345) -> list[str]:
    """Every kind of text the world produces (inputs with prefixes, targets, references): tokenizer training."""
    from vlscale.data.tasks import TASKS

    lines = []
    for task, spec in TASKS.items():
        for e in generate_split(task, "train", n_per_task, seed, image_size=16).examples:
            lines.append(f"{spec.prefix} {e.text}".strip())
            lines.extend(dict.fromkeys([e.target] + list(e.references)))
    return lines


# ----------------------------------------------------------------------------- baselines

def _mean_score(task: str, predictions: list[str], examples: list[Example]) -> float:
    """The task's headline metric (``vlscale.metrics.score_task``)."""
    from vlscale.metrics import score_task

    preds = {e.uid: p for e, p in zip(examples, predictions)}
    refs = {e.uid: list(e.references) or [e.target] for e in examples}
    return float(score_task(task, preds, refs)[get_task(task).metric])


def _question(e: Example) -> str:
    return (e.extra.get("question") or e.text).strip().lower()


def _majority(values) -> str:
    counts = Counter(values)
    best = max(counts.values())
    return min(v for v, c in counts.items() if c == best)  # deterministic tie-break


def _naive_bayes(train_examples, test_examples, label_of, allowed=None) -> list[str]:
    """Multinomial naive Bayes (add-one smoothing) from the question's words to a label."""
    classes, words = Counter(), defaultdict(Counter)
    for e in train_examples:
        c = label_of(e)
        classes[c] += 1
        words[c].update(_question(e).split())
    vocab = {w for c in words for w in words[c]}
    total = {c: sum(words[c].values()) + len(vocab) for c in classes}
    n = sum(classes.values())
    preds = []
    for e in test_examples:
        q = _question(e).split()
        options = allowed(e) if allowed else sorted(classes)
        scores = [(sum(np.log((words[c][w] + 1) / total[c]) for w in q if w in vocab)
                   + np.log(classes[c] / n), c) if c in classes else (-np.inf, c) for c in options]
        preds.append(max(scores)[1])  # ties: the larger label, deterministically
    return preds


def answer_prior_baseline(train_examples: list[Example], test_examples: list[Example], task: str) -> float:
    """Best text-only answer prior, scored with the task's metric on ``test_examples``.

    Candidates (the best is returned): the most frequent training target overall; given the
    question's first 1, 2 or 3 words (its type); given the whole question text (a key unseen in
    training falls back to the overall majority); a naive Bayes classifier over the question's words.
    For multiple-choice tasks also content priors: the candidate whose text was most often gold in
    training, and naive Bayes over the answer texts restricted to the example's candidates.
    """
    if not train_examples or not test_examples:
        raise ValueError(f"answer_prior_baseline({task!r}): need non-empty train and test examples")
    get_task(task)
    overall = _majority(e.target for e in train_examples)
    keyings = {"overall": lambda e: "", "full": _question}
    for k in (1, 2, 3):
        keyings[f"first{k}"] = lambda e, k=k: " ".join(_question(e).split()[:k])
    results = {}
    for name, key in keyings.items():
        by_key = defaultdict(list)
        for e in train_examples:
            by_key[key(e)].append(e.target)
        prior = {k: _majority(v) for k, v in by_key.items()}
        preds = [prior.get(key(e), overall) for e in test_examples]
        results[name] = _mean_score(task, preds, test_examples)
    choice = all("candidates" in e.extra for e in train_examples + test_examples)
    results["naive_bayes"] = _mean_score(task, _naive_bayes(train_examples, test_examples, lambda e: e.target),
                                         test_examples)
    if choice:
        answer = lambda e: e.extra["candidates"][int(e.target[1:])]
        texts = _naive_bayes(train_examples, test_examples, answer, lambda e: e.extra["candidates"])
        preds = [f"a{e.extra['candidates'].index(t)}" for e, t in zip(test_examples, texts)]
        results["naive_bayes_content"] = _mean_score(task, preds, test_examples)
    if choice:
        gold, seen = Counter(), Counter()
        for e in train_examples:
            for j, c in enumerate(e.extra["candidates"]):
                seen[c] += 1
                gold[c] += e.target == f"a{j}"
        preds = []
        for e in test_examples:
            rate = [(gold[c] / seen[c] if seen[c] else 0.0, -j) for j, c in enumerate(e.extra["candidates"])]
            preds.append(f"a{-max(rate)[1]}")
        results["content"] = _mean_score(task, preds, test_examples)
    return max(results.values())

