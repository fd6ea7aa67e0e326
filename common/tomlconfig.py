"""Reading TOML configs with errors that name the key, the value and what is valid (pure).

Contract: :class:`TableReader` wraps one TOML table at a dotted path (``services[0]``); its typed
getters return a value or raise :class:`ConfigError` with a message such as ``services[0].port:
70000 is not valid; expected an integer from 1 to 65535``.  :meth:`TableReader.done` reports a key
that was never read, so a typo never silently falls back to a default.  Every program's config
(the distributor's, the node agent's) is read with it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import tomllib
from typing import Any

__all__ = ["ConfigError", "TableReader", "loads", "show"]


class ConfigError(ValueError):
    pass


def loads(text: str, source: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None


def show(value: Any) -> str:
    return repr(value) if not isinstance(value, dict) else "a table"


class TableReader:
    """A TOML table being read: tracks the keys used so leftovers can be reported."""

    def __init__(self, data: Any, path: str):
        if not isinstance(data, dict):
            raise ConfigError(f"{path or 'the top level'}: expected a table, got {show(data)}")
        self.data = data
        self.path = path
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def has(self, name: str) -> bool:
        return name in self.data

    def get(self, name: str, default: Any = dataclasses.MISSING) -> Any:
        self.used.add(name)
        if name in self.data:
            return self.data[name]
        if default is dataclasses.MISSING:
            raise ConfigError(f"{self.key(name)}: required key is missing")
        return default

    def table(self, name: str, required: bool = False) -> "TableReader":
        value = self.get(name, dataclasses.MISSING if required else {})
        return TableReader(value, self.key(name))

    def integer(self, name: str, default: Any, low: int, high: int) -> int:
        value = self.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(f"{self.key(name)}: {show(value)} is not valid; expected an integer from {low} to {high}")
        return value

    def number(self, name: str, default: Any, low: float, inclusive: bool = False, high: float | None = None) -> float:
        value = self.get(name, default)
        bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
        if not bad:  # TOML allows inf and nan: neither is a duration, a rate or a size
            bad = not (value >= low if inclusive else value > low) or (high is not None and value > high)
        if bad:
            bound = ">=" if inclusive else ">"
            upper = f" and <= {high}" if high is not None else ""
            raise ConfigError(f"{self.key(name)}: {show(value)} is not valid; expected a finite number {bound} {low}{upper}")
        return float(value)

    def string(self, name: str, default: Any = dataclasses.MISSING, choices: tuple[str, ...] | None = None) -> str:
        value = self.get(name, default)
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{self.key(name)}: {show(value)} is not valid; expected a non-empty string")
        if choices is not None and value not in choices:
            raise ConfigError(f"{self.key(name)}: {show(value)} is not valid; expected one of {', '.join(choices)}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.get(name, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.key(name)}: {show(value)} is not valid; expected true or false")
        return value

    def ipv4(self, name: str) -> ipaddress.IPv4Address:
        value = self.get(name)
        try:
            if not isinstance(value, str):
                raise ValueError
            return ipaddress.IPv4Address(value)
        except ValueError:
            raise ConfigError(
                f"{self.key(name)}: {show(value)} is not valid; expected an IPv4 address such as \"203.0.113.1\""
            ) from None

    def endpoint(self, name: str, default: str = "") -> tuple[str, int] | None:
        """An ``"ADDRESS:PORT"`` (IPv4, or IPv6 in brackets); ``""`` means disabled (None)."""
        value = self.get(name, default)
        if value == "":
            return None
        parsed = parse_endpoint(value) if isinstance(value, str) else None
        if parsed is None:
            raise ConfigError(
                f"{self.key(name)}: {show(value)} is not valid; expected \"ADDRESS:PORT\" such as \"127.0.0.1:9110\", "
                "or \"\" to disable"
            )
        return parsed

    def done(self) -> None:
        extra = sorted(set(self.data) - self.used)
        if extra:
            known = ", ".join(sorted(self.used)) or "none"
            raise ConfigError(f"{self.key(extra[0])}: unknown key (known keys here: {known})")


def parse_endpoint(text: str) -> tuple[str, int] | None:
    """``"198.51.100.2:8405"`` or ``"[2001:db8::2]:8405"`` -> (address, port); None when it is not one."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not (port.isascii() and port.isdigit()):  # int() also takes "+80", "1_0" and other scripts' digits
        return None
    try:
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        return None
    if not sep or not 1 <= number <= 65535:
        return None
    return host, number
