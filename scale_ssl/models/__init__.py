"""Encoders and heads shared by the self-supervised methods."""

from scale_ssl.models.dino_head import DINOHead
from scale_ssl.models.encoder import build_encoder
from scale_ssl.models.heads import ProjectionHead
from scale_ssl.models.resnet import RESNET_ARCHITECTURES, build_resnet_encoder
from scale_ssl.models.vit import ViTEncoder, build_vit_encoder, is_vit_arch, torchvision_vit

__all__ = [
    "DINOHead",
    "ProjectionHead",
    "RESNET_ARCHITECTURES",
    "ViTEncoder",
    "build_encoder",
    "build_resnet_encoder",
    "build_vit_encoder",
    "is_vit_arch",
    "torchvision_vit",
]
