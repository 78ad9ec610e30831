"""Embeddings and prediction logits of every image of a split, as numpy arrays.

>>> feats = extract_features(model, loss, data.loader("test", 256, shuffle=False), image_size=64)  # doctest: +SKIP
>>> feats["embeddings"].shape, feats["logits"].shape, feats["labels"].shape                        # doctest: +SKIP
((1250, 512), (1250, 10), (1250,))
"""
from __future__ import annotations

from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np
from foodlib.files import atomic_write

if TYPE_CHECKING:  # torch is imported where it is used: load_features serves torch-free reports
    import torch
    from torch import nn


def extract_features(
    model: "nn.Module",
    loss: "nn.Module",
    loader,
    image_size: int,
    device: "str | torch.device" = "cpu",
    amp_dtype: "torch.dtype | None" = None,
    channels_last: bool = True,
    progress: bool = False,
    desc: str = "features",
) -> dict[str, np.ndarray]:
    """Run the evaluation transform, the model and ``loss.predict`` over a loader.

    Returns:
        ``{"embeddings": (N, D) float32, "logits": (N, C) float32, "labels": (N,) int64}``, in
        the loader's order. Embeddings are cast to float32 whatever the autocast dtype.
    """
    import torch
    from tqdm import tqdm  # text bars: saved in executed notebooks, unlike widgets

    from foodlib.data.augment import eval_transform, normalization  # lazy: torch (the .npz functions are numpy-only)

    device = torch.device(device)
    model.eval()
    embeddings, logits, labels = [], [], []
    with torch.no_grad():
        for images, batch_labels in tqdm(loader, desc=desc, disable=not progress, leave=False):
            x = eval_transform(images.to(device, non_blocking=True), image_size, channels_last, **normalization(model))
            with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                embedding = model(x)
            embedding = embedding.float()  # (N, D)
            embeddings.append(embedding.cpu().numpy())
            logits.append(loss.predict(embedding).float().cpu().numpy())  # (N, C)
            labels.append(batch_labels.numpy())
    if not embeddings:
        raise ValueError("the loader yielded no batches; nothing to extract")
    return {
        "embeddings": np.concatenate(embeddings).astype(np.float32),
        "logits": np.concatenate(logits).astype(np.float32),
        "labels": np.concatenate(labels).astype(np.int64),
    }


def save_features(path: str | Path, features: dict[str, dict[str, np.ndarray]], classes: list[str],
                  float16: bool = False) -> Path:
    """Write ``{split: extract_features(...)}`` to one .npz: ``<split>_embeddings`` etc. plus ``classes``.

    ``float16`` halves the file for big sets (embeddings and logits only; labels stay int64).
    """
    arrays: dict[str, np.ndarray] = {"classes": np.asarray(classes)}
    for split, feats in features.items():
        for key, value in feats.items():
            arrays[f"{split}_{key}"] = value.astype(np.float16) if float16 and value.dtype == np.float32 else value
    return atomic_write(path, lambda f: np.savez(f, **arrays))


def load_features(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """Inverse of :func:`save_features`: ``{split: {"embeddings", "logits", "labels"}}`` (float32) and ``"classes"``."""
    out: dict = {}
    with np.load(path, allow_pickle=False) as npz:
        for key in npz.files:
            if key == "classes":
                out["classes"] = [str(c) for c in npz[key]]
                continue
            split, name = key.split("_", 1)
            value = npz[key]
            out.setdefault(split, {})[name] = value.astype(np.float32) if value.dtype == np.float16 else value
    return out
