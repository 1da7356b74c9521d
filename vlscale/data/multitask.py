"""Multitask sampling: one task per optimizer step, the same on every rank, drawn globally.

Each step draws ONE task, independently of the other steps (``proportional``: p_t ∝ n_t, the
reference's round-robin in expectation; ``temperature``: p_t ∝ n_t^(1/T)) and ``global_batch_size``
example indices of that task. The reference gives each task exactly its batches per epoch; here the
epochs a task has seen by step i vary around i x global_batch_size x p_t / n_t.
Indices come from a per-task stream of epoch-wise permutations (no replacement within an epoch, a
fresh shuffle each epoch), consumed in order by the steps that drew the task. The
whole sequence is a pure function of ``(task_sizes, global_batch_size, seed, sampling,
temperature)``: every rank computes the same step (ZeRO-3 needs the same modules on every rank)
and :func:`shard` hands each rank its part, so the global batch does not depend on the world
size, and resuming needs only the step number.

A step that reaches the end of a task's epoch takes the rest of that epoch and the start of the
next, so it can hold an example twice; a task with fewer examples than the global batch always
does (its batches cycle through it, logged once when the sampler is built).

    sampler = MultitaskSampler({"vqa": 600, "gqa": 600}, global_batch_size=32, seed=0)
    task, indices = sampler.step(i)                   # 32 indices into task's examples
    micro = shard(indices, rank, world_size, micro=8, accum=2)  # this rank's 2 micro-batches of 8
"""

from __future__ import annotations

import logging
import zlib

import numpy as np

logger = logging.getLogger(__name__)

_CHUNK = 4096  # task draws are generated in chunks of this many steps


def task_probabilities(task_sizes: dict[str, int], sampling: str = "proportional",
                       temperature: float = 1.0) -> dict[str, float]:
    if sampling not in ("proportional", "temperature"):
        raise ValueError(f"sampling={sampling!r}; choose 'proportional' or 'temperature'")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    w = np.array([float(n) for n in task_sizes.values()])
    if sampling == "temperature":  # n^(1/T) in log space: a small T would overflow to inf (and NaN)
        logw = np.log(w) / temperature
        w = np.exp(logw - logw.max())
    return dict(zip(task_sizes, (w / w.sum()).tolist()))


class MultitaskSampler:
    """An infinite, deterministic sequence of ``(task, global batch indices)`` steps."""

    def __init__(self, task_sizes: dict[str, int], global_batch_size: int, seed: int = 0,
                 sampling: str = "proportional", temperature: float = 1.0):
        if not task_sizes:
            raise ValueError("MultitaskSampler: no tasks")
        for t, n in task_sizes.items():
            if int(n) <= 0:
                raise ValueError(f"MultitaskSampler: task {t!r} has {n} examples; every task needs at least one")
        if global_batch_size <= 0:
            raise ValueError(f"MultitaskSampler: global_batch_size={global_batch_size} must be > 0")
        self.task_sizes = {t: int(n) for t, n in task_sizes.items()}
        self.tasks = list(self.task_sizes)
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self.sampling, self.temperature = sampling, float(temperature)
        self.probs = task_probabilities(self.task_sizes, sampling, temperature)
        self._cum = np.cumsum([self.probs[t] for t in self.tasks])
        self._cum[-1] = 1.0
        self._draws = np.zeros(0, dtype=np.int64)  # task index of each step generated so far
        self._chunk_totals = [np.zeros(len(self.tasks), dtype=np.int64)]  # draws per task before each chunk
        self._perms: dict = {}
        self.position = 0  # next step for iteration / state_dict
        small = {t: n for t, n in self.task_sizes.items() if n < self.global_batch_size}
        if small:
            logger.warning(f"MultitaskSampler: task(s) {small} have fewer training examples than the global batch "
                           f"of {self.global_batch_size}; each of their steps repeats examples within the batch")

    # ------------------------------------------------------------------ task draws
    def _extend(self, upto: int) -> None:
        while len(self._draws) <= upto:
            c = len(self._draws) // _CHUNK
            u = np.random.default_rng([self.seed, 0x7A5C, c]).random(_CHUNK)
            draws = np.searchsorted(self._cum, u, side="right").clip(max=len(self.tasks) - 1)
            self._draws = np.concatenate([self._draws, draws])
            self._chunk_totals.append(self._chunk_totals[-1] + np.bincount(draws, minlength=len(self.tasks)))

    def _before(self, i: int) -> np.ndarray:
        """How many times each task was drawn in steps 0 .. i-1."""
        c = i // _CHUNK
        chunk = self._draws[c * _CHUNK:i]
        return self._chunk_totals[c] + np.bincount(chunk, minlength=len(self.tasks))

    # ------------------------------------------------------------------ indices
    def _perm(self, task: str, epoch: int) -> np.ndarray:
        key = (task, epoch)
        p = self._perms.get(key)
        if p is None:
            if len(self._perms) > 64:
                self._perms.clear()
            rng = np.random.default_rng([self.seed, zlib.crc32(task.encode()), epoch])
            p = self._perms[key] = rng.permutation(self.task_sizes[task])
        return p

    def _indices(self, task: str, start: int, count: int) -> list[int]:
        n = self.task_sizes[task]
        out = []
        pos = start
        while len(out) < count:
            epoch, offset = divmod(pos, n)
            take = min(count - len(out), n - offset)
            out.extend(self._perm(task, epoch)[offset:offset + take].tolist())
            pos += take
        return out

    def step(self, i: int) -> tuple[str, list[int]]:
        """The task and the ``global_batch_size`` example indices of step ``i`` (0-based)."""
        self._check_step(i)
        self._extend(i)
        t = int(self._draws[i])
        task = self.tasks[t]
        start = int(self._before(i)[t]) * self.global_batch_size
        return task, self._indices(task, start, self.global_batch_size)

    @staticmethod
    def _check_step(i: int) -> None:
        if i < 0:
            raise IndexError(f"step {i} must be >= 0")

    # ------------------------------------------------------------------ iteration / resume
    def __iter__(self):
        return self

    def __next__(self) -> tuple[str, list[int]]:
        out = self.step(self.position)
        self.position += 1
        return out

    def _signature(self) -> dict:
        return {"task_sizes": dict(self.task_sizes), "global_batch_size": self.global_batch_size,
                "seed": self.seed, "sampling": self.sampling, "temperature": self.temperature}

    def state_dict(self) -> dict:
        return dict(self._signature(), position=self.position)

    def load_state_dict(self, state: dict) -> None:
        """Continue at ``state["position"]``; refused when the sequence would differ: another seed, batch or
        sampling (ValueError), or other training data (DataError: a task's size or the tasks' order); a state
        without one of the keys :meth:`state_dict` writes is a DataError naming it."""
        from vlscale.data.real import DataError

        mine = self._signature()
        check_state_keys(state, (*mine, "position"), "MultitaskSampler", "sampler")
        diff = {k: (state[k], v) for k, v in mine.items() if k != "task_sizes" and state[k] != v}
        if diff:
            raise ValueError(f"MultitaskSampler.load_state_dict: the checkpoint's sampler differs "
                             f"(key: (checkpoint, now)) {diff}; resuming would change the data order")
        saved = dict(state["task_sizes"] or {})
        if list(saved.items()) != list(self.task_sizes.items()):  # in order: it decides each step's task
            changed = [f"{t!r} had {saved[t]} examples, now {n}" for t, n in self.task_sizes.items()
                       if t in saved and saved[t] != n]
            if sorted(saved) != sorted(self.task_sizes):
                changed.append(f"the tasks were {list(saved)}, now {self.tasks}")
            elif not changed:
                changed.append(f"the tasks were in the order {list(saved)}, now {self.tasks}")
            raise DataError(f"resume: the training data differ from the checkpoint's: {'; '.join(changed)} "
                            f"(the training files changed, or data.skip_bad_records dropped other records); "
                            f"the steps would draw other examples: restore the checkpoint's training data, "
                            f"or start a new run in another output_dir")
        self.position = int(state["position"])


def check_state_keys(state: dict, keys, owner: str, what: str) -> None:
    """A DataError naming the ``keys`` (those ``owner.state_dict()`` writes and its load reads) that ``state``
    lacks, not a bare KeyError."""
    from vlscale.data.real import DataError

    missing = [k for k in keys if k not in state]
    if missing:
        raise DataError(f"{owner}.load_state_dict: the saved {what} state lacks {missing} (it holds "
                        f"{sorted(state)}); it is not a {owner}.state_dict()")


def shard(indices: list[int], rank: int, world_size: int, micro: int, accum: int = 1) -> list[list[int]]:
    """This rank's ``accum`` micro-batches of ``micro`` indices from a step's global batch.

    Micro-batch ``a`` of rank ``r`` is ``indices[(a * world_size + r) * micro : ... + micro]``,
    so the ranks together hold exactly the global batch (``micro * world_size * accum``).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
    if micro <= 0 or accum <= 0:
        raise ValueError(f"micro={micro} and accum={accum} must be > 0")
    if len(indices) != micro * world_size * accum:
        raise ValueError(f"global batch of {len(indices)} indices != micro {micro} x world_size "
                         f"{world_size} x accum {accum} = {micro * world_size * accum}")
    return [list(indices[(a * world_size + rank) * micro:(a * world_size + rank + 1) * micro])
            for a in range(accum)]

