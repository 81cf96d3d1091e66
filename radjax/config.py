"""Loading experiment configs: ``path/to/config.py[:arg]`` plus ``--config.key=value`` overrides.

A config file defines ``get_config(arg=None) -> ml_collections.ConfigDict``. The
loaded config is locked, so a typo in an override (or in code reading the config)
fails with the offending key and the closest valid keys instead of silently
adding a new field.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from typing import Any, Iterable, Sequence

import ml_collections


class ConfigError(ValueError):
  """A config file or override is invalid; the message names the file or key."""


def _split_spec(spec: str) -> tuple[str, str | None]:
  # "configs/x.py:arg" -> ("configs/x.py", "arg"); a Windows drive letter is not an arg.
  path, sep, arg = spec.rpartition(":")
  if not sep or not path or not path.endswith(".py"):
    return spec, None
  return path, arg


def _resolve_path(path: str) -> str:
  if os.path.exists(path):
    return path
  # Configs ship inside the repository; let `configs/x.py` work from any cwd.
  repo_configs = os.path.join(os.path.dirname(os.path.dirname(__file__)), path)
  if os.path.exists(repo_configs):
    return repo_configs
  raise ConfigError(f"config file not found: {path!r}")


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Imports ``spec`` (``FILE.py`` or ``FILE.py:ARG``) and returns ``get_config(ARG)``."""
  path, arg = _split_spec(spec)
  path = _resolve_path(path)
  name = "radjax_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  if module_spec is None or module_spec.loader is None:
    raise ConfigError(f"cannot import config file {path!r}")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} defines no get_config(arg)")
  config = module.get_config(arg) if arg is not None else module.get_config()
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict")
  return config


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """All dotted keys of a (nested) config, leaves and sub-dicts alike."""
  keys = []
  for key, value in config.items():
    dotted = f"{prefix}{key}"
    keys.append(dotted)
    if isinstance(value, ml_collections.ConfigDict):
      keys.extend(flat_keys(value, dotted + "."))
  return keys


def unknown_key_error(key: str, config: ml_collections.ConfigDict) -> ConfigError:
  candidates = flat_keys(config)
  close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.6)
  hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
  return ConfigError(f"unknown config key {key!r}{hint}")


def parse_value(raw: str, current: Any, where: str) -> Any:
  """A command-line string as a value of ``current``'s type: a Python literal, "true"/"false" for a
  bool, "a,b" for a tuple of names; any literal (or the string itself) when ``current`` is None.
  Anything else raises ConfigError starting with ``where``."""
  if isinstance(current, str):
    return raw
  if isinstance(current, bool):
    lowered = raw.lower()
    if lowered in ("true", "1", "yes"):
      return True
    if lowered in ("false", "0", "no"):
      return False
    raise ConfigError(f"{where}: expected bool (true or false), got {raw!r}")
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    if current is None:
      return raw  # an unset field: take the string as given
    if isinstance(current, tuple) and all(isinstance(x, str) for x in current):
      # Names as a shell makes them easy to type (a,b), not as Python literals ("('a','b')").
      return tuple(part.strip() for part in raw.split(",") if part.strip())
    raise ConfigError(f"{where}: expected {type(current).__name__}, got {raw!r}") from None
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if isinstance(current, tuple) and not isinstance(value, tuple):
    value = tuple(value) if isinstance(value, list) else (value,)
  if current is not None and not isinstance(value, type(current)):
    raise ConfigError(f"{where}: expected {type(current).__name__}, got {raw!r} ({type(value).__name__})")
  return value


def apply_override(config: ml_collections.ConfigDict, key: str, raw: str) -> None:
  """Sets dotted ``key`` to the parsed ``raw`` value; unknown keys raise ConfigError."""
  node = config
  parts = key.split(".")
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise unknown_key_error(key, config)
    if i < len(parts) - 1:
      node = node[part]
  leaf = parts[-1]
  with node.ignore_type():
    node[leaf] = parse_value(raw, node[leaf], f"--config.{key}")


def parse_overrides(argv: Iterable[str]) -> list[tuple[str, str]]:
  """Extracts ``--config.key=value`` / ``--config.key value`` pairs from argv."""
  argv = list(argv)
  pairs, i = [], 0
  while i < len(argv):
    arg = argv[i]
    if not arg.startswith("--config."):
      raise ConfigError(f"unrecognised argument {arg!r}")
    body = arg[len("--config."):]
    if "=" in body:
      key, raw = body.split("=", 1)
    elif i + 1 < len(argv):
      key, raw = body, argv[i + 1]
      i += 1
    else:
      raise ConfigError(f"{arg}: missing value")
    pairs.append((key, raw))
    i += 1
  return pairs


def load_config(spec: str, overrides: Sequence[tuple[str, str]] | Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads a config file, applies overrides, and returns it locked.

  ``overrides`` are ``(key, raw_value)`` pairs or raw ``--config.k=v`` strings.
  """
  config = load_config_file(spec)
  if overrides and isinstance(overrides[0], str):
    overrides = parse_overrides(overrides)
  for key, raw in overrides:
    apply_override(config, key, raw)
  config.lock()
  return config


def check_known(config: ml_collections.ConfigDict, allowed: ml_collections.ConfigDict) -> None:
  """Raises if ``config`` holds a key that ``allowed`` (a reference config) lacks."""
  for key in flat_keys(config):
    node = allowed
    for part in key.split("."):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise unknown_key_error(key, allowed)
      node = node[part]
