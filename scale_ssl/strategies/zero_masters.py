"""Where DeepSpeed keeps the weights its optimizer updates, and how to read, write or hold them.

With ZeRO (and with bf16 at stage 0) the optimizer does not step the module's parameters: it steps
fp32 *master* copies, flattened per parameter group and, from stage 1 on, partitioned over ranks.
After each step DeepSpeed copies them back into the module (in bf16 under bf16; and under ZeRO-3
each rank keeps only its shard outside forward). Code that touches weights outside forward must
therefore use the master copy:

* reading a parameter's full fp32 value (BYOL/MoCo's EMA reads the online network): every rank
  writes the pieces it holds into a zero buffer, one all-reduce (sum) completes it;
* writing one (SwAV's prototype normalisation): every rank has the full value, copies its pieces
  into the master copy and the module's working copy (the whole parameter, or its ZeRO-3 shard
  and, for parameters ZeRO-3 keeps gathered, the whole one too);
* keeping a parameter out of one step (SwAV's prototype freeze): its pieces of the master copy,
  of the per-element optimizer state and of the working copy are saved before the engine's step
  and put back after it, bitwise;
* LARS's per-layer trust ratio: the layout of each flat partition (which piece of which parameter
  sits where), so LARS can sum squared norms per original parameter across partition boundaries.

The four layouts DeepSpeed 0.19 uses: the torch optimizer on the module's own parameters (stage 0,
fp32: nothing to map), one flat fp32 copy per group on every rank (``FP16_Optimizer``, stage 0
bf16), flat fp32 partitions addressed by each parameter's ``_hp_mapping`` (stages 1-2:
``DeepSpeedZeroOptimizer``, ``BF16_Optimizer``), and per-parameter shards packed per sub-group
(stage 3). Anything else is refused with an error rather than guessed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from scale_ssl.optim.lars import LARS, FlatShardLayout


def working_parts(p: nn.Parameter) -> list[tuple[torch.Tensor, int, int]]:
    """Where the module holds ``p`` on this rank: ``(flat view, start in the flattened full
    parameter, length)``. Stages 0-2: the whole parameter. Stage 3: this rank's shard, and the
    whole parameter too while it is gathered (always, for the small parameters ZeRO-3 keeps
    "persistent": whole on every rank, re-gathered from the shards after each step)."""
    if not hasattr(p, "ds_id"):
        return [(p.data.view(-1), 0, p.numel())]
    import torch.distributed as dist

    parts = []
    shard = p.partition_numel()
    rank = dist.get_rank(group=p.ds_process_group)
    valid = max(0, min(shard, p.ds_numel - rank * shard))
    if valid:
        parts.append((p.ds_tensor.data.view(-1).narrow(0, 0, valid), rank * shard, valid))
    if p.data.numel() == p.ds_numel:
        parts.append((p.data.view(-1), 0, p.ds_numel))
    return parts


def _whole_working_copy(p: nn.Parameter) -> torch.Tensor:
    if hasattr(p, "ds_id") and p.data.numel() != p.ds_numel:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            return p.data.detach().clone()
    return p.data.detach().clone()


@dataclass
class Piece:
    """This rank's piece of one parameter's master copy."""

    flat: torch.Tensor  # the optimizer's flat fp32 tensor holding it
    flat_start: int  # where the piece starts in ``flat``
    length: int  # elements of the parameter in the piece (padding excluded)
    param_start: int  # where the piece starts in the flattened full parameter

    @property
    def master(self) -> torch.Tensor:
        return self.flat.narrow(0, self.flat_start, self.length)


class ZeroMasterWeights:
    """The master-weight map of one DeepSpeed engine (see the module docstring).

    Args:
        engine: the initialised ``DeepSpeedEngine``.
        all_reduce_sum: ``tensor -> tensor`` summed over the data-parallel ranks.
    """

    def __init__(self, engine, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]):
        self.all_reduce_sum = all_reduce_sum
        self.torch_optimizer = engine.basic_optimizer if hasattr(engine, "basic_optimizer") else engine.optimizer
        self.pieces: dict[int, Piece] = {}
        self.layouts: list[tuple[torch.Tensor, FlatShardLayout]] = []
        self.sharded = False  # masters partitioned over ranks (else every rank holds all of them)
        self.working_is_master = False  # the module's (full) parameters equal the masters bitwise
        self._trained_ids: set[int] | None = None
        self.kept: dict[int, torch.Tensor] = {}  # fp32 values we hold for parameters the optimizer does not step
        self.kind = self._map(engine.optimizer)

    # -- building the map -----------------------------------------------------------------------
    def _map(self, wrapper) -> str:
        from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
        from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        if isinstance(wrapper, DeepSpeedZeroOptimizer_Stage3):
            self._map_stage3(wrapper)
            return "zero3"
        if isinstance(wrapper, DeepSpeedZeroOptimizer):
            self._map_fragments(wrapper.bit16_groups, wrapper.single_partition_of_fp32_groups)
            self.working_is_master = wrapper.dtype == torch.float32
            return "partitioned"
        if isinstance(wrapper, BF16_Optimizer):
            self._map_fragments(wrapper.bf16_groups, wrapper.fp32_groups_flat_partition)
            return "partitioned"
        if isinstance(wrapper, FP16_Optimizer):
            self._map_replicated(wrapper.fp16_groups, wrapper.fp32_groups_flat)
            return "replicated"
        if isinstance(wrapper, torch.optim.Optimizer):
            self.working_is_master = True
            return "module"  # stage 0 fp32: the torch optimizer steps the module's parameters
        raise ValueError(
            f"strategy=deepspeed: the engine wraps the optimizer in {type(wrapper).__name__}, whose master weights "
            "scale_ssl cannot locate (needed for EMA targets, SwAV's prototypes and LARS); use zero_stage 0-3 with "
            "fp32 or bf16 and a torch optimizer"
        )

    def _map_fragments(self, groups: Sequence[Sequence[nn.Parameter]], flats: Sequence[torch.Tensor]) -> None:
        """Stages 1-2: ``param._hp_mapping`` addresses the piece of ``flats[group]`` (or is None)."""
        self.sharded = True
        for index, (params, flat) in enumerate(zip(groups, flats)):
            pieces = []
            for owner, p in enumerate(params):
                mapping = getattr(p, "_hp_mapping", None)
                if mapping is None:
                    continue
                if mapping.param_group_index != index:
                    raise ValueError("strategy=deepspeed: a parameter's ZeRO mapping points at another group")
                hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
                self.pieces[id(p)] = Piece(flat, hp.start, hp.numel, lp.start)
                pieces.append((owner, hp.start, hp.numel))
            self.layouts.append((flat, FlatShardLayout(tuple(params), tuple(pieces))))

    def _map_replicated(self, groups: Sequence[Sequence[nn.Parameter]], flats: Sequence[torch.Tensor]) -> None:
        """Stage 0 bf16: each group's flat fp32 copy is the concatenation of its parameters."""
        for params, flat in zip(groups, flats):
            pieces, offset = [], 0
            for owner, p in enumerate(params):
                self.pieces[id(p)] = Piece(flat, offset, p.numel(), 0)
                pieces.append((owner, offset, p.numel()))
                offset += p.numel()
            self.layouts.append((flat, FlatShardLayout(tuple(params), tuple(pieces))))

    def _map_stage3(self, opt) -> None:
        """Stage 3: each parameter is cut into equal shards over the ranks (the last one padded);
        a sub-group's flat fp32 partition packs this rank's shards in order."""
        import torch.distributed as dist

        if getattr(opt, "optimizer_swapper", None) is not None:
            raise ValueError("strategy=deepspeed: ZeRO-3 optimizer state swapped to NVMe is not supported; offload to cpu")
        self.sharded = True
        for sub_group, (params, flat) in enumerate(zip(opt.fp16_groups, opt.fp32_partitioned_groups_flat)):
            rank = dist.get_rank(group=opt._get_sub_group_process_group(sub_group))
            pieces, offset = [], 0
            for owner, p in enumerate(params):
                shard = p.partition_numel()
                valid = max(0, min(shard, p.ds_numel - rank * shard))
                if valid:
                    self.pieces[id(p)] = Piece(flat, offset, valid, rank * shard)
                    pieces.append((owner, offset, valid))
                offset += shard
            self.layouts.append((flat, FlatShardLayout(tuple(params), tuple(pieces))))

    def keep_fp32(self, params: Sequence[nn.Parameter], values: Sequence[torch.Tensor]) -> None:
        """Hold whole fp32 values for ``params``, which the optimizer does not step (EMA targets):
        ``full`` returns them, ``write`` updates them and the module's working copy."""
        for p, value in zip(params, values):
            if self._trained(p):
                raise ValueError("strategy=deepspeed: an EMA target parameter is also trained by the optimizer")
            self.kept[id(p)] = value.detach().float().reshape(self._full_shape(p)).clone()
        self.write(params, [self.kept[id(p)] for p in params])

    # -- reading and writing ----------------------------------------------------------------------
    def _trained(self, p: nn.Parameter) -> bool:
        """Whether the optimizer steps ``p`` (it has a master copy, on some rank)."""
        if self._trained_ids is None:
            self._trained_ids = {id(q) for _, layout in self.layouts for q in layout.params}
        return id(p) in self._trained_ids

    @staticmethod
    def _full_shape(p: nn.Parameter) -> torch.Size:
        return p.ds_shape if hasattr(p, "ds_shape") else p.shape

    def full(self, params: Sequence[nn.Parameter]) -> list[torch.Tensor]:
        """Full fp32 master values of ``params`` (a collective when the masters are partitioned).
        Values we keep (``keep_fp32``) are returned as they are held: updating them in place and
        passing them to ``write`` refreshes the working copy."""
        if self.kept and all(id(p) in self.kept for p in params):
            return [self.kept[id(p)] for p in params]
        if any(id(p) in self.kept for p in params):
            raise ValueError("strategy=deepspeed: read EMA targets and trained parameters in separate calls")
        if self.working_is_master:
            return [p.detach() for p in params]
        trained = [self._trained(p) for p in params]
        sizes = [int(torch.Size(self._full_shape(p)).numel()) if t else 0 for p, t in zip(params, trained)]
        buffer = torch.zeros(sum(sizes), dtype=torch.float32, device=self._device(params))
        offset = 0
        for p, size in zip(params, sizes):
            piece = self.pieces.get(id(p))
            if size and piece is not None:
                buffer.narrow(0, offset + piece.param_start, piece.length).copy_(piece.master)
            offset += size
        if self.sharded and buffer.numel():
            buffer = self.all_reduce_sum(buffer)
        out, offset = [], 0
        for p, size, t in zip(params, sizes, trained):
            if t:
                out.append(buffer.narrow(0, offset, size).view(self._full_shape(p)))
            else:
                out.append(self._untrained_value(p))
            offset += size
        return out

    def _untrained_value(self, p: nn.Parameter) -> torch.Tensor:
        """A parameter the optimizer does not step (frozen inside the engine): its module value."""
        if hasattr(p, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                return p.detach().float().clone()
        return p.detach().float()

    def write(self, params: Sequence[nn.Parameter], values: Sequence[torch.Tensor]) -> None:
        """Put full values (identical on every rank) into the masters and the module's copy."""
        with torch.no_grad():
            for p, value in zip(params, values):
                if id(p) in self.kept:
                    kept = self.kept[id(p)]
                    if value.data_ptr() != kept.data_ptr():
                        kept.copy_(value.detach().reshape(kept.shape))
                    value = kept
                elif hasattr(p, "ds_id") and not self._trained(p):
                    raise ValueError("strategy=deepspeed: writing a ZeRO-3 parameter the optimizer does not train")
                flat_value = value.detach().reshape(-1)
                piece = self.pieces.get(id(p))
                if piece is not None:
                    piece.master.copy_(flat_value.narrow(0, piece.param_start, piece.length).to(piece.flat.dtype))
                for view, start, length in working_parts(p):
                    view.copy_(flat_value.narrow(0, start, length).to(view.dtype))

    def _device(self, params) -> torch.device:
        for p in params:
            return p.device
        return torch.device("cpu")

    # -- one step without some parameters ----------------------------------------------------------
    def check_can_hold(self) -> None:
        """Holding parameters out of a step restores their pieces of the per-element optimizer
        state; a state shared by a whole flat partition (Adam's step count) cannot be split."""
        opt = self.torch_optimizer
        if isinstance(opt, LARS):
            return
        if isinstance(opt, torch.optim.SGD) and all(g.get("dampening", 0) == 0 for g in opt.param_groups):
            return
        raise ValueError(
            f"parameters frozen for some epochs (SwAV's model.freeze_prototypes_epochs, optim.param_groups[*]."
            f"freeze_epochs) under strategy=deepspeed with zero_stage >= 1 or bf16 need an optimizer whose state is "
            f"per element (LARS, or SGD without dampening): {type(opt).__name__}'s state includes a step count shared by "
            "the whole ZeRO partition, so a frozen parameter could not start its own count when it thaws; use "
            "optimizer lars/sgd, or trainer.zero_stage=0 with precision 32, or strategy=ddp"
        )

    def hold(self, params: Sequence[nn.Parameter]) -> list:
        """Everything a step could change about ``params`` on this rank (a collective under
        ZeRO-3 for parameters not gathered at the time: the whole working copy is kept, because
        the step may leave a parameter gathered that was not, or the other way round)."""
        held = []
        for p in params:
            piece = self.pieces.get(id(p))
            state = {}
            if piece is not None:
                for key, value in self.torch_optimizer.state.get(piece.flat, {}).items():
                    if isinstance(value, torch.Tensor) and value.shape == piece.flat.shape:
                        state[key] = value.narrow(0, piece.flat_start, piece.length).clone()
            master = piece.master.clone() if piece is not None else None
            held.append((p, piece, master, state, _whole_working_copy(p)))
        return held

    def restore(self, held: list) -> None:
        """Put back what ``hold`` saved; optimizer state created by the step meanwhile is zeroed
        for these pieces (the state they would have had without the step: none)."""
        with torch.no_grad():
            for p, piece, master, state, working in held:
                if piece is not None:
                    piece.master.copy_(master)
                    for key, value in self.torch_optimizer.state.get(piece.flat, {}).items():
                        if isinstance(value, torch.Tensor) and value.shape == piece.flat.shape:
                            target = value.narrow(0, piece.flat_start, piece.length)
                            target.copy_(state[key]) if key in state else target.zero_()
                flat_working = working.reshape(-1)
                for view, start, length in working_parts(p):
                    view.copy_(flat_working.narrow(0, start, length))

    # -- LARS ------------------------------------------------------------------------------------
    def configure_lars(self) -> None:
        """Give a LARS optimizer the layout of every flat partition it will step."""
        if isinstance(self.torch_optimizer, LARS) and self.kind != "module":
            if self.kind == "zero3" and self.torch_optimizer.exclude_from_adaptation is not None:
                raise ValueError(
                    "LARS(exclude_from_adaptation=...) under strategy=deepspeed with zero_stage=3: ZeRO-3 empties "
                    "every parameter outside forward, so a callable that looks at a parameter's shape or values "
                    "cannot tell a bias from a weight; exclude with parameter groups instead "
                    "(scale_ssl.optim.exclude_bn_bias_groups, or exclude_bn_bias: true), or use zero_stage <= 2"
                )
            self.torch_optimizer.use_flat_shards(
                {id(flat): layout for flat, layout in self.layouts},
                self.all_reduce_sum if self.sharded else None,
            )
