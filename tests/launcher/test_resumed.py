"""launcher/resumed.py: a saved config as overrides under this command line's (pure; the CLI test
is tests/trainer/test_resume_cli.py)."""

from __future__ import annotations

from hydra.core.override_parser.overrides_parser import OverridesParser

from launcher.resumed import carried_overrides, flatten, render, saved_config_path

DEFAULTS = {"model": {"name": "mlp", "l2": 0.0}, "trainer": {"epochs": 20, "resume": None, "dir": None},
            "kfac": {"enabled": False, "damping_act": [0.03], "disable_layers": []},
            "launcher": {"setup_only": False, "job_name": "kfac"}}


def test_render_reads_back_as_the_same_value():
    values = [None, True, False, 3, 1e-4, -2.5e-10, float("inf"), "mlp", "a b", "it's", "true", "null", "1.5",
              "/tmp/x y/z", [0.01, 1.0], ["ip1", "ip2"], [], "${x}"[0:1]]
    parser = OverridesParser.create()
    for value in values:
        parsed = parser.parse_overrides([f"k={render(value)}"])[0].value()
        assert parsed == value and type(parsed) is type(value), (value, render(value), parsed)


def test_the_saved_values_are_carried_except_those_given_here():
    saved = {"model": {"name": "mlp", "l2": 0.0}, "trainer": {"epochs": 2, "resume": None, "dir": "/data x"},
             "kfac": {"enabled": True, "damping_act": [0.1], "disable_layers": ["ip1", "ip2"]},
             "launcher": {"setup_only": True, "job_name": "old"}, "gone": {"key": 1}}
    assert carried_overrides(saved, DEFAULTS, DEFAULTS, []) == [
        "trainer.epochs=2", "trainer.dir='/data x'", "kfac.enabled=true", "kfac.damping_act=[0.1]",
        "kfac.disable_layers=[ip1,ip2]", "launcher.job_name=old"]  # not setup_only, nor a key gone from the schema
    # Named here (a leaf, a whole group), or changed by a group such as experiment=...: this command's.
    user = flatten(DEFAULTS) | {"kfac.damping_act": [0.5]}
    nested = {"model": DEFAULTS["model"], "trainer": DEFAULTS["trainer"], "launcher": DEFAULTS["launcher"],
              "kfac": {**DEFAULTS["kfac"], "damping_act": user["kfac.damping_act"]}}
    assert carried_overrides(saved, DEFAULTS, nested, ["trainer.epochs=20", "+launcher=local", "experiment=x"]) == [
        "trainer.dir='/data x'", "kfac.enabled=true", "kfac.disable_layers=[ip1,ip2]"]


def test_the_config_of_a_checkpoint_is_its_work_dirs(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    assert saved_config_path(tmp_path / "checkpoints" / "step_000001.pt") is None
    (tmp_path / "config.yaml").write_text("seed: 1\n")
    assert saved_config_path(tmp_path / "checkpoints" / "step_000001.pt") == tmp_path / "config.yaml"
    assert saved_config_path(tmp_path / "step_000001.pt") == tmp_path / "config.yaml"
