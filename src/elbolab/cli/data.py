"""``elbolab data list`` and ``elbolab data download NAME``."""

from __future__ import annotations

import argparse
import time

from ..data import DATASETS, load, resolve_data_dir, resolve_name
from ..data.download import download, file_state


def _counts(sizes) -> str:
    return " / ".join(f"{split} {n:,}" for split, n in sizes)


def cmd_data_list(args: argparse.Namespace) -> int:
    data_dir = resolve_data_dir(args.data_dir)
    print(f"data directory: {data_dir}")
    for name in sorted(DATASETS):
        spec = DATASETS[name]
        shape = "x".join(map(str, spec.image_shape))
        kind = "binary" if spec.binary else "grey 0..255"
        if spec.embedded:
            states, found = [], "embedded"
        elif not spec.files:
            states, found = [], "passed in (elbolab.train(data), docs/api.md)"
        else:
            states = [file_state(data_dir, f) for f in spec.files]
            n_found = sum(s.path is not None for s in states)
            found = "found" if n_found == len(states) else ("missing" if n_found == 0 else "partial")
        counts = _counts(spec.split_sizes)
        if args.load and found in ("found", "embedded"):
            t0 = time.perf_counter()
            dataset = load(name, data_dir)
            counts = _counts(dataset.counts().items()) + f" (loaded in {time.perf_counter() - t0:.2f} s)"
        print(f"\n{name}: {found}" + (f"  [{shape} {kind}]  {counts}" if spec.files or spec.embedded else ""))
        print(f"  {spec.description}")
        for s in states:
            where = s.path if s.path is not None else data_dir / s.relpath
            print(f"  {s.state:<12} {where}")
    print("\nmissing files: `elbolab data download NAME`; names take -dynamic/-static/-grey to pick the binarization")
    return 0


def cmd_data_download(args: argparse.Namespace) -> int:
    data_dir = resolve_data_dir(args.data_dir)
    spec, _ = resolve_name(args.name)
    download(spec, data_dir)
    print(f"{spec.name}: ready in {data_dir}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="list the datasets and their files, or download one")
    p.add_argument("--data-dir", help="folder with the dataset files (else $ELBOLAB_DATA, else the user cache)")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    q = dsub.add_parser("list", help="every dataset: found or missing, path, checksum, shape, counts per split")
    q.add_argument("--load", action="store_true", help="also load each found dataset and report its real counts")
    q.add_argument("--data-dir", help=argparse.SUPPRESS, default=argparse.SUPPRESS)
    q.set_defaults(func=cmd_data_list)
    q = dsub.add_parser("download", help="fetch a dataset's files from the canonical source, verified")
    q.add_argument("name", help="dataset name, e.g. mnist")
    q.add_argument("--data-dir", help=argparse.SUPPRESS, default=argparse.SUPPRESS)
    q.set_defaults(func=cmd_data_download)
