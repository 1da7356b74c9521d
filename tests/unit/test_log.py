"""vlscale.log: the launchers' console logging prints a record once per run, not once per rank."""

from __future__ import annotations

import io
import logging

from vlscale.log import ALL_RANKS, console_logging, logs_to_console

log = logging.getLogger("vlscale.data.example")  # a module's logger under vlscale's


def _printed(rank: int, world_size: int) -> list[str]:
    stream = io.StringIO()
    with console_logging(rank, world_size, stream=stream):
        log.info("loaded 12 examples")
        log.warning("skipped 1 malformed record")
        log.warning("2 inputs in a batch are cut", extra=ALL_RANKS)
        log.debug("not shown")
    return stream.getvalue().splitlines()


def test_one_process_prints_info_and_warnings_without_a_rank():
    assert _printed(0, 1) == ["vlscale: loaded 12 examples", "vlscale: warning: skipped 1 malformed record",
                              "vlscale: warning: 2 inputs in a batch are cut"]


def test_rank_0_of_two_prints_the_run_s_records_and_names_itself_on_its_own():
    assert _printed(0, 2) == ["vlscale: loaded 12 examples", "vlscale: warning: skipped 1 malformed record",
                              "vlscale: rank 0: warning: 2 inputs in a batch are cut"]


def test_other_ranks_print_only_their_own_records():
    assert _printed(1, 2) == ["vlscale: rank 1: warning: 2 inputs in a batch are cut"]


def test_rank_and_world_size_come_from_the_launcher_s_environment(monkeypatch, capsys):
    """... as it is when a record comes: DeepSpeed's MPI / SLURM discovery sets RANK and WORLD_SIZE while
    the process group starts, after a launcher's main began."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)

    @logs_to_console
    def main(argv=None) -> int:
        log.warning("before the process group")
        monkeypatch.setenv("RANK", "3")
        monkeypatch.setenv("WORLD_SIZE", "4")
        log.warning("every rank says this")
        log.warning("only this rank has this", extra=ALL_RANKS)
        return 7

    assert main() == 7
    assert capsys.readouterr().err.splitlines() == ["vlscale: warning: before the process group",
                                                    "vlscale: rank 3: warning: only this rank has this"]


def test_the_logger_is_restored_afterwards(caplog):
    logger = logging.getLogger("vlscale")
    before = (list(logger.handlers), logger.level, logger.propagate)
    _printed(0, 1)
    assert (list(logger.handlers), logger.level, logger.propagate) == before
    with caplog.at_level(logging.WARNING, logger="vlscale"):
        log.warning("seen by the root's handlers again")
    assert "seen by the root's handlers again" in caplog.text


def test_every_launchers_main_prints_vlscales_messages():
    """Each launcher's ``main`` runs under :func:`logs_to_console` (its wrapper keeps ``__wrapped__``): a helper
    function defined between the decorator and ``main`` took it from extract_features.py's main, whose vlscale
    messages then went to logging's last resort (no ``vlscale:`` prefix, INFO dropped)."""
    import importlib.util
    from pathlib import Path

    launchers = sorted((Path(__file__).resolve().parents[2] / "launchers").glob("*.py"))
    assert len(launchers) >= 7
    for path in launchers:
        spec = importlib.util.spec_from_file_location(f"_launcher_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert hasattr(module.main, "__wrapped__"), f"{path.name}: main is not under @logs_to_console"


def test_one_process_without_launcher_variables_names_no_rank(monkeypatch):
    """No RANK / WORLD_SIZE (``python launchers/train.py``): one process, whose own records carry no rank."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    stream = io.StringIO()
    with console_logging(stream=stream):
        log.warning("2 inputs in a batch are cut", extra=ALL_RANKS)
    assert stream.getvalue().splitlines() == ["vlscale: warning: 2 inputs in a batch are cut"]


def test_debug_level_prints_debug_records_naming_their_level():
    stream = io.StringIO()
    with console_logging(0, 1, level=logging.DEBUG, stream=stream):
        log.debug("batch of 4")
        log.info("loaded 12 examples")
    assert stream.getvalue().splitlines() == ["vlscale: debug: batch of 4", "vlscale: loaded 12 examples"]


class _Kept(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_an_embedders_level_and_handler_are_kept_and_restored():
    """Whoever embeds vlscale set its logger to DEBUG with a handler of their own: under console_logging
    their handler still gets the debug records (the level is not raised to the console's) while the console
    prints INFO and above; at the end the logger's level is theirs again, also one above the console's."""
    logger = logging.getLogger("vlscale")
    kept, saved = _Kept(), logger.level
    logger.addHandler(kept)
    try:
        logger.setLevel(logging.DEBUG)
        stream = io.StringIO()
        with console_logging(0, 1, stream=stream):
            log.debug("batch of 4")
            log.info("loaded 12 examples")
        assert kept.messages == ["batch of 4", "loaded 12 examples"]
        assert stream.getvalue().splitlines() == ["vlscale: loaded 12 examples"]
        assert logger.level == logging.DEBUG
        logger.setLevel(logging.ERROR)  # raised to the console's for the run only
        stream = io.StringIO()
        with console_logging(0, 1, stream=stream):
            log.info("loaded 12 examples")
        assert stream.getvalue() == "vlscale: loaded 12 examples\n" and logger.level == logging.ERROR
    finally:
        logger.removeHandler(kept)
        logger.setLevel(saved)


def test_a_record_is_printed_once_not_again_by_the_roots_handlers(caplog):
    stream = io.StringIO()
    with caplog.at_level(logging.INFO):
        with console_logging(0, 1, stream=stream):
            log.warning("skipped 1 malformed record")
    assert stream.getvalue() == "vlscale: warning: skipped 1 malformed record\n"
    assert "skipped 1 malformed record" not in caplog.text


def test_the_console_handlers_own_filters_apply():
    stream = io.StringIO()
    with console_logging(0, 1, stream=stream) as handler:
        handler.addFilter(lambda record: "noisy" not in record.getMessage())
        log.info("noisy detail")
        log.info("loaded 12 examples")
    assert stream.getvalue() == "vlscale: loaded 12 examples\n"


def test_a_record_that_cannot_be_formatted_is_reported_and_the_next_ones_print(capsys):
    stream = io.StringIO()
    with console_logging(0, 1, stream=stream):
        log.info("%d examples", "twelve")
        log.info("loaded 12 examples")
    assert stream.getvalue() == "vlscale: loaded 12 examples\n"
    assert "--- Logging error ---" in capsys.readouterr().err


def test_a_record_during_a_progress_bar_on_the_same_stream_prints_on_a_line_of_its_own():
    """The training loop's bar and vlscale's records share stderr: a record clears the bar, prints its line and the
    bar is drawn again below it. Written straight to the stream, the line would follow the bar's text on the bar's
    line ("train:  0%|...| 0/3 [...]vlscale: ...") and the next redraw would overwrite it."""
    from tqdm import tqdm

    stream = io.StringIO()
    with console_logging(0, 1, stream=stream):
        bar = tqdm(total=3, desc="train", file=stream, ascii=True)
        log.warning("2 inputs in a batch are cut")
        bar.update(1)
        bar.close()
    lines = stream.getvalue().split("\n")
    said = [line for line in lines if "inputs in a batch" in line]
    assert len(said) == 1 and said[0].split("\r")[-1] == "vlscale: warning: 2 inputs in a batch are cut"
    assert "1/3" in lines[lines.index(said[0]) + 1]  # the bar is drawn again under it


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_progress_bar_in_a_log_file_writes_whole_lines_at_most_once_an_interval(monkeypatch):
    """sbatch's log, nohup, ``> log 2>&1``: the bar was one line of a carriage-return fragment per step (a 100-step
    run: 241 fragments, an 11,499-character line). It writes its first state, one line per interval and its last
    state, without carriage returns or the cursor moves of a bar nested under another; on a terminal tqdm draws it."""
    from vlscale import log as vlog

    now = [0.0]
    monkeypatch.setattr(vlog.time, "monotonic", lambda: now[0])
    stream = io.StringIO()
    train = vlog.progress_bar(stream=stream, total=300, desc="train", dynamic_ncols=True)  # a line a minute
    for step in range(1, 301):
        now[0] = step * 0.5  # a step each 0.5 s: 150 s in all
        train.update(1)
        train.set_postfix(loss=f"{1 / step:.4f}")
        if step == 100:
            evaluation = vlog.progress_bar(stream=stream, total=2, desc="eval vqa/val", leave=False,
                                           mininterval=0)  # tqdm redraws at each batch, as on a slow evaluation
            evaluation.update(1)
            evaluation.update(1)
            evaluation.close()
    train.close()
    lines = stream.getvalue().split("\n")
    assert "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue() and lines[-1] == ""
    assert [line.split("|")[0] for line in lines[:-1]] == ["train:   0%", "eval vqa/val:   0%", "eval vqa/val: 100%",
                                                           "train:  40%", "train:  80%", "train: 100%"]
    assert "| 300/300 [" in lines[-2] and lines[-2].endswith(", loss=0.0033]")  # the last step's postfix
    utf8 = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")  # a log file: its bar drawn as on a terminal
    bar = vlog.progress_bar(stream=utf8, total=2, desc="train")
    bar.update(2)
    bar.close()
    assert "|██████████| 2/2 [" in utf8.buffer.getvalue().decode()
    terminal = _Terminal()
    bar = vlog.progress_bar(stream=terminal, total=3, desc="train")
    bar.update(3)
    bar.close()
    assert terminal.getvalue().startswith("\rtrain:   0%")


def test_a_progress_bar_in_a_jupyter_kernel_is_tqdm_auto_s(monkeypatch):
    """A notebook's stderr is no terminal, but tqdm.auto draws its widget there (extract_features from Python kept
    it): the log-file lines are for a process's own stderr, not a kernel's."""
    import sys

    from vlscale import log as vlog

    made = []
    monkeypatch.setattr("tqdm.auto.tqdm", lambda **kw: made.append(kw) or "widget")
    monkeypatch.setitem(sys.modules, "ipykernel", object())
    assert vlog.progress_bar(total=3, desc="features") == "widget" and made == [{"total": 3, "desc": "features"}]
    assert not isinstance(vlog.progress_bar(io.StringIO(), total=3, disable=True), str)  # a stream given: drawn on
    monkeypatch.delitem(sys.modules, "ipykernel")
    assert not isinstance(vlog.progress_bar(total=3, desc="features", disable=True), str)  # tqdm's own


def test_a_schedulers_stop_signals_are_ctrl_c_inside_interruptible_and_their_handlers_come_back():
    """SIGTERM and SLURM's SIGUSR1 warning (whose default action ended train.py's start-up and replicate.py at once,
    silently) raise KeyboardInterrupt saying which signal; release (a launcher's cleanup) gives the handlers back."""
    import signal

    import pytest

    from vlscale.log import Interrupted, interruptible

    def unhandled(signum, frame):  # a signal interruptible does not take fails the test, not ends pytest
        raise AssertionError(f"{signal.Signals(signum).name} was not taken by interruptible")

    original = {sig: signal.signal(sig, unhandled) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        for sig in original:
            with interruptible() as release:
                with pytest.raises(Interrupted) as stopped:
                    signal.raise_signal(sig)
                assert isinstance(stopped.value, KeyboardInterrupt) and stopped.value.signum == sig
                release()
                assert all(signal.getsignal(s) is unhandled for s in original)
            assert all(signal.getsignal(s) is unhandled for s in original)
    finally:
        for sig, handler in original.items():
            signal.signal(sig, handler)
