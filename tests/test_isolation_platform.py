"""The tools the isolation flow runs: the platform interpreter (``inspect_platform``) and uv (``find_uv``).

``tests/test_conflict.py`` and ``tests/test_install.py`` run both for real; here, what
happens when they are missing or broken.
"""

import sys
import types
from pathlib import Path

import pytest

from mint_proxy.isolation import PlatformEnvError, UvMissing
from mint_proxy.isolation._uv import find_uv
from mint_proxy.isolation.platform import inspect_platform


def test_an_interpreter_that_does_not_exist_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "venv" / "bin" / "python"
    with pytest.raises(PlatformEnvError, match=f"cannot run the platform interpreter {missing}: No such file"):
        inspect_platform(missing)


def test_an_interpreter_that_fails_is_named_with_its_last_line(tmp_path: Path) -> None:
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho 'starting' >&2\necho 'ImportError: no site' >&2\nexit 1\n")
    broken.chmod(0o755)
    with pytest.raises(
        PlatformEnvError, match=f"cannot inspect the platform interpreter {broken}: ImportError: no site"
    ):
        inspect_platform(broken)


def test_this_interpreter_is_inspected_with_its_installed_distributions() -> None:
    platform = inspect_platform()
    assert platform.python == sys.executable
    assert "packaging" in platform.dists


def test_without_uv_the_error_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uv", None)  # import uv raises ImportError
    with pytest.raises(UvMissing, match=r"uv is not installed: pip install 'mint-proxy\[isolation\]'"):
        find_uv("peak")


def test_a_uv_package_without_its_binary_asks_for_a_reinstall(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_binary() -> str:
        raise FileNotFoundError("uv")

    monkeypatch.setitem(sys.modules, "uv", types.SimpleNamespace(find_uv_bin=no_binary))
    with pytest.raises(UvMissing, match="the uv package is installed but its binary is missing: reinstall uv"):
        find_uv("peak")
