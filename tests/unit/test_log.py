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
