"""RAM's image-tag recognition decoder (``tagging_head``): a Query2Label-style BERT without self-attention.

Reference: RAM (Zhang et al., 2023) ``ram/configs/q2l_config.json`` (2-layer BERT, hidden 768, 4 heads,
encoder width 512) and ``ram/models/ram.py`` (self-attention deleted, "following Query2Label": Liu et al.,
2021). The official head is a BLIP ``BertModel`` whose ``embeddings`` and every layer's self-``attention`` are
deleted after construction; in ``mode='tagging'`` each layer runs cross-attention from the label queries to
the image tokens, then the feed-forward block, both post-norm with residuals (BERT). What is left of the
official module tree is rebuilt here with the same names, so the keys are the official ones::

    encoder.layer.{i}.crossattention.self.{query,key,value}.{weight,bias}
    encoder.layer.{i}.crossattention.output.{dense,LayerNorm}.{weight,bias}
    encoder.layer.{i}.intermediate.dense.{weight,bias}
    encoder.layer.{i}.output.{dense,LayerNorm}.{weight,bias}

The image attention mask of the official call is all ones (it adds 0), so none is taken. No tokenizer is
needed: the label queries are learned embeddings, not text.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TaggingHead"]


class CrossAttentionCore(nn.Module):
    """Multi-head attention, queries from the labels, keys/values from the image tokens (BERT ``self``)."""

    def __init__(self, hidden: int, encoder_width: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        if hidden % num_heads:
            raise ValueError(f"hidden size {hidden} is not a multiple of {num_heads} heads")
        self.num_heads = num_heads
        self.dropout = dropout
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(encoder_width, hidden)
        self.value = nn.Linear(encoder_width, hidden)

    def _split(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, hidden: Tensor, context: Tensor) -> Tensor:
        q, k, v = (
            self._split(self.query(hidden)),
            self._split(self.key(context)),
            self._split(self.value(context)),
        )
        p = self.dropout if self.training else 0.0  # BERT drops attention probabilities
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        b, h, n, d = out.shape
        return out.transpose(1, 2).reshape(b, n, h * d)


class AddNorm(nn.Module):
    """``LayerNorm(dropout(dense(x)) + residual)`` (BERT ``BertSelfOutput`` / ``BertOutput``)."""

    def __init__(self, in_features: int, hidden: int, dropout: float, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)  # noqa: N815 (official name)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class CrossAttention(nn.Module):
    """BERT ``crossattention``: ``self`` (the attention) then ``output`` (projection + add & norm)."""

    def __init__(self, hidden: int, encoder_width: int, num_heads: int, dropout: float, eps: float) -> None:
        super().__init__()
        self.self = CrossAttentionCore(hidden, encoder_width, num_heads, dropout)
        self.output = AddNorm(hidden, hidden, dropout, eps)

    def forward(self, hidden: Tensor, context: Tensor) -> Tensor:
        return self.output(self.self(hidden, context), hidden)


class Intermediate(nn.Module):
    """BERT ``intermediate``: Linear to the FFN width + GELU (exact, erf form: BERT's ``"gelu"``)."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, intermediate)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))


class TaggingLayer(nn.Module):
    """One layer: cross-attention to the image tokens, then the feed-forward block (no self-attention)."""

    def __init__(
        self, hidden: int, encoder_width: int, num_heads: int, intermediate: int, dropout: float, eps: float
    ) -> None:
        super().__init__()
        self.crossattention = CrossAttention(hidden, encoder_width, num_heads, dropout, eps)
        self.intermediate = Intermediate(hidden, intermediate)
        self.output = AddNorm(intermediate, hidden, dropout, eps)

    def forward(self, hidden: Tensor, context: Tensor) -> Tensor:
        attended = self.crossattention(hidden, context)
        return self.output(self.intermediate(attended), attended)


class TaggingEncoder(nn.Module):
    """Holds ``layer`` (so keys read ``encoder.layer.{i}``, as in BERT)."""

    def __init__(self, layers: list[TaggingLayer]) -> None:
        super().__init__()
        self.layer = nn.ModuleList(layers)


class TaggingHead(nn.Module):
    """Label queries ``[B, K, hidden]`` attend to image tokens ``[B, N, encoder_width]`` -> ``[B, K, hidden]``.

    Official numbers (RAM ``q2l_config.json`` with ``encoder_width=512``): hidden 768, 4 heads, 2 layers,
    FFN 3072, LayerNorm eps 1e-12, dropout 0.1 on attention probabilities and on both residual branches
    (active only in training mode, as in the official DAPE training where the student is in train mode).
    """

    def __init__(
        self,
        hidden_size: int = 768,
        encoder_width: int = 512,
        num_heads: int = 4,
        num_layers: int = 2,
        intermediate_size: int = 3072,
        dropout: float = 0.1,
        layer_norm_eps: float = 1e-12,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.encoder = TaggingEncoder(
            [
                TaggingLayer(
                    hidden_size, encoder_width, num_heads, intermediate_size, dropout, layer_norm_eps
                )
                for _ in range(num_layers)
            ]
        )
        self.apply(_init_bert)

    def forward(self, queries: Tensor, image_embeds: Tensor) -> Tensor:
        hidden = queries
        for layer in self.encoder.layer:
            hidden = layer(hidden, image_embeds)
        return hidden


def _init_bert(module: nn.Module) -> None:
    # BERT's init (initializer_range 0.02): normal Linear weights, zero bias, LayerNorm 1 / 0.
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
