"""The MLP projection head g(.) of SimCLR.

Chen, Kornblith, Norouzi, Hinton. "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020 (arXiv:2002.05709), Section 2.1 and 4.2; deeper heads in SimCLR v2
(Chen et al. 2020, arXiv:2006.10029).

The head maps encoder features h to the embedding z the contrastive loss sees:

    z = W_L( ... ReLU(BN(W_2 ReLU(BN(W_1 h)))) ... )        (L = num_layers linear layers)

Every hidden layer is Linear -> BatchNorm1d -> ReLU (Linear -> ReLU without batch norm); the last
layer is a Linear, optionally followed by BatchNorm1d (``last_bn``, as in SimCLR v2 and SimSiam).
The loss is computed on z, while downstream tasks use h: the paper shows h keeps more
information than z.
"""

from __future__ import annotations

import torch
from torch import nn


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"ProjectionHead: {name} must be a positive int, got {value!r}")


class ProjectionHead(nn.Module):
    """SimCLR's MLP projection: ``head(h)`` maps (N, input_dim) features to (N, output_dim).

    Args:
        input_dim: feature size of the encoder output (``feature_dim`` of ``build_resnet_encoder``).
        hidden_dim: width of every hidden layer (SimCLR uses the input width, e.g. 2048).
        output_dim: size of the embedding the loss compares (SimCLR: 128).
        num_layers: number of Linear layers, >= 1. 2 is SimCLR v1; 3 is SimCLR v2. With 1 the
            head is a single Linear layer and ``hidden_dim`` is unused.
        batch_norm: put BatchNorm1d after every hidden Linear layer.
        last_bn: also put a BatchNorm1d after the last Linear layer.

    A Linear layer followed by batch norm has no bias: the norm's shift would cancel it.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int = 2,
        batch_norm: bool = True,
        last_bn: bool = False,
    ):
        super().__init__()
        for name, value in (("input_dim", input_dim), ("hidden_dim", hidden_dim), ("output_dim", output_dim), ("num_layers", num_layers)):
            _check_positive_int(name, value)
        for name, value in (("batch_norm", batch_norm), ("last_bn", last_bn)):
            if not isinstance(value, bool):
                raise TypeError(f"ProjectionHead: {name} must be True or False, got {value!r}")
        self.input_dim = input_dim
        self.output_dim = output_dim

        layers: list[nn.Module] = []
        width = input_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(width, hidden_dim, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            width = hidden_dim
        layers.append(nn.Linear(width, output_dim, bias=not last_bn))
        if last_bn:
            layers.append(nn.BatchNorm1d(output_dim))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 2 or features.shape[1] != self.input_dim:
            raise ValueError(
                f"ProjectionHead: expected features of shape (batch, {self.input_dim}), got "
                f"{tuple(features.shape)}; flatten the encoder output or set input_dim to its width"
            )
        return self.layers(features)
