"""Peer measurement: kfac-jax's own K-FAC on the MNIST deep autoencoder.

Standalone script for a side-by-side comparison with this project's K-FAC. It runs only
in a separate virtual environment with kfac-jax installed (tested: kfac-jax 0.0.8,
jax/jaxlib 0.8.3 CPU, dm-haiku 0.0.17, optax 0.2.8, numpy 2.4); nothing in the project
imports it, and it imports nothing from the project.

What it reproduces (kfac-jax v0.0.8, examples/autoencoder_mnist/{experiment,pipeline}.py):

* Model: 784-1000-500-250-30-250-500-1000-784 Haiku ``hk.Linear`` layers (with biases),
  tanh after every layer except the 30-unit code layer (linear) and the output layer,
  whose outputs are logits.
* Loss: sigmoid cross-entropy of the logits against the pixels, summed over the 784
  pixels and averaged over the samples of the batch, plus ``l2/2 * ||theta||^2`` with
  ``l2 = 1e-5`` over all parameters, biases included. The loss is registered with
  ``kfac_jax.register_sigmoid_cross_entropy_loss``; ``l2_reg=1e-5`` is also passed to
  the optimizer, which adds it to the curvature (factor damping and quadratic model).
* Optimizer: ``kfac_jax.Optimizer`` with the example's config: adaptive learning rate,
  momentum and damping (the 2x2 exact-GGN quadratic model and Levenberg-Marquardt),
  initial_damping 150, min_damping 1e-5, max_damping 1000, damping_adaptation_interval
  5, damping_adaptation_decay 0.95, inverse_update_period 5, num_burnin_steps 5,
  curvature_ema 0.95, estimation_mode default (``ggn_curvature_prop``), everything
  else at the library defaults. The example's default batch is the full 60000-image
  training set (the example README warns that the adaptive lr/momentum are not meant
  for stochastic mini-batches; with ``--batch-size < N`` this script still uses them,
  as asked, so small-batch numbers are "kfac-jax's settings used outside their design").

Objective convention: identical to the project's, i.e. mean over samples of the BCE
summed over the 784 pixels plus ``0.5 * 1e-5 * ||theta||^2`` (weights and biases).
Differences worth knowing when comparing:

* ``batch_loss`` in the log is kfac-jax's ``stats["loss"]``: the objective (with the
  L2 term) on the step's mini-batch at the parameters *before* that step's update.
* Initialisation: by default Haiku's (weights from a normal truncated at +-2 std with
  scale ``1/sqrt(fan_in)``, i.e. an actual std of about ``0.88/sqrt(fan_in)``; zero
  biases). ``--init lecun_normal`` draws N(0, 1/fan_in) weights and zero biases, like
  the project's ``models/init.py`` (same distribution, not the same numbers).
* The first step also runs 5 burn-in curvature updates on 5 extra mini-batches
  (kfac-jax's ``num_burnin_steps``); their time is in the training clock, and those
  batches are drawn from the same stream (so one "epoch" is not exactly N/B steps).
* Mini-batches: a fresh numpy permutation per epoch, remainder dropped (as the
  example's tf.data pipeline with ``drop_remainder=True``); with ``B = N`` every step
  sees the whole set in a fixed order.
* ``multi_device=False``: the example pmaps over the local devices; with the single
  CPU device the computation is the same.
* The reconstruction MSE is the squared error of ``sigmoid(logits)`` summed over the
  784 pixels and averaged over the samples (the example's ``mean_squared_error``).

Timing: compilation is done first, in a warm-up on throw-away parameters and optimizer
state that replays the variants training meets: the optimizer ``init``, step 0 (5
burn-in curvature updates + a step), a damping-update step (every 5th) and a plain step
on a state returned by a step, then one full-set evaluation. Its wall time (which also
holds the compute of those calls) is the ``compile`` record, with its parts and the
number of XLA compilations. Training then starts afresh with the same seed, so
``wall_s`` holds no compilation; the ``end`` record counts any compilation that still
happened during training (expected 0). ``--cache-dir`` uses jax's persistent cache (it
cannot keep kfac-jax's ``_step`` and ``_burnin``, compiled anew in every process).
Full-set evaluations run every ``--eval-every`` seconds of training clock, and at the
start and end; their time is excluded from ``wall_s`` and reported as ``eval_s``.

Output (JSON lines): ``config``, ``compile``, then ``step`` records every ``--log-every``
steps (loss, learning rate, momentum, damping, rho), ``eval`` records (objective, cross
entropy, mse) and a final ``end`` record, each with its ``event`` name.

Threads: ``--threads K`` restricts the process to the first K cores before jax is imported
(XLA's CPU backend uses one thread per core it may run on).

Usage (the venv outside the repo; ``benchmarks/autoencoder.py --phase peer`` calls it)::

    <venv>/bin/python benchmarks/peers/kfac_jax_autoencoder.py --images train_images.npy \
        --batch-size 60000 --seconds 600 --seed 0 --out kfacjax_full.jsonl

Cost at full batch (B = 60000): one step is of the order of a minute on 2 CPU cores
(batch 1000 takes ~0.7 s), and the warm-up replays step 0 (with 5 burn-in passes) and
two more steps, so it costs several minutes of compute on top of compilation;
``--no-warmup`` skips it (compilation then lands in the first steps and is reported).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", required=True, help=".npy of float32 [N, 784] in [0, 1]")
    p.add_argument("--limit", type=int, default=None, help="use only the first LIMIT images")
    p.add_argument("--batch-size", type=int, required=True, help="B; B = N is full batch")
    p.add_argument("--seconds", type=float, required=True, help="training wall-time budget")
    p.add_argument("--max-steps", type=int, default=None, help="optional step cap")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output .jsonl path")
    p.add_argument("--eval-every", type=float, default=10.0, help="training seconds between full-set evaluations")
    p.add_argument("--eval-chunk", type=int, default=10000, help="samples per evaluation chunk (memory)")
    p.add_argument("--log-every", type=int, default=1, help="write a step line every K steps")
    p.add_argument("--init", choices=("haiku", "lecun_normal"), default="haiku")
    p.add_argument("--l2", type=float, default=1e-5)
    p.add_argument("--initial-damping", type=float, default=150.0)
    p.add_argument("--cache-dir", default=None, help="jax persistent compilation cache (outside the repo)")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the warm-up: compilation falls in the first steps (the end record says how much)")
    p.add_argument("--threads", type=int, default=None, help="pin to the first K cores (XLA then uses K threads)")
    return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None

if ARGS is not None and ARGS.threads:
    cores = sorted(os.sched_getaffinity(0))[: ARGS.threads]
    os.sched_setaffinity(0, cores)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if ARGS is not None and ARGS.cache_dir:
    # Loading cached XLA:CPU executables logs a harmless C++ error per entry about the
    # pseudo-features +prefer-no-gather/+prefer-no-scatter; keep those off stderr.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import warnings  # noqa: E402

# kfac-jax donates the batch to its burn-in; XLA cannot reuse it and says so each time.
warnings.filterwarnings("ignore", message="Some donated buffers were not usable")

import haiku as hk  # noqa: E402
import jax  # noqa: E402
import jax.monitoring  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import kfac_jax  # noqa: E402
import numpy as np  # noqa: E402


class _CompileCounter:
    """Counts XLA compilations (persistent-cache loads included) via jax.monitoring."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.count, self.cache_hits, self.seconds, self.names = 0, 0, 0.0, []
        self.durations = []

    def slowest(self, k=5):
        pairs = sorted(zip(self.durations, self.names, strict=True), reverse=True)[:k]
        return [[name, round(d, 2)] for d, name in pairs]

    def on_duration(self, event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1
            self.seconds += duration
            self.names.append(str(kwargs.get("fun_name", "?")))
            self.durations.append(duration)

    def on_event(self, event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            self.cache_hits += 1


COMPILES = _CompileCounter()


def setup_jax(cache_dir: str | None) -> None:
    jax.monitoring.register_event_duration_secs_listener(COMPILES.on_duration)
    jax.monitoring.register_event_listener(COMPILES.on_event)
    if cache_dir:
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


LAYER_SIZES = (1000, 500, 250, 30, 250, 500, 1000)  # + output of 784
CODE_LAYER = 3  # index in LAYER_SIZES of the linear 30-unit code


def make_model(init: str, out_dim: int = 784) -> hk.Transformed:
    def w_init_for(fan_in: int):
        if init == "lecun_normal":
            return hk.initializers.RandomNormal(stddev=1.0 / math.sqrt(fan_in))
        return None  # Haiku default: TruncatedNormal(1/sqrt(fan_in))

    def func(x):
        x = x.reshape([x.shape[0], -1])
        fan_in = x.shape[-1]
        for i, width in enumerate(LAYER_SIZES):
            x = hk.Linear(width, w_init=w_init_for(fan_in))(x)
            fan_in = width
            if i != CODE_LAYER:
                x = jnp.tanh(x)
        return hk.Linear(out_dim, w_init=w_init_for(fan_in))(x)

    return hk.without_apply_rng(hk.transform(func))


def sigmoid_cross_entropy(logits, labels):
    """Elementwise, numerically stable (same formula as kfac-jax's examples/losses.py)."""
    zeros = jnp.zeros_like(logits)
    relu_logits = jnp.where(logits >= zeros, logits, zeros)
    neg_abs_logits = jnp.where(logits >= zeros, -logits, logits)
    return relu_logits - logits * labels + jnp.log1p(jnp.exp(neg_abs_logits))


def half_sq_norm(params):
    return 0.5 * sum(jnp.sum(jnp.square(p)) for p in jax.tree_util.tree_leaves(params))


def main(args: argparse.Namespace) -> int:
    t_process = time.perf_counter()
    setup_jax(args.cache_dir)
    images = np.load(args.images, mmap_mode="r")
    if args.limit is not None:
        images = images[: args.limit]
    images = np.ascontiguousarray(images, dtype=np.float32).reshape(len(images), -1)
    n, dim = images.shape
    lo, hi = float(images.min()), float(images.max())
    if lo < 0.0 or hi > 1.0:
        raise SystemExit(f"{args.images}: pixels in [{lo}, {hi}], expected [0, 1]")
    batch_size = args.batch_size
    if not 1 <= batch_size <= n:
        raise SystemExit(f"--batch-size must be in [1, {n}], got {batch_size}")
    steps_per_epoch = n // batch_size

    model = make_model(args.init, dim)
    l2 = args.l2

    def loss_fn(params, batch):
        logits = model.apply(params, batch)
        kfac_jax.register_sigmoid_cross_entropy_loss(logits, batch)
        ce = jnp.mean(jnp.sum(sigmoid_cross_entropy(logits, batch), axis=-1))
        return ce + l2 * half_sq_norm(params), dict(cross_entropy=ce)

    optimizer = kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(loss_fn, has_aux=True),
        l2_reg=l2,
        value_func_has_aux=True,
        multi_device=False,
        # examples/autoencoder_mnist/pipeline.py, optimizer.kfac:
        inverse_update_period=5,
        damping_adaptation_interval=5,
        num_burnin_steps=5,
        curvature_ema=0.95,
        use_adaptive_damping=True,
        use_adaptive_learning_rate=True,
        use_adaptive_momentum=True,
        damping_adaptation_decay=0.95,
        initial_damping=args.initial_damping,
        min_damping=1e-5,
        max_damping=1000.0,
    )

    # Full-set evaluation, chunked; the last chunk may be shorter (one more compile).
    @jax.jit
    def eval_chunk(params, x):
        logits = model.apply(params, x)
        ce = jnp.sum(sigmoid_cross_entropy(logits, x))
        err = jax.nn.sigmoid(logits) - x
        return ce, jnp.sum(err * err)

    images_dev = jnp.asarray(images)
    chunks = [images_dev[i: i + args.eval_chunk] for i in range(0, n, args.eval_chunk)]

    def evaluate(params):
        ce = se = 0.0
        for c in chunks:
            a, b = eval_chunk(params, c)
            ce += float(a)
            se += float(b)
        reg = float(l2 * half_sq_norm(params))
        return dict(objective=ce / n + reg, cross_entropy=ce / n, mse=se / n)

    def batches(seed):
        """Infinite stream of mini-batches (numpy permutation per epoch, drop remainder)."""
        rng = np.random.default_rng(seed)
        if batch_size == n:
            while True:
                yield images_dev
        while True:
            perm = rng.permutation(n)
            for i in range(steps_per_epoch):
                yield jnp.asarray(images[perm[i * batch_size: (i + 1) * batch_size]])

    def fresh(seed):
        key = jax.random.PRNGKey(seed)
        k_init, k_opt, k_steps = jax.random.split(key, 3)
        it = batches(seed)
        init_batch = jnp.asarray(images[:batch_size])
        params = model.init(k_init, init_batch)
        state = optimizer.init(params, k_opt, init_batch)
        return params, state, it, k_steps

    out = open(args.out, "w")

    def emit(rec):
        # NaN/inf (e.g. rho on steps without a damping update) are written as null.
        rec = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}
        out.write(json.dumps(rec) + "\n")
        out.flush()

    emit(dict(event="config", images=os.path.abspath(args.images), n=n, batch_size=batch_size,
              seconds=args.seconds, seed=args.seed, init=args.init, l2=l2,
              initial_damping=args.initial_damping, eval_every=args.eval_every,
              threads=len(os.sched_getaffinity(0)), jax=jax.__version__,
              kfac_jax=getattr(kfac_jax, "__version__", "?"), python=platform.python_version(),
              xla_flags=os.environ.get("XLA_FLAGS", "")))

    # ---- warm-up: compile every variant on throw-away copies --------------------------
    # The jitted step is traced again whenever an argument's type changes (e.g. a state
    # coming from init/burn-in rather than from a step), so the warm-up runs the same
    # chain as training does: step 0 (burn-in + plain step), then steps 4 (damping
    # update) and 5 (plain) on the state each call returns. Compiles during training are
    # counted (jax.monitoring) and reported in the end record.
    warm = {}
    if not args.no_warmup:
        t0 = time.perf_counter()
        params, state, it, key = fresh(args.seed)
        jax.block_until_ready(state)
        warm["init_s"] = time.perf_counter() - t0
        for name, gstep in (("step0_with_burnin_s", 0), ("step_damping_s", 4),
                            ("step_plain_s", 5)):
            t = time.perf_counter()
            key, k_step = jax.random.split(key)
            params, state, st = optimizer.step(params, state, k_step, data_iterator=it,
                                               global_step_int=gstep)
            float(st["loss"])
            warm[name] = time.perf_counter() - t
        t = time.perf_counter()
        evaluate(params)
        warm["eval_s"] = time.perf_counter() - t
        warm["total_s"] = time.perf_counter() - t0
        warm["compiles"] = COMPILES.count
        warm["backend_compile_s"] = COMPILES.seconds
        warm["persistent_cache_hits"] = COMPILES.cache_hits
        warm["slowest_compiles"] = COMPILES.slowest()
        warm["persistent_cache"] = args.cache_dir or None
        emit(dict(event="compile", **warm))

    # ---- training ---------------------------------------------------------------------
    params, state, it, key = fresh(args.seed)
    jax.block_until_ready((params, state))
    step = 0
    train_clock = 0.0
    eval_total = 0.0

    def do_eval():
        nonlocal eval_total
        t = time.perf_counter()
        r = evaluate(params)
        dt = time.perf_counter() - t
        eval_total += dt
        emit(dict(event="eval", step=step, wall_s=train_clock, eval_s=dt, **r))
        return r

    first = do_eval()
    COMPILES.reset()  # from here on, a compilation falls inside the training clock
    last_eval_clock = 0.0
    final = first
    seg_start = time.perf_counter()
    while True:
        key, k_step = jax.random.split(key)
        params, state, stats = optimizer.step(params, state, k_step, data_iterator=it,
                                              global_step_int=step)
        loss = float(stats["loss"])  # also synchronises
        step += 1
        train_clock = time.perf_counter() - seg_start
        if step % args.log_every == 0:
            emit(dict(event="step", step=step, wall_s=train_clock, batch_loss=loss,
                      learning_rate=float(stats["learning_rate"]),
                      momentum=float(stats["momentum"]), damping=float(stats["damping"]),
                      rho=float(stats["rho"])))
        done = (train_clock >= args.seconds or not math.isfinite(loss)
                or (args.max_steps is not None and step >= args.max_steps))
        if done or train_clock - last_eval_clock >= args.eval_every:
            final = do_eval()
            last_eval_clock = train_clock
            seg_start = time.perf_counter() - train_clock  # exclude the evaluation
        if done:
            break

    emit(dict(event="end", steps=step, wall_s=train_clock,
              steps_per_s=step / train_clock if train_clock > 0 else None,
              samples_per_s=step * batch_size / train_clock if train_clock > 0 else None,
              first_objective=first["objective"], final_objective=final["objective"],
              final_mse=final["mse"], eval_total_s=eval_total,
              compile_total_s=warm.get("total_s"), compiles_during_training=COMPILES.count,
              backend_compile_s_during_training=COMPILES.seconds,
              compiled_during_training=COMPILES.names[:20],
              process_s=time.perf_counter() - t_process))
    out.close()
    print(json.dumps(dict(steps=step, wall_s=round(train_clock, 2),
                          steps_per_s=round(step / max(train_clock, 1e-9), 3),
                          objective=final["objective"], mse=final["mse"],
                          compile_s=warm.get("total_s"),
                          compiles_during_training=COMPILES.count)))
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
