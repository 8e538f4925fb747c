"""Every config key is live or gone: removed keys are unknown-key errors that say why, old checkpoints' saved configs
(with removed keys, and from before the configs switched to multi-head latent attention) compare and rebuild without
a traceback, and each shipped config's parameters per component equal the PyTorch original's plus the itemised
differences (bench/param_counts.py, whose formula was checked against the original built with torch)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import traverse_util

from abstractinator_jax.cli import load_config_file
from abstractinator_jax.config import (
    ConfigError,
    base_config,
    from_dict,
    model_config_differences,
    to_dict,
    unknown_overrides,
    validate_config,
)
from abstractinator_jax.evaluation import run_config
from abstractinator_jax.model import AbstractinatorPyramid
from tests.helpers import tiny_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import param_counts  # noqa: E402


@pytest.mark.parametrize(
    "path, key",
    [
        ("aux_lm_loss_weight", "aux_lm_loss_weight"),
        ("levels[0].d_max_len", "d_max_len"),
        ("top_transformer_config.lm_window", "lm_window"),
    ],
)
def test_a_removed_key_is_an_unknown_key_with_its_reason(path, key):
    cfg = base_config()
    assert unknown_overrides(cfg, [f"--config.{path}=1"]) == [path]
    section = cfg if "." not in path else cfg.levels[0] if path.startswith("levels") else cfg.top_transformer_config
    section[key] = 1
    with pytest.raises(ConfigError, match=re.escape(f"unknown config key '{path}'. It was removed")):
        validate_config(cfg)


def test_sample_text_is_live_and_checked():
    """sample_text, once removed, is the prompt of training's samples/generated again: a key, validated."""
    cfg = base_config()
    assert unknown_overrides(cfg, ["--config.sample_text=Hello", "--config.sample_max_bytes=8"]) == []
    cfg.sample_text = "\ud800"  # a lone surrogate: no UTF-8 bytes to generate from
    with pytest.raises(ConfigError, match="sample_text"):
        validate_config(cfg)
    cfg.sample_text, cfg.sample_max_bytes = "Once", -1
    with pytest.raises(ConfigError, match="sample_max_bytes"):
        validate_config(cfg)


def _mha_era_saved_config(cfg) -> dict:
    """`cfg` as a checkpoint saved before this version would hold it: standard attention, the removed keys, no
    top attention_type."""
    d = to_dict(cfg)
    d.update(aux_lm_loss_weight=0.1, propagate_key_padding_mask=True, param_dtype="float32")
    for lv in d["levels"]:
        lv.update(attention_type="mha", eos_id=257, bos_id=256, pad_id=258, eop_id=259, d_max_len=1024)
        lv.update(d_predict_specials=False, w_special_ce=1.0)
    top = d["top_transformer_config"]
    del top["attention_type"]
    top.update(mse_weight=1.0, ce_weight=1.0, lm_window=128, lm_fixed_length=1024, lm_pad_id=258)
    return d


def _param_shapes(cfg) -> dict:
    model = AbstractinatorPyramid(cfg)
    ids = jnp.zeros((1, cfg.sequence_length), jnp.int32)
    tree = jax.eval_shape(lambda: model.init({"params": jax.random.key(0), "vq": jax.random.key(1)}, ids, ids == 1))
    return {k: getattr(v, "value", v).shape for k, v in traverse_util.flatten_dict(tree["params"]).items()}


def test_an_mha_era_checkpoint_config_compares_and_rebuilds():
    cfg = tiny_config(attention="mla")
    cfg.use_top_code_lm = True
    cfg.top_transformer_config.update(embed_dim=32, dim=32, num_layers=1, num_heads=2, continuous=True)
    saved = _mha_era_saved_config(cfg)
    # Resuming with the current (latent attention) config: the only differences are the attention types, each
    # with the override that restores the checkpoint's; the removed keys are not differences.
    diffs = model_config_differences(saved, to_dict(cfg))
    assert diffs == [
        "levels[0].attention_type: checkpoint 'mha' vs config 'mla' (to use the checkpoint's: "
        "--config.levels[0].attention_type=mha)",
        "top_transformer_config.attention_type: checkpoint 'mha' vs config 'mla' (to use the checkpoint's: "
        "--config.top_transformer_config.attention_type=mha)",
    ]
    # Evaluating it: the saved config rebuilds (validated) as the standard-attention model it was trained as.
    old = run_config(saved, None, None, {})
    assert old.levels[0].attention_type == "mha" and old.top_transformer_config.attention_type == "mha"
    mha = tiny_config(attention="mla")
    mha.use_top_code_lm = True
    mha.top_transformer_config.update(embed_dim=32, dim=32, num_layers=1, num_heads=2, continuous=True)
    mha.levels[0].attention_type = "mha"
    mha.top_transformer_config.attention_type = "mha"
    assert _param_shapes(old) == _param_shapes(mha)
    assert model_config_differences(saved, to_dict(mha)) == []
    # A current config round-trips unchanged.
    assert to_dict(from_dict(to_dict(cfg))) == to_dict(cfg)


@pytest.mark.parametrize("name", ["stage2_super_tiny", "super_tiny", "tiny", "two_level_tiny"])
def test_parameters_per_component_are_the_originals_plus_the_itemised_differences(name):
    cfg = load_config_file(str(ROOT / "configs" / f"{name}.py"))
    cfg.init_from = cfg.init_from or "unused"
    cfg.sequence_length = 64
    validate_config(cfg)
    ours, original, diffs = param_counts.ours(cfg), param_counts.original_counts(cfg), param_counts.differences(cfg)
    for key in ours:
        if key.startswith("level") and not key.startswith("level0."):
            continue  # the original builds its upper levels like level 0 (not wired to the level below)
        expected = original.get(key, 0) + sum(delta for delta, _ in diffs.get(key, []))
        assert ours[key] == expected, (key, ours[key], original.get(key), diffs.get(key))
