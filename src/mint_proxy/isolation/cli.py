"""``mint-proxy plan``, ``install`` and ``recheck``: the isolation commands.

``mint_proxy.cli`` calls ``add_commands``; each command returns an exit status and
prints errors as one line (or a few, for uv's explanation) without a traceback.
"""

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .errors import InstallError

if TYPE_CHECKING:
    from .decision import Decision

_Command = Callable[[argparse.Namespace], int]

EXIT_OK = 0
EXIT_FAILURE = 1


def add_commands(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add ``plan``, ``install`` and ``recheck`` to the ``mint-proxy`` command."""
    plan = subparsers.add_parser("plan", help="decide shared or isolated for plugin wheels; changes nothing")
    plan.add_argument("wheels", nargs="+", metavar="WHEEL", help="a plugin wheel, optionally with [extra,...]")
    _common(plan)
    plan.add_argument("--json", action="store_true", help="print a JSON list of decisions")
    plan.set_defaults(run=_plan)

    install = subparsers.add_parser("install", help="install plugin wheels and write them into the spec file")
    install.add_argument("wheels", nargs="+", metavar="WHEEL", help="a plugin wheel, optionally with [extra,...]")
    install.add_argument("--config", default="plugins.toml", metavar="FILE", help="the spec file (%(default)s)")
    install.add_argument("--home", metavar="DIR", help="venvs, uv cache and wheel copies (<config dir>/.mint-plugins)")
    _common(install)
    install.set_defaults(run=_install)

    recheck = subparsers.add_parser("recheck", help="decide the shared plugins again after the platform changed")
    recheck.add_argument("--config", default="plugins.toml", metavar="FILE", help="the spec file (%(default)s)")
    recheck.add_argument("--home", metavar="DIR", help="venvs, uv cache and wheel copies (<config dir>/.mint-plugins)")
    recheck.add_argument("--apply", action="store_true", help="move plugins that now clash to isolated mode")
    _common(recheck)
    recheck.add_argument("--json", action="store_true", help="print a JSON list of decisions")
    recheck.set_defaults(run=_recheck)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--python", metavar="PY", help="the platform's interpreter (default: this one)")
    parser.add_argument("--find-links", action="append", default=[], metavar="DIR", help="a wheelhouse (repeatable)")
    parser.add_argument("--no-index", action="store_true", default=None, help="never use the package index")
    parser.add_argument("--overrides", metavar="FILE", help='JSON {"plugins": {"forceIsolated": [...], ...}}')


def _options(args: argparse.Namespace) -> dict[str, object]:
    from .overrides import load_overrides

    return {
        "python": args.python,
        "find_links": args.find_links,
        "no_index": args.no_index,
        "overrides": load_overrides(args.overrides) if args.overrides else None,
    }


def _guarded(run: _Command) -> _Command:
    def guarded(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except ModuleNotFoundError as exc:  # packaging or uv missing: the extra is not installed
            if exc.name not in ("packaging", "uv", "httpx"):
                raise
            print(f"mint-proxy: error: {exc.name} is missing: pip install 'mint-proxy[isolation]'", file=sys.stderr)
        except InstallError as exc:
            print(f"mint-proxy: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE

    return guarded


def _table(decisions: Sequence["Decision"]) -> str:
    rows = [("plugin", "mode", "forced", "clashes")]
    for decision in decisions:
        clashes = list(decision.clashes) or [decision.reason]
        rows.append((decision.plugin, decision.mode, "yes" if decision.forced else "no", clashes[0]))
        rows += [("", "", "", clash) for clash in clashes[1:]]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(
        "  ".join([*(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True)), row[3]]) for row in rows
    )


def _print(decisions: Sequence["Decision"], as_json: bool) -> None:
    if as_json:
        print(json.dumps([decision.to_json() for decision in decisions], indent=2))
    else:
        print(_table(decisions))


def _plan_impl(args: argparse.Namespace) -> int:
    from .flow import plan

    _print(plan(args.wheels, **_options(args)), args.json)  # type: ignore[arg-type]
    return EXIT_OK


def _install_impl(args: argparse.Namespace) -> int:
    from .flow import install

    results = install(args.wheels, config=args.config, home=args.home, **_options(args))  # type: ignore[arg-type]
    _print([result.decision for result in results], False)
    for result in results:
        if result.env is not None:
            print(f"{result.decision.plugin}: venv {result.env.path} ({'reused' if result.env.reused else 'built'})")
    print(f"wrote {args.config}")
    return EXIT_OK


def _recheck_impl(args: argparse.Namespace) -> int:
    from .flow import recheck

    decisions = recheck(config=args.config, home=args.home, apply=args.apply, **_options(args))  # type: ignore[arg-type]
    _print(decisions, args.json)
    return EXIT_OK


_plan = _guarded(_plan_impl)
_install = _guarded(_install_impl)
_recheck = _guarded(_recheck_impl)
