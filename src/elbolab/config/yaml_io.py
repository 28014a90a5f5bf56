"""Reading config files: YAML (a safe, strict, bounded loader) or JSON, to a plain mapping.

The loader never executes code, refuses a key given twice, and refuses a document whose
aliases expand past :data:`MAX_CONFIG_NODES` values; every fault is one line naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError, shown

#: the most values a YAML config may hold once its aliases (``*name``) are expanded: far above
#: any real config (a few hundred), far below what nested aliases need to exhaust memory
#: (a "billion laughs" file of a few hundred bytes stands for millions of values)
MAX_CONFIG_NODES = 100_000


def _expanded_size(root: yaml.Node) -> int:
    """How many nodes ``root`` stands for with every alias expanded, counted once per shared
    node (so in time linear in the file); a node that contains itself is refused."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in sizes:
            continue
        children = [n for pair in node.value for n in (pair if isinstance(pair, tuple) else (pair,))] \
            if isinstance(node, yaml.CollectionNode) else []
        if done:
            open_.discard(id(node))
            sizes[id(node)] = min(1 + sum(sizes[id(c)] for c in children), MAX_CONFIG_NODES + 1)
            continue
        if id(node) in open_:
            raise _BadYaml(f"an alias at line {node.start_mark.line + 1} refers to a value that contains it")
        open_.add(id(node))
        stack.append((node, True))
        for c in children:
            if id(c) in open_:
                raise _BadYaml(f"an alias at line {c.start_mark.line + 1} refers to a value that contains it")
            stack.append((c, False))
    return sizes[id(root)]


class _BadYaml(yaml.YAMLError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """yaml's safe loader (never executes code) that refuses a key given twice in one mapping,
    where the plain loader silently keeps the last (a second ``train:`` section, say), and a
    document whose aliases expand past :data:`MAX_CONFIG_NODES` values."""

    def construct_document(self, node: yaml.Node) -> Any:
        if _expanded_size(node) > MAX_CONFIG_NODES:
            raise _BadYaml(f"its aliases (*name) expand to more than {MAX_CONFIG_NODES:,} values; "
                           "a config this large is a mistake or an alias bomb")
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, list | dict):  # unhashable: the base class refuses it
                continue
            if key in seen:
                raise _BadYaml(f"key {shown(key)} appears twice (lines {seen[key].line + 1} and "
                                    f"{key_node.start_mark.line + 1}); give each key once")
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _unique_json_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    dup = next((k for k in keys if keys.count(k) > 1), None)
    if dup is not None:
        raise ConfigError(f"key {shown(dup)} appears twice in one object; give each key once")
    return dict(pairs)


def read_config_mapping(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML or JSON config file holds, every reading fault one line naming the file."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a config file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (a config is YAML or JSON text)") from None
    if "\x00" in text:
        raise ConfigError(f"{path}: not a text file (it holds NUL bytes; a config is YAML or JSON text)")
    try:
        if path.suffix == ".json":
            d = json.loads(text, object_pairs_hook=_unique_json_keys)
        else:
            d = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except (_BadYaml, ConfigError) as e:
        raise ConfigError(f"{path}: {e}") from None
    except RecursionError:
        raise ConfigError(f"{path}: values nested too deeply to be a config") from None
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        why = " ".join(str(e).split())
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {why}") from None
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections, got {type(d).__name__}")
    return d


def parse_value(text: str) -> Any:
    """Parse an override value: numbers (1e-3 included), booleans, null, lists, or a string."""
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError:
        return text
