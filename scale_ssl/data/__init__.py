"""Data layer: Fashion-MNIST source, webdataset shard writer and index, augmentations, and the
sharded stream that gives every rank the same number of steps."""

from scale_ssl.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ROOT,
    load_fashion_mnist,
    read_idx,
)
from scale_ssl.data.shard_index import INDEX_FILENAME, ShardIndex, ShardInfo
from scale_ssl.data.shard_writer import (
    SUPPORTED_IMAGE_FORMATS,
    EncodedImage,
    ImageFolderShards,
    make_fashion_mnist_shards,
    make_imagefolder_shards,
    write_image_shards,
)
from scale_ssl.data.sample_fields import MissingLabelsError, SampleFields
from scale_ssl.data.shard_indexer import build_index
from scale_ssl.data.shard_source import ShardSourceError, ShardTruncatedError, list_shards, load_index, resolve_location
from scale_ssl.data.stream import (
    DataCorruptionError,
    EpochShardPlan,
    ResampledShardPlan,
    ShardedImageStream,
    ShardIndexMismatchError,
)
from scale_ssl.data.multicrop import MultiCropViews
from scale_ssl.data.transforms import (
    FMNIST_MEAN,
    FMNIST_STD,
    AugmentedViews,
    BYOLViews,
    EvalTransform,
    SimCLRViews,
)
from scale_ssl.data.view_recipe import ViewRecipe

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ROOT",
    "load_fashion_mnist",
    "read_idx",
    "INDEX_FILENAME",
    "ShardIndex",
    "ShardInfo",
    "SUPPORTED_IMAGE_FORMATS",
    "EncodedImage",
    "ImageFolderShards",
    "make_fashion_mnist_shards",
    "make_imagefolder_shards",
    "write_image_shards",
    "MissingLabelsError",
    "SampleFields",
    "build_index",
    "list_shards",
    "ShardSourceError",
    "ShardTruncatedError",
    "load_index",
    "resolve_location",
    "DataCorruptionError",
    "EpochShardPlan",
    "ResampledShardPlan",
    "ShardedImageStream",
    "ShardIndexMismatchError",
    "FMNIST_MEAN",
    "FMNIST_STD",
    "EvalTransform",
    "AugmentedViews",
    "SimCLRViews",
    "BYOLViews",
    "MultiCropViews",
    "ViewRecipe",
]
