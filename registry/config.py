"""User settings: a TOML file under platformdirs' config dir, read with tomllib, written with tomli-w.

A setting is resolved in this order: command-line option, environment variable,
config file, built-in default (see `resolve`).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from registry.errors import QregError, UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

APP_NAME = "qreg"


@dataclass(frozen=True)
class Setting:
    """A configurable value: its key in the config file, environment variable, type and default."""

    key: str
    env: str
    parse: Callable[[str], Any]
    default: Any
    help: str


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError("must be a whole number") from None


def _positive_int(text: str) -> int:
    value = _integer(text)
    if value <= 0:
        raise ValueError(f"must be a positive integer, got {value}")
    return value


def _context(text: str) -> int:
    from registry.serving import MIN_CTX

    value = _integer(text)
    if value < MIN_CTX:
        raise ValueError(f"must be at least {MIN_CTX} tokens, got {value}")
    return value


def _port(text: str) -> int:
    value = _integer(text)
    if not 1 <= value <= 65535:
        raise ValueError(f"must be a port number from 1 to 65535, got {value}")
    return value


def _cache_type(text: str) -> str:
    if text not in ("f16", "q8_0", "q4_0"):
        raise ValueError(f"must be f16, q8_0 or q4_0, got '{text}'")
    return text


SETTINGS: dict[str, Setting] = {
    s.key: s
    for s in (
        Setting("server.bin", "QREG_LLAMA_SERVER", str, None, "path of the llama-server binary"),
        Setting("serve.host", "QREG_HOST", str, "127.0.0.1", "address llama-server listens on"),
        Setting("serve.port", "QREG_PORT", _port, 8080, "port llama-server listens on"),
        Setting("serve.ctx", "QREG_CTX", _context, 8192, "per-slot context in tokens"),
        Setting("serve.parallel", "QREG_PARALLEL", _positive_int, 1, "number of parallel slots"),
        Setting("serve.cache_type", "QREG_CACHE_TYPE", _cache_type, "f16", "KV cache type: f16, q8_0 or q4_0"),
        Setting("serve.ubatch", "QREG_UBATCH", _positive_int, 512, "micro-batch size in tokens (-b/-ub), at most ctx"),
        Setting("manifest", "QREG_MANIFEST", str, None, "path of the manifest to use instead of the shipped one"),
    )
}


def config_dir() -> Path:
    """Return qreg's config directory (platformdirs; XDG_CONFIG_HOME on Linux)."""
    import platformdirs

    return platformdirs.user_config_path(APP_NAME)


def data_dir() -> Path:
    """Return qreg's data directory for recorded digests, partial downloads and quarantine."""
    import platformdirs

    return platformdirs.user_data_path(APP_NAME)


def config_path() -> Path:
    override = os.environ.get("QREG_CONFIG")
    return Path(override) if override else config_dir() / "config.toml"


def read_config() -> dict[str, Any]:
    """Read the config file as a flat {dotted key: value} dict; a missing file is empty."""
    path = config_path()
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise QregError(f"config file {path} is unreadable: {error}", hint="fix or delete it") from None
    return _flatten(data)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for dotted, value in sorted(flat.items()):
        table = nested
        *parents, leaf = dotted.split(".")
        for depth, part in enumerate(parents):
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                # A hand-edited file such as `serve = 5` next to serve.ctx.
                clash = ".".join(parents[: depth + 1])
                raise QregError(f"config file {config_path()} sets {clash} to a value, but {dotted} needs it to be a table",
                                hint=f"remove the line '{clash} = ...' from the file")
        table[leaf] = value
    return nested


def lookup(key: str) -> Setting:
    try:
        return SETTINGS[key]
    except KeyError:
        known = ", ".join(sorted(SETTINGS))
        raise UsageError(f"unknown setting '{key}'", hint=f"known settings: {known}") from None


def parse_value(setting: Setting, text: str, source: str) -> Any:
    try:
        return setting.parse(text)
    except ValueError as error:
        if source == setting.env:
            hint = f"set {setting.env} to a valid value or unset it"
        elif source == "the command line":
            hint = f"run 'qreg config set {setting.key} VALUE' with a valid value"
        else:
            hint = f"run 'qreg config set {setting.key} VALUE' with a valid value, or 'qreg config unset {setting.key}'"
        raise UsageError(f"invalid value '{text}' for {setting.key} from {source}: {error}", hint=hint) from None


def write_setting(key: str, text: str | None) -> Path:
    """Set (or with text None, remove) one setting in the config file, atomically."""
    import tomli_w

    setting = lookup(key)
    flat = read_config()
    if text is None:
        if key not in flat:
            raise UsageError(f"{key} is not set in {config_path()}", hint="run 'qreg config list' to see the settings")
        flat.pop(key)
    else:
        flat[key] = parse_value(setting, text, "the command line")

    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(tomli_w.dumps(_nest(flat)), encoding="utf-8")
    os.replace(temporary, path)
    return path


def resolve(key: str, option_value: Any = None) -> tuple[Any, str]:
    """Resolve a setting: option > environment > config file > default.

    Returns the value and where it came from ("option", "env", "config", "default").
    """
    setting = lookup(key)
    if option_value is not None:
        return option_value, "option"

    env_text = os.environ.get(setting.env)
    if env_text:
        return parse_value(setting, env_text, setting.env), "env"

    stored = read_config().get(key)
    if stored is not None:
        return parse_value(setting, str(stored), str(config_path())), "config"

    return setting.default, "default"
