"""The decision: shared only when nothing installed clashes, with every clash named in words."""

import json
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from mint_proxy.isolation import (
    InvalidPluginName,
    Overrides,
    OverridesError,
    UnsatisfiableRequirement,
    UvMissing,
    WheelError,
    load_overrides,
    plan,
)
from mint_proxy.isolation.conflict import stage1
from mint_proxy.isolation.platform import InstalledDist, PlatformEnv, inspect_platform
from mint_proxy.isolation.wheels import PluginWheel

from .isolation_support import PlatformVenv, Wheelhouse
from .wheels import make_wheel

pytestmark = pytest.mark.usefixtures("wheelhouse")

MARKERS = {
    "implementation_name": "cpython",
    "implementation_version": "3.11.2",
    "os_name": "posix",
    "platform_machine": "x86_64",
    "platform_release": "6.1",
    "platform_system": "Linux",
    "platform_version": "#1",
    "python_full_version": "3.11.2",
    "platform_python_implementation": "CPython",
    "python_version": "3.11",
    "sys_platform": "linux",
}


def _platform(**dists: str) -> PlatformEnv:
    installed = {canonicalize_name(name): InstalledDist(name, version) for name, version in dists.items()}
    installed[canonicalize_name("mint-platform")] = InstalledDist("mint-platform", "1.0", ("fakenum<2",))
    return PlatformEnv(python="python", markers=MARKERS, dists=installed)


def _wheel(*requires: str, extras: frozenset[str] = frozenset()) -> PluginWheel:
    return PluginWheel(
        path=Path("p.whl"),
        slug="plug",
        name=canonicalize_name("plug"),
        version=Version("1.0"),
        requires=tuple(Requirement(line) for line in requires),
        extras=frozenset(canonicalize_name(extra) for extra in extras),
        app=None,
        sha256="",
    )


def _plugin(house: Wheelhouse, name: str, *requires: str, **options: object) -> Path:
    directory = house.path.parent / f"plugins-{name}"
    return make_wheel(directory, name, "1.0", requires, **options)  # type: ignore[arg-type]


def _plan(platform: PlatformVenv, house: Wheelhouse, *wheels: str | Path, **options: object):  # type: ignore[no-untyped-def]
    return plan(wheels, python=platform.python, find_links=[house.path], **options)  # type: ignore[arg-type]


# --- the decision, end to end through plan() -------------------------------------------------


def test_no_clash_is_shared(platform_venv: PlatformVenv, wheelhouse: Wheelhouse) -> None:
    """A plugin whose requirements the installed versions already meet goes shared."""
    (decision,) = _plan(platform_venv, wheelhouse, _plugin(wheelhouse, "ok-plug", "fakenum>=1.20"))
    assert (decision.plugin, decision.mode, decision.forced, decision.clashes) == ("ok-plug", "shared", False, ())


def test_direct_clash_is_isolated_and_named(platform_venv: PlatformVenv, wheelhouse: Wheelhouse) -> None:
    """A direct requirement that excludes the installed version is caught by stage 1 and named."""
    (decision,) = _plan(platform_venv, wheelhouse, _plugin(wheelhouse, "direct", "fakenum>=2"))
    assert decision.mode == "isolated"
    assert decision.clashes == (
        "direct needs fakenum>=2; the platform has fakenum 1.26.4 (mint-platform needs fakenum<2)",
    )
    assert decision.reason.startswith("stage 1")


def test_transitive_clash_is_isolated_and_names_the_path(platform_venv: PlatformVenv, wheelhouse: Wheelhouse) -> None:
    """A dependency's dependency that needs what the platform cannot have is found by uv (stage 2)."""
    (decision,) = _plan(platform_venv, wheelhouse, _plugin(wheelhouse, "peak-picking", "fakesci>=1.15"))
    assert decision.mode == "isolated"
    assert decision.reason.startswith("stage 2")
    assert decision.clashes == (
        "peak-picking needs fakenum>=2 (through fakesci 1.15.0); the platform has fakenum 1.26.4"
        " (mint-platform needs fakenum<2)",
    )


def test_a_compatible_older_dependency_keeps_it_shared(platform_venv: PlatformVenv, wheelhouse: Wheelhouse) -> None:
    """uv may pick an older version of a new dependency that fits the platform: that is shared."""
    (decision,) = _plan(platform_venv, wheelhouse, _plugin(wheelhouse, "any-sci", "fakesci"))
    assert decision.mode == "shared"
    assert [(dist.name, dist.version) for dist in decision.would_install if dist.name == "fakesci"] == [
        ("fakesci", "1.10.0")
    ]


def test_clash_with_a_shared_plugin_planned_before(platform_venv: PlatformVenv, wheelhouse: Wheelhouse) -> None:
    """A plugin decided shared counts as part of the platform for the plugins after it."""
    first = _plugin(wheelhouse, "plugin-a", "newdep<2")
    second = _plugin(wheelhouse, "plugin-b", "newdep>=2")
    a, b = _plan(platform_venv, wheelhouse, first, second)
    assert a.mode == "shared"
    assert b.mode == "isolated"
    assert b.clashes == (
        "plugin-b needs newdep>=2; a shared plugin planned before it brings newdep 1.0 (plugin-a needs newdep<2)",
    )


def test_clash_with_a_shared_plugin_planned_before_through_uv(
    platform_venv: PlatformVenv, wheelhouse: Wheelhouse
) -> None:
    """The earlier shared plugin's new dependencies are pinned in stage 2 as well."""
    first = _plugin(wheelhouse, "plugin-c", "newdep<2")
    second = _plugin(wheelhouse, "plugin-d", "fakesci", "newdep-user")
    make_wheel(wheelhouse.path.parent / "plugins-plugin-d", "newdep-user", "1.0", ["newdep>=2"])
    c, d = plan(
        [first, second], python=platform_venv.python,
        find_links=[wheelhouse.path, wheelhouse.path.parent / "plugins-plugin-d"],
    )  # fmt: skip
    assert c.mode == "shared"
    assert d.mode == "isolated"
    assert d.clashes[0].startswith("plugin-d needs newdep>=2 (through newdep-user 1.0); a shared plugin planned")


def test_markers_are_evaluated_against_the_platform(platform_venv: PlatformVenv, wheelhouse: Wheelhouse) -> None:
    """A requirement whose marker is false on the platform's interpreter does not clash; a true one does."""
    never = _plugin(wheelhouse, "marker-off", 'fakenum>=2; python_version < "3"')
    here = _plugin(wheelhouse, "marker-on", f'fakenum>=2; sys_platform == "{sys.platform}"')
    off, on = _plan(platform_venv, wheelhouse, never, here)
    assert off.mode == "shared"
    assert on.mode == "isolated"


def test_marker_values_come_from_the_platform_interpreter(platform_venv: PlatformVenv) -> None:
    """The platform is inspected by running its own interpreter once."""
    platform = inspect_platform(platform_venv.python)
    assert platform.markers["python_full_version"] == ".".join(map(str, sys.version_info[:3]))
    assert platform.dists[canonicalize_name("mint-platform")].requires == ("fakenum<2", "prerel>=1", "localv")
    assert canonicalize_name("pytest") not in platform.dists  # not the test runner's environment


def test_an_installed_prerelease_satisfies_a_range_that_contains_it(
    platform_venv: PlatformVenv, wheelhouse: Wheelhouse
) -> None:
    """The platform runs prerel 2.0.0rc1: ">=1" keeps it (shared), ">=2" excludes it (isolated)."""
    fits = _plugin(wheelhouse, "pre-fits", "prerel>=1")
    excludes = _plugin(wheelhouse, "pre-excludes", "prerel>=2")
    a, b = _plan(platform_venv, wheelhouse, fits, excludes)
    assert a.mode == "shared"
    assert b.mode == "isolated"
    assert b.clashes == (
        "pre-excludes needs prerel>=2; the platform has prerel 2.0.0rc1"
        " (mint-platform needs prerel>=1; pre-fits needs prerel>=1)",
    )


def test_extras_bring_their_requirements(platform_venv: PlatformVenv, wheelhouse: Wheelhouse) -> None:
    """A requirement behind an extra counts only when the extra is asked for (``WHEEL[extra]``)."""
    wheel = _plugin(wheelhouse, "extra-plug", "newdep", 'fakenum>=2; extra == "fast"', extras=["fast"])
    (plain,) = _plan(platform_venv, wheelhouse, wheel)
    (fast,) = _plan(platform_venv, wheelhouse, f"{wheel}[fast]")
    assert plain.mode == "shared"
    assert fast.mode == "isolated"
    assert fast.clashes[0].startswith("extra-plug needs fakenum>=2;")


def test_an_unknown_extra_is_an_error(wheelhouse: Wheelhouse, platform_venv: PlatformVenv) -> None:
    """Asking for an extra the wheel does not provide names the plugin and the extras it has."""
    wheel = _plugin(wheelhouse, "extra-none", "newdep", extras=["fast"])
    with pytest.raises(WheelError, match=r"^extra-none: .* has no extra slow \(it provides: fast\)"):
        _plan(platform_venv, wheelhouse, f"{wheel}[slow]")


# --- stage 1, without a subprocess ------------------------------------------------------------


@pytest.mark.parametrize(
    ("requirement", "clash"),
    [
        # == and its wildcard
        ("fakenum==1.26.4", False),
        ("fakenum==1.26.*", False),
        ("fakenum==1.25.*", True),
        ("fakenum==1.26.5", True),
        # != and its wildcard
        ("fakenum!=1.26.4", True),
        ("fakenum!=1.26.*", True),
        ("fakenum!=1.25.*", False),
        # ordered comparisons
        ("fakenum<=1.26.4", False),
        ("fakenum<1.26.4", True),
        ("fakenum>=1.26", False),
        ("fakenum>1.26.4", True),
        ("fakenum>1.26", False),
        # ~= is ">= V, == prefix.*"
        ("fakenum~=1.26.0", False),
        ("fakenum~=1.25", False),
        ("fakenum~=1.25.0", True),
        ("fakenum~=2.0", True),
        # === compares strings
        ("fakenum===1.26.4", False),
        ("fakenum===1.26.04", True),
        # names are compared canonicalised
        ("FakeNum>=2", True),
        ("FAKENUM<2", False),
        # several clauses
        ("fakenum>=1.20,!=1.26.4", True),
        ("fakenum>=1.20,<2,!=1.26.3", False),
    ],
)
def test_stage1_operators(requirement: str, clash: bool) -> None:
    """Every PEP 440 operator is judged against the installed 1.26.4."""
    result = stage1(_wheel(requirement), _platform(fakenum="1.26.4"))
    assert bool(result.clashes) is clash


@pytest.mark.parametrize(
    ("requirement", "clash"),
    [
        ("localv==1.0", False),  # a local label is ignored when the specifier has none
        ("localv==1.0+cu121", False),
        ("localv==1.0+cpu", True),
        ("localv>1.0", True),  # ">" excludes local versions of the boundary
        ("localv<=1.0", False),
        ("localv>=1.0", False),
    ],
)
def test_stage1_local_versions(requirement: str, clash: bool) -> None:
    """An installed local version (``1.0+cu121``) is judged by PEP 440's local-version rules."""
    assert bool(stage1(_wheel(requirement), _platform(localv="1.0+cu121")).clashes) is clash


@pytest.mark.parametrize(
    ("requirement", "clash"),
    [
        ("prerel>=1", False),
        ("prerel>=2", True),
        ("prerel>=2.0.0rc1", False),
        ("prerel==2.*", False),
        ("prerel<2", True),  # PEP 440: "<V" excludes pre-releases of V itself
    ],
)
def test_stage1_installed_prerelease(requirement: str, clash: bool) -> None:
    """An installed pre-release is in a range that contains it, opt-in or not."""
    assert bool(stage1(_wheel(requirement), _platform(prerel="2.0.0rc1")).clashes) is clash


def test_stage1_extras_select_marked_requirements() -> None:
    """``extra == "x"`` markers apply only with that extra requested."""
    requirement = 'fakenum>=2; extra == "gpu"'
    assert not stage1(_wheel(requirement), _platform(fakenum="1.26.4")).clashes
    assert stage1(_wheel(requirement, extras=frozenset({"gpu"})), _platform(fakenum="1.26.4")).clashes


def test_stage1_requirements_on_uninstalled_names_do_not_clash() -> None:
    """Stage 1 only judges what is installed; the rest is stage 2's job."""
    assert not stage1(_wheel("somethingelse>=9"), _platform(fakenum="1.26.4")).clashes


def test_stage1_self_contradicting_requirements_are_unsatisfiable() -> None:
    """Requirements that can never be met together are an error, not a clash (is_unsatisfiable)."""
    with pytest.raises(UnsatisfiableRequirement, match=r"^plug: its requirements on newdep can never be met"):
        stage1(_wheel("newdep>=2", "newdep<2"), _platform(fakenum="1.26.4"))


# --- overrides --------------------------------------------------------------------------------


def test_force_isolated(platform_venv: PlatformVenv, wheelhouse: Wheelhouse) -> None:
    """forceIsolated wins over a clean check, and the decision says it was forced."""
    overrides = Overrides.from_json({"plugins": {"forceIsolated": ["forced-iso"]}})
    (decision,) = _plan(platform_venv, wheelhouse, _plugin(wheelhouse, "forced-iso", "fakenum"), overrides=overrides)
    assert (decision.mode, decision.forced) == ("isolated", True)
    assert decision.reason == "forceIsolated: the conflict check was skipped"


def test_force_shared_skips_the_check_and_says_so(platform_venv: PlatformVenv, wheelhouse: Wheelhouse) -> None:
    """forceShared makes even a clashing plugin shared, and the decision says the check was skipped."""
    overrides = Overrides.from_json({"plugins": {"forceShared": ["forced-shared"]}})
    wheel = _plugin(wheelhouse, "forced-shared", "fakenum>=2")
    (decision,) = _plan(platform_venv, wheelhouse, wheel, overrides=overrides)
    assert (decision.mode, decision.forced, decision.clashes) == ("shared", True, ())
    assert decision.to_json() == {
        "plugin": "forced-shared",
        "mode": "shared",
        "forced": True,
        "clashes": [],
        "reason": "forceShared: the conflict check was skipped",
    }


def test_overrides_file_as_the_seed_writes_it(tmp_path: Path) -> None:
    """The design page's JSON form loads as written."""
    path = tmp_path / "overrides.json"
    path.write_text(json.dumps({"plugins": {"forceIsolated": ["a"], "forceShared": ["b"]}}))
    overrides = load_overrides(path)
    assert (overrides.mode_for("a"), overrides.mode_for("b"), overrides.mode_for("c")) == ("isolated", "shared", None)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"plugins": {"forceIsolated": ["a"], "forceShared": ["a"]}}, "a is in both forceIsolated and forceShared"),
        ({"plugins": {"forceIsolatd": ["a"]}}, "unknown key 'plugins.forceIsolatd'"),
        ({"plugins": {"forceShared": "a"}}, "key 'plugins.forceShared' must be a list"),
        ({"plugins": {"forceShared": ["Not A Slug"]}}, "plugin name 'Not A Slug' is not valid"),
        ([], "expected"),
        ({"plugins": ["a"]}, "key 'plugins' must be an object"),
    ],
)
def test_invalid_overrides(tmp_path: Path, data: object, message: str) -> None:
    """A bad overrides file is an error naming the file and the problem."""
    path = tmp_path / "overrides.json"
    path.write_text(json.dumps(data))
    with pytest.raises(OverridesError, match=str(path)) as caught:
        load_overrides(path)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(None, "cannot read: No such file or directory", id="missing"),
        pytest.param('{"plugins": ', "not valid JSON: Expecting value", id="not-json"),
    ],
)
def test_an_unreadable_overrides_file_is_an_error_naming_it(tmp_path: Path, text: str | None, message: str) -> None:
    path = tmp_path / "overrides.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(OverridesError, match=f"^{re.escape(str(path))}: {message}"):
        load_overrides(path)


# --- bad input --------------------------------------------------------------------------------


def test_broken_wheel_metadata(tmp_path: Path, platform_venv: PlatformVenv, wheelhouse: Wheelhouse) -> None:
    """A wheel whose METADATA does not validate is an error naming the wheel and the problem."""
    wheel = make_wheel(tmp_path, "broken", "1.0", metadata="Metadata-Version: 2.1\nName: broken\nRequires-Dist: ((\n")
    with pytest.raises(WheelError, match=r"^broken-1\.0-py3-none-any\.whl: .* has broken metadata: .*"):
        _plan(platform_venv, wheelhouse, wheel)


def test_a_marker_that_cannot_be_evaluated_is_broken_metadata(
    tmp_path: Path, platform_venv: PlatformVenv, wheelhouse: Wheelhouse
) -> None:
    """A requirement whose marker parses but cannot be evaluated (``~=`` needs two release parts)
    is an error naming the plugin and the requirement, not a traceback from packaging."""
    wheel = _plugin(wheelhouse, "bad-marker", 'fakenum; python_version ~= "3"')
    with pytest.raises(WheelError, match=r'^bad-marker: .*fakenum; python_version ~= "3".* cannot be evaluated'):
        _plan(platform_venv, wheelhouse, wheel)


def test_not_a_wheel(tmp_path: Path, platform_venv: PlatformVenv, wheelhouse: Wheelhouse) -> None:
    """A file that is not a zip archive is refused by name."""
    path = tmp_path / "fake-1.0-py3-none-any.whl"
    path.write_text("not a zip")
    with pytest.raises(WheelError, match="is not a wheel"):
        _plan(platform_venv, wheelhouse, path)


def test_requirement_no_index_can_satisfy(platform_venv: PlatformVenv, wheelhouse: Wheelhouse) -> None:
    """A version that exists nowhere is an error naming the plugin and uv's reason."""
    wheel = _plugin(wheelhouse, "wants-future", "newdep>=99")
    with pytest.raises(
        UnsatisfiableRequirement, match=r"(?s)^wants-future: its requirements cannot be resolved:\n.*newdep>=99"
    ):
        _plan(platform_venv, wheelhouse, wheel)


def test_wheelhouse_without_a_needed_package(platform_venv: PlatformVenv, wheelhouse: Wheelhouse) -> None:
    """A package missing from the wheelhouse is an error naming the plugin and the package."""
    wheel = _plugin(wheelhouse, "wants-missing", "not-in-the-wheelhouse")
    with pytest.raises(UnsatisfiableRequirement, match=r"(?s)^wants-missing: .*not-in-the-wheelhouse was not found"):
        _plan(platform_venv, wheelhouse, wheel)


def test_uv_missing(platform_venv: PlatformVenv, wheelhouse: Wheelhouse, tmp_path: Path) -> None:
    """Without a uv binary, stage 2 cannot run: an error naming the plugin."""
    wheel = _plugin(wheelhouse, "needs-uv", "fakenum>=1")
    with pytest.raises(UvMissing, match=r"^needs-uv: cannot run uv at .*nowhere/uv"):
        _plan(platform_venv, wheelhouse, wheel, uv_binary=str(tmp_path / "nowhere" / "uv"))


def test_invalid_slug(tmp_path: Path, platform_venv: PlatformVenv, wheelhouse: Wheelhouse) -> None:
    """An entry point name that is not a valid plugin name is refused, naming it."""
    wheel = make_wheel(tmp_path, "badslug", "1.0", plugin=("Bad Slug!", "badslug:app"))
    with pytest.raises(InvalidPluginName, match=r"^Bad Slug!: plugin name 'Bad Slug!' is not valid"):
        _plan(platform_venv, wheelhouse, wheel)
