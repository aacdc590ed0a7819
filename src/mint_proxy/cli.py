"""The ``mint-proxy`` command: serve, supervise, status, check a config, mint a token, run the demo.

    mint-proxy serve --config config.dev.toml --port 8000 [--platform mint.platform:app]
    mint-proxy supervise config.dev.toml        # the plugins alone, as a service of their own
    mint-proxy status [--json]                  # what the supervisor reports
    mint-proxy check                            # $MINT_PROXY_CONFIG or config.dev.toml, like serve
    mint-proxy token peak-picking [--kid K]
    mint-proxy demo

This is the only place in the package that prints or decides an exit status:
0 success, 1 a runtime failure (the server could not start), 2 a usage or
configuration error, whose message goes to stderr without a traceback.
"""

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from . import __version__
from .devconfig import (
    CONFIG_ENV,
    KID_ENV,
    LOG_FORMAT_ENV,
    SECRET_ENV,
    DevConfig,
    config_path_from_environ,
    describe_routes,
    load_dev_config,
    log_format_from_environ,
    runtime_dir_for,
)
from .errors import DevConfigError, MintProxyError
from .routing import Route
from .tokens import DEFAULT_TTL, TokenIssuer

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
HTTP_IMPLEMENTATIONS = ("auto", "h11", "httptools")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
DEFAULT_PORT = 8000


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``) and return the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors: argparse has printed the text
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    status: int = args.run(args)
    return status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mint-proxy", description="Prefix-routing, streaming reverse proxy that runs MINT plugins out of process."
    )
    parser.add_argument("--version", action="version", version=f"mint-proxy {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the proxy on a config file with uvicorn")
    serve.add_argument("--config", metavar="PATH", help=f"the config file (default: ${CONFIG_ENV} or config.dev.toml)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    serve.add_argument("--port", type=_port, default=DEFAULT_PORT, help="port to bind (default: %(default)s)")
    serve.add_argument("--http", choices=HTTP_IMPLEMENTATIONS, default="auto", help="uvicorn's HTTP implementation")
    serve.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="log level (default: %(default)s)")
    serve.add_argument(
        "--platform",
        metavar="TARGET",
        help="where requests matching no route go: an import string (mint.platform:app) or a URL (http://...)",
    )
    serve.add_argument(
        "--log-format",
        choices=("text", "json"),
        help=f"the proxy's log lines as text or one JSON object each (default: ${LOG_FORMAT_ENV} or text)",
    )
    serve.set_defaults(run=_serve)

    supervise = commands.add_parser("supervise", help="run the config's plugins without serving HTTP")
    supervise.add_argument("config", metavar="CONFIG", help="the config file naming the plugins")
    supervise.set_defaults(run=_supervise)

    status = commands.add_parser("status", help="show the plugins' state from the runtime dir")
    where = status.add_mutually_exclusive_group()
    where.add_argument("--config", metavar="PATH", help="read the runtime dir from this config file")
    where.add_argument("--runtime-dir", metavar="DIR", help="the runtime dir (default: $MINT_PROXY_RUNTIME_DIR)")
    status.add_argument("--json", action="store_true", help="print the JSON document the status app serves")
    status.set_defaults(run=_status)

    check = commands.add_parser("check", help="validate a config file and print its routes")
    check.add_argument(
        "config",
        metavar="CONFIG",
        nargs="?",
        help=f"the config file to check (default: ${CONFIG_ENV} or config.dev.toml)",
    )
    check.set_defaults(run=_check)

    token = commands.add_parser("token", help="print an internal token for a plugin, to debug its callbacks")
    token.add_argument("plugin", metavar="PLUGIN", help="the plugin slug, the token's subject")
    token.add_argument(
        "--ttl", type=float, default=DEFAULT_TTL, metavar="SECONDS", help="lifetime (default: %(default)s)"
    )
    token.add_argument(
        "--secret-env", default=SECRET_ENV, metavar="NAME", help="environment variable holding the secret (%(default)s)"
    )
    token.add_argument("--kid", metavar="KID", help=f"the token's key id (default: ${KID_ENV}, else none)")
    token.set_defaults(run=_token)

    demo = commands.add_parser("demo", help="run two demo plugins behind the proxy and print URLs to try")
    demo.add_argument("--port", type=_port, default=DEFAULT_PORT, help="the proxy's port (default: %(default)s)")
    demo.add_argument("--duration", type=float, metavar="SECONDS", help="stop by itself after this long")
    demo.set_defaults(run=_demo)

    from .isolation.cli import add_commands  # plan, install, recheck (the isolation extra)

    add_commands(commands)
    return parser


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)")
    return int(text)


def _error(message: str) -> int:
    print(f"mint-proxy: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ._app import PLATFORM_URL_ENV, DevProxyApp
    from ._platform import platform_app

    environ = dict(os.environ)
    if args.config is not None:
        environ[CONFIG_ENV] = args.config
    if args.log_format is not None:
        environ[LOG_FORMAT_ENV] = args.log_format
    platform = None
    try:
        log_format_from_environ(environ)
        load_dev_config(config_path_from_environ(environ), environ=environ)
        if secret := environ.get(SECRET_ENV):
            TokenIssuer(secret)
        if args.platform:
            platform = platform_app(args.platform)
            # Plugins call the platform back: through this proxy, or straight at a platform run by hand.
            own = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
            environ.setdefault(PLATFORM_URL_ENV, args.platform if "://" in args.platform else own)
    except MintProxyError as exc:
        return _error(str(exc))
    except ValueError as exc:  # the message names the rule, never the secret
        return _error(f"{SECRET_ENV}: {exc}")
    config = uvicorn.Config(
        app=DevProxyApp(environ=environ, platform=platform),
        host=args.host,
        port=args.port,
        http=args.http,
        log_level=args.log_level,
    )
    server = uvicorn.Server(config)
    try:
        server.run()
    except KeyboardInterrupt:  # like `uvicorn`: Ctrl-C is a normal way to stop
        pass
    except SystemExit:  # uvicorn exits (status 3) when binding or the app's startup fails, after logging why
        return EXIT_FAILURE
    return EXIT_OK if server.started else EXIT_FAILURE


def _check(args: argparse.Namespace) -> int:
    try:
        config = load_dev_config(args.config or config_path_from_environ(os.environ))
    except DevConfigError as exc:
        return _error(str(exc))
    print(_describe(config))
    if not len(config.routes):
        print(f"mint-proxy: warning: {config.path}: {describe_routes(config.routes)}", file=sys.stderr)
    return EXIT_OK


def _describe(config: DevConfig) -> str:
    """The config as aligned text: a summary line, then one row per route."""
    count = len(config.routes)
    summary = (
        f"{config.path}: OK, {count} route{'' if count == 1 else 's'}, "
        f'mount_path "{config.mount_path}", retry_window {config.retry_window:g}s, '
        f'admin_path "{config.admin_path}"'
    )

    if not count:
        return summary
    header = ("prefix", "upstream", "plugin", "strip_prefix", "connect_timeout", "read_timeout", "max_body_bytes")
    rows = [header, *(_row(route) for route in config.routes)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join([summary, "", *lines])


def _row(route: Route) -> tuple[str, ...]:
    limit = "-" if route.max_body_bytes is None else str(route.max_body_bytes)
    return (
        route.prefix,
        route.url,
        route.plugin,
        "yes" if route.strip_prefix else "no",
        f"{route.connect_timeout:g}s",
        f"{route.read_timeout:g}s",
        limit,
    )


def _supervise(args: argparse.Namespace) -> int:
    from ._supervise import run_supervisor

    environ = dict(os.environ)
    environ[CONFIG_ENV] = args.config
    try:
        load_dev_config(args.config, environ=environ)
    except DevConfigError as exc:
        return _error(str(exc))
    return run_supervisor(environ)


def _status(args: argparse.Namespace) -> int:
    from .plugins._views import status_document

    try:
        if args.config is not None:
            runtime_dir = load_dev_config(args.config, environ=os.environ).runtime_dir
        else:
            runtime_dir = runtime_dir_for(args.runtime_dir or "", os.environ)
        document = status_document(runtime_dir)
    except MintProxyError as exc:
        return _error(str(exc))
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print(_describe_status(document))
    return EXIT_OK if document["supervisor"] is not None else EXIT_FAILURE


def _describe_status(document: dict[str, Any]) -> str:
    """The status document as text: who supervises, then one row per plugin."""
    supervisor = document["supervisor"]
    if supervisor is None:
        return f"{document['runtime_dir']}: no supervisor has written a state file here yet"
    running = "running" if supervisor["running"] else "NOT running (the states below are its last word)"
    lines = [f"{document['runtime_dir']}: supervisor pid {supervisor['pid']} {running}"]
    if not document["plugins"]:
        return lines[0] + "; no plugins"
    now = time.time()
    header = ("plugin", "state", "pid", "restarts", "for", "last exit", "endpoint")
    rows = [header]
    for slug, plugin in document["plugins"].items():
        rows.append(
            (
                slug,
                plugin["state"],
                "-" if plugin["pid"] is None else str(plugin["pid"]),
                str(plugin["restarts"]),
                _age(now - plugin["since"]) if plugin["since"] else "-",
                plugin["last_exit"] or "-",
                plugin["endpoint"],
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    table = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join([*lines, "", *table])


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _token(args: argparse.Namespace) -> int:
    secret = os.environ.get(args.secret_env)
    if not secret and args.secret_env == SECRET_ENV:
        secret = _generated_secret()
    if not secret:
        return _error(
            f"{args.secret_env} is not set: export the secret the proxy signs with"
            " (generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    kid = args.kid if args.kid is not None else os.environ.get(KID_ENV) or None
    try:
        token = TokenIssuer(secret, ttl=args.ttl, kid=kid).token_for(args.plugin)
    except ValueError as exc:  # messages name the rule, never the secret
        if str(exc).startswith("kid"):
            return _error(f"--kid: {exc}")
        return _error(f"{args.secret_env}: {exc}" if str(exc).startswith("secret") else str(exc))
    print(token)
    return EXIT_OK


def _generated_secret() -> str | None:
    """The secret the proxy generated in the default runtime dir when it ran without one, if any."""
    from .plugins._secret import SECRET_FILE, shared_secret

    try:
        runtime_dir = runtime_dir_for("", os.environ)
        if not os.path.exists(os.path.join(runtime_dir, SECRET_FILE)):
            return None
        return shared_secret(runtime_dir)
    except MintProxyError:
        return None


def _demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    if args.duration is not None and not args.duration > 0:
        return _error(f"--duration must be a positive number of seconds, got {args.duration!r}")
    return run_demo(args.port, args.duration)


if __name__ == "__main__":
    sys.exit(main())
