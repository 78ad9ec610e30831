"""Plain soft-max cross-entropy over a linear classifier: the baseline every other loss is measured against."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import DiscriminativeLoss, LossOutput, autocast_off, check_number


class SoftmaxLoss(DiscriminativeLoss):
    """Soft-max cross-entropy over a linear classifier on the embedding.

    Objective: the mean cross-entropy of ``W x + b`` against the labels, the standard
    classification loss (the "softmax loss" that Wen et al. 2016 and Wan et al. 2018 compare with).

    Learnable state: the classifier ``loss.classifier`` (an ``nn.Linear(D, C)``, PyTorch's default
    initialisation), trained with the network's learning rate by back-propagation.

    The head runs in float32 with autocast disabled, so bf16/fp16 embeddings from AMP are cast up.

    Label smoothing (Szegedy et al., "Rethinking the Inception Architecture for Computer
    Vision", CVPR 2016): with ``label_smoothing = eps > 0`` the target of each sample is
    ``1 - eps`` on its class plus ``eps / C`` on every class (PyTorch's ``cross_entropy``
    convention), a cheap regulariser that any comparison against soft-max should include as a
    baseline. The logged ``ce`` is this smoothed cross-entropy; :meth:`predict` is unchanged.

    Args:
        embedding_dim: D, the width of the embedding the model returns.
        num_classes: C.
        label_smoothing: ``eps`` in ``[0, 1)``. Default 0 (off); 0.1 is the usual value.

    >>> loss = SoftmaxLoss(embedding_dim=4, num_classes=3)
    >>> out = loss(torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    >>> out.logits.shape, sorted(out.terms)
    (torch.Size([8, 3]), ['ce'])
    """

    term_names = ("ce",)

    def __init__(self, embedding_dim: int, num_classes: int, label_smoothing: float = 0.0):
        super().__init__(embedding_dim, num_classes)
        check_number(type(self).__name__, "label_smoothing", label_smoothing, 0.0, 1.0,
                     hint="it is the probability mass spread over all classes; 0.1 is usual, 0 is off")
        if label_smoothing == 1.0:
            raise ValueError(f"{type(self).__name__}: label_smoothing must be below 1, got label_smoothing=1.0; "
                             "at 1 the target ignores the label (0.1 is usual)")
        self.label_smoothing = float(label_smoothing)
        self.classifier = nn.Linear(embedding_dim, num_classes)

    def classifier_logits(self, embedding32: torch.Tensor) -> torch.Tensor:
        """``W x + b`` in float32 for a float32 embedding ``(N, D)`` -> ``(N, C)``.

        The weights are cast too (a no-op when they are float32), so a module converted with
        ``.half()`` still computes the head in float32.
        """
        weight = self.classifier.weight.float()  # (C, D)
        bias = self.classifier.bias.float()  # (C,)
        return F.linear(embedding32, weight, bias)

    def forward(self, embedding: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        self.check_batch(embedding, labels)
        with autocast_off(embedding):
            logits = self.classifier_logits(embedding.float())  # (N, C)
            ce = F.cross_entropy(logits, labels.long(), label_smoothing=self.label_smoothing)
        return LossOutput(loss=ce, logits=logits, terms={"ce": ce.detach()})

    def predict(self, embedding: torch.Tensor) -> torch.Tensor:
        self.check_batch(embedding)
        with autocast_off(embedding):
            return self.classifier_logits(embedding.float())  # (N, C)

    def weight_decay_parameters(self) -> list[nn.Parameter]:
        """The classifier's weight matrix ``(C, D)`` decays like the network's (its bias does not)."""
        return [self.classifier.weight]
