"""Isolated venvs: keyed, reused, built aside and renamed into place, safe to provision concurrently."""

import dataclasses
import os
import shutil
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from mint_proxy.isolation import EnvironmentBuildError, PluginEnv, provision
from mint_proxy.isolation._uv import Sources, Uv
from mint_proxy.isolation.envs import READY_FILE
from mint_proxy.isolation.platform import PlatformEnv, inspect_platform
from mint_proxy.isolation.wheels import PluginWheel, read_wheel

from .isolation_support import Wheelhouse
from .wheels import make_wheel


@pytest.fixture(scope="module")
def runner_platform() -> PlatformEnv:
    return inspect_platform()


@pytest.fixture(scope="module")
def venvs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One venvs dir for the module, as in production: the runtime layer is built once."""
    return tmp_path_factory.mktemp("home") / "venvs"


@pytest.fixture
def small(tmp_path: Path, request: pytest.FixtureRequest) -> PluginWheel:
    """A small plugin wheel of this test's own (its module names the test, so its key is new)."""
    source = f"app = {request.node.name!r}\n"
    wheel = make_wheel(
        tmp_path / "w", "small-plugin", "1.0", ["newdep<2"],
        plugin=("small-plugin", "small_plugin:app"), modules={"small_plugin.py": source},
    )  # fmt: skip
    return read_wheel(wheel)


@pytest.fixture
def uv(uv_cache: Path, wheelhouse: Wheelhouse) -> Uv:
    return Uv(None, uv_cache, Sources((wheelhouse.path,)))


def _leftovers(venvs: Path) -> list[str]:
    """Anything in the venvs dir that is neither a finished venv nor a lock file."""
    return sorted(p.name for p in venvs.iterdir() if not p.name.endswith(".lock") and not (p / READY_FILE).exists())


def test_a_provisioned_venv_runs_the_plugin_host_stack(
    tmp_path: Path, small: PluginWheel, uv: Uv, runner_platform: PlatformEnv, venvs: Path
) -> None:
    """The venv has the plugin, uvicorn, httpx and a copy of mint_plugin, with bytecode already compiled."""
    env = provision(small, runner_platform, venvs_dir=venvs, uv=uv)
    assert not env.reused and env.path.parent == venvs
    code = (
        "import sys, small_plugin, uvicorn, httpx, mint_plugin.client; print(sys.prefix); print(mint_plugin.__file__)"
    )
    out = subprocess.run([env.python, "-I", "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert Path(out[0]) == env.path
    assert Path(out[1]).is_relative_to(env.path)  # a copy, not the platform's mint_plugin
    site = next(env.path.glob("lib/*/site-packages"))
    assert list((site / "__pycache__").glob("small_plugin.*.pyc"))
    assert list((site / "mint_plugin" / "__pycache__").glob("client.*.pyc"))
    assert list((site / "uvicorn" / "__pycache__").glob("*.pyc"))
    assert not (site / "mint_proxy").exists()
    assert _leftovers(venvs) == []


def test_the_same_plugin_reuses_its_venv(
    tmp_path: Path, small: PluginWheel, uv: Uv, runner_platform: PlatformEnv, venvs: Path
) -> None:
    """Provisioning again (a restart, or an identical wheel elsewhere) reuses the venv by key."""
    first = provision(small, runner_platform, venvs_dir=venvs, uv=uv)
    copy = tmp_path / "elsewhere" / small.path.name
    copy.parent.mkdir()
    shutil.copy(small.path, copy)
    again = provision(read_wheel(copy), runner_platform, venvs_dir=venvs, uv=uv)
    assert again == PluginEnv(first.key, first.path, first.python, reused=True)


def test_different_requirements_get_a_different_venv(
    tmp_path: Path, small: PluginWheel, uv: Uv, runner_platform: PlatformEnv, venvs: Path
) -> None:
    """The key covers the resolved requirements: another dependency version is another venv."""
    other = read_wheel(make_wheel(tmp_path / "w", "small-plugin", "1.0", ["newdep>=2"], plugin=("small-plugin", "m:a")))
    assert (
        provision(small, runner_platform, venvs_dir=venvs, uv=uv).key
        != provision(other, runner_platform, venvs_dir=venvs, uv=uv).key
    )


def test_concurrent_provisioning_builds_once(
    tmp_path: Path, small: PluginWheel, uv: Uv, runner_platform: PlatformEnv, venvs: Path
) -> None:
    """Four provisions of one key at once: one builds, the others wait and reuse it; nothing is left over."""
    results: list[PluginEnv] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def run() -> None:
        start.wait()
        try:
            results.append(provision(small, runner_platform, venvs_dir=venvs, uv=uv))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert len({result.path for result in results}) == 1
    assert sorted(result.reused for result in results) == [False, True, True, True]
    assert _leftovers(venvs) == []


def test_venv_dir_that_cannot_be_created(
    tmp_path: Path, small: PluginWheel, uv: Uv, runner_platform: PlatformEnv
) -> None:
    """A venv dir under a regular file is an error naming the plugin and the directory."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(EnvironmentBuildError, match=r"^small-plugin: the venv directory .*file/venvs is not writable"):
        provision(small, runner_platform, venvs_dir=blocker / "venvs", uv=uv)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_venv_dir_not_writable(tmp_path: Path, small: PluginWheel, uv: Uv, runner_platform: PlatformEnv) -> None:
    """A read-only venv dir is an error naming the plugin; nothing is written."""
    venvs = tmp_path / "venvs"
    venvs.mkdir()
    venvs.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(EnvironmentBuildError, match="is not writable"):
            provision(small, runner_platform, venvs_dir=venvs, uv=uv)
        assert list(venvs.iterdir()) == []
    finally:
        venvs.chmod(stat.S_IRWXU)


def test_a_failed_build_leaves_nothing_behind(
    tmp_path: Path, small: PluginWheel, uv: Uv, runner_platform: PlatformEnv, venvs: Path
) -> None:
    """uv failing half way through a build: the error names the plugin, the half-built venv is gone."""
    import uv as uv_package

    failing = tmp_path / "uv-failing-sync"
    script = f'if [ "$2" = sync ]; then echo "error: disk full" >&2; exit 2; fi\nexec {uv_package.find_uv_bin()} "$@"'
    failing.write_text(f"#!/bin/sh\n{script}\n")
    failing.chmod(0o755)
    with pytest.raises(EnvironmentBuildError, match=r"(?s)^small-plugin: uv failed building its venv:\n.*disk full"):
        provision(small, runner_platform, venvs_dir=venvs, uv=dataclasses.replace(uv, binary=str(failing)))
    assert _leftovers(venvs) == []


def test_bytecode_of_a_shared_dependency_is_compiled_once_per_home(
    tmp_path: Path, uv: Uv, runner_platform: PlatformEnv, venvs: Path
) -> None:
    """Two plugins with the same dependency: the second venv hardlinks the first one's bytecode
    (the source files are the same inode, out of uv's cache) instead of compiling it again."""
    deps = tmp_path / "deps"
    make_wheel(deps, "sharedlib", "1.0", modules={"sharedlib.py": "VALUE = 1\n"})
    tool = dataclasses.replace(uv, sources=Sources((*uv.sources.find_links, deps)))
    envs = []
    for name in ("first-user", "second-user"):
        module = name.replace("-", "_")
        wheel = make_wheel(
            tmp_path / name, name, "1.0", ["sharedlib"], plugin=(name, f"{module}:app"), modules={f"{module}.py": ""}
        )
        envs.append(provision(read_wheel(wheel), runner_platform, venvs_dir=venvs, uv=tool))
    first, second = (next(env.path.glob("lib/*/site-packages/__pycache__/sharedlib.*.pyc")) for env in envs)
    assert first.stat().st_ino == second.stat().st_ino
    run = [str(envs[1].python), "-I", "-c", "import sharedlib; print(sharedlib.VALUE)"]
    assert subprocess.run(run, capture_output=True, text=True, check=True).stdout == "1\n"
