"""The test suite's fork server (tests/preloaded.py) with its heap frozen against a copy without ``gc.freeze()``.

The suite forks ~80 trainings from one server that has imported torch, transformers, DeepSpeed and open_clip. A run's
garbage collections (DeepSpeed's ``gc.collect()`` as each ZeRO-3 engine starts, Python's own) walked the whole
inherited heap and wrote to its pages (copied on write); the server now freezes it before it forks. This times the
same tiny 2-rank training (the integration tests' ``TINY``: 6 steps and an evaluation) forked from each server,
``--rounds`` rounds alternating the two, and reports each run's wall time, the medians and their ratio.

    python benchmarks/preloaded_fork.py [--rounds 2] [--runs 4] [--json]

Measured 2026-12-07 (2 cores, a slow hour), ``--rounds 2 --runs 3``: frozen 6.93-7.82 s a run (median 7.59 s),
unfrozen 7.86-9.32 s (median 8.65 s): 1.14x.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2, help="rounds, each timing both servers (default 2)")
    p.add_argument("--runs", type=int, default=4, help="trainings per server per round (default 4)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.runs < 1:
        p.error("--rounds and --runs must be at least 1")
    return args


def _servers(folder: Path) -> dict:
    """name -> the preloaded module to start a server with: tests/preloaded.py, and a copy without gc.freeze()."""
    source = (ROOT / "tests" / "preloaded.py").read_text()
    if "gc.freeze()" not in source:
        raise SystemExit("tests/preloaded.py no longer calls gc.freeze(): nothing to compare")
    copy = folder / "preloaded_unfrozen.py"
    copy.write_text(source.replace("gc.freeze()", "pass  # (benchmarks/preloaded_fork.py: not frozen)"))
    shutil.copy(ROOT / "tests" / "cpu_adam_op.py", folder / "cpu_adam_op.py")  # what the server imports beside it
    modules = {}
    for name, path in (("frozen", ROOT / "tests" / "preloaded.py"), ("unfrozen", copy)):
        spec = importlib.util.spec_from_file_location(f"preloaded_{name}", path)
        modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(modules[name])
    return modules


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))  # what tests/preloaded.py imports (cpu_adam_op)
    path = ROOT / "tests" / "integration" / "conftest.py"
    spec = importlib.util.spec_from_file_location("integration_conftest", path)
    integration = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(integration)  # the integration tests' TINY training
    folder = Path(tempfile.mkdtemp(prefix="preloaded_fork_"))
    try:
        modules = _servers(folder)
        times = {name: [] for name in modules}
        for r in range(args.rounds):
            for name, module in modules.items():
                (folder / f"{name}{r}").mkdir()
                server = module.PreloadedServer(folder / f"{name}{r}", module.launch_env())
                try:
                    while not server.ready():
                        if server.proc.poll() is not None:
                            raise SystemExit(f"the {name} server exited: {(server.folder / 'server.log').read_text()}")
                        time.sleep(0.1)
                    for i in range(args.runs):
                        t = time.monotonic()
                        out = folder / name / f"{r}_{i}"
                        done = server.run(str(ROOT / "launchers" / "train.py"),
                                          ["--no-progress", *integration.TINY, f"output_dir={out}"],
                                          timeout=600, nproc=2, env=dict(server.env, OMP_NUM_THREADS="1"), cwd=ROOT)
                        if done.returncode != 0:
                            raise SystemExit(f"a {name} run failed:\n{done.stdout[-3000:]}")
                        times[name].append(time.monotonic() - t)
                finally:
                    server.close()
                if not args.json:
                    print(f"round {r + 1} {name:8s} " + " ".join(f"{x:.2f}" for x in times[name][-args.runs:]) + " s",
                          flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    medians = {name: statistics.median(t) for name, t in times.items()}
    result = {"runs_s": times, "median_s": medians, "unfrozen_over_frozen": medians["unfrozen"] / medians["frozen"]}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"median a run: frozen {medians['frozen']:.2f} s, unfrozen {medians['unfrozen']:.2f} s "
              f"({result['unfrozen_over_frozen']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
