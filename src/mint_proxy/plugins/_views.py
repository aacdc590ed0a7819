"""``mint-proxy status``'s document: the runtime dir's state as plain JSON data.

The same shape ``PluginStatusApp(runtime_dir=...)`` serves on an admin path, plus the
runtime dir it was read from::

    {"runtime_dir": "...", "supervisor": {"pid": 123, "started": 1764..., "running": true},
     "plugins": {"peak-picking": {"state": "READY", "pid": 456, "restarts": 0, ...}}}
"""

import os
from typing import Any

from .runtime import read_state, supervisor_running


def status_document(runtime_dir: str) -> dict[str, Any]:
    """The state of ``runtime_dir``; ``supervisor`` is None if no supervisor ever wrote one.

    Raises ``StateFileError`` when ``state.json`` is there but unreadable.
    """
    state = read_state(runtime_dir)
    supervisor = None
    if state is not None:
        supervisor = {"pid": state.pid, "started": state.started, "running": supervisor_running(state)}
    plugins = {} if state is None else {slug: status.to_json() for slug, status in sorted(state.plugins.items())}
    return {"runtime_dir": os.path.abspath(runtime_dir), "supervisor": supervisor, "plugins": plugins}
