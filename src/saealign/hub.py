"""The Hugging Face hub, as saealign sees it: optional, and never reached when the user said offline."""

from __future__ import annotations

import os


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids the hub (read on every call: tests and users set it at run time)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
