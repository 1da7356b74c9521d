"""Where the test suite's time goes: one run of the README's test command with a timeline, summarised.

The suite keeps both cores busy from collection to the end (tests/conftest.py's background jobs and lane, the
companion session of tests/companion.py), so only less CPU work, or a better balance of the two sessions at the
end, shortens it. With ``VLSCALE_TEST_TIMELINE=FILE`` each test appends a JSON line (its session, start, wall time,
its process's CPU time; tests/conftest.py) and each run forked from the suite's server its ranks' CPU time
(tests/preloaded.py). This runs the suite so, reads the whole machine's busy time (``/proc/stat``) around it, and
prints: when each phase ended (the main session's unit tests, each session's last test), the machine's CPU-s split
into the sessions' own, the forked runs' (the learning job apart) and the rest (collection, the Triton interpreter
job, the launcher tests' fresh processes, METEOR's JVM), and the largest test files and runs.

    python benchmarks/suite_time.py [--clone] [--timeline FILE] [--top 15] [--json] [-- PYTEST_ARGS]
    python benchmarks/suite_time.py --read FILE       # summarise a timeline written before

``--clone`` runs it in a fresh clone of HEAD (committed code, as CI sees it). Figures: BENCHMARKS.md, "The test
suite's time".
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from preloaded import TIMELINE_ENV, machine_busy_s  # noqa: E402  (the suite's own: standard library only)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clone", action="store_true", help="run in a fresh clone of HEAD")
    p.add_argument("--timeline", help="where the timeline goes (default: a new temporary file)")
    p.add_argument("--read", metavar="FILE", help="summarise this timeline; run nothing")
    p.add_argument("--top", type=int, default=15, help="test files and runs listed (default 15)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("pytest_args", nargs="*", help="after --: more pytest arguments (default: none)")
    args = p.parse_args(argv)
    if args.top < 1:
        p.error("--top must be at least 1")
    if args.read and (args.clone or args.pytest_args):
        p.error("--read summarises a timeline: --clone and pytest arguments run the suite")
    return args


def run_suite(timeline: Path, clone: bool, pytest_args: list[str]) -> None:
    """The README's test command with the timeline on; its own record ("suite") is the timeline's last line."""
    where = ROOT
    if clone:
        where = Path(tempfile.mkdtemp(prefix="vlscale_suite_")) / "repo"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(where)], check=True)
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", **{TIMELINE_ENV: str(timeline)})
    cmd = [sys.executable, "-m", "pytest", "-q", "tests", *pytest_args]
    t0, busy0 = time.time(), machine_busy_s()
    proc = subprocess.run(cmd, cwd=where, env=env, capture_output=True, text=True)
    record = {"kind": "suite", "t0": t0, "wall_s": time.time() - t0, "machine_busy_s": machine_busy_s() - busy0,
              "cores": os.cpu_count(), "returncode": proc.returncode, "where": str(where),
              "result": (proc.stdout.strip().splitlines() or [""])[-1]}
    with open(timeline, "a") as f:
        f.write(json.dumps(record) + "\n")


def run_name(argv: list[str]) -> str:
    """A forked run's script (or module) and the test folder its output_dir is in."""
    script = argv[1] if argv[0] == "-m" else Path(argv[0]).name
    out = next((a.split("=", 1)[1] for a in argv if a.startswith("output_dir=")), "")
    folder = next((p for p in reversed(Path(out).parts[:-1]) if re.search(r"\d$", p)), "") if out else ""
    return f"{script} {folder}/{Path(out).name}" if out else script


def summarise(lines: list[dict], top: int) -> dict:
    suite = next((r for r in lines if r["kind"] == "suite"), None)
    if suite is None:
        raise SystemExit("the timeline has no 'suite' line: not written by this script (or the run was cut short)")
    tests = [r for r in lines if r["kind"] == "test"]
    runs = [r for r in lines if r["kind"] == "run"]
    t0 = suite["t0"]

    def at(t):
        return round(t - t0, 1)

    phases = {}
    for session in ("main", "companion"):
        own = [r for r in tests if r["session"] == session]
        if own:
            phases[session] = {"first_test_s": at(min(r["t0"] for r in own)),
                               "last_end_s": at(max(r["t0"] + r["wall_s"] for r in own)), "tests": len(own)}
    unit = [r for r in tests if r["session"] == "main" and r["id"].startswith("tests/unit/")]
    if unit:
        phases["main"]["unit_end_s"] = at(max(r["t0"] + r["wall_s"] for r in unit))
    learning = [r for r in runs if Path(r["argv"][0]).name == "learning_run.py"]
    cpu = {"machine_busy": suite["machine_busy_s"],
           "main_session": sum(r["cpu_s"] for r in tests if r["session"] == "main"),
           "companion_session": sum(r["cpu_s"] for r in tests if r["session"] == "companion"),
           "learning_job": sum(r["cpu_s"] for r in learning),
           "other_forked_runs": sum(r["cpu_s"] for r in runs if r not in learning)}
    cpu["rest"] = cpu["machine_busy"] - sum(v for k, v in cpu.items() if k != "machine_busy")
    files = collections.defaultdict(lambda: {"wall_s": 0.0, "cpu_s": 0.0, "tests": 0})
    for r in tests:
        f = files[f"{r['session']}: {r['id'].split('::')[0]}"]
        f["wall_s"] += r["wall_s"]
        f["cpu_s"] += r["cpu_s"]
        f["tests"] += 1
    by_run = collections.defaultdict(lambda: {"cpu_s": 0.0, "runs": 0})
    for r in runs:
        by_run[run_name(r["argv"])]["cpu_s"] += r["cpu_s"]
        by_run[run_name(r["argv"])]["runs"] += 1
    return {"wall_s": round(suite["wall_s"], 1), "cores": suite["cores"], "result": suite["result"],
            "idle_pct": round(100 * (1 - suite["machine_busy_s"] / (suite["wall_s"] * suite["cores"])), 1),
            "phases": phases, "cpu_s": {k: round(v, 1) for k, v in cpu.items()}, "forked_runs": len(runs),
            "files": dict(sorted(files.items(), key=lambda kv: -kv[1]["wall_s"])[:top]),
            "runs": dict(sorted(by_run.items(), key=lambda kv: -kv[1]["cpu_s"])[:top])}


def print_summary(s: dict) -> None:
    print(f"suite: {s['wall_s']} s wall on {s['cores']} cores, {s['idle_pct']} % idle; {s['result']}")
    for session, p in s["phases"].items():
        unit = f", unit tests end at {p['unit_end_s']} s" if "unit_end_s" in p else ""
        print(f"  {session:9s} {p['tests']:5d} tests, first at {p['first_test_s']} s{unit}, last ends at "
              f"{p['last_end_s']} s")
    print(f"CPU-s (whole machine busy {s['cpu_s']['machine_busy']}): " + ", ".join(
        f"{k.replace('_', ' ')} {v}" for k, v in s["cpu_s"].items() if k != "machine_busy")
        + f" ({s['forked_runs']} forked runs)")
    print("test files by wall time (session: file: wall s, own CPU-s, tests):")
    for name, f in s["files"].items():
        print(f"  {f['wall_s']:7.1f} {f['cpu_s']:7.1f} {f['tests']:4d}  {name}")
    print("forked runs by CPU-s (script, output folder: CPU-s, runs):")
    for name, r in s["runs"].items():
        print(f"  {r['cpu_s']:7.1f} {r['runs']:4d}  {name}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.read:
        timeline = Path(args.read)
    else:
        timeline = Path(args.timeline or tempfile.mkstemp(prefix="suite_timeline_", suffix=".jsonl")[1])
        timeline.write_text("")
        run_suite(timeline, args.clone, args.pytest_args)
        print(f"timeline: {timeline}", file=sys.stderr)
    s = summarise([json.loads(line) for line in timeline.read_text().splitlines() if line.strip()], args.top)
    if args.json:
        print(json.dumps(s, indent=1))
    else:
        print_summary(s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
