"""An optimization recipe from the config: optimizer, parameter groups, schedule, lr scaling.

SSL papers differ mostly in their recipe, so a run can switch it from YAML without code::

    optim:
      optimizer: {name: LARS, momentum: 0.9, weight_decay: 1.0e-6}
      lr: {base: 0.3, scale: linear, reference_batch: 256}     # -> base x global_batch / 256
      exclude_bn_bias: true                                     # biases/norms/ViT tokens: no decay, no LARS
      layer_decay: 0.75                                         # ViT: lr x 0.75^(L + 1 - layer)
      param_groups:
        - {pattern: "projection.*", lr_scale: 10.0}
        - {pattern: "prototypes*", freeze_epochs: 1}
      lr_scheduler: {name: warmup_cosine, warmup: {epochs: 10}, start_lr: 0.0, final_lr: 0.0}
      swa: {start_epoch: 80, lr: 0.05, anneal_epochs: 5}

* ``optimizer.name`` is any ``torch.optim`` optimizer or ``LARS``; its keyword arguments are
  checked against the constructor's signature.
* ``lr`` is a number, or ``{base, scale: linear|sqrt|none, reference_batch}``: the effective lr
  is computed from the **global** batch (never the per-device batch, solo-learn #262).
* ``param_groups`` select parameters by ``fnmatch`` patterns on their names, first match wins;
  options: ``lr`` (absolute) or ``lr_scale``, ``weight_decay``, any optimizer option, and
  ``freeze_epochs`` (gradients zeroed while ``epoch < freeze_epochs``). A pattern matching no
  parameter is an error; every trainable parameter lands in exactly one group.
* ``exclude_bn_bias`` puts 1-D parameters (biases, norm weights), names containing ``bias``/``bn``
  and a ViT's ``pos_embedding``/``class_token`` in a group without weight decay or LARS adaptation.
* ``layer_decay`` (in (0, 1]) gives a ViT's parameters that no ``param_groups`` pattern claimed
  the lr ``lr x layer_decay^(L + 1 - layer)`` (``layer_decay.py``: layer 0 is the patch/position
  embedding and class token, block i is layer i + 1, the rest L + 1), one group per layer (and per
  decayed/excluded when ``exclude_bn_bias``); schedulers scale every group alike.
* ``lr_scheduler.name`` is ``warmup_cosine``, ``constant``, or any ``torch.optim.lr_scheduler``
  class (``SequentialLR``/``ChainedScheduler`` take ``schedulers: [...]``). A length written as
  ``{epochs: n}`` or ``{steps: n}`` is converted into the scheduler's ``interval`` unit with the
  stream's real steps per epoch; ``total_steps: auto`` means the whole fit. ``LambdaLR`` and
  ``MultiplicativeLR`` take a named ``rule`` instead of a callable (``named_rules.py``).
"""

from __future__ import annotations

import fnmatch
import inspect
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from scale_ssl.optim.lars import LARS
from scale_ssl.optim.layer_decay import layer_lr_scale, vit_layer_ids
from scale_ssl.optim.named_rules import LENGTH_ARGUMENTS, RULES_BY_SCHEDULER, RuleError, build_rule, split_rule
from scale_ssl.optim.param_groups import excluded_from_weight_decay
from scale_ssl.optim.warmup_cosine import WarmupCosineSchedule

LR_SCALES = ("linear", "sqrt", "none")
_RECIPE_KEYS = {"optimizer", "lr", "exclude_bn_bias", "layer_decay", "param_groups", "lr_scheduler", "swa"}
_GROUP_KEYS_OURS = {"pattern", "lr_scale", "freeze_epochs"}
_MAX_SIMULATED_STEPS = 5_000_000  # the banner's end-of-run lr: beyond this, only step 0 is shown


class RecipeError(ValueError):
    """A bad ``optim`` config value; the message names the key and the fix."""


def optimizer_classes() -> dict[str, type]:
    classes = {
        name: obj
        for name, obj in vars(torch.optim).items()
        if inspect.isclass(obj) and issubclass(obj, torch.optim.Optimizer) and obj is not torch.optim.Optimizer
    }
    classes["LARS"] = LARS
    return classes


def scheduler_classes() -> dict[str, type]:
    module = torch.optim.lr_scheduler
    return {
        name: obj
        for name, obj in vars(module).items()
        if inspect.isclass(obj) and (issubclass(obj, module.LRScheduler) or obj is module.ReduceLROnPlateau)
        and not name.startswith("_") and obj is not module.LRScheduler
    }


def effective_lr(lr: float | dict, global_batch: int) -> float:
    """``base x global_batch / reference_batch`` (linear), its square root (sqrt), or ``base``."""
    if isinstance(lr, (int, float)) and not isinstance(lr, bool):
        return float(lr)
    if not isinstance(lr, dict) or "base" not in lr:
        raise RecipeError(f"optim.lr must be a number or {{base, scale, reference_batch}}, got {lr!r}")
    unknown = set(lr) - {"base", "scale", "reference_batch"}
    if unknown:
        raise RecipeError(f"optim.lr has unknown keys {sorted(unknown)}; valid: base, scale, reference_batch")
    scale = lr.get("scale", "linear")
    if scale not in LR_SCALES:
        raise RecipeError(f"optim.lr.scale={scale!r}; use one of {LR_SCALES}")
    reference = lr.get("reference_batch", 256)
    if not isinstance(reference, int) or reference < 1:
        raise RecipeError(f"optim.lr.reference_batch must be an int >= 1, got {reference!r}")
    ratio = global_batch / reference
    factor = {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[scale]
    return float(lr["base"]) * factor


def check_kwargs(owner: str, cls: type, kwargs: dict, allowed_extra: set[str] = frozenset()) -> None:
    params = inspect.signature(cls.__init__).parameters
    valid = {n for n, p in params.items() if n not in ("self", "params", "optimizer") and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    unknown = set(kwargs) - valid - set(allowed_extra)
    if unknown:
        raise RecipeError(
            f"{owner}: {cls.__name__} has no argument(s) {sorted(unknown)}; valid arguments: {', '.join(sorted(valid))}"
        )


@dataclass
class BuiltRecipe:
    optimizer: torch.optim.Optimizer
    scheduler_config: dict | None
    effective_lr: float
    frozen: list[tuple[list[torch.nn.Parameter], int]] = field(default_factory=list)
    groups: list[dict] = field(default_factory=list)  # name, size, lr, weight_decay per group
    final_lrs: list[float] | None = None  # each group's lr at the last step, for the banner
    final_at: int | None = None


class OptimRecipe:
    """Validated at construction (no module needed); ``build`` makes the optimizer/scheduler."""

    def __init__(self, config: dict, global_batch_size: int):
        if not isinstance(config, dict):
            raise RecipeError(f"optim must be a mapping, got {type(config).__name__}")
        unknown = set(config) - _RECIPE_KEYS
        if unknown:
            raise RecipeError(f"optim has unknown keys {sorted(unknown)}; valid keys: {sorted(_RECIPE_KEYS)}")
        self.config = config
        optimizer = dict(config.get("optimizer") or {})
        if "name" not in optimizer:
            raise RecipeError("optim.optimizer.name is required, e.g. optim.optimizer.name=SGD (any torch.optim optimizer or LARS)")
        name = optimizer.pop("name")
        classes = optimizer_classes()
        if name not in classes:
            raise RecipeError(f"optim.optimizer.name={name!r} is not an optimizer; use one of {', '.join(sorted(classes))}")
        if "lr" in optimizer:
            raise RecipeError("give the learning rate as optim.lr (a number or {base, scale, reference_batch}), not optim.optimizer.lr")
        check_kwargs("optim.optimizer", classes[name], optimizer)
        self.optimizer_cls, self.optimizer_kwargs = classes[name], optimizer
        self.global_batch_size = global_batch_size
        self.lr = effective_lr(config.get("lr", 1e-3), global_batch_size)
        self.layer_decay = config.get("layer_decay")
        if self.layer_decay is not None and (isinstance(self.layer_decay, bool) or not isinstance(self.layer_decay, (int, float))
                                             or not 0 < self.layer_decay <= 1):
            raise RecipeError(f"optim.layer_decay must be a number in (0, 1] (BEiT/MAE: 0.65-0.75), got {self.layer_decay!r}")
        self.groups = list(config.get("param_groups") or [])
        for i, group in enumerate(self.groups):
            if "pattern" not in group:
                raise RecipeError(f"optim.param_groups[{i}] needs a 'pattern' (fnmatch on parameter names, e.g. 'projection.*')")
            check_kwargs(f"optim.param_groups[{i}]", self.optimizer_cls,
                         {k: v for k, v in group.items() if k not in _GROUP_KEYS_OURS and k not in ("lr", "weight_decay", "lars_adaptation")})
        scheduler = dict(config.get("lr_scheduler") or {"name": "constant"})
        self.interval = scheduler.pop("interval", "step")
        if self.interval not in ("step", "epoch"):
            raise RecipeError(f"optim.lr_scheduler.interval={self.interval!r}; use 'step' or 'epoch'")
        self.frequency = scheduler.pop("frequency", 1)
        self.monitor = scheduler.pop("monitor", None)
        self.scheduler_spec = scheduler
        _check_scheduler_spec(scheduler, "optim.lr_scheduler")
        self.swa = config.get("swa")
        if self.swa is not None:
            unknown = set(self.swa) - {"start_epoch", "lr", "anneal_epochs"}
            if unknown or "lr" not in self.swa:
                raise RecipeError("optim.swa takes {start_epoch, lr, anneal_epochs} and needs lr")

    # -- describing ----------------------------------------------------------------------------
    @staticmethod
    def describe(built: "BuiltRecipe") -> str:
        """A table of the groups: size, weight decay, and lr at step 0 / end of warmup / end."""
        scheduler = (built.scheduler_config or {}).get("scheduler")
        lambdas = getattr(scheduler, "lr_lambdas", None)
        warmup = getattr(scheduler, "warmup_steps", None)
        total = getattr(scheduler, "total_steps", None)
        lines = [f"optimization recipe: {type(built.optimizer).__name__}, effective lr {built.effective_lr:g} "
                 f"(from the global batch), schedule {type(scheduler).__name__ if scheduler else 'constant'}"]
        for i, (group, info) in enumerate(zip(built.optimizer.param_groups, built.groups)):
            base = group.get("initial_lr", group["lr"])
            if lambdas is not None and warmup is not None and total is not None:
                at = [base * lambdas[i](step) for step in (0, warmup, total)]
                lrs = f"lr {at[0]:.4g} @0 -> {at[1]:.4g} @{warmup} -> {at[2]:.4g} @{total}"
            elif built.final_lrs is not None:
                unit = "" if (built.scheduler_config or {}).get("interval", "step") == "step" else " epochs"
                lrs = f"lr {group['lr']:.4g} @0 -> {built.final_lrs[i]:.4g} @{built.final_at}{unit} (last)"
            else:
                lrs = f"lr {group['lr']:.4g} @0" + (" (then follows its monitor)" if scheduler is not None else "")
            lines.append(f"  group {info['name']:<16} {info['size']:>10,} params  wd {info['weight_decay']:g}  {lrs}")
        return "\n".join(lines)

    def _final_lrs(self, optimizer, steps_per_epoch, total_steps) -> tuple[list[float] | None, int | None]:
        """Each group's lr at the fit's last step (or epoch), by running the same schedule on a
        throwaway optimizer: any torch scheduler, without a closed form per class."""
        name = self.scheduler_spec["name"]
        if name in ("constant", "ReduceLROnPlateau"):
            return None, None  # constant: nothing to show; plateau: follows a metric
        units = total_steps if self.interval == "step" else total_steps // max(steps_per_epoch or 1, 1)
        if not 1 <= units <= _MAX_SIMULATED_STEPS:
            return None, None
        dummy = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": g["lr"], "momentum": 0.9}
                                 for g in optimizer.param_groups], lr=self.lr)
        scheduler = self._scheduler(self.scheduler_spec, dummy, steps_per_epoch, total_steps, "optim.lr_scheduler")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": intended here
            for _ in range(units - 1):
                scheduler.step()
        return [g["lr"] for g in dummy.param_groups], units - 1

    # -- building ------------------------------------------------------------------------------
    def build(self, module: torch.nn.Module, steps_per_epoch: int | None, total_steps: int) -> BuiltRecipe:
        groups, frozen, described = self._param_groups(module)
        optimizer = self.optimizer_cls(groups, lr=self.lr, **self.optimizer_kwargs)
        scheduler = self._scheduler(self.scheduler_spec, optimizer, steps_per_epoch, total_steps, "optim.lr_scheduler")
        config = None
        if scheduler is not None:
            config = {"scheduler": scheduler, "interval": self.interval, "frequency": self.frequency, "name": "lr"}
            if self.monitor is not None:
                config["monitor"] = self.monitor
        final_lrs, final_at = self._final_lrs(optimizer, steps_per_epoch, total_steps)
        return BuiltRecipe(optimizer, config, self.lr, frozen, described, final_lrs, final_at)

    def _param_groups(self, module):
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        assigned: dict[str, int] = {}
        for i, group in enumerate(self.groups):
            matched = [n for n, _ in named if n not in assigned and fnmatch.fnmatch(n, group["pattern"])]
            if not matched:
                names = ", ".join(n for n, _ in named[:8])
                raise RecipeError(
                    f"optim.param_groups[{i}].pattern={group['pattern']!r} matches no trainable parameter "
                    f"(left unassigned); parameter names look like: {names}, ..."
                )
            for n in matched:
                assigned[n] = i
        exclude = bool(self.config.get("exclude_bn_bias", False))
        base_decay = self.optimizer_kwargs.get("weight_decay", 0.0)
        out, frozen, described = [], [], []
        for i, group in enumerate(self.groups):
            params = [p for n, p in named if assigned.get(n) == i]
            options = {k: v for k, v in group.items() if k not in _GROUP_KEYS_OURS}
            if "lr_scale" in group:
                options["lr"] = self.lr * float(group["lr_scale"])
            out.append({"params": params, **options})
            described.append({"name": group["pattern"], "size": sum(p.numel() for p in params),
                              "lr": options.get("lr", self.lr), "weight_decay": options.get("weight_decay", base_decay)})
            if group.get("freeze_epochs"):
                frozen.append((params, int(group["freeze_epochs"])))
        rest = [(n, p) for n, p in named if n not in assigned]
        if self.layer_decay is not None and rest:
            layered, layered_described = self._layer_decay_groups(named, rest, exclude, base_decay)
            return out + layered, frozen, described + layered_described
        if exclude:
            no_decay = [p for n, p in rest if excluded_from_weight_decay(n, p)]
            decay = [p for n, p in rest if not excluded_from_weight_decay(n, p)]
            if decay:
                out.append({"params": decay})
                described.append({"name": "default", "size": sum(p.numel() for p in decay), "lr": self.lr, "weight_decay": base_decay})
            if no_decay:
                out.append({"params": no_decay, "weight_decay": 0.0, "lars_adaptation": False})
                described.append({"name": "bias_and_norm", "size": sum(p.numel() for p in no_decay), "lr": self.lr, "weight_decay": 0.0})
        elif rest:
            out.append({"params": [p for _, p in rest]})
            described.append({"name": "default", "size": sum(p.numel() for _, p in rest), "lr": self.lr, "weight_decay": base_decay})
        return out, frozen, described

    def _layer_decay_groups(self, named, rest, exclude: bool, base_decay: float):
        """One group per ViT layer (and per decayed/excluded with ``exclude_bn_bias``), in layer order."""
        try:
            ids, num_layers = vit_layer_ids(n for n, _ in named)
        except ValueError as err:
            raise RecipeError(f"optim.layer_decay: {err}") from None
        buckets: dict[tuple[int, bool], list] = {}
        for n, p in rest:
            buckets.setdefault((ids[n], exclude and excluded_from_weight_decay(n, p)), []).append(p)
        out, described = [], []
        for (layer, no_decay), params in sorted(buckets.items()):
            lr = self.lr * layer_lr_scale(layer, num_layers, self.layer_decay)
            group = {"params": params, "lr": lr}
            if no_decay:
                group.update(weight_decay=0.0, lars_adaptation=False)
            out.append(group)
            described.append({"name": f"layer_{layer}" + ("_no_decay" if no_decay else ""),
                              "size": sum(p.numel() for p in params), "lr": lr,
                              "weight_decay": 0.0 if no_decay else base_decay})
        return out, described

    def _scheduler(self, spec: dict, optimizer, steps_per_epoch, total_steps, where: str):
        spec = dict(spec)
        name = spec.pop("name")
        per_unit = self._units(steps_per_epoch, total_steps, where)
        if name == "constant":
            return None
        if name == "warmup_cosine":
            warmup = per_unit(spec.pop("warmup", {"steps": 0}), "warmup")
            total = per_unit(spec.pop("total", "auto"), "total")
            return WarmupCosineSchedule(optimizer, min(warmup, total), total, **spec)
        cls = scheduler_classes()[name]
        if name in ("SequentialLR", "ChainedScheduler"):
            children = [self._scheduler(child, optimizer, steps_per_epoch, total_steps, f"{where}.schedulers[{i}]")
                        for i, child in enumerate(spec.pop("schedulers"))]
            if name == "SequentialLR":
                spec["milestones"] = [per_unit(m, "milestones") for m in spec.get("milestones", [])]
                return cls(optimizer, children, **spec)
            return cls(children, optimizer=optimizer)
        if name in RULES_BY_SCHEDULER:
            rule, args = split_rule(name, spec.pop("rule", "constant" if name == "LambdaLR" else None))
            args = {k: per_unit(v, f"rule.{k}") if k in LENGTH_ARGUMENTS else v for k, v in args.items()}
            try:
                spec["lr_lambda"] = build_rule(name, rule, args)
            except RuleError as err:
                raise RecipeError(f"{where}: {err}") from None
        converted = {k: per_unit(v, k) for k, v in spec.items()}
        return cls(optimizer, **converted)

    def _units(self, steps_per_epoch, total_steps, where):
        def convert(value, key):
            if value == "auto":
                return total_steps if self.interval == "step" else max(1, total_steps // max(steps_per_epoch or 1, 1))
            if isinstance(value, dict) and set(value) <= {"epochs", "steps"} and len(value) == 1:
                if "epochs" in value:
                    if self.interval == "epoch":
                        return int(value["epochs"])
                    if not steps_per_epoch:
                        raise RecipeError(f"{where}.{key}: a length in epochs needs a training stream with a length")
                    return int(round(value["epochs"] * steps_per_epoch))
                if self.interval == "step":
                    return int(value["steps"])
                raise RecipeError(f"{where}.{key}: a length in steps needs optim.lr_scheduler.interval=step")
            return value

        return convert


def _check_scheduler_spec(spec: dict, where: str) -> None:
    name = spec.get("name")
    if name is None:
        raise RecipeError(f"{where}.name is required (warmup_cosine, constant, or a torch.optim.lr_scheduler class)")
    if name in ("constant",):
        if set(spec) - {"name"}:
            raise RecipeError(f"{where}: 'constant' takes no arguments")
        return
    if name == "warmup_cosine":
        unknown = set(spec) - {"name", "warmup", "total", "start_lr", "final_lr"}
        if unknown:
            raise RecipeError(f"{where}: warmup_cosine has no argument(s) {sorted(unknown)}; valid: warmup, total, start_lr, final_lr")
        return
    classes = scheduler_classes()
    if name not in classes:
        raise RecipeError(f"{where}.name={name!r} is not a scheduler; use warmup_cosine, constant or one of {', '.join(sorted(classes))}")
    args = {k: v for k, v in spec.items() if k != "name"}
    if name in RULES_BY_SCHEDULER:
        if name == "MultiplicativeLR" and "rule" not in args:
            raise RecipeError(f"{where}: MultiplicativeLR needs a named rule, e.g. rule: {{name: constant_factor, factor: 0.95}}")
        try:
            split_rule(name, args.pop("rule", "constant"))
        except RuleError as err:
            raise RecipeError(f"{where}: {err}") from None
        check_kwargs(where, classes[name], args)
        return
    if name in ("SequentialLR", "ChainedScheduler"):
        children = args.pop("schedulers", None)
        if not children:
            raise RecipeError(f"{where}: {name} needs 'schedulers: [...]'")
        for i, child in enumerate(children):
            _check_scheduler_spec(dict(child), f"{where}.schedulers[{i}]")
        check_kwargs(where, classes[name], args, allowed_extra={"schedulers"})
        return
    check_kwargs(where, classes[name], args)
