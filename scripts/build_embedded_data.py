"""Rebuild the embedded dataset byte-for-byte from Larochelle's binarized MNIST files.

    python scripts/build_embedded_data.py [--source ../shared/data/binarized_mnist] [--check]

Each split is a random subset (numpy default_rng(SEED), sorted indices) of the file of
the same split: never the head of a file, since MNIST's test set is ordered and its
first half is easier. ``--check`` rebuilds in memory and compares with the packaged files.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np

from elbolab.data.embedded import EMBEDDED_DIR, SEED, SPLIT_SIZES, pack
from elbolab.data.formats import read_amat

SOURCE_FILES = {"train": "binarized_mnist_train.amat.gz", "valid": "binarized_mnist_valid.amat.gz",
                "test": "binarized_mnist_test.amat.gz"}


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def build(source: Path) -> tuple[dict[str, bytes], dict]:
    rng = np.random.default_rng(SEED)
    files: dict[str, bytes] = {}
    manifest: dict = {"seed": SEED, "source": "Larochelle's binarized MNIST (.amat), see shared/data/SOURCES.md",
                      "files": {}}
    for split, n in SPLIT_SIZES.items():
        path = source / SOURCE_FILES[split]
        images = read_amat(path)
        idx = np.sort(rng.choice(images.shape[0], size=n, replace=False))
        data = npy_bytes(pack(images[idx]))
        idx_bytes = npy_bytes(idx.astype(np.uint16))
        files[f"{split}.npy"] = data
        files[f"{split}_indices.npy"] = idx_bytes
        manifest["files"][split] = {
            "file": f"{split}.npy",
            "sha256": hashlib.sha256(data).hexdigest(),
            "count": n,
            "indices_file": f"{split}_indices.npy",
            "source_file": SOURCE_FILES[split],
            "source_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        }
    return files, manifest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/binarized_mnist")
    ap.add_argument("--check", action="store_true", help="compare with the packaged files instead of writing")
    args = ap.parse_args()
    files, manifest = build(args.source)
    manifest_text = json.dumps(manifest, indent=2) + "\n"
    if args.check:
        bad = [n for n, b in files.items() if (EMBEDDED_DIR / n).read_bytes() != b]
        if (EMBEDDED_DIR / "MANIFEST.json").read_text() != manifest_text:
            bad.append("MANIFEST.json")
        print("identical" if not bad else f"differs: {bad}")
        return 1 if bad else 0
    EMBEDDED_DIR.mkdir(exist_ok=True)
    for name, b in files.items():
        (EMBEDDED_DIR / name).write_bytes(b)
    (EMBEDDED_DIR / "MANIFEST.json").write_text(manifest_text)
    print(f"wrote {len(files)} files to {EMBEDDED_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
