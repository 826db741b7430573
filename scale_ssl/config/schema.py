"""The run configuration: typed sections with defaults, read from YAML plus dotted overrides.

``trainer``, ``data``, ``tracking`` and ``eval`` are fixed schemas (OmegaConf structured configs,
so an unknown key or a wrong type is rejected by name). ``model`` holds the keyword arguments of
the chosen ``method`` class and is checked against that class's signature.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class TrainerConfig:
    strategy: str = "single"
    accelerator: str = "auto"
    # strategy=dp: how many parts each batch is split into (GPUs, or CPU threads without GPUs).
    devices: Optional[int] = None
    # strategy=deepspeed: ZeRO stage, CPU offload, and an optional DeepSpeed JSON to start from
    # (its values must agree with the trainer settings above).
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_parameters: bool = False
    deepspeed_config: Optional[str] = None
    # strategy=fsdp (FSDP2 fully_shard): free each block's gathered parameters after its forward
    # (gather again in backward: less memory, more traffic), and keep the shards, gradients and
    # optimizer state in CPU memory.
    fsdp_reshard_after_forward: bool = True
    fsdp_cpu_offload: bool = False
    # The global batch is the unit (design contract 1): per-device batch = global / (world x accum).
    global_batch_size: int = 256
    accumulate_grad_batches: int = 1
    max_steps: int = -1
    max_epochs: Optional[int] = None
    # "auto": bf16-mixed where the device runs bf16 natively (TPU, CUDA sm80+, CPUs with
    # AVX512-BF16/AMX), else "32" (bf16 emulated is slower than fp32); resolved when the config
    # is loaded (scale_ssl/runtime/precision_choice.py). Or "32", "bf16-mixed", "16-mixed" (CUDA).
    precision: str = "auto"
    gradient_clip_val: Optional[float] = None
    gradient_clip_algorithm: str = "norm"
    log_every_n_steps: int = 50
    checkpoint_every_n_steps: int = 0
    enable_progress_bar: bool = True
    default_root_dir: str = "runs/default"
    # BatchNorm statistics over the global batch (ddp, xla), so N ranks x b train as one process
    # on N x b. false: per-rank statistics (each rank normalises with its own b samples, and a
    # contrastive model can tell ranks apart). Nothing to do under single (one process sees the
    # whole batch); dp and deepspeed have no global BN here and need false.
    sync_batchnorm: bool = True
    seed: int = 0
    ckpt_path: Optional[str] = None
    # Threads per process for intra-op CPU parallelism; null: cores / local ranks.
    num_threads: Optional[int] = None
    # Seconds a collective may wait for a peer (init_process_group's timeout): a rank that died
    # or stalls makes the others fail with a message naming rank and step, not hang forever.
    collective_timeout_s: float = 1800.0
    # NaN/inf loss on any rank: "stop" (skip the step everywhere; after max_consecutive_nonfinite
    # in a row, checkpoint the last good state and stop), "skip" (skip and continue), "off".
    on_nonfinite_loss: str = "stop"
    max_consecutive_nonfinite: int = 3
    # torch.compile the method's encoder (single and ddp only). Off: compiling costs tens of
    # seconds at start, which short runs do not earn back (docs/BENCHMARKS.md "torch.compile").
    compile: bool = False
    # Channels-last memory format for the model's convolutions: null (default) turns it on where it
    # is faster (CUDA; bf16-mixed on a CPU with native bf16) under single/ddp; true/false force it.
    channels_last: Optional[bool] = None
    # strategy=ddp: DistributedDataParallel(static_graph=True), valid when every step uses the
    # same parameters in the same order (no unused or conditionally used parameters, no frozen
    # schedule that changes mid-run); lets DDP skip per-step graph bookkeeping. Off by default.
    static_graph: bool = False


@dataclass
class DataConfig:
    train_shards: str = "data/fashion-mnist/train"
    val_shards: Optional[str] = "data/fashion-mnist/test"
    num_workers: int = 1
    shuffle_buffer: int = 1000
    # exact: each sample at most once per epoch; resampled: shards drawn with replacement,
    # num_samples // global_batch steps per epoch (scale_ssl/data/stream.py explains both).
    mode: str = "exact"
    # Share of a rank's samples per epoch that may fail to decode or be missing before the run stops.
    max_corrupt_fraction: float = 0.001
    # Remote shards (http(s)://, s3://, gs://, pipe:): retries after the first attempt, the first
    # back-off in seconds (doubling), and the seconds a read may stall.
    retries: int = 3
    retry_delay: float = 1.0
    io_timeout: float = 60.0
    # Tar member extensions holding a sample's image, tried in order; empty: the index's
    # image_key, then jpg, jpeg, png, webp, ... (scale_ssl/data/sample_fields.py).
    image_keys: List[str] = field(default_factory=list)
    # Where labels are: "auto" (what the shard index says), "cls", "json:<field>", or null: no
    # labels (pretraining only; batches carry -1; evaluations that need labels refuse by name).
    label_key: Optional[str] = "auto"
    # Where the view augmentation runs: "cpu" (every op per sample in the loader) or "device" (the
    # loader ships uint8 crops and per-sample parameters; colour jitter, grayscale, blur, solarize,
    # flip and normalisation run batched on the training device). scale_ssl/data/transforms.py.
    augment_on: str = "cpu"
    image_size: int = 28
    channels: int = 1
    mean: List[float] = field(default_factory=lambda: [0.2860])
    std: List[float] = field(default_factory=lambda: [0.3530])
    crop_scale: List[float] = field(default_factory=lambda: [0.08, 1.0])
    jitter_strength: float = 0.5
    gaussian_blur: bool = False
    # Extra keyword arguments for the method's own augmentation (e.g. SwAV's multi-crop sizes);
    # each method's ``train_transform`` documents and validates what it accepts.
    views: Dict[str, Any] = field(default_factory=dict)


@dataclass
class TrackingConfig:
    enabled: bool = True
    tracking_uri: Optional[str] = None
    experiment_name: str = "scale_ssl"
    run_name: Optional[str] = None


@dataclass
class EvalConfig:
    knn_k: int = 200
    knn_temperature: float = 0.1
    batch_size: int = 512


@dataclass
class PlanConfig:
    """The scale a config is written for, so ``scale-ssl plan`` and the tests can check it
    without launching. Training itself reads none of these (the launcher sets the world)."""

    # Ranks (GPUs, or XLA devices: a TPU v3 core, a TPU v4 chip) the config is meant to run on.
    world_size: Optional[int] = None
    devices_per_node: Optional[int] = None
    # Training samples, for steps per epoch when the shard index is not reachable from here.
    num_samples: Optional[int] = None
    # How model.learning_rate follows from the global batch B: "linear" (base x B / base_batch_size),
    # "sqrt" (base x sqrt(B)), or null (no rule stated: the lr is taken as written).
    lr_rule: Optional[str] = None
    base_learning_rate: Optional[float] = None
    base_batch_size: int = 256
    # Memory of one device, to say whether the per-device estimate fits.
    device_memory_gb: Optional[float] = None


@dataclass
class RunConfig:
    method: str = "simclr"
    model: Dict[str, Any] = field(default_factory=dict)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    # An optimization recipe (scale_ssl/optim/recipe.py) that replaces the method's own
    # configure_optimizers: optimizer and schedule by name, parameter groups, lr scaling, SWA.
    optim: Optional[Dict[str, Any]] = None
