"""Two next-item recommenders over a user's recent steps (item + event type), and the serving wrapper.

- `GRU4Rec`: a session GRU (Hidasi et al., 2016). Padding is masked exactly: the hidden state is
  carried unchanged through padded steps, so a left-padded history gives the same state as the bare one.
- `SASRec`: causal self-attention (Kang & McAuley, 2018) with learned positions and key padding masks.

Both map the sequence to one hidden vector per position and score items by a dot product with the
(tied) item embeddings. `ServingRanker` is what is exported: history in, top-k ids and scores out,
with padding, unknown items and the caller's exclusions removed inside the graph, and for each returned
item the history step that explains it (`explain_steps`, see `explain_steps`).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from vitrine.contracts import ranker
from vitrine.contracts.events import NUM_EVENT_TYPES
from vitrine.export.data.sequences import FIRST_ITEM, PAD

Architecture = Literal["gru4rec", "sasrec"]
ARCHITECTURES: tuple[Architecture, ...] = ("gru4rec", "sasrec")
NEG = -1e9
"""Masked logits: finite, so that softmax over an all-masked row stays defined (no NaN in ONNX)."""


class _Embeddings(nn.Module):
    def __init__(self, n_items: int, dim: int, dropout: float) -> None:
        super().__init__()
        self.items = nn.Embedding(n_items, dim, padding_idx=PAD)
        self.types = nn.Embedding(NUM_EVENT_TYPES + 1, dim, padding_idx=PAD)
        self.dropout = nn.Dropout(dropout)
        # One scale for all embeddings: with torch's default N(0, 1) for types (and SASRec's positions)
        # the item signal drowns and self-attention learns no more than popularity.
        for table in (self.items, self.types):
            nn.init.normal_(table.weight, std=dim**-0.5)
            with torch.no_grad():
                table.weight[PAD].zero_()

    def forward(self, items: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.items(items) + self.types(types))


class SequenceRecommender(nn.Module):
    """Common interface: `encode` → [B, L, D]; `logits` scores every item from a hidden state.

    Items are scored by a dot product with the output table: the input item embeddings when `tied`,
    else a table of their own. Untied, "what this item is" (input) and "what comes after such a
    history" (output) need not share one vector — a transition graph is not symmetric.
    """

    def __init__(self, n_items: int, dim: int, dropout: float, tied: bool = True) -> None:
        super().__init__()
        self.n_items = n_items
        self.embed = _Embeddings(n_items, dim, dropout)
        self.output = None if tied else nn.Embedding(n_items, dim)
        if self.output is not None:
            nn.init.normal_(self.output.weight, std=dim**-0.5)

    @property
    def output_table(self) -> torch.Tensor:
        """[n_items, D] the vectors items are scored with."""
        return self.embed.items.weight if self.output is None else self.output.weight

    def encode(self, items: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        scores = hidden @ self.output_table.T
        # Padding and the unknown-item row are never recommended.
        blocked = torch.zeros(self.n_items, dtype=torch.bool, device=hidden.device)
        blocked[:FIRST_ITEM] = True
        return scores.masked_fill(blocked, NEG)


class GRU4Rec(SequenceRecommender):
    def __init__(self, n_items: int, dim: int = 64, dropout: float = 0.1, tied: bool = True) -> None:
        super().__init__(n_items, dim, dropout, tied)
        self.cell = nn.GRUCell(dim, dim)
        self.out = nn.Linear(dim, dim)

    def encode(self, items: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        x = self.embed(items, types)
        mask = (items != PAD).unsqueeze(-1).to(x.dtype)
        h = x.new_zeros(x.shape[0], x.shape[2])
        states = []
        for t in range(x.shape[1]):  # unrolled: fixed max_len, exported as straight-line ONNX
            h = mask[:, t] * self.cell(x[:, t], h) + (1 - mask[:, t]) * h
            states.append(h)
        return self.out(torch.stack(states, dim=1))


class _CausalBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, length, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        split = lambda t: t.reshape(b, length, self.heads, dim // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(dim // self.heads)
        scores = scores.masked_fill(~allowed, NEG)
        attended = (self.dropout(scores.softmax(dim=-1)) @ v).transpose(1, 2).reshape(b, length, dim)
        x = x + self.dropout(self.proj(attended))
        return x + self.dropout(self.ff(self.norm2(x)))


class SASRec(SequenceRecommender):
    def __init__(self, n_items: int, max_len: int, dim: int = 64, heads: int = 2, blocks: int = 2, dropout: float = 0.2,
                 tied: bool = True) -> None:
        super().__init__(n_items, dim, dropout, tied)
        if dim % heads:
            raise ValueError("dim must be a multiple of heads")
        self.positions = nn.Embedding(max_len, dim)
        nn.init.normal_(self.positions.weight, std=dim**-0.5)
        self.blocks = nn.ModuleList(_CausalBlock(dim, heads, dropout) for _ in range(blocks))
        self.norm = nn.LayerNorm(dim)
        self.register_buffer("causal", torch.tril(torch.ones(max_len, max_len, dtype=torch.bool)), persistent=False)
        # A constant, not torch.eye at run time: onnxruntime has no boolean EyeLike kernel.
        self.register_buffer("diagonal", torch.eye(max_len, dtype=torch.bool), persistent=False)

    def encode(self, items: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        length = items.shape[1]
        # Positions count back from the most recent step, so that left padding never shifts them:
        # the same history gives the same answer whatever max_len it is padded to.
        x = self.embed(items, types) + self.positions.weight[:length].flip(0)
        real = items != PAD
        # A query attends to earlier real steps and always to itself (keeps padded rows finite).
        allowed = self.causal[:length, :length] & real.unsqueeze(1)
        allowed = (allowed | self.diagonal[:length, :length]).unsqueeze(1)
        for block in self.blocks:
            x = block(x, allowed) * real.unsqueeze(-1)
        return self.norm(x)


def build(architecture: Architecture, n_items: int, max_len: int, dim: int, dropout: float | None = None,
          tied: bool = True) -> SequenceRecommender:
    if architecture == "gru4rec":
        return GRU4Rec(n_items, dim=dim, dropout=0.1 if dropout is None else dropout, tied=tied)
    if architecture == "sasrec":
        return SASRec(n_items, max_len=max_len, dim=dim, dropout=0.2 if dropout is None else dropout, tied=tied)
    raise ValueError(f"unknown architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}")


NO_STEP = ranker.NO_STEP
"""`explain_steps` of a recommended item when the history holds no known item (empty or all unknown)."""


def step_similarities(table: torch.Tensor, item_ids: torch.Tensor, top_ids: torch.Tensor) -> torch.Tensor:
    """[B, k, L] cosine similarity of each recommended item's vector with each history step's item vector, both
    from `table` (the output table: the space items are scored in); padding and unknown steps get NEG."""
    def unit(rows: torch.Tensor) -> torch.Tensor:  # only the gathered rows: B·(k + L) vectors, not the catalogue
        return rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    similarity = unit(table[top_ids]) @ unit(table[item_ids]).transpose(1, 2)
    known = (item_ids >= FIRST_ITEM).unsqueeze(1)
    return similarity.masked_fill(~known, NEG)


def explain_steps(table: torch.Tensor, item_ids: torch.Tensor, top_ids: torch.Tensor) -> torch.Tensor:
    """[B, k] int64: for each recommended item, the position in `item_ids` (0..L-1, left-padded history) of the
    known history item whose vector is closest (cosine) to the recommended item's; the first such position on
    a tie; NO_STEP (-1) when the history holds no known item."""
    similarity = step_similarities(table, item_ids, top_ids)
    steps = similarity.argmax(dim=2)
    has_known = (item_ids >= FIRST_ITEM).any(dim=1, keepdim=True)
    return torch.where(has_known, steps, torch.full_like(steps, NO_STEP))


class ServingRanker(nn.Module):
    """The exported graph: (item_ids [B, L], event_types [B, L], exclude_ids [B, E]) → top-k ids, scores and
    explanation steps.

    Top-k happens inside the graph so that Triton returns k ids and scores per request, not the
    catalogue's scores. Excluded ids (the caller's exclusions, padded with 0) can never be returned.
    `explain_steps` [B, k] names, per returned item, the history position that led to it (`explain_steps`).
    """

    def __init__(self, model: SequenceRecommender, k: int) -> None:
        super().__init__()
        self.model = model
        self.k = min(k, model.n_items - FIRST_ITEM)

    def forward(self, item_ids: torch.Tensor, event_types: torch.Tensor,
                exclude_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scores = self.model.logits(self.model.encode(item_ids, event_types)[:, -1])
        scores = scores.scatter(1, exclude_ids, torch.full_like(exclude_ids, NEG, dtype=scores.dtype))
        top_scores, top_ids = torch.topk(scores, self.k, dim=1)
        return top_ids, top_scores, explain_steps(self.model.output_table, item_ids, top_ids)
