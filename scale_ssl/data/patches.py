"""Cut images into a grid of overlapping square patches, as CPC does.

Oord et al. 2018 (arXiv:1807.03748) and Hénaff et al. 2020 (CPC v2, arXiv:1905.09272, sec. 3):
an image of side H becomes a g x g grid of p x p patches taken every s = p - overlap pixels,

    g = (H - p) / s + 1          (H - p must be a multiple of s: the patches tile the image)

e.g. 28 px Fashion-MNIST with p = 8, overlap 4 gives a 6 x 6 grid; 32 px CIFAR gives 7 x 7.
"""

from __future__ import annotations

import torch

from scale_ssl.checks import check_int


def patch_grid_size(image_size: int, patch_size: int, patch_overlap: int, owner: str = "ImagePatches") -> int:
    """Patches per side; a clear error when ``patch_size``/``patch_overlap`` do not tile the image."""
    check_int(owner, "image_size", image_size, 1)
    check_int(owner, "patch_size", patch_size, 1)
    check_int(owner, "patch_overlap", patch_overlap, 0)
    if patch_overlap >= patch_size:
        raise ValueError(
            f"{owner}: patch_overlap={patch_overlap} must be smaller than patch_size={patch_size} "
            f"(patches are taken every patch_size - patch_overlap pixels)"
        )
    if patch_size > image_size:
        raise ValueError(f"{owner}: patch_size={patch_size} is larger than the {image_size}-px image; pick patch_size <= {image_size}")
    stride = patch_size - patch_overlap
    if (image_size - patch_size) % stride:
        fits = [p for p in range(2, image_size + 1) for o in (p // 2,) if (image_size - p) % (p - o) == 0]
        raise ValueError(
            f"{owner}: patch_size={patch_size} with patch_overlap={patch_overlap} (a patch every {stride} px) does not "
            f"tile a {image_size}-px image: ({image_size} - {patch_size}) is not a multiple of {stride}; "
            f"with half overlap, patch sizes that tile it are {fits}"
        )
    return (image_size - patch_size) // stride + 1


class ImagePatches:
    """``patches(images)``: (N, C, H, W) -> (N, g, g, C, p, p); one image (C, H, W) -> (g, g, C, p, p).

    Args:
        image_size: H = W of the images (checked on every call).
        patch_size: p; patch_overlap: pixels shared by neighbouring patches (CPC: p / 2).
    """

    def __init__(self, image_size: int, patch_size: int = 8, patch_overlap: int = 4):
        self.grid = patch_grid_size(image_size, patch_size, patch_overlap)
        self.image_size, self.patch_size, self.patch_overlap = image_size, patch_size, patch_overlap
        self.stride = patch_size - patch_overlap

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        single = images.dim() == 3
        batch = images.unsqueeze(0) if single else images
        if batch.dim() != 4 or batch.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"ImagePatches: expected images (N, C, {self.image_size}, {self.image_size}) or (C, H, W), got "
                f"{tuple(images.shape)}; set image_size to the images' side"
            )
        p, s, g = self.patch_size, self.stride, self.grid
        # Row (and column) i * s + a of the image is row a of patch row i. Gathered with
        # index_select rather than Tensor.unfold, which torch_xla runs on the host (a host round
        # trip at the start of every step); the same values, exactly.
        rows = ((torch.arange(g, device=batch.device) * s).view(g, 1) + torch.arange(p, device=batch.device)).reshape(-1)
        grid = batch.index_select(2, rows).index_select(3, rows)  # (N, C, g * p, g * p)
        grid = grid.view(batch.shape[0], batch.shape[1], g, p, g, p).permute(0, 2, 4, 1, 3, 5).contiguous()
        return grid[0] if single else grid  # (N, g, g, C, p, p)

    def __repr__(self) -> str:
        return f"ImagePatches(image_size={self.image_size}, patch_size={self.patch_size}, patch_overlap={self.patch_overlap})"
