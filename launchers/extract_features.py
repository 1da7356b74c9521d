"""Precompute frozen-CLIP features into a feature cache (then train with model.feature_source=cache).

    python launchers/extract_features.py --vision RN101 [--pretrained TAG_OR_FILE] \\
        (--images DIR | --synthetic [--config NAME] [key=value ...] | --real --config NAME [key=value ...] |
         --hf-dataset NAME_OR_PATH --image-column COL [COL2] [--split S] [--id-column COL] [--skip-bad-records]) \\
        --out DIR [--batch-size N] [--video] [--fp16] [--device cpu|cuda]

Images give the raw grid of the RN's last conv stage (RN101 at 224 px: 49 x 2048) or a ViT's
patch tokens; videos (``--video``) give one CLIP image embedding per frame (F, E). Sources:
``--images DIR`` (ids = file names without suffix, so ``x.jpg`` and ``x.png`` in one folder are
refused; with ``--video`` each sub-folder is a video of frame images), ``--synthetic`` (every split
of the config's tasks in the synthetic world, recorded in the cache with the seed and image size
that decide its images; video tasks switch ``--video`` on), ``--real`` (the real datasets of
``--config`` under its ``data.root``, e.g. ``paper/clip_bart_single_adapter data.root=DIR``: every
split's images that its image tasks name, found where training finds them (COCO's ``train2014/``
and ``val2014/``, NLVR2's ``train/``, ``dev/``, ``test1/``), under the ids training looks up; a split
without its annotation file is skipped and said; images missing for some examples are an error, or
dropped with ``data.skip_bad_records=true`` as training drops them; video tasks, e.g.
``paper/video_clip_bart_single_adapter``: every video the splits name, from where training without a
cache reads it, under its ``vid_name``: ``root/<task>/frames/<vid_name>/`` frame images are encoded,
``root/<task>/features/<vid_name>.npy`` / ``.npz`` / ``.safetensors`` precomputed frame features (the VALUE
release's) are copied as they are, every frame, checked to be ``model.vision``'s width; no CLIP is
built when nothing is to be encoded), ``--hf-dataset`` (a HF ``datasets``
dataset by name, a ``save_to_disk`` folder or a folder of data files; ids as training's
``data.hf_dataset`` path names them: ``<split>/<row>``, or the ``--id-column`` naming each row's
image, as ``data.hf_columns.image_id``, where rows sharing an id are extracted once (and must share the image,
as training checks it: a row whose image differs is refused, or skipped); NLVR2's two
image columns, given in ``data.hf_columns.image``'s order, ``<split>/<row>/0`` and ``/1``). A row
without an image is an error naming the dataset, split, row and column, or with
``--skip-bad-records`` skipped, as training's ``data.skip_bad_records=true`` skips it, and counted
at the end. Resumable: ids already in ``--out`` are skipped; shards are written atomically. Bad
input (an unreadable image, a cache made with other settings) ends with one line naming the file; the features
written before an unreadable image are kept, and ``--skip-bad-records`` (``--real``: ``data.skip_bad_records=true``)
leaves such images out instead, listed at the end.
Format: see vlscale/data/features.py.
"""

from __future__ import annotations

import argparse
import pickle
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from vlscale.log import logs_to_console  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--vision", help="open_clip model name (RN101, ViT-B-32-quickgelu: OpenAI's ViT weights were "
                                     "trained with QuickGELU, tiny-clip-rn, ...); default with --synthetic / --real: "
                                     "the config's model.vision")
    ap.add_argument("--pretrained", default=None, help="open_clip pretrained tag or local checkpoint file "
                                                       "(default with --synthetic / --real: model.vision_pretrained)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", type=lambda p: Path(p).expanduser(),
                     help="folder of images (or, with --video, of frame folders)")
    src.add_argument("--synthetic", action="store_true", help="the synthetic world of --config")
    src.add_argument("--real", action="store_true",
                     help="the real datasets of --config (data.root): every split's images its image tasks name "
                          "(video tasks: every video's frames or precomputed frame features), under training's ids")
    src.add_argument("--hf-dataset", help="HF datasets name or save_to_disk folder")
    ap.add_argument("--config", default=None, help="preset name or YAML path (with --synthetic or --real)")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value (with --synthetic or --real)")
    ap.add_argument("--image-column", nargs="+", default=None, metavar="COL",
                    help="--hf-dataset: the image column, or NLVR2's two (left right, in data.hf_columns.image's "
                         "order; ids <split>/<row>/0 and /1)")
    ap.add_argument("--id-column", default=None,
                    help="--hf-dataset: the column naming each row's image, as data.hf_columns.image_id (rows "
                         "sharing an id share one image, extracted once; default: <split>/<row>, as training)")
    ap.add_argument("--split", default="train", help="--hf-dataset: which split, train / val / test or the "
                                                      "dataset's own name (validation, ...); default train")
    ap.add_argument("--skip-bad-records", action="store_true",
                    help="--hf-dataset: skip rows without an image (by default an error), as training's "
                         "data.skip_bad_records=true does; the count and the first rows are reported at the end. "
                         "--images / --hf-dataset: leave unreadable images (corrupt, half-written, empty) out of "
                         "the cache, listed at the end (by default the first stops the extraction, the features "
                         "written before it kept); with --real: data.skip_bad_records=true does both")
    ap.add_argument("--pattern", default=None, help="--images: file name pattern with {id} (default: any image)")
    ap.add_argument("--out", type=lambda p: Path(p).expanduser(), required=True,  # --out=~/x: no shell expands it
                    help="cache folder (created; resumed when present)")
    ap.add_argument("--batch-size", type=int, default=32, help="images (video: frames) per forward pass")
    ap.add_argument("--workers", type=int, default=None, metavar="N",
                    help="threads reading and transforming images, the next batch's while one is encoded (default: "
                         "this process's CPUs, at most 8)")
    ap.add_argument("--shard-size", type=int, default=512, help="ids per safetensors shard")
    ap.add_argument("--video", action="store_true", help="per-frame global embeddings (F, E)")
    ap.add_argument("--fp16", action="store_true", help="store features in fp16 (read back as fp32)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_intermixed_args(argv)
    if args.overrides and not (args.synthetic or args.real):
        ap.error(f"config overrides {args.overrides} only apply with --synthetic or --real")
    if args.config and not (args.synthetic or args.real):
        ap.error("--config applies with --synthetic or --real only")
    if args.real and not args.config:
        ap.error("--real needs --config (the preset that trains on the data, e.g. "
                 "--config paper/clip_bart_single_adapter data.root=DIR)")
    if args.hf_dataset and not args.image_column:
        ap.error("--hf-dataset needs --image-column")
    for flag in ("image_column", "id_column"):
        if getattr(args, flag) and not args.hf_dataset:
            ap.error(f"--{flag.replace('_', '-')} applies to --hf-dataset only")
    if args.skip_bad_records and not (args.hf_dataset or args.images):
        ap.error("--skip-bad-records applies to --hf-dataset and --images"
                 + (" (with --real: data.skip_bad_records=true, as training is given it)" if args.real else ""))
    if args.split != "train" and not args.hf_dataset:
        ap.error("--split applies to --hf-dataset only (--synthetic extracts every split of the config's tasks)")
    if args.pattern and not args.images:
        ap.error("--pattern applies to --images only")
    if args.pattern and "{id}" not in args.pattern:
        ap.error(f"--pattern {args.pattern!r} must contain {{id}} where the id stands in the file name (e.g. "
                 "'COCO_val2014_{id}.jpg')")
    from vlscale.files import out_problem

    problem = out_problem(args.out)  # before the encoder is built and the images are listed (was a traceback)
    if problem:
        ap.error(problem)
    if not (args.synthetic or args.real) and not args.vision:
        ap.error("--vision is required (e.g. --vision RN101)")
    for flag in ("batch_size", "shard_size", "workers"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            ap.error(f"--{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}")
    if args.device != "cpu":
        from vlscale.engine.distributed import device_problem

        problem = device_problem(args.device)  # it was blamed on --pretrained, after the images were listed
        if problem:
            ap.error(f"--device {problem}")
    return args


def image_folder_jobs(args):
    """[(source, ids, video)] for --images DIR."""
    from vlscale.data.real import DataError
    from vlscale.data.visual import IMAGE_SUFFIXES, ImageFolder

    if not args.images.is_dir():
        raise SystemExit(f"--images {args.images}: no such folder")
    if args.video:
        source = ImageFolder(args.images, args.pattern or "{id}", video=True)
        if not source.ids():
            raise DataError(f"--images {args.images} --video: no sub-folders (one per video, of frame images)")
        return [(source, source.ids(), True)]
    if args.pattern:
        source = ImageFolder(args.images, args.pattern)
        if not source.ids():
            raise DataError(f"--images {args.images}: no files match --pattern {args.pattern!r}")
        return [(source, source.ids(), False)]
    files = sorted(p for p in args.images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise SystemExit(f"--images {args.images}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    by_stem: dict = {}
    for p in files:
        if p.stem in by_stem:
            raise DataError(f"--images {args.images}: {by_stem[p.stem].name} and {p.name} would both be id "
                            f"{p.stem!r}; keep one of them (or choose with --pattern)")
        by_stem[p.stem] = p
    by_suffix: dict = {}
    for p in files:
        by_suffix.setdefault(p.suffix, []).append(p.stem)
    return [(ImageFolder(args.images, "{id}" + suffix), stems, False) for suffix, stems in by_suffix.items()]


def synthetic_jobs(args, cfg):
    from vlscale.data.synthetic import SPLITS, synthetic_split
    from vlscale.data.tasks import get_task
    from vlscale.data.visual import SyntheticImages

    modalities = {get_task(t).modality for t in cfg.data.tasks}
    video = modalities == {"video"}
    if args.video and not video:
        raise SystemExit(f"--video, but data.tasks={cfg.data.tasks} are image tasks")
    jobs = []
    for task in cfg.data.tasks:
        for split in SPLITS:
            data = synthetic_split(cfg, task, split)
            jobs.append((SyntheticImages(data.visuals, f"synthetic {task}/{split}"), list(data.visuals), video))
    return jobs


def image_file(source, image_id: str):
    """The file an image folder (or the first of several, ``FirstOf``, holding it) reads ``image_id`` from; None
    for another kind of source."""
    sources = getattr(source, "sources", [source])
    found = next((s for s in sources if image_id in s), None)
    return found.path(image_id) if hasattr(found, "path") else None


def other_image(first, source, image_id: str):
    """``(file, other file)`` where ``source`` reads ``image_id`` from another image than ``first`` (the source
    that named it first) does, else None: the cache keys features by image id alone."""
    import filecmp
    import os

    a, b = image_file(first, image_id), image_file(source, image_id)
    if a is None or b is None or os.path.samefile(a, b) or filecmp.cmp(a, b, shallow=False):
        return None
    return a, b


def real_jobs(cfg, video_flag: bool = False):
    """([(source, ids, video)], notes) for --real: each task's and split's images (video tasks: videos), from the
    source training reads them from without a cache (``model.feature_source=images``, ``data.feature_cache``
    unset), under the ids it looks up; ``notes``: the splits left out (no annotation file). A video task's
    source is a folder of frame images (encoded) or of precomputed frame features (kind "features": copied)."""
    from vlscale.data import check_visual_ids, load_examples
    from vlscale.data.real import SPLITS, DataError, DataFileNotFound, real_visual_source
    from vlscale.data.tasks import get_task

    if cfg.data.source != "real":
        raise DataError(f"--real: the config's data.source is {cfg.data.source!r}; set data.source=real and "
                        "data.root=DIR (or use --synthetic)")
    video = any(get_task(t).modality == "video" for t in cfg.data.tasks)  # a config holds one kind
    if video_flag and not video:
        raise DataError(f"--video, but data.tasks={cfg.data.tasks} are image tasks")
    jobs, notes, seen = [], [], {}  # seen: id -> (task, source root, source) it is extracted from
    for task in cfg.data.tasks:
        for split in SPLITS:
            try:
                examples = load_examples(cfg, task, split, require_answers=False)  # images only: a withheld split too
            except DataFileNotFound as e:
                notes.append(f"{task}/{split} skipped ({e})")
                continue
            source = real_visual_source(cfg, task, split)
            examples = check_visual_ids(cfg, task, split, examples, source)
            named = list(dict.fromkeys(i for e in examples for i in e.image_ids))
            ids = [i for i in named if i not in seen]
            root = getattr(source, "root", None)
            # a video another task names too (TVQA and TVC share theirs) is stored once, from the first task's
            # source: said where this task's own source is another folder (its frames or features not used)
            elsewhere = [seen[i] for i in named if i in seen and video and seen[i][1] != root]
            if elsewhere:
                first = sorted({t for t, _, _ in elsewhere})
                notes.append(f"{task}/{split}: {len(elsewhere)} video(s) also named by {', '.join(first)} are stored "
                             f"once, from {', '.join(sorted({str(r) for _, r, _ in elsewhere}))}, not from {root}; "
                             f"training from this cache reads those for {task} too")
            # an image id two tasks read from two different images (a custom task's own images, under ids of a
            # built-in's): one would stand for the other in the cache
            clash = next(((i, seen[i][0], files) for i in named if i in seen and not video and seen[i][2] is not source
                          for files in [other_image(seen[i][2], source, i)] if files), None)
            if clash:
                i, first, (a, b) = clash
                raise DataError(f"--real: image id {i!r} names {a} for {first} and another image, {b}, for "
                                f"{task}/{split}; the feature cache keys features by image id alone, so one would "
                                f"stand for the other: give {task}'s images ids of their own (file names and its "
                                f"annotations), or link its images folder to {first}'s where they are the same images")
            seen.update((i, (task, root, source)) for i in ids)
            if ids and getattr(source, "kind", None) == "features":  # precomputed frame features: copied whole
                from vlscale.data.video import VideoFeatureFolder

                source = VideoFeatureFolder(source.root, max_frames=None, expect_dim=source.expect_dim)
                notes.append(f"{task}/{split}: {len(ids)} video(s)' precomputed frame features copied from "
                             f"{source.root}")
            if ids:
                jobs.append((source, ids, video))
    if not jobs:
        raise DataError(f"--real: no {'videos' if video else 'images'} to extract for data.tasks={cfg.data.tasks} "
                        f"under data.root={cfg.data.root}" + (f" ({notes[0]})" if notes else ""))
    return jobs, notes


def copy_frame_features(source, ids, out, *, vision: str, pretrained, dtype: str, shard_size: int,
                        progress: bool, skip_unreadable: bool = False, how_to_skip: str = "") -> dict:
    """Copy precomputed per-video frame features (a VideoFeatureFolder) into the cache at ``out``, under the
    meta.json an extraction of frames with ``vision`` writes (so both kinds of video share one cache); ids
    already there are skipped; a file that cannot be read as extract_features treats an image.
    -> {"total", "skipped", "written", "unreadable"}."""
    from vlscale.data.features import FeatureWriter, feature_meta, read_or_skip
    from vlscale.log import progress_bar
    from vlscale.modeling.vision import vision_dims

    dims = vision_dims(vision)
    # the meta an extraction of frames with this CLIP's encoder writes
    meta = feature_meta(vision, pretrained, video=True, dtype=dtype, image_size=dims["image_size"], grid_side=None,
                        dim=int(dims["embed_dim"]))
    writer = FeatureWriter(out, meta, shard_size=shard_size)
    todo = list(dict.fromkeys(i for i in ids if i not in writer))
    stats = {"total": len(set(ids)), "skipped": len(set(ids)) - len(todo), "written": 0, "unreadable": []}
    try:
        for vid in progress_bar(iterable=todo, desc=f"frame features {source.root} -> {out}", unit="video",
                                disable=not progress):
            feats = read_or_skip(source, vid, writer, stats, skip_unreadable, how_to_skip)
            if feats is not None:
                writer.add(vid, feats)
                stats["written"] += 1
    finally:
        writer.close()
    return stats


def hf_jobs(args):
    """([(source, ids, video)], report) for --hf-dataset: the split training reads for ``--split``, with
    its ids; ``report["skipped"]``: ``[(row, why)]`` of the rows --skip-bad-records left out."""
    from vlscale.data.hf_dataset import HFImageSource, open_hf_split, rows_without_image
    from vlscale.data.real import DataError

    if args.video:
        raise SystemExit("--video is not supported with --hf-dataset (use --images DIR with frame folders)")
    columns = args.image_column
    if len(columns) > 2:
        raise SystemExit(f"--image-column takes one column, or NLVR2's two (as data.hf_columns.image), got {columns}")
    if args.id_column and len(columns) > 1:
        raise SystemExit("--id-column applies to one --image-column only (as data.hf_columns.image_id: "
                         "single-image tasks); NLVR2's two images are <split>/<row>/0 and <split>/<row>/1")
    ds, hf_split, split = open_hf_split(args.hf_dataset, args.split, "--hf-dataset")  # split: ours, as training's ids
    name = f"{args.hf_dataset}[{hf_split}]"
    for col in (*columns, args.id_column):
        if col and col not in ds.column_names:
            raise DataError(f"--hf-dataset {name}: no column {col!r}; columns: {ds.column_names}")
    # rows without an image (or naming an image file that is not there): training's loader refuses them, or skips
    # them with data.skip_bad_records=true; here the same, with --skip-bad-records
    base = Path(args.hf_dataset).expanduser()
    base = base if base.is_dir() else None
    no_image = rows_without_image(ds, columns, base_dir=base)
    if no_image and not args.skip_bad_records:
        row, col, why = no_image[0]
        raise DataError(f"--hf-dataset {name}: row {row}, column {col!r} {why} ({len(no_image)} such "
                        f"row(s), first {[r for r, _, _ in no_image[:5]]}); skip them with --skip-bad-records "
                        "(and train with data.skip_bad_records=true)")
    skipped = [(row, f"column {col!r} {why}") for row, col, why in no_image]
    bad_rows = {row for row, _, _ in no_image}
    locations: dict = {}
    if args.id_column:  # training's image_id role: rows sharing an image share its id, extracted once
        import datasets

        from vlscale.data.hf_dataset import other_image

        cells = ds.select_columns([args.id_column, columns[0]])
        if isinstance(cells.features[columns[0]], datasets.Image):
            cells = cells.cast_column(columns[0], datasets.Image(decode=False))
        marks: dict = {}  # id -> its first row's image: as training's loader compares them (other_image)
        for row, cell in enumerate(cells):
            value = cell[args.id_column]
            if row in bad_rows:
                continue
            if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
                if not args.skip_bad_records:
                    raise DataError(f"--hf-dataset {name}: row {row}: --id-column {args.id_column!r} must hold a "
                                    f"non-empty string or integer id, got {value!r:.60}")
                skipped.append((row, f"--id-column {args.id_column!r} holds {value!r:.40}"))
                continue
            other = other_image(marks, str(value), row, cell[columns[0]], base)
            if other:
                why = (f"--id-column {args.id_column!r} is {str(value)!r}, the id of row {other[0]}'s image, but "
                       f"column {columns[0]!r} holds another image here")
                if not args.skip_bad_records:  # the first row's features would stand for this row's image
                    raise DataError(f"--hf-dataset {name}: row {row}: {why}; rows sharing an id must share the "
                                    f"image (training refuses such rows too): choose an --id-column naming each "
                                    f"image, or leave it out")
                skipped.append((row, why))
                continue
            locations.setdefault(str(value), (row, columns[0]))
        skipped.sort()
    elif len(columns) == 1:  # the ids training gives rows without an image_id column
        locations = {f"{split}/{row}": (row, columns[0]) for row in range(len(ds)) if row not in bad_rows}
    else:  # NLVR2: training's ids <split>/<row>/<k>, k the column's place in data.hf_columns.image
        locations = {f"{split}/{row}/{k}": (row, col) for row in range(len(ds)) if row not in bad_rows
                     for k, col in enumerate(columns)}
    if not locations:
        raise DataError(f"--hf-dataset {name}: none of its {len(ds)} rows has an image to extract"
                        + (f" (first skipped: row {skipped[0][0]}, {skipped[0][1]})" if skipped else ""))
    source = HFImageSource(ds, locations, name, base)
    return [(source, list(locations), False)], {"name": name, "rows": len(ds), "skipped": skipped,
                                                "row_ids": None if args.id_column else args.hf_dataset}


def load_encoder(vision: str, pretrained, device, given: str = "--pretrained"):
    """The frozen CLIP tower; a checkpoint that cannot be loaded ends the run with one line naming where
    ``pretrained`` came from (``given``: the flag, or the config's model.vision_pretrained)."""
    from vlscale.config import SourceError
    from vlscale.modeling.vision import build_vision_encoder

    try:
        return build_vision_encoder(vision, pretrained=pretrained, device=device)
    except (FileNotFoundError, SourceError) as e:  # its message names model.vision_pretrained, the file or the tag,
        # and what to give instead (wrapped below, it said the tag, the cause and the remedy twice)
        raise SystemExit(f"{given}: {e}" if given == "--pretrained" else str(e)) from None
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as e:  # open_clip: an unknown tag, no
        # network for a hub tag; torch.load / safetensors: a file that is no checkpoint
        first = ("not a checkpoint torch.load reads with weights_only=True" if isinstance(e, pickle.UnpicklingError)
                 else " ".join(str(e).split("\n\n")[0].split()))
        named = f"--pretrained {pretrained!r}" if given == "--pretrained" else f"{given}={pretrained!r}"
        raise SystemExit(f"{named} for {vision}: cannot load it ({type(e).__name__}: {first}); "
                         f"give an open_clip tag its cache holds or a local CLIP checkpoint file"
                         + ("" if given == "--pretrained" else f" ({given}=FILE, as training is given it)")) from None


def train_with(args, cfg, vision: str, pretrained) -> str:
    """What trains on the cache, as it can be typed: after --synthetic / --real the training command, with the
    config and overrides that name the data (``data.root``, ...); else the overrides to add to the run's own. Both
    name the CLIP the features are of where the config does not (``model.vision``, ``model.vision_pretrained``:
    the cache refuses a run with others)."""
    words = []
    if cfg is not None:
        from vlscale.files import launcher_path

        words = ["python", launcher_path("train.py")] + (["--config", args.config] if args.config else [])
        words += [o for o in args.overrides  # the cache's own replace them
                  if o.split("=", 1)[0].strip() not in ("model.feature_source", "data.feature_cache")]
    if cfg is None or vision != cfg.model.vision:
        words.append(f"model.vision={vision}")
    if pretrained is not None and (cfg is None or pretrained != cfg.model.vision_pretrained):
        words.append(f"model.vision_pretrained={pretrained}")
    words += ["model.feature_source=cache", f"data.feature_cache={args.out}"]
    return " ".join(shlex.quote(str(w)) for w in words)


@logs_to_console
def main(argv=None) -> int:
    args = parse_args(argv)
    from vlscale.config import ConfigError, load_config
    from vlscale.data.features import extract_features
    from vlscale.data.real import DataError, hf_row_source
    from vlscale.modeling.vision import image_transform, vision_dims

    pretrained, synthetic, given, cfg = args.pretrained, None, "--pretrained", None
    if args.synthetic or args.real:
        # --real reads the images (videos) training would read without a cache, whatever the config's
        # feature_source and feature_cache
        overrides = args.overrides + (["model.feature_source=images", "data.feature_cache=null"] if args.real else [])
        try:
            cfg = load_config(args.config, overrides)
        except ConfigError as e:
            raise SystemExit(f"config error: {e}") from None
        vision = args.vision or cfg.model.vision
        if pretrained is None:  # the config's, named so in an error: the user gave no --pretrained
            pretrained, given = cfg.model.vision_pretrained, "model.vision_pretrained"
        if args.synthetic:
            from vlscale.data.synthetic import content_params

            synthetic = content_params(cfg)
    else:
        vision = args.vision
    try:
        vision_dims(vision)
    except KeyError as e:
        raise SystemExit(f"--vision: {e.args[0]}") from None
    try:
        hf_report, notes = None, []
        if args.synthetic:
            jobs = synthetic_jobs(args, cfg)
        elif args.real:
            jobs, notes = real_jobs(cfg, args.video)
        elif args.images:
            jobs = image_folder_jobs(args)
        else:
            jobs, hf_report = hf_jobs(args)
        # --real's precomputed frame features are copied, not encoded: no CLIP (nor its weights) is needed for them
        encoder = transform = None
        if any(getattr(source, "kind", None) != "features" for source, _, _ in jobs):
            encoder = load_encoder(vision, pretrained, args.device, given)
            transform = image_transform(vision, pretrained)
        total = {"total": 0, "skipped": 0, "written": 0}
        unreadable = []
        skip = args.skip_bad_records or bool(args.real and cfg.data.skip_bad_records)
        how_to_skip = (", or leave unreadable ones out with " + ("data.skip_bad_records=true" if args.real
                                                                  else "--skip-bad-records")
                       + " (training with data.skip_bad_records=true drops the examples naming them)")
        dtype = "float16" if args.fp16 else "float32"
        # the HF dataset whose rows the ids number: recorded in meta.json, or training refuses the cache (--real
        # over data.hf_dataset recorded none, and its own "Train with:" line was refused as an older vlscale's cache)
        rows = hf_report["row_ids"] if hf_report else hf_row_source(cfg) if args.real else None
        for source, ids, video in jobs:
            if getattr(source, "kind", None) == "features":
                stats = copy_frame_features(source, ids, args.out, vision=vision, pretrained=pretrained, dtype=dtype,
                                            shard_size=args.shard_size, progress=not args.quiet,
                                            skip_unreadable=skip, how_to_skip=how_to_skip)
            else:
                stats = extract_features(encoder, transform, source, ids, args.out, vision=vision,
                                         pretrained=pretrained, video=video or args.video, batch_size=args.batch_size,
                                         shard_size=args.shard_size, dtype=dtype, progress=not args.quiet,
                                         device=args.device, synthetic=synthetic,
                                         hf_rows=rows, skip_unreadable=skip, how_to_skip=how_to_skip,
                                         workers=args.workers)
            unreadable += stats["unreadable"]
            for k in total:
                total[k] += stats[k]
    except DataError as e:
        raise SystemExit(f"extract_features.py: {type(e).__name__}: {e}") from None
    except OSError as e:  # a full disk, a quota, a file-size limit: a traceback through safetensors' writer
        from vlscale.engine.checkpoint import write_failure_reason
        from vlscale.files import disk_refused

        if not disk_refused(e):
            raise
        raise SystemExit(f"extract_features.py: writing the feature cache {args.out} failed "
                         f"({write_failure_reason(e, args.out)}); the features written before it are kept: the same "
                         "command goes on from them once it can write") from None
    for note in notes:
        print(f"--real: {note}")
    import json

    from vlscale.data.features import INDEX_FILE

    held = len(json.loads((args.out / INDEX_FILE).read_text())) if (args.out / INDEX_FILE).is_file() else 0
    print(f"feature cache {args.out}: of the {total['total']} ids asked for, {total['written']} written, "
          f"{total['skipped']} already there; the cache holds {held}. Train with: "
          f"{train_with(args, cfg, vision, pretrained)}")
    if unreadable:
        print(f"{'data.skip_bad_records' if args.real else '--skip-bad-records'}: left out {len(unreadable)} id(s) "
              f"that could not be read, first: {'; '.join(why for _, why in unreadable[:5])}. Train with "
              "data.skip_bad_records=true, which drops the examples naming them")
    if hf_report and hf_report["skipped"]:
        skipped = hf_report["skipped"]
        print(f"--skip-bad-records: skipped {len(skipped)} of {hf_report['rows']} rows of {hf_report['name']}, "
              f"first: {'; '.join(f'row {row} ({why})' for row, why in skipped[:5])}. Train with "
              "data.skip_bad_records=true, which skips the same rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
