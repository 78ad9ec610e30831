"""foodlib: do discriminative losses (Center Loss, L-GM, island) beat softmax on fine-grained food photos?

Public surface (imported lazily, so ``import foodlib.metrics`` stays torch-free and fast):

>>> import foodlib
>>> cfg = foodlib.Config.from_flat(data="dishes", loss="center", epochs=2, out="runs/try")  # doctest: +SKIP
>>> result = foodlib.fit(cfg)                                                                # doctest: +SKIP
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "foodlib.config",
    "ConfigError": "foodlib.config",
    "fit": "foodlib.train",
    "evaluate": "foodlib.train",
    "load_run": "foodlib.train",
    "load_data": "foodlib.data",
    "create_model": "foodlib.models",
    "list_models": "foodlib.models",
    "create_loss": "foodlib.losses",
    "list_losses": "foodlib.losses",
    "extract_features": "foodlib.features",
    "load_features": "foodlib.features",
    "predict": "foodlib.inference",
    "embed": "foodlib.inference",
    "nearest_neighbours": "foodlib.inference",
    "export_model": "foodlib.inference",
    "enroll": "foodlib.inference",
    "run_suite": "foodlib.suite",
    "tune": "foodlib.tuning",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'foodlib' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
