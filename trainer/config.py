"""The schema of the whole config, and its validation.

Hydra composes ``configs/config.yaml`` onto this schema, so a wrong type or an unknown key is
refused at compose time; ``validate`` then checks values and reports every problem at once,
each message naming its key. Neither imports torch (nor does anything imported here at its top):
a mistyped value is refused in a fraction of a second.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import OmegaConf

from kfac_callback.config import KFACConfig, validate_kfac
from launcher.config import LauncherConfig, validate_launcher
from models import MODELS
from trainer.optimizers import OptimizerConfig, validate_optimizer

DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "mpi", "gloo", "nccl")  # the communicators (trainer/ranks/distributed.py)
TASKS = ("classification", "reconstruction")  # trainer/tasks.py
PRECISIONS = ("fp32", "bf16", "fp16")  # trainer/precision.py
PROGRESS = ("auto", "true", "false")
ON_NONFINITE = ("skip", "stop")  # trainer.on_nonfinite: what a step with a NaN/Inf loss or gradient does


@dataclass
class ModelConfig:
    """The model group: which network to train, and its task (trainer/tasks.py)."""

    name: str = "mlp"
    task: str = "classification"  # classification | reconstruction (the autoencoder)
    l2: float = 0.0  # η of the objective's ½η‖θ‖² (the autoencoder's 1e-5)


@dataclass
class DataConfig:
    """Where MNIST lives and how much of it to use."""

    dir: Optional[str] = None  # None: $KFAC_DATA_DIR, else the per-user cache
    max_train_samples: Optional[int] = None
    max_test_samples: Optional[int] = None


@dataclass
class TrainerConfig:
    """The training loop."""

    epochs: int = 20
    mini_batch_size: int = 100  # global: split over ranks as evenly as it goes (docs/algorithm.md §6)
    test_every_epoch: bool = False
    test_every_steps: int = 0  # 0: off; else also test every N global steps ("kind": "test" metrics records)
    stop_at_test_accuracy: Optional[float] = None  # end the run once a test reaches this accuracy (%)
    full_train_objective: bool = False  # each test of test_every_steps also evaluates the whole training set
    stop_at_train_objective: Optional[float] = None  # end the run once that full-train objective is <= this
    max_train_seconds: Optional[float] = None  # end the run (with a last test) after this much training
    device: str = "auto"
    flush_denormal: bool = True
    dtype: str = "float32"
    backend: str = "auto"  # auto | mpi | gloo | nccl (collectives between ranks)
    num_threads: Optional[int] = None  # None: this process's cores (CPU affinity) / ranks on this node
    progress: str = "auto"  # auto | true | false: tqdm bars (auto: rank 0 on a terminal, not in batch jobs)
    tensorboard: bool = False  # also write TensorBoard scalars to <output_dir>/tensorboard (rank 0)
    checkpoint_every_steps: int = 0  # 0: off; checkpoints go to <work dir>/checkpoints
    checkpoint_every_epoch: bool = False
    keep_checkpoints: int = 3  # 0: no checkpoint at all (and a stop signal ends the run without one)
    resume: Optional[str] = None  # a checkpoint file or work dir | latest | auto (this work dir's newest)
    on_nonfinite: str = "skip"  # skip | stop: what a step with a NaN/Inf loss or gradient does
    accumulate_steps: int = 1  # k micro-batches per step: the gradient and K-FAC factors of the whole batch
    precision: str = "fp32"  # fp32 | bf16 | fp16: autocast for forward and loss (fp16: GradScaler, GPUs)
    step_timeout_s: float = 300.0  # several ranks: end the job after this long without progress (0: never)


@dataclass
class Config:
    """Everything a run needs; each builder sees only its own slice."""

    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    kfac: KFACConfig = field(default_factory=KFACConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)


def validate(cfg: Any) -> list[str]:
    """Checks the values of a composed config; returns every problem, each naming its key."""
    errors: list[str] = []
    if cfg.model.name not in MODELS:
        errors.append(f"model.name: {cfg.model.name!r} is not one of {', '.join(MODELS)}")
    errors += model_errors(cfg)
    t = cfg.trainer
    if t.epochs < 1:
        errors.append(f"trainer.epochs: must be >= 1, got {t.epochs} (0 epochs would train nothing)")
    if t.mini_batch_size < 1:
        errors.append(f"trainer.mini_batch_size: must be >= 1, got {t.mini_batch_size}")
    if t.device not in DEVICES:
        errors.append(f"trainer.device: {t.device!r} is not one of {', '.join(DEVICES)}")
    if t.dtype not in ("float32", "float64"):
        errors.append(f"trainer.dtype: {t.dtype!r} is not one of float32, float64")
    if t.backend not in BACKENDS:
        errors.append(f"trainer.backend: {t.backend!r} is not one of {', '.join(BACKENDS)}")
    elif t.backend == "nccl" and t.device == "cpu":
        errors.append("trainer.backend=nccl: NCCL runs on GPUs, but trainer.device=cpu; use trainer.backend=auto, "
                      "mpi or gloo, or trainer.device=cuda")
    if t.num_threads is not None and t.num_threads < 1:
        errors.append(f"trainer.num_threads: must be >= 1 (or null), got {t.num_threads}")
    if str(t.progress).lower() not in PROGRESS:
        errors.append(f"trainer.progress: {t.progress!r} is not one of {', '.join(PROGRESS)}")
    if t.test_every_steps < 0:
        errors.append(f"trainer.test_every_steps: must be >= 0 (0: off), got {t.test_every_steps}")
    target = t.stop_at_test_accuracy
    if target is not None and not 0 < target <= 100:
        errors.append(f"trainer.stop_at_test_accuracy: must be a test accuracy in % in (0, 100] (or null), got {target}")
    elif target is not None and not (t.test_every_steps or t.test_every_epoch):
        errors.append("trainer.stop_at_test_accuracy: needs trainer.test_every_steps > 0 or "
                      "trainer.test_every_epoch=true (otherwise only the final test would check it)")
    errors += train_objective_errors(t)
    if t.checkpoint_every_steps < 0:
        errors.append(f"trainer.checkpoint_every_steps: must be >= 0 (0: off), got {t.checkpoint_every_steps}")
    if t.keep_checkpoints < 0:
        errors.append(f"trainer.keep_checkpoints: must be >= 0 (0: write none), got {t.keep_checkpoints}")
    elif t.keep_checkpoints == 0:
        asked = [k for k, on in (("trainer.checkpoint_every_steps", t.checkpoint_every_steps > 0),
                                 ("trainer.checkpoint_every_epoch", t.checkpoint_every_epoch),
                                 ("launcher.requeue", cfg.launcher.requeue)) if on]
        if asked:
            errors.append(f"trainer.keep_checkpoints=0 writes no checkpoint, but {', '.join(asked)} needs them: "
                          "keep at least 1, or turn those off")
    if t.step_timeout_s < 0:
        errors.append(f"trainer.step_timeout_s: must be >= 0 seconds (0: never), got {t.step_timeout_s}")
    if t.on_nonfinite not in ON_NONFINITE:
        errors.append(f"trainer.on_nonfinite: {t.on_nonfinite!r} is not one of {', '.join(ON_NONFINITE)}")
    if t.accumulate_steps < 1:
        errors.append(f"trainer.accumulate_steps: must be >= 1 (1: no accumulation), got {t.accumulate_steps}")
    elif t.accumulate_steps > t.mini_batch_size >= 1:
        errors.append(f"trainer.accumulate_steps={t.accumulate_steps}: more micro-batches than the "
                      f"{t.mini_batch_size} samples of a batch (trainer.mini_batch_size); use at most {t.mini_batch_size}")
    errors += precision_errors(str(t.precision), str(t.dtype), str(t.device))
    if t.resume is not None and not str(t.resume).strip():
        errors.append("trainer.resume: must be a checkpoint file, a work dir, latest or auto (or null)")
    for key in ("max_train_samples", "max_test_samples"):
        value = getattr(cfg.data, key)
        if value is not None and value < 1:
            errors.append(f"data.{key}: must be >= 1 (or null for all), got {value}")
    errors += validate_optimizer(cfg.optimizer)
    errors += validate_kfac(cfg.kfac)
    if cfg.kfac.enabled and cfg.kfac.fisher == "mc" and t.accumulate_steps > 1:
        errors.append(f"kfac.fisher=mc: not supported with trainer.accumulate_steps={t.accumulate_steps} > 1; "
                      "use kfac.fisher=empirical or trainer.accumulate_steps=1")
    errors += validate_launcher(cfg.launcher)
    return errors


def model_errors(cfg: Any) -> list[str]:
    """The model's task and L2 term, and what they rule out."""
    errors = []
    m = cfg.model
    if m.task not in TASKS:
        errors.append(f"model.task: {m.task!r} is not one of {', '.join(TASKS)}")
    if not m.l2 >= 0:
        errors.append(f"model.l2: must be >= 0, got {m.l2}")
    if m.task == "reconstruction" and cfg.trainer.stop_at_test_accuracy is not None:
        errors.append("trainer.stop_at_test_accuracy: the reconstruction task has no accuracy; use "
                      "trainer.stop_at_train_objective")
    k = cfg.kfac
    if k.enabled and k.adapt_learning_rate:
        o = cfg.optimizer
        if o.name != "sgd" or o.weight_decay:
            errors.append(f"kfac.adapt_learning_rate: needs optimizer=sgd without weight decay (K-FAC writes the "
                          f"whole update; put L2 in model.l2), got optimizer.name={o.name}, "
                          f"optimizer.weight_decay={o.weight_decay:g}")
        if cfg.trainer.accumulate_steps > 1:
            errors.append("kfac.adapt_learning_rate: not supported with trainer.accumulate_steps > 1")
    return errors


def precision_errors(precision: str, dtype: str, device: str) -> list[str]:
    """What is wrong with ``trainer.precision`` given ``trainer.dtype`` and ``trainer.device``."""
    if precision not in PRECISIONS:
        return [f"trainer.precision: {precision!r} is not one of {', '.join(PRECISIONS)}"]
    if precision != "fp32" and dtype != "float32":
        return [f"trainer.precision={precision}: autocast needs float32 weights, but trainer.dtype={dtype}; "
                "use trainer.dtype=float32, or trainer.precision=fp32"]
    if precision == "fp16" and device == "cpu":
        return ["trainer.precision=fp16: fp16 with a loss scaler is for GPUs, but trainer.device=cpu; "
                "use trainer.precision=bf16 (autocast on CPUs) or fp32"]
    return []


def train_objective_errors(t: Any) -> list[str]:
    """trainer.full_train_objective and trainer.stop_at_train_objective: both need periodic tests."""
    errors = []
    if t.full_train_objective and not t.test_every_steps > 0:
        errors.append("trainer.full_train_objective: needs trainer.test_every_steps > 0 (the full training set is "
                      "evaluated at each periodic test)")
    budget = t.max_train_seconds
    if budget is not None and not (0 < budget < float("inf") and t.test_every_steps > 0):
        errors.append(f"trainer.max_train_seconds: must be > 0 with trainer.test_every_steps > 0 (the run's last "
                      f"test is at the step the budget runs out), got {budget} with test_every_steps={t.test_every_steps}")
    target = t.stop_at_train_objective
    if target is not None and not 0 < target < float("inf"):
        errors.append(f"trainer.stop_at_train_objective: must be a cross-entropy > 0 (or null), got {target}")
    elif target is not None and not t.full_train_objective:  # (test_every_steps is the check above's)
        errors.append("trainer.stop_at_train_objective: needs trainer.full_train_objective=true and "
                      "trainer.test_every_steps > 0 (the objective it checks is measured at those tests)")
    return errors


def section(cfg: Any, schema: type) -> Any:
    """Turns one slice of the composed config into its dataclass, for a builder to consume."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), cfg))
