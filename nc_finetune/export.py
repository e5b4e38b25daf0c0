"""Results that leave the toolkit: a selection as a plain peft ``LoraConfig`` (``select --emit-peft``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from nc_finetune.utils.io import write_text_atomic


def write_peft_config(recipe, selection, path: str | Path) -> Path:
    """Write ``selection`` as a peft ``adapter_config.json`` for the recipe's plain model (no nc-finetune wrapper).

    The backbone is built without weights (only its module names matter). ``LoraConfig.from_pretrained`` reads the
    file's directory when it is named ``adapter_config.json``; ``LoraConfig.from_json_file`` reads any name.

    Args:
        recipe: The validated recipe (``backbone`` names the model, ``adapt.lora_*`` the LoRA settings).
        selection: The :class:`~nc_finetune.select.Selection` to express.
        path: Destination JSON file.

    Returns:
        ``path``.
    """
    from nc_finetune.backbones import load_backbone

    b, a = recipe.backbone, recipe.adapt
    backbone = load_backbone(b.name, pooling=b.pooling, image_size=b.image_size, max_length=b.max_length,
                             pretrained=False)
    config = selection.peft_config(backbone.plain_model(), r=a.lora_r, alpha=a.lora_alpha, dropout=a.lora_dropout)
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)  # peft's own serialisation (sets as lists, enums as strings)
        text = (Path(tmp) / "adapter_config.json").read_text(encoding="utf-8")
    return write_text_atomic(path, text)
