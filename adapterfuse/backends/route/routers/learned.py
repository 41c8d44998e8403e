"""The learned router: a linear or one-hidden-layer classifier on frozen base features.

It is trained on the validation split's cached features (no base forward pass during training) to
predict, for each input, either the expert that scores it best (``target="best_expert"``: the one with
the highest log-likelihood of the gold label, which need not be its own task's expert) or the expert of
the task it came from (``target="task"``), or, with ``target="likelihood"``, to maximise the validation
likelihood of the routed mixture, ``sum_e p(e | x) p_e(y | x)``: a soft target that rewards every
expert in proportion to how well it answers, so the router is not fitted to which of several nearly
equal experts happened to be best on one input. ``target="task_prior"`` is that likelihood plus a
weighted cross-entropy towards the input's own task's expert: the router leaves the task's expert only
where the validation likelihood outweighs the prior (its weight is chosen by cross-validation in
:mod:`adapterfuse.backends.route.crossval` unless given). Training is full-batch Adam on standardised features with
a seeded initialisation, so a fit is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, get_args

import torch
from torch import nn

from adapterfuse.backends.route.config import Target
from adapterfuse.backends.route.routers.base import Projection, Router, Standardizer, register
from adapterfuse.errors import ConfigError

TARGETS: tuple[str, ...] = get_args(Target)  # declared once, with the option (RouteConfig.target)


def make_net(dim: int, n_experts: int, hidden: int) -> nn.Sequential:
    """``Linear(d, E)``, or ``Linear(d, h) -> GELU -> Linear(h, E)`` when ``hidden > 0``."""
    if hidden > 0:
        return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, n_experts))
    return nn.Sequential(nn.Linear(dim, n_experts))


@dataclass(frozen=True)
class FitOptions:
    """How a learned router is trained (full batch, AdamW, seeded, so a fit is deterministic).

    Attributes:
        hidden: hidden size; 0 for a linear router.
        target: recorded with the router (see :data:`TARGETS`).
        epochs: full-batch steps.
        lr: Adam's learning rate.
        weight_decay: L2 penalty (AdamW), against over-fitting a few hundred inputs.
        seed: seed of the initialisation.
        prior_weight: weight of the cross-entropy towards each row's own task's expert (see :func:`routing_loss`).
        pca: project the features onto this many principal components first (0: no projection;
            see :class:`~adapterfuse.backends.route.routers.base.Projection`).
        pca_keep: trailing features passed through the projection (the text's shape).
    """

    hidden: int = 0
    target: str = "best_expert"
    epochs: int = 300
    lr: float = 1e-2
    weight_decay: float = 1e-3
    seed: int = 0
    prior_weight: float = 0.0
    pca: int = 0
    pca_keep: int = 0


@register
class LearnedRouter(Router):
    """A small classifier from features to experts.

    Args:
        scaler: the feature standardiser fitted on the validation features.
        net: the classifier (see :func:`make_net`).
        hidden: its hidden size (0: linear).
        target: what it was trained to predict.
        projection: applied to the features first (``pca``), or ``None``.
    """

    kind = "learned"

    def __init__(
        self, scaler: Standardizer, net: nn.Sequential, hidden: int, target: str, projection: Projection | None = None
    ) -> None:
        self.scaler, self.net, self.hidden, self.target = scaler, net.eval(), hidden, target
        self.projection = projection
        self.net.requires_grad_(False)
        self.n_experts = int(net[-1].out_features)

    @torch.no_grad()
    def probs(self, features: torch.Tensor) -> torch.Tensor:
        x = features if self.projection is None else self.projection(features)
        return torch.softmax(self.net(self.scaler(x)), dim=-1)

    def config(self) -> dict[str, Any]:
        out = {
            "hidden": self.hidden,
            "target": self.target,
            "n_experts": self.n_experts,
            "dim": int(self.scaler.mean.shape[0]),
        }
        if self.projection is not None:
            out.update(pca=int(self.projection.components.shape[1]), pca_keep=self.projection.keep)
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        state = {f"net.{k}": v.detach().clone() for k, v in self.net.state_dict().items()}
        projected = {} if self.projection is None else self.projection.tensors("proj.")
        return {"mean": self.scaler.mean, "std": self.scaler.std, **state, **projected}

    @classmethod
    def from_saved(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> LearnedRouter:
        net = make_net(int(config["dim"]), int(config["n_experts"]), int(config["hidden"]))
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        projection = Projection.from_tensors(tensors, "proj.", int(config["pca_keep"])) if config.get("pca") else None
        return cls(
            Standardizer(tensors["mean"], tensors["std"]), net, int(config["hidden"]), str(config["target"]), projection
        )

    @classmethod
    def fit(
        cls,
        features: torch.Tensor,
        labels: torch.Tensor,
        n_experts: int,
        options: FitOptions = FitOptions(),
        own: torch.Tensor | None = None,
    ) -> LearnedRouter:
        """Train on labelled features (full batch, Adam, cross-entropy).

        Args:
            features: ``[N, d]`` validation features.
            labels: ``[N]`` expert index per row (rows labelled ``-1`` are ignored), or ``[N, E]`` per-expert
                log-likelihoods of the gold label (target ``"likelihood"``; rows with a non-finite
                entry are ignored).
            n_experts: the number of classes ``E``.
            options: the training settings (hidden size, target, epochs, lr, weight decay, seed, prior
                weight, PCA; see :class:`FitOptions`).
            own: ``[N]`` each row's own task's expert (``-1``: none), for the prior of ``[N, E]`` labels.

        Returns:
            The trained router.

        Raises:
            ConfigError: no labelled row, bad sizes.
        """
        hidden, epochs, lr, prior_weight = options.hidden, options.epochs, options.lr, options.prior_weight
        if hidden < 0 or epochs < 1 or lr <= 0 or not prior_weight >= 0:
            raise ConfigError(
                f"learned router: expected hidden >= 0, epochs >= 1, lr > 0, prior_weight >= 0; got "
                f"hidden={hidden}, epochs={epochs}, lr={lr}, prior_weight={prior_weight}"
            )
        keep = labels.isfinite().all(dim=1) if labels.dim() == 2 else labels >= 0
        if not bool(keep.any()):
            raise ConfigError(
                "learned router: no validation input has a target expert; with target='task' every "
                "task needs an expert of its own (check the experts' recorded tasks)"
            )
        x, y = features[keep].float(), labels[keep]
        prior = own[keep] if own is not None and prior_weight > 0 else None
        projection = Projection.fit(x, options.pca, options.pca_keep) if options.pca else None
        if projection is not None:
            x = projection(x)
        scaler = Standardizer.fit(x)
        torch.manual_seed(options.seed)  # the classifier's initialisation is the only random step
        net = make_net(x.shape[1], n_experts, hidden)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=options.weight_decay)
        z = scaler(x)
        for _ in range(epochs):
            opt.zero_grad(set_to_none=True)
            routing_loss(net(z), y, prior, prior_weight).backward()
            opt.step()
        return cls(scaler, net, hidden, options.target, projection)


def routing_loss(
    logits: torch.Tensor, targets: torch.Tensor, own: torch.Tensor | None = None, prior_weight: float = 0.0
) -> torch.Tensor:
    """The router's training loss.

    Args:
        logits: ``[N, E]`` router logits.
        targets: ``[N]`` expert indices (cross-entropy), or ``[N, E]`` per-expert log-likelihoods of the
            gold label: then the negative log-likelihood of the routed mixture,
            ``-log sum_e softmax(logits)_e exp(targets_e)``, averaged over rows.
        own: ``[N]`` each row's own task's expert (``-1``: none); with ``[N, E]`` targets and
            ``prior_weight > 0``, ``prior_weight`` times the cross-entropy towards it (rows with an own
            expert) is added.
        prior_weight: that weight.

    Returns:
        The scalar loss.
    """
    if targets.dim() != 2:
        return nn.functional.cross_entropy(logits, targets.long())
    loss = -(torch.log_softmax(logits, dim=-1) + targets.to(logits)).logsumexp(dim=-1).mean()
    if own is not None and prior_weight > 0 and bool((own >= 0).any()):
        loss = loss + prior_weight * nn.functional.cross_entropy(logits, own.long(), ignore_index=-1)
    return loss


def target_labels(target: str, quality: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """The training labels of a target: the best expert per row, the row's own task's expert, or the
    whole quality matrix (``"likelihood"`` and ``"task_prior"``, whose prior takes ``own`` separately).

    Args:
        target: one of :data:`TARGETS`.
        quality: ``[N, E]`` per-row expert quality (log-likelihood of the gold label).
        own: ``[N]`` oracle expert per row (``-1``: none).

    Returns:
        ``[N]`` expert indices (``-1`` rows are ignored in training), or ``[N, E]`` for the likelihood targets.
    """
    if target not in TARGETS:
        raise ConfigError(f"target {target!r}: unknown; expected one of {', '.join(TARGETS)}")
    if target in ("likelihood", "task_prior"):
        return quality.clone()
    return quality.argmax(dim=1) if target == "best_expert" else own.clone()
