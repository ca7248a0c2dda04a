from __future__ import annotations

import pytest

from launcher.flags import FLAGS, FlagError, help_text, translate

# Every LBANN flag of docs/algorithm.md §1, with a value, and the override it must become.
TRANSLATIONS = [
    (["--nodes", "2"], ["launcher.nodes=2"]),
    (["--procs-per-node", "4"], ["launcher.procs_per_node=4"]),
    (["--partition", "pbatch"], ["launcher.partition=pbatch"]),
    (["--account", "hpcgroup"], ["launcher.account=hpcgroup"]),
    (["--reservation", "res1"], ["launcher.reservation=res1"]),
    (["--time-limit", "30"], ["launcher.time_limit=30"]),
    (["--job-name", "mnist"], ["launcher.job_name=mnist"]),
    (["--setup-only"], ["launcher.setup_only=true"]),
    (["--batch-job"], ["launcher.batch_job=true"]),
    (["--num_epochs", "3"], ["trainer.epochs=3"]),
    (["--num-epochs=3"], ["trainer.epochs=3"]),
    (["--mini_batch_size", "64"], ["trainer.mini_batch_size=64"]),
    (["--model", "cnn"], ["model=cnn"]),
    (["--optimizer", "momentum"], ["optimizer=momentum"]),
    (["--optimizer-learning-rate", "1e-1"], ["optimizer.learning_rate=0.1"]),
    (["--optimizer_learning_rate", "0.001"], ["optimizer.learning_rate=0.001"]),
    (["--optimizer-warmup-steps", "100"], ["optimizer.warmup_steps=100"]),
    (["--optimizer_schedule", "cosine"], ["optimizer.schedule=cosine"]),
    (["--kfac"], ["kfac.enabled=true"]),
    (["--kfac-damping-act", "0.01"], ["kfac.damping_act=[0.01]"]),
    (["--kfac-damping-err", "1"], ["kfac.damping_err=[1.0]"]),
    (["--kfac-damping-act", "0.1,0.01"], ["kfac.damping_act=[0.1,0.01]"]),
    (["--kfac-damping-err", "10 1"], ["kfac.damping_err=[10.0,1.0]"]),
    (["--kfac-damping-bn_act", "0.003"], ["kfac.damping_bn_act=[0.003]"]),
    (["--kfac-damping-bn_err", "0.004"], ["kfac.damping_bn_err=[0.004]"]),
    (["--kfac-damping-warmup-steps", "50"], ["kfac.damping_warmup_steps=50"]),
    (["--kfac-update-interval-init", "1"], ["kfac.update_interval_init=1"]),
    (["--kfac-update-interval-target", "10"], ["kfac.update_interval_target=10"]),
    (["--kfac-update-interval-steps", "100"], ["kfac.update_interval_steps=100"]),
    (["--kfac-compute-interval-steps", "5"], ["kfac.compute_interval_steps=5"]),
    (["--kfac-use-pi"], ["kfac.use_pi=true"]),
    (["--use-eigen"], ["kfac.use_eigen=true"]),
    (["--kfac-kronecker-decay", "0.95"], ["kfac.kronecker_decay=0.95"]),
    (["--kfac-inverse-strategy", "root"], ["kfac.inverse_strategy=root"]),
    (["--kfac-disable-layers", "ip1,ip3"], ["kfac.disable_layers=[ip1,ip3]"]),
    (["--kfac-learning-rate-factor", "0.5"], ["kfac.learning_rate_factor=0.5"]),
    (["--print-matrix"], ["kfac.print_matrix=true"]),
    (["--print-matrix-summary"], ["kfac.print_matrix_summary=true"]),
    (["--kfac-print-time"], ["kfac.print_time=true"]),
    (["--seed", "7"], ["seed=7"]),
]


@pytest.mark.parametrize("argv,expected", TRANSLATIONS)
def test_each_flag_translates_to_its_override(argv, expected):
    assert translate(argv) == expected


def test_every_flag_is_covered_by_the_table():
    covered = {a[0].split("=")[0].replace("_", "-") for a, _ in TRANSLATIONS}
    assert covered == set(FLAGS)


def test_lbann_readme_command_and_hydra_arguments_mix():
    argv = ["--nodes", "1", "--procs-per-node", "4", "--model", "mlp", "--optimizer", "sgd",
            "--optimizer-learning-rate", "1e-1", "--kfac", "--kfac-damping-act", "0.01",
            "--kfac-damping-err", "1", "trainer.test_every_epoch=true", "-m", "seed=1,2",
            "--cfg", "job"]
    assert translate(argv) == [
        "launcher.nodes=1", "launcher.procs_per_node=4", "model=mlp", "optimizer=sgd",
        "optimizer.learning_rate=0.1", "kfac.enabled=true", "kfac.damping_act=[0.01]",
        "kfac.damping_err=[1.0]", "trainer.test_every_epoch=true", "-m", "seed=1,2", "--cfg", "job"]


BAD = [
    (["--bogus"], "--bogus: unknown flag"),
    (["--model", "foo"], "--model: 'foo' is not one of autoencoder, cnn, mlp"),
    (["--mini_batch_size", "0"], "--mini_batch_size: expected an integer >= 1, got 0"),
    (["--optimizer-learning-rate", "abc"], "--optimizer-learning-rate: expected a number, got 'abc'"),
    (["--num_epochs", "-1"], "--num_epochs: expected an integer >= 1, got -1"),
    (["--optimizer", "lbfgs"], "--optimizer: 'lbfgs' is not one of adagrad, adam, adamw, momentum, rmsprop, sgd"),
    (["--kfac-damping-act", "0.01,1"], "--kfac-damping-act: init 0.01 < target 1 is not allowed"),
    (["--kfac-damping-act", "1,2,3"], "--kfac-damping-act: expected one value or 'init,target'"),
    (["--kfac-kronecker-decay", "1.5"], "--kfac-kronecker-decay: expected a number in [0, 1)"),
    (["--nodes"], "--nodes: missing value"),
    (["--kfac=1"], "--kfac: takes no value"),
    (["--optimizer-learning-rate", "nan"], "expected a finite number"),
    (["--kfac-inverse-strategy", "random"], "'random' is not one of all, each, root, balanced"),
    (["--optimizer-warmup-steps", "-1"], "--optimizer-warmup-steps: expected an integer >= 0, got -1"),
    (["--optimizer-schedule", "linear"], "--optimizer-schedule: 'linear' is not one of constant, cosine, step"),
]


@pytest.mark.parametrize("argv,message", BAD)
def test_bad_input_names_the_flag_and_allowed_values(argv, message):
    with pytest.raises(FlagError) as err:
        translate(argv)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_help_lists_every_flag():
    text = help_text()
    for name in FLAGS:
        assert name in text
