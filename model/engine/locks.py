"""Which processes are alive, and the lock file that lets one of several processes take a job.

A file named by (or holding) a process id belongs to a live writer while that process runs: the run
lock of the ablation runner (model/ablation/runner.py) and the temporaries of model/engine/checkpoint.py
both follow this rule, and both take over what a dead process left.
"""
import os


def pid_alive(pid):
    """Whether process pid exists (someone else's live process counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def claim(folder, name="running.lock"):
    """Takes folder/name for this process; False when a live process holds it (stale locks of dead
    processes are taken over)."""
    os.makedirs(folder, exist_ok=True)
    lock = os.path.join(folder, name)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(lock) as f:
                    pid = int(f.read().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid_alive(pid):
                return False
            os.remove(lock)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def release(folder, name="running.lock"):
    """Gives back a lock claim() took."""
    os.remove(os.path.join(folder, name))
