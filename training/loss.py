"""The training loss, one function for every trainer: stage 0 (training/pretrain_llm.py), stages 1 and 2
(training/modeling.py's LossModule, which DDP / FSDP wrap).

`lm_loss`: the summed next-token cross-entropy of a decoder's last hidden states over the labelled positions
(docs/spec.md 1.6: position t predicts token t+1, IGNORE_INDEX is not trained), and the number of those positions;
a trainer divides the one by the other (a token-level mean, over the micro-batch or over the global batch). The
vocabulary projection runs only at the labelled positions, and with a `RestrictedHead` only through the head's
non-zero rows (exact).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sqllava_edge.config import IGNORE_INDEX


def lm_loss(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module | torch.Tensor,
            restricted: "RestrictedHead | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (summed cross-entropy, number of trained tokens).

    hidden (B, T, H): the decoder's last hidden states; labels (B, T): the target ids, IGNORE_INDEX where nothing
    is trained (image rows, padding, masked text). head: the LM head (a bias-free nn.Linear) or its weight; with
    `restricted`, the weight may also be just its rows `restricted.vocab`, in order (stage 0's compact head)."""
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    keep = targets != IGNORE_INDEX
    weight = head.weight if isinstance(head, nn.Module) else head
    if restricted is not None:
        loss_sum = restricted.loss_sum(hidden[:, :-1][keep], weight, targets[keep])
    else:
        logits = head(hidden[:, :-1][keep]) if isinstance(head, nn.Module) else F.linear(hidden[:, :-1][keep], weight)
        loss_sum = F.cross_entropy(logits.float(), targets[keep], reduction="sum")  # logits (N, V)
    return loss_sum, keep.sum()


class RestrictedHead:
    """Summed next-token cross-entropy through the rows `vocab` of a head whose other rows are exactly zero.

    Such a row's logit is exactly 0, so the rows outside `vocab` enter every softmax as one extra logit
    log(n_unseen): the exact full-vocabulary cross-entropy at the cost of the rows in `vocab` (a tiny model's
    32000-way head is most of its FLOPs). A target outside `vocab` has logit 0. Used by stage 0 (whose trained head
    keeps its unseen rows at zero) and by stages 1 and 2 when their frozen head has zero rows (`RestrictedHead.of`)."""

    def __init__(self, vocab: list[int], vocab_size: int, device):
        self.vocab = torch.tensor(sorted(set(vocab)), dtype=torch.long, device=device)
        self.index = torch.full((vocab_size,), -1, dtype=torch.long, device=device)
        self.index[self.vocab] = torch.arange(len(self.vocab), device=device)
        unseen = vocab_size - len(self.vocab)
        self.bucket = math.log(unseen) if unseen else None

    @classmethod
    def of(cls, head: nn.Module, min_share: float = 0.5) -> "RestrictedHead | None":
        """For a frozen bias-free head whose all-zero rows are at least `min_share` of the vocabulary, else None."""
        weight = head.weight
        if weight.requires_grad or getattr(head, "bias", None) is not None or weight.device.type == "meta":
            return None
        nonzero = torch.nonzero(weight.detach().ne(0).any(dim=1)).flatten()
        if len(weight) - len(nonzero) < min_share * len(weight):
            return None
        return cls(nonzero.tolist(), len(weight), weight.device)

    def to(self, device) -> "RestrictedHead":
        """Move the index tensors (in place) to where the head now lives (under FSDP, after the wrap moved it)."""
        self.vocab, self.index = self.vocab.to(device), self.index.to(device)
        return self

    def loss_sum(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """hidden (N, H), targets (N,); weight: the full head (vocab_size, H), or its rows `vocab` (V', H) in order."""
        rows = weight if len(weight) == len(self.vocab) else weight[self.vocab]
        logits = (hidden @ rows.T).float()  # (N, V')
        index = self.index[targets]
        if self.bucket is not None:
            logits = torch.cat([logits, logits.new_full((len(logits), 1), self.bucket)], dim=1)
        if bool((index >= 0).all()):
            return F.cross_entropy(logits, index, reduction="sum")
        picked = logits.gather(1, index.clamp(min=0)[:, None])[:, 0]
        return (torch.logsumexp(logits, dim=1) - torch.where(index >= 0, picked, torch.zeros_like(picked))).sum()
