"""GRU caption encoder: Embedding(V, word_dim) -> GRU(hidden d) -> state at the last real token."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence


class TextEncoder(nn.Module):
    def __init__(self, vocab_size: int, word_dim: int, embed_dim: int, num_layers: int = 1):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        self.gru = nn.GRU(word_dim, embed_dim, num_layers=num_layers, batch_first=True)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``tokens`` (B, L) padded with 0, ``lengths`` (B,) -> (B, embed_dim) unnormalised."""
        packed = pack_padded_sequence(self.embed(tokens), lengths.cpu(), batch_first=True,
                                      enforce_sorted=False)
        _, hidden = self.gru(packed)  # (layers, B, d): last real step of each sequence
        return hidden[-1]
