"""A small text encoder over the toy world's vocabulary: token embeddings plus a pooled vector, like Flux's T5 + CLIP pair."""

from __future__ import annotations

import torch
from torch import nn

from difflens.errors import DifflensError
from difflens.world.prompts import prompt_vocabulary, tokenize

PAD, BOS = "<pad>", "<bos>"


class ToyTokenizer:
    """Word-level tokenizer with a fixed length: padding must not depend on the batch (Flux attends to pads)."""

    def __init__(self, max_length: int = 32):
        self.vocab = [PAD, BOS] + prompt_vocabulary()
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.max_length = max_length

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        for b, p in enumerate(prompts):
            words = [BOS] + (tokenize(p) if p else [])
            if len(words) > self.max_length:
                raise DifflensError(
                    f"prompt too long for the toy model ({len(words) - 1} words, at most {self.max_length - 1}): {p!r}"
                )
            for j, w in enumerate(words):
                if w not in self.index:
                    raise DifflensError(
                        f"unknown word {w!r} in prompt {p!r}; the toy model knows: {', '.join(self.vocab[2:])}"
                    )
                ids[b, j] = self.index[w]
        return ids, ids != 0

    def words(self, ids_T: torch.Tensor) -> list[str]:
        return [self.vocab[i] for i in ids_T.tolist()]


class ToyTextEncoder(nn.Module):
    """Embedding + positions + a small pre-norm transformer; pooled = projected masked mean."""

    def __init__(self, vocab_size: int, max_length: int = 32, dim: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(max_length, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, dim * 2, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.pool = nn.Linear(dim, dim)

    def forward(self, ids_BT: torch.Tensor, mask_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(ids_BT.shape[1], device=ids_BT.device)
        h = self.tok(ids_BT) + self.pos(pos)[None]
        h = self.norm(self.encoder(h, src_key_padding_mask=~mask_BT))
        m = mask_BT.unsqueeze(-1).to(h.dtype)
        pooled = self.pool((h * m).sum(1) / m.sum(1).clamp_min(1.0))
        return h, pooled
