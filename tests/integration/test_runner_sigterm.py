"""SIGTERM to DeepSpeed's runner (``deepspeed launchers/train.py ...``, as a scheduler or ``kill PID``
sends it) stops the ranks with a resumable checkpoint. DeepSpeed passes it on only for pdsh: the runner
ended alone and its ranks trained on, orphaned; each rank now watches its launcher
(vlscale.engine.distributed.LauncherWatch; the stand-in process trees of tests/unit/test_launcher_watch.py
check the watch itself in seconds).
"""

from __future__ import annotations

import os
import re
import signal
import time

import psutil

from vlscale.engine import checkpoint as ckpt

STOP_BOUND_S = 30.0  # the watch's poll (1 s), the step, the checkpoint, exit


def test_sigterm_to_deepspeeds_runner_stops_the_ranks_with_a_checkpoint(h, tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "log.txt"
    # more steps than can run within the bound: without the watch the ranks are still training when checked.
    # 2 ranks: this is the suite's run of DeepSpeed's launcher on one node (the others fork from the preloaded server)
    args = h.TINY + ["train.micro_batch_size=2", "train.max_steps=100000", f"output_dir={out}"]
    runner = h.start(args, nproc=2, launcher="deepspeed", log_path=log)
    try:
        h.wait_for_steps(out, 2, runner, timeout=120)
        below = psutil.Process(runner.pid).children(recursive=True)  # deepspeed.launcher.launch and the ranks
        assert len(below) == 3, [p.cmdline()[:4] for p in below]
        assert "is gone" not in log.read_text()  # the watch does not fire while the runner lives
        t0 = time.monotonic()
        os.kill(runner.pid, signal.SIGTERM)  # the runner alone, not its process group (Ctrl-C's way)
        # the runner's own status (docs/scaling.md): killed by the signal at once, not train.py's 143 after its
        # checkpoint
        assert runner.wait(timeout=10) == -signal.SIGTERM
        _, alive = psutil.wait_procs(below, timeout=STOP_BOUND_S)
        text = log.read_text()
        assert not alive, f"still running {STOP_BOUND_S} s after SIGTERM to the runner:\n{text[-3000:]}"
        took = time.monotonic() - t0
    finally:
        try:
            os.killpg(runner.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # either rank's watch may look first (once a second each); the other then stops with it (the all-reduced stop)
    assert re.search(rf"rank [01]: DeepSpeed's runner \(pid {runner.pid}\) is gone", text), text[-3000:]
    tag = ckpt.latest_tag(out / "checkpoints")
    assert tag is not None, f"no checkpoint:\n{text[-3000:]}"
    step = int(tag[4:])
    assert f"stopped at step {step} (signal)" in text
    assert [r["step"] for r in h.read_log(out)] == list(range(1, step + 1))
    summary = h.read_json(out / "run_summary.json")  # and says why it stopped, where it can go on from
    assert summary["completed"] is False and summary["stopped"] == {
        "reason": f"stopped at step {step} (signal)", "rank": 0, "checkpoint": str(out / "checkpoints" / tag)}
    # resumable: one more step from the checkpoint (2 ranks forked from the preloaded server)
    resumed = h.launch(h.TINY + ["train.micro_batch_size=2", f"train.max_steps={step + 1}", f"output_dir={out}",
                                 "--resume"], nproc=2)
    assert [r["step"] for r in h.read_log(out)] == list(range(1, step + 2)), resumed.stdout[-3000:]
    print(f"ranks stopped {took:.1f} s after SIGTERM to the runner, at step {step}")
