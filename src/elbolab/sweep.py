"""Sweeps: one config, a list of values for some of its keys; each combination is a run.

``elbolab train --sweep train.seed=0,1,2,3`` (repeat ``--sweep`` for a grid: the runs are
the product of the lists), or a ``sweep:`` section in a config file mapping dotted keys to
lists::

    objective:
      k: 5
    sweep:
      train.seed: [0, 1, 2, 3]
      objective.name: [vae, iwae]

Each run is named by the values it takes (``name=vae,seed=0``) and gets a run folder of that
name inside the sweep's folder; runs that share a shape train as one stacked model
(elbolab.training).
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

from .config import ConfigError, RunConfig, parse_value, read_config_mapping
from .files import atomic_write_text, make_dir

#: the file in a sweep's folder that lists its runs (folder name, the values it takes, its config)
SWEEP_FILE = "sweep.json"


def _split_values(text: str) -> list[str]:
    """``"0,1,[200,200]"`` -> ``["0", "1", "[200,200]"]``: commas inside brackets stay."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{("
        depth -= ch in "]})"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts]


def parse_sweep(items: list[str]) -> dict[str, list[Any]]:
    """``["train.seed=0,1,2"]`` -> ``{"train.seed": [0, 1, 2]}`` (values parsed as ``--set`` parses them)."""
    out: dict[str, list[Any]] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--sweep {item!r}: expected key=value1,value2,..., e.g. train.seed=0,1,2,3")
        key, text = (s.strip() for s in item.split("=", 1))
        values = [parse_value(v) for v in _split_values(text) if v != ""]
        if not values:
            raise ConfigError(f"--sweep {item!r}: no values")
        if key in out:
            raise ConfigError(f"--sweep {key}: given twice")
        out[key] = values
    return out


def check_sweep(sweep: Any, where: str) -> dict[str, list[Any]]:
    """A ``sweep:`` mapping of dotted keys to non-empty lists, or a ConfigError naming ``where``."""
    if not isinstance(sweep, dict):
        raise ConfigError(f"{where}: sweep must map dotted keys to lists of values, got {type(sweep).__name__}")
    for key, values in sweep.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: sweep.{key} must be a non-empty list of values, got {values!r}")
    return {str(k): list(v) for k, v in sweep.items()}


def load_config_with_sweep(path: str | Path) -> tuple[RunConfig, dict[str, list[Any]]]:
    """A config file and its ``sweep:`` section (empty without one)."""
    path = Path(path)
    d = read_config_mapping(path)
    sweep = check_sweep(d.pop("sweep"), str(path)) if "sweep" in d else {}
    try:
        return RunConfig.from_dict(d), sweep
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _label(key: str, keys: list[str]) -> str:
    """The shortest dotted suffix of ``key`` that no other swept key ends with."""
    parts = key.split(".")
    for n in range(1, len(parts) + 1):
        tail = ".".join(parts[-n:])
        if not any(k != key and (k == tail or k.endswith("." + tail)) for k in keys):
            return tail
    return key


def _text(value: Any) -> str:
    text = json.dumps(value, separators=(",", ":")) if isinstance(value, list | dict) else str(value)
    return re.sub(r"[^A-Za-z0-9_.,+\-\[\]=]", "_", text)


def expand(cfg: RunConfig, sweep: dict[str, list[Any]]) -> list[tuple[str, RunConfig]]:
    """Every combination of the swept values as (run name, config), in the order given."""
    keys = list(sweep)
    labels = [_label(k, keys) for k in keys]
    runs: list[tuple[str, RunConfig]] = []
    for combo in itertools.product(*(sweep[k] for k in keys)):
        name = ",".join(f"{lab}={_text(v)}" for lab, v in zip(labels, combo, strict=True))
        runs.append((name, cfg.with_overrides(dict(zip(keys, combo, strict=True)))))
    names = [n for n, _ in runs]
    if len(set(names)) != len(names):
        raise ConfigError("--sweep: two runs get the same values; each value must appear once")
    return runs


def write_sweep_file(folder: Path, runs: list[tuple[str, RunConfig]], sweep: dict[str, list[Any]]) -> None:
    """The sweep's runs and their configs, so that ``train --resume FOLDER`` finds them all, even
    those whose folders a kill came before."""
    make_dir(folder)
    text = json.dumps({"sweep": sweep, "runs": [n for n, _ in runs],
                       "configs": {n: cfg.to_dict() for n, cfg in runs}}, indent=2)
    atomic_write_text(folder / SWEEP_FILE, text + "\n")


def _read(folder: Path) -> dict[str, Any]:
    try:
        d = json.loads((folder / SWEEP_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{folder / SWEEP_FILE}: unreadable sweep file ({type(e).__name__})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{folder / SWEEP_FILE}: not a sweep file (a JSON {type(d).__name__})")
    return d


def _folder_name(name: object) -> bool:
    """A plain folder name inside the sweep's folder: never '.', '..' or a path."""
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def read_sweep_file(folder: Path) -> list[str]:
    """The run folder names a sweep's folder lists; each must be a folder of its own inside it
    (no '..', no path, no symbolic link), so that nothing outside the sweep is resumed."""
    names = _read(folder).get("runs")
    if not isinstance(names, list) or not all(_folder_name(n) for n in names):
        raise ConfigError(f"{folder / SWEEP_FILE}: 'runs' must be a list of folder names inside {folder} "
                          "(no '.', '..' or '/')")
    for n in names:
        if (folder / n).is_symlink():
            raise ConfigError(f"{folder / n}: is a symbolic link; a sweep's runs must be folders inside {folder}")
    return names


def read_sweep_configs(folder: Path) -> dict[str, RunConfig]:
    """The configs sweep.json records per run (none in sweep files of older elbolab versions)."""
    configs = _read(folder).get("configs") or {}
    if not isinstance(configs, dict):
        raise ConfigError(f"{folder / SWEEP_FILE}: 'configs' must map run names to configs")
    out = {}
    for name, d in configs.items():
        try:
            out[str(name)] = RunConfig.from_dict(d)
        except (ConfigError, TypeError, AttributeError) as e:
            raise ConfigError(f"{folder / SWEEP_FILE}: configs.{name}: {e}") from None
    return out


def is_sweep_folder(folder: str | Path | None) -> bool:
    return folder is not None and (Path(folder) / SWEEP_FILE).is_file()
