"""Named lr rules for ``LambdaLR`` and ``MultiplicativeLR``, so both are reachable from YAML.

Both schedulers take a Python callable, which a config cannot hold; a recipe names a rule
instead (``rule: linear_warmup`` or ``rule: {name: polynomial, total: auto, power: 2}``).
t counts the scheduler's unit (optimizer steps for ``interval: step``, epochs for ``epoch``);
lengths are given like every other recipe length: ``{steps: n}``, ``{epochs: n}`` or ``auto``
(the whole fit), converted before the rule is built.

``LambdaLR`` rules, the multiplier f(t) of each group's base lr:

    constant                     f(t) = 1
    linear_warmup {warmup=W}     f(t) = min(1, (t + 1) / W)                 (Goyal et al. 2017)
    inverse_sqrt {warmup=W}      f(t) = min((t + 1) / W, sqrt(W / (t + 1)))  (Vaswani et al. 2017)
    polynomial {total=T, power=p} f(t) = max(0, 1 - t / T) ** p             (DeepLab's "poly")

``MultiplicativeLR`` rules, the factor m(t) applied to the current lr at each step:

    constant_factor {factor=g}   m(t) = g   (lr_t = lr_0 * g**t, ExponentialLR's schedule)

Each rule is an object with plain attributes, not a closure: ``LambdaLR.state_dict()`` saves
an object's attributes and skips functions, so a resumed run uses the checkpoint's rule.
"""

from __future__ import annotations

import math


class RuleError(ValueError):
    """A bad ``rule`` in an lr scheduler spec; the recipe re-raises it naming the config key."""


class ConstantFactor:
    """f(t) = value: a constant multiplier (``LambdaLR``) or a constant decay (``MultiplicativeLR``)."""

    def __init__(self, value: float = 1.0):
        self.value = float(value)

    def __call__(self, t: int) -> float:
        return self.value


class LinearWarmup:
    """f(t) = min(1, (t + 1) / warmup): the first step already trains at lr / warmup."""

    def __init__(self, warmup: int):
        self.warmup = warmup

    def __call__(self, t: int) -> float:
        return min(1.0, (t + 1) / self.warmup)


class InverseSqrt:
    """f(t) = min((t + 1) / warmup, sqrt(warmup / (t + 1))): linear warmup, then 1/sqrt(t) decay."""

    def __init__(self, warmup: int):
        self.warmup = warmup

    def __call__(self, t: int) -> float:
        return min((t + 1) / self.warmup, math.sqrt(self.warmup / (t + 1)))


class Polynomial:
    """f(t) = max(0, 1 - t / total) ** power."""

    def __init__(self, total: int, power: float = 1.0):
        self.total, self.power = total, float(power)

    def __call__(self, t: int) -> float:
        return max(0.0, 1.0 - t / self.total) ** self.power


# name -> (class, {argument: required?}), per scheduler
LAMBDA_RULES = {
    "constant": (ConstantFactor, {}),
    "linear_warmup": (LinearWarmup, {"warmup": True}),
    "inverse_sqrt": (InverseSqrt, {"warmup": True}),
    "polynomial": (Polynomial, {"total": True, "power": False}),
}
MULTIPLICATIVE_RULES = {"constant_factor": (ConstantFactor, {"factor": True})}
RULES_BY_SCHEDULER = {"LambdaLR": LAMBDA_RULES, "MultiplicativeLR": MULTIPLICATIVE_RULES}
LENGTH_ARGUMENTS = ("warmup", "total")  # given as {steps: n} / {epochs: n} / auto


def split_rule(scheduler: str, rule) -> tuple[str, dict]:
    """``rule`` as written (a name or ``{name, **arguments}``) -> (name, arguments), checked."""
    rules = RULES_BY_SCHEDULER[scheduler]
    if isinstance(rule, str):
        name, args = rule, {}
    elif isinstance(rule, dict) and "name" in rule:
        args = dict(rule)
        name = args.pop("name")
    else:
        raise RuleError(f"rule must be a name or {{name: ..., arguments}}, got {rule!r}; {scheduler} rules: {sorted(rules)}")
    if name not in rules:
        raise RuleError(f"rule={name!r} is not a {scheduler} rule; use one of {sorted(rules)} (formulas: scale_ssl/optim/named_rules.py)")
    accepted = rules[name][1]
    unknown = set(args) - set(accepted)
    if unknown:
        raise RuleError(f"rule {name!r} has no argument(s) {sorted(unknown)}; valid: {sorted(accepted) or 'none'}")
    missing = [a for a, required in accepted.items() if required and a not in args]
    if missing:
        raise RuleError(f"rule {name!r} needs {missing}, e.g. rule: {{name: {name}, {missing[0]}: ...}}")
    return name, args


def build_rule(scheduler: str, name: str, args: dict):
    """The callable for ``lr_lambda`` from a checked name and converted arguments."""
    cls = RULES_BY_SCHEDULER[scheduler][name][0]
    for key in LENGTH_ARGUMENTS:
        if key in args and (isinstance(args[key], bool) or not isinstance(args[key], int) or args[key] < 1):
            raise RuleError(f"rule {name!r}: {key} must be a length >= 1 ({{steps: n}}, {{epochs: n}} or auto), got {args[key]!r}")
    if "factor" in args:
        return cls(float(args["factor"]))
    return cls(**args)
