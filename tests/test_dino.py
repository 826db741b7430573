"""DINO: the loss equals its formula; its center is the global-batch mean, so 2 and 4 gloo ranks
equal one process on the loss, the gradients and the center (and a local-only center is caught);
the whole method (ViT student/teacher, multi-crop, AdamW with the weight-decay schedule, clipping,
EMA) on 2 DDP ranks equals one process; resume is exact; the schedules, the last-layer freeze and
the per-parameter clipping act as the paper's code; the center and the teacher stay fp32."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scale_ssl.collectives import LocalCollective, TorchDistributedCollective
from scale_ssl.losses import DINOLoss
from scale_ssl.methods import DINO
from scale_ssl.strategies import DDPStrategy
from scale_ssl.trainer import Callback, Trainer
from scale_ssl.trainer.seed import seed_everything
from tests.distributed import run_on_ranks

K = 24  # out_dim
B = 8  # global batch
CROPS = (2, 2)  # 2 global + 2 local
# fp32 throughout: the loss, gradients and center of N ranks and one process agree to round-off
# (a sum over 8 rows in another order, ~1e-7 relative), far below this bound.
REL_TOL = 1e-5


# -- the loss on its own -------------------------------------------------------------------------------
def plain_dino_loss(student, teacher, center, tau_s, tau_t, g):
    """The paper's Algorithm 1, written as loops: every (teacher crop, other student crop) pair."""
    b = teacher.shape[0] // g
    s = student.chunk(student.shape[0] // b)
    t = F.softmax((teacher - center) / tau_t, dim=-1).chunk(g)
    total, terms = 0.0, 0
    for iq, q in enumerate(t):
        for v, sv in enumerate(s):
            if v == iq:
                continue
            total = total + torch.sum(-q * F.log_softmax(sv / tau_s, dim=-1), dim=-1).mean()
            terms += 1
    return total / terms


def test_loss_equals_the_formula_and_the_center_its_ema():
    g = torch.Generator().manual_seed(0)
    loss_fn = DINOLoss(K, num_global_crops=2, student_temp=0.1, center_momentum=0.9, collective=LocalCollective())
    center = torch.zeros(1, K)
    for step in range(3):
        student = torch.randn(4 * B, K, generator=g, requires_grad=True)
        teacher = torch.randn(2 * B, K, generator=g)
        reference = plain_dino_loss(student, teacher, center, 0.1, 0.05, 2)
        loss = loss_fn(student, teacher, 0.05)
        torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)
        (grad,) = torch.autograd.grad(loss, student)
        (ref_grad,) = torch.autograd.grad(reference, student)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-8)
        center = 0.9 * center + 0.1 * teacher.mean(dim=0, keepdim=True)  # updated after the loss
        torch.testing.assert_close(loss_fn.center, center, rtol=1e-6, atol=1e-7)
    assert loss_fn.center.dtype == torch.float32 and "center" in loss_fn.state_dict()


def test_loss_arguments_are_checked():
    with pytest.raises(ValueError, match="student_temp must be a number > 0"):
        DINOLoss(K, student_temp=0)
    with pytest.raises(ValueError, match=r"center_momentum must be in \[0, 1\)"):
        DINOLoss(K, center_momentum=1.0)
    loss_fn = DINOLoss(K, num_global_crops=2)
    with pytest.raises(ValueError, match=r"teacher_logits must be \(num_global_crops \* batch, out_dim\)"):
        loss_fn(torch.randn(8, K), torch.randn(3, K), 0.04)
    with pytest.raises(ValueError, match="the student sees 1 crop"):
        loss_fn(torch.randn(4, K), torch.randn(8, K), 0.04)


def global_problem(steps: int = 3):
    """Per step: student inputs (V, B, 6) and teacher logits (G, B, K) of the global batch."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(sum(CROPS), B, 6, generator=g), 3 * torch.randn(CROPS[0], B, K, generator=g)) for _ in range(steps)]


def tiny_student() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, K))


def run_loss_steps(model, loss_fn, problem, rows: slice, step_fn) -> list:
    """3 steps of: student logits of ``rows`` of every crop, the loss, backward, record, SGD."""
    out = []
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for inputs, teacher in problem:
        student = model(inputs[:, rows].reshape(-1, inputs.shape[-1]))
        loss = loss_fn(student, teacher[:, rows].reshape(-1, K), 0.04)
        loss_value = step_fn(loss)
        grads = {n.removeprefix("module."): p.grad.clone() for n, p in model.named_parameters()}  # DDP: module.*
        out.append((loss_value, grads, loss_fn.center.clone()))
        optimizer.step()
        optimizer.zero_grad()
    return out


def one_process_reference() -> list:
    def backward(loss):
        loss.backward()
        return loss.item()

    return run_loss_steps(tiny_student(), DINOLoss(K, CROPS[0], collective=LocalCollective()), global_problem(),
                          slice(None), backward)


def _loss_rank(rank: int, world: int, with_local_center: bool) -> tuple[list, list | None]:
    """The global center (what DINOLoss does), and, if asked, the broken variant in which each
    rank centres with its own rows only (a loss without the all-reduce)."""
    strategy = DDPStrategy(accelerator="cpu")
    strategy.setup_environment()
    b = B // world
    rows = slice(rank * b, (rank + 1) * b)

    def backward(loss):
        strategy.backward(loss)  # DDP averages the gradients over the ranks
        return strategy.reduce(loss.detach(), op="mean").item()

    results = []
    for collective in [TorchDistributedCollective()] + ([LocalCollective()] if with_local_center else []):
        wrapped = strategy.setup_module(tiny_student())
        results.append(run_loss_steps(wrapped, DINOLoss(K, CROPS[0], collective=collective), global_problem(), rows, backward))
    return results[0], (results[1] if with_local_center else None)


def _max_rel(got: dict, ref: dict) -> float:
    scale = max(v.abs().max().item() for v in ref.values())
    return max((got[k] - ref[k]).abs().max().item() for k in ref) / scale


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 4])
def test_center_loss_and_gradients_on_n_ranks_equal_one_process_and_a_local_center_is_caught(world):
    reference = one_process_reference()
    results = run_on_ranks(_loss_rank, world, world == 2)
    for rank, (steps, _) in enumerate(results):
        for step, ((loss, grads, center), (ref_loss, ref_grads, ref_center)) in enumerate(zip(steps, reference)):
            assert math.isclose(loss, ref_loss, rel_tol=REL_TOL), (world, rank, step, loss, ref_loss)
            assert _max_rel(grads, ref_grads) < REL_TOL, (world, rank, step)
            torch.testing.assert_close(center, ref_center, rtol=REL_TOL, atol=1e-7)
    assert reference[1][2].abs().max() > 0.1  # the center moved, and steps 2-3 used it
    if world == 2:
        # The break-check: with each rank centring on its own rows the same comparisons fail by far
        # more than the tolerance (center, then the losses and gradients that use it).
        loss, grads, center = results[0][1][2]
        ref_loss, ref_grads, ref_center = reference[2]
        assert (center - ref_center).abs().max() > 100 * REL_TOL * ref_center.abs().max()
        assert abs(loss - ref_loss) > 10 * REL_TOL * abs(ref_loss)
        assert _max_rel(grads, ref_grads) > 10 * REL_TOL


# -- the method ----------------------------------------------------------------------------------------
def make_dino(**overrides) -> DINO:
    seed_everything(11)
    kwargs = dict(arch="vit_mini_4", in_channels=1, encoder_options={"image_size": 16}, out_dim=K, hidden_dim=32,
                  bottleneck_dim=16, num_crops=CROPS, learning_rate=1e-3, min_lr=1e-5, warmup_steps=1,
                  warmup_teacher_temp=0.02, teacher_temp=0.05, warmup_teacher_temp_steps=2, momentum_teacher=0.9,
                  weight_decay=0.04, weight_decay_end=0.4, clip_grad=3.0, freeze_last_layer=0)
    kwargs.update(overrides)
    return DINO(**kwargs)


def make_batches(steps: int, b: int = B) -> list:
    g = torch.Generator().manual_seed(4)
    out = []
    for _ in range(steps):
        image = torch.randn(b, 1, 16, 16, generator=g)
        crops = (image, image.flip(-1) + 0.3 * torch.randn(b, 1, 16, 16, generator=g),
                 image[..., :8, :8] + 0.3 * torch.randn(b, 1, 8, 8, generator=g),
                 image[..., 8:, 8:] + 0.3 * torch.randn(b, 1, 8, 8, generator=g))
        out.append((crops, torch.zeros(b, dtype=torch.long)))
    return out


def quiet(strategy, max_steps, root=None, callbacks=(), **kwargs):
    return Trainer(strategy=strategy, max_steps=max_steps, logger=False, enable_progress_bar=False, log_every_n_steps=1,
                   enable_checkpointing=root is not None, default_root_dir=str(root or "unused"), callbacks=list(callbacks),
                   **kwargs)


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


STEPS = 3
# The whole recipe but AdamW: Adam divides every gradient element by its own magnitude, so an
# element whose true gradient is zero (the attention's key bias, which the softmax cancels exactly)
# turns fp32 round-off (~1e-7 of the largest gradient) into a step of +-lr: no tolerance bounds
# that, on one process vs two or between two single-process runs of another summation order. The
# distributed parts (center, gradients) do not depend on the optimizer; AdamW is in the resume test.
EQUIVALENCE = dict(optimizer="sgd", learning_rate=0.05, min_lr=0.0005)


def _method_rank(rank: int, world: int) -> tuple[dict, list]:
    model = make_dino(**EQUIVALENCE)
    b = B // world
    sl = slice(rank * b, (rank + 1) * b)
    batches = [(tuple(c[sl] for c in crops), y[sl]) for crops, y in make_batches(STEPS)]
    trainer = quiet(DDPStrategy(accelerator="cpu"), STEPS)
    trainer.fit(model, batches)
    return _state(model), [row["train/loss"] for row in trainer.history]


@pytest.mark.timeout(400)
def test_dino_on_two_ddp_ranks_equals_one_process():
    start = _state(make_dino(**EQUIVALENCE))
    single = make_dino(**EQUIVALENCE)
    trainer = quiet("single", STEPS)
    trainer.fit(single, make_batches(STEPS))
    reference, ref_losses = _state(single), [row["train/loss"] for row in trainer.history]
    keys = [k for k in reference if reference[k].is_floating_point() and not torch.equal(reference[k], start[k])]
    assert any(k.startswith("teacher_encoder.") for k in keys) and "criterion.center" in keys
    for state, losses in run_on_ranks(_method_rank, 2):
        assert losses == pytest.approx(ref_losses, rel=REL_TOL)
        worst = 0.0
        # student, teacher (EMA) and center, each relative to its own change; + 1e-7 absolute for a
        # parameter whose true gradient is zero (the key bias) and which moves by round-off only
        for key in keys:
            change = (reference[key] - start[key]).abs().max().item()
            diff = (state[key] - reference[key]).abs().max().item()
            worst = max(worst, diff / change)
            assert diff <= REL_TOL * change + 1e-7, f"{key}: {diff:.2e} vs change {change:.2e}"
        print(f"dino 2 ranks vs 1 process after {STEPS} steps: max relative diff {worst:.2e}")


def test_dp_two_parts_equal_single_on_the_whole_batch():
    """strategy=dp: the loss and the center update in training_step_end see every part's crops."""
    from scale_ssl.strategies import DPStrategy

    start = _state(make_dino(**EQUIVALENCE))
    results = []
    for strategy in ("single", DPStrategy(accelerator="cpu", devices=2)):
        model = make_dino(**EQUIVALENCE)
        trainer = quiet(strategy, 2)
        trainer.fit(model, make_batches(2))
        results.append((_state(model), [row["train/loss"] for row in trainer.history]))
    (reference, ref_losses), (dp, dp_losses) = results
    assert dp_losses == pytest.approx(ref_losses, rel=REL_TOL)
    for key in reference:
        if reference[key].is_floating_point() and not torch.equal(reference[key], start[key]):
            change = (reference[key] - start[key]).abs().max().item()
            assert (dp[key] - reference[key]).abs().max().item() <= REL_TOL * change + 1e-7, key


class StopAfter(Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        trainer.should_stop = trainer.global_step >= self.step


def test_resume_mid_epoch_equals_never_stopping(tmp_path):
    # 2 steps per epoch: the last layer is frozen in epoch 0 and trains in epoch 1; stopped after
    # step 3 (inside epoch 1) and resumed from the checkpoint in a fresh module.
    # Stochastic depth on: the resumed run must also continue the random stream exactly.
    batches = make_batches(2)
    options = dict(freeze_last_layer=1, encoder_options={"image_size": 16, "drop_path_rate": 0.2})
    straight = make_dino(**options)
    quiet("single", 4, tmp_path / "a").fit(straight, batches)
    first = make_dino(**options)
    quiet("single", 4, tmp_path / "b", [StopAfter(3)]).fit(first, batches)
    assert not torch.equal(first.criterion.center, straight.criterion.center)
    resumed = make_dino(**options)
    quiet("single", 4, tmp_path / "b").fit(resumed, batches, ckpt_path="last")
    for key, value in straight.state_dict().items():  # student, teacher, center
        assert torch.equal(value, resumed.state_dict()[key]), key
    saved = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["state_dict"]["criterion.center"].dtype == torch.float32


class Observe(Callback):
    """Runs after DINO's own on_before_optimizer_step: the gradients the optimizer will use."""

    def __init__(self):
        self.rows = []

    def on_before_optimizer_step(self, trainer, module, optimizer):
        last = [p.grad for p in module.head.last_layer.parameters() if p.requires_grad]
        norms = [p.grad.norm().item() for p in (*module.encoder.parameters(), *module.head.parameters()) if p.grad is not None]
        decays = [g["weight_decay"] for g in optimizer.param_groups]
        self.rows.append({"epoch": trainer.current_epoch, "last_layer_grads": last, "max_norm": max(norms),
                          "decays": decays, "teacher_temp": module.teacher_temp_for_step(trainer.global_step)})


def test_schedules_last_layer_freeze_and_per_parameter_clipping():
    model = make_dino(freeze_last_layer=1, clip_grad=1e-3, warmup_teacher_temp_steps=3)
    observe = Observe()
    last_layer_start = model.head.last_layer.parametrizations.weight.original1.detach().clone()
    trainer = quiet("single", 4, callbacks=[observe])
    trainer.fit(model, make_batches(2))  # 2 steps per epoch
    rows = observe.rows
    assert [r["epoch"] for r in rows] == [0, 0, 1, 1]
    assert [all(g is None for g in r["last_layer_grads"]) for r in rows] == [True, True, False, False]
    assert all(r["max_norm"] <= 1e-3 * (1 + 1e-5) for r in rows)  # every tensor clipped on its own
    # weight decay: cosine from 0.04 to 0.4 over the 4 steps on the decayed group, 0 on the other
    expected = [0.4 + (0.04 - 0.4) * (1 + math.cos(math.pi * k / 4)) / 2 for k in range(4)]
    assert [r["decays"][0] for r in rows] == pytest.approx(expected)
    assert all(r["decays"][1] == 0.0 for r in rows)
    # teacher temperature: 0.02 -> 0.05 linearly over 3 steps, then constant
    assert [r["teacher_temp"] for r in rows] == pytest.approx([0.02, 0.03, 0.04, 0.05])
    assert not torch.equal(model.head.last_layer.parametrizations.weight.original1, last_layer_start)
    # the magnitudes of the weight-normalised layer stay at 1 (norm_last_layer)
    assert torch.equal(model.head.last_layer.parametrizations.weight.original0, torch.ones(K, 1))
    # teacher EMA: m_k = 1 - (1 - 0.9)(cos(pi k / 4) + 1) / 2 after step k
    assert model.current_momentum == pytest.approx(1 - 0.1 * (math.cos(math.pi * 3 / 4) + 1) / 2)


def test_position_embedding_and_class_token_are_not_decayed():
    model = make_dino()
    trainer = quiet("single", 1)
    trainer.fit(model, make_batches(1))
    decayed, excluded = trainer.optimizers[0].param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    excluded_names = {names[id(p)] for p in excluded["params"]}
    assert {"encoder.class_token", "encoder.encoder.pos_embedding", "encoder.conv_proj.bias",
            "encoder.encoder.layers.encoder_layer_0.ln_1.weight"} <= excluded_names
    decayed_names = {names[id(p)] for p in decayed["params"]}
    assert "encoder.conv_proj.weight" in decayed_names and "head.mlp.0.weight" in decayed_names
    assert not any(n.startswith("teacher_") for n in decayed_names | excluded_names)


def test_center_and_teacher_stay_fp32():
    model = make_dino()
    quiet("single", 1, precision="bf16-mixed").fit(model, make_batches(1, b=2))
    assert model.criterion.center.abs().max() > 0  # updated from bf16 teacher logits
    assert model.criterion.center.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.teacher_encoder.parameters())
    model.to(torch.bfloat16)  # an engine that casts the whole module keeps the running center in fp32
    assert model.criterion.center.dtype == torch.float32 and model.encoder.conv_proj.weight.dtype == torch.bfloat16


def test_dino_takes_a_resnet_too():
    """The paper also trains DINO on a ResNet-50 (with BN in the head): any build_encoder arch."""
    model = make_dino(arch="resnet10", encoder_options=None, first_conv=True, maxpool1=False, use_bn_in_head=True)
    trainer = quiet("single", 1)
    trainer.fit(model, make_batches(1))
    assert model.feature_dim == 512 and torch.isfinite(torch.tensor(trainer.history[0]["train/loss"]))


def test_clear_errors():
    with pytest.raises(ValueError, match="DINO expects 4 crops per image .*set data.views.num_crops"):
        quiet("single", 1).fit(make_dino(), [((c[0][0], c[0][1]), c[1]) for c in make_batches(1)])
    with pytest.raises(ValueError, match="num_crops must list crop counts per resolution, global crops first"):
        make_dino(num_crops=(0, 4))
    with pytest.raises(ValueError, match="teacher_temp must be a number > 0"):
        make_dino(teacher_temp=0)
    # a strategy that hides the gradients from the hooks (DeepSpeed ZeRO) cannot clip or freeze
    model = make_dino()
    model.trainer = type("T", (), {"estimated_stepping_batches": 4, "steps_per_epoch": 2, "current_epoch": 0,
                                   "global_step": 0, "strategy": None})()
    with pytest.raises(RuntimeError, match="no parameter gradient is visible before the optimizer step"):
        model.on_before_optimizer_step(torch.optim.SGD(model.head.parameters(), lr=0.1))


def _deepspeed_zero2(rank: int, world: int) -> str:
    from scale_ssl.strategies import DeepSpeedStrategy

    strategy = DeepSpeedStrategy(accelerator="cpu", zero_stage=2, micro_batch_size=B)
    try:
        quiet(strategy, 1).fit(make_dino(), make_batches(1))
    except RuntimeError as err:
        return str(err)
    return "no error"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_deepspeed_zero2_is_refused_at_the_first_step():
    """A real DeepSpeed engine (ZeRO-2 keeps the gradients in its partitions, none on the
    parameters): DINO's hooks could not clip or freeze, so the first step stops with the reason."""
    pytest.importorskip("deepspeed")
    (message,) = run_on_ranks(_deepspeed_zero2, 1)
    assert "no parameter gradient is visible before the optimizer step" in message, message
