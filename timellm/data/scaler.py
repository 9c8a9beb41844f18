"""A numpy StandardScaler with scikit-learn's semantics, so the data path needs no sklearn."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class StandardScaler:
    """Per-column ``(x - mean) / scale`` fitted on the training split only.

    Like ``sklearn.preprocessing.StandardScaler``: population std (ddof=0), and a column with
    zero variance gets scale 1 so constant columns pass through centred instead of as NaN.
    """

    mean: np.ndarray | None = field(default=None)
    scale: np.ndarray | None = field(default=None)

    def fit(self, data: np.ndarray) -> StandardScaler:
        data = np.asarray(data, dtype=np.float64)
        self.mean = data.mean(axis=0)
        std = data.std(axis=0)
        self.scale = np.where(std == 0.0, 1.0, std)
        return self

    def _fitted(self) -> tuple[np.ndarray, np.ndarray]:
        if self.mean is None or self.scale is None:
            raise RuntimeError("StandardScaler used before fit()")
        return self.mean, self.scale

    def transform(self, data: np.ndarray) -> np.ndarray:
        mean, scale = self._fitted()
        return (np.asarray(data, dtype=np.float64) - mean) / scale

    def inverse_transform(self, data: np.ndarray, columns: np.ndarray | None = None) -> np.ndarray:
        """Undo :meth:`transform`. ``data[..., c]`` belongs to column ``columns[c]`` when given
        (for channel-independent predictions, pass each sample's feature id with shape
        broadcastable to ``data``)."""
        mean, scale = self._fitted()
        if columns is not None:
            mean, scale = mean[columns], scale[columns]
        return np.asarray(data, dtype=np.float64) * scale + mean

    def state_dict(self) -> dict[str, list[float]]:
        mean, scale = self._fitted()
        return {"mean": mean.tolist(), "scale": scale.tolist()}
