"""A rank waiting in the process group's rendezvous stops at once on SIGTERM (vlscale.engine.distributed's
``_signal_aware``): it waited inside c10d's store, where Python's handlers do not run, and a launcher ending the
ranks left after rank 0 failed (its MASTER_PORT in use) waited the store's 30 s, then killed it."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_sigterm_during_the_rendezvous_is_start_ups_line_at_once(preloaded, tmp_path):
    # MASTER_PORT held by something that accepts and never answers (another job's port): rank 1 waits in the store
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(4)
    holder.settimeout(120)
    port = holder.getsockname()[1]
    env = dict(preloaded.env, RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), VLSCALE_DIST_TIMEOUT="120")
    log = tmp_path / "log.txt"
    run = preloaded.start(str(ROOT / "launchers" / "train.py"), ["--no-progress", "--config", "tiny",
                                                                 f"output_dir={tmp_path / 'run'}"],
                          env=env, cwd=str(ROOT), log_path=log)
    try:
        conn, _ = holder.accept()  # the rank is in the rendezvous
        time.sleep(0.5)
        t0 = time.monotonic()
        os.killpg(run.pid, signal.SIGTERM)  # as launch.py ends the ranks left (the group leader ignores it)
        code = run.wait(timeout=25)
        took = time.monotonic() - t0
    finally:
        run.kill()
        holder.close()
    text = log.read_text()
    assert code == 128 + signal.SIGTERM, text[-3000:]
    assert took < 10, f"{took:.1f} s after SIGTERM"
    assert ("vlscale: rank 1: aborted (SIGTERM during start-up, before training began: no checkpoint was written)"
            in text), text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    conn.close()
