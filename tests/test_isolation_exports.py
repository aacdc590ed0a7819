"""``mint_proxy.isolation``'s public names resolve, and importing it (or mint_plugin) pulls in no extra."""

import subprocess
import sys

import pytest

import mint_proxy.isolation


def test_all_is_sorted_and_resolves() -> None:
    assert mint_proxy.isolation.__all__ == sorted(mint_proxy.isolation.__all__)
    assert [name for name in mint_proxy.isolation.__all__ if getattr(mint_proxy.isolation, name, None) is None] == []


def test_a_name_the_package_does_not_export_is_an_attribute_error() -> None:
    """The lazy exports look up only their own names: a typo fails like it would on any module."""
    with pytest.raises(AttributeError, match="module 'mint_proxy.isolation' has no attribute 'provison'"):
        mint_proxy.isolation.provison  # noqa: B018


def test_importing_the_package_and_the_cli_needs_no_extra() -> None:
    """``mint-proxy`` builds its parser (with plan/install) without packaging, uv or httpx imported."""
    code = (
        "import sys, mint_proxy.isolation, mint_proxy.cli, mint_plugin; mint_proxy.cli._parser();"
        "print(sorted(m for m in ('packaging', 'uv', 'httpx', 'mint_proxy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['mint_proxy']"


def test_mint_plugin_never_imports_mint_proxy() -> None:
    """The plugin-side package (and its client) is copied into plugin venvs without mint_proxy."""
    code = "import sys, mint_plugin, mint_plugin.client; print('mint_proxy' in sys.modules)"
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
