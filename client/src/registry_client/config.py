"""Where the client keeps its login and its cache, and how the environment overrides them.

- login: `<config>/config.json` (mode 0600), `<config>` = `$XDG_CONFIG_HOME/registry` (~/.config/registry);
- cache: `$REGISTRY_CLIENT_CACHE_DIR`, else `$XDG_CACHE_HOME/registry` (~/.cache/registry): upload resume states
  and the default download folders;
- `REGISTRY_URL` and `REGISTRY_API_KEY` win over the stored login; `REGISTRY_ADMIN_TOKEN` is the admin token
  (never stored).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from registry_client.client import DEFAULT_URL


def config_dir() -> Path:
    return Path(platformdirs.user_config_dir("registry", appauthor=False))


def cache_dir() -> Path:
    explicit = os.environ.get("REGISTRY_CLIENT_CACHE_DIR")
    return Path(explicit) if explicit else Path(platformdirs.user_cache_dir("registry", appauthor=False))


def config_file() -> Path:
    return config_dir() / "config.json"


@dataclass
class Settings:
    url: str
    api_key: str | None
    admin_token: str | None


def load_settings() -> Settings:
    """The stored login, overridden by the environment."""
    stored: dict = {}
    try:
        stored = json.loads(config_file().read_text())
    except (OSError, ValueError):
        stored = {}
    return Settings(
        url=os.environ.get("REGISTRY_URL") or stored.get("url") or DEFAULT_URL,
        api_key=os.environ.get("REGISTRY_API_KEY") or stored.get("api_key"),
        admin_token=os.environ.get("REGISTRY_ADMIN_TOKEN") or None,
    )


def save_login(url: str, api_key: str) -> Path:
    """Store the URL and key, readable by the user only (0600, in a 0700 folder)."""
    path = config_file()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"url": url, "api_key": api_key}, f)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


def forget_login() -> bool:
    try:
        config_file().unlink()
    except FileNotFoundError:
        return False
    return True
