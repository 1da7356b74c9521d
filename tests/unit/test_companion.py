"""The suite's companion session (tests/companion.py): the tests of its files run in a second pytest process and
the main session reports each one as it went there (passed, failed with its traceback and output, skipped,
xfailed, its duration), honours -k, and runs everything itself with VLSCALE_TEST_COMPANION=0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from companion import COMPANION_FILES

TESTS = Path(__file__).resolve().parents[1]
MOVED_FILE = COMPANION_FILES[0]  # a name the companion takes

CONFTEST = '''
import companion, pytest


def pytest_configure(config):
    config.pluginmanager.register(companion, "vlscale_companion")


@pytest.fixture
def runs():
    return "the main session's"
'''

# a file the companion runs (its name is in COMPANION_FILES), beside one the main session keeps
MOVED = '''
import json, os, time, pytest


def test_passes():
    with open(os.path.join(os.environ["SEEN"], "moved"), "w") as f:
        json.dump({"pid": os.getpid(), "omp": os.environ.get("OMP_NUM_THREADS")}, f)
    time.sleep(0.6)


def test_fails():
    open(os.path.join(os.environ["SEEN"], "fails"), "w").close()
    print("words the test printed")
    assert 1 == 2, "deliberately wrong"


def test_skips():
    pytest.skip("nothing to do here")


@pytest.mark.xfail(reason="known gap", strict=True)
def test_xfails():
    assert False


@pytest.fixture
def slow_to_set_up():
    time.sleep(0.5)


def test_set_up_slowly(slow_to_set_up):
    pass


@pytest.fixture
def broken():
    raise RuntimeError("the fixture broke")


def test_with_a_broken_fixture(broken):
    pass
'''

KEPT = '''
import json, os, time


def test_kept():
    with open(os.path.join(os.environ["SEEN"], "kept"), "w") as f:
        json.dump({"pid": os.getpid()}, f)
    time.sleep(float(os.environ.get("KEPT_S", "0")))  # the companion is done by then: its stand-ins wait 0 s
'''


def _tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    (root / "integration").mkdir(parents=True)
    (root / "conftest.py").write_text(CONFTEST)
    (root / "integration" / MOVED_FILE).write_text(MOVED)
    (root / "integration" / "test_kept.py").write_text(KEPT)
    return root


def _pytest(root: Path, *args: str, **env) -> subprocess.CompletedProcess:
    (root.parent / "seen").mkdir(exist_ok=True)
    # this session's companion variables are not the tree's
    base = {k: v for k, v in os.environ.items() if k not in ("VLSCALE_COMPANION_REPORT", "VLSCALE_TEST_COMPANION",
                                                             "OMP_NUM_THREADS")}
    # no plugins but pytest's own: the tree needs none (pytest-timeout, hypothesis ... took ~2 s of CPU a session)
    env = dict(base, PYTHONPATH=str(TESTS), SEEN=str(root.parent / "seen"), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1", **env)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rsx", "--durations=0",
                           "--basetemp", str(root.parent / "base"), *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)


def _seen(root: Path, name: str) -> dict:
    return json.loads((root.parent / "seen" / name).read_text())


def test_the_companions_tests_run_there_and_report_here(tmp_path):
    root = _tree(tmp_path)
    done = _pytest(root, KEPT_S="4")
    out = done.stdout
    assert done.returncode == 1, out
    assert "1 failed, 3 passed, 1 skipped, 1 xfailed, 1 error" in out, out  # the fixture's error is an error here
    assert "[in the companion session, call]" in out and "deliberately wrong" in out and "words the test printed" in out
    assert "[in the companion session, setup]" in out and "the fixture broke" in out
    assert "nothing to do here" in out and "known gap" in out
    kept, moved = _seen(root, "kept"), _seen(root, "moved")
    assert kept["pid"] != moved["pid"]  # the moved test ran in another process
    assert moved["omp"] == "1"  # one thread a process while both sessions run
    slow = [line for line in out.splitlines() if line.endswith(f"integration/{MOVED_FILE}::test_passes")]
    assert slow and float(slow[0].split("s ")[0]) >= 0.6, out  # the companion's own duration
    setup = [line for line in out.splitlines() if line.endswith(f"integration/{MOVED_FILE}::test_set_up_slowly")]
    assert setup and "setup" in setup[0] and float(setup[0].split("s ")[0]) >= 0.5, out  # ... of each phase


def test_deselected_tests_do_not_run_there_and_the_switch_keeps_everything_here(tmp_path):
    root = _tree(tmp_path)
    done = _pytest(root, "-k", "not fails and not xfails and not broken")
    assert done.returncode == 0 and "3 passed, 1 skipped, 3 deselected" in done.stdout, done.stdout
    assert _seen(root, "kept")["pid"] != _seen(root, "moved")["pid"]
    assert not (root.parent / "seen" / "fails").exists()  # the companion ran only the selected tests
    done = _pytest(root, "-k", "not fails and not xfails and not broken", VLSCALE_TEST_COMPANION="0")
    assert done.returncode == 0 and "3 passed, 1 skipped, 3 deselected" in done.stdout, done.stdout
    assert _seen(root, "kept")["pid"] == _seen(root, "moved")["pid"]  # one process: no companion


def test_a_companion_file_using_the_main_sessions_runs_is_refused_by_name(tmp_path):
    root = _tree(tmp_path)
    (root / "integration" / MOVED_FILE).write_text("def test_reads(runs):\n    assert runs\n")
    done = _pytest(root)
    assert done.returncode != 0
    assert (f"integration/{MOVED_FILE}::test_reads uses ['runs'], which the companion session does not share: "
            f"take {MOVED_FILE} out of tests/companion.py's COMPANION_FILES") in done.stdout + done.stderr
