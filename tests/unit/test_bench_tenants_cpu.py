"""`bench.serving_tenants.main_thread_cpu_s`: the CPU of a process's main thread alone (the server's
event loop), apart from its other threads (the engine, torch's workers), as the acme-alone re-check
reports it."""

from __future__ import annotations

import os
import threading
import time

import pytest

from bench.serving_tenants import main_thread_cpu_s

BURN_S = 0.5  # thread CPU seconds each side burns: 50 clock ticks at 100 Hz


def burn(cpu_s: float) -> None:
    """Spin until this thread has used `cpu_s` more CPU seconds."""
    end = time.thread_time() + cpu_s
    while time.thread_time() < end:
        pass


@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/task"), reason="Linux /proc only")
def test_main_thread_cpu_counts_the_main_thread_and_not_the_others():
    pid = os.getpid()
    before = main_thread_cpu_s(pid)
    worker = threading.Thread(target=burn, args=(BURN_S,))
    worker.start()
    worker.join()
    after_worker = main_thread_cpu_s(pid)
    burn(BURN_S)
    after_main = main_thread_cpu_s(pid)
    assert after_worker - before < 0.2 * BURN_S  # the worker's CPU is not the main thread's
    assert after_main - after_worker >= 0.8 * BURN_S


def test_a_missing_process_reads_nan():
    assert main_thread_cpu_s(2**22 + 12345) != main_thread_cpu_s(2**22 + 12345)  # NaN
