"""Console logging for the launchers: vlscale's records once per run, not once per rank.

Every rank of a run loads the same config, data and checkpoint, so what one rank has to say about
them (a skipped record, a missing subtitles file, the adapter kernel's dispatch) every rank says
alike. Under :func:`console_logging` rank 0 prints vlscale's INFO and above; the other ranks print
only records marked as their own (``logger.warning(..., extra=ALL_RANKS)``: what depends on the
rank's share of the data, such as a batch's truncated inputs), prefixed with their rank.

Library code only logs (``logging.getLogger(__name__)``); whoever embeds vlscale configures logging
as they like. The launchers call :func:`console_logging` around their work and restore the logger
afterwards (the test suite calls some of them in-process).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
import threading
import time

from tqdm import tqdm

ALL_RANKS = {"all_ranks": True}  # extra= of a record that every rank prints (its content is the rank's own)


class _Handler(logging.StreamHandler):
    """``vlscale: [rank R: ][level: ]message`` through tqdm.write (a line does not break a progress bar
    drawn on the same stream); on ranks other than 0 only :data:`ALL_RANKS` records. Without a given
    rank and world size, RANK / WORLD_SIZE as they are when the record comes (DeepSpeed's MPI and SLURM
    discovery sets them while the process group starts), else 0 / 1."""

    def __init__(self, stream, rank: int | None = None, world_size: int | None = None):
        super().__init__(stream)
        self.given = (rank, world_size)

    def _where(self) -> tuple[int, int]:
        rank, world = self.given
        rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        world = int(os.environ.get("WORLD_SIZE", 1)) if world is None else world
        return rank, world

    def filter(self, record: logging.LogRecord) -> bool:
        return super().filter(record) and (self._where()[0] == 0 or getattr(record, "all_ranks", False))

    def format(self, record: logging.LogRecord) -> str:
        rank, world = self._where()
        who = f"rank {rank}: " if world > 1 and getattr(record, "all_ranks", False) else ""
        level = "" if record.levelno == logging.INFO else record.levelname.lower() + ": "
        return f"vlscale: {who}{level}{record.getMessage()}"

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def console_logging(rank: int | None = None, world_size: int | None = None, level: int = logging.INFO, stream=None):
    """Print the ``vlscale`` logger's records at ``level`` and above on ``stream`` (stderr) for the
    duration, rank 0's all and the other ranks' :data:`ALL_RANKS` ones; the logger is restored after.
    ``rank`` / ``world_size`` default to the launcher's RANK / WORLD_SIZE (read at each record)."""
    logger = logging.getLogger("vlscale")
    handler = _Handler(stream or sys.stderr, rank, world_size)
    handler.setLevel(level)
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(min(level, logger.getEffectiveLevel()))
    logger.propagate = False  # not again through a root handler (or logging's last resort)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


PROGRESS_LINE_S = 60.0
"""Where stderr is no terminal, a progress bar prints its state as a line at most this often (and when it ends)."""


class _BarLines:
    """A tqdm bar's file for a stream that is no terminal (a job's log file, a pipe): each redraw (``\r`` + state)
    is kept, not written, and the latest state goes out as one line when ``interval_s`` has passed since the last
    (the first at once) and when the bar closes (tqdm's ``\n``). Written as it was, a run's log held one line of
    a carriage-return fragment per step."""

    def __init__(self, stream, interval_s: float):
        self.stream, self.interval_s = stream, interval_s
        self.encoding = getattr(stream, "encoding", None)  # tqdm draws its unicode bar where the stream takes it
        self.state, self.written_at = "", None

    def write(self, text: str) -> None:
        self.state = next((s.strip() for s in reversed(text.split("\r")) if s.strip()), self.state)
        now = time.monotonic()
        if self.state and ("\n" in text or self.written_at is None or now - self.written_at >= self.interval_s):
            self.stream.write(self.state + "\n")
            self.stream.flush()
            self.state, self.written_at = "", now

    def flush(self) -> None:
        pass


def progress_bar(stream=None, interval_s: float = PROGRESS_LINE_S, **kwargs):
    """A tqdm bar on ``stream`` (stderr): on a terminal as tqdm draws it; elsewhere (sbatch's log file, nohup,
    ``> log 2>&1``) as a line at its start, every ``interval_s`` seconds and at its end (:class:`_BarLines`; a
    bar that would clear itself on a terminal, ``leave=False``, leaves its last line). In a Jupyter kernel (no
    ``stream`` given) tqdm.auto's widget."""
    if stream is None and "ipykernel" in sys.modules:
        from tqdm.auto import tqdm as auto

        return auto(**kwargs)
    stream = stream or sys.stderr
    isatty = getattr(stream, "isatty", None)
    if not kwargs.get("disable") and not (isatty and isatty()):
        stream, kwargs["leave"], kwargs["position"] = _BarLines(stream, interval_s), True, 0  # 0: no cursor moves
    return tqdm(file=stream, **kwargs)


class Interrupted(KeyboardInterrupt):
    """A SIGTERM (or another of :func:`interruptible`'s signals) raised as Ctrl-C's KeyboardInterrupt; ``signum`` says
    which signal."""

    def __init__(self, signum: int):
        super().__init__()
        self.signum = signum


def _interrupt(signum, frame):
    raise Interrupted(signum)


@contextlib.contextmanager
def interruptible(signals=(signal.SIGTERM, signal.SIGUSR1)):
    """``signals`` (a scheduler's stop signals: SIGTERM, and SLURM's ``--signal=USR1`` warning before the time limit,
    whose default action ended the process at once) raise KeyboardInterrupt (:class:`Interrupted`) here, as Ctrl-C
    does (in the main thread; elsewhere nothing changes). Yields a function that gives them their previous handlers
    back before the block ends (a launcher's cleanup, once its outcome is said: the signal ends the process there,
    with no traceback)."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, _interrupt) for sig in signals}

    def release():
        while previous:
            signal.signal(*previous.popitem())

    try:
        yield release
    finally:
        release()


def logs_to_console(main):
    """A launcher's ``main`` under :func:`console_logging` (the launcher's rank and world size)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        with console_logging():
            return main(*args, **kwargs)

    return wrapper
