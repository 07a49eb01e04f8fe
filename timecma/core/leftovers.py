"""Temporaries of killed runs: find them by the PID in their name, remove them, recover what
a crash stranded. Every command that writes atomically (temp + rename) names its temporaries
``<prefix><pid>...`` so the next run of the same command can tell its dead ones from live ones.
"""

from __future__ import annotations

import logging
import os
import re
import shutil

log = logging.getLogger(__name__)


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (on this machine)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def dead_temporaries(directory: str, prefix: str) -> list[str]:
    """Paths in ``directory`` named ``prefix<pid>...`` whose PID is no longer running."""
    if not os.path.isdir(directory):
        return []
    pattern = re.compile(re.escape(prefix) + r"(\d+)")
    out = []
    for name in sorted(os.listdir(directory)):
        m = pattern.match(name)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            out.append(os.path.join(directory, name))
    return out


def remove_dead_temporaries(directory: str, prefix: str, what: str) -> int:
    """Remove the dead temporaries ``prefix<pid>...`` in ``directory``, with a log line each."""
    n = 0
    for path in dead_temporaries(directory, prefix):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.remove(path)
            except FileNotFoundError:
                continue
        log.warning("removed %s left by a killed run: %s", what, path)
        n += 1
    return n
