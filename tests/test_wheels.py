"""Reading a plugin wheel (``mint_proxy.isolation.wheels.read_wheel``): what it takes from the file, what it refuses.

The install and conflict tests read wheels on the way to a plan; here, the file alone.
"""

import zipfile
from pathlib import Path

import pytest

from mint_proxy.isolation import WheelError
from mint_proxy.isolation.wheels import read_wheel

from .wheels import make_wheel


def test_the_slug_and_app_come_from_the_one_mint_plugins_entry_point(tmp_path: Path) -> None:
    wheel = read_wheel(make_wheel(tmp_path, "Peak_Picking", "1.2", ["numpy>=1"], plugin=("peaks", "peak.app:app")))
    assert (wheel.slug, wheel.app, wheel.name, str(wheel.version)) == ("peaks", "peak.app:app", "peak-picking", "1.2")
    assert [str(requirement) for requirement in wheel.requires] == ["numpy>=1"]


def test_without_entry_points_the_slug_is_the_distribution_name_and_there_is_no_app(tmp_path: Path) -> None:
    wheel = read_wheel(make_wheel(tmp_path, "Peak_Picking", "1.0"))
    assert (wheel.slug, wheel.app) == ("peak-picking", None)


def test_entry_points_of_other_groups_are_not_a_plugin(tmp_path: Path) -> None:
    path = make_wheel(
        tmp_path, "tool", "1.0", modules={"tool-1.0.dist-info/entry_points.txt": "[console_scripts]\nt = m:f\n"}
    )
    assert (read_wheel(path).slug, read_wheel(path).app) == ("tool", None)


def _wheel_with(tmp_path: Path, files: dict[str, str]) -> Path:
    path = tmp_path / "odd-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return path


METADATA = "Metadata-Version: 2.1\nName: odd\nVersion: 1.0\n"


@pytest.mark.parametrize(
    ("files", "problem"),
    [
        pytest.param({"odd/__init__.py": ""}, "is not a wheel: expected one .dist-info directory, found 0", id="none"),
        pytest.param(
            {"a-1.0.dist-info/METADATA": METADATA, "b-1.0.dist-info/METADATA": METADATA},
            "is not a wheel: expected one .dist-info directory, found 2",
            id="two",
        ),
        pytest.param({"odd-1.0.dist-info/WHEEL": ""}, "has no odd-1.0.dist-info/METADATA", id="no-metadata"),
        pytest.param(
            {"odd-1.0.dist-info/METADATA": METADATA, "odd-1.0.dist-info/entry_points.txt": "[mint.plugins\n"},
            "entry_points.txt does not parse",
            id="entry-points-unparsable",
        ),
        pytest.param(
            {
                "odd-1.0.dist-info/METADATA": METADATA,
                "odd-1.0.dist-info/entry_points.txt": "[mint.plugins]\na = m:a\nb = m:b\n",
            },
            "declares 2 [mint.plugins] entry points; a wheel is one plugin",
            id="two-plugins",
        ),
    ],
)
def test_an_archive_that_is_not_one_plugin_wheel_is_refused(
    tmp_path: Path, files: dict[str, str], problem: str
) -> None:
    with pytest.raises(WheelError) as caught:
        read_wheel(_wheel_with(tmp_path, files))
    assert problem in str(caught.value)


@pytest.mark.parametrize(
    ("name", "problem"),
    [pytest.param("missing.whl", "does not exist", id="missing"), pytest.param("dir.whl", "is a directory", id="dir")],
)
def test_a_path_that_is_no_file_is_refused_by_name(tmp_path: Path, name: str, problem: str) -> None:
    (tmp_path / "dir.whl").mkdir()
    with pytest.raises(WheelError, match=f"{tmp_path / name} {problem}"):
        read_wheel(tmp_path / name)
