"""scikit-learn estimators around `LocalExperts`, so the 1991 mixture sits in cross-validation,
pipelines and stacking beside sklearn's own ensembles. Needs scikit-learn (the `dev` extra).

Inputs are standardised inside `fit` (and regression targets too, then mapped back), and the
model is trained full-batch with Adam: tabular sets here have hundreds of rows.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin

from moekit.models.mole.model import LocalExperts, LocalExpertsConfig


class _LocalExpertsBase(BaseEstimator):
    def __init__(self, num_experts=4, expert_hidden=8, activation="tanh", loss="mixture", epochs=300, lr=0.01,
                 weight_decay=0.03, gate_aux_loss_coef=0.0, random_state=0):
        self.num_experts = num_experts
        self.expert_hidden = expert_hidden
        self.activation = activation
        self.loss = loss
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.gate_aux_loss_coef = gate_aux_loss_coef
        self.random_state = random_state

    def _fit(self, X, target, task, out_features):
        X = np.asarray(X, dtype=np.float64)
        self.x_mean_, self.x_std_ = X.mean(0), X.std(0) + 1e-8
        x = torch.tensor((X - self.x_mean_) / self.x_std_, dtype=torch.float32)
        cfg = LocalExpertsConfig(in_features=X.shape[1], out_features=out_features, task=task,
                                 num_experts=self.num_experts, expert_hidden=self.expert_hidden,
                                 activation=self.activation, loss=self.loss,
                                 gate_aux_loss_coef=self.gate_aux_loss_coef)
        with torch.random.fork_rng():
            torch.manual_seed(self.random_state)
            self.model_ = LocalExperts(cfg)
        opt = torch.optim.Adam(self.model_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        self.model_.train()
        for _ in range(self.epochs):
            out = self.model_(x, labels=target)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        self.model_.eval()
        return self

    def _predict_raw(self, X):
        x = torch.tensor((np.asarray(X, dtype=np.float64) - self.x_mean_) / self.x_std_, dtype=torch.float32)
        with torch.no_grad():
            return self.model_(x).prediction.numpy()


class LocalExpertsRegressor(RegressorMixin, _LocalExpertsBase):
    def fit(self, X, y):
        y = np.asarray(y, dtype=np.float64)
        self.y_mean_, self.y_std_ = y.mean(), y.std() + 1e-8
        return self._fit(X, torch.tensor((y - self.y_mean_) / self.y_std_, dtype=torch.float32), "regression", 1)

    def predict(self, X):
        return self._predict_raw(X)[:, 0] * self.y_std_ + self.y_mean_


class LocalExpertsClassifier(ClassifierMixin, _LocalExpertsBase):
    def fit(self, X, y):
        self.classes_, y_idx = np.unique(np.asarray(y), return_inverse=True)
        return self._fit(X, torch.tensor(y_idx, dtype=torch.long), "classification", max(2, len(self.classes_)))

    def predict_proba(self, X):
        return self._predict_raw(X)[:, : len(self.classes_)]

    def predict(self, X):
        return self.classes_[self.predict_proba(X).argmax(axis=1)]
