"""How a spec becomes a process: argv, a clean environment, and the endpoint it listens on.

``app`` plugins run ``<python> <mint_plugin/host.py> --app ... --uds <runtime_dir>/<slug>.sock``
directly (no shell, no ``uv run``): the host is the process-group leader and the
server itself. ``command`` plugins run under the stdlib-only watchdog (see
``_watchdog.py``), which is their parent and ends them when the supervisor dies.

Placeholders in a ``command``:

* ``{socket}``: the Unix socket path ``<runtime_dir>/<slug>.sock`` (the default endpoint);
* ``{fd}``: the number of a listening TCP socket on 127.0.0.1 that the supervisor
  bound and passes down (``uvicorn --fd {fd}``). ``{port}`` is its port;
* ``{port}`` without ``{fd}``: the supervisor binds 127.0.0.1:0 with SO_REUSEADDR
  but does not listen, holding the port for the plugin's lifetime (no other
  program is handed that port by the kernel), and the command binds that port
  itself with SO_REUSEADDR (as uvicorn, ``http.server`` and most servers do).
  Never bind-close-handover. The port stays the same across restarts.
"""

import os
import signal
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import mint_plugin

from .spec import PluginSpec

HOST_PATH = os.path.join(os.path.dirname(os.path.abspath(mint_plugin.__file__)), "host.py")
WATCHDOG_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_watchdog.py")

# The only variables a plugin inherits from the platform's environment.
INHERITED_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "SYSTEMROOT")


def plugin_environment(
    spec: PluginSpec, *, platform_url: str | None, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """A minimal clean environment, ``spec.env`` on top, and the MINT_* variables the contract names."""
    parent = os.environ if environ is None else environ
    env = {name: parent[name] for name in INHERITED_ENV if name in parent}
    env.setdefault("PATH", os.defpath)
    env["PYTHONUNBUFFERED"] = "1"
    if platform_url:
        env["MINT_PLATFORM_URL"] = platform_url
    env.update(spec.env)
    env["MINT_PLUGIN_SLUG"] = spec.slug
    return env


@dataclass
class Endpoint:
    """Where a plugin listens: ``url`` for the route and the probe; ``sock`` if the supervisor holds one."""

    url: str
    sock: socket.socket | None = None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def make_endpoint(spec: PluginSpec, runtime_dir: str) -> Endpoint:
    """The plugin's endpoint; binds the loopback socket once for ``{fd}``/``{port}`` commands."""
    command = " ".join(spec.command or ())
    if "{fd}" not in command and "{port}" not in command:
        return Endpoint("unix:" + spec.socket_path(runtime_dir))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted connections inherit it: a server handed a pre-bound socket otherwise answers
        # each keep-alive request after the first ~40 ms late (Nagle + delayed ACK).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(("127.0.0.1", 0))
        if "{fd}" in command:
            sock.listen(128)
    except OSError:
        sock.close()
        raise
    port = sock.getsockname()[1]
    return Endpoint(f"http://127.0.0.1:{port}", sock)


def plugin_argv(
    spec: PluginSpec, endpoint: Endpoint, runtime_dir: str, *, lifeline: int
) -> tuple[list[str], tuple[int, ...]]:
    """The argv to exec and the fds to pass (the lifeline's read end, the held socket)."""
    grace = f"{spec.stop_timeout:g}"
    if spec.app is not None:
        python = spec.python or sys.executable
        argv = [python, HOST_PATH, "--app", spec.app, "--uds", spec.socket_path(runtime_dir)]
        argv += ["--lifeline", str(lifeline), "--parent", str(os.getpid()), "--grace", grace]
        return argv, (lifeline,)
    replacements = {"{socket}": spec.socket_path(runtime_dir)}
    keep: tuple[int, ...] = ()
    if endpoint.sock is not None:
        replacements["{port}"] = str(endpoint.sock.getsockname()[1])
        replacements["{fd}"] = str(endpoint.sock.fileno())
        keep = (endpoint.sock.fileno(),)
    command = []
    for part in spec.command or ():
        for placeholder, value in replacements.items():
            part = part.replace(placeholder, value)
        command.append(part)
    argv = [sys.executable, "-I", "-S", WATCHDOG_PATH, "--lifeline", str(lifeline), "--grace", grace]
    for fd in keep:
        argv += ["--keep-fd", str(fd)]
    return [*argv, "--", *command], (lifeline, *keep)


def describe_exit(returncode: int) -> str:
    """``"exit 1"`` or ``"signal SIGKILL"``."""
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit {returncode}"
