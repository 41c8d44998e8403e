"""Clustered routing: k-means on the input features; each cluster served by what does best on it.

The validation features are standardised and clustered with scikit-learn's ``KMeans`` (fixed
``random_state`` and ``n_init``, so a seed gives one clustering). Each cluster gets a distribution over
the experts: the softmax, at a temperature, of each expert's mean quality (log-likelihood of the gold
label) over the cluster's validation inputs; with ``top_k=1`` that is the single best expert, with
``top_k > 1`` and ``then="merge"`` a merge of the best experts weighted by how well they did there. A
new input goes to its nearest centroid (ties: the lower cluster index). Storing and loading a routing
costs ``C`` centroids and a ``C x E`` table.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from adapterfuse.backends.route.routers.base import Router, Standardizer, register
from adapterfuse.errors import ConfigError


def kmeans_labels(
    features: torch.Tensor, clusters: int, seed: int = 0, n_init: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded k-means.

    Args:
        features: ``[N, d]`` (already standardised).
        clusters: ``C``, at most ``N``.
        seed: ``random_state``.
        n_init: restarts (the best inertia wins).

    Returns:
        ``(labels [N], centroids [C, d])`` as numpy arrays.

    Raises:
        ConfigError: ``C < 1`` or more clusters than inputs.
    """
    from sklearn.cluster import KMeans

    n = int(features.shape[0])
    if isinstance(clusters, bool) or not isinstance(clusters, int) or not 1 <= clusters <= n:
        raise ConfigError(
            f"clusters: expected an integer in 1 .. {n} (the number of validation inputs), got {clusters!r}"
        )
    km = KMeans(n_clusters=clusters, random_state=seed, n_init=n_init)
    labels = km.fit_predict(features.double().numpy())
    return labels, km.cluster_centers_


def cluster_table(labels: np.ndarray, quality: torch.Tensor, clusters: int, temperature: float) -> torch.Tensor:
    """Each cluster's distribution over experts: ``softmax(mean quality over its inputs / T)``.

    Args:
        labels: ``[N]`` cluster of each validation row.
        quality: ``[N, E]``.
        clusters: ``C``.
        temperature: ``T > 0``.

    Returns:
        ``[C, E]`` (a cluster without inputs, which k-means does not produce, would be uniform).
    """
    if not temperature > 0:
        raise ConfigError(f"temperature: expected > 0, got {temperature}")
    lab = torch.as_tensor(labels, dtype=torch.long)
    table = torch.zeros((clusters, quality.shape[1]))
    for c in range(clusters):
        rows = quality[lab == c]
        if len(rows):
            table[c] = torch.softmax(rows.float().mean(dim=0) / temperature, dim=0)
        else:
            table[c] = 1.0 / quality.shape[1]
    return table


@register
class ClusterRouter(Router):
    """Nearest centroid in standardised feature space -> that cluster's expert distribution.

    Args:
        scaler: the feature standardiser.
        centroids: ``[C, d]`` in standardised space.
        table: ``[C, E]`` each cluster's distribution over experts.
        seed: the k-means seed (recorded).
    """

    kind = "clustered"

    def __init__(self, scaler: Standardizer, centroids: torch.Tensor, table: torch.Tensor, seed: int = 0) -> None:
        self.scaler, self.centroids, self.table, self.seed = scaler, centroids.float(), table.float(), seed
        self.n_experts = int(table.shape[1])

    @property
    def clusters(self) -> int:
        """The number of clusters."""
        return int(self.centroids.shape[0])

    def assign(self, features: torch.Tensor) -> torch.Tensor:
        """``[n]`` the nearest centroid of each row."""
        return torch.cdist(self.scaler(features), self.centroids).argmin(dim=1)

    def probs(self, features: torch.Tensor) -> torch.Tensor:
        return self.table[self.assign(features)]

    def config(self) -> dict[str, Any]:
        return {"clusters": self.clusters, "n_experts": self.n_experts, "seed": self.seed}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"mean": self.scaler.mean, "std": self.scaler.std, "centroids": self.centroids, "table": self.table}

    @classmethod
    def from_saved(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> ClusterRouter:
        return cls(
            Standardizer(tensors["mean"], tensors["std"]),
            tensors["centroids"],
            tensors["table"],
            int(config.get("seed", 0)),
        )

    @classmethod
    def fit(
        cls,
        features: torch.Tensor,
        quality: torch.Tensor,
        clusters: int,
        seed: int = 0,
        temperature: float = 1.0,
        n_init: int = 10,
    ) -> ClusterRouter:
        """Cluster the validation features and give each cluster its experts' distribution.

        Args:
            features: ``[N, d]`` validation features.
            quality: ``[N, E]`` expert quality per row (see :mod:`adapterfuse.backends.route.data`).
            clusters: ``C``.
            seed: k-means ``random_state``.
            temperature: of the per-cluster softmax.
            n_init: k-means restarts.

        Returns:
            The router.

        Raises:
            ConfigError: see :func:`kmeans_labels` and :func:`cluster_table`.
        """
        scaler = Standardizer.fit(features)
        labels, centroids = kmeans_labels(scaler(features), clusters, seed, n_init)
        table = cluster_table(labels, quality, clusters, temperature)
        return cls(scaler, torch.as_tensor(centroids, dtype=torch.float32), table, seed)
