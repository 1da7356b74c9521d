"""Build the V&L model under ZeRO-3 ``zero.Init`` and load sharded safetensors rank by rank.

No rank ever holds the whole language model:

* **Construction**: the language model is built inside ``deepspeed.zero.Init``, so each module's
  parameters are partitioned as soon as the module exists (a rank keeps ceil(numel / W) elements
  of each). The frozen CLIP tower, the projection and the PEFT modules are small next to the LM and
  are built whole; ``deepspeed.initialize`` partitions their parameters. Their buffers (a ResNet
  CLIP's BatchNorm statistics) are moved to the rank's accelerator here: DeepSpeed moves nothing of
  a model that holds ``zero.Init`` parameters, and ``zero.Init`` placed only the LM's.
* **Random weights** (``model.pretrained=false``) are *the same values* a whole build gives with
  the same seed (so ``launchers/evaluate.py`` rebuilds the frozen backbone a ZeRO-3 run trained
  on): modules run their default initialisation on full tensors before being partitioned, and
  transformers' ``post_init`` weight initialisation, which would only see empty partitions, runs
  on each module's parameters gathered (``GatheredParameters``, modifier rank 0) in the order a
  whole build runs it, on every rank so random-number streams stay in step.
* **Pretrained weights** (``model.pretrained=true``) come from a local Hugging Face directory with
  ``model.safetensors`` or sharded ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``.
  The model is built without initialisation, then :func:`load_sharded_safetensors` reads, file by
  file and tensor by tensor, only the rows of each tensor that overlap this rank's flat partition
  (``safe_open(...).get_slice``) and copies them into ``param.ds_tensor``: no gather, no
  communication, and a rank reads about 1/W of the checkpoint. Peak host memory is the rank's
  partition plus one tensor's slice. (transformers' own ZeRO-3 path reads every file whole on
  rank 0 and scatters module by module.)

Entry point for the trainer: :func:`build_model_zero3` (same result as
``vlscale.modeling.vl_model.build_model``, returns the ``HfDeepSpeedConfig`` that must stay alive
while the model is used, and the load report).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import re
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class ShardedLoadError(RuntimeError):
    """A checkpoint directory is missing, incomplete, or does not fit the model; the message names it."""


@dataclass
class LoadReport:
    """What one rank read (bytes are the checkpoint's bytes actually read from the files)."""

    directory: str
    files: int
    tensors: int
    rank: int
    world_size: int
    bytes_read: int
    checkpoint_bytes: int
    partition_bytes: int
    """Bytes of this rank's parameter partitions that were filled (in the model's dtype)."""
    seconds: float
    rss_before_bytes: int
    peak_rss_bytes: int
    """Peak resident memory of this process while loading (VmHWM, reset before loading where the
    kernel allows it; otherwise the process's peak so far)."""
    unexpected_keys: list = field(default_factory=list)
    """Checkpoint tensors the model has no place for (ignored, as transformers does)."""

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- checkpoint files

def checkpoint_files(directory) -> dict[str, list[str]]:
    """-> {file path: [tensor names]} of a Hugging Face safetensors checkpoint directory."""
    from safetensors import safe_open

    d = Path(directory)
    if not d.is_dir():
        old = d.with_name(d.name + ".old")  # vlscale.engine.checkpoint._replace_dir's
        died = f"; a save that died left the previous one at {old}: rename it back" if old.is_dir() else ""
        raise ShardedLoadError(f"checkpoint directory {str(d)!r} does not exist (model.backbone_path){died}")
    index = d / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ShardedLoadError(f"{index}: not a safetensors index (no 'weight_map'): {e}") from e
        files: dict[str, list[str]] = {}
        for key, fname in weight_map.items():
            files.setdefault(str(d / fname), []).append(key)
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise ShardedLoadError(f"{index} names shard {Path(missing[0]).name!r}, which is not in {d}")
        return dict(sorted(files.items()))
    single = d / SINGLE_FILE
    if single.is_file():
        try:
            with safe_open(str(single), framework="pt") as f:
                return {str(single): list(f.keys())}
        except Exception as e:  # safetensors' SafetensorError: a truncated or corrupt file
            raise ShardedLoadError(f"{single}: not a readable safetensors file ({' '.join(str(e).split())}); "
                                   f"truncated or corrupt?") from None
    bins = sorted(p.name for p in d.glob("*.bin"))
    hint = (f"; it holds {bins[:3]} (PyTorch pickles): convert them once with "
            f"`transformers` save_pretrained(..., safe_serialization=True)") if bins else ""
    raise ShardedLoadError(f"{d} has neither {INDEX_FILE} nor {SINGLE_FILE}{hint}")


def _rss_bytes(field_name: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- loading

def _aliases(module: torch.nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every name it is registered under (tied weights have several)."""
    out: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), []).append(name)
    return out


def _partition_range(p: torch.nn.Parameter, rank: int) -> tuple[int, int, Optional[torch.Tensor]]:
    """(start, end) of this rank's slice of the flattened parameter, and the tensor to fill."""
    if not hasattr(p, "ds_id"):
        return 0, p.numel(), p.data.view(-1)
    # gathered into a buffer of its own (on one rank DeepSpeed may gather a parameter as a view of its partition:
    # then filling the partition fills what a forward reads)
    gathered = p.data.numel() == p.ds_numel
    if gathered and p.data.untyped_storage().data_ptr() != p.ds_tensor.untyped_storage().data_ptr():
        raise ShardedLoadError(f"parameter {p.ds_id} is gathered (a persistent or in-use ZeRO-3 parameter): load "
                               f"checkpoints right after construction, before deepspeed.initialize")
    target = p.ds_tensor
    location = getattr(target, "final_location", None)
    if location is not None and "nvme" in str(location).lower():
        raise ShardedLoadError(f"parameter {p.ds_id}: its partition lives on NVMe (offload_param.device=nvme); "
                               f"sharded loading fills CPU/GPU partitions only: load with zero3_offload.json "
                               f"(offload to cpu) and save a checkpoint, or use transformers' from_pretrained")
    group = getattr(p, "ds_process_group", None)
    if group is not None:  # the rank within the group the parameter is partitioned over
        import torch.distributed as dist

        rank = dist.get_rank(group=group)
    part = target.numel()
    start = min(rank * part, p.ds_numel)
    end = min(start + part, p.ds_numel)
    return start, end, target.data.view(-1)


def _read_flat_range(f, key: str, start: int, end: int) -> tuple[torch.Tensor, int]:
    """Elements [start, end) of the flattened tensor ``key``, reading only the rows that hold them.
    -> (tensor, bytes read)."""
    sl = f.get_slice(key)
    shape = list(sl.get_shape())
    if not shape:
        t = f.get_tensor(key).reshape(1)
        return t[start:end], t.element_size()
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    if row == 0 or end <= start:
        return torch.empty(0), 0
    r0, r1 = start // row, -(-end // row)
    rows = sl[r0:r1].reshape(-1)
    return rows[start - r0 * row:end - r0 * row], rows.numel() * rows.element_size()


def load_sharded_safetensors(module: torch.nn.Module, directory, *, rank: Optional[int] = None,
                             world_size: Optional[int] = None, prefix: Optional[str] = None) -> LoadReport:
    """Fill ``module``'s parameters (ZeRO-3 partitions, or whole tensors) and buffers from a
    safetensors checkpoint directory, reading only what this rank keeps.

    Every parameter must be found (under any of its tied names, with or without the model's
    ``base_model_prefix`` / ``prefix``), with its full shape; checkpoint tensors the model lacks are
    left unread, listed in the report and named in a warning (as transformers' load report names them for
    a whole build). Not a collective: ranks read independently.
    """
    from safetensors import safe_open

    if rank is None or world_size is None:
        import torch.distributed as dist

        ready = dist.is_available() and dist.is_initialized()
        rank = dist.get_rank() if ready else 0 if rank is None else rank
        world_size = dist.get_world_size() if ready else 1 if world_size is None else world_size
    files = checkpoint_files(directory)
    prefix = prefix if prefix is not None else getattr(module, "base_model_prefix", "") or ""

    def candidates(name: str) -> list[str]:
        out = [name]
        if prefix:
            out += [f"{prefix}.{name}", name[len(prefix) + 1:] if name.startswith(prefix + ".") else None]
        return [c for c in out if c]

    where = {key: path for path, keys in files.items() for key in keys}
    plan: dict[str, list[tuple[str, torch.Tensor, bool]]] = {}  # file -> [(key, tensor, is_param)]
    missing, used = [], set()
    aliases = _aliases(module)
    for p in {id(q): q for q in module.parameters()}.values():
        names = aliases[id(p)]
        key = next((c for n in names for c in candidates(n) if c in where), None)
        if key is None:
            missing.append(names[0])
            continue
        plan.setdefault(where[key], []).append((key, p, True))
        used.update(c for n in names for c in candidates(n) if c in where)
    if missing:
        raise ShardedLoadError(f"{directory}: no tensor for parameter(s) {missing[:5]}"
                               f"{' and %d more' % (len(missing) - 5) if len(missing) > 5 else ''} "
                               f"(checkpoint of another architecture? it holds e.g. {sorted(where)[:3]})")
    for name, buf in module.named_buffers():
        key = next((c for c in candidates(name) if c in where), None)
        if key is not None and buf is not None:
            plan.setdefault(where[key], []).append((key, buf, False))
            used.add(key)
    unexpected = sorted(set(where) - used)
    if unexpected:
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        logger.warning(f"{directory}: {len(unexpected)} checkpoint tensor(s) the model has no place for were not "
                       f"loaded ({', '.join(unexpected[:5])}{more}); a checkpoint of another architecture, or one "
                       f"holding extra modules?")

    rss_before = _rss_bytes("VmRSS")
    reset_peak_rss()
    t0 = time.perf_counter()
    bytes_read = checkpoint_bytes = filled = tensors = 0
    with torch.no_grad():
        for path, items in plan.items():
            with safe_open(path, framework="pt") as f:
                for key, target, is_param in items:
                    shape = list(f.get_slice(key).get_shape())
                    full = list(target.ds_shape) if hasattr(target, "ds_shape") else list(target.shape)
                    if shape != full:
                        raise ShardedLoadError(f"{path}: tensor {key!r} has shape {shape}, the model expects {full}")
                    if is_param:
                        start, end, flat = _partition_range(target, rank)
                    else:
                        start, end, flat = 0, target.numel(), target.view(-1)
                    part, nbytes = _read_flat_range(f, key, start, end)
                    if part.numel():
                        flat[:end - start].copy_(part)
                    bytes_read += nbytes
                    filled += (end - start) * flat.element_size()
                    tensors += 1
        for path, keys in files.items():
            with safe_open(path, framework="pt") as f:
                for key in keys:
                    sl = f.get_slice(key)
                    checkpoint_bytes += math.prod(sl.get_shape()) * _DTYPE_BYTES.get(sl.get_dtype(), 4)
    seconds = time.perf_counter() - t0
    return LoadReport(str(directory), len(files), tensors, rank, world_size, int(bytes_read), int(checkpoint_bytes),
                      int(filled), seconds, rss_before, _rss_bytes("VmHWM"), unexpected)


_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


_WEIGHT_FORMATS = {"model": "safetensors", "pytorch_model": "bin", "tf_model": "h5", "flax_model": "msgpack"}
_SAVED_FILE = re.compile("|".join(rf"{stem}(\.\w+)?(-\d+-of-\d+)?\.{ext}|{stem}\.{ext}\.index(\.\w+)?\.json"
                                  for stem, ext in _WEIGHT_FORMATS.items())
                         + r"|(generation_)?config\.json|\.shard-\d+\.safetensors")
"""The files of a folder that :func:`save_sharded_safetensors` replaces: the model's weights in any of Hugging Face's
formats (safetensors, PyTorch pickles, TF, Flax; whole or sharded, any ``variant``) with their indexes, its config
and generation config, and an older version's temporary shards (``.shard-*``); whatever else the folder holds (a
tokenizer, a README) is the user's and is kept."""


def save_sharded_safetensors(module: torch.nn.Module, directory, *, max_shard_bytes: int = 2 * 2 ** 30,
                             rank: Optional[int] = None) -> list[str]:
    """Write ``module``'s parameters (full shapes, each tied tensor once) and persistent buffers as a
    Hugging Face sharded safetensors checkpoint (+ ``config.json`` and ``generation_config.json`` when the module
    has them, as ``save_pretrained`` writes them).

    A collective under ZeRO-3 (every rank calls it): parameters are gathered one at a time and rank 0
    holds at most one shard (``max_shard_bytes``) beyond its partitions. -> the shard paths (rank 0).
    A failure on any rank (on rank 0 a file where the folder goes, a full disk; on any rank listing the tensors,
    or releasing a gathered one) is raised on every rank, on that rank as it is and on the others as a
    RuntimeError naming the folder, the rank and its reason: the rank keeps its error and goes on through the
    gathers until the ranks agree, before the first gather, after each full shard is written, and at the end.
    A gather that fails inside its own collective leaves the others in it (the process group's timeout).

    Saved whole: rank 0 writes into ``.tmp-<name>`` beside ``directory``, the folder's other files hard-linked
    in, and swaps it in (``vlscale.engine.checkpoint._replace_dir``, flushed to disk first). A save that fails or
    dies leaves the previous one as it was. What a loader would read instead of the new weights, or with them,
    never remains (:data:`_SAVED_FILE`): the shards of an older save with another shard count (or its
    ``model.safetensors``), weights in another format (``pytorch_model*.bin``, ``tf_model.h5``,
    ``flax_model.msgpack``, their indexes: an older model's, which transformers reads with
    ``use_safetensors=False`` and other tools first), and a ``generation_config.json`` that is not the module's
    (``from_pretrained`` decodes with it, whatever config.json says).
    """
    from vlscale.engine.checkpoint import _replace_dir, _restore_replaced, _Writes

    if rank is None:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    d = Path(os.path.abspath(directory))
    tmp = d.with_name(f".tmp-{d.name}")
    writes = _Writes(d)  # a rank's first failure, raised on every rank where they agree
    with writes:
        tensors = _saved_tensors(module)
    if rank == 0:
        with writes:
            if d.exists() and not d.is_dir():
                raise NotADirectoryError(f"{d} is a file: save_sharded_safetensors writes a folder there")
            _restore_replaced(d)  # a save that died between its two renames: the previous folder back first
            if tmp.exists():  # what a save that died left
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
    _raise_failure(writes)
    try:
        written, total = _write_shards(tensors, tmp, max_shard_bytes, rank, writes)
        names = []
        if rank == 0 and writes.error is None:
            with writes:
                names = _name_shards(module, tmp, written, total)
                for p in d.iterdir() if d.is_dir() else []:  # the user's files, kept
                    if not _SAVED_FILE.fullmatch(p.name):
                        if p.is_dir() and not p.is_symlink():
                            shutil.copytree(p, tmp / p.name, symlinks=True, copy_function=_link)
                        else:
                            _link(p, tmp / p.name)
                _replace_dir(tmp, d)
        _raise_failure(writes)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            _restore_replaced(d)  # failed between the renames: the previous folder back in place
        raise
    return [str(d / name) for name in names]


def _raise_failure(writes) -> None:
    """Collective: the ranks' kept failures (``writes``, a ``vlscale.engine.checkpoint._Writes`` of the folder being
    saved) raised on every rank; nothing when there is none."""
    reason = writes.agree()
    if reason is None:
        return
    if writes.error is not None:
        raise writes.error
    raise RuntimeError(f"save_sharded_safetensors: could not save {writes.folder} ({reason}); nothing was saved")


def _saved_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """What :func:`save_sharded_safetensors` writes, in order: the parameters (each tied tensor once), then the
    persistent buffers."""
    seen = set()
    tensors = [(n, p) for n, p in module.named_parameters() if not (id(p) in seen or seen.add(id(p)))]
    persistent = {n for n, _ in module.state_dict(keep_vars=True).items()}
    return tensors + [(n, b) for n, b in module.named_buffers() if b is not None and n in persistent]


def _write_shards(tensors: list[tuple[str, torch.Tensor]], tmp: Path, max_shard_bytes: int, rank: int,
                  writes) -> tuple[list[tuple[Path, list[str]]], int]:
    """The collective part of :func:`save_sharded_safetensors`: the shards written into ``tmp`` by rank 0. Every
    rank keeps a failure in ``writes`` and goes on through the gathers; they agree after each full shard.
    -> [(temporary shard path, its tensors' names)] (rank 0), the bytes of all tensors."""
    import deepspeed
    from vlscale.files import save_safetensors

    shard: dict[str, torch.Tensor] = {}
    written: list[tuple[Path, list[str]]] = []
    size = total = 0

    def flush():
        nonlocal shard, size
        if rank == 0 and shard and writes.error is None:
            with writes:
                path = tmp / f".shard-{len(written):05d}.safetensors"
                save_safetensors(shard, path, metadata={"format": "pt"})
                written.append((path, list(shard)))
        shard, size = {}, 0

    for name, t in tensors:
        partitioned = hasattr(t, "ds_id")
        nbytes = math.prod(t.ds_shape if partitioned else t.shape) * t.element_size()
        size += nbytes  # the full tensor's, on every rank whatever failed: they flush and agree together
        total += nbytes
        with writes, (deepspeed.zero.GatheredParameters([t], modifier_rank=None) if partitioned
                      else contextlib.nullcontext()):
            if rank == 0 and writes.error is None:
                shard[name] = t.detach().to("cpu", copy=True).contiguous()
        if size >= max_shard_bytes:
            flush()
            _raise_failure(writes)
    flush()
    return written, total


def _name_shards(module: torch.nn.Module, tmp: Path, written: list[tuple[Path, list[str]]], total: int) -> list[str]:
    """Rank 0's end of :func:`save_sharded_safetensors`: the shards renamed, their index and the configs written
    into ``tmp``. -> the shards' file names."""
    n = len(written)
    names, weight_map = [], {}
    for i, (path, keys) in enumerate(written, 1):
        name = SINGLE_FILE if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        os.replace(path, tmp / name)
        names.append(name)
        weight_map.update({k: name for k in keys})
    if n > 1:
        (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2) + "\n")
    for config in (getattr(module, "config", None), getattr(module, "generation_config", None)):
        if config is not None and hasattr(config, "save_pretrained"):
            config.save_pretrained(str(tmp))
    return names


def _link(src, dst) -> None:
    """``src`` hard-linked at ``dst`` (a symbolic link as such), copied where the filesystem has no hard links."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


# ----------------------------------------------------------------------------- construction

@contextlib.contextmanager
def gathered_hf_init():
    """While active, transformers' ``post_init`` weight initialisation of models built under
    ``zero.Init`` runs on each module's parameters gathered, in the order of a whole build, on every
    rank (rank 0's values are kept): the result equals a whole build's values for the same seed."""
    import deepspeed
    from transformers.modeling_utils import PreTrainedModel

    original = PreTrainedModel.initialize_weights
    # transformers 5 passes is_custom_code to _initialize_weights, 4.x only the module
    two_args = len(inspect.signature(PreTrainedModel._initialize_weights).parameters) > 2

    @torch.no_grad()
    def initialize_weights(self):
        custom = self.is_custom_code() if hasattr(self, "is_custom_code") else False

        def visit(mod, fn):  # transformers' smart_apply: children first, sub-models with their own fn
            for child in mod.children():
                visit(child, child._initialize_weights if isinstance(child, PreTrainedModel) else fn)
            params = list(mod.parameters(recurse=False))
            for child in mod.children():  # _init_weights also touches direct children's parameters
                if not isinstance(child, PreTrainedModel):
                    params += list(child.parameters(recurse=False))
            params = [p for p in dict.fromkeys(params) if hasattr(p, "ds_id")]
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0, enabled=bool(params)):
                fn(mod, custom) if two_args else fn(mod)

        visit(self, self._initialize_weights)

    PreTrainedModel.initialize_weights = initialize_weights
    try:
        yield
    finally:
        PreTrainedModel.initialize_weights = original


def _no_init():
    """transformers' context that skips weight initialisation."""
    from transformers.initialization import no_init_weights

    return no_init_weights()


def pretrained_config(name: str, source: str, overrides: Optional[dict] = None):
    """The HF config of a local checkpoint directory (what ``from_pretrained`` would use), checked
    against the registry's model type."""
    from transformers import AutoConfig

    from vlscale.modeling.backbones import lm_config

    if not Path(source).is_dir():
        raise ShardedLoadError(
            f"model.backbone_path={source!r} is not a local directory; under ZeRO-3 the weights load rank by rank "
            f"from a local Hugging Face folder with safetensors (download it once, e.g. `hf download "
            f"{name} --local-dir DIR`, and set model.backbone_path=DIR)")
    config = AutoConfig.from_pretrained(source, **(overrides or {}))
    expected = lm_config(name).model_type
    if config.model_type != expected:
        raise ShardedLoadError(f"{Path(source) / 'config.json'}: model_type={config.model_type!r}, but "
                               f"model.backbone={name!r} is a {expected!r} model")
    return config


def checkpoint_generation_config(source: str):
    """The generation defaults ``from_pretrained`` gives a model of the local folder ``source``: its
    ``generation_config.json``, else the generation keys of its ``config.json`` (BART's
    ``no_repeat_ngram_size=3``, ``early_stopping``, ``forced_bos_token_id``, ...), which the config object
    no longer carries. A model built from its config (under ``zero.Init``) would otherwise decode without
    them, unlike the same checkpoint built whole (``launchers/evaluate.py`` without ``--deepspeed``)."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(source)
    except OSError:  # no generation_config.json: as transformers' from_pretrained falls back
        return GenerationConfig.from_pretrained(source, config_file_name="config.json", _from_model_config=True)


def build_lm_zero3(name: str, *, ds_config: dict, path: Optional[str] = None, pretrained: bool = False,
                   dtype: torch.dtype = torch.float32, config_overrides: Optional[dict] = None,
                   reports: Optional[list] = None):
    """``vlscale.modeling.backbones.build_lm`` under ZeRO-3: partitioned at construction; random
    weights equal to a whole build's, pretrained ones read partition by partition. ``reports``
    receives the :class:`LoadReport` of a pretrained load."""
    import deepspeed

    from vlscale.modeling.backbones import head_of_its_own, lm_class, lm_config, pretrained_source

    _check_dtype(ds_config, dtype)
    # dtype=None: zero.Init takes it from the config (an explicit dtype is ignored on accelerators
    # without fp16, DeepSpeed's CPU one included, which then partitions in bf16 whatever was asked)
    if pretrained:
        source = pretrained_source(name, path)  # as build_lm checks it: not "download {name} from the hub"
        config = pretrained_config(name, source, config_overrides)
        with _no_init(), deepspeed.zero.Init(config_dict_or_path=ds_config):
            lm = lm_class(config, own_head=head_of_its_own(source))(config)  # untied as from_pretrained unties it
        lm.tie_weights()  # skipped with the initialisation; the load fills the shared tensor once
        lm.generation_config = checkpoint_generation_config(source)
        report = load_sharded_safetensors(lm, source)
        if reports is not None:
            reports.append(report)
        return lm
    config = lm_config(name, **(config_overrides or {}))
    with gathered_hf_init(), deepspeed.zero.Init(config_dict_or_path=ds_config):
        lm = lm_class(config)(config)
    return lm


def _check_dtype(ds_config: dict, dtype: torch.dtype) -> None:
    enabled = {name: bool((ds_config.get(name) or {}).get("enabled")) for name in ("bf16", "fp16")}
    expected = torch.bfloat16 if enabled["bf16"] else torch.float16 if enabled["fp16"] else torch.float32
    if dtype != expected:
        raise ValueError(f"dtype={dtype} disagrees with the DeepSpeed config (bf16.enabled={enabled['bf16']}, "
                         f"fp16.enabled={enabled['fp16']}: parameters are partitioned in {expected})")


def build_model_zero3(cfg, ds_config: dict, vocab_size: int, dtype: torch.dtype = torch.float32):
    """``build_model`` with the language model built under ``zero.Init`` (see the module docstring).

    -> (model, HfDeepSpeedConfig, LoadReport or None). Keep the ``HfDeepSpeedConfig`` alive as long
    as the model is used (transformers' ZeRO-3 awareness: embedding resizing, generation). Needs an
    initialised process group and ``zero_optimization.stage == 3``.
    """
    import torch.distributed as dist
    from transformers.integrations import HfDeepSpeedConfig

    from vlscale.modeling import vl_model

    stage = int((ds_config.get("zero_optimization") or {}).get("stage", 0))
    if stage != 3:
        raise ValueError(f"build_model_zero3 needs zero_optimization.stage=3, the DeepSpeed config has {stage}")
    if not dist.is_initialized():
        raise RuntimeError("build_model_zero3 needs an initialised process group (vlscale.engine.distributed."
                           "init_distributed)")
    hf_ds = HfDeepSpeedConfig(ds_config)
    reports: list = []

    def zero3_build_lm(name, **kwargs):
        kwargs.pop("device", None)
        return build_lm_zero3(name, ds_config=ds_config, reports=reports, **kwargs)

    model = vl_model.build_model(cfg, vocab_size=vocab_size, device="cpu", dtype=dtype, lm_builder=zero3_build_lm)
    from deepspeed.accelerator import get_accelerator

    move_buffers(model, torch.device(get_accelerator().current_device_name()))
    mark_zero3_leaf_layers(model, cfg)
    return model, hf_ds, (reports[0] if reports else None)


def move_buffers(model: torch.nn.Module, device: torch.device) -> list[str]:
    """Move every buffer not on ``device`` there, in place (parameters are left to DeepSpeed). ZeRO-3's
    engine does not move a model holding ``zero.Init`` parameters (``DeepSpeedEngine``:
    ``is_zero_init_model``), so buffers of the modules built outside ``zero.Init`` would stay on the
    host: on a GPU, a ResNet CLIP's BatchNorm failed at the first step ("running_mean is on cpu").
    -> the names moved."""
    moved = []
    for mod_name, mod in model.named_modules():
        for name, buf in mod._buffers.items():
            if buf is not None and buf.device != device:
                mod._buffers[name] = buf.to(device)
                moved.append(f"{mod_name}.{name}" if mod_name else name)
    return moved


def mark_zero3_leaf_layers(model: torch.nn.Module, cfg=None) -> list[str]:
    """Make each transformer layer of the LM one ZeRO-3 unit (DeepSpeed's ``set_z3_leaf_modules``): its
    frozen weights and norms are gathered once when the layer starts and released when it ends, instead
    of every linear and norm paying its own gather and release hooks. The PEFT modules live outside the
    LM (``VLModel.peft``, called from hooks) and keep their own.
    The layers are the LM's ``_no_split_modules`` (transformers' own unit, e.g. ``T5Block``,
    ``BartEncoderLayer``); the gathered working set is one layer, as with DeepSpeed's prefetching.
    Speed: ``benchmarks/zero3_leaf.py`` (BENCHMARKS.md). Nothing when ``cfg.train.zero3_leaf_layers``
    is off. -> the marked class names."""
    from deepspeed.utils import set_z3_leaf_modules

    if cfg is not None and not cfg.train.zero3_leaf_layers:
        return []

    lm = model.lm if hasattr(model, "lm") else model
    classes = sorted(getattr(lm, "_no_split_modules", None) or [])
    if classes:
        set_z3_leaf_modules(lm, classes)
    return classes


def gather_full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full-shape CPU copies of every parameter and buffer (a collective under ZeRO-3: call on every
    rank). Parameters are gathered one at a time; for tests and small models."""
    import deepspeed

    out = {}
    for name, p in module.named_parameters():
        if hasattr(p, "ds_id"):
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                out[name] = p.data.detach().cpu().clone()
        else:
            out[name] = p.detach().cpu().clone()
    for name, b in module.named_buffers():
        out[name] = b.detach().cpu().clone()
    return out
