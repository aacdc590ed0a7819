"""The ``mint-proxy`` command: serve, check a config, mint a token, run the demo.

    mint-proxy serve --config config.dev.toml --port 8000
    mint-proxy check                    # $MINT_PROXY_CONFIG or config.dev.toml, like serve
    mint-proxy token peak-picking
    mint-proxy demo

This is the only place in the package that prints or decides an exit status:
0 success, 1 a runtime failure (the server could not start), 2 a usage or
configuration error, whose message goes to stderr without a traceback.
"""

import argparse
import os
import sys
from collections.abc import Sequence

from . import __version__
from .devconfig import (
    CONFIG_ENV,
    LOG_FORMAT_ENV,
    SECRET_ENV,
    DevConfig,
    config_path_from_environ,
    describe_routes,
    load_dev_config,
    log_format_from_environ,
)
from .errors import DevConfigError
from .routing import Route
from .tokens import TokenIssuer

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
        "--log-format",
        choices=("text", "json"),
        help=f"the proxy's log lines as text or one JSON object each (default: ${LOG_FORMAT_ENV} or text)",
    )
    serve.set_defaults(run=_serve)

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
    token.add_argument("--ttl", type=float, default=900.0, metavar="SECONDS", help="lifetime (default: %(default)s)")
    token.add_argument(
        "--secret-env", default=SECRET_ENV, metavar="NAME", help="environment variable holding the secret (%(default)s)"
    )
    token.set_defaults(run=_token)

    demo = commands.add_parser("demo", help="run two demo plugins behind the proxy and print URLs to try")
    demo.add_argument("--port", type=_port, default=DEFAULT_PORT, help="the proxy's port (default: %(default)s)")
    demo.add_argument("--duration", type=float, metavar="SECONDS", help="stop by itself after this long")
    demo.set_defaults(run=_demo)
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

    from ._app import DevProxyApp

    environ = dict(os.environ)
    if args.config is not None:
        environ[CONFIG_ENV] = args.config
    if args.log_format is not None:
        environ[LOG_FORMAT_ENV] = args.log_format
    try:
        log_format_from_environ(environ)
        load_dev_config(config_path_from_environ(environ))
        if secret := environ.get(SECRET_ENV):
            TokenIssuer(secret)
    except DevConfigError as exc:
        return _error(str(exc))
    except ValueError as exc:  # the message names the rule, never the secret
        return _error(f"{SECRET_ENV}: {exc}")
    config = uvicorn.Config(
        app=DevProxyApp(environ=environ), host=args.host, port=args.port, http=args.http, log_level=args.log_level
    )
    server = uvicorn.Server(config)
    try:
        server.run()
    except KeyboardInterrupt:  # like `uvicorn`: Ctrl-C is a normal way to stop
        pass
    except SystemExit as exc:  # uvicorn exits when binding or the app's startup fails, after logging why
        return exc.code if isinstance(exc.code, int) and exc.code else EXIT_FAILURE
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


def _token(args: argparse.Namespace) -> int:
    secret = os.environ.get(args.secret_env)
    if not secret:
        return _error(
            f"{args.secret_env} is not set: export the secret the proxy signs with"
            " (generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    try:
        token = TokenIssuer(secret, ttl=args.ttl).token_for(args.plugin)
    except ValueError as exc:  # messages name the rule, never the secret
        return _error(f"{args.secret_env}: {exc}" if str(exc).startswith("secret") else str(exc))
    print(token)
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    if args.duration is not None and not args.duration > 0:
        return _error(f"--duration must be a positive number of seconds, got {args.duration!r}")
    return run_demo(args.port, args.duration)


if __name__ == "__main__":
    sys.exit(main())
