"""The ``kfac`` config group: K-FAC options and their validation.

``KFACConfig`` is a plain dataclass so that ``OmegaConf.structured(KFACConfig)`` gives the
schema of the ``kfac`` group; ``validate_kfac`` finds every mistake at once and names the key,
so a bad sweep fails at compose time instead of hours into a run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

STRATEGIES = ("all", "each", "root", "balanced")
INVERSE_DTYPES = ("float32", "float64")
FISHERS = ("empirical", "mc")
WEIGHT_SHARING = ("expand", "reduce")
DAMPING_KEYS = ("damping_act", "damping_err", "damping_bn_act", "damping_bn_err")


@dataclass
class KFACConfig:
    """Options of the K-FAC callback (docs/algorithm.md §1, §3, §4, §5).

    Each damping is a list: one value is a constant, two values are ``[init, target]`` and the
    damping warms down from init to target over ``damping_warmup_steps`` steps.
    """

    enabled: bool = False
    damping_act: list[float] = field(default_factory=lambda: [0.03])
    damping_err: list[float] = field(default_factory=lambda: [0.03])
    damping_bn_act: list[float] = field(default_factory=lambda: [0.03])
    damping_bn_err: list[float] = field(default_factory=lambda: [0.03])
    damping_warmup_steps: int = 100
    update_interval_init: int = 1
    update_interval_target: int = 1
    update_interval_steps: int = 0
    compute_interval_steps: int = 1
    use_pi: bool = False
    use_eigen: bool = False
    kronecker_decay: float = 0.99
    inverse_strategy: str = "all"
    disable_layers: list[str] = field(default_factory=list)
    learning_rate_factor: float = 1.0
    print_time: bool = False
    print_matrix: bool = False
    print_matrix_summary: bool = False
    inverse_dtype: str = "float32"
    # Bias-free fully connected layers preconditioned through the batch get no plain weight
    # gradient from backward (a GEMM per layer saved, and on several ranks their share of the
    # gradient all-reduce: the batch gather carries what they need); step() writes the
    # preconditioned one, or rebuilds the plain one where it cannot precondition. Until
    # step(), their .grad is None.
    skip_weight_grad: bool = False
    # Factors from at most this many samples of each global batch (0: all of them); the
    # gradient still uses the whole batch (docs/algorithm.md §3, "Subsampled factors").
    factor_batch_size: int = 0
    # "empirical": G from the true labels; "mc": from labels sampled from the model's own
    # predictions (docs/algorithm.md §3, "Fisher").
    fisher: str = "empirical"
    # KL-clipping of the preconditioned update (0: off; docs/algorithm.md §5).
    kl_clip: float = 0.0
    # Layers whose weight is shared over positions (tokens, pixels): "expand" (a row per
    # position) or "reduce" (a row per sample, summed over positions); docs/algorithm.md §3.
    weight_sharing: str = "expand"
    # Replace each nn.MultiheadAttention by kfac_callback.MultiheadAttention (same parameters,
    # same outputs) whose projections K-FAC sees; false leaves them to the base optimizer.
    swap_attention: bool = True
    # The adaptive rules (docs/algorithm.md §9), each off by default. adapt_learning_rate: the
    # update's size α from the exact quadratic model (the base optimizer must be plain SGD; its
    # learning rate is only the unit the update is written in); adapt_momentum: also its
    # momentum μ; adapt_damping: λ by Levenberg-Marquardt every damping_adaptation_interval
    # steps T, from initial_damping, times or divided by damping_adaptation_decay^T, within
    # [min_damping, max_damping], the factors' damping tied to it (damping_act and damping_err
    # become √(λ + η), π-corrected with use_pi).
    adapt_learning_rate: bool = False
    adapt_momentum: bool = False
    adapt_damping: bool = False
    initial_damping: float = 1.0
    damping_adaptation_interval: int = 5
    damping_adaptation_decay: float = 0.95
    min_damping: float = 1e-8
    max_damping: float = 1e8
    # λ₀ = initial_damping · ∇hᵀC∇h/∇hᵀ∇h, the first gradient's curvature (scale-free), not
    # initial_damping itself.
    calibrate_damping: bool = False
    # The quadratic model's curvature products and the reduction ratio from at most this many
    # samples of each global batch (0: all), split over ranks as factor_batch_size is.
    adaptive_batch_size: int = 0


def as_damping_list(value: Any) -> list[float]:
    """Normalises a damping given as a number, a tuple/list, or a ``"init,target"`` string.

    Args:
        value: ``0.01``, ``(0.1, 0.01)``, ``[0.1, 0.01]``, ``"0.1,0.01"`` or ``"0.1 0.01"``.

    Returns:
        The damping as a list of floats (one or two values are valid; validation says so).
    """
    if isinstance(value, str):
        return [float(v) for v in value.replace(",", " ").split()]
    if isinstance(value, (int, float)):
        return [float(value)]
    return [float(v) for v in value]


def _damping_errors(key: str, values: list[float], warmup_steps: int) -> list[str]:
    """Errors of one damping entry; see docs/algorithm.md §4 for the warm-up rule."""
    if len(values) not in (1, 2):
        return [f"kfac.{key}: expected one value or [init, target], got {len(values)} values"]
    errors = []
    for v in values:
        if not math.isfinite(v) or v < 0:
            errors.append(f"kfac.{key}: damping {v:g} must be a finite value >= 0")
    if errors or len(values) == 1:
        return errors
    d0, d1 = values
    if d0 < d1:
        return [f"kfac.{key}: init {d0:g} < target {d1:g} is not allowed "
                "(damping warms DOWN from init to target)"]
    if d0 == d1:
        return []
    if d1 <= 0:
        return [f"kfac.{key}: a warm-up target must be > 0 (log10(init/target) is undefined), "
                f"got {d1:g}"]
    if warmup_steps < 1:
        return [f"kfac.{key}: a warm-up from {d0:g} to {d1:g} needs "
                f"kfac.damping_warmup_steps >= 1, got {warmup_steps}"]
    alpha = 2.0 * math.log10(d0 / d1) / warmup_steps
    if alpha > 1.0:
        # (1 - alpha) < 0 makes the damping oscillate around the target and possibly turn
        # negative, which would break the inverses.
        need = math.ceil(2.0 * math.log10(d0 / d1))
        return [f"kfac.{key}: warm-up from {d0:g} to {d1:g} over {warmup_steps} steps "
                f"gives alpha {alpha:.3g} > 1; use kfac.damping_warmup_steps >= {need}"]
    return []


def validate_kfac(cfg: Any) -> list[str]:
    """Checks a ``kfac`` config and returns every error found, each naming its key.

    Args:
        cfg: A ``KFACConfig``, an OmegaConf node of the ``kfac`` group, or any object with
            the same attributes.

    Returns:
        Error messages; an empty list means the config is valid.
    """
    errors: list[str] = []
    warmup = int(cfg.damping_warmup_steps)
    if warmup < 0:
        errors.append(f"kfac.damping_warmup_steps: must be >= 0, got {warmup}")
    for key in DAMPING_KEYS:
        try:
            values = as_damping_list(getattr(cfg, key))
        except (TypeError, ValueError):
            errors.append(f"kfac.{key}: not a number or list of numbers: {getattr(cfg, key)!r}")
            continue
        errors += _damping_errors(key, values, warmup)
    for key in ("update_interval_init", "update_interval_target", "compute_interval_steps"):
        if int(getattr(cfg, key)) < 1:
            errors.append(f"kfac.{key}: must be >= 1, got {getattr(cfg, key)}")
    if int(cfg.update_interval_steps) < 0:
        errors.append(f"kfac.update_interval_steps: must be >= 0, got {cfg.update_interval_steps}")
    decay = float(cfg.kronecker_decay)
    if not 0.0 <= decay < 1.0:
        errors.append(f"kfac.kronecker_decay: must lie in [0, 1), got {decay:g}")
    if cfg.inverse_strategy not in STRATEGIES:
        errors.append(f"kfac.inverse_strategy: unknown strategy {cfg.inverse_strategy!r}; "
                      f"choose one of {', '.join(STRATEGIES)}")
    if cfg.inverse_dtype not in INVERSE_DTYPES:
        errors.append(f"kfac.inverse_dtype: unknown dtype {cfg.inverse_dtype!r}; "
                      f"choose one of {', '.join(INVERSE_DTYPES)}")
    factor = float(cfg.learning_rate_factor)
    if not math.isfinite(factor) or factor <= 0:
        errors.append(f"kfac.learning_rate_factor: must be a finite value > 0, got {factor:g}")
    fbs = cfg.factor_batch_size
    if isinstance(fbs, bool) or not isinstance(fbs, int) or fbs < 0:
        errors.append(f"kfac.factor_batch_size: must be an integer >= 0 (0: the whole batch), "
                      f"got {cfg.factor_batch_size!r}")
    if cfg.fisher not in FISHERS:
        errors.append(f"kfac.fisher: unknown Fisher {cfg.fisher!r}; choose one of {', '.join(FISHERS)}")
    if cfg.weight_sharing not in WEIGHT_SHARING:
        errors.append(f"kfac.weight_sharing: unknown approximation {cfg.weight_sharing!r}; choose expand or reduce")
    clip = float(cfg.kl_clip)
    if not math.isfinite(clip) or clip < 0:
        errors.append(f"kfac.kl_clip: must be a finite value >= 0 (0: off), got {clip:g}")
    return errors + adaptive_errors(cfg)


def adaptive_errors(cfg: Any) -> list[str]:
    """Errors of the adaptive rules' keys (docs/algorithm.md §9)."""
    errors = []
    adaptive = cfg.adapt_learning_rate or cfg.adapt_momentum or cfg.adapt_damping
    if (cfg.adapt_momentum or cfg.adapt_damping or cfg.calibrate_damping) and not cfg.adapt_learning_rate:
        errors.append("kfac.adapt_momentum, kfac.adapt_damping and kfac.calibrate_damping: need "
                      "kfac.adapt_learning_rate=true (they act through the quadratic model that chooses the update)")
    if adaptive and float(cfg.kl_clip) > 0:
        errors.append("kfac.kl_clip: off with the adaptive rules (the quadratic model sizes the update); "
                      "set kfac.kl_clip=0")
    if adaptive and cfg.skip_weight_grad:
        errors.append("kfac.skip_weight_grad: off with the adaptive rules (they need the plain gradient); "
                      "set kfac.skip_weight_grad=false")
    low, high, start = float(cfg.min_damping), float(cfg.max_damping), float(cfg.initial_damping)
    if not (math.isfinite(low) and low > 0 and math.isfinite(high) and low <= high):
        errors.append(f"kfac.min_damping, kfac.max_damping: need 0 < min <= max, finite; got {low:g}, {high:g}")
    elif not low <= start <= high:
        errors.append(f"kfac.initial_damping: {start:g} is outside [kfac.min_damping, kfac.max_damping] = "
                      f"[{low:g}, {high:g}]")
    size = cfg.adaptive_batch_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        errors.append(f"kfac.adaptive_batch_size: must be an integer >= 0 (0: the whole batch), got {size!r}")
    if int(cfg.damping_adaptation_interval) < 1:
        errors.append(f"kfac.damping_adaptation_interval: must be >= 1, got {cfg.damping_adaptation_interval}")
    if not 0 < float(cfg.damping_adaptation_decay) < 1:
        errors.append(f"kfac.damping_adaptation_decay: must lie in (0, 1), got {cfg.damping_adaptation_decay}")
    return errors


def make_config(**kwargs: Any) -> KFACConfig:
    """Builds a validated ``KFACConfig`` from keyword arguments.

    Dampings may be numbers, tuples/lists or ``"init,target"`` strings; ``disable_layers`` may
    be a comma-separated string.

    Raises:
        TypeError: For an unknown option.
        ValueError: Listing every invalid option, each naming its key.
    """
    names = {f.name for f in dataclasses.fields(KFACConfig)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise TypeError(f"KFACCallback: unknown option(s) {unknown}; known: {sorted(names)}")
    for key in DAMPING_KEYS:
        if key in kwargs:
            kwargs[key] = as_damping_list(kwargs[key])
    if isinstance(kwargs.get("disable_layers"), str):
        kwargs["disable_layers"] = [s for s in kwargs["disable_layers"].split(",") if s.strip()]
    if "disable_layers" in kwargs:
        kwargs["disable_layers"] = [str(s).strip() for s in kwargs["disable_layers"]]
    for f in dataclasses.fields(KFACConfig):  # "1e-5" read by a YAML 1.1 reader is a string
        if f.type == "float" and isinstance(kwargs.get(f.name), (str, int)) and not isinstance(kwargs[f.name], bool):
            try:
                kwargs[f.name] = float(kwargs[f.name])
            except ValueError:
                pass  # validation names it
    cfg = KFACConfig(**kwargs)
    errors = validate_kfac(cfg)
    if errors:
        raise ValueError("invalid K-FAC options:\n  " + "\n  ".join(errors))
    return cfg


def check_accumulate_steps(k: int, config: KFACConfig) -> None:
    """k micro-batches per step: an integer >= 1, and 1 where an option needs one batch a step.

    Raises:
        ValueError: Naming the option that does not support k > 1.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"K-FAC: accumulate_steps must be an integer >= 1, got {k!r}")
    if k > 1 and config.fisher == "mc":
        raise ValueError(f"K-FAC: kfac.fisher=mc does not support trainer.accumulate_steps={k} "
                         "(accumulate_steps > 1); use kfac.fisher=empirical or accumulate_steps=1")
    if k > 1 and config.adapt_learning_rate:
        raise ValueError(f"K-FAC: the adaptive rules do not support trainer.accumulate_steps={k} "
                         "(accumulate_steps > 1); use accumulate_steps=1")


def options_of(cfg: Any) -> dict[str, Any]:
    """The options of a ``KFACConfig``, a mapping, or an OmegaConf ``kfac`` node, as keyword arguments.

    Raises:
        TypeError: For anything else.
    """
    if dataclasses.is_dataclass(cfg):
        return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, Mapping) or hasattr(cfg, "keys"):
        return {k: cfg[k] for k in cfg.keys()}
    raise TypeError(f"from_config: expected a KFACConfig or a mapping, got {type(cfg)}")
