"""Encoders and heads shared by the self-supervised methods."""

from scale_ssl.models.heads import ProjectionHead
from scale_ssl.models.resnet import RESNET_ARCHITECTURES, build_resnet_encoder

__all__ = ["ProjectionHead", "RESNET_ARCHITECTURES", "build_resnet_encoder"]
