"""Any pytorch-metric-learning loss behind foodlib's loss contract: ``pml:<LossName>[?option=value&...]``.

pytorch-metric-learning (PML, K. Musgrave et al.) implements the embedding losses well (ProxyAnchor,
MultiSimilarity, Triplet with a miner, NormalizedSoftmax, SoftTriple, ...); foodlib wraps them
instead of rewriting them. It is an optional extra: ``pip install foodlib[pml]``.

>>> loss = create_pml_loss("pml:ProxyAnchorLoss?margin=0.1&alpha=32", embedding_dim=8, num_classes=5)
>>> loss.kind, loss.samples_per_class, type(loss.metric_loss).__name__
('proxy', 0, 'ProxyAnchorLoss')
>>> loss = create_pml_loss("pml:TripletMarginLoss?margin=0.2&miner=TripletMarginMiner", 8, 5)
>>> loss.kind, loss.samples_per_class, type(loss.miner).__name__
('pair', 4, 'TripletMarginMiner')
"""
from __future__ import annotations

import inspect
from typing import Any
from urllib.parse import parse_qsl

import torch
import torch.distributed as dist
import yaml
from torch import nn

from .base import DiscriminativeLoss, LossOutput, autocast_off, check_number

PML_PREFIX = "pml:"
#: images per class in each batch that pair and triplet losses ask the loader for (PML's MPerClassSampler
#: examples use 4): with fewer, most anchors in a batch of many classes have no positive.
DEFAULT_SAMPLES_PER_CLASS = 4
#: per-step decay of the class-mean sums of pair losses: about the last 1 / (1 - 0.95) = 20 batches count.
DEFAULT_MEAN_DECAY = 0.95
#: logit of a class no training batch has shown yet (pair losses): below any similarity or -distance.
UNSEEN_CLASS_LOGIT = -1e4
#: options in the name that foodlib takes itself; all others go to the PML loss class.
FOODLIB_KEYS = ("miner", "samples_per_class", "mean_decay")


def is_pml_name(name: Any) -> bool:
    return isinstance(name, str) and name.startswith(PML_PREFIX)


def parse_pml_name(name: str) -> tuple[str, dict[str, Any]]:
    """``"pml:Name?a=1&b=x"`` -> ``("Name", {"a": 1, "b": "x"})``; values are read as YAML scalars.

    >>> parse_pml_name("pml:MultiSimilarityLoss?alpha=2&beta=50.0&base=0.5")
    ('MultiSimilarityLoss', {'alpha': 2, 'beta': 50.0, 'base': 0.5})
    """
    if not is_pml_name(name):
        raise ValueError(f"{name!r} is not a pytorch-metric-learning loss name; write pml:<LossName>[?option=value&...]")
    class_name, _, query = name[len(PML_PREFIX):].partition("?")
    options: dict[str, Any] = {}
    for key, text in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)) if query else []:
        if key in options:
            raise ValueError(f"loss {name!r}: option {key!r} is given twice")
        try:
            options[key] = yaml.safe_load(text) if text else None
        except yaml.YAMLError:
            options[key] = text
    return class_name, options


def _pml_modules():
    try:
        from pytorch_metric_learning import losses, miners
    except ImportError as error:  # pragma: no cover - the extra is installed in the dev environment
        raise ValueError(
            "pml:<LossName> losses need pytorch-metric-learning; install the extra: pip install 'foodlib[pml]' "
            f"({error})"
        ) from None
    return losses, miners


def _pml_class(module, class_name: str, base: type, what: str, name: str) -> type:
    cls = getattr(module, class_name, None)
    if not (inspect.isclass(cls) and issubclass(cls, base)):
        valid = sorted(n for n, c in vars(module).items() if inspect.isclass(c) and issubclass(c, base) and c is not base
                       and not n.startswith(("Base", "Generic")))
        raise ValueError(f"loss {name!r}: pytorch-metric-learning has no {what} {class_name!r}; valid: {', '.join(valid)}")
    return cls


def check_pml_name(name: str) -> None:
    """Raise a ValueError naming the problem when ``name`` cannot build (cheap: C=2, D=2)."""
    create_pml_loss(name, embedding_dim=2, num_classes=2)


def create_pml_loss(name: str, embedding_dim: int, num_classes: int) -> "PMLLoss":
    """Build :class:`PMLLoss` from its registry name ``pml:<LossName>[?option=value&...]``."""
    class_name, options = parse_pml_name(name)
    reserved = sorted(set(options) & {"embedding_dim", "num_classes", "class_name", "embedding_size", "descriptors_dim"})
    if reserved:
        raise ValueError(f"loss {name!r}: {', '.join(reserved)} come from the model and the data; drop them from the name")
    return PMLLoss(embedding_dim, num_classes, class_name, **options)


class PMLLoss(DiscriminativeLoss):
    """A pytorch-metric-learning loss as a foodlib loss.

    Spelling: ``pml:<LossName>[?option=value&...]``, e.g. ``pml:ProxyAnchorLoss?margin=0.1&alpha=32`` or
    ``pml:TripletMarginLoss?margin=0.2&miner=TripletMarginMiner``. Options go to the PML class
    (values read as YAML scalars) except three that foodlib takes: ``miner`` (a ``pytorch_metric_learning.miners``
    class, built with its defaults, whose tuples the loss uses), ``samples_per_class`` and
    ``mean_decay`` (below). ``terms`` holds ``pml``, the PML loss value.

    Two kinds, told apart by the PML constructor:

    * ``"proxy"``: losses that own class weights (their constructor takes ``num_classes``:
      ProxyAnchor, ProxyNCA, NormalizedSoftmax, SoftTriple, ArcFace, CosFace, ...). They are
      given ``num_classes`` and ``embedding_size`` and predict with their class weights (PML's
      ``get_logits``). Their weights train with the network's learning rate.
    * ``"pair"``: pair and triplet losses (Contrastive, Triplet, MultiSimilarity, Circle, ...),
      which have no class weights. They predict by the nearest class mean of the training
      embeddings, measured with the loss's own distance (similarity as the logit, or minus the
      distance). The means are kept up to date by :meth:`update_centers` after every optimizer
      step: per-class sums and counts of the batch embeddings decay by ``mean_decay`` per step and
      the batch's are added, so the mean follows the last ``1 / (1 - mean_decay)`` batches of a
      network that keeps moving. Under ``torch.distributed`` the batch sums and counts are
      all-reduced first, so every rank keeps the same means. The sums and counts are buffers:
      the state dict, ``best.pt`` / ``last.pt``, resume and ``load_run`` carry them, and they load
      with ``torch.load(weights_only=True)``. A class no batch has shown has logit
      ``UNSEEN_CLASS_LOGIT``. These losses compare samples inside a batch, so they ask the loader for
      ``samples_per_class`` images per class (default 4; see ``foodlib.data.balanced``).

    Losses run in float32 with autocast off, like every foodlib loss. Under DDP a pair loss sees
    only its rank's part of the batch (each rank gets whole classes, so its positives are there).

    Args:
        embedding_dim: D.
        num_classes: C.
        class_name: the PML loss class, e.g. ``"MultiSimilarityLoss"``.
        miner: optional PML miner class name, e.g. ``"MultiSimilarityMiner"``.
        samples_per_class: images per class per batch this loss asks for; default 0 for proxy
            losses, 4 for pair losses. ``fit()`` uses it unless the config's ``samples_per_class`` is set.
        mean_decay: per-step decay of the class-mean sums (pair losses), in ``[0, 1)``. Default 0.95.
        **options: keyword arguments of the PML class.
    """

    term_names = ("pml",)
    metric = "cosine"  # most pytorch-metric-learning losses compare unit-length embeddings (their default distances)

    def __init__(self, embedding_dim: int, num_classes: int, class_name: str, miner: str | None = None,
                 samples_per_class: int | None = None, mean_decay: float = DEFAULT_MEAN_DECAY, **options: Any):
        super().__init__(embedding_dim, num_classes)
        pml_losses, pml_miners = _pml_modules()
        name = f"{PML_PREFIX}{class_name}"
        loss_class = _pml_class(pml_losses, class_name, pml_losses.BaseMetricLossFunction, "loss", name)
        parameters = inspect.signature(loss_class.__init__).parameters
        self.kind = "proxy" if "num_classes" in parameters else "pair"
        sizes: dict[str, int] = {}
        if self.kind == "proxy":
            sizes["num_classes"] = num_classes
            size_key = next((k for k in ("embedding_size", "descriptors_dim") if k in parameters), None)
            if size_key is not None:
                sizes[size_key] = embedding_dim
        clash = sorted(set(options) & set(sizes))
        if clash:
            raise ValueError(f"loss {name!r}: {', '.join(clash)} come from the model and the data; drop them from the name")
        try:
            self.metric_loss = loss_class(**sizes, **options)
        except (TypeError, ValueError, AssertionError) as error:
            accepted = [k for k in parameters if k not in ("self", "args", "kwargs", *sizes)]
            raise ValueError(
                f"loss {name!r} with options {options}: {type(error).__name__}: {error}. {class_name} takes "
                f"{', '.join(accepted) or 'no options of its own'} (and PML's distance/reducer/regularizer keywords)"
            ) from None
        if self.kind == "proxy" and not hasattr(self.metric_loss, "get_logits"):
            raise ValueError(f"loss {name!r} owns class weights but has no get_logits() to predict with; "
                             "use a pair loss or another proxy loss")
        self.miner = None
        if miner is not None:
            self.miner = _pml_class(pml_miners, str(miner), pml_miners.BaseMiner, "miner", name)()
        if samples_per_class is None:
            samples_per_class = DEFAULT_SAMPLES_PER_CLASS if self.kind == "pair" else 0
        check_number(name, "samples_per_class", samples_per_class, 0, hint="0 means plain shuffled batches")
        check_number(name, "mean_decay", mean_decay, 0.0, 1.0,
                     hint="the class means follow the last 1 / (1 - mean_decay) batches")
        if mean_decay == 1.0:
            raise ValueError(f"{name}: mean_decay must be below 1, got mean_decay=1.0 (0.95 is the default)")
        self.class_name = class_name
        self.samples_per_class = int(samples_per_class)
        self.mean_decay = float(mean_decay)
        if self.kind == "pair":
            self.register_buffer("class_sums", torch.zeros(num_classes, embedding_dim))  # (C, D), decayed
            self.register_buffer("class_counts", torch.zeros(num_classes))  # (C,), decayed

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, samples_per_class={self.samples_per_class}"

    # ----- objective ----------------------------------------------------------------------------

    def forward(self, embedding: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        self.check_batch(embedding, labels)
        labels = labels.long()
        with autocast_off(embedding):
            x = embedding.float()  # (N, D)
            indices = self.miner(x, labels) if self.miner is not None else None
            value = self.metric_loss(x, labels, indices)
            if not torch.is_tensor(value) or value.ndim != 0:
                raise ValueError(f"{PML_PREFIX}{self.class_name} returned {value!r}, not a scalar loss")
            value = value.float()
            with torch.no_grad():
                logits = self._logits(x)  # (N, C), for the training accuracy
        return LossOutput(loss=value, logits=logits, terms={"pml": value.detach()})

    def predict(self, embedding: torch.Tensor) -> torch.Tensor:
        self.check_batch(embedding)
        with autocast_off(embedding):
            return self._logits(embedding.float())

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "proxy":
            return self.metric_loss.get_logits(x).float()  # (N, C)
        return self.class_mean_logits(x)

    def class_means(self) -> torch.Tensor:
        """The running class means ``(C, D)`` (zero rows for classes not seen yet)."""
        return self.class_sums / self.class_counts.clamp_min(1e-12)[:, None]

    def class_mean_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Similarity (or minus the distance) of each embedding to each class mean, ``(N, C)``."""
        distance = getattr(self.metric_loss, "distance", None)
        if distance is None:
            from pytorch_metric_learning.distances import LpDistance

            distance = LpDistance()
        matrix = distance(x, self.class_means())  # (N, C)
        logits = matrix if distance.is_inverted else -matrix
        seen = self.class_counts > 0  # (C,)
        return torch.where(seen, logits, torch.full_like(logits, UNSEEN_CLASS_LOGIT))

    # ----- learnable state -------------------------------------------------------------------

    @torch.no_grad()
    def update_centers(self, embedding: torch.Tensor, labels: torch.Tensor) -> None:
        """Fold the batch into the decayed class sums and counts (pair losses; a no-op for proxy ones)."""
        if self.kind != "pair":
            return
        self.check_batch(embedding, labels)
        with autocast_off(embedding):
            x = embedding.detach().float()  # (N, D)
            labels = labels.long()
            dim = self.embedding_dim
            batch = torch.zeros(self.num_classes, dim + 1, device=x.device, dtype=torch.float32)  # sums | counts
            ones = torch.ones(len(labels), 1, device=x.device, dtype=torch.float32)
            batch.index_add_(0, labels, torch.cat([x, ones], dim=1))
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(batch, op=dist.ReduceOp.SUM)  # every rank folds in the global batch
            self.class_sums.mul_(self.mean_decay).add_(batch[:, :dim])
            self.class_counts.mul_(self.mean_decay).add_(batch[:, dim])

    def state_parameters(self) -> list[nn.Parameter]:
        return []
