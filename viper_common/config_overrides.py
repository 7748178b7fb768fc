"""`--config.a.b=value` overrides for ml-collections configs, shared by `viper` and `viper-synth`.

Values are parsed as the type of the key's current value (an int stays an int, a path or prompt stays a
string, never evaluated); an unknown key is refused with its closest matches.
"""

from __future__ import annotations

import ast
import difflib
from typing import Any, Sequence

from ml_collections import ConfigDict


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key at fault."""


class UnknownKeyError(ConfigError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


def unknown_key(key: str, known: Sequence[str]) -> UnknownKeyError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(known), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys here: {', '.join(sorted(known))}"
    return UnknownKeyError(f"unknown config key {key!r}{hint}")


def parse_value(old: Any, text: str, key: str) -> Any:
    """`text` parsed as the type of the current value `old`."""
    if isinstance(old, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--config.{key}: expected a boolean, got {text!r}")
    try:
        if isinstance(old, int):
            return int(text)
        if isinstance(old, float):
            return float(text)
    except ValueError:
        raise ConfigError(f"--config.{key}: expected {type(old).__name__}, got {text!r}") from None
    if isinstance(old, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if isinstance(old, (tuple, list)):  # a bare glob or name: a one-element tuple
            return (text,)
        return text
    if isinstance(old, (tuple, list)):
        value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    return value


def apply_overrides(config: ConfigDict, flags: Sequence[str], *, allow_other: bool = False) -> list[str]:
    """Applies `--config.a.b=value` (or `--config.a.b value`) flags to `config` in place.

    Other arguments are returned when allow_other, refused by name otherwise."""
    rest: list[str] = []
    flags = list(flags)
    i = 0
    while i < len(flags):
        flag = flags[i]
        if not flag.startswith("--config."):
            if not allow_other:
                raise ConfigError(f"unrecognised argument {flag!r}; overrides look like --config.rl.group_size=8")
            rest.append(flag)
            i += 1
            continue
        if "=" in flag:
            key, text = flag[len("--config."):].split("=", 1)
        elif i + 1 < len(flags):
            key, text = flag[len("--config."):], flags[i + 1]
            i += 1
        else:
            raise ConfigError(f"{flag} needs a value")
        *parents, leaf = key.split(".")
        node = config
        for depth, part in enumerate(parents):
            if not isinstance(node, ConfigDict) or part not in node:
                raise unknown_key(".".join(parents[:depth + 1]), list(node.keys()) if isinstance(node, ConfigDict) else [])
            node = node[part]
        if not isinstance(node, ConfigDict) or leaf not in node:
            raise unknown_key(key, list(node.keys()) if isinstance(node, ConfigDict) else [])
        if isinstance(node[leaf], ConfigDict):
            raise ConfigError(f"--config.{key} is a section; override its keys one by one")
        try:
            node[leaf] = parse_value(node[leaf], text, key)
        except TypeError as e:  # ConfigDict's own type check
            raise ConfigError(f"--config.{key}: {e}") from None
        i += 1
    return rest
