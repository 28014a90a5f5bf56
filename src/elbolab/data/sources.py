"""Where each standard file comes from and what its bytes must hash to: the one pin table.

Every file is named by its path relative to the data directory (the layout of
``shared/data``). A file is *verified* when its SHA-256 equals the pinned one, or,
for files that are distributed with different compression, when the SHA-256/MD5 of its
uncompressed content equals the published value (e.g. LeCun's ``train-images`` .gz and
the recompressed copy in ``shared/data`` hold the same bytes). Values are from
``shared/data/SOURCES.md``. Set ``ELBOLAB_DATA_VERIFY=0`` to use a file that does not match.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import os
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path

from .dataset import DataError

VERIFY_ENV_VAR = "ELBOLAB_DATA_VERIFY"


@dataclass(frozen=True)
class SourceFile:
    #: canonical download address ("" when none is known)
    url: str
    #: SHA-256 of the file as distributed in shared/data ("" when not pinned)
    sha256: str = ""
    #: "sha256:<hex>" or "md5:<hex>" of the uncompressed content ("" when not published)
    content: str = ""


_S3_MNIST = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_FASHION = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_LAROCHELLE = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
_OMNIGLOT_NPZ = "https://raw.githubusercontent.com/bitsandscraps/omniglot/b0481240b7eb42393285a93ce7d2f266ff10c62b/"

#: relative path -> source; the only place checksums are written down
PINS: dict[str, SourceFile] = {
    "mnist/train-images-idx3-ubyte.gz": SourceFile(
        _S3_MNIST + "train-images-idx3-ubyte.gz",
        "0b367032e93c5d0cea0925647cfdb18614af8ee15f83e6f2fc2ad904a6835971",
        "md5:6bbc9ace898e44ae57da46a324031adb"),
    "mnist/train-labels-idx1-ubyte.gz": SourceFile(
        _S3_MNIST + "train-labels-idx1-ubyte.gz",
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "md5:a25bea736e30d166cdddb491f175f624"),
    "mnist/t10k-images-idx3-ubyte.gz": SourceFile(
        _S3_MNIST + "t10k-images-idx3-ubyte.gz",
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "md5:2646ac647ad5339dbf082846283269ea"),
    "mnist/t10k-labels-idx1-ubyte.gz": SourceFile(
        _S3_MNIST + "t10k-labels-idx1-ubyte.gz",
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        "md5:27ae3e4e09519cfbb04c329615203637"),
    "fashion_mnist/train-images-idx3-ubyte.gz": SourceFile(
        _FASHION + "train-images-idx3-ubyte.gz",
        "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
        "md5:f4a8712d7a061bf5bd6d2ca38dc4d50a"),
    "fashion_mnist/train-labels-idx1-ubyte.gz": SourceFile(
        _FASHION + "train-labels-idx1-ubyte.gz",
        "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
        "md5:9018921c3c673c538a1fc5bad174d6f9"),
    "fashion_mnist/t10k-images-idx3-ubyte.gz": SourceFile(
        _FASHION + "t10k-images-idx3-ubyte.gz",
        "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
        "md5:8181f5470baa50b63fa0f6fddb340f0a"),
    "fashion_mnist/t10k-labels-idx1-ubyte.gz": SourceFile(
        _FASHION + "t10k-labels-idx1-ubyte.gz",
        "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
        "md5:15d484375f8d13e6eb1aabb0c3f46965"),
    # Larochelle distributes the plain .amat; shared/data holds byte-identical .amat.gz
    "binarized_mnist/binarized_mnist_train.amat": SourceFile(
        _LAROCHELLE + "binarized_mnist_train.amat",
        "af247bd6075cf9adc4715459dcd5f13eaa99a2c92d8d81379a05da94770b6c0e",
        "sha256:ad693b29f94c14277b095f5238ddefbbdaaae0939789dd2f4f0205278cee3e4d"),
    "binarized_mnist/binarized_mnist_valid.amat": SourceFile(
        _LAROCHELLE + "binarized_mnist_valid.amat",
        "533b71bc0198f4d73c54ae5fe6c96fc08dc3cf1b3fae24c5521dbc0452507e38",
        "sha256:1de3d397c40fe8eeb33dafd4099a1f665ec01e96d9be234aaeeac8a34930e2e2"),
    "binarized_mnist/binarized_mnist_test.amat": SourceFile(
        _LAROCHELLE + "binarized_mnist_test.amat",
        "32a3c54d03504632bf9f131b4a148c7567aa6fc87da017049b044bdc14c2a0f2",
        "sha256:e6687bfea3f820c174f33b7865140b2a2dd2930ef786f35d45795fc193b5ab2c"),
    "omniglot/images_background.npz": SourceFile(
        _OMNIGLOT_NPZ + "images_background.npz",
        "8bf84167413cd00beacdce3fe582f780ab538d8dbef043a6d688f2527bbce199"),
    "omniglot/images_evaluation.npz": SourceFile(
        _OMNIGLOT_NPZ + "images_evaluation.npz",
        "0b84c7ffd94c4841c0040e529c86a82eaaccb986d8eadad5673f7991b7475276"),
    # Burda et al.'s 28x28 OMNIGLOT: no stored copy, so no pinned checksum
    "omniglot/chardata.mat": SourceFile(
        "https://raw.githubusercontent.com/yburda/iwae/master/datasets/OMNIGLOT/chardata.mat"),
    "caltech101_silhouettes/caltech101_silhouettes_28_split1.mat": SourceFile(
        "https://people.cs.umass.edu/~marlin/data/caltech101_silhouettes_28_split1.mat",
        "eb6735e8d84b1850fabc5590124aab1755e90c9fd28123585324398405e1e42a",
        "md5:4483e9c14b188fd09937f9ea6f9ea777"),
    "freyfaces/freyfaces.pkl": SourceFile(
        "https://raw.githubusercontent.com/jmtomczak/vae_vampprior/master/datasets/Freyfaces/freyfaces.pkl",
        "3b69410c6a5fd6e03f09012905168be3712373a094a776f7e58fcd0670d2138a"),
}


def candidates(relpath: str) -> list[str]:
    """The pinned name first, then the same file (un)compressed: ``x.gz`` <-> ``x``."""
    other = relpath[:-3] if relpath.endswith(".gz") else relpath + ".gz"
    return [relpath, other]


def path_problem(path: Path) -> str | None:
    """Why ``path`` is not a readable file ("file not found", "is a folder, not a file", a
    symlink loop ...), or None when it is one."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return "a symlink to a missing file" if path.is_symlink() else "file not found"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symlink loop (the link points back to itself), not a file"
        return f"cannot read ({e.strerror or e})"
    if stat.S_ISDIR(st.st_mode):
        return "is a folder, not a file"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    return None


def locate(data_dir: Path, relpath: str) -> Path | None:
    for name in candidates(relpath):
        path = data_dir / name
        if path_problem(path) is None:
            return path
    return None


def require(data_dir: Path, relpath: str, dataset: str) -> Path:
    """The file's path, or a DataError saying what is wrong with it or where to put it."""
    path = locate(data_dir, relpath)
    if path is not None:
        return path
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"{data_dir}: the data folder is a file, not a folder (needed by dataset {dataset!r})")
    for name in candidates(relpath):  # a name that is there but is not a readable file says why
        problem = path_problem(data_dir / name)
        if problem != "file not found":
            raise DataError(f"{data_dir / name}: {problem} (needed by dataset {dataset!r})")
    raise DataError(
        f"{data_dir / relpath}: file not found (needed by dataset {dataset!r}); run "
        f"`elbolab data download {dataset}` or put the file there (see `elbolab data list`)"
    )


class _TooLarge(Exception):
    pass


def _gunzip(raw: bytes, limit: int | None) -> bytes:
    """gzip members of ``raw`` decompressed; more than ``limit`` bytes of output raises
    :class:`_TooLarge` before they are held in memory (a decompression bomb or a wrong file)."""
    if limit is None:
        return gzip.decompress(raw)
    out = bytearray()
    data = raw
    while data:
        d = zlib.decompressobj(wbits=31)
        out += d.decompress(data, limit + 1 - len(out))
        if len(out) > limit:
            raise _TooLarge
        if not d.eof:
            if d.unconsumed_tail:
                raise _TooLarge
            raise EOFError("compressed file ended before the end-of-stream marker was reached")
        data = d.unused_data.lstrip(b"\0")  # gzip tolerates zero padding after the last member
    return bytes(out)


def decompress(path: Path, raw: bytes, limit: int | None = None) -> bytes:
    """Content of ``raw`` (gunzipped when ``path`` ends in .gz); truncation is a DataError, and so is
    content past ``limit`` bytes (checked while decompressing, before it is held)."""
    if path.suffix != ".gz":
        return raw
    try:
        return _gunzip(raw, limit)
    except _TooLarge:
        raise DataError(f"{path}: decompresses to more than the {limit:,} bytes its format allows; "
                        "a wrong or corrupt file, fetch it again") from None
    except (EOFError, OSError, zlib.error) as e:
        raise DataError(
            f"{path}: cannot decompress ({e}); the .gz is truncated or corrupt, fetch it again"
        ) from None


def verification_enabled() -> bool:
    return os.environ.get(VERIFY_ENV_VAR, "1").strip().lower() not in ("0", "false", "no")


def _digest(spec: str, content: bytes) -> tuple[str, str]:
    algo, _, hexdigest = spec.partition(":")
    return hexdigest, hashlib.new(algo, content).hexdigest()


def check(relpath: str, path: Path, raw: bytes, content: bytes | None = None) -> str:
    """``"verified"`` or ``"not pinned"``; a mismatch is a DataError naming both digests.

    ``content`` is the uncompressed bytes when the caller already has them; it is only
    computed (by decompressing) when the file's own SHA-256 is not the pinned one.
    """
    pin = PINS.get(relpath)
    if pin is None or not (pin.sha256 or pin.content):
        return "not pinned"
    found = hashlib.sha256(raw).hexdigest()
    if found == pin.sha256:
        return "verified"
    if pin.content:
        expected, got = _digest(pin.content, decompress(path, raw) if content is None else content)
        if expected == got:
            return "verified"
        what, exp, fnd = f"{pin.content.partition(':')[0]} of the uncompressed content", expected, got
    else:
        what, exp, fnd = "SHA-256", pin.sha256, found
    message = (
        f"{path}: checksum mismatch: {what} is {fnd}, expected {exp}; the file is corrupt or a "
        f"different version: fetch it again (`elbolab data download`), or set {VERIFY_ENV_VAR}=0 to use it anyway"
    )
    if verification_enabled():
        raise DataError(message)
    return "MISMATCH (not enforced)"


@dataclass(frozen=True)
class SourceBytes:
    path: Path
    #: the file's bytes as stored
    raw: bytes
    #: the bytes after gunzip (== raw for plain files)
    content: bytes


def read_source(data_dir: Path, relpath: str, dataset: str, max_bytes: int | None = None) -> SourceBytes:
    """Locate, read and decompress one file; missing and truncated files are DataErrors.

    ``max_bytes``: the most content the format allows (an IDX file's header fixes its
    length): a larger file is refused before it is read into memory, a .gz while it is
    being decompressed. Callers decode the content before calling :func:`check`, so a
    wrong format is reported as such (e.g. a bad IDX magic), not as a bare checksum mismatch.
    """
    path = require(data_dir, relpath, dataset)
    if max_bytes is not None and path.suffix != ".gz" and path.stat().st_size > max_bytes:
        raise DataError(f"{path}: {path.stat().st_size:,} bytes, its format allows at most {max_bytes:,}; "
                        "a wrong or corrupt file, fetch it again")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    return SourceBytes(path, raw, decompress(path, raw, max_bytes))
