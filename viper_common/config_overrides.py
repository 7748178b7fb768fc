"""Config files and `--config.a.b=value` overrides for ml-collections configs, shared by `viper train`,
`viper loop` and `viper-synth`.

A config file is a Python file whose `get_config()` returns a ConfigDict; every key it sets must exist in
the command's schema (its defaults), so a typo is refused with its closest matches instead of being
silently ignored. Override values are parsed as the type of the key's current value (an int stays an int,
a path or prompt stays a string, never evaluated).
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

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


# Sections whose keys are free-form: None (not checked) or a function name -> the schema of entry `name`.
OpenSections = Mapping[str, "Callable[[str], ConfigDict] | None"]


def load_config_file(path: str | Path, schema: ConfigDict, open_sections: OpenSections = {}) -> ConfigDict:
    """`get_config()` of a Python config file, every key checked against `schema` (see check_keys)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"_viper_config_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot load config file {path}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"config file {path} has no get_config()")
        config = module.get_config()
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - the file is the user's code: any error in it is theirs to fix
        text = e.msg if isinstance(e, SyntaxError) else str(e)  # a SyntaxError's str repeats file and line
        raise ConfigError(f"config file {path}{_line_in(e, path)}: {type(e).__name__}: {text}") from e
    if not isinstance(config, ConfigDict):
        raise ConfigError(f"config file {path}: get_config() returned a {type(config).__name__}, not a ConfigDict")
    try:
        check_keys(config, schema, open_sections)
    except ConfigError as e:  # the same error, with the file it is in
        raise type(e)(f"{e} (in config file {path})") from None
    return config


def _line_in(error: BaseException, path: Path) -> str:
    """', line N' of the config file where `error` arose (the deepest frame in that file), or ''."""
    if isinstance(error, SyntaxError) and error.lineno:
        return f", line {error.lineno}"
    lines = [lineno for frame, lineno in traceback.walk_tb(error.__traceback__)
             if Path(frame.f_code.co_filename).resolve() == path.resolve()]
    return f", line {lines[-1]}" if lines else ""


def check_keys(config: ConfigDict, schema: ConfigDict, open_sections: OpenSections = {}, prefix: str = "") -> None:
    """Every key of `config` must exist in `schema`, sections must stay sections. In an open section (by
    dotted path) any name goes; each entry is checked against `open_sections[path](name)` when not None."""
    for key, value in config.items():
        path = f"{prefix}{key}"
        if path in open_sections:
            entry_schema = open_sections[path]
            for name, entry in (value.items() if entry_schema is not None else ()):
                if not isinstance(entry, ConfigDict):
                    raise ConfigError(f"config key {path}.{name} must be a section (a ConfigDict), got {entry!r}")
                check_keys(entry, entry_schema(name), {}, f"{path}.{name}.")
            continue
        if key not in schema:
            raise unknown_key(path, list(schema.keys()))
        if isinstance(schema[key], ConfigDict):
            if not isinstance(value, ConfigDict):
                raise ConfigError(f"config key {path!r} must be a section, got {value!r}")
            check_keys(value, schema[key], open_sections, f"{path}.")


def override_flags(values: Mapping[str, Any], schema: ConfigDict, open_sections: OpenSections = {}) -> list[str]:
    """`--config.a.b=value` flags that set `values` (dotted key -> value) in a config of `schema`, for a command
    run as a subprocess. Each key is checked now (an unknown one is refused here, not in the child), and each
    value is written so that apply_overrides parses it back to itself (strings bare, the rest as repr)."""
    flags = []
    for key, value in values.items():
        nested: dict[str, Any] = {}
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
        check_keys(ConfigDict(nested), schema, open_sections)
        flags.append(f"--config.{key}={value if isinstance(value, str) else repr(value)}")
    return flags

