"""Reading the next batches' images in threads while the current batch trains (or is evaluated).

Decoding a photograph-sized JPEG and resizing it to a CLIP's input costs ~5 ms on one core: a micro-batch of 16
read in the training thread is ~80 ms in which the accelerator waits. :class:`ReadAhead` runs that work for the
batches to come in a few threads (decoding and resizing release the GIL) and hands each result out when its batch's
turn comes, in order, so batches are the same as read in the training thread. Only the visual inputs are read ahead:
the text is tokenised in the training thread (a fast tokenizer used from two threads at once can fail). An error
reading a batch ahead is raised when that batch is asked for, as a read in order would raise it; a batch read ahead
and never asked for (a jump: a resume, the run's end) is dropped with its error.
"""

from __future__ import annotations

import itertools
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Hashable, Iterable, Optional


def default_threads(device_type: Optional[str] = None) -> int:
    """Threads reading ahead when ``data.read_ahead_threads`` is unset, for a process on ``device_type`` (default:
    :func:`~vlscale.engine.distributed.local_device_type`). On a GPU: this rank's share of the CPUs it may use
    (:func:`~vlscale.engine.distributed.usable_cpu_count` over the ranks started on this machine), at least 1, at
    most 4 (8 ranks on 16 cores: 2 threads each). On the CPU none: the ranks' compute keeps the cores busy, and a
    thread beside it slowed the embedded default's step by 2-5 % (BENCHMARKS.md, "Training on images: reading
    ahead")."""
    from vlscale.engine.distributed import local_device_type, local_world_size, usable_cpu_count

    if (device_type or local_device_type()) == "cpu":
        return 0
    return max(1, min(4, usable_cpu_count() // local_world_size()))


def read_ahead_threads(cfg, sources) -> int:
    """The threads a loader over ``sources`` reads ahead in: ``data.read_ahead_threads`` (unset:
    :func:`default_threads`), 0 where none of ``sources`` gives images to decode."""
    if not any(s.kind == "images" for s in sources):
        return 0
    n = cfg.data.read_ahead_threads
    return default_threads() if n is None else n


class ReadAhead:
    """``get(key, work, upcoming)`` -> ``work()``, computed ahead in a thread when it was started by an earlier
    call's ``upcoming``; then the first ``ahead`` (default ``threads``) of ``upcoming()`` ((key, work) pairs of the
    items after this one) are started. ``threads=0``: every ``work()`` runs in the calling thread, nothing ahead."""

    def __init__(self, threads: int, name: str = "vlscale-read-ahead", ahead: Optional[int] = None):
        if threads < 0:
            raise ValueError(f"ReadAhead: threads={threads} must be >= 0")
        self.threads = threads
        self.ahead = threads if ahead is None else ahead
        self._pool: Optional[ThreadPoolExecutor] = ThreadPoolExecutor(threads, thread_name_prefix=name) \
            if threads else None
        self._pending: dict[Hashable, Future] = {}

    def get(self, key: Hashable, work: Callable, upcoming: Callable[[], Iterable[tuple[Hashable, Callable]]]):
        if self._pool is None:
            return work()
        future = self._pending.pop(key, None)
        ahead = list(itertools.islice(upcoming(), self.ahead))
        wanted = {k for k, _ in ahead}
        for k in [k for k in self._pending if k not in wanted]:  # read ahead for a batch no longer coming
            self._pending.pop(k).cancel()
        for k, w in ahead:
            if k not in self._pending:
                self._pending[k] = self._pool.submit(w)
        return work() if future is None else future.result()

    def close(self) -> None:
        """Drop what is read ahead and stop the threads (a read under way finishes in its thread)."""
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
