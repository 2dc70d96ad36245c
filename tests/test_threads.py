"""tti.infra.threads: torch gets the CPUs other processes leave free, and OMP_NUM_THREADS wins."""
import os

import torch

from tti.infra import threads


def scripted_cpu_times(monkeypatch, busy_per_cpu: list, later_samples: list = ()):
    """Make /proc/stat report each CPU busy for the given fraction in the first sample, and
    in later samples as `later_samples` says (a list of such lists; by default as the first)."""
    samples = [busy_per_cpu, *later_samples]
    samples += [samples[-1]] * threads.SAMPLES
    reads = iter(read for busy in samples
                 for read in ({cpu: (0, 0) for cpu in range(len(busy))},
                              {cpu: (int(100 * f), 100) for cpu, f in enumerate(busy)}))
    monkeypatch.setattr(threads, "_cpu_times", lambda cpus: next(reads))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(len(busy_per_cpu))))


def test_a_cpu_another_process_keeps_busy_is_not_used(monkeypatch):
    scripted_cpu_times(monkeypatch, [1.0, 0.0])  # a one-core busy loop on a 2-CPU machine
    assert threads.free_cpus(sample_s=0) == 1


def test_a_blip_in_one_sample_does_not_take_a_cpu(monkeypatch):
    scripted_cpu_times(monkeypatch, [1.0, 0.0], later_samples=[[0.0, 0.0]])
    assert threads.free_cpus(sample_s=0) == 2
    scripted_cpu_times(monkeypatch, [0.0, 0.0], later_samples=[[0.0, 1.0], [1.0, 0.0]])
    assert threads.free_cpus(sample_s=0) == 2


def test_light_load_leaves_every_cpu_and_full_load_still_one(monkeypatch):
    scripted_cpu_times(monkeypatch, [0.2, 0.2, 0.0, 0.0])
    assert threads.free_cpus(sample_s=0) == 4
    scripted_cpu_times(monkeypatch, [1.0, 1.0])
    assert threads.free_cpus(sample_s=0) == 1


def test_the_real_proc_stat_gives_a_load_within_the_cpus():
    cpus = os.sched_getaffinity(0)
    assert 0.0 <= threads.busy_cpus(cpus, sample_s=0.05) <= len(cpus) + 0.01


def test_omp_num_threads_set_by_the_user_wins(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", str(before))
    scripted_cpu_times(monkeypatch, [1.0] * 8)  # would otherwise choose 1
    torch.set_num_threads(before)
    try:
        assert threads.use_free_cpus(sample_s=0) == before
    finally:
        torch.set_num_threads(before)


def test_without_omp_num_threads_torch_gets_the_free_cpus(monkeypatch, capsys):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    scripted_cpu_times(monkeypatch, [1.0, 0.0])
    torch.set_num_threads(2)
    try:
        assert threads.use_free_cpus(sample_s=0) == 1
        assert "1 of 2 CPUs busy" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)
