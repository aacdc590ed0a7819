"""The parent of a ``command`` plugin: it ends the command when the supervisor dies.

Run by file path with the platform's interpreter (``python -I -S _watchdog.py``),
standard library only::

    _watchdog.py --lifeline FD [--keep-fd FD ...] [--grace SECONDS] -- ARGV...

An arbitrary command cannot arm ``PR_SET_PDEATHSIG`` or watch a pipe, and
``exec`` would lose the watchdog, so the watchdog stays its parent: the supervisor
starts the watchdog as the leader of a new process group, the watchdog starts the
command in that same group (a plain fork+exec, never a shell), and then waits for
either of two things:

* the command exits: the watchdog exits the same way (same code, or the same
  signal raised on itself), so the supervisor sees what the command did;
* EOF on the lifeline pipe (the supervisor's write end closed: it exited or was
  SIGKILLed): SIGTERM to the whole group, SIGKILL after ``--grace`` seconds.

SIGTERM/SIGINT/SIGHUP sent to the watchdog alone are ignored: the supervisor
always signals the whole group, so the command gets them directly and the
watchdog leaves when the command does. ``--keep-fd`` passes an inherited listening
socket on to the command (``{fd}``/``{port}`` placeholders).
"""

import os
import select
import signal
import subprocess
import sys
import time


def _parse(argv: list[str]) -> tuple[int, list[int], float, list[str]]:
    if "--" not in argv:
        raise SystemExit("usage: _watchdog.py --lifeline FD [--keep-fd FD] [--grace S] -- ARGV...")
    split = argv.index("--")
    options, command = argv[:split], argv[split + 1 :]
    lifeline, keep, grace = -1, [], 5.0
    for name, value in zip(options[::2], options[1::2], strict=True):
        if name == "--lifeline":
            lifeline = int(value)
        elif name == "--keep-fd":
            keep.append(int(value))
        elif name == "--grace":
            grace = float(value)
        else:
            raise SystemExit(f"_watchdog.py: unknown option {name}")
    if lifeline < 0 or not command:
        raise SystemExit("_watchdog.py: --lifeline and a command are required")
    return lifeline, keep, grace, command


def _stop_group(child: "subprocess.Popen[bytes]", grace: float) -> None:
    os.killpg(0, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(0, signal.SIGKILL)  # ends the watchdog too


def main(argv: list[str]) -> int:
    lifeline, keep, grace, command = _parse(argv)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: None)
    try:
        child = subprocess.Popen(command, pass_fds=keep)
    except OSError as exc:
        print(f"cannot start {command[0]!r}: {exc.strerror}", file=sys.stderr)
        return 127
    for fd in keep:
        os.close(fd)
    pidfd = os.pidfd_open(child.pid) if hasattr(os, "pidfd_open") else -1
    watched = [lifeline] + ([pidfd] if pidfd >= 0 else [])
    while child.poll() is None:
        readable, _, _ = select.select(watched, [], [], None if pidfd >= 0 else 0.2)
        if lifeline in readable and not os.read(lifeline, 512):
            _stop_group(child, grace)
    code = child.returncode
    if code < 0:
        if -code != signal.SIGKILL:
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        time.sleep(1)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
