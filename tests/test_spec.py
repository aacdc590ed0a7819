"""What a supervised plugin is (``mint_proxy.plugins.spec.PluginSpec``) and how its exits read
(``mint_proxy.plugins._launch.describe_exit``): the checks made before anything runs."""

from typing import Any

import pytest

from mint_proxy.plugins import PluginSpec
from mint_proxy.plugins._launch import describe_exit


def test_a_command_string_is_split_like_a_shell_would_and_the_prefix_defaults_to_the_slug() -> None:
    given: dict[str, Any] = {"command": "uvicorn 'my app:app' --uds {socket}"}  # typed as the tuple it becomes
    spec = PluginSpec("peak", **given)
    assert spec.command == ("uvicorn", "my app:app", "--uds", "{socket}")
    assert spec.prefix == "/peak"


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        pytest.param({}, ValueError, "give exactly one of 'app' or 'command'", id="neither"),
        pytest.param({"app": "m:app", "command": "serve"}, ValueError, "give exactly one of", id="both"),
        pytest.param({"command": ""}, ValueError, "'command' is empty", id="empty-string"),
        pytest.param({"command": []}, ValueError, "'command' is empty", id="empty-list"),
        pytest.param({"command": ["serve", 8000]}, TypeError, "a string or a list of strings", id="not-strings"),
        pytest.param({"command": 8000}, TypeError, "a string or a list of strings", id="a-number"),
        pytest.param({"app": "m:app", "stop_timeout": 0}, ValueError, "stop_timeout must be a positive", id="zero"),
        pytest.param({"app": "m:app", "startup_timeout": True}, ValueError, "startup_timeout", id="a-bool"),
        pytest.param({"app": "m:app", "health_path": "healthz"}, ValueError, "must start with '/'", id="health"),
    ],
)
def test_a_spec_that_cannot_run_is_refused_naming_the_plugin(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message) as caught:
        PluginSpec("peak", **options)
    assert isinstance(caught.value, TypeError) or "plugin 'peak'" in str(caught.value)


@pytest.mark.parametrize(
    ("returncode", "text"),
    [(0, "exit 0"), (3, "exit 3"), (-9, "signal SIGKILL"), (-15, "signal SIGTERM"), (-200, "signal 200")],
)
def test_an_exit_reads_as_its_code_or_its_signals_name(returncode: int, text: str) -> None:
    assert describe_exit(returncode) == text
