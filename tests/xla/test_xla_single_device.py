"""One XLA:CPU device: SimCLR through the whole Trainer under ``strategy="xla"`` (input through
MpDeviceLoader; fp32 and bf16-mixed) on real
Fashion-MNIST shards equals the ``single`` strategy; resume is exact; checkpoints cross between
XLA and the CPU strategies; no recompilation after the first steps; launch traps are errors."""

from __future__ import annotations

import pytest
import torch
import torch_xla.debug.metrics as met

from scale_ssl.data import ShardedImageStream, SimCLRViews
from scale_ssl.methods import SimCLR
from scale_ssl.strategies import LaunchError, XLAStrategy
from scale_ssl.trainer import Callback, Trainer
from scale_ssl.trainer.seed import seed_everything

pytestmark = pytest.mark.xla

BATCH = 32
STEPS = 4
# fp32, relative to the largest entry: XLA:CPU and eager CPU sum convolutions in different orders.
LOSS_REL_TOL = 1e-5


def make_simclr() -> SimCLR:
    seed_everything(7)
    return SimCLR(arch="resnet10", in_channels=1, first_conv=True, maxpool1=False, hidden_mlp=32, feat_dim=16,
                  temperature=0.5, optimizer="sgd", learning_rate=0.1, weight_decay=1e-6, warmup_steps=0)


@pytest.fixture(scope="module")
def fmnist_batches(fmnist_shards):
    """STEPS real batches of two SimCLR views, drawn once so every fit sees identical tensors."""
    views = SimCLRViews(image_size=28, channels=1, normalize_mean=(0.286,), normalize_std=(0.353,),
                        crop_scale=(0.2, 1.0), jitter_strength=0.5, blur=False)
    torch.manual_seed(0)
    stream = ShardedImageStream(str(fmnist_shards / "train"), BATCH, views, rank=0, world_size=1, seed=3)
    batches = []
    for batch in stream:
        batches.append(batch)
        if len(batches) == STEPS:
            return batches
    raise AssertionError("the shard stream gave fewer than STEPS batches")


def _cpu_state(module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def fit(strategy, batches, steps, **kwargs):
    model = make_simclr()
    trainer = Trainer(strategy=strategy, max_steps=steps, logger=False, enable_progress_bar=False,
                      log_every_n_steps=1, **kwargs)
    trainer.fit(model, batches)
    return model, trainer


def _max_rel(a: dict, b: dict, start: dict) -> float:
    keys = [k for k in b if b[k].is_floating_point()]
    scale = max((b[k] - start[k]).abs().max().item() for k in keys)
    return max(((a[k] - start[k]) - (b[k] - start[k])).abs().max().item() for k in keys) / scale


def test_simclr_on_xla_matches_single_and_does_not_recompile(fmnist_batches, tmp_path):
    start = _cpu_state(make_simclr())

    class Compiles(Callback):
        counts: list = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.counts.append(met.counter_value("UncachedCompile") or 0)

    compiles = Compiles()
    xla_model, xla_trainer = fit("xla", fmnist_batches[:1] * STEPS, STEPS, enable_checkpointing=False,
                                 callbacks=[compiles])
    ref_model, ref_trainer = fit("single", fmnist_batches[:1], 1, enable_checkpointing=False)
    xla_losses = [h["train/loss"] for h in xla_trainer.history if "train/loss" in h]
    ref_loss = ref_trainer.history[0]["train/loss"]
    assert xla_losses[0] == pytest.approx(ref_loss, rel=LOSS_REL_TOL)

    # The one-step update is reported, not asserted: a ReLU whose pre-activation is a rounding tie
    # can open on one side and not on the other, and then single tensors differ by up to ~1e-2
    # (test_xla_resnet_gradient_differs_from_cpu_only_through_relu_gates_at_rounding_level pins
    # this down and checks the gradient with matched gates).
    one_step, _ = fit("xla", fmnist_batches[:1], 1, enable_checkpointing=False)
    diff = _max_rel(_cpu_state(one_step), _cpu_state(ref_model), start)
    # Steps 1 and 2 compile (the first SGD step has no momentum buffer yet); then every step
    # reuses the cached program.
    counts = compiles.counts
    assert counts[1] == counts[-1], f"recompiled after step 2: uncached compiles per step {counts}"
    print(f"\nxla vs single: first loss {xla_losses[0]:.8f} vs {ref_loss:.8f}; one-step update rel diff {diff:.2e}; "
          f"uncached compiles after each step {counts}")


def test_resume_on_xla_equals_uninterrupted(fmnist_batches, tmp_path):
    straight, _ = fit("xla", fmnist_batches, STEPS, default_root_dir=str(tmp_path / "a"))

    class StopAfter2(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            trainer.should_stop = trainer.global_step >= 2

    fit("xla", fmnist_batches, STEPS, default_root_dir=str(tmp_path / "b"), callbacks=[StopAfter2()])
    resumed = make_simclr()
    trainer = Trainer(strategy="xla", max_steps=STEPS, logger=False, enable_progress_bar=False,
                      default_root_dir=str(tmp_path / "b"))
    trainer.fit(resumed, fmnist_batches, ckpt_path="last")
    assert trainer.global_step == STEPS
    a, b = _cpu_state(straight), _cpu_state(resumed)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_checkpoints_cross_between_xla_and_cpu_strategies(fmnist_batches, tmp_path):
    # XLA writes a plain CPU checkpoint: the single strategy resumes it and loads the encoder.
    fit("xla", fmnist_batches[:2], 2, default_root_dir=str(tmp_path / "x"))
    path = tmp_path / "x" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    assert all(t.device.type == "cpu" for t in checkpoint["state_dict"].values())
    on_cpu = make_simclr()
    trainer = Trainer(strategy="single", max_steps=3, logger=False, enable_progress_bar=False,
                      default_root_dir=str(tmp_path / "x-resumed-on-cpu"))
    trainer.fit(on_cpu, fmnist_batches[:3], ckpt_path=str(path))
    assert trainer.global_step == 3
    encoder = SimCLR.load_from_checkpoint(str(path), strict=False).encoder
    for key, value in encoder.state_dict().items():
        torch.testing.assert_close(value, checkpoint["state_dict"]["encoder." + key])

    # ...and the other way: a single-strategy checkpoint resumes on XLA.
    fit("single", fmnist_batches[:2], 2, default_root_dir=str(tmp_path / "c"))
    cpu_checkpoint = torch.load(tmp_path / "c" / "checkpoints" / "last.ckpt", weights_only=True)
    on_xla = make_simclr()
    trainer = Trainer(strategy="xla", max_steps=2, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                      default_root_dir=str(tmp_path / "c"))
    trainer.fit(on_xla, fmnist_batches[:2], ckpt_path="last")  # already at step 2: loads, trains nothing
    for key, value in cpu_checkpoint["state_dict"].items():
        assert torch.equal(on_xla.state_dict()[key].cpu(), value), key


def test_torchrun_world_with_an_xla_world_of_one_is_an_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(LaunchError, match="WORLD_SIZE=2.*world of 1"):
        XLAStrategy().setup_environment()


def test_bad_accelerator_is_a_clear_error():
    with pytest.raises(ValueError, match="trainer.accelerator='cuda'.*strategy=xla"):
        XLAStrategy(accelerator="cuda")


class _NaNAtStep(Callback):
    """Poisons the tiny module's weights after step 2, so the loss of step 3 is NaN."""

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == 2:
            with torch.no_grad():
                module.net.head[2].weight.fill_(float("nan"))


def test_nonfinite_loss_on_xla_is_caught_at_the_log_interval_without_splitting_the_step():
    """On XLA the NaN flag stays on the device (no host read mid-step) and is read where metrics
    are: the run stops there with the steps named; 'skip' is refused."""
    from scale_ssl.trainer.nonfinite_guard import NonFiniteLossError
    from tests.xla.models import TinyContrastiveModule

    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 1, 12, 12, generator=g)
    batches = [((x, x + 0.1), torch.zeros(8, dtype=torch.long))] * 6
    trainer = Trainer(strategy=XLAStrategy(), max_steps=6, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, log_every_n_steps=2, callbacks=[_NaNAtStep()])
    with pytest.raises(NonFiniteLossError, match=r"NaN/inf on rank\(s\) \[0\] between steps 2 and 4"):
        trainer.fit(TinyContrastiveModule(), batches)
    skip = Trainer(strategy=XLAStrategy(), max_steps=2, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, on_nonfinite_loss="skip")
    with pytest.raises(ValueError, match="'skip' is not supported with strategy=xla"):
        skip.fit(TinyContrastiveModule(), batches)


def test_swav_prototype_normalisation_reaches_the_xla_weights():
    """SwAV normalises its prototypes through ``strategy.write_master_parameters``. On XLA every
    tensor's ``data_ptr()`` is 0, so the base class's "is this the parameter's own view?" test
    skipped the write and the prototypes were never normalised (found by the XLA recipe matrix:
    SwAV's loss parted from one process once its prototypes trained)."""
    from tests import _equivalence as E

    strategy = XLAStrategy()
    strategy.setup_environment()
    swav = E.build_module("swav").to(strategy.root_device)
    swav.trainer = Trainer(strategy=strategy, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with torch.no_grad():
        swav.prototypes.weight.mul_(3.0)
    swav._normalize_prototypes()
    norms = swav.prototypes.weight.detach().cpu().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


class _StepsSeen(Callback):
    def __init__(self):
        self.last = 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.last = trainer.global_step


def test_online_evaluator_on_unlabelled_batches_on_xla_stops_at_the_log_interval():
    """On XLA the online evaluator counts label -1 on the device (no host read per step) and the
    run stops with the clear error where the accuracy counts are read: the logging interval."""
    from scale_ssl.probes.online_evaluator import SSLOnlineEvaluator
    from tests.xla.models import TinyContrastiveModule

    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 1, 12, 12, generator=g)
    batches = [((x, x + 0.1), torch.full((8,), -1, dtype=torch.long))] * 4
    evaluator = SSLOnlineEvaluator(num_classes=3, encoder_attr="net", log_every_n_steps=3)
    seen = _StepsSeen()
    trainer = Trainer(strategy=XLAStrategy(), max_steps=4, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, log_every_n_steps=3, callbacks=[seen, evaluator])
    with pytest.raises(ValueError, match=r"label -1 .* model.online_ft=false for cpc_v2"):
        trainer.fit(TinyContrastiveModule(), batches)
    assert seen.last == 3


def test_training_batches_reach_the_device_through_mp_device_loader(fmnist_batches):
    import torch_xla.distributed.parallel_loader as pl

    strategy = XLAStrategy()
    strategy.setup_environment()
    assert strategy.device_loader_enabled  # one process, one device: as on a TPU host
    loader = strategy.device_batches(fmnist_batches[:2])
    assert isinstance(loader, pl.MpDeviceLoader)
    delivered = list(loader)
    assert len(delivered) == 2
    for ((x1, x2), y), ((r1, r2), ry) in zip(delivered, fmnist_batches[:2]):
        assert x1.device.type == "xla" and y.device.type == "xla"
        assert torch.equal(x1.cpu(), r1) and torch.equal(x2.cpu(), r2) and torch.equal(y.cpu(), ry)


# bf16-mixed is compared one step at a time, each step from the same initial weights. Free-running
# bf16 runs of this test's recipe (plain SGD at lr 0.1, no LARS) are chaotic: the first update of
# the 7x7 stem convolution is 1.9x that layer's own norm, so bf16's rounding of it (its direction
# 2 % off the fp32 update on both backends) decides where the next steps go. Over 8 independent
# data seeds the third loss of CPU bf16 was 0.3-4.6 % from fp32's, and XLA's bf16 0.1-4.3 % from
# CPU bf16's, on either side (on the batches of issue 20's augmentation XLA's lay 8 % above CPU's,
# on the earlier batches within 3 %): a free-run tolerance there measures luck.
# Per step instead (measured on the three batches): losses 6e-4 apart at most (autocast runs
# BatchNorm in fp32 on XLA, in bf16 on the CPU); the bf16 update's distance from the fp32 update,
# ||dW_bf16 - dW_fp32|| / ||dW_fp32|| over all parameters, 0.198 / 0.201, 0.261 / 0.274 and
# 0.277 / 0.278 (XLA / CPU). With autocast lost on the way to the XLA step it is 7e-6.
BF16_LOSS_REL_TOL = 3e-3
BF16_UPDATE_ERROR_RATIO = 1.5  # XLA's bf16 update error within [1/1.5, 1.5] x CPU's, on every batch


def _one_step_update(strategy: str, precision: str, batch) -> tuple[float, dict]:
    """The loss and the parameter update of one Trainer step from ``make_simclr``'s weights."""
    start = {n: p.detach().double().clone() for n, p in make_simclr().named_parameters()}
    model, trainer = fit(strategy, [batch], 1, enable_checkpointing=False, precision=precision)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # mixed: weights stay fp32
    loss = [h["train/loss"] for h in trainer.history if "train/loss" in h][0]
    return loss, {n: p.detach().cpu().double() - start[n] for n, p in model.named_parameters()}


def _distance(update: dict, reference: dict) -> float:
    diff = sum(float((update[n] - reference[n]).square().sum()) for n in reference)
    return (diff / sum(float(r.square().sum()) for r in reference.values())) ** 0.5


def test_bf16_mixed_on_xla_autocasts_the_encoder_and_steps_like_cpu_bf16(fmnist_batches):
    """bf16-mixed reaches the XLA device (autocast casts the convolutions), keeps fp32 weights,
    and one Trainer step on XLA in bf16 is as far from the fp32 step as a bf16 step on the CPU is:
    not closer (the step ran in fp32, autocast lost on the way) and not farther (something ran in
    lower precision than autocast asks, or wrong). Three batches, each step from the same weights."""
    from scale_ssl.trainer.precision import Precision

    strategy = XLAStrategy()
    strategy.setup_environment()
    model = make_simclr().to(strategy.root_device)
    x = fmnist_batches[0][0][0].to(strategy.root_device)
    with Precision("bf16-mixed", strategy.root_device).autocast():
        assert model.encoder.conv1(x).dtype == torch.bfloat16  # autocast reaches the XLA device
    assert model.encoder.conv1(x).dtype == torch.float32

    measured = []
    for batch in fmnist_batches[:3]:
        xla_loss, xla_update = _one_step_update("xla", "bf16-mixed", batch)
        cpu_loss, cpu_update = _one_step_update("single", "bf16-mixed", batch)
        _, fp32_update = _one_step_update("single", "32", batch)
        xla_error, cpu_error = _distance(xla_update, fp32_update), _distance(cpu_update, fp32_update)
        measured.append((xla_loss, cpu_loss, xla_error, cpu_error))
        assert xla_loss == pytest.approx(cpu_loss, rel=BF16_LOSS_REL_TOL)
        assert 1 / BF16_UPDATE_ERROR_RATIO <= xla_error / cpu_error <= BF16_UPDATE_ERROR_RATIO, measured
    print("\nbf16-mixed, one step per batch: loss xla / cpu, update error vs fp32 xla / cpu: "
          + "; ".join(f"{a:.4f} / {b:.4f}, {c:.3f} / {d:.3f}" for a, b, c, d in measured))


class _ReLUGates:
    """Records every ReLU call of a model in call order (a ResNet block calls its ReLU twice): the
    input (pre-activation) and the output. With ``gates`` (one boolean mask per call) each call
    instead returns ``input * gate``: the same function as ReLU wherever the gate agrees with the
    input's sign, and a backward that passes the gradient exactly where the gate is open."""

    def __init__(self, model: torch.nn.Module, gates: list | None = None):
        self.inputs, self.outputs, self.gates = [], [], gates
        for module in model.modules():
            if isinstance(module, torch.nn.ReLU):
                module.inplace = False  # keep the pre-activation intact for the record
                module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.inputs.append(args[0].detach())
        if self.gates is not None:
            output = args[0] * self.gates[len(self.outputs)].to(args[0].dtype)
        self.outputs.append(output.detach())
        return output


def _loss_and_grads(model, batch, device, dtype, gates=None):
    (x1, x2), _ = batch
    model = model.to(device=device, dtype=dtype).train()
    record = _ReLUGates(model, gates)
    z = model.projection(model.encoder(torch.cat([x1, x2]).to(device=device, dtype=dtype)))
    loss = model.criterion(*z.chunk(2))
    loss.backward()
    if device.type == "xla":
        import torch_xla

        torch_xla.sync()
    grads = {n: p.grad.detach().cpu().double() for n, p in model.named_parameters()}
    return loss.item(), grads, [t.cpu() for t in record.inputs], [t.cpu() for t in record.outputs]


def _worst_rel(grads: dict, ref: dict) -> tuple[float, str]:
    """Largest per-tensor relative difference, each tensor against its own largest entry (tensors
    whose reference gradient is below 1e-3 of the global largest entry -- biases right before a
    BatchNorm, whose true gradient is 0 -- are measured against that floor)."""
    floor = 1e-3 * max(g.abs().max().item() for g in ref.values())
    return max(((grads[k] - ref[k]).abs().max().item() / max(ref[k].abs().max().item(), floor), k) for k in ref)


# XLA:CPU's fp32 gradient against a float64 reference that uses XLA's own ReLU gates: fp32 rounding
# of a program that sums in another order (measured 1e-5 on this batch; eager fp32 against float64:
# 6e-6). One flipped gate moved single tensors by 1e-3..5e-2 in the measurements.
GATED_GRAD_REL_TOL = 1e-4
# A ReLU gate may differ between XLA:CPU and float64 only where the pre-activation is a rounding-level
# tie: within this fraction of that layer's largest |pre-activation| (fp32 forwards differ by ~1e-6).
GATE_TIE_REL = 1e-5


def test_xla_resnet_gradient_differs_from_cpu_only_through_relu_gates_at_rounding_level(fmnist_batches):
    """Pins the single-device gap: XLA:CPU's one-step ResNet-10 gradient was seen to differ from
    eager CPU by up to ~2e-2 on single tensors. Cause: ReLU's kink. A handful of pre-activations
    (out of ~10^6 per step) sit within fp32 rounding of 0; XLA:CPU's convolutions and BatchNorm sum
    in another order than eager's, so such a unit's gate can open in one and stay shut in the other,
    and the whole gradient of that unit flows on one side only -- into every weight upstream of it.
    Neither side is wrong (float64 itself is only a third opinion), and no precision flag changes
    it (XLA_FLAGS fast-math/XNNPACK/oneDNN switches and the matmul precision give the same numbers).
    The test shows (1) every gate that differs is such a tie and (2) with XLA's gates the float64
    gradient equals XLA's to fp32 rounding."""
    import torch_xla

    batch = fmnist_batches[0]

    xla_loss, xla_grads, _, xla_outputs = _loss_and_grads(make_simclr(), batch, torch_xla.device(), torch.float32)
    ref_loss, ref_grads, ref_inputs, _ = _loss_and_grads(make_simclr(), batch, torch.device("cpu"), torch.float64)
    xla_gates = [out > 0 for out in xla_outputs]
    _, gated_grads, _, _ = _loss_and_grads(make_simclr(), batch, torch.device("cpu"), torch.float64, gates=xla_gates)

    assert xla_loss == pytest.approx(ref_loss, rel=LOSS_REL_TOL)
    flips, ties = 0, []
    for gate, pre in zip(xla_gates, ref_inputs):
        differ = gate != (pre > 0)
        flips += int(differ.sum())
        if differ.any():
            ties.append(pre[differ].abs().max().item() / pre.abs().max().item())
    assert all(t <= GATE_TIE_REL for t in ties), f"a gate differs at a pre-activation that is no rounding tie: {ties}"
    gated, gated_where = _worst_rel(xla_grads, gated_grads)
    own, own_where = _worst_rel(xla_grads, ref_grads)
    assert gated < GATED_GRAD_REL_TOL, f"with XLA's gates the gradients still differ by {gated:.2e} ({gated_where})"
    print(f"\nXLA vs float64 gradient: {flips} of {sum(g.numel() for g in xla_gates)} ReLU gates differ "
          f"(largest |pre-activation| among them: {max(ties, default=0):.1e} of the layer's largest); "
          f"worst tensor {own:.2e} ({own_where}) with float64's own gates, {gated:.2e} ({gated_where}) with XLA's")


@pytest.mark.parametrize("image_size", [28, 32])
def test_amdim_encoder_traces_on_xla_without_host_fallbacks(image_size):
    """AMDIM's shortcuts pool 7x7 maps to 5x5 (and a 32 px trunk pools 8 -> 7): torch_xla lowers
    adaptive pooling only when the sizes divide and otherwise ran it on the host, which split every
    training step into several programs. ``scale_ssl.models.adaptive_pool`` writes it as averaging
    matrices; forward and backward must now trace with no op falling back to the host."""
    import torch_xla

    from scale_ssl.models.amdim_encoder import AMDIMEncoder

    device = torch_xla.device()
    encoder = AMDIMEncoder(1, image_size, 8, 16, 1, True).to(device)
    met.clear_counters()
    maps = encoder.feature_maps(torch.randn(4, 1, image_size, image_size).to(device))
    sum(m.square().sum() for m in maps).backward()
    torch_xla.sync()
    fallbacks = [name for name in met.counter_names() if name.startswith("aten::")]
    assert not fallbacks, f"ops run on the host mid-step: {fallbacks}"
    assert [tuple(m.shape[-2:]) for m in maps] == [(1, 1), (5, 5), (7, 7)]


class _HostOps(Callback):
    """Counts what torch_xla ran on the host from the start of the first step to the end of the
    last one (``aten::<op>`` counters: ops without an XLA lowering, and ``_local_scalar_dense``,
    every device-to-host read of a value)."""

    def __init__(self, last_step: int):
        self.last_step, self.ops = last_step, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == 0:
            met.clear_counters()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.last_step:
            self.ops = {n: met.counter_value(n) for n in met.counter_names() if n.startswith("aten::")}


def _host_op_cells():
    from tests._equivalence import METHOD_NAMES

    for method in METHOD_NAMES:
        # AMDIM (uneven adaptive pooling, logaddexp) and CPC v2 (Tensor.unfold, the online head's
        # per-step accuracy read) ran ops on the host before; their small encoders compile fast.
        marks = [] if method in ("amdim", "cpc_v2") else [pytest.mark.slow]
        yield pytest.param(method, marks=marks, id=method)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("method", list(_host_op_cells()))
def test_every_method_steps_on_xla_with_nothing_on_the_host(method):
    """Each method as its fmnist_cpu.yaml builds it (tiny sizes; tests/_equivalence.py), three
    steps on one XLA device: no op falls back to the host and nothing is read back, so every step
    is one compiled program (metrics are read only at the logging interval, here never)."""
    from tests import _equivalence as matrix

    steps = 3
    host_ops = _HostOps(steps)
    trainer = Trainer(strategy=XLAStrategy(), max_steps=steps, logger=False, enable_progress_bar=False,
                      enable_checkpointing=False, log_every_n_steps=1000, num_sanity_val_steps=0, callbacks=[host_ops])
    trainer.fit(matrix.build_module(method), matrix.global_batches(method)[:steps])
    assert host_ops.ops == {}, f"{method}: run on the host during the steps: {host_ops.ops}"
