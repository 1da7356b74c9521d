"""benchmarks/suite_time.py: the test suite's timeline (tests/conftest.py writes a line per test, tests/preloaded.py
one per forked run: test_preloaded.py) and its summary."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import companion
import pytest

from preloaded import TIMELINE_ENV

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def suite_time(script):
    return script("benchmarks/suite_time.py")


def drive(hook, item):
    """Run a hookwrapper around a 'test' that spins 0.2 s of CPU."""
    gen = hook(item, None)
    next(gen)
    t = time.process_time()
    while time.process_time() - t < 0.2:
        pass
    with pytest.raises(StopIteration):
        gen.send(None)


def test_each_test_of_this_root_writes_its_line_and_others_do_not(request, tmp_path, monkeypatch):
    hook = request.config.pluginmanager.get_plugin(str(ROOT / "tests" / "conftest.py")).pytest_runtest_protocol
    timeline = tmp_path / "timeline.jsonl"
    monkeypatch.setenv(TIMELINE_ENV, str(timeline))
    monkeypatch.delenv(companion.REPORT_ENV, raising=False)
    t0 = time.time()
    drive(hook, SimpleNamespace(nodeid="tests/unit/test_x.py::test_a", config=SimpleNamespace(rootpath=ROOT)))
    monkeypatch.setenv(companion.REPORT_ENV, str(tmp_path / "reports"))  # as in the companion session
    drive(hook, SimpleNamespace(nodeid="tests/integration/test_y.py::test_b", config=SimpleNamespace(rootpath=ROOT)))
    # a session nested in a test (another root), and the main session's stand-in for a companion's test: nothing
    drive(hook, SimpleNamespace(nodeid="t.py::test_c", config=SimpleNamespace(rootpath=tmp_path)))
    drive(hook, companion.CompanionItem.__new__(companion.CompanionItem))
    a, b = [json.loads(x) for x in timeline.read_text().splitlines()]
    assert (a["kind"], a["id"], a["session"]) == ("test", "tests/unit/test_x.py::test_a", "main")
    assert (b["id"], b["session"]) == ("tests/integration/test_y.py::test_b", "companion")
    for line in (a, b):
        assert 0.2 <= line["cpu_s"] <= line["wall_s"] + 0.05 and line["machine_busy_s"] >= 0.15
    assert t0 <= a["t0"] <= b["t0"] and a["t0"] + a["wall_s"] <= b["t0"] + 0.01


def _timeline(path: Path) -> Path:
    t0 = 1000.0
    lines = [
        {"kind": "test", "id": "tests/unit/test_a.py::test_1", "session": "main", "t0": t0 + 10, "wall_s": 5,
         "cpu_s": 4, "machine_busy_s": 9},
        {"kind": "test", "id": "tests/unit/test_a.py::test_2", "session": "main", "t0": t0 + 15, "wall_s": 5,
         "cpu_s": 5, "machine_busy_s": 9},
        {"kind": "test", "id": "tests/integration/test_b.py::test_1", "session": "main", "t0": t0 + 20,
         "wall_s": 30, "cpu_s": 1, "machine_busy_s": 55},
        {"kind": "test", "id": "tests/integration/test_c.py::test_1", "session": "companion", "t0": t0 + 18,
         "wall_s": 20, "cpu_s": 2, "machine_busy_s": 38},
        {"kind": "run", "argv": ["/r/tests/integration/learning_run.py", "/tmp/x"], "nproc": 1, "cpu_s": 40,
         "end": t0 + 45},
        {"kind": "run", "argv": ["/r/launchers/train.py", "--no-progress", "output_dir=/tmp/pytest-3/engine_runs0/a"],
         "nproc": 2, "cpu_s": 12, "end": t0 + 30},
        {"kind": "run", "argv": ["/r/launchers/train.py", "output_dir=/tmp/pytest-3/engine_runs0/a"], "nproc": 2,
         "cpu_s": 8, "end": t0 + 40},
        {"kind": "run", "argv": ["-m", "vlscale.profiling.measure", "--x"], "nproc": 1, "cpu_s": 3, "end": t0 + 41},
        {"kind": "suite", "t0": t0, "wall_s": 52, "machine_busy_s": 100, "cores": 2, "returncode": 0,
         "where": "/r", "result": "4 passed in 50.00s"},
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_the_summary_splits_the_machines_cpu_and_dates_the_phases(suite_time, tmp_path, capsys):
    assert suite_time.TIMELINE_ENV == TIMELINE_ENV  # the variable the suite reads
    s = suite_time.summarise([json.loads(x) for x in _timeline(tmp_path / "t.jsonl").read_text().splitlines()], 2)
    assert s["wall_s"] == 52 and s["idle_pct"] == pytest.approx(100 * (1 - 100 / 104), abs=0.05)
    assert s["phases"]["main"] == {"first_test_s": 10, "last_end_s": 50, "tests": 3, "unit_end_s": 20}
    assert s["phases"]["companion"] == {"first_test_s": 18, "last_end_s": 38, "tests": 1}
    assert s["cpu_s"] == {"machine_busy": 100, "main_session": 10, "companion_session": 2, "learning_job": 40,
                          "other_forked_runs": 23, "rest": 25}
    assert s["forked_runs"] == 4
    assert list(s["files"]) == ["main: tests/integration/test_b.py", "companion: tests/integration/test_c.py"]
    assert s["files"]["main: tests/integration/test_b.py"] == {"wall_s": 30, "cpu_s": 1, "tests": 1}
    assert s["runs"] == {"learning_run.py": {"cpu_s": 40, "runs": 1},
                         "train.py engine_runs0/a": {"cpu_s": 20, "runs": 2}}
    assert suite_time.main(["--read", str(tmp_path / "t.jsonl"), "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert "suite: 52 s wall on 2 cores, 3.8 % idle; 4 passed in 50.00s" in out
    assert "main          3 tests, first at 10.0 s, unit tests end at 20.0 s, last ends at 50.0 s" in out
    assert "learning job 40" in out and "rest 25" in out


def test_a_timeline_without_the_suites_line_is_refused(suite_time, tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(x + "\n" for x in _timeline(tmp_path / "u.jsonl").read_text().splitlines()[:-1]))
    with pytest.raises(SystemExit, match="no 'suite' line"):
        suite_time.main(["--read", str(path)])
