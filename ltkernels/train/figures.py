"""Matplotlib figures of a run: per-class test accuracy, per-class feature norm over epochs."""
from __future__ import annotations

import os

import numpy as np


def save_figures(out_dir: str, history, test_metrics: dict, cls_num_list, title: str = "") -> list:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.join(out_dir, "figures"), exist_ok=True)
    paths = []
    n = np.asarray(cls_num_list)
    order = np.argsort(-n, kind="stable")
    acc = np.asarray(test_metrics.get("per_class_acc", []), dtype=float)
    if acc.size:
        fig, ax = plt.subplots(figsize=(max(6, min(16, 0.25 * len(n))), 3.5))
        ax.bar(np.arange(len(n)), acc[order], color="tab:blue")
        ax.set_xlabel("class (sorted by training count, head → tail)")
        ax.set_ylabel("test accuracy (%)")
        ax2 = ax.twinx()
        ax2.plot(np.arange(len(n)), n[order], color="tab:red", lw=1)
        ax2.set_ylabel("training images", color="tab:red")
        ax.set_title(f"{title}: per-class accuracy")
        fig.tight_layout()
        p = os.path.join(out_dir, "figures", "per_class_acc.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    rows = [r for r in history if r.get("feat_norm_per_class")]
    if rows:
        F = np.asarray([r["feat_norm_per_class"] for r in rows], dtype=float)[:, order]
        ep = np.arange(1, len(rows) + 1)
        fig, ax = plt.subplots(figsize=(7, 3.8))
        if F.shape[1] <= 20:
            cmap = plt.get_cmap("viridis")
            for j in range(F.shape[1]):
                ax.plot(ep, F[:, j], color=cmap(j / max(1, F.shape[1] - 1)), label=f"{order[j]} (n={n[order[j]]})")
            ax.legend(fontsize=6, ncol=2)
            ax.set_ylabel("mean feature norm")
            ax.set_xlabel("evaluation (epoch order, all stages)")
        else:
            im = ax.imshow(F.T, aspect="auto", origin="lower", interpolation="nearest")
            fig.colorbar(im, ax=ax, label="mean feature norm")
            ax.set_xlabel("evaluation (epoch order, all stages)")
            ax.set_ylabel("class (head → tail)")
        ax.set_title(f"{title}: per-class feature norm")
        fig.tight_layout()
        p = os.path.join(out_dir, "figures", "feature_norm.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths
