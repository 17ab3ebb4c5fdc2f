"""Whether the Hugging Face hub can be reached, asked once per process before a hub lookup.

Offline, the hub client retries each request with back-off (`Retrying in 8s [Retry 4/5]`), so a
run that names a hub id spent 30-55 s before failing. One short TCP probe of the endpoint decides
instead: when it fails, the client's offline mode is switched on for this process, so a model or
dataset already in the local cache still loads and anything else fails at once with our message.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0
_TRUE = {"1", "ON", "YES", "TRUE"}
_reachable: bool | None = None  # the probe's answer, once asked

OFFLINE_HINT = "set HF_HUB_OFFLINE=1 to use the local HF cache without trying the hub"


def endpoint() -> str:
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def offline_requested() -> bool:
    """HF_HUB_OFFLINE (or the older TRANSFORMERS_OFFLINE / HF_DATASETS_OFFLINE) is set."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    return any(os.environ.get(n, "").upper() in _TRUE for n in names)


def probe(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the endpoint's host opens within `timeout` seconds."""
    parsed = urlparse(url)
    host = parsed.hostname
    if not host:
        return False
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:  # DNS failure, refused, unreachable, timed out, or sockets cut in a test
        return False


def hub_reachable() -> bool:
    """False when offline mode is requested or the hub does not answer the probe; in the latter
    case the hub client (and `datasets`) are put in offline mode for the rest of the process."""
    global _reachable
    if offline_requested():
        _go_offline()
        return False
    if _reachable is None:
        _reachable = probe(endpoint())
        if not _reachable:
            _go_offline()
    return _reachable


def _go_offline() -> None:
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True  # read at call time by huggingface_hub and transformers
    import sys

    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        setattr(datasets_config, "HF_HUB_OFFLINE", True)  # noqa: B010  (read at call time by datasets)


def reset() -> None:
    """Forget the probe's answer (tests)."""
    global _reachable
    _reachable = None
