"""AMDIM's NCE between feature maps of two views, at several scales, over the *global* batch.

Bachman, Hjelm, Buchwalter. "Learning Representations by Maximizing Mutual Information Across
Views", NeurIPS 2019 (arXiv:1906.00910), sec. 3.2-3.4 (the "1->5, 1->7, 5->5" comparisons).

An encoder maps each view to a tuple of embedded feature maps ``(m_0, m_1, ...)``, each of shape
(N, D, h_k, w_k) with the same D (e.g. 1x1, 5x5 and 7x7 maps in AMDIM). A comparison ``ap`` pairs
an *anchor* vector a_i from map ``a`` of one view of image i with every location l of map ``p``
of the other view. With raw scores s(i, j, l) = <a_i, t_{j,l}> / sqrt(D) over the global batch
(j runs over all B images of all ranks) and the soft clip c(s) = tclip * tanh(s / tclip):

    nce(i, l) = -log( exp(c(s(i,i,l))) / (exp(c(s(i,i,l))) + sum_{j != i, l'} exp(c(s(i,j,l')))) )
    reg       = 5e-2 * mean_{i,j,l} s(i,j,l)^2            (keeps raw scores in tanh's linear range)
    L_ap      = mean_{i,l} nce(i, l) + reg

Positives are the locations of the *same image's* other view; every location of every other
image of the global batch is a negative. When map ``a`` is larger than 1x1 the anchor is one
location per image drawn at random (as in AMDIM's 5->5 cost). ``bidirectional`` also computes each
comparison with the views swapped; the task's loss is the mean of L over all comparisons and
directions.

Distributed form (as ``NTXentLoss``): each rank gathers the positive maps of both views once
(differentiable gather: the backward sums over ranks and returns this rank's slice), scores its own
b anchors against all B images, and offsets its positives by ``collective.rank_offset(b)``. The
anchor locations are drawn for the whole global batch from a generator every rank seeds alike,
and each rank takes its own rows, so N ranks draw exactly what one process on N*b draws. The mean
of the per-rank losses (the strategy's gradient averaging) is then the one-process loss.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from scale_ssl.collectives import Collective, default_collective

REGULARISER_WEIGHT = 5e-2  # AMDIM's weight on the mean squared raw score


def _check_tclip(owner: str, tclip) -> float:
    if isinstance(tclip, bool) or not isinstance(tclip, (int, float)) or tclip <= 0:
        raise ValueError(f"{owner}: tclip must be a positive number (AMDIM: 10 or 20), got {tclip!r}")
    return float(tclip)


def soft_clip(scores: torch.Tensor, tclip: float) -> torch.Tensor:
    """tclip * tanh(scores / tclip): ~identity for |s| << tclip, bounded by +-tclip."""
    return tclip * torch.tanh(scores / tclip)


def amdim_nce(anchors: torch.Tensor, targets: torch.Tensor, positive_rows: torch.Tensor, tclip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The NCE term and the score regulariser for anchors (b, D) against targets (B, D, L).

    ``positive_rows[i]`` is the row of ``targets`` holding anchor i's own image (its global index).
    Returns ``(mean_{i,l} nce(i, l), 5e-2 * mean s^2)`` as in the module docstring.
    """
    b, d = anchors.shape
    big_b, _, locations = targets.shape
    raw = torch.einsum("id,jdl->ijl", anchors, targets) / d**0.5  # (b, B, L)
    regulariser = REGULARISER_WEIGHT * raw.pow(2).mean()
    scores = soft_clip(raw, tclip)
    is_positive = positive_rows.view(b, 1) == torch.arange(big_b, device=anchors.device).view(1, big_b)  # (b, B)
    positive = scores[torch.arange(b, device=anchors.device), positive_rows]  # (b, L)
    negatives = scores.masked_fill(is_positive.unsqueeze(2), float("-inf")).reshape(b, big_b * locations)
    negative_lse = torch.logsumexp(negatives, dim=1, keepdim=True)  # (b, 1)
    # log(e^pos + e^lse(neg)) as a two-term logsumexp: torch.logaddexp runs on the host under torch_xla.
    both = torch.logsumexp(torch.stack([positive, negative_lse.expand_as(positive)]), dim=0)
    nce = -(positive - both).mean()
    return nce, regulariser


class AmdimNCELoss(nn.Module):
    """One AMDIM comparison: ``loss(anchors, targets) -> (nce, regulariser)``.

    anchors: (b, D) vectors, row i from image i of this rank; targets: (b, D, h, w) or (b, D, L),
    the other view's map of the same images. Targets are gathered from every rank (global
    negatives); see the module docstring for the formula.

    Args:
        tclip: soft-clip bound of the scores (AMDIM uses 10 for the task and 20 in its trainer).
        collective: the world to gather over; ``None`` means the default process group when one
            is initialised, else a world of one.
    """

    def __init__(self, tclip: float = 10.0, collective: Collective | None = None):
        super().__init__()
        self.tclip = _check_tclip("AmdimNCELoss", tclip)
        self.collective = collective

    def forward(self, anchors: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if anchors.dim() != 2 or targets.dim() not in (3, 4) or anchors.shape[:2] != targets.shape[:2]:
            raise ValueError(
                f"AmdimNCELoss: anchors must be (batch, dim) and targets (batch, dim, h, w) or (batch, dim, locations) "
                f"with the same batch and dim, got {tuple(anchors.shape)} and {tuple(targets.shape)}"
            )
        collective = self.collective or default_collective()
        b = anchors.shape[0]
        with torch.autocast(device_type=anchors.device.type, enabled=False):
            local = targets.float().flatten(start_dim=2).contiguous()
            gathered = collective.all_gather(local, grad=True)
            rows = torch.arange(b, device=anchors.device) + collective.rank_offset(b, device=anchors.device)
            return amdim_nce(anchors.float(), gathered, rows, self.tclip)


def parse_comparisons(comparisons: str | Sequence) -> tuple[tuple[int, int], ...]:
    """``"01, 11, 02"`` (or ``[(0, 1), (1, 1), (0, 2)]``) -> ((0, 1), (1, 1), (0, 2))."""
    hint = ("write comma-separated pairs of map indices, anchor map then positive map, e.g. '01, 11, 02' "
            "(map 0 is the encoder's first map, e.g. AMDIM's 1x1)")
    pairs: list[tuple[int, int]] = []
    if isinstance(comparisons, str):
        tokens = [t.strip() for t in comparisons.split(",")]
        for token in tokens:
            if not re.fullmatch(r"\d\d", token):
                raise ValueError(f"FeatureMapContrastiveTask: comparisons={comparisons!r} is malformed at {token!r}; {hint}")
            pairs.append((int(token[0]), int(token[1])))
    elif isinstance(comparisons, Sequence):
        for pair in comparisons:
            if (not isinstance(pair, Sequence) or len(pair) != 2
                    or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in pair)):
                raise ValueError(f"FeatureMapContrastiveTask: comparisons={comparisons!r} is malformed at {pair!r}; {hint}")
            pairs.append((pair[0], pair[1]))
    else:
        raise ValueError(f"FeatureMapContrastiveTask: comparisons={comparisons!r} is malformed; {hint}")
    if not pairs:
        raise ValueError(f"FeatureMapContrastiveTask: comparisons={comparisons!r} names no comparison; {hint}")
    if len(set(pairs)) != len(pairs):
        raise ValueError(f"FeatureMapContrastiveTask: comparisons={comparisons!r} repeats a pair; name each pair once")
    return tuple(pairs)


class FeatureMapContrastiveTask(nn.Module):
    """AMDIM's multi-scale NCE: ``task(maps_view1, maps_view2)`` -> scalar loss.

    Each argument is a tuple of feature maps (b, D, h_k, w_k) of one view, index k as the encoder
    produces them (AMDIM: 0 = 1x1, 1 = 5x5, 2 = 7x7). See the module docstring for the formula.

    Args:
        comparisons: pairs (anchor map, positive map), e.g. ``"01, 11, 02"`` or ``"00, 11"``.
        tclip: soft-clip bound of the scores.
        bidirectional: also compare with the views swapped (view 2 anchors, view 1 positives).
        collective: the world to gather negatives over; ``None`` means the default process group
            when one is initialised, else a world of one.
        seed: seeds the generator that draws anchor locations from maps larger than 1x1.

    After each call ``last_terms`` holds the detached mean NCE and regulariser, for logging, and
    ``last_anchor_locations[view][map]`` the flat location each of this rank's anchors used.
    """

    def __init__(
        self,
        comparisons: str | Sequence = "00, 11",
        tclip: float = 10.0,
        bidirectional: bool = True,
        collective: Collective | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.comparisons = parse_comparisons(comparisons)
        self.comparisons_text = ", ".join(f"{a}{p}" for a, p in self.comparisons)
        self.tclip = _check_tclip("FeatureMapContrastiveTask", tclip)
        if not isinstance(bidirectional, bool):
            raise TypeError(f"FeatureMapContrastiveTask: bidirectional must be True or False, got {bidirectional!r}")
        self.bidirectional = bidirectional
        self.collective = collective
        self.seed = int(seed)
        # Training calls so far: the location generator's state. A host int (no device sync on
        # XLA), saved in the state dict as extra state so a resumed run draws what it would have.
        self.calls = 0
        self.last_terms: dict[str, torch.Tensor] = {}
        self.last_anchor_locations: dict[int, list[torch.Tensor]] = {}

    def get_extra_state(self) -> dict:
        return {"calls": self.calls}

    def set_extra_state(self, state: dict) -> None:
        self.calls = int(state["calls"])

    @property
    def required_maps(self) -> int:
        """How many maps the encoder must produce (1 + the largest index named)."""
        return 1 + max(max(pair) for pair in self.comparisons)

    def check_num_maps(self, num_maps: int, owner: str = "FeatureMapContrastiveTask") -> None:
        """Clear error when a comparison names a map the encoder does not produce."""
        for a, p in self.comparisons:
            for index in (a, p):
                if index >= num_maps:
                    raise ValueError(
                        f"{owner}: comparison '{a}{p}' of comparisons='{self.comparisons_text}' names feature map {index}, "
                        f"but the encoder produces {num_maps} map(s) (indices 0..{num_maps - 1}); "
                        f"use only indices below {num_maps}"
                    )

    def _anchor_vectors(self, feature_map: torch.Tensor, locations: torch.Tensor | None) -> torch.Tensor:
        b, d = feature_map.shape[:2]
        flat = feature_map.flatten(start_dim=2)  # (b, D, L)
        if flat.shape[2] == 1:
            return flat[:, :, 0]
        index = locations.view(b, 1, 1).expand(b, d, 1)
        return flat.gather(2, index)[:, :, 0]

    def _draw_locations(self, b: int, world_b: int, offset: torch.Tensor, sizes: list[int], device) -> list[torch.Tensor]:
        # One draw of the whole global batch per map, identical on every rank; this rank's rows only.
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.calls))
        rows = torch.arange(b, device=device) + offset
        return [torch.randint(0, size, (world_b,), generator=generator).to(device)[rows] for size in sizes]

    def forward(self, maps_view1: Sequence[torch.Tensor], maps_view2: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(maps_view1) != len(maps_view2):
            raise ValueError(
                f"FeatureMapContrastiveTask: the two views gave {len(maps_view1)} and {len(maps_view2)} feature maps; "
                "pass the same encoder's maps for both views"
            )
        self.check_num_maps(len(maps_view1))
        reference = maps_view1[0]
        b, d = reference.shape[:2]
        for k, (m1, m2) in enumerate(zip(maps_view1, maps_view2)):
            if m1.dim() != 4 or m1.shape != m2.shape or m1.shape[:2] != (b, d):
                raise ValueError(
                    f"FeatureMapContrastiveTask: map {k} must be (batch={b}, dim={d}, h, w) in both views, got "
                    f"{tuple(m1.shape)} and {tuple(m2.shape)}; every map must be embedded to the same dim"
                )
        collective = self.collective or default_collective()
        device = reference.device
        with torch.autocast(device_type=device.type, enabled=False):
            views = ([m.float() for m in maps_view1], [m.float() for m in maps_view2])
            positive_indices = sorted({p for _, p in self.comparisons})
            # Gather each positive map of both views once, however many comparisons use it.
            gathered = {}
            for v in (0, 1):
                for p in positive_indices:
                    gathered[(v, p)] = collective.all_gather(views[v][p].flatten(start_dim=2).contiguous(), grad=True)
            world_b = next(iter(gathered.values())).shape[0]
            offset = collective.rank_offset(b, device=device)
            rows = torch.arange(b, device=device) + offset
            sizes = [m.shape[2] * m.shape[3] for m in views[0]]
            directions = ((0, 1), (1, 0)) if self.bidirectional else ((0, 1),)
            # Draws per (direction, map): fixed order so every rank and the one-process run agree.
            draws = self._draw_locations(b, world_b, offset, [s for _ in directions for s in sizes], device)
            nces, regs = [], []
            self.last_anchor_locations = {}
            for n, (anchor_view, positive_view) in enumerate(directions):
                locations = draws[n * len(sizes):(n + 1) * len(sizes)]
                self.last_anchor_locations[anchor_view] = locations
                for a, p in self.comparisons:
                    anchors = self._anchor_vectors(views[anchor_view][a], locations[a])
                    nce, reg = amdim_nce(anchors, gathered[(positive_view, p)], rows, self.tclip)
                    nces.append(nce)
                    regs.append(reg)
            nce, reg = torch.stack(nces).mean(), torch.stack(regs).mean()
        if self.training:
            self.calls += 1
        self.last_terms = {"nce": nce.detach(), "regulariser": reg.detach()}
        return nce + reg
