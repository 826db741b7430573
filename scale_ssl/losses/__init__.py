"""Losses. None imports torch.distributed: each receives a ``Collective``."""

from scale_ssl.losses.byol_loss import BYOLLoss
from scale_ssl.losses.cpc import CPCTask
from scale_ssl.losses.dino_loss import DINOLoss
from scale_ssl.losses.feature_map_contrastive import AmdimNCELoss, FeatureMapContrastiveTask
from scale_ssl.losses.infonce_queue import InfoNCEQueueLoss
from scale_ssl.losses.negative_cosine import NegativeCosineLoss
from scale_ssl.losses.nt_xent import NTXentLoss
from scale_ssl.losses.sinkhorn import distributed_sinkhorn, prototype_marginal_deviation
from scale_ssl.losses.swav_loss import SwAVLoss

__all__ = [
    "AmdimNCELoss",
    "CPCTask",
    "DINOLoss",
    "FeatureMapContrastiveTask",
    "BYOLLoss",
    "InfoNCEQueueLoss",
    "NegativeCosineLoss",
    "NTXentLoss",
    "SwAVLoss",
    "distributed_sinkhorn",
    "prototype_marginal_deviation",
]
