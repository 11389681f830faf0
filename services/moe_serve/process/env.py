"""Configuration from the environment: every flag's default may come from a MOE_<FLAG> variable."""

from __future__ import annotations

import os


def env(name: str, default: str | None = None) -> str | None:
    """Value of MOE_<NAME> from the environment (flags override it), else `default`."""
    return os.environ.get(f"MOE_{name.upper()}", default)
