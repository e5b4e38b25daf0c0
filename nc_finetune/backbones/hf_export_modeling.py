"""Hugging Face task classes that pool like nc-finetune: the code shipped inside an exported model directory.

``transformers``' own task classes feed their head something else than nc-finetune's pooling for many models
(``BertForSequenceClassification`` adds the tanh ``pooler``; no ViT class averages the patch tokens), so an export
of such a model ships this file and loads with
``AutoModelForSequenceClassification.from_pretrained(dir, trust_remote_code=True)`` (or
``AutoModelForImageClassification``). The file is copied into the export as is: it imports only torch and
transformers.

Structure: ``backbone`` is the library's ``AutoModel`` built from ``config.backbone_config`` (its pooler removed),
``classifier`` the trained linear head on the pooled ``last_hidden_state``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput, SequenceClassifierOutput


class NCPooledConfig(PretrainedConfig):
    """Configuration of :class:`NCPooledForSequenceClassification` / :class:`NCPooledForImageClassification`.

    Args:
        backbone_config: The ``AutoModel``'s config as a dict (``config.to_dict()``).
        pooling: ``"cls"`` (token 0) or ``"mean"`` (over non-pad tokens for text, over the tokens after
            ``num_prefix_tokens`` for images).
        num_prefix_tokens: CLS/distillation/register tokens in front of the patch tokens (images).
        interpolate_pos_encoding: Pass ``interpolate_pos_encoding=True`` to the vision model.
    """

    model_type = "nc_pooled"

    def __init__(self, backbone_config: dict | None = None, pooling: str = "cls", num_prefix_tokens: int = 0,
                 interpolate_pos_encoding: bool = False, **kwargs) -> None:
        self.backbone_config = dict(backbone_config or {})
        self.pooling = pooling
        self.num_prefix_tokens = num_prefix_tokens
        self.interpolate_pos_encoding = interpolate_pos_encoding
        super().__init__(**kwargs)


class _NCPooledModel(PreTrainedModel):
    config_class = NCPooledConfig
    base_model_prefix = "backbone"
    main_input_name = "input_ids"

    def __init__(self, config: NCPooledConfig) -> None:
        super().__init__(config)
        inner = AutoConfig.for_model(**config.backbone_config)
        self.backbone = AutoModel.from_config(inner)
        if getattr(self.backbone, "pooler", None) is not None:
            self.backbone.pooler = None  # the trained head reads the pooled last_hidden_state, not the tanh pooler
        self.classifier = nn.Linear(inner.hidden_size, config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if module is self.classifier:  # the backbone's modules are initialised by its own class
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    def _pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """``(B, N, D)`` -> ``(B, D)`` float32, as nc-finetune's ``pool_tokens``."""
        hidden = hidden.float()
        if self.config.pooling == "cls":
            return hidden[:, 0]
        if attention_mask is not None:
            mask = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, N, 1)
            return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return hidden[:, self.config.num_prefix_tokens:].mean(1)


class NCPooledForSequenceClassification(_NCPooledModel):
    """Text encoder + nc-finetune pooling + linear head."""

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs) -> SequenceClassifierOutput:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        logits = self.classifier(self._pool(hidden, attention_mask))  # (B, K)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


class NCPooledForImageClassification(_NCPooledModel):
    """Vision encoder + nc-finetune pooling + linear head."""

    main_input_name = "pixel_values"

    def forward(self, pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                **kwargs) -> ImageClassifierOutput:
        if self.config.interpolate_pos_encoding:
            kwargs.setdefault("interpolate_pos_encoding", True)
        hidden = self.backbone(pixel_values=pixel_values, **kwargs).last_hidden_state
        logits = self.classifier(self._pool(hidden, None))  # (B, K)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)
