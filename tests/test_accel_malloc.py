"""CPU malloc tuning: the thresholds reach glibc's mallopt once per process; opting out leaves malloc alone."""

from __future__ import annotations

import platform

import pytest

import prefkit.accel.malloc as allocator

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")


class FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return 1


@glibc
def test_mallopt_gets_both_thresholds_once(monkeypatch):
    fake = FakeLibc()
    monkeypatch.setattr(allocator, "_done", False)
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: fake)
    monkeypatch.delenv("PREFKIT_MALLOC_TUNING", raising=False)
    assert allocator.tune_cpu_malloc() and allocator.tune_cpu_malloc()
    assert fake.calls == [(-3, 32 * 2**20), (-1, 64 * 2**20)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD


@glibc
def test_opt_out_and_refused_values_leave_it_unapplied(monkeypatch):
    fake = FakeLibc()
    monkeypatch.setattr(allocator, "_done", False)
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: fake)
    monkeypatch.setenv("PREFKIT_MALLOC_TUNING", "0")
    assert allocator.tune_cpu_malloc() is False and fake.calls == []
    monkeypatch.delenv("PREFKIT_MALLOC_TUNING")
    fake.mallopt = lambda param, value: 0  # glibc refuses a value
    assert allocator.tune_cpu_malloc() is False


@glibc
def test_real_glibc_accepts_the_thresholds(monkeypatch):
    monkeypatch.setattr(allocator, "_done", False)
    monkeypatch.delenv("PREFKIT_MALLOC_TUNING", raising=False)
    assert allocator.tune_cpu_malloc() is True
