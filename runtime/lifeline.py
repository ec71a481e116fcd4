"""A worker started by ``moesim run`` dies with its launcher, whenever and however the launcher dies.

torchrun starts each worker in a session of its own, so killing ``moesim run``'s process group does not reach
the workers; a parent-death signal set after ``import torch`` leaves a window of a second or more in which a
SIGKILLed launcher orphans them, and they then wait for a rendezvous that never comes. So, as the very first
thing a worker does (this module is imported by the package ``__init__``, before torch): set PR_SET_PDEATHSIG
to SIGKILL, and start a watchdog thread that exits the process once the launcher (``MOESIM_LAUNCHER_PID``) is
gone — which also covers a launcher that died before the signal could be set. Imports nothing heavy (the standard
library and moesim.io); does nothing unless the launcher set the variable.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading
import time

from moesim.io import pid_alive as alive  # standard library only: safe before torch

ENV = "MOESIM_LAUNCHER_PID"
POLL_S = 0.5


def _watch(pid: int) -> None:
    while alive(pid):
        time.sleep(POLL_S)
    os._exit(128 + signal.SIGKILL)


def arm() -> bool:
    """Tie this process's life to the launcher named in the environment; False when there is none."""
    text = os.environ.get(ENV, "")
    if not text.isdigit():
        return False
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: dies with its parent
    pid = int(text)
    if pid == os.getpid():  # the launcher itself imported the runtime package
        return False
    if not alive(pid):
        os._exit(128 + signal.SIGKILL)
    threading.Thread(target=_watch, args=(pid,), name="moesim-lifeline", daemon=True).start()
    return True
