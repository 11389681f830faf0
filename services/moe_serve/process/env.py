"""Configuration from the environment: every flag's default may come from a MOE_<FLAG> variable."""

from __future__ import annotations

import os


def env(name: str, default: str | None = None) -> str | None:
    """Value of MOE_<NAME> from the environment (flags override it), else `default`."""
    return os.environ.get(f"MOE_{name.upper()}", default)


TRUE = ("1", "true", "yes", "on")


def env_flag(name: str, default: bool) -> bool:
    """MOE_<NAME> as a boolean flag's default: 1/true/yes/on (any case) is True, anything else False;
    `default` when unset."""
    value = env(name)
    return default if value is None else value.strip().lower() in TRUE
