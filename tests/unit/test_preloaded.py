"""The suite's fork server (tests/preloaded.py) gives a run what a new interpreter would: argv, path,
working directory, environment, threads, exit code, torchrun's rank variables, one process group."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

SCRIPT = '''
import json, os, sys, time
import torch
rank = int(os.environ.get("RANK", "0"))
seen = {"argv": sys.argv, "path0": sys.path[0], "cwd": os.getcwd(), "threads": torch.get_num_threads(),
        "env": {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                              "MASTER_ADDR", "MASTER_PORT", "PROBE")},
        "pgid": os.getpgid(0)}
# written whole, then renamed: the test polls for the file while this process is still running
with open(sys.argv[1] + f".{rank}.tmp", "w") as f:
    json.dump(seen, f)
os.replace(sys.argv[1] + f".{rank}.tmp", sys.argv[1] + f".{rank}")
print(f"rank {rank} says hello")
mode = sys.argv[2]
if mode == "fail" and rank == 1:
    sys.exit(3)
if mode in ("fail", "sleep"):
    time.sleep(60)
if mode == "spin":  # 0.3 s of CPU
    t = time.process_time()
    while time.process_time() - t < 0.3:
        pass
'''


@pytest.fixture()
def script(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text(SCRIPT)
    return path


def test_two_ranks_see_torchruns_variables(preloaded, script, tmp_path):
    out = tmp_path / "seen"
    done = preloaded.run(script, [out, "ok"], nproc=2, env=dict(preloaded.env, PROBE="x"), cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stdout
    seen = [json.loads((tmp_path / f"seen.{r}").read_text()) for r in range(2)]
    for rank, s in enumerate(seen):
        assert s["argv"] == [str(script), str(out), "ok"]
        assert s["path0"] == str(tmp_path) and s["cwd"] == str(tmp_path)
        assert s["threads"] == 1  # OMP_NUM_THREADS=1, as torchrun sets it
        assert s["env"]["RANK"] == s["env"]["LOCAL_RANK"] == str(rank)
        assert s["env"]["WORLD_SIZE"] == s["env"]["LOCAL_WORLD_SIZE"] == "2" and s["env"]["PROBE"] == "x"
    assert seen[0]["env"]["MASTER_PORT"] == seen[1]["env"]["MASTER_PORT"]
    assert seen[0]["pgid"] == seen[1]["pgid"] != os.getpgid(0)
    assert "rank 0 says hello" in done.stdout and "rank 1 says hello" in done.stdout


def test_each_run_writes_its_ranks_cpu_time_to_the_timeline(preloaded, script, tmp_path):
    """With ``VLSCALE_TEST_TIMELINE`` in its environment a run appends one line: argv, ranks, both ranks' CPU time
    (benchmarks/suite_time.py)."""
    from preloaded import TIMELINE_ENV

    timeline = tmp_path / "timeline.jsonl"
    t0 = time.time()
    done = preloaded.run(script, [tmp_path / "seen", "spin"], nproc=2, env=dict(preloaded.env, **{TIMELINE_ENV: str(
        timeline)}), cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stdout
    [line] = [json.loads(x) for x in timeline.read_text().splitlines()]
    assert line["kind"] == "run" and line["argv"] == [str(script), str(tmp_path / "seen"), "spin"]
    assert line["nproc"] == 2 and 0.6 <= line["cpu_s"] < 30 and t0 < line["end"] <= time.time()
    done = preloaded.run(script, [tmp_path / "seen", "ok"], cwd=tmp_path, timeout=60)  # without: nothing written
    assert done.returncode == 0 and len(timeline.read_text().splitlines()) == 1


def test_a_failing_rank_stops_the_other_and_sets_the_code(preloaded, script, tmp_path):
    t0 = time.monotonic()
    done = preloaded.run(script, [tmp_path / "seen", "fail"], nproc=2, cwd=tmp_path, timeout=60)
    assert done.returncode == 3 and time.monotonic() - t0 < 30, done.stdout


def test_one_process_keeps_its_environment_and_dies_with_its_group(preloaded, script, tmp_path):
    run = preloaded.start(script, [tmp_path / "seen", "sleep"], cwd=tmp_path)
    deadline = time.monotonic() + 30
    while not (tmp_path / "seen.0").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    seen = json.loads((tmp_path / "seen.0").read_text())
    assert seen["env"]["RANK"] is None  # one process: no launcher variables
    assert run.poll() is None and seen["pgid"] == run.pid
    os.killpg(run.pid, signal.SIGKILL)
    assert run.wait(timeout=10) == -signal.SIGKILL


def test_one_process_computes_on_one_thread_unless_asked(preloaded, script, tmp_path):
    """A one-process run given no OMP_NUM_THREADS gets one torch thread (the suite's other work keeps the other core
    busy); one given a number keeps it."""
    seen = {}
    for name, env in (("unset", {k: v for k, v in preloaded.env.items() if k != "OMP_NUM_THREADS"}),
                      ("asked", dict(preloaded.env, OMP_NUM_THREADS="2"))):
        done = preloaded.run(script, [tmp_path / name, "ok"], env=env, cwd=tmp_path, timeout=60)
        assert done.returncode == 0, done.stdout
        seen[name] = json.loads((tmp_path / f"{name}.0").read_text())["threads"]
    assert seen == {"unset": 1, "asked": 2}


def test_an_import_time_variable_cannot_change(preloaded, script, tmp_path):
    with pytest.raises(ValueError, match="DS_ACCELERATOR='cuda' differs"):
        preloaded.start(script, [tmp_path / "seen", "ok"], env=dict(preloaded.env, DS_ACCELERATOR="cuda"))


def test_the_warm_up_imports_go_on_without_deepspeeds_muon_module(monkeypatch):
    """DeepSpeed before 0.17.6 has no ``runtime.zero.muon``: the server still preloads (it stopped at that
    import, and every test that runs through the server failed with 'the preloaded server exited')."""
    import sys

    import preloaded

    monkeypatch.setitem(sys.modules, "deepspeed.runtime.zero.muon.muon_optimizer", None)  # import -> ModuleNotFoundError
    preloaded._preload()


def test_the_lane_starts_one_run_at_a_time_on_the_cores_left_idle():
    """tests/lane.py: a run starts only when no lane run is running, its processes fit beside the background
    jobs' busy cores (<= 2 in all) and it is ready; the first that fits goes first; a run started already
    (start() -> None) frees the lane; close() starts nothing more; drained() once nothing is queued or running."""
    from lane import Lane

    class Run:
        def __init__(self):
            self.code = None

        def poll(self):
            return self.code

    jobs, started, ready = [1], [], {"b": False}

    def entry(name, cores, handle=True):
        def start():
            started.append(name)
            return Run() if handle else None
        return cores, lambda: ready.get(name, True), start

    lane = Lane(lambda: jobs[0])
    for name, cores in (("a", 2), ("b", 1), ("c", 1), ("d", 2)):
        lane.add(*entry(name, cores))
    lane.add(*entry("e", 1, handle=False))
    lane.advance()
    assert started == ["c"] and lane.busy() == 2  # a does not fit beside the job, b is not ready
    lane.advance()
    assert started == ["c"]  # c runs
    lane.current[1].code = 0
    jobs[0] = 0
    assert lane.busy() == 0
    lane.advance()
    assert started == ["c", "a"] and lane.busy() == 2
    lane.current[1].code = 0
    ready["b"] = True
    lane.advance()
    assert started == ["c", "a", "b"]
    lane.current[1].code = 1  # a failed run frees the lane too (its test reports it)
    lane.advance()
    assert started == ["c", "a", "b", "d"] and not lane.drained()
    lane.current[1].code = 0
    assert not lane.drained()  # e is queued
    lane.advance()
    assert started[-1] == "e" and lane.current is None and lane.busy() == 0 and lane.drained()
    lane.add(*entry("f", 1))
    lane.close()
    lane.advance()
    assert started == ["c", "a", "b", "d", "e"]
