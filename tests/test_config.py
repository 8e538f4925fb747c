"""Config schema helpers: segment slots clamped to what rows can hold, top batch chunks that do not divide the batch,
and logical axis names that must be known."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from abstractinator_jax import axes
from abstractinator_jax.cli import load_config_file
from abstractinator_jax.config import ConfigError, validate_config
from abstractinator_jax.layers import constrain, kernel_init
from abstractinator_jax.sharding import LOGICAL_AXIS_RULES

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_short_rows_clamp_segment_slots_with_a_warning(caplog):
    cfg = load_config_file(CONFIGS / "tiny.py")
    cfg.sequence_length = 256  # tiny has 512 slots
    with caplog.at_level(logging.WARNING, logger="abstractinator_jax"):
        validate_config(cfg)
    assert cfg.levels[0].c_output_length == 256
    assert any("c_output_length 512 -> 256" in r.getMessage() for r in caplog.records)
    caplog.clear()
    validate_config(cfg)  # already clamped: nothing more to say
    assert not caplog.records


def test_top_batch_chunks_that_do_not_divide_the_batch_warn_and_name_what_runs(caplog):
    cfg = load_config_file(CONFIGS / "tiny.py")
    cfg.use_top_code_lm = True
    cfg.batch_size, cfg.top_batch_chunks = 6, 4
    with caplog.at_level(logging.WARNING, logger="abstractinator_jax"):
        validate_config(cfg)
    assert any("top_batch_chunks=4 does not divide batch_size=6" in r.getMessage() for r in caplog.records)
    assert any("in 3 chunks" in r.getMessage() for r in caplog.records)
    caplog.clear()
    cfg.batch_size = 8  # divides: nothing to say
    with caplog.at_level(logging.WARNING, logger="abstractinator_jax"):
        validate_config(cfg)
    assert not [r for r in caplog.records if "top_batch_chunks" in r.getMessage()]
    cfg.top_batch_chunks = 0
    with pytest.raises(ConfigError, match="top_batch_chunks=0 must be >= 1"):
        validate_config(cfg)


def test_clamping_cascades_up_the_pyramid():
    cfg = load_config_file(CONFIGS / "two_level_tiny.py")
    cfg.sequence_length = 64
    validate_config(cfg)
    assert (cfg.levels[0].c_output_length, cfg.levels[1].c_output_length) == (64, 64)
    cfg = load_config_file(CONFIGS / "two_level_tiny.py")
    validate_config(cfg)  # rows long enough: nothing changes
    assert (cfg.levels[0].c_output_length, cfg.levels[1].c_output_length) == (512, 128)


def test_every_logical_axis_has_a_rule_and_unknown_names_fail():
    ruled = {name for name, _ in LOGICAL_AXIS_RULES}
    assert ruled == axes.PARAM_AXES | axes.ACTIVATION_AXES
    with pytest.raises(ValueError, match="unknown logical axis"):
        kernel_init(axes.EMBED, "embedd")
    with pytest.raises(ValueError, match="unknown logical axis"):
        constrain(None, (axes.BATCH, "lenght"))
    with pytest.raises(ValueError, match="unknown logical axis"):
        kernel_init(axes.BATCH, axes.EMBED)  # an activation name on a parameter
