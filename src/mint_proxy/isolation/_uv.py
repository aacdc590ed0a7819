"""Running the uv binary: one place that finds it, sets its environment and maps its failures."""

import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UvMissing


def find_uv(plugin: str = "") -> str:
    """The path of the uv binary shipped by the ``uv`` package; ``UvMissing`` if there is none."""
    try:
        import uv
    except ImportError as exc:
        raise UvMissing(plugin, "uv is not installed: pip install 'mint-proxy[isolation]'") from exc
    try:
        return uv.find_uv_bin()
    except FileNotFoundError as exc:
        raise UvMissing(plugin, "the uv package is installed but its binary is missing: reinstall uv") from exc


@dataclass(frozen=True)
class Sources:
    """Where distributions come from: ``find_links`` directories, and whether to skip the index.

    ``no_index`` defaults to "only if find_links were given": an air-gapped lab passes a
    wheelhouse and never reaches the network.
    """

    find_links: tuple[Path, ...] = ()
    no_index: bool | None = None

    def args(self) -> list[str]:
        args: list[str] = []
        for directory in self.find_links:
            args += ["--find-links", str(directory)]
        if self.no_index or (self.no_index is None and self.find_links):
            args.append("--no-index")
        return args


@dataclass(frozen=True)
class Uv:
    """A uv binary with its cache directory. ``binary=None`` means ``uv.find_uv_bin()``."""

    binary: str | None = None
    cache_dir: Path | None = None
    sources: Sources = field(default_factory=Sources)

    def run(self, args: Sequence[str], *, plugin: str) -> subprocess.CompletedProcess[str]:
        """Run ``uv ARGS``; never raises for a non-zero exit, only when uv cannot be run."""
        binary = self.binary or find_uv(plugin)
        env = dict(os.environ)
        env.pop("VIRTUAL_ENV", None)
        env["UV_PYTHON_DOWNLOADS"] = "never"  # use the platform's interpreter, never fetch one
        env["UV_NO_CONFIG"] = "1"  # a user's uv.toml must not change what a plugin gets
        env["NO_COLOR"] = "1"
        if self.cache_dir is not None:
            env["UV_CACHE_DIR"] = str(self.cache_dir)
        try:
            return subprocess.run([binary, *args], capture_output=True, text=True, env=env, check=False)
        except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
            raise UvMissing(plugin, f"cannot run uv at {binary}: {exc.strerror}") from exc


def uv_message(result: subprocess.CompletedProcess[str]) -> str:
    """uv's error text without its "Using Python ..." chatter, for an error message."""
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("Using ")]
    return "\n".join(lines).strip() or f"uv exited with status {result.returncode}"
