"""``elbolab reproduce TABLE``: the command line of :func:`elbolab.reproduce.reproduce`."""

from __future__ import annotations

import argparse

from ..reproduce import BUDGETS, EXECUTORS, load_tables, reproduce
from ..reproduce.tables import get_table, plan_rows, select_rows
from .common import add_data_dir


def cmd_reproduce(args: argparse.Namespace) -> int:
    if args.list:
        spec = get_table(args.table)
        print(f"{spec.title} ({spec.citation}, {spec.table})")
        for budget in BUDGETS:
            print(f"  budget {budget}: {spec.protocol.budget_notes[budget]}")
            for row, note in spec.protocol.notes_for(budget).items():
                print(f"    row {row}: {note}")
        for p in plan_rows(spec, args.budget, args.only, args.data_dir, args.set or []):
            c = p.config
            post = c.model.posterior
            flow = f", {post.flow} flow x{post.length}" if post.active else ""
            print(f"  {p.row.id:38s} {p.data_label}, {c.model.name}, prior {c.model.prior.name}{flow}, "
                  f"{c.objective.name} k={c.objective.k}, {c.train.epochs} epoch{'s' * (c.train.epochs != 1)}")
        return 0

    planned = len(select_rows(get_table(args.table), args.only))
    done = 0

    def progress(entry) -> None:
        nonlocal done
        done += 1
        note = f" ({entry.error})" if entry.error else ""
        print(f"  row {done}/{planned} {entry.row}: {entry.status}{note}", flush=True)

    print(f"elbolab: reproducing {planned} row{'s' if planned != 1 else ''} of {args.table} at budget {args.budget} "
          f"({args.executor}, {args.workers} worker{'s' if args.workers > 1 else ''}) -> {args.results}", flush=True)
    rep = reproduce(args.table, budget=args.budget, only=args.only, executor=args.executor, workers=args.workers,
                    results=args.results, data_dir=args.data_dir, overrides=args.set or [], on_row=progress,
                    train=not args.table_only, stack=not args.no_stack)
    print()
    print(rep.outputs["markdown"].read_text())
    print(f"trained {len(rep.trained)}, from cache {len(rep.cached)}, failed {len(rep.failed)}, "
          f"kept from the table already there {len(rep.committed)} ({len(rep.stale)} under an earlier protocol, ‡); "
          f"table: {rep.outputs['markdown']} and {rep.outputs['json']}"
          + (f"; curve: {rep.outputs['curve']}" if "curve" in rep.outputs else "")
          + "".join(f"; {name}: {rep.outputs[name]}" for name in get_table(args.table).figures if name in rep.outputs))
    return 1 if rep.failed else 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce", help="rerun a paper's table and print ours beside theirs")
    p.add_argument("table", choices=sorted(load_tables()), help="which paper table")
    p.add_argument("--budget", default=BUDGETS[0], choices=BUDGETS,
                   help="training length: quick, medium, or paper (the full published protocol)")
    p.add_argument("--only", nargs="+", metavar="ROW", help="run only these rows (see --list)")
    p.add_argument("--executor", default="local", choices=list(EXECUTORS),
                   help="local: worker processes on this machine; ray: Ray tasks (pip install 'elbolab[ray]')")
    p.add_argument("--workers", type=int, default=1, help="rows trained at once (default 1)")
    p.add_argument("--results", default="results", help="results folder; finished rows are cached there")
    add_data_dir(p)
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key in every row, e.g. train.device=cuda")
    p.add_argument("--list", action="store_true", help="list the rows and budgets, train nothing")
    p.add_argument("--no-stack", action="store_true",
                   help="train every row alone (default: rows of one shape train as one stacked model)")
    p.add_argument("--table-only", action="store_true",
                   help="write the table from the rows already finished in --results (rows without a cache "
                        "keep the value of the table.json already there); train nothing")
    p.set_defaults(func=cmd_reproduce)
