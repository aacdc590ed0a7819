import asyncio
import logging
import os
import textwrap
from pathlib import Path

import pytest

from mint_proxy.devconfig import (
    CONFIG_ENV,
    DEFAULT_CONFIG_PATH,
    SECRET_ENV,
    ConfigWatcher,
    DevConfig,
    config_path_from_environ,
    load_dev_config,
    parse_dev_config,
    secret_from_environ,
)
from mint_proxy.errors import DevConfigError, MintProxyError
from mint_proxy.plugins.runtime import default_runtime_dir
from mint_proxy.plugins.spec import PluginSpec, RestartPolicy, SharedPlugin
from mint_proxy.routing import DEFAULT_RETRY_WINDOW, Route, RouteTable

PATH = "conf/config.dev.toml"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --- valid files: the routes must equal the RouteTable built in code (parity) ---------------------------

VALID = [
    # The seed's short form.
    pytest.param(
        '[proxy]\n"/lcms-sequence" = "http://localhost:8004"\n"/peak-picking" = "http://localhost:8005"\n',
        [Route("/lcms-sequence", "http://localhost:8004"), Route("/peak-picking", "http://localhost:8005")],
        id="seed-short-form",
    ),
    # Table form with only the required url.
    pytest.param(
        '[proxy."/peak"]\nurl = "http://127.0.0.1:8005"\n',
        [Route("/peak", "http://127.0.0.1:8005")],
        id="table-form-url-only",
    ),
    # Table form with every option.
    pytest.param(
        '[proxy."/slow-analysis"]\nurl = "http://127.0.0.1:8006/base"\nplugin = "slow"\nstrip_prefix = true\n'
        "connect_timeout = 2.5\nread_timeout = 3600\nmax_body_bytes = 10485760\nmax_message_bytes = 1048576\n",
        [
            Route(
                "/slow-analysis",
                "http://127.0.0.1:8006/base",
                plugin="slow",
                strip_prefix=True,
                connect_timeout=2.5,
                read_timeout=3600,
                max_body_bytes=10485760,
                max_message_bytes=1048576,
            )
        ],
        id="table-form-every-option",
    ),
    # Unix socket upstream.
    pytest.param(
        '[proxy."/x"]\nurl = "unix:/run/mint/x.sock"\nmax_body_bytes = 0\n',
        [Route("/x", "unix:/run/mint/x.sock", max_body_bytes=0)],
        id="unix-socket",
    ),
    # Both forms mixed in one [proxy] table, plus nested prefixes.
    pytest.param(
        '[proxy]\n"/a" = "http://localhost:9001"\n"/a/b" = "http://localhost:9002"\n'
        '[proxy."/c"]\nurl = "http://localhost:9003"\nstrip_prefix = false\n',
        [
            Route("/a", "http://localhost:9001"),
            Route("/a/b", "http://localhost:9002"),
            Route("/c", "http://localhost:9003", strip_prefix=False),
        ],
        id="mixed-forms",
    ),
    # Dotted-key spelling of the table form is the same TOML.
    pytest.param(
        '[proxy]\n"/d".url = "http://localhost:9004"\n"/d".read_timeout = 10\n',
        [Route("/d", "http://localhost:9004", read_timeout=10)],
        id="dotted-keys",
    ),
    # A missing or empty [proxy] yields an empty table.
    pytest.param("", [], id="empty-file"),
    pytest.param("[proxy]\n", [], id="empty-proxy"),
    pytest.param('[settings]\nmount_path = "/api"\n', [], id="settings-only"),
]


@pytest.mark.parametrize(("text", "routes"), VALID)
def test_parse_builds_the_same_route_table_as_code(text: str, routes: list[Route]) -> None:
    config = parse_dev_config(text, path=PATH)
    assert config.routes == RouteTable(routes)
    assert list(config.routes) == routes
    assert config.path == PATH


@pytest.mark.parametrize(
    ("text", "mount_path", "retry_window"),
    [
        pytest.param("", "", DEFAULT_RETRY_WINDOW, id="defaults"),
        pytest.param('[settings]\nmount_path = ""\n', "", DEFAULT_RETRY_WINDOW, id="explicit-empty-mount"),
        pytest.param('[settings]\nmount_path = "/api"\nretry_window = 0.5\n', "/api", 0.5, id="both"),
        pytest.param('[settings]\nmount_path = "/mint/api"\nretry_window = 0\n', "/mint/api", 0.0, id="nested-zero"),
        pytest.param("[settings]\nretry_window = 3\n", "", 3.0, id="integer-window"),
    ],
)
def test_parse_settings(text: str, mount_path: str, retry_window: float) -> None:
    config = parse_dev_config(text, path=PATH)
    assert (config.mount_path, config.retry_window) == (mount_path, retry_window)
    assert isinstance(config.retry_window, float)


def test_parse_returns_a_devconfig_equal_to_one_built_in_code() -> None:
    text = '[proxy]\n"/a" = "http://localhost:9001"\n[settings]\nmount_path = "/api"\nretry_window = 1.5\n'
    expected = DevConfig(
        PATH,
        RouteTable({"/a": "http://localhost:9001"}),
        mount_path="/api",
        retry_window=1.5,
        runtime_dir=default_runtime_dir({}),
    )
    assert parse_dev_config(text, path=PATH) == expected


# --- invalid files: (text, key path in the message, problem in the message) ------------------------------

INVALID = [
    # Unknown keys anywhere.
    pytest.param("[proxi]\n", "[proxi]", "unknown key (did you mean 'proxy'?)", id="unknown-top-level-table"),
    pytest.param("debug = true\n", "debug", "unknown key", id="unknown-top-level-value"),
    pytest.param(
        '[proxy."/a"]\nurl = "http://h"\nread_timout = 1\n',
        '[proxy."/a"].read_timout',
        "did you mean 'read_timeout'?",
        id="unknown-route-key",
    ),
    pytest.param('[proxy."/a".extra]\nurl = "http://h"\n', '[proxy."/a"].extra', "unknown key", id="nested-table"),
    pytest.param("[settings]\nport = 8000\n", "[settings].port", "unknown key", id="unknown-settings-key"),
    # Wrong shapes and missing keys.
    pytest.param("proxy = 1\n", "proxy", "must be a table", id="proxy-not-a-table"),
    pytest.param('settings = "x"\n', "settings", "must be a table", id="settings-not-a-table"),
    pytest.param('[proxy]\n"/a" = 8005\n', '[proxy]."/a"', "must be a URL string or a table", id="route-integer"),
    pytest.param('[proxy]\n"/a" = ["http://h"]\n', '[proxy]."/a"', "an array", id="route-array"),
    pytest.param('[proxy."/a"]\nplugin = "a"\n', '[proxy."/a"]', "missing required key url", id="missing-url"),
    # Wrong TOML types.
    pytest.param('[proxy."/a"]\nurl = 8005\n', '[proxy."/a"].url', "must be a string", id="url-integer"),
    pytest.param(
        '[proxy."/a"]\nurl = "http://h"\nstrip_prefix = "yes"\n',
        '[proxy."/a"].strip_prefix',
        "must be true or false, got 'yes' (a string)",
        id="strip-prefix-string",
    ),
    pytest.param(
        '[proxy."/a"]\nurl = "http://h"\nread_timeout = "10"\n',
        '[proxy."/a"].read_timeout',
        "must be a number of seconds, got '10' (a string)",
        id="read-timeout-string",
    ),
    pytest.param(
        '[proxy."/a"]\nurl = "http://h"\nconnect_timeout = true\n',
        '[proxy."/a"].connect_timeout',
        "must be a number of seconds, got True (a boolean)",
        id="connect-timeout-bool",
    ),
    pytest.param(
        '[proxy."/a"]\nurl = "http://h"\nmax_body_bytes = 1.5\n',
        '[proxy."/a"].max_body_bytes',
        "must be an integer number of bytes, got 1.5 (a float)",
        id="max-body-float",
    ),
    # A falsy non-string plugin would otherwise fall back to the default silently.
    pytest.param(
        '[proxy."/a"]\nurl = "http://h"\nplugin = false\n', '[proxy."/a"].plugin', "must be a string", id="plugin-bool"
    ),
    pytest.param("[settings]\nmount_path = 1\n", "[settings].mount_path", "must be a string", id="mount-path-integer"),
    pytest.param(
        '[settings]\nretry_window = "2"\n', "[settings].retry_window", "must be a number", id="retry-window-string"
    ),
    pytest.param("[settings.mount_path]\nx = 1\n", "[settings].mount_path", "got a table", id="mount-path-table"),
    # Values rejected by Route itself, attributed to the key at fault.
    pytest.param(
        '[proxy."/a"]\nurl = "http://h"\nread_timeout = 0\n',
        '[proxy."/a"].read_timeout',
        "read_timeout must be a positive number of seconds",
        id="read-timeout-zero",
    ),
    pytest.param(
        '[proxy."/a"]\nurl = "http://h"\nmax_message_bytes = 0\n',
        '[proxy."/a"].max_message_bytes',
        "must be a positive integer",
        id="max-message-zero",
    ),
    pytest.param(
        '[proxy."/a"]\nurl = "http://h"\nmax_message_bytes = "16M"\n',
        '[proxy."/a"].max_message_bytes',
        "must be an integer number of bytes",
        id="max-message-string",
    ),
    pytest.param(
        '[proxy."/a"]\nurl = "http://h"\nmax_body_bytes = -1\n',
        '[proxy."/a"].max_body_bytes',
        "must be a non-negative integer",
        id="max-body-negative",
    ),
    pytest.param(
        '[proxy."/a"]\nurl = "http://h"\nplugin = "a b"\n',
        '[proxy."/a"].plugin',
        "must be a non-empty slug",
        id="plugin-slug",
    ),
    # Bad URLs and schemes.
    pytest.param(
        '[proxy]\n"/a" = "https://h:8443"\n', '[proxy]."/a"', "only 'http' and 'unix' are supported", id="https"
    ),
    pytest.param('[proxy."/a"]\nurl = "ftp://h"\n', '[proxy."/a"].url', "has scheme 'ftp'", id="ftp-table-form"),
    pytest.param('[proxy]\n"/a" = "localhost:8005"\n', '[proxy]."/a"', "must look like", id="no-scheme"),
    pytest.param('[proxy]\n"/a" = "http://h:99999"\n', '[proxy]."/a"', "invalid port", id="bad-port"),
    pytest.param('[proxy]\n"/a" = "http://h/?q=1"\n', '[proxy]."/a"', "must not contain a query", id="query"),
    pytest.param('[proxy]\n"/a" = "unix:run/x.sock"\n', '[proxy]."/a"', "unix:/absolute/path", id="unix-relative"),
    # Bad prefixes.
    pytest.param('[proxy]\npeak = "http://h"\n', "[proxy].peak", "must start with '/'", id="prefix-no-slash"),
    pytest.param('[proxy]\n"/peak/" = "http://h"\n', '[proxy]."/peak/"', "must not end with '/'", id="prefix-trail"),
    pytest.param('[proxy]\n"/a//b" = "http://h"\n', '[proxy]."/a//b"', "invalid segment ''", id="prefix-empty-seg"),
    pytest.param(
        '[proxy."/../x"]\nurl = "http://h"\n', '[proxy."/../x"]', "invalid segment '..'", id="prefix-dot-dot-table"
    ),
    # Bad settings values.
    pytest.param('[settings]\nmount_path = "api"\n', "[settings].mount_path", "'api' must be", id="mount-no-slash"),
    pytest.param('[settings]\nmount_path = "/api/"\n', "[settings].mount_path", "no trailing '/'", id="mount-trail"),
    pytest.param('[settings]\nmount_path = "/"\n', "[settings].mount_path", "'/' must be", id="mount-root"),
    pytest.param('[settings]\nmount_path = "/a/../b"\n', "[settings].mount_path", "dot segments", id="mount-dotdot"),
    pytest.param("[settings]\nretry_window = -1\n", "[settings].retry_window", ">= 0, got -1", id="negative-window"),
    pytest.param("[settings]\nretry_window = nan\n", "[settings].retry_window", "finite", id="nan-window"),
    pytest.param(
        "[settings]\nretry_window = 1" + "0" * 400 + "\n", "[settings].retry_window", "finite", id="huge-window"
    ),
    pytest.param(
        '[proxy."/a"]\nurl = "http://h:1"\nplugin = ""\n', '[proxy."/a"].plugin', "must not be empty", id="empty-plugin"
    ),
    # TOML syntax errors and duplicates, reported with tomllib's line and column.
    pytest.param("[proxy\n", "invalid TOML", "(at line 1, column 7)", id="toml-syntax"),
    pytest.param('[proxy]\n/a = "http://h"\n', "invalid TOML", "(at line 2, column 1)", id="unquoted-prefix"),
    pytest.param(
        '[proxy]\n"/a" = "http://h"\n"/a" = "http://i"\n',
        "invalid TOML: Cannot overwrite a value (at line 3",
        "each key may appear once",
        id="duplicate-key",
    ),
    pytest.param(
        '[proxy]\n"/a" = "http://h"\n\'/a\' = "http://i"\n',
        "invalid TOML: Cannot overwrite",
        "each key may appear once",
        id="duplicate-key-other-quotes",
    ),
    pytest.param(
        '[proxy]\n"/a" = "http://h"\n[proxy."/a"]\nurl = "http://i"\n',
        "invalid TOML: Cannot overwrite",
        "short or the table form",
        id="duplicate-short-and-table",
    ),
    pytest.param(
        '[proxy."/a"]\nurl = "http://h"\n[proxy."/a"]\nurl = "http://i"\n',
        "invalid TOML: Cannot declare",
        "each key may appear once",
        id="duplicate-table",
    ),
]


@pytest.mark.parametrize(("text", "key", "problem"), INVALID)
def test_parse_rejects_with_file_key_and_problem(text: str, key: str, problem: str) -> None:
    with pytest.raises(DevConfigError) as info:
        parse_dev_config(text, path=PATH)
    message = str(info.value)
    assert message.startswith(f"{PATH}: {key}")
    assert problem in message
    assert info.value.path == PATH


def test_error_key_attribute_is_the_key_path() -> None:
    with pytest.raises(DevConfigError) as info:
        parse_dev_config('[proxy."/a"]\nurl = "ftp://h"\n', path=PATH)
    assert info.value.key == '[proxy."/a"].url'
    assert isinstance(info.value, MintProxyError)
    assert isinstance(info.value.__cause__, ValueError)


def test_route_table_errors_are_reported_too(monkeypatch: pytest.MonkeyPatch) -> None:
    # tomllib already rejects duplicate prefixes, so RouteTable's own check is reached only through a stub.
    def route_table(routes: list[Route]) -> RouteTable:
        raise ValueError("duplicate route for prefix '/a'")

    monkeypatch.setattr("mint_proxy.devconfig.RouteTable", route_table)
    with pytest.raises(DevConfigError, match=r"^conf/config\.dev\.toml: \[proxy\]: duplicate route for prefix '/a'$"):
        parse_dev_config('[proxy]\n"/a" = "http://h"\n', path=PATH)


def test_default_path_in_messages() -> None:
    with pytest.raises(DevConfigError, match=r"^<string>: proxy: "):
        parse_dev_config("proxy = 1\n")


# --- files -----------------------------------------------------------------------------------------------


def test_load_reads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.dev.toml"
    path.write_text('[proxy]\n"/a" = "http://localhost:9001"\n', encoding="utf-8")
    config = load_dev_config(path)
    assert config.path == str(path)
    assert config.routes == RouteTable([Route("/a", "http://localhost:9001")])


def test_load_names_the_file_in_parse_errors(tmp_path: Path) -> None:
    path = tmp_path / "config.dev.toml"
    path.write_text('[proxy]\n"/a" = "https://h"\n', encoding="utf-8")
    with pytest.raises(DevConfigError, match=r"config\.dev\.toml: \[proxy\]\.\"/a\": .*scheme 'https'") as info:
        load_dev_config(str(path))
    assert str(info.value).startswith(str(path))


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        pytest.param("missing.toml", "no such file", id="missing-file"),
        pytest.param("a-directory", "is a directory", id="directory"),
        pytest.param("latin1.toml", "not UTF-8", id="not-utf8"),
    ],
)
def test_load_rejects_unreadable_files(tmp_path: Path, name: str, problem: str) -> None:
    (tmp_path / "a-directory").mkdir()
    (tmp_path / "latin1.toml").write_bytes(b'[proxy]\n"/caf\xe9" = "http://h"\n')
    path = tmp_path / name
    with pytest.raises(DevConfigError) as info:
        load_dev_config(path)
    assert str(info.value).startswith(f"{path}: {problem}")
    assert info.value.path == str(path)


def test_missing_relative_file_says_where_it_looked_and_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(DevConfigError) as info:
        load_dev_config("does-not-exist/config.dev.toml")
    message = str(info.value)
    assert message.startswith("does-not-exist/config.dev.toml: no such file (looked in /")
    assert f"set {CONFIG_ENV} or create it" in message


def test_load_reports_other_os_errors_by_their_reason(tmp_path: Path) -> None:
    path = tmp_path / ("x" * 300)  # longer than any file system's NAME_MAX: ENAMETOOLONG, not ENOENT
    with pytest.raises(DevConfigError) as info:
        load_dev_config(path)
    assert str(info.value) == f"{path}: cannot read the file: File name too long"


# --- environment -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        pytest.param({}, DEFAULT_CONFIG_PATH, id="unset"),
        pytest.param({CONFIG_ENV: ""}, DEFAULT_CONFIG_PATH, id="empty"),
        pytest.param({CONFIG_ENV: "/etc/mint/dev.toml"}, "/etc/mint/dev.toml", id="set"),
        pytest.param({"OTHER": "x.toml"}, DEFAULT_CONFIG_PATH, id="other-variable"),
    ],
)
def test_config_path_from_environ(environ: dict[str, str], expected: str) -> None:
    assert config_path_from_environ(environ) == expected


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        pytest.param({}, None, id="unset"),
        pytest.param({SECRET_ENV: ""}, None, id="empty-counts-as-unset"),
        pytest.param({SECRET_ENV: "s" * 32}, "s" * 32, id="set"),
    ],
)
def test_secret_from_environ(environ: dict[str, str], expected: str | None) -> None:
    assert secret_from_environ(environ) == expected


# --- watcher ---------------------------------------------------------------------------------------------

ONE = '[proxy]\n"/a" = "http://localhost:9001"\n'
TWO = '[proxy]\n"/a" = "http://localhost:9001"\n"/b" = "http://localhost:9002"\n'
BROKEN = '[proxy]\n"/a" = "https://localhost:9001"\n'


class _Config:
    """A config file whose every write gets a new, deterministic mtime (no sleeps)."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.mtime_ns = 1_700_000_000_000_000_000
        self.write(text)

    def write(self, text: str) -> None:
        self.path.write_text(text, encoding="utf-8")
        self.mtime_ns += 1_000_000_000
        os.utime(self.path, ns=(self.mtime_ns, self.mtime_ns))


@pytest.fixture
def config(tmp_path: Path) -> _Config:
    return _Config(tmp_path / "config.dev.toml", ONE)


@pytest.fixture
def table(config: _Config) -> RouteTable:
    return load_dev_config(config.path).routes


def test_watcher_unchanged_file_is_not_reloaded(config: _Config, table: RouteTable) -> None:
    watcher = ConfigWatcher(str(config.path), table)
    assert watcher.check() is False
    assert watcher.check() is False


def test_watcher_applies_an_edit(config: _Config, table: RouteTable, caplog: pytest.LogCaptureFixture) -> None:
    watcher = ConfigWatcher(str(config.path), table)
    config.write(TWO)
    with caplog.at_level(logging.INFO, logger="mint_proxy"):
        assert poll(watcher) is True
    assert table == parse_dev_config(TWO).routes
    assert any(m.startswith(f"reloaded {config.path}: 2 routes: ") for m in caplog.messages)
    assert watcher.check() is False


def test_watcher_sees_an_edit_with_the_same_mtime_and_size(config: _Config, table: RouteTable) -> None:
    watcher = ConfigWatcher(str(config.path), table)
    replacement = config.path.with_name("new.toml")
    replacement.write_text(ONE.replace("9001", "9009"), encoding="utf-8")
    os.utime(replacement, ns=(config.mtime_ns, config.mtime_ns))
    os.replace(replacement, config.path)  # how editors save: a new inode
    assert poll(watcher) is True
    assert table.get("/a") == Route("/a", "http://localhost:9009")


def test_watcher_keeps_the_last_good_table_on_a_broken_edit_then_recovers(
    config: _Config, table: RouteTable, caplog: pytest.LogCaptureFixture
) -> None:
    watcher = ConfigWatcher(str(config.path), table)
    before = RouteTable(table)
    config.write(BROKEN)
    with caplog.at_level(logging.INFO, logger="mint_proxy"):
        assert poll(watcher) is False
    assert table == before
    [record] = caplog.records
    assert record.levelno == logging.ERROR
    assert record.getMessage().startswith(f'{config.path}: [proxy]."/a": ')
    assert "keeping the last good routes (1)" in record.getMessage()
    assert watcher.check() is False  # reported once, not on every poll

    config.write(TWO)
    assert poll(watcher) is True
    assert len(table) == 2


def test_watcher_keeps_the_table_when_the_file_disappears(
    config: _Config, table: RouteTable, caplog: pytest.LogCaptureFixture
) -> None:
    watcher = ConfigWatcher(str(config.path), table)
    before = RouteTable(table)
    config.path.unlink()
    assert poll(watcher) is False
    assert table == before
    assert [r.levelno for r in caplog.records] == [logging.ERROR]
    assert "no such file" in caplog.messages[0]
    assert "config.dev.toml" in caplog.messages[0]
    assert watcher.check() is False

    config.write(TWO)
    assert poll(watcher) is True
    assert len(table) == 2


def test_watcher_warns_that_settings_need_a_restart(
    config: _Config, table: RouteTable, caplog: pytest.LogCaptureFixture
) -> None:
    watcher = ConfigWatcher(str(config.path), table)
    config.write(TWO + '[settings]\nmount_path = "/api"\n')
    assert poll(watcher) is True
    assert len(table) == 2
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "restart" in record.getMessage()


def test_watcher_reloads_when_the_file_changed_before_it_started(config: _Config, table: RouteTable) -> None:
    config.write(TWO)  # edited between the caller's load and the watcher's construction
    watcher = ConfigWatcher(str(config.path), table)
    assert poll(watcher) is True
    assert len(table) == 2


def test_watcher_reports_a_file_broken_before_it_started(
    config: _Config, table: RouteTable, caplog: pytest.LogCaptureFixture
) -> None:
    config.write(BROKEN)
    watcher = ConfigWatcher(str(config.path), table)
    assert poll(watcher) is False
    assert len(table) == 1
    assert [r.levelno for r in caplog.records] == [logging.ERROR]


def test_watcher_uses_the_given_logger(config: _Config, table: RouteTable, caplog: pytest.LogCaptureFixture) -> None:
    watcher = ConfigWatcher(str(config.path), table, logger=logging.getLogger("custom"))
    config.write(BROKEN)
    poll(watcher)
    assert [r.name for r in caplog.records] == ["custom"]


def test_watcher_never_applies_a_file_caught_half_saved(config: _Config, table: RouteTable) -> None:
    """An editor that saves in place truncates, then writes: a poll between the two sees a valid,
    empty file. A change applies only once the file held still for one poll."""
    watcher = ConfigWatcher(str(config.path), table)
    config.write("")
    assert watcher.check() is False
    config.write(TWO)  # the save completes before the next poll
    assert watcher.check() is False  # changed again since the last poll: wait
    assert len(table) == 1
    assert watcher.check() is True
    assert len(table) == 2


def poll(watcher: ConfigWatcher) -> bool:
    """Two polls: the first only notes a change (it must hold still for one poll), the second acts on it."""
    assert watcher.check() is False
    return watcher.check()


@pytest.mark.parametrize("interval", [0, -1, True])
def test_watcher_rejects_a_bad_interval(config: _Config, table: RouteTable, interval: float) -> None:
    with pytest.raises(ValueError, match="interval must be a positive number"):
        ConfigWatcher(str(config.path), table, interval=interval)


@pytest.mark.anyio
async def test_watcher_run_picks_up_an_edit_and_stops_when_cancelled(config: _Config, table: RouteTable) -> None:
    watcher = ConfigWatcher(str(config.path), table, interval=0.01)
    task = asyncio.create_task(watcher.run())
    config.write(TWO)
    for _ in range(500):  # bounded: at most ~5 s, normally a few ms
        if len(table) == 2:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(table) == 2


@pytest.mark.anyio
async def test_watcher_run_survives_unexpected_errors(
    config: _Config, table: RouteTable, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    watcher = ConfigWatcher(str(config.path), table, interval=0.01)
    calls = 0

    def check() -> bool:
        nonlocal calls
        calls += 1
        raise RuntimeError("boom")

    monkeypatch.setattr(watcher, "check", check)
    task = asyncio.create_task(watcher.run())
    for _ in range(500):
        if calls >= 2:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls >= 2
    assert "error while checking" in caplog.messages[0]


# --- supervised plugins: [proxy."/prefix"] with app or command, [settings] runtime_dir, [shared] ---------

RUN = "/run/mint-test"


def parse_plugins(text: str, **environ: str) -> DevConfig:
    return parse_dev_config(text, path=PATH, environ={"MINT_PROXY_RUNTIME_DIR": RUN, **environ}, base_dir="/srv/lab")


def test_app_entry_is_a_plugin_spec_routed_to_its_socket() -> None:
    config = parse_plugins('[proxy."/peak-picking"]\napp = "peak_picking.app:app"\nread_timeout = 3600\n')
    (spec,) = config.plugins
    assert spec == PluginSpec(
        slug="peak-picking",
        prefix="/peak-picking",
        app="peak_picking.app:app",
        route_options={"read_timeout": 3600},
    )
    assert config.routes == RouteTable(
        [Route("/peak-picking", f"unix:{RUN}/peak-picking.sock", plugin="peak-picking", read_timeout=3600)]
    )
    assert config.runtime_dir == RUN


def test_command_entry_with_every_key() -> None:
    text = """
        [proxy."/lcms"]
        plugin = "lcms-sequence"
        command = ["uvicorn", "lcms.app:app", "--uds", "{socket}"]
        env = { LOG_LEVEL = "debug" }
        cwd = "plugins/lcms"
        startup_timeout = 5
        health_path = "/healthz"
        stop_timeout = 2.5
        backoff_initial = 0.1
        backoff_max = 4
        stable_after = 0
        crash_limit = 3
        crash_window = 60
        strip_prefix = true
        connect_timeout = 1
        max_body_bytes = 1024
    """
    (spec,) = parse_plugins(textwrap.dedent(text)).plugins
    assert spec.slug == "lcms-sequence" and spec.prefix == "/lcms"
    assert spec.command == ("uvicorn", "lcms.app:app", "--uds", "{socket}")
    assert spec.env == {"LOG_LEVEL": "debug"}
    assert spec.cwd == "/srv/lab/plugins/lcms"  # relative to the file's directory
    assert (spec.startup_timeout, spec.health_path, spec.stop_timeout) == (5, "/healthz", 2.5)
    assert spec.restart == RestartPolicy(
        backoff_initial=0.1, backoff_max=4.0, stable_after=0.0, crash_limit=3, crash_window=60.0
    )
    assert spec.route_options == {"strip_prefix": True, "connect_timeout": 1, "max_body_bytes": 1024}


def test_command_string_is_split_like_a_shell_would() -> None:
    (spec,) = parse_plugins('[proxy."/p"]\ncommand = "uvicorn mod:app --reload --uds {socket}"\n').plugins
    assert spec.command == ("uvicorn", "mod:app", "--reload", "--uds", "{socket}")


@pytest.mark.parametrize(
    ("python", "expected"),
    [
        pytest.param(".venv/bin/python", "/srv/lab/.venv/bin/python", id="relative-path-from-the-file"),
        pytest.param("/opt/py/bin/python", "/opt/py/bin/python", id="absolute"),
        pytest.param("python3.12", "python3.12", id="bare-name-looked-up-on-PATH"),
    ],
)
def test_python_paths(python: str, expected: str) -> None:
    (spec,) = parse_plugins(f'[proxy."/p"]\napp = "m:app"\npython = "{python}"\n').plugins
    assert spec.python == expected


def test_short_form_and_plugins_mix() -> None:
    config = parse_plugins('[proxy]\n"/hand" = "http://127.0.0.1:8005"\n[proxy."/auto"]\napp = "m:app"\n')
    assert [spec.slug for spec in config.plugins] == ["auto"]
    assert config.routes.get("/hand") == Route("/hand", "http://127.0.0.1:8005")


@pytest.mark.parametrize(
    ("settings", "environ", "expected"),
    [
        pytest.param('runtime_dir = "/var/run/mint"', {}, "/var/run/mint", id="file"),
        pytest.param('runtime_dir = "run"', {}, "/srv/lab/run", id="file-relative-to-the-file"),
        pytest.param(
            'runtime_dir = "/var/run/mint"', {"MINT_PROXY_RUNTIME_DIR": "/env/dir"}, "/env/dir", id="env-wins"
        ),
        pytest.param("", {"XDG_RUNTIME_DIR": "/run/user/1000"}, "/run/user/1000/mint-proxy", id="per-user-default"),
    ],
)
def test_runtime_dir(settings: str, environ: dict[str, str], expected: str) -> None:
    text = f'[settings]\n{settings}\n[proxy."/p"]\napp = "m:app"\n'
    config = parse_dev_config(text, path=PATH, environ=environ, base_dir="/srv/lab")
    assert config.runtime_dir == expected
    assert config.routes.get("/p") == Route("/p", f"unix:{expected}/p.sock")


def test_shared_table() -> None:
    config = parse_plugins('[shared."/notes"]\napp = "notes.app:app"\n[shared."/x"]\napp = "x:app"\nplugin = "x-ray"\n')
    assert config.shared == (SharedPlugin("notes", "notes.app:app"), SharedPlugin("x-ray", "x:app", prefix="/x"))
    assert len(config.routes) == 0  # the proxy does not route shared plugins


def test_shared_strip_prefix() -> None:
    config = parse_plugins('[shared."/n"]\napp = "n:app"\nstrip_prefix = true\n')
    assert config.shared == (SharedPlugin("n", "n:app", strip_prefix=True),)


PLUGIN_INVALID = [
    pytest.param('[proxy."/p"]\napp = "m:app"\nurl = "http://h"\n', '[proxy."/p"].url', "remove url", id="url-and-app"),
    pytest.param('[proxy."/p"]\napp = "m:app"\ncommand = "x"\n', '[proxy."/p"]', "either app", id="app-and-command"),
    pytest.param('[proxy."/p"]\napp = 1\n', '[proxy."/p"].app', "must be an ASGI import string", id="app-type"),
    pytest.param('[proxy."/p"]\napp = ""\n', '[proxy."/p"].app', "must not be empty", id="app-empty"),
    pytest.param('[proxy."/p"]\ncommand = []\n', '[proxy."/p"].command', "non-empty array", id="command-empty"),
    pytest.param('[proxy."/p"]\ncommand = ["a", 1]\n', '[proxy."/p"].command', "non-empty strings", id="command-item"),
    pytest.param(
        '[proxy."/p"]\ncommand = "x"\npython = "py"\n', '[proxy."/p"].python', "only applies", id="python-cmd"
    ),
    pytest.param('[proxy."/p"]\napp = "m:a"\nenv = 1\n', '[proxy."/p"].env', "a table of strings", id="env-type"),
    pytest.param(
        '[proxy."/p"]\napp = "m:a"\nenv = {A = 1}\n', '[proxy."/p".env].A', "must be a string", id="env-value"
    ),
    pytest.param(
        '[proxy."/p"]\napp = "m:a"\nstartup_timeout = 0\n', '[proxy."/p"].startup_timeout', "positive", id="startup"
    ),
    pytest.param('[proxy."/p"]\napp = "m:a"\nstop_timeout = "9"\n', '[proxy."/p"].stop_timeout', "a number", id="stop"),
    pytest.param(
        '[proxy."/p"]\napp = "m:a"\nhealth_path = "hz"\n', '[proxy."/p"].health_path', "start with '/'", id="health"
    ),
    pytest.param(
        '[proxy."/p"]\napp = "m:a"\nbackoff_initial = 0\n', '[proxy."/p"].backoff_initial', "> 0", id="backoff0"
    ),
    pytest.param(
        '[proxy."/p"]\napp = "m:a"\nbackoff_initial = 5\nbackoff_max = 1\n',
        '[proxy."/p"].backoff_max',
        "must be >= backoff_initial",
        id="backoff-order",
    ),
    pytest.param('[proxy."/p"]\napp = "m:a"\nstable_after = -1\n', '[proxy."/p"].stable_after', ">= 0", id="stable"),
    pytest.param('[proxy."/p"]\napp = "m:a"\ncrash_limit = 0\n', '[proxy."/p"].crash_limit', "positive", id="limit"),
    pytest.param(
        '[proxy."/p"]\napp = "m:a"\ncrash_limit = 2.5\n', '[proxy."/p"].crash_limit', "integer", id="limit-type"
    ),
    pytest.param('[proxy."/p"]\napp = "m:a"\ncrash_window = inf\n', '[proxy."/p"].crash_window', "finite", id="window"),
    pytest.param('[proxy."/p"]\napp = "m:a"\nrestart = 1\n', '[proxy."/p"].restart', "unknown key", id="unknown"),
    pytest.param(
        '[proxy."/p"]\napp = "m:a"\nread_timeout = 0\n', '[proxy."/p"].read_timeout', "positive", id="route-key"
    ),
    pytest.param('[proxy."/a/b"]\napp = "m:a"\n', '[proxy."/a/b"]', 'set plugin = "a-slug"', id="nested-prefix-slug"),
    pytest.param('[proxy."/p"]\napp = "m:a"\nplugin = "Peak"\n', '[proxy."/p"].plugin', "not valid", id="bad-slug"),
    pytest.param("[settings]\nruntime_dir = 1\n", "[settings].runtime_dir", "directory path", id="runtime-dir-type"),
    pytest.param(
        f'[settings]\nruntime_dir = "/{"x" * 120}"\n[proxy."/p"]\napp = "m:a"\n',
        '[proxy."/p"]',
        "more than the",
        id="socket-path-too-long",
    ),
    pytest.param('[shared."/n"]\nplugin = "n"\n', '[shared."/n"]', "missing required key app", id="shared-no-app"),
    pytest.param('[shared."/n"]\napp = "n:a"\nurl = "x"\n', '[shared."/n"].url', "unknown key", id="shared-key"),
    pytest.param(
        '[shared."/n"]\napp = "n:a"\nstrip_prefix = 1\n',
        '[shared."/n"].strip_prefix',
        "true or false",
        id="shared-strip-type",
    ),  # fmt: skip
    pytest.param('[shared]\n"/n" = "n:app"\n', '[shared]."/n"', "must be a table", id="shared-short"),
    pytest.param(
        '[shared."/n"]\napp = "n:a"\n[proxy]\n"/n" = "http://h"\n', '[shared."/n"]', "shared or isolated", id="both"
    ),
    pytest.param('[shared."n"]\napp = "n:a"\n', "[shared.n]", "must start with '/'", id="shared-prefix"),
]


@pytest.mark.parametrize(("text", "key", "problem"), PLUGIN_INVALID)
def test_plugin_keys_are_checked_with_file_key_and_problem(text: str, key: str, problem: str) -> None:
    with pytest.raises(DevConfigError) as info:
        parse_dev_config(text, path=PATH, environ={})
    message = str(info.value)
    assert message.startswith(f"{PATH}: {key}: "), message
    assert problem in message, message


def test_watcher_calls_on_reload_with_the_new_config(tmp_path: Path) -> None:
    path = tmp_path / "config.dev.toml"
    path.write_text('[proxy."/p"]\napp = "m:app"\n', encoding="utf-8")
    environ = {"MINT_PROXY_RUNTIME_DIR": str(tmp_path)}
    config = load_dev_config(path, environ=environ)
    seen: list[DevConfig | None] = []
    watcher = ConfigWatcher(str(path), config.routes, environ=environ, on_reload=seen.append)
    path.write_text('[proxy."/p"]\napp = "m:app"\nstop_timeout = 1\n', encoding="utf-8")
    os.utime(path, ns=(1, 1))
    watcher.check()
    assert watcher.check() is True
    (reloaded,) = seen
    assert reloaded is not None
    assert [spec.stop_timeout for spec in reloaded.plugins] == [1]
    assert reloaded.runtime_dir == str(tmp_path)
    path.write_text("[proxy\n", encoding="utf-8")  # a broken edit: None, the last good routes stay
    os.utime(path, ns=(2, 2))
    watcher.check()
    assert watcher.check() is False
    assert seen[1:] == [None]
