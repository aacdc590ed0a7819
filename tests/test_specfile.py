"""The installer's writes to the spec file (``mint_proxy.isolation.specfile``), on plain files.

``tests/test_install.py`` runs whole installs (and two concurrent writers); here, the file
edits and their refusals.
"""

from pathlib import Path

import pytest

from mint_proxy.isolation import InstallError
from mint_proxy.isolation.specfile import SpecEntry, managed_entries, update_spec_file

HAND_WRITTEN = '# my routes\n[settings]\nmount_path = "/api"\n\n[proxy]\n"/legacy" = "http://127.0.0.1:8004"\n'


def test_a_reinstall_replaces_its_block_and_keeps_the_rest_byte_for_byte(tmp_path: Path) -> None:
    path = tmp_path / "spec.toml"
    path.write_text(HAND_WRITTEN)
    update_spec_file(path, [SpecEntry("peak", "isolated", "peak:app", python="/venvs/a/bin/python")])
    update_spec_file(path, [SpecEntry("other", "shared", "other:app")])
    update_spec_file(path, [SpecEntry("peak", "shared", "peak:app")])
    text = path.read_text()
    assert text.startswith(HAND_WRITTEN)
    assert "/venvs/a/bin/python" not in text and text.count("# >>> mint-proxy install: peak\n") == 1
    assert managed_entries(path) == {"other": "shared", "peak": "shared"}


def test_a_file_that_is_not_toml_is_refused_and_left_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "spec.toml"
    path.write_text("[proxy\n")
    with pytest.raises(InstallError, match=f"{path}: not valid TOML, left unchanged"):
        update_spec_file(path, [SpecEntry("peak", "shared", "peak:app")])
    assert path.read_text() == "[proxy\n"


def test_a_route_written_by_hand_under_the_plugins_prefix_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "spec.toml"
    path.write_text('[proxy]\n"/peak" = "http://127.0.0.1:9"\n')
    with pytest.raises(InstallError, match=r'key proxy\."/peak" is already defined by hand'):
        update_spec_file(path, [SpecEntry("peak", "isolated", "peak:app")])
    assert path.read_text() == '[proxy]\n"/peak" = "http://127.0.0.1:9"\n'


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        pytest.param("missing-dir/spec.toml", "cannot lock the spec file: No such file or directory", id="no-dir"),
        pytest.param("a-directory", "cannot read the spec file: Is a directory", id="not-a-file"),
    ],
)
def test_a_spec_file_that_cannot_be_locked_or_read_is_an_error_naming_it(
    tmp_path: Path, name: str, problem: str
) -> None:
    (tmp_path / "a-directory").mkdir()
    path = tmp_path / name
    with pytest.raises(InstallError, match=f"{path}: {problem}"):
        update_spec_file(path, [SpecEntry("peak", "shared", "peak:app")])
