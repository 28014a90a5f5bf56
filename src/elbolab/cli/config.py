"""``elbolab config show``: the full resolved config, each key with its comment."""

from __future__ import annotations

import argparse

from ..config import PRESETS, ConfigError, RunConfig, commented_yaml, load_config, preset


def resolved_config(args: argparse.Namespace) -> RunConfig:
    """The config ``elbolab train`` would run with the same --config / --preset / --set."""
    if args.config and args.preset:
        raise ConfigError("--config and --preset: give one of them, not both")
    cfg = load_config(args.config) if args.config else (preset(args.preset) if args.preset else RunConfig())
    return cfg.with_overrides(list(args.set)) if args.set else cfg


def cmd_config_show(args: argparse.Namespace) -> int:
    cfg = resolved_config(args)
    print(cfg.to_json() if args.json else commented_yaml(cfg), end="" if not args.json else "\n")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="show the full resolved config, each key with what it means")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    q = csub.add_parser("show", help="print every key of the config (YAML, a comment above each key); "
                                     "save it and pass it back with `elbolab train --config FILE`")
    q.add_argument("--config", help="YAML or JSON config file")
    q.add_argument("--preset", choices=sorted(PRESETS), help="a named config")
    q.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. train.lr=3e-4")
    q.add_argument("--json", action="store_true", help="plain JSON without comments")
    q.set_defaults(func=cmd_config_show)
