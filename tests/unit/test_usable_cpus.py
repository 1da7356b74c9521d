"""The CPUs the project counts (launchers/replicate.py's trainings at once, a CPU rank's torch threads) are the ones
this process may use, not os.cpu_count()'s machine: its affinity (taskset, a container's cpuset) and its cgroup's
CPU quota (docker --cpus, Kubernetes limits)."""

import os

import torch

from vlscale.engine import distributed
from vlscale.engine.distributed import share_cpu_cores, usable_cpu_count
from vlscale.replicate import default_parallel


def test_trainings_at_once_and_threads_follow_the_cpus_this_process_may_use(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(distributed, "CGROUP_ROOT", tmp_path)  # no quota files: no quota
    assert usable_cpu_count() == 4 and default_parallel() == 4 and default_parallel(2) == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")  # cgroup v2, unlimited
    assert usable_cpu_count() == 4
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # docker --cpus=1.5: 2 CPUs' worth of threads at most
    assert usable_cpu_count() == 2 and default_parallel(2) == 1
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    for quota, cpus in (("-1", 4), ("100000", 1), ("50000", 1)):  # cgroup v1
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(quota + "\n")
        assert usable_cpu_count() == default_parallel() == cpus, quota
    threads = torch.get_num_threads()
    try:  # a CPU rank of two on this node takes half of the one CPU it may use: at least 1 thread
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        assert share_cpu_cores() == 1
    finally:
        torch.set_num_threads(threads)
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS, Windows: the machine's count, under the quota
    assert usable_cpu_count() == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert usable_cpu_count() == 64


def test_a_ranks_threads_follow_omp_num_threads_or_the_ranks_on_its_node(monkeypatch, tmp_path):
    """OMP_NUM_THREADS (torchrun sets 1) is kept as torch took it; otherwise the node's usable CPUs are split over
    its ranks, counted by LOCAL_WORLD_SIZE (torchrun, deepspeed) or LOCAL_SIZE (MPI launchers)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(distributed, "CGROUP_ROOT", tmp_path)
    for var in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(var, raising=False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        assert share_cpu_cores() == 3 and torch.get_num_threads() == 3
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert share_cpu_cores() == 4 and torch.get_num_threads() == 4
        monkeypatch.delenv("LOCAL_WORLD_SIZE")
        monkeypatch.setenv("LOCAL_SIZE", "4")
        assert share_cpu_cores() == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
