"""The training loss of a run: the weighted sum of the configured terms (``loss:`` in the config).

``margin_softmax`` is the sharded head (PartialFC); ``center`` the sharded centre loss, joint with it;
``contrastive`` / ``triplet`` the global-batch pair losses (no head, no head optimizer when alone). Each
term returns the mean over the GLOBAL batch, identical on every rank, so the sum keeps the trainer's
gradient-scale contract (largefr.train.step).
"""
from __future__ import annotations

import torch
from torch import nn

from largefr.config import Config, ConfigError, LossTermConfig
from largefr.distributed import DistContext
from largefr.heads import PartialFC
from largefr.heads.center import ShardedCenterLoss
from largefr.heads.metric import ContrastiveLoss, TripletLoss


class Objective(nn.Module):
    """``loss = objective(embeddings, labels)``: sum of weight x term. ``stats()``: per-term losses and the
    terms' own statistics (e.g. the triplet miner's active fraction) of the last forward, as device tensors."""

    def __init__(self, terms: list[tuple[str, float, nn.Module]]) -> None:
        super().__init__()
        if not terms:
            raise ValueError("an objective needs at least one loss term")
        self.weights = {name: float(weight) for name, weight, _ in terms}
        self.terms = nn.ModuleDict({name: module for name, _, module in terms})
        self._last: dict[str, torch.Tensor] = {}

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        total: torch.Tensor | None = None
        self._last = {}
        for name, term in self.terms.items():
            value = term(embeddings, labels)
            self._last[name] = value.detach()
            weighted = value * self.weights[name] if self.weights[name] != 1.0 else value
            total = weighted if total is None else total + weighted
        assert total is not None
        return total

    def prefetch(self, labels: torch.Tensor) -> None:
        """Before the backbone's forward: the head chooses (and starts gathering) its rows from the labels
        alone, so a host-resident W's rows travel while the backbone runs (PartialFC.prefetch)."""
        for term in self.terms.values():
            if isinstance(term, PartialFC):
                term.prefetch(labels)

    def stats(self) -> dict[str, torch.Tensor]:
        out = {f"loss/{name}": value for name, value in self._last.items()} if len(self._last) > 1 else {}
        for name, term in self.terms.items():
            for key, value in getattr(term, "last_stats", {}).items():
                out[f"{name}/{key}"] = value
        return out


def _term(term: LossTermConfig, cfg: Config, ctx: DistContext, head: PartialFC | None) -> nn.Module:
    if term.type == "margin_softmax":
        assert head is not None
        return head
    if term.type == "center":
        assert cfg.head.num_classes is not None and term.alpha is not None
        return ShardedCenterLoss(cfg.head.num_classes, cfg.head.embedding_size, term.alpha,
                                 normalize=bool(term.normalize), process_group=ctx.group).to(ctx.device)
    assert term.margin is not None
    if term.type == "contrastive":
        assert term.negatives is not None and term.hardest_k is not None
        return ContrastiveLoss(term.margin, negatives=term.negatives, hardest_k=term.hardest_k,
                               normalize=bool(term.normalize), process_group=ctx.group)
    assert term.mining is not None
    return TripletLoss(term.margin, mining=term.mining, process_group=ctx.group)


def build_objective(cfg: Config, ctx: DistContext, head: PartialFC | None) -> Objective:
    """The configured terms; ``head`` must be given exactly when there is a margin_softmax term."""
    if (head is None) == (cfg.loss_term("margin_softmax") is not None):
        raise ConfigError("loss", "a margin_softmax term and the head come together")
    terms: list[tuple[str, float, nn.Module]] = []
    for i, term in enumerate(cfg.loss):
        try:
            terms.append((term.type, term.weight, _term(term, cfg, ctx, head)))
        except ValueError as exc:
            raise ConfigError(f"loss[{i}]", str(exc)) from None
    return Objective(terms)


def center_of(objective: Objective) -> ShardedCenterLoss | None:
    """The sharded centre loss of the objective (its centres go into checkpoints), or None."""
    module = objective.terms["center"] if "center" in objective.terms else None
    return module if isinstance(module, ShardedCenterLoss) else None
