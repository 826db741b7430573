"""The evaluation callbacks inside a real fit: KNNEvaluatorCallback logs knn_top1, SSLOnlineEvaluator
learns above chance without touching the method, both log plots to a real MLflow server, the
online head and its optimizer state are in the checkpoint, and 2 DDP ranks train the same head
as one process on the global batch."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from scale_ssl import Trainer
from scale_ssl.data import FMNIST_MEAN, FMNIST_STD, EvalTransform, ShardedImageStream
from scale_ssl.eval.knn_callback import KNNEvaluatorCallback
from scale_ssl.probes.online_evaluator import SSLOnlineEvaluator
from scale_ssl.methods import SimCLR
from scale_ssl.tracking import MLflowLogger
from scale_ssl.trainer import SSLModule
from tests.distributed import run_on_ranks

DATA = {"image_size": 28, "channels": 1, "mean": list(FMNIST_MEAN), "std": list(FMNIST_STD), "crop_scale": [0.3, 1.0],
        "jitter_strength": 0.5, "gaussian_blur": False, "views": {}}  # fmt: skip


@pytest.mark.timeout(300)
def test_callbacks_log_knn_and_online_accuracy_during_a_short_fit(fmnist_shards, mlflow_server, tmp_path):
    torch.manual_seed(0)
    model = SimCLR(arch="resnet10", in_channels=1, first_conv=True, maxpool1=False, hidden_mlp=64, feat_dim=32,
                   optimizer="adam", learning_rate=1e-3, warmup_steps=0)  # fmt: skip
    stream = ShardedImageStream(fmnist_shards / "train", batch_size=64, transform=SimCLR.train_transform(DATA),
                                num_workers=0, shuffle_buffer=64)  # fmt: skip
    view = EvalTransform(28, 1, FMNIST_MEAN, FMNIST_STD)
    knn = KNNEvaluatorCallback(fmnist_shards / "train", fmnist_shards / "test", view, every_n_epochs=1, k=20)
    online = SSLOnlineEvaluator(num_classes=10, val_source=fmnist_shards / "test", transform=view,
                                learning_rate=1e-2, log_every_n_steps=2)  # fmt: skip
    logger = MLflowLogger(tracking_uri=mlflow_server, experiment_name="eval_callbacks", default_root_dir=tmp_path)
    trainer = Trainer(strategy="single", max_epochs=2, limit_train_batches=3, logger=logger, callbacks=[knn, online],
                      default_root_dir=str(tmp_path), enable_progress_bar=False, log_every_n_steps=5)  # fmt: skip
    trainer.fit(model, stream)

    assert [step for step, _ in knn.history] == [3, 6]
    assert all(0.1 < acc <= 1.0 for _, acc in knn.history)
    assert trainer.callback_metrics["knn_top1"] == knn.history[-1][1]
    assert [step for step, _ in online.history] == [3, 6]
    assert online.history[-1][1] > 0.2, online.history  # chance is 0.1

    client = MlflowClient(mlflow_server)
    run_id = logger.run_id
    assert [m.step for m in client.get_metric_history(run_id, "knn_top1")] == [3, 6]
    assert [m.step for m in client.get_metric_history(run_id, "online_val_acc")] == [3, 6]
    assert client.get_metric_history(run_id, "online_train_acc")
    plots = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert {"plots/knn_top1.png", "plots/test_embedding_pca.png", "plots/online_val_acc.png"} <= plots

    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    saved = checkpoint["callbacks"]["SSLOnlineEvaluator"]
    for key, value in online.head.state_dict().items():
        assert torch.equal(saved["head"][key], value)
    assert saved["optimizer"]["state"], "the head's Adam moments must be in the checkpoint"
    assert checkpoint["callbacks"]["KNNEvaluatorCallback"]["history"] == [list(h) for h in knn.history]

    # A fresh callback restored from the checkpoint continues the same head and optimizer.
    restored = SSLOnlineEvaluator(num_classes=10)
    restored.load_state_dict(saved)
    restored._build(saved["feature_dim"], torch.device("cpu"))
    assert all(torch.equal(restored.head.state_dict()[k], v) for k, v in online.head.state_dict().items())
    assert restored.optimizer.state_dict()["state"][0]["exp_avg"].equal(online.optimizer.state_dict()["state"][0]["exp_avg"])


class TinyMethod(SSLModule):
    """A BatchNorm encoder trained on a toy objective: enough to check what the callback touches."""

    def __init__(self, batchnorm: bool = True):
        super().__init__()
        torch.manual_seed(0)
        # Without BatchNorm the method itself is equal on 2 ranks and 1 (local BN would not be).
        norm = nn.BatchNorm1d(8) if batchnorm else nn.Identity()
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), norm, nn.ReLU())

    def training_step(self, batch, batch_idx):
        (view, _), _labels = batch
        return self.encoder(view).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _global_batches(steps=3, size=8):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        x = torch.randn(size, 1, 4, 4, generator=g)
        out.append(((x, x.flip(-1)), torch.randint(0, 3, (size,), generator=g)))
    return out


def _rank_part(batches, rank, world):
    def part(t):
        n = t.shape[0] // world
        return t[rank * n : (rank + 1) * n]

    return [((part(a), part(b)), part(y)) for (a, b), y in batches]


def _fit_tiny(strategy, batches, with_callback=True, batchnorm=True):
    model = TinyMethod(batchnorm)
    callback = SSLOnlineEvaluator(num_classes=3, feature_dim=8, hidden_dim=16, learning_rate=0.05, log_every_n_steps=1)
    trainer = Trainer(strategy=strategy, max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      callbacks=[callback] if with_callback else [], num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(model, batches)
    return model, callback, trainer


def _tiny_on_rank(rank, world_size):
    model, callback, trainer = _fit_tiny("ddp", _rank_part(_global_batches(), rank, world_size), batchnorm=False)
    return {"head": callback.head.state_dict(), "encoder": model.encoder.state_dict(),
            "train_acc": trainer.callback_metrics["online_train_acc"]}  # fmt: skip


def test_online_evaluator_does_not_change_the_method():
    with_cb, callback, _ = _fit_tiny("single", _global_batches())
    without, _, _ = _fit_tiny("single", _global_batches(), with_callback=False)
    for key, value in without.encoder.state_dict().items():  # weights and BatchNorm statistics
        assert torch.equal(with_cb.encoder.state_dict()[key], value), key
    assert callback.head is not None and callback.optimizer.state_dict()["state"]


def test_online_evaluator_on_unlabelled_batches_is_one_clear_error():
    """Unlabelled shards stream label -1: the evaluator stops at the first such batch and says
    what to change (on XLA the same error comes at the logging interval: tests/xla)."""
    unlabelled = [(views, torch.full_like(labels, -1)) for views, labels in _global_batches(steps=2)]
    with pytest.raises(ValueError, match=r"label -1 .* model.online_ft=false for cpc_v2"):
        _fit_tiny("single", unlabelled)


@pytest.mark.timeout(180)
def test_online_head_on_two_ddp_ranks_equals_one_process_on_the_global_batch():
    _, single_callback, single_trainer = _fit_tiny("single", _global_batches(), batchnorm=False)
    expected = single_callback.head.state_dict()
    results = run_on_ranks(_tiny_on_rank, 2)
    for result in results:
        for key, value in expected.items():
            assert torch.allclose(result["head"][key].float(), value.float(), atol=1e-6), key
        assert result["train_acc"] == pytest.approx(single_trainer.callback_metrics["online_train_acc"])
