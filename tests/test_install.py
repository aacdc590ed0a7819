"""The one flow: install decides, provisions and writes the spec file; recheck follows platform changes."""

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from mint_proxy.cli import main
from mint_proxy.isolation import (
    InstallError,
    Overrides,
    PlatformEnvError,
    UnsatisfiableRequirement,
    WheelError,
    install,
    recheck,
)
from mint_proxy.isolation.platform import inspect_platform

from .isolation_support import PlatformVenv, Wheelhouse
from .wheels import make_wheel

HAND_WRITTEN = """# routes written by hand stay as they are
[proxy]
"/legacy" = "http://127.0.0.1:8004"

[settings]
mount_path = "/api"
"""


def _plugin(directory: Path, slug: str, *requires: str, version: str = "1.0") -> Path:
    module = slug.replace("-", "_")
    return make_wheel(
        directory, slug, version, requires, plugin=(slug, f"{module}:app"), modules={f"{module}.py": "app = None\n"}
    )


def _installed(platform: PlatformVenv) -> dict[str, str]:
    return {name: dist.version for name, dist in inspect_platform(platform.python).dists.items()}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, uv_cache: Path) -> Path:
    """One plugin home for the module (venvs, uv cache, wheel copies), as on a real machine;
    its uv cache is the session's, so wheels are unpacked once per test run."""
    path = tmp_path_factory.mktemp("home")
    (path / "uv-cache").symlink_to(uv_cache)
    return path


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "plugins.toml"
    path.write_text(HAND_WRITTEN)
    return path


def test_install_writes_isolated_and_shared_plugins(
    tmp_path: Path, config: Path, fresh_platform: PlatformVenv, wheelhouse: Wheelhouse, home: Path
) -> None:
    """A clashing plugin gets a venv and a [proxy] table with its python; a clean one is installed
    into the platform and gets a [shared] table; the hand-written part of the file is kept."""
    shared = _plugin(tmp_path / "w", "good-plugin", "fakenum>=1.20", "newdep")
    isolated = _plugin(tmp_path / "w", "numpy2-plugin", "fakenum>=2")
    results = install(
        [shared, isolated], config=config, python=fresh_platform.python, find_links=[wheelhouse.path], home=home
    )  # fmt: skip
    assert [(r.decision.plugin, r.decision.mode) for r in results] == [
        ("good-plugin", "shared"),
        ("numpy2-plugin", "isolated"),
    ]
    text = config.read_text()
    assert text.startswith(HAND_WRITTEN)
    spec = tomllib.loads(text)
    assert spec["shared"]["/good-plugin"] == {"plugin": "good-plugin", "app": "good_plugin:app"}
    proxied = spec["proxy"]["/numpy2-plugin"]
    assert proxied["app"] == "numpy2_plugin:app" and proxied["plugin"] == "numpy2-plugin"
    python = Path(proxied["python"])
    assert python.exists() and python.parent.parent.parent == home / "venvs"
    assert spec["proxy"]["/legacy"] == "http://127.0.0.1:8004"
    installed = _installed(fresh_platform)
    assert installed["good-plugin"] == "1.0" and installed["newdep"] == "2.0"
    assert installed["fakenum"] == "1.26.4"  # nothing the platform had changed
    assert "numpy2-plugin" not in installed


def test_reinstall_checks_again_and_replaces_the_block(
    tmp_path: Path, config: Path, fresh_platform: PlatformVenv, wheelhouse: Wheelhouse, home: Path
) -> None:
    """Installing a new version re-decides; the plugin's block is replaced, not duplicated,
    and a plugin that moves to a venv is taken out of the platform's environment."""
    options = {"config": config, "python": fresh_platform.python, "find_links": [wheelhouse.path], "home": home}
    install([_plugin(tmp_path / "v1", "moving", "fakenum<2")], **options)  # type: ignore[arg-type]
    assert tomllib.loads(config.read_text())["shared"]["/moving"]["plugin"] == "moving"
    (result,) = install([_plugin(tmp_path / "v2", "moving", "fakenum>=2", version="2.0")], **options)  # type: ignore[arg-type]
    assert result.decision.mode == "isolated"
    spec = tomllib.loads(config.read_text())
    assert "/moving" not in spec.get("shared", {}) and "/moving" in spec["proxy"]
    assert config.read_text().count(">>> mint-proxy install: moving") == 1
    assert "moving" not in _installed(fresh_platform)


def test_a_later_plugin_clashes_with_an_installed_shared_one(
    tmp_path: Path, config: Path, fresh_platform: PlatformVenv, wheelhouse: Wheelhouse, home: Path
) -> None:
    """Shared plugins are part of the platform: the next install is checked against them."""
    options = {"config": config, "python": fresh_platform.python, "find_links": [wheelhouse.path], "home": home}
    install([_plugin(tmp_path / "w", "first-come", "newdep<2")], **options)  # type: ignore[arg-type]
    (second,) = install([_plugin(tmp_path / "w", "second", "newdep>=2")], **options)  # type: ignore[arg-type]
    assert second.decision.mode == "isolated"
    assert second.decision.clashes == (
        "second needs newdep>=2; the platform has newdep 1.0 (first-come needs newdep<2)",
    )


def test_recheck_moves_a_shared_plugin_the_platform_no_longer_fits(
    tmp_path: Path, config: Path, fresh_platform: PlatformVenv, wheelhouse: Wheelhouse, home: Path
) -> None:
    """A platform upgrade that breaks a shared plugin: recheck says so, and --apply isolates it."""
    options = {"config": config, "python": fresh_platform.python, "find_links": [wheelhouse.path], "home": home}
    install([_plugin(tmp_path / "w", "old-numpy", "fakenum<2")], **options)  # type: ignore[arg-type]
    assert [d.mode for d in recheck(**options)] == ["shared"]  # type: ignore[arg-type]
    upgrade = tmp_path / "upgrade"
    make_wheel(upgrade, "mint-platform", "2.0", ["fakenum>=2", "prerel>=1", "localv"])
    import subprocess

    import uv

    subprocess.run(
        [uv.find_uv_bin(), "pip", "install", "--quiet", "--python", str(fresh_platform.python), "--no-index",
         "--find-links", str(wheelhouse.path), "--find-links", str(upgrade), "mint-platform==2.0"],
        check=True, capture_output=True,
    )  # fmt: skip
    (decision,) = recheck(**options, apply=True)  # type: ignore[arg-type]
    assert decision.mode == "isolated"
    assert decision.clashes == (
        "old-numpy needs fakenum<2; the platform has fakenum 2.1.0 (mint-platform needs fakenum>=2)",
    )
    spec = tomllib.loads(config.read_text())
    assert "/old-numpy" in spec["proxy"] and "/old-numpy" not in spec.get("shared", {})
    assert "old-numpy" not in _installed(fresh_platform)


def test_forced_shared_install_that_breaks_the_platform_is_undone(
    tmp_path: Path, config: Path, fresh_platform: PlatformVenv, wheelhouse: Wheelhouse
) -> None:
    """forceShared skips the check; uv pip check then fails, and the platform is put back as it was."""
    before = _installed(fresh_platform)
    with pytest.raises(PlatformEnvError, match=r"(?s)^breaker: uv pip check failed .*undone.*fakenum"):
        install(
            [_plugin(tmp_path / "w", "breaker", "fakenum>=2")], config=config, python=fresh_platform.python,
            find_links=[wheelhouse.path], overrides=Overrides(force_shared=frozenset({"breaker"})),
        )  # fmt: skip
    assert _installed(fresh_platform) == before
    assert config.read_text() == HAND_WRITTEN


def test_nothing_is_written_when_a_wheel_has_no_app(
    tmp_path: Path, config: Path, platform_venv: PlatformVenv, wheelhouse: Wheelhouse
) -> None:
    """A wheel without a [mint.plugins] entry point is refused before anything changes."""
    wheel = make_wheel(tmp_path / "w", "no-app", "1.0", ["fakenum"])
    with pytest.raises(WheelError, match=r"^no-app: .* declares no \[mint.plugins\] entry point"):
        install([wheel], config=config, python=platform_venv.python, find_links=[wheelhouse.path])
    assert config.read_text() == HAND_WRITTEN
    assert not (tmp_path / ".mint-plugins").exists()


def test_unsatisfiable_isolated_plugin_leaves_nothing(
    tmp_path: Path, config: Path, platform_venv: PlatformVenv, wheelhouse: Wheelhouse
) -> None:
    """A clash whose own requirements cannot be met either: an error, no venv, no spec change."""
    wheel = _plugin(tmp_path / "w", "hopeless", "fakenum>=2", "not-in-the-wheelhouse")
    with pytest.raises(UnsatisfiableRequirement, match="^hopeless: "):
        install([wheel], config=config, python=platform_venv.python, find_links=[wheelhouse.path])
    assert config.read_text() == HAND_WRITTEN
    venvs = tmp_path / ".mint-plugins" / "venvs"
    assert not venvs.exists() or [p for p in venvs.iterdir() if not p.name.endswith(".lock")] == []


def test_a_hand_written_table_for_the_prefix_is_not_overwritten(
    tmp_path: Path, platform_venv: PlatformVenv, wheelhouse: Wheelhouse, home: Path
) -> None:
    """The installer never replaces a route someone wrote by hand; it says which key is in the way."""
    config = tmp_path / "plugins.toml"
    config.write_text('[proxy."/taken"]\nurl = "http://127.0.0.1:9"\n')
    with pytest.raises(InstallError, match=r'^taken: .*plugins.toml: key proxy."/taken" is already defined by hand'):
        install(
            [_plugin(tmp_path / "w", "taken", "fakenum>=2")], config=config, python=platform_venv.python,
            find_links=[wheelhouse.path], home=home,
        )  # fmt: skip


def test_a_spec_file_the_block_cannot_join_is_an_error_and_left_unchanged(
    tmp_path: Path, platform_venv: PlatformVenv, wheelhouse: Wheelhouse, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Routes written as an inline table (``proxy = {...}``) cannot take a ``[proxy."/slug"]`` block:
    the install says so in one line naming the file, writes nothing, and shows no traceback."""
    config = tmp_path / "plugins.toml"
    config.write_text('proxy = { "/legacy" = "http://127.0.0.1:8004" }\n')
    before = config.read_text()
    wheel = str(_plugin(tmp_path / "w", "inline", "fakenum>=2"))
    status = main(
        ["install", wheel, "--config", str(config), "--python", str(platform_venv.python),
         "--find-links", str(wheelhouse.path), "--home", str(home)]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert status == 1
    assert err.startswith("mint-proxy: error: ") and str(config) in err and "Traceback" not in err
    assert config.read_text() == before


# --- the CLI ----------------------------------------------------------------------------------


def test_cli_plan_json(
    tmp_path: Path, platform_venv: PlatformVenv, wheelhouse: Wheelhouse, capsys: pytest.CaptureFixture[str]
) -> None:
    """``mint-proxy plan --json`` prints plugin, mode, forced and clashes for each wheel, and changes nothing."""
    wheels = [str(_plugin(tmp_path, "cli-ok", "fakenum")), str(_plugin(tmp_path, "cli-clash", "fakenum>=2"))]
    before = _installed(platform_venv)
    status = main(
        ["plan", *wheels, "--python", str(platform_venv.python), "--find-links", str(wheelhouse.path), "--json"]
    )
    assert status == 0
    printed = json.loads(capsys.readouterr().out)
    assert [(p["plugin"], p["mode"], p["forced"]) for p in printed] == [
        ("cli-ok", "shared", False),
        ("cli-clash", "isolated", False),
    ]
    assert printed[1]["clashes"] == [
        "cli-clash needs fakenum>=2; the platform has fakenum 1.26.4 (mint-platform needs fakenum<2)"
    ]
    assert _installed(platform_venv) == before


def test_cli_plan_table_with_overrides(
    tmp_path: Path, platform_venv: PlatformVenv, wheelhouse: Wheelhouse, capsys: pytest.CaptureFixture[str]
) -> None:
    """The text table has one row per plugin (and per clash); --overrides reads the seed's JSON."""
    overrides = tmp_path / "overrides.json"
    overrides.write_text(json.dumps({"plugins": {"forceIsolated": ["cli-forced"]}}))
    wheel = str(_plugin(tmp_path, "cli-forced", "fakenum"))
    python = str(platform_venv.python)
    assert (
        main(["plan", wheel, "--python", python, "--find-links", str(wheelhouse.path), "--overrides", str(overrides)])
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["plugin", "mode", "forced", "clashes"]
    assert lines[1].split()[:3] == ["cli-forced", "isolated", "yes"]
    assert "forceIsolated: the conflict check was skipped" in lines[1]


def test_cli_errors_are_one_line_without_traceback(
    tmp_path: Path, platform_venv: PlatformVenv, capsys: pytest.CaptureFixture[str]
) -> None:
    """A broken wheel: exit 1 and a message naming the wheel, no traceback."""
    broken = make_wheel(tmp_path, "broken", "1.0", metadata="Name: broken\n")
    assert main(["plan", str(broken), "--python", str(platform_venv.python)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mint-proxy: error: broken-1.0-py3-none-any.whl: ") and "Traceback" not in err


def test_cli_install(
    tmp_path: Path, fresh_platform: PlatformVenv, wheelhouse: Wheelhouse, capsys: pytest.CaptureFixture[str], home: Path
) -> None:
    """``mint-proxy install`` provisions and writes the spec file named by --config."""
    config = tmp_path / "spec.toml"
    wheel = str(_plugin(tmp_path / "w", "cli-iso", "fakenum>=2"))
    status = main(
        ["install", wheel, "--config", str(config), "--python", str(fresh_platform.python),
         "--find-links", str(wheelhouse.path), "--home", str(home)]
    )  # fmt: skip
    assert status == 0
    out = capsys.readouterr().out
    assert "cli-iso: venv " in out and f"wrote {config}" in out
    assert tomllib.loads(config.read_text())["proxy"]["/cli-iso"]["app"] == "cli_iso:app"


def test_cli_recheck_json(
    tmp_path: Path, fresh_platform: PlatformVenv, wheelhouse: Wheelhouse, capsys: pytest.CaptureFixture[str], home: Path
) -> None:
    """``mint-proxy recheck --json`` decides the installed shared plugins again and changes nothing without --apply."""
    config = tmp_path / "spec.toml"
    options = ["--config", str(config), "--python", str(fresh_platform.python), "--find-links", str(wheelhouse.path),
               "--home", str(home)]  # fmt: skip
    assert main(["install", str(_plugin(tmp_path / "w", "stays-shared", "fakenum<2")), *options]) == 0
    capsys.readouterr()
    before = config.read_text()
    assert main(["recheck", *options, "--json"]) == 0
    assert [(d["plugin"], d["mode"]) for d in json.loads(capsys.readouterr().out)] == [("stays-shared", "shared")]
    assert config.read_text() == before


def test_cli_recheck_of_a_missing_spec_file_fails_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``recheck --config`` naming no file is an error that names it, not an empty success."""
    missing = tmp_path / "nowhere" / "plugins.toml"
    assert main(["recheck", "--config", str(missing)]) == 1
    err = capsys.readouterr().err
    assert f"{missing}: no such spec file" in err and "Traceback" not in err


def test_concurrent_installs_keep_both_blocks(tmp_path: Path) -> None:
    """Two writers of one spec file at once: each block survives (the read-modify-write is locked)."""
    import threading

    from mint_proxy.isolation.specfile import SpecEntry, update_spec_file

    config = tmp_path / "spec.toml"
    slugs = [f"plugin-{index}" for index in range(8)]
    threads = [
        threading.Thread(target=update_spec_file, args=(config, [SpecEntry(slug, "shared", f"m{index}:app")]))
        for index, slug in enumerate(slugs)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(tomllib.loads(config.read_text())["shared"]) == sorted(f"/{slug}" for slug in slugs)


def test_cli_without_the_isolation_extra_names_the_missing_package(tmp_path: Path) -> None:
    """``mint-proxy plan`` where packaging is not installed: one line naming the extra to install."""
    code = (  # a finder that knows no packaging, as in an environment without the extra
        "import sys\n"
        "class NotInstalled:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] == 'packaging':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, NotInstalled())\n"
        "from mint_proxy.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    wheel = make_wheel(tmp_path, "peak", "1.0")
    done = subprocess.run([sys.executable, "-c", code, "plan", str(wheel)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr == "mint-proxy: error: packaging is missing: pip install 'mint-proxy[isolation]'\n"
