"""Time the shared-or-isolated decision and plugin venv provisioning (docs/isolation.md).

    .venv/bin/python -m loadtests.isolation [--rounds 5] [--numpy-wheel PATH]

Everything is offline: wheels are written by hand or repacked from this interpreter's
environment (tests/wheels.py) into a temporary wheelhouse; the platform is a throwaway
venv. A numpy wheel is used only if one is given or found in a local mirror.
"""

import argparse
import glob
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import uv

from mint_proxy.isolation import plan, provision
from mint_proxy.isolation._uv import Sources, Uv
from mint_proxy.isolation.conflict import stage1, stage2
from mint_proxy.isolation.platform import PlatformEnv, inspect_platform
from mint_proxy.isolation.wheels import PluginWheel, read_wheel
from tests.wheels import make_wheel, repack

RUNTIME = ("uvicorn", "click", "h11", "httpx", "httpcore", "anyio", "idna", "certifi", "sniffio", "typing_extensions")
MIRRORS = ("/opt/pypi/files", "/opt/pypi-more/files")


def _ms(run: Callable[[], object], rounds: int) -> tuple[float, float]:
    """(median, min) milliseconds over ``rounds`` runs."""
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), min(times)


def _uv(*args: str) -> None:
    subprocess.run([uv.find_uv_bin(), *args], check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--numpy-wheel", type=Path)
    args = parser.parse_args()
    numpy = args.numpy_wheel or next(
        (Path(p) for m in MIRRORS for p in sorted(glob.glob(f"{m}/numpy-2.*-cp311-*manylinux*x86_64*.whl"))), None
    )
    root = Path(tempfile.mkdtemp(prefix="mint-isolation-bench-"))
    try:
        _run(root, args.rounds, numpy)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run(root: Path, rounds: int, numpy: Path | None) -> None:
    house = root / "wheelhouse"
    make_wheel(house, "fakenum", "1.26.4")
    make_wheel(house, "fakenum", "2.1.0")
    make_wheel(house, "mint-platform", "1.0", ["fakenum<2"])
    make_wheel(house, "fakesci", "1.15.0", ["fakenum>=2"])
    make_wheel(house, "newdep", "1.0")
    for dist in RUNTIME:
        repack(house, dist)
    _uv("venv", "--quiet", "--python", sys.executable, str(root / "platform"))
    python = root / "platform" / "bin" / "python"
    _uv("pip", "install", "--quiet", "--python", str(python), "--no-index", "--find-links", str(house), "mint-platform")
    plugins = root / "plugins"
    ok = read_wheel(
        make_wheel(plugins, "ok-plugin", "1.0", ["fakenum>=1.20", "newdep"], plugin=("ok-plugin", "ok:app"))
    )
    direct = read_wheel(make_wheel(plugins, "direct", "1.0", ["fakenum>=2"]))
    transitive = make_wheel(plugins, "peak-picking", "1.0", ["fakesci"])
    sources = Sources((house,))
    tool = Uv(None, root / "cache-decide", sources)

    rows: list[tuple[str, str]] = []
    median, best = _ms(lambda: inspect_platform(python), rounds)
    rows.append(("inspect the platform interpreter (once per plan)", f"{median:.1f} ms (min {best:.1f})"))
    platform = inspect_platform(python)
    started = time.perf_counter()
    for _ in range(1000):
        stage1(ok, platform)
    rows.append(("stage 1, no clash (packaging)", f"{(time.perf_counter() - started) * 1000:.1f} µs"))
    started = time.perf_counter()
    for _ in range(1000):
        stage1(direct, platform)
    rows.append(("stage 1, direct clash found", f"{(time.perf_counter() - started) * 1000:.1f} µs"))
    stage2(ok, platform, tool)  # warm uv's cache for the wheelhouse
    median, best = _ms(lambda: stage2(ok, platform, tool), rounds)
    rows.append(("stage 2, no clash (uv dry run, all pinned)", f"{median:.1f} ms (min {best:.1f})"))
    median, best = _ms(lambda: plan([transitive], python=python, find_links=[house]), rounds)
    rows.append(("plan, transitive clash (stage 2 + explanation)", f"{median:.1f} ms (min {best:.1f})"))

    rows += _provisioning("small plugin (+ uvicorn, httpx: 11 dists)", ["newdep"], platform, sources, root, rounds)
    if numpy is not None:
        shutil.copy(numpy, house)
        rows += _provisioning(
            f"numpy plugin ({numpy.name.split('-')[1]})", ["numpy>=2"], platform, sources, root, rounds
        )
    else:
        rows.append(("numpy plugin", "skipped: no numpy wheel at hand offline"))
    print("| measurement | time |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


def _provisioning(
    label: str, requires: list[str], platform: PlatformEnv, sources: Sources, root: Path, rounds: int
) -> list[tuple[str, str]]:
    """Cold (empty uv cache, empty home), a new plugin in a warm home, and an existing venv."""
    tag = label.split()[0]
    counter = iter(range(10_000))

    def fresh_wheel() -> PluginWheel:  # same requirements, new content: a new key
        index = next(counter)
        module = {f"{tag}_{index}.py": f"app = {index}\n"}
        path = make_wheel(
            root / f"w-{tag}-{index}",
            f"{tag}-plugin",
            "1.0",
            requires,
            plugin=(f"{tag}-plugin", "m:app"),
            modules=module,
        )
        return read_wheel(path)

    cold = []
    for index in range(max(1, rounds // 2)):
        tool = Uv(None, root / f"cache-{tag}-{index}", sources)
        wheel = fresh_wheel()
        started = time.perf_counter()
        provision(wheel, platform, venvs_dir=root / f"home-{tag}-{index}", uv=tool)
        cold.append((time.perf_counter() - started) * 1000)
    rows = [(f"{label}: cold (empty uv cache, empty home)", f"{statistics.median(cold):.0f} ms")]
    tool = Uv(None, root / f"cache-{tag}-0", sources)
    home = root / f"home-{tag}-0"
    wheels = [fresh_wheel() for _ in range(rounds)]
    median, best = _ms(lambda: provision(wheels.pop(), platform, venvs_dir=home, uv=tool), rounds)
    rows.append((f"{label}: new plugin venv, warm cache and home", f"{median:.0f} ms (min {best:.0f})"))
    same = fresh_wheel()
    provision(same, platform, venvs_dir=home, uv=tool)
    median, best = _ms(lambda: provision(same, platform, venvs_dir=home, uv=tool), rounds)
    rows.append((f"{label}: existing venv (restart, reinstall)", f"{median:.0f} ms (min {best:.0f})"))
    return rows


if __name__ == "__main__":
    main()
