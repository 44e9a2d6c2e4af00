"""Managed workers die with their broker (Linux): a parent-death signal for the worker's group.

``anyio.open_process`` takes no ``preexec_fn``, so a worker is started through a tiny exec
wrapper: the broker's own interpreter, isolated and without ``site`` (so it starts in a few
milliseconds and imports nothing of ours), that

1. sets ``PR_SET_PDEATHSIG`` to SIGTERM (``prctl(2)``): the kernel sends it when the broker's
   thread that started it ends, a SIGKILL of the broker included. The setting survives
   ``execve``, so it is the worker's own from then on; if the broker is already gone by then,
   the wrapper exits instead;
2. forks a *watchdog*, which stays in the worker's process group (the worker leads its own, as
   ``start_new_session`` made it): it polls, every ``POLL`` seconds, that the broker (its PID and
   start time; a zombie not yet reaped counts as gone) is still there. Once it is not, it sends
   SIGTERM to the whole group (children that would ignore their leader's end included), waits
   up to the worker's ``stopTimeout`` for the leader to go, and then SIGKILLs the group, itself
   with it. It exits by itself when the
   leader ends while the broker lives (the supervisor then deals with what is left), and on a
   SIGTERM while the broker lives (a stop: ``procs.stop_tree`` signals the group). It holds no
   descriptor of the worker's (its stdio is /dev/null), so the broker's log pump sees the
   worker's output end when the worker's does;
3. ``execvp``\\ s the command, keeping the PID the broker spawned, so the PID recorded, watched
   and adopted is the worker's own and its command line is the command.

A process of the group that leaves it (``setsid``) is beyond the group signal: the watchdog's
SIGTERM and SIGKILL reach the group only. A worker with ``detach: true`` is started without the
wrapper: it survives its broker and the next start adopts it (``adopt.py``). Elsewhere than
Linux there is no parent-death signal: workers are started directly, and after a crash of the
broker the next start adopts or stops them (the state file and the environment marker find
them).
"""

from __future__ import annotations

import os
import sys

SUPPORTED = sys.platform.startswith("linux")
POLL = 0.2  # seconds between the watchdog's looks at the broker
NOT_FOUND = 127  # the wrapper's exit code when the command cannot be run (as a shell's)

_WRAPPER = r"""
import ctypes, os, signal, sys, time
broker, grace, argv = int(sys.argv[1]), float(sys.argv[2]), sys.argv[4:]
def born(pid):
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            stat = f.read()
        fields = stat[stat.rindex(b")") + 2:].split()
        return None if fields[0] in (b"Z", b"X") else fields[19]
    except (OSError, ValueError, IndexError):
        return None
broker_born = born(broker)
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(1, signal.SIGTERM, 0, 0, 0) != 0 or os.getppid() != broker or broker_born is None:
    sys.exit(1)
leader = os.getpid()
if os.fork() == 0:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.closerange(3, 1024)
    killing = []
    def on_term(signum, frame):
        if not killing:
            os._exit(0)
    signal.signal(signal.SIGTERM, on_term)
    while born(broker) == broker_born:
        if os.getppid() != leader:
            os._exit(0)
        time.sleep(POLL_S)
    killing.append(1)
    try:
        os.killpg(leader, signal.SIGTERM)
    except OSError:
        os._exit(0)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and os.getppid() == leader:
        time.sleep(0.05)
    try:
        os.killpg(leader, signal.SIGKILL)
    finally:
        os._exit(0)
try:
    os.execvp(argv[0], argv)
except OSError as exc:
    print("cannot run %r: %s" % (argv[0], exc.strerror or exc), flush=True)
    sys.exit(NOT_FOUND_CODE)
""".replace("POLL_S", repr(POLL)).replace("NOT_FOUND_CODE", str(NOT_FOUND))


def wrap(argv: list[str], grace: float) -> list[str]:
    """``argv`` run so that it dies with this process (and its group with it) where the OS
    allows; ``grace``: how long the group gets between SIGTERM and SIGKILL once we are gone."""
    if not SUPPORTED:
        return argv
    return [sys.executable, "-I", "-S", "-c", _WRAPPER, str(os.getpid()), f"{grace:g}", "--", *argv]
