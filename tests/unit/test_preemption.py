"""The SIGTERM notice on its own: recorded, not fatal at once, fatal after the grace period."""

import subprocess
import sys
import textwrap
import time

CHILD = textwrap.dedent("""
    import os, signal, sys, time
    from shipyard.runtime import preemption
    assert preemption.install(grace_s=float(sys.argv[1]))
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)
    print("noticed" if preemption.requested() else "missed", flush=True)
    time.sleep(30)
    print("still alive", flush=True)
""")


def test_sigterm_is_a_notice_then_the_grace_period_ends_the_process():
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", CHILD, "1.5"], capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - t0
    assert r.stdout.split() == ["noticed"], r.stdout + r.stderr  # the signal did not kill it at once
    assert r.returncode == 143  # 128 + SIGTERM, as if the signal had been fatal
    assert "grace period" in r.stderr
    assert elapsed < 25  # ended by the grace timer, not by the 30 s sleep
