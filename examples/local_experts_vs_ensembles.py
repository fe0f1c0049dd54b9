"""The 1991 mixture of local experts beside scikit-learn's bagging and stacking ensembles.

    python examples/local_experts_vs_ensembles.py            # 5-fold CV, ~1 minute on 2 cores
    python examples/local_experts_vs_ensembles.py --quick    # 3-fold, fewer epochs (the test runs this)

Data: scikit-learn's bundled `diabetes` (regression, 442 rows, 10 features; score R^2) and
`breast_cancer` (classification, 569 rows, 30 features; score accuracy). Every model sees the same
folds. The mixture and its one-expert ablation (the same network without a gate) are
`moekit.models.mole` estimators; the ensembles are scikit-learn's defaults around standard base
learners. Prints a table (mean +- std over folds) and, with --json, writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer, load_diabetes
from sklearn.ensemble import BaggingClassifier, BaggingRegressor, StackingClassifier, StackingRegressor
from sklearn.linear_model import LogisticRegression, Ridge, RidgeCV
from sklearn.model_selection import KFold, StratifiedKFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor

from moekit.models.mole.estimators import LocalExpertsClassifier, LocalExpertsRegressor


def regression_models(epochs: int) -> dict:
    return {
        "mixture of local experts (4 x MLP-8)": LocalExpertsRegressor(num_experts=4, expert_hidden=8, epochs=epochs),
        "mixture of local experts (4 x linear)": LocalExpertsRegressor(num_experts=4, expert_hidden=0, epochs=epochs),
        "one expert, no gate (MLP-8)": LocalExpertsRegressor(num_experts=1, expert_hidden=8, epochs=epochs),
        "ridge": make_pipeline(StandardScaler(), Ridge(alpha=1.0)),
        "bagging (50 trees)": BaggingRegressor(DecisionTreeRegressor(min_samples_leaf=5), n_estimators=50,
                                               random_state=0),
        "stacking (ridge, tree, kNN -> ridge)": StackingRegressor(
            [("ridge", make_pipeline(StandardScaler(), Ridge())),
             ("tree", DecisionTreeRegressor(max_depth=4, random_state=0)),
             ("knn", make_pipeline(StandardScaler(), KNeighborsRegressor(n_neighbors=15)))],
            final_estimator=RidgeCV()),
    }


def classification_models(epochs: int) -> dict:
    return {
        "mixture of local experts (4 x MLP-8)": LocalExpertsClassifier(num_experts=4, expert_hidden=8, epochs=epochs),
        "mixture of local experts (4 x linear)": LocalExpertsClassifier(num_experts=4, expert_hidden=0, epochs=epochs),
        "one expert, no gate (MLP-8)": LocalExpertsClassifier(num_experts=1, expert_hidden=8, epochs=epochs),
        "logistic regression": make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
        "bagging (50 trees)": BaggingClassifier(DecisionTreeClassifier(), n_estimators=50, random_state=0),
        "stacking (logreg, tree, kNN -> logreg)": StackingClassifier(
            [("logreg", make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))),
             ("tree", DecisionTreeClassifier(max_depth=4, random_state=0)),
             ("knn", make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=15)))],
            final_estimator=LogisticRegression(max_iter=2000)),
    }


def compare(folds: int = 5, epochs: int = 300) -> dict:
    torch.set_num_threads(1)
    results = {}
    tasks = [
        ("diabetes (regression, R^2)", load_diabetes(return_X_y=True), regression_models(epochs),
         KFold(folds, shuffle=True, random_state=0), "r2"),
        ("breast_cancer (classification, accuracy)", load_breast_cancer(return_X_y=True),
         classification_models(epochs), StratifiedKFold(folds, shuffle=True, random_state=0), "accuracy"),
    ]
    for title, (X, y), models, cv, scoring in tasks:
        rows = {}
        for name, model in models.items():
            start = time.perf_counter()
            scores = cross_val_score(model, X, y, cv=cv, scoring=scoring)
            rows[name] = {"mean": float(np.mean(scores)), "std": float(np.std(scores)),
                          "seconds": time.perf_counter() - start}
        results[title] = rows
    return results


def format_table(results: dict) -> str:
    lines = []
    for title, rows in results.items():
        lines.append(title)
        width = max(len(n) for n in rows)
        for name, r in rows.items():
            lines.append(f"  {name:<{width}}  {r['mean']:.3f} +- {r['std']:.3f}   ({r['seconds']:.1f} s)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 folds and 200 epochs")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()
    results = compare(folds=3, epochs=200) if args.quick else compare()
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
