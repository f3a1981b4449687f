"""model/engine/locks.py: the run lock several ablation processes share, taken over only from the dead."""
import os
import subprocess
import sys

from model.engine.locks import claim, pid_alive, release


def test_only_a_dead_processs_lock_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert pid_alive(os.getpid()) and not pid_alive(dead.pid)
    lock = tmp_path / "running.lock"
    assert claim(str(tmp_path)) and lock.read_text() == str(os.getpid())
    assert not claim(str(tmp_path))  # held by a live process (this one)
    lock.write_text(str(dead.pid))
    assert claim(str(tmp_path)) and lock.read_text() == str(os.getpid())
    release(str(tmp_path))
    assert not lock.exists()
    lock.write_text("not a pid")
    assert claim(str(tmp_path))
