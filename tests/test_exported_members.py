"""``mint_proxy.__all__`` is the public API: sorted, complete and resolvable (like httpx's test)."""

import types

import mint_proxy


def isort_style(name: str) -> tuple[int, str]:
    """Ruff's RUF022 "isort-style" order: CONSTANTS, then Classes, then everything else, each alphabetical."""
    group = 0 if name.isupper() else 1 if name[:1].isupper() else 2
    return group, name


def test_all_is_sorted() -> None:
    assert mint_proxy.__all__ == sorted(mint_proxy.__all__, key=isort_style)


def test_all_has_no_duplicates() -> None:
    assert len(mint_proxy.__all__) == len(set(mint_proxy.__all__))


def test_every_name_in_all_exists() -> None:
    assert [name for name in mint_proxy.__all__ if not hasattr(mint_proxy, name)] == []


def test_every_public_name_in_the_package_is_in_all() -> None:
    public = {
        name
        for name, value in vars(mint_proxy).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert sorted(public - set(mint_proxy.__all__)) == []


def test_version_is_a_string() -> None:
    assert isinstance(mint_proxy.__version__, str)
    assert mint_proxy.__version__
