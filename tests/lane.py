"""The suite's lane: runs queued by the tests' fixtures (tests/integration/conftest.py's cached trainings)
that start one at a time between unit tests, on the cores the background jobs leave idle beside them
(tests/conftest.py calls :meth:`Lane.advance` after each unit test and :meth:`Lane.close` at the first
integration test: what the lane has not started, the tests start when they need it).
"""

from __future__ import annotations

from typing import Callable

CORES = 2  # the machine's, as the suite plans for it (README: 2-core CI machines)


class Lane:
    def __init__(self, busy_elsewhere: Callable[[], int]):
        """``busy_elsewhere()`` -> the cores the background jobs keep busy now (one each)."""
        self.busy_elsewhere = busy_elsewhere
        self.queue: list[tuple[int, Callable[[], bool], Callable]] = []
        self.current: tuple[int, object] | None = None

    def add(self, cores: int, ready: Callable[[], bool], start: Callable) -> None:
        """Queue a run of ``cores`` processes: ``ready()`` -> whether it can start now without waiting,
        ``start()`` -> a Popen-like handle (``poll()``), or None when it was started already."""
        self.queue.append((cores, ready, start))

    def busy(self) -> int:
        """The cores busy beside the test process: the background jobs' and the lane run's."""
        running = self.current is not None and self.current[1].poll() is None
        return self.busy_elsewhere() + (self.current[0] if running else 0)

    def advance(self) -> None:
        """When no lane run is running, start the first queued run that fits (busy cores + its own <= CORES)."""
        if self.current is not None and self.current[1].poll() is None:
            return
        for i, (cores, ready, start) in enumerate(self.queue):
            if self.busy_elsewhere() + cores <= CORES and ready():
                del self.queue[i]
                run = start()
                self.current = None if run is None else (cores, run)
                return

    def drained(self) -> bool:
        """Nothing queued and nothing running."""
        return not self.queue and (self.current is None or self.current[1].poll() is not None)

    def close(self) -> None:
        """Start nothing more (the run in flight goes on)."""
        self.queue.clear()
