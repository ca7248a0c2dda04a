"""The kfac config group: defaults, OmegaConf schema, validation messages naming the key."""

from __future__ import annotations

import dataclasses

from omegaconf import OmegaConf

from kfac_callback.config import KFACConfig, validate_kfac


def test_defaults_and_structured_schema() -> None:
    cfg = OmegaConf.structured(KFACConfig)
    assert cfg.damping_act == [0.03] and cfg.damping_bn_err == [0.03]
    assert cfg.kronecker_decay == 0.99 and cfg.inverse_strategy == "all"
    assert cfg.disable_layers == [] and cfg.inverse_dtype == "float32"
    assert validate_kfac(cfg) == []
    merged = OmegaConf.merge(cfg, {"damping_act": [0.1, 0.01], "use_eigen": True})
    obj = OmegaConf.to_object(merged)
    assert obj.damping_act == [0.1, 0.01] and obj.use_eigen is True
    assert [f.name for f in dataclasses.fields(KFACConfig)][0] == "enabled"


def test_every_error_is_reported_naming_its_key() -> None:
    cfg = KFACConfig(damping_act=[0.01, 1.0], damping_err=[-1.0], damping_bn_act=[1, 2, 3],
                     kronecker_decay=1.0, update_interval_init=0, compute_interval_steps=0,
                     inverse_strategy="fastest", inverse_dtype="float16")
    errors = validate_kfac(cfg)
    assert ("kfac.damping_act: init 0.01 < target 1 is not allowed "
            "(damping warms DOWN from init to target)") in errors
    keys = [e.split(":")[0] for e in errors]
    assert keys == ["kfac.damping_act", "kfac.damping_err", "kfac.damping_bn_act",
                    "kfac.update_interval_init", "kfac.compute_interval_steps",
                    "kfac.kronecker_decay", "kfac.inverse_strategy", "kfac.inverse_dtype"]


def test_too_short_warmup_is_refused() -> None:
    errors = validate_kfac(KFACConfig(damping_act=[1.0, 0.001], damping_warmup_steps=2))
    assert len(errors) == 1 and errors[0].startswith("kfac.damping_act:")
    assert "damping_warmup_steps >= 6" in errors[0]
