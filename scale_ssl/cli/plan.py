"""``scale-ssl plan --config ... --world-size N``: what a run will look like at N ranks, before
it is launched (``run_plan.resolve_plan`` derives and checks; ``step_cost`` measures)."""

from __future__ import annotations

import math

from scale_ssl.cli.run_plan import RunPlan, resolve_plan
from scale_ssl.cli.step_cost import StepCost, measure_step_cost

GB = 1e9
MB = 1e6


def run_plan(args) -> RunPlan:
    from scale_ssl.config import load_config

    config = load_config(args.config, args.overrides)
    plan = resolve_plan(config, args.world_size, config_path=args.config)
    cost = None if args.no_measure else measure_step_cost(config, plan.world_size, plan.per_device_batch_size)
    print(format_plan(plan, cost, config.plan.device_memory_gb, args.bandwidth_gbps))
    return plan


def ring_wire_bytes(op: str, size: float, world: int) -> float:
    """Bytes each rank sends in a ring algorithm (NCCL's large-message case): all_reduce
    2(N-1)/N x S, all_gather and reduce_scatter (N-1)/N x S (S: the full result), broadcast S."""
    if world == 1:
        return 0.0
    if op == "all_reduce":
        return 2 * (world - 1) / world * size
    if op in ("all_gather", "reduce_scatter"):
        return (world - 1) / world * size
    return size


def format_plan(plan: RunPlan, cost: StepCost | None, device_memory_gb: float | None, bandwidth_gbps: float) -> str:
    nodes = f" = {plan.num_nodes} nodes x {plan.devices_per_node}" if plan.num_nodes else ""
    lines = [
        f"plan for {plan.config_path or 'config'}: {plan.method} on strategy={plan.strategy}, world size {plan.world_size}{nodes}",
        f"  global batch        {plan.global_batch_size} = {plan.per_device_batch_size}/device x {plan.world_size} ranks x "
        f"{plan.accumulate_grad_batches} accumulation",
        f"  samples per epoch   {plan.num_samples} (from {plan.samples_source})",
        f"  steps per epoch     {plan.steps_per_epoch} ({plan.samples_dropped_per_epoch} samples dropped per epoch so every rank "
        f"takes equal steps); {plan.total_steps} optimizer steps in the run",
        f"  learning rate       {plan.learning_rate:g} (rule {plan.lr_rule})" if plan.learning_rate is not None
        else "  learning rate       set by the method",
        f"  negatives / anchor  {plan.negatives_per_anchor}",
    ]
    if plan.queue_length:
        kind = "sharded over the ranks" if plan.queue_rows_per_rank < plan.queue_length else "replicated on every rank"
        lines.append(f"  queue               {plan.queue_length} rows, {kind}: {plan.queue_rows_per_rank} rows per rank")
    extra = {k: v for k, v in plan.method_figures.items() if k not in ("negatives_per_anchor", "queue_length")}
    for key, value in extra.items():
        lines.append(f"  {key:<19} {value}")
    if plan.deepspeed_config is not None:
        ds = plan.deepspeed_config
        lines.append(
            f"  deepspeed           ZeRO stage {ds.get('zero_optimization', {}).get('stage')}, train_batch_size "
            f"{ds['train_batch_size']} = {ds['train_micro_batch_size_per_gpu']} micro x {ds['gradient_accumulation_steps']} accum "
            f"x {plan.world_size}"
        )
    if cost is None:
        return "\n".join(lines)

    lines += [
        "  memory per device (estimate; method: scale_ssl/cli/step_cost.py)",
        f"    parameters        {cost.param_bytes / GB:8.3f} GB  ({cost.trainable_params / 1e6:.2f} M trained, "
        f"{cost.frozen_params / 1e6:.2f} M frozen/EMA, + buffers)",
        f"    gradients         {cost.grad_bytes / GB:8.3f} GB",
        f"    optimizer state   {cost.optimizer_bytes / GB:8.3f} GB",
        f"    activations       {cost.activation_bytes / GB:8.3f} GB  (saved for backward in one real forward at batch "
        f"{cost.batches_measured[0]} and {cost.batches_measured[1]}, extrapolated to {plan.per_device_batch_size})",
    ]
    if cost.queue_bytes:
        lines.append(f"    queue             {cost.queue_bytes / GB:8.3f} GB")
    fits = ""
    if device_memory_gb:
        share = cost.total_bytes / (device_memory_gb * GB)
        fits = f"  = {share:.0%} of {device_memory_gb:g} GB" + ("  ** DOES NOT FIT **" if share > 1 else "")
    lines.append(f"    total             {cost.total_bytes / GB:8.3f} GB{fits} (+ workspaces, fragmentation, runtime)")

    world = plan.world_size
    accumulate = plan.accumulate_grad_batches
    lines.append(
        f"  communication per optimizer step, per rank (ring wire bytes; time at {bandwidth_gbps:g} GB/s bus bandwidth)"
    )
    total_wire = 0.0
    rows = []
    for (site, op, phase), size in sorted(cost.collectives.items(), key=lambda item: -item[1]):
        wire = ring_wire_bytes(op, size, world) * accumulate
        rows.append((f"{op} {site} ({phase})", size * accumulate, wire))
    for what, size in cost.gradient_sync:
        op = "all_reduce" if "all_reduce" in what else ("reduce_scatter" if "reduce_scatter" in what else "all_gather")
        rows.append((what, size, ring_wire_bytes(op, size, world)))
    for label, size, wire in rows:
        total_wire += wire
        lines.append(f"    {label:<58} {size / MB:10.3f} MB  wire {wire / MB:10.3f} MB  {wire / (bandwidth_gbps * GB) * 1e3:8.3f} ms")
    calls = cost.calls_per_micro_batch * accumulate
    lines.append(
        f"    total wire {total_wire / MB:.1f} MB per step = {total_wire / (bandwidth_gbps * GB) * 1e3:.1f} ms at "
        f"{bandwidth_gbps:g} GB/s, before overlap with compute; plus "
        f"{calls} small collective calls in the step, each paying the link latency ~{2 * (world - 1)} times in a ring "
        f"(~{math.ceil(math.log2(max(world, 2)))} with a tree)"
    )
    return "\n".join(lines)
