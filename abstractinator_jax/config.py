"""Configuration schema, defaults and validation.

Field names follow the PyTorch reference (AbstractinatorConfig, TopTransformerConfig, ExpConfig) so its users
feel at home. Every config file under configs/ starts from `base_config()` and only changes values; the schema
here is the single list of known keys, and `validate_config` rejects anything else with a message that names the
key and the fix.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any

from ml_collections import ConfigDict, FieldReference

log = logging.getLogger("abstractinator_jax")

# Byte vocabulary (docs/ARCHITECTURE.md 2).
BYTE_VOCAB = 260
BOS_ID, EOS_ID, PAD_ID, EOP_ID = 256, 257, 258, 259


class ConfigError(ValueError):
    """A configuration is unknown, contradictory or unusable. The message names the key and the fix."""


def _opt(value: Any, field_type: type) -> FieldReference:
    """An optional field that the command line can still set (ml_collections needs the type of a None)."""
    return FieldReference(value, field_type=field_type)


def level_defaults() -> ConfigDict:
    """One Abstractinator level (the reference's AbstractinatorConfig, plus the JAX port's own knobs)."""
    c = ConfigDict()
    # Shared / tokens.
    c.vocab_size = BYTE_VOCAB
    c.D = 512
    # Self-attention of the compressor blocks and the expander (docs/ARCHITECTURE.md 3.1): 'mla' (multi-head latent
    # attention, the original's) or 'mha' (standard multi-head attention). Pooling and cross-attention are standard.
    c.attention_type = "mla"
    c.ffn_mult = 4  # SwiGLU hidden = ffn_mult * D (the reference's encoder_ffn_dim_multiplier).
    # Compressor.
    c.c_heads = 8
    c.c_window = 128
    # Compressor MLA sizes (the expander's are derived from D and d_heads, as in the original: expander_mla_dims).
    c.c_head_dim = 64  # per-head width (MHA uses D // c_heads)
    c.c_kv_comp_dim = 64  # the per-token key/value latent, every head's value
    c.c_q_comp_dim = 128  # per-head query compression
    c.c_retr_dim = 32  # per-head scoring width, RoPE'd (even)
    c.c_num_encoder_layers = 6
    c.c_num_shared_encoder_layers = 0
    c.c_num_lm_encoder_layers = _opt(4, int)  # None -> c_num_encoder_layers
    c.c_num_compression_encoder_layers = _opt(None, int)  # None -> c_num_encoder_layers
    c.c_num_queries = 1
    c.c_entropy_model = "gaussian"  # 'gaussian' (reference default) or 'logit'
    c.c_entropy_delta = 0.2
    c.c_entropy_abs_threshold = _opt(None, float)
    c.c_output_length = 1024
    # Quantizer (docs/ARCHITECTURE.md 3.6); c_vq_K = 0 means no quantizer.
    c.c_vq_K = 0
    c.c_vq_depth = 1
    c.c_vq_d_c = _opt(None, int)
    c.c_vq_beta = 0.25
    c.c_vq_reset_interval = 250  # steps between dead-code resets (EMA codebooks); 0 = never
    c.c_vq_ema = True  # EMA codebook updates (else the codebook is trained by the codebook loss)
    c.c_vq_decay = 0.999
    c.c_vq_reset_fraction = 0.1  # at most this fraction of K codes replaced per reset
    c.c_vq_dead_threshold = 1.0  # EMA usage (codes per step) below which a code is dead
    c.c_vq_buffer_size = 65536  # ring buffer of recent pooled vectors, the reset's sources
    c.c_vq_vectors_per_step = 1024  # vectors written to the buffer per training step
    # Expander.
    c.d_layers = 9
    c.d_heads = 8
    c.d_window = 128  # causal self-attention window; 0 = full causal
    c.d_cross_window = 1
    c.d_residual_conditioning = True
    c.d_use_sqdist_logits = False
    c.d_lo_d_c = 64
    # Generation.
    c.gen_max_segment_len = 32  # cap on a generated segment's length (ids), a few times a typical mean segment
    # Loss weights.
    c.w_code_ce = 1.0
    c.w_byte_lm_ce = 1.0
    c.w_vq = 1.0
    return c


def num_lm_layers(lv: ConfigDict) -> int:
    """Blocks of a level's entropy branch (c_num_lm_encoder_layers, or c_num_encoder_layers when None)."""
    n = lv.c_num_lm_encoder_layers
    return lv.c_num_encoder_layers if n is None else n


def num_compression_layers(lv: ConfigDict) -> int:
    """Blocks of a level's compression branch (c_num_compression_encoder_layers, or c_num_encoder_layers when None)."""
    n = lv.c_num_compression_encoder_layers
    return lv.c_num_encoder_layers if n is None else n


# Level-0 settings that define the entropy model a stage-0 run trains (the embedding, the shared blocks and the entropy
# branch, with its window): stage 1 starts from a stage-0 run only when they are this config's. Segmentation settings
# (c_entropy_delta, c_entropy_abs_threshold) may differ; they do not change the model.
ENTROPY_MODEL_KEYS = (
    "vocab_size",
    "D",
    "attention_type",
    "ffn_mult",
    "c_heads",
    "c_window",
    "c_num_shared_encoder_layers",
    "c_num_lm_encoder_layers",
    "c_entropy_model",
)
_MLA_KEYS = ("c_head_dim", "c_kv_comp_dim", "c_q_comp_dim", "c_retr_dim")


def entropy_model_settings(lv: Mapping[str, Any]) -> dict:
    """A level's ENTROPY_MODEL_KEYS (a plain config dict, e.g. a checkpoint's): the entropy branch's resolved depth
    (c_num_lm_encoder_layers, or c_num_encoder_layers when None) and, for latent attention, its sizes."""
    out = {k: lv.get(k, "<missing>") for k in ENTROPY_MODEL_KEYS}
    if out["c_num_lm_encoder_layers"] is None:
        out["c_num_lm_encoder_layers"] = lv.get("c_num_encoder_layers", "<missing>")
    if out["attention_type"] == "mla":
        out.update({k: lv.get(k, "<missing>") for k in _MLA_KEYS})
    return out


def top_transformer_defaults() -> ConfigDict:
    """The top transformer (the reference's TopTransformerConfig)."""
    c = ConfigDict()
    c.embed_dim = 512
    c.dim = 512
    c.num_layers = 16
    c.num_heads = 8
    c.ffn_dim_multiplier = 4
    c.continuous = False
    c.attention_type = "mla"  # 'mla' (the original's) or 'mha'
    c.head_dim = 64  # MLA sizes, as the compressor's c_head_dim, c_kv_comp_dim, c_q_comp_dim, c_retr_dim
    c.kv_comp_dim = 64
    c.q_comp_dim = 128
    c.retr_dim = 32
    return c


def compressor_mla_dims(lv: ConfigDict) -> dict:
    """Sizes of a level's compressor latent attention (its c_* keys)."""
    return dict(
        head_dim=lv.c_head_dim, kv_comp_dim=lv.c_kv_comp_dim, q_comp_dim=lv.c_q_comp_dim, retr_dim=lv.c_retr_dim
    )


def expander_mla_dims(lv: ConfigDict) -> dict:
    """Sizes of a level's expander self-attention, derived as the original derives them (its decoder block passes
    kv_comp_dim = D // 16, q_comp_dim = D // 32, retr_dim = D // d_heads and leaves head_dim at its default 64)."""
    return dict(head_dim=64, kv_comp_dim=lv.D // 16, q_comp_dim=lv.D // 32, retr_dim=lv.D // lv.d_heads)


def top_mla_dims(top: ConfigDict) -> dict:
    """Sizes of the top transformer's latent attention."""
    return dict(head_dim=top.head_dim, kv_comp_dim=top.kv_comp_dim, q_comp_dim=top.q_comp_dim, retr_dim=top.retr_dim)


def data_defaults() -> ConfigDict:
    c = ConfigDict()
    # 'auto' (local files by extension when data.path is set, else 'hf') | 'hf' | 'text' | 'jsonl' | 'parquet' |
    # 'offline' (English text shipped with CPython: no download, no file)
    c.source = "auto"
    c.dataset_name = "roneneldan/TinyStories"
    c.dataset_config = _opt(None, str)
    c.train_split = "train"
    c.eval_split = "validation"
    c.text_column_name = "text"
    c.path = ""  # local file(s) for text/jsonl/parquet; a glob or comma-separated list
    c.eval_path = ""  # held-out file(s); empty -> hold out eval_fraction of the training documents
    c.separator = "<|endoftext|>"  # document separator for plain text; "" = one document per file
    c.eval_fraction = 0.02
    c.max_eval_documents = 512
    c.shuffle_seed = 0
    c.num_workers = 0  # grain worker processes; 0 = in-process
    return c


def base_config() -> ConfigDict:
    """The complete schema with its defaults. Config files call this and change values."""
    c = ConfigDict()
    c.run_name = "abstractinator"
    c.seed = 0
    # 0: level 0's entropy model alone (its embedding, shared blocks and entropy branch; a byte LM for 'logit');
    # 1: the pyramid (and the top when use_top_code_lm); 2: the top transformer on a frozen stage-1 pyramid.
    c.stage = 1
    # Stage 1: a stage-0 run to start level 0's entropy model from (optional); stage 2: the stage-1 run (required).
    # A workdir (its latest step), its checkpoints/ directory or one checkpoints/<step> directory.
    c.init_from = ""
    # Stage 1 with init_from (a stage-0 run): keep everything the stage-0 run trained (level 0's embedding, shared
    # blocks and entropy branch) frozen for the whole run: no gradient, no optimizer state. The embedding and the
    # shared blocks also feed the compression branch, so they are frozen for it too, and segmentation stays exactly
    # the stage-0 model's. False: those parameters start from stage 0 and train with the rest.
    c.freeze_entropy_model = False
    c.num_levels = 1
    c.levels = [level_defaults()]
    c.use_top_code_lm = False
    c.top_transformer_config = top_transformer_defaults()
    # The top loss enters the total as top_lm_loss_weight * (top_lm_mse_weight * MSE | top_lm_ce_weight * CE).
    c.top_lm_loss_weight = 1.0
    c.top_lm_mse_weight = 1.0
    c.top_lm_ce_weight = 1.0
    # Optimisation.
    c.learning_rate = 5e-4
    c.min_lr = 1e-6  # floor of the cosine decay (reference: scheduler_specific_kwargs.min_lr)
    c.warmup_steps = 1000
    c.weight_decay = 0.01
    c.adam_b1 = 0.9
    c.adam_b2 = 0.95
    c.gradient_clip_norm = 1.0
    c.gradient_accumulation_steps = 1
    # Step guard (guard.py): a step with a non-finite loss/gradient is skipped; this many skips in a row stop the run.
    c.max_consecutive_skipped_steps = 10
    c.loss_spike_factor = 0.0  # > 1: also skip a step whose loss exceeds this x the running mean loss; 0 = off
    c.batch_size = 16  # rows per micro-batch (global, over all devices)
    c.sequence_length = 1024
    c.max_steps = 10000
    # Numerics and devices.
    c.dtype = "float32"  # activation / compute dtype: float32 or bfloat16 (parameters are float32)
    c.attention_impl = "auto"  # 'auto' (cudnn on CUDA GPUs, else xla), 'xla', 'cudnn'
    # Rematerialization of every block stack (compressor stacks, expander, top transformer) in the train step:
    # 'none' keeps every activation for the backward pass; 'block' keeps only each block's input and recomputes the
    # rest; 'dots' also keeps the token matmuls' outputs (jax.checkpoint_policies.dots_with_no_batch_dims_saveable).
    # Same parameters and same values with each (checkpoints are interchangeable). 'none' by the benchmark (tiny +
    # top, B=8, S=2048, BENCHMARKS.md): the fastest on CPU; 'block' costs 12% step time and cuts XLA's temp memory
    # 4x (2.6 -> 0.64 GB; its stacks run as one lax.scan that recomputes one block at a time), 'dots' 1.7x: set
    # 'block' where memory binds (long rows, large batches, accelerators).
    c.remat = "none"
    # The top transformer's training and scoring pass runs over the smallest of this many equal prefixes of the top
    # level's slots that holds every valid row of the batch (one compiled branch each, its gradient computed in the
    # branch; the same loss and gradients as over every slot). 8 by the benchmark (tiny + top, B=8, S=1024,
    # BENCHMARKS.md): 2.3x the step speed of 1, compile 67 s instead of 50 s. 1 = every slot (the shortest compile).
    c.top_row_buckets = 8
    # ... and runs the batch in this many chunks of rows, one after another, each over its own bucket (the same loss and
    # gradients: top.bucketed_loss; at most: the largest divisor of the batch that is not more). 4 by the benchmark
    # (B=8, one process alternating the settings, BENCHMARKS.md): stage 2 at S=1024 1.94 s a step instead of 2.29 s
    # and 0.45 GB XLA temp instead of 1.47; tiny + top at S=1024 3.70-3.81 s instead of 4.16-4.27 s. 1 = the whole
    # batch at once.
    c.top_batch_chunks = 4
    c.mesh = ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})  # -1: all remaining devices
    # Logging, evaluation, checkpoints.
    c.log_interval = 10
    c.eval_interval = 500
    c.eval_batches = 8
    c.checkpoint_interval = 1000
    c.max_checkpoints_to_keep = 3
    # Generated sample: every eval_interval steps train.py writes `sample_max_bytes` bytes continuing sample_text
    # (generation.training_sampler) to TensorBoard as samples/generated; generate.py's default prompt.
    c.sample_text = "Once upon a time, there was a little girl named Lily."
    c.sample_max_bytes = 256  # 0 = no generated sample
    c.progress_bar = True
    c.data = data_defaults()
    return c


# ---------------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------------

_ENUMS = {
    "attention_type": ("mla", "mha"),
    "c_entropy_model": ("gaussian", "logit"),
    "dtype": ("float32", "bfloat16"),
    "remat": ("none", "block", "dots"),
    "attention_impl": ("auto", "xla", "cudnn"),
    "source": ("auto", "hf", "text", "jsonl", "parquet", "offline"),
}


# Keys that earlier versions accepted (most from the original's schema) and that nothing here reads, with the reason.
# Setting one is an unknown-key error that gives the reason; a checkpoint whose saved config holds one still loads
# (upgrade_saved_config drops it: none of them changed the model).
REMOVED_KEYS = {
    "": {
        "aux_lm_loss_weight": "the original never reads it when training; the entropy loss weight is "
        "levels[i].w_byte_lm_ce",
        "propagate_key_padding_mask": "the padding mask is always used (the original's False feeds PAD to the model as "
        "content)",
        "param_dtype": "parameters are always float32 (dtype sets the compute dtype)",
    },
    "levels": {
        "eos_id": "level 0's ids are the tokenizer's fixed specials (config.BOS_ID, EOS_ID, PAD_ID, EOP_ID)",
        "bos_id": "level 0's ids are the tokenizer's fixed specials (config.BOS_ID, EOS_ID, PAD_ID, EOP_ID)",
        "pad_id": "level 0's ids are the tokenizer's fixed specials (config.BOS_ID, EOS_ID, PAD_ID, EOP_ID)",
        "eop_id": "level 0's ids are the tokenizer's fixed specials (config.BOS_ID, EOS_ID, PAD_ID, EOP_ID)",
        "d_predict_specials": "the original has no special-token head (its special loss is always 0)",
        "w_special_ce": "the original has no special-token head (its special loss is always 0)",
        "d_max_len": "it only capped the original's generation loop; nothing here reads it",
    },
    "top_transformer_config": {
        "mse_weight": "the top loss weights are top_lm_mse_weight and top_lm_ce_weight (as in the original)",
        "ce_weight": "the top loss weights are top_lm_mse_weight and top_lm_ce_weight (as in the original)",
        "lm_window": "the original never reads it (the top transformer is full causal)",
        "lm_fixed_length": "the original never reads it",
        "lm_pad_id": "the original never reads it",
    },
}

# Keys added since checkpoints were first saved, with the value that reproduces the model those checkpoints hold.
ADDED_KEYS = {"": {"freeze_entropy_model": False}, "top_transformer_config": {"attention_type": "mha"}}


def upgrade_saved_config(saved: Mapping[str, Any]) -> tuple[dict, list[str]]:
    """A checkpoint's saved config dict in this version's schema: removed keys dropped (none changed the model),
    added keys filled in with the value the checkpoint's model was built with (e.g. standard attention for the top
    transformer of a checkpoint saved before it had `attention_type`). Returns (config dict, dropped key paths)."""
    out = {**ADDED_KEYS[""], **{k: v for k, v in saved.items() if k not in REMOVED_KEYS[""]}}
    dropped = [k for k in saved if k in REMOVED_KEYS[""]]
    if isinstance(out.get("levels"), list):
        out["levels"] = [
            {k: v for k, v in lv.items() if k not in REMOVED_KEYS["levels"]} if isinstance(lv, Mapping) else lv
            for lv in out["levels"]
        ]
        for i, lv in enumerate(saved["levels"]):
            if isinstance(lv, Mapping):
                dropped += [f"levels[{i}].{k}" for k in lv if k in REMOVED_KEYS["levels"]]
    top = out.get("top_transformer_config")
    if isinstance(top, Mapping):
        rm = REMOVED_KEYS["top_transformer_config"]
        dropped += [f"top_transformer_config.{k}" for k in top if k in rm]
        kept = {k: v for k, v in top.items() if k not in rm}
        out["top_transformer_config"] = {**ADDED_KEYS["top_transformer_config"], **kept}
    return out, dropped


def _is_dict(x: Any) -> bool:
    return isinstance(x, (Mapping, ConfigDict))


def _unknown_keys(cfg: Mapping[str, Any], schema: Mapping[str, Any], prefix: str, section: str = "") -> list[str]:
    problems = []
    for key in cfg:
        path = f"{prefix}{key}"
        if key not in schema:
            removed = REMOVED_KEYS.get(section, {}).get(key)
            close = difflib.get_close_matches(key, list(schema), n=1)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
            if removed:
                hint = f" It was removed: {removed}."
            problems.append(f"unknown config key '{path}'.{hint}")
            continue
        value, ref = cfg[key], schema[key]
        if _is_dict(ref) and _is_dict(value):
            problems += _unknown_keys(value, ref, f"{path}.", key)
        elif key == "levels":
            for i, lvl in enumerate(value):
                problems += _unknown_keys(lvl, level_defaults(), f"levels[{i}].", "levels")
    return problems


def _check_mla_sizes(prefix: str, sizes: dict, keys: dict) -> list[str]:
    """Latent attention sizes must be positive integers, and the RoPE'd retrieval width even."""
    p = []
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            p.append(f"{prefix}{keys[name]}={value!r} must be a positive integer for attention_type='mla'.")
        elif name == "retr_dim" and value % 2:
            p.append(f"{prefix}{keys[name]}={value} must be even (RoPE rotates pairs) for attention_type='mla'.")
    return p


def _check_pyramid(cfg: ConfigDict) -> list[str]:
    """Contradictions between levels, and between the top level and the top transformer."""
    p = []
    for i in range(1, len(cfg.levels)):
        lo, lv, k = cfg.levels[i - 1], cfg.levels[i], f"levels[{i}]"
        if lo.c_vq_K <= 0:
            p.append(f"{k} reconstructs the codes of levels[{i - 1}], which has no quantizer: set its c_vq_K > 0.")
        if lv.c_entropy_model != "gaussian":
            p.append(f"{k}.c_entropy_model must be 'gaussian' above level 0 (codes have no byte vocabulary).")
        lo_slots = lo.c_output_length
        if lv.c_output_length // lv.c_num_queries > lo_slots:
            p.append(
                f"{k}.c_output_length // c_num_queries = {lv.c_output_length // lv.c_num_queries} segment slots exceed "
                f"the {lo_slots} rows of levels[{i - 1}]; lower {k}.c_output_length."
            )
    if cfg.use_top_code_lm:
        top, lv = cfg.top_transformer_config, cfg.levels[-1]
        if top.embed_dim != lv.D:
            p.append(
                f"top_transformer_config.embed_dim={top.embed_dim} must equal the top level's D={lv.D} "
                f"(levels[{len(cfg.levels) - 1}].D)."
            )
        t = "top_transformer_config."
        if top.attention_type not in _ENUMS["attention_type"]:
            p.append(f"{t}attention_type={top.attention_type!r}; choose 'mla' (latent) or 'mha' (standard).")
        elif top.num_heads <= 0:
            p.append(f"{t}num_heads={top.num_heads} must be >= 1.")
        elif top.attention_type == "mha" and (top.dim % top.num_heads or (top.dim // top.num_heads) % 2):
            p.append(f"{t}dim={top.dim} must split into num_heads={top.num_heads} even-width heads.")
        elif top.attention_type == "mla":
            p += _check_mla_sizes(t, top_mla_dims(top), {k: k for k in top_mla_dims(top)})
        if not top.continuous and lv.c_vq_K <= 0:
            p.append(
                "top_transformer_config.continuous=False predicts codes, but the top level has no quantizer: set "
                f"levels[{len(cfg.levels) - 1}].c_vq_K or continuous=True."
            )
    return p


def _check_level(i: int, lv: ConfigDict) -> list[str]:
    p, k = [], f"levels[{i}]"
    if lv.attention_type not in _ENUMS["attention_type"]:
        p.append(f"{k}.attention_type={lv.attention_type!r}; choose 'mla' (latent) or 'mha' (standard).")
    elif lv.attention_type == "mla":
        p += _check_mla_sizes(f"{k}.", compressor_mla_dims(lv), {n: f"c_{n}" for n in compressor_mla_dims(lv)})
        if lv.D < 32:
            p.append(
                f"{k}.D={lv.D}: the expander's latent attention has q_comp_dim = D // 32 (as in the original), so D "
                "must be >= 32; or set attention_type='mha'."
            )
    if lv.c_entropy_model not in _ENUMS["c_entropy_model"]:
        p.append(f"{k}.c_entropy_model={lv.c_entropy_model!r}; choose 'gaussian' or 'logit'.")
    for heads_key in ("c_heads", "d_heads"):
        h = lv[heads_key]
        if h <= 0 or lv.D % h:
            p.append(f"{k}.D={lv.D} is not divisible by {k}.{heads_key}={h}; change one of them.")
        elif (lv.D // h) % 2:
            p.append(f"{k}.D // {k}.{heads_key} = {lv.D // h} is odd; RoPE needs an even head dimension.")
    if lv.c_window < 1:
        p.append(f"{k}.c_window={lv.c_window} must be >= 1.")
    if lv.d_window < 0:
        p.append(f"{k}.d_window={lv.d_window} must be >= 0 (0 means full causal attention).")
    if lv.d_cross_window < 0:
        p.append(f"{k}.d_cross_window={lv.d_cross_window} must be >= 0.")
    if lv.c_num_queries < 1 or lv.c_output_length % lv.c_num_queries:
        p.append(
            f"{k}.c_output_length={lv.c_output_length} must be a positive multiple of "
            f"{k}.c_num_queries={lv.c_num_queries}."
        )
    if i == 0 and lv.vocab_size != BYTE_VOCAB:
        p.append(f"{k}.vocab_size={lv.vocab_size}; level 0 reads bytes and needs vocab_size={BYTE_VOCAB}.")
    if lv.c_vq_K < 0:
        p.append(f"{k}.c_vq_K={lv.c_vq_K} must be >= 0 (0 turns the quantizer off).")
    if lv.c_vq_K > 0:
        if lv.c_vq_K <= 4:
            p.append(f"{k}.c_vq_K={lv.c_vq_K}: needs more than the 4 codes reserved for specials (or 0: no quantizer).")
        if lv.c_vq_depth < 1:
            p.append(f"{k}.c_vq_depth={lv.c_vq_depth} must be >= 1.")
        elif lv.c_vq_K**lv.c_vq_depth >= 2**31:
            p.append(f"{k}.c_vq_K ** c_vq_depth = {lv.c_vq_K}**{lv.c_vq_depth} overflows int32 code ids; lower one.")
        if lv.c_vq_d_c is not None and lv.c_vq_d_c < 1:
            p.append(f"{k}.c_vq_d_c={lv.c_vq_d_c} must be >= 1 (or None: D).")
        if not 0.0 < lv.c_vq_decay < 1.0:
            p.append(f"{k}.c_vq_decay={lv.c_vq_decay} must be in (0, 1).")
        if lv.c_vq_reset_interval < 0:
            p.append(f"{k}.c_vq_reset_interval={lv.c_vq_reset_interval} must be >= 0 (0 = never).")
        if lv.c_vq_reset_interval > 0 and not lv.c_vq_ema:
            p.append(f"{k}.c_vq_reset_interval needs c_vq_ema=True (dead codes are found by EMA usage); set it to 0.")
    if lv.d_lo_d_c < 1:
        p.append(f"{k}.d_lo_d_c={lv.d_lo_d_c} must be >= 1.")
    if lv.gen_max_segment_len < 1:
        p.append(f"{k}.gen_max_segment_len={lv.gen_max_segment_len} must be >= 1 (ids per generated segment).")
    return p


def _check_stage0(cfg: ConfigDict) -> list[str]:
    """Stage 0 (level 0's entropy model alone) and `freeze_entropy_model` (stage 1 from a stage-0 run)."""
    p = []
    if cfg.stage == 0:
        if cfg.use_top_code_lm:
            p.append(
                "stage=0 trains only level 0's entropy model (no pyramid, no top transformer): set "
                "use_top_code_lm=False (the top trains in stage 1 or 2)."
            )
        if cfg.init_from:
            p.append(
                f"init_from={cfg.init_from!r}: stage=0 trains the entropy model from scratch; init_from is read by "
                "stage 1 (a stage-0 run) and stage 2 (a stage-1 run)."
            )
        if _is_dict(cfg.levels[0]) and not cfg.levels[0].w_byte_lm_ce > 0:
            p.append(
                f"stage=0 trains level 0's entropy model by its loss alone: levels[0].w_byte_lm_ce="
                f"{cfg.levels[0].w_byte_lm_ce} must be > 0."
            )
    if cfg.freeze_entropy_model and not (cfg.stage == 1 and cfg.init_from):
        p.append(
            f"freeze_entropy_model=True (stage={cfg.stage}{', no init_from' if not cfg.init_from else ''}) keeps a "
            "stage-0 entropy model frozen in stage 1: it needs stage=1 and --config.init_from=<stage-0 run>; "
            "otherwise leave it False."
        )
    return p


def top_batch_chunks(batch: int, chunks: int) -> int:
    """The chunks the top transformer runs a batch of `batch` rows in for the setting `top_batch_chunks=chunks`: the
    largest divisor of `batch` that is at most `chunks`."""
    return max(d for d in range(1, max(1, min(chunks, batch)) + 1) if batch % d == 0)


def clamp_segment_slots(cfg: ConfigDict) -> list[str]:
    """Lower each level's segment slots (c_output_length // c_num_queries) to the rows it can have: level 0 has at
    most sequence_length segments, level k at most the slots of level k-1. Every extra slot would be wasted compute,
    so a run with short rows (e.g. --config.sequence_length=256 on a config made for 1024) gets fewer slots rather
    than an error. Changes `cfg` in place; returns one line per change (for a warning)."""
    notes = []
    rows = cfg.sequence_length
    for i, lv in enumerate(cfg.levels):
        lq = lv.c_num_queries
        if lq >= 1 and rows >= 1 and lv.c_output_length % lq == 0 and lv.c_output_length // lq > rows:
            notes.append(
                f"levels[{i}].c_output_length {lv.c_output_length} -> {rows * lq}: at most {rows} segments fit in "
                + (f"a row of sequence_length={rows}." if i == 0 else f"the {rows} rows that levels[{i - 1}] produces.")
            )
            lv.c_output_length = rows * lq
        rows = lv.c_output_length // max(lq, 1)
    return notes


def validate_config(cfg: ConfigDict) -> ConfigDict:
    """Raise ConfigError listing every problem (unknown keys, contradictions); return cfg otherwise. Segment slots
    that cannot all be used are clamped first (`clamp_segment_slots`, with a warning)."""
    problems = _unknown_keys(cfg, base_config(), "")
    if not problems and isinstance(cfg.sequence_length, int) and all(_is_dict(lv) for lv in cfg.levels):
        for note in clamp_segment_slots(cfg):
            log.warning("clamped %s", note)
    if not problems:
        if len(cfg.levels) != cfg.num_levels:
            problems.append(f"num_levels={cfg.num_levels} but {len(cfg.levels)} entries in 'levels'; make them agree.")
        if cfg.num_levels < 1:
            problems.append(f"num_levels={cfg.num_levels} must be >= 1.")
        problems += _check_pyramid(cfg)
        for key in ("dtype", "attention_impl", "remat"):
            if cfg[key] not in _ENUMS[key]:
                problems.append(f"{key}={cfg[key]!r}; choose one of {_ENUMS[key]}.")
        if cfg.data.source not in _ENUMS["source"]:
            problems.append(f"data.source={cfg.data.source!r}; choose one of {_ENUMS['source']}.")
        if cfg.data.source in ("text", "jsonl", "parquet") and not cfg.data.path:
            problems.append(f"data.source={cfg.data.source!r} needs data.path (e.g. --config.data.path=corpus.txt).")
        if cfg.stage not in (0, 1, 2):
            problems.append(f"stage={cfg.stage}; choose 0 (entropy model), 1 (pyramid) or 2 (top transformer).")
        problems += _check_stage0(cfg)
        if cfg.stage == 2 and not cfg.init_from:
            problems.append(
                "stage=2 trains the top transformer on a frozen stage-1 pyramid and needs init_from: "
                "--config.init_from=<stage-1 workdir, or its checkpoints/<step> directory>."
            )
        if cfg.stage == 2 and not cfg.use_top_code_lm:
            problems.append("stage=2 trains only the top transformer: set use_top_code_lm=True.")
        for key in (
            "batch_size",
            "sequence_length",
            "max_steps",
            "gradient_accumulation_steps",
            "log_interval",
            "eval_interval",
            "checkpoint_interval",
            "max_consecutive_skipped_steps",
            "top_row_buckets",
            "top_batch_chunks",
        ):
            if cfg[key] < 1:
                problems.append(f"{key}={cfg[key]} must be >= 1.")
        chunks = cfg.top_batch_chunks
        if cfg.use_top_code_lm and cfg.batch_size >= 1 and chunks >= 1 and cfg.batch_size % chunks:
            log.warning(
                "top_batch_chunks=%d does not divide batch_size=%d: the top runs the batch in %d chunks.",
                chunks,
                cfg.batch_size,
                top_batch_chunks(cfg.batch_size, chunks),
            )
        if cfg.sequence_length < 2:
            problems.append("sequence_length must be >= 2 (BOS + at least one byte).")
        if cfg.sample_max_bytes < 0:
            problems.append(f"sample_max_bytes={cfg.sample_max_bytes} must be >= 0 (0 = no generated sample).")
        if not isinstance(cfg.sample_text, str):
            problems.append(f"sample_text={cfg.sample_text!r} must be a string (the prompt of samples/generated).")
        else:
            try:
                cfg.sample_text.encode("utf-8")
            except UnicodeEncodeError as e:
                problems.append(f"sample_text is not encodable as UTF-8 ({e.reason}); generation reads its bytes.")
        if cfg.warmup_steps < 0:
            problems.append(f"warmup_steps={cfg.warmup_steps} must be >= 0.")
        if not (cfg.loss_spike_factor == 0 or cfg.loss_spike_factor > 1):
            problems.append(
                f"loss_spike_factor={cfg.loss_spike_factor} must be 0 (off) or > 1 (skip a step whose loss exceeds "
                "this many times the running mean)."
            )
        if cfg.min_lr > cfg.learning_rate:
            problems.append(f"min_lr={cfg.min_lr} exceeds learning_rate={cfg.learning_rate}.")
        for i, lv in enumerate(cfg.levels):
            problems += _check_level(i, lv)
    if problems:
        raise ConfigError("Invalid configuration:\n  - " + "\n  - ".join(problems))
    return cfg


# ---------------------------------------------------------------------------------------------------------------------
# Command-line overrides
# ---------------------------------------------------------------------------------------------------------------------

_OVERRIDE = re.compile(r"^--config\.([A-Za-z0-9_.\[\]]+)(=.*)?$")


def _resolve(cfg: Any, path: str) -> bool:
    node = cfg
    for part in re.findall(r"[A-Za-z0-9_]+|\[\d+\]", path):
        if part.startswith("["):
            idx = int(part[1:-1])
            if not isinstance(node, (list, tuple)) or idx >= len(node):
                return False
            node = node[idx]
        else:
            if not _is_dict(node) or part not in node:
                return False
            node = node[part]
    return True


def unknown_overrides(cfg: ConfigDict, argv: Iterable[str]) -> list[str]:
    """The `--config.<key>=...` arguments whose key the config does not have (for a clear error before absl's)."""
    bad = []
    for arg in argv:
        m = _OVERRIDE.match(arg)
        if m and not _resolve(cfg, m.group(1)):
            bad.append(m.group(1))
    return bad


def to_dict(cfg: Any) -> Any:
    """A plain, JSON-friendly copy (nested dicts and lists; for checkpoints and TensorBoard)."""
    if _is_dict(cfg):
        return {k: to_dict(cfg[k]) for k in cfg}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    return cfg


def from_dict(d: Mapping[str, Any]) -> ConfigDict:
    """Rebuild a full config from `to_dict` output (a checkpoint's saved config, of this version or an earlier one:
    see upgrade_saved_config), keeping the schema's optional-field types."""
    d, dropped = upgrade_saved_config(d)
    if dropped:
        log.info("ignoring saved config keys that this version no longer has: %s", ", ".join(dropped))
    cfg = base_config()
    _merge(cfg, d)
    return cfg


def _merge(dst: ConfigDict, src: Mapping[str, Any]) -> None:
    for key, value in src.items():
        if key == "levels":
            levels = []
            for lv in value:
                base = level_defaults()
                _merge(base, lv)
                levels.append(base)
            dst.levels = levels
        elif _is_dict(value) and key in dst and isinstance(dst[key], ConfigDict):
            _merge(dst[key], value)
        else:
            dst[key] = value


# Config keys that define the model's parameters: a checkpoint must agree on these to be resumed.
MODEL_KEYS = ("stage", "num_levels", "levels", "use_top_code_lm", "top_transformer_config", "freeze_entropy_model")
# Keys inside those sections that only steer generation: they may differ (or be missing from older checkpoints).
GENERATION_PREFIX = "gen_"


# Level settings that size a run, not the model: no parameter or state shape depends on them. A level's segment
# slots (c_output_length) follow the rows trained on (clamp_segment_slots lowers them for short rows), so stage 2 may
# run with other slots than its stage-1 run.
SLOT_KEYS = ("c_output_length",)


def model_config_differences(saved: dict, current: dict, keys=None, ignore: tuple[str, ...] = ()) -> list[str]:
    """Human-readable differences between the model sections of a checkpoint's saved config dict (of this version or
    an earlier one) and the current config dict, except in settings named in `ignore`. A differing attention_type
    says which override restores it."""
    saved, _ = upgrade_saved_config(saved)
    out = []

    def walk(a, b, path):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if k.startswith(GENERATION_PREFIX) or k in ignore:
                    continue
                walk(a.get(k, "<missing>"), b.get(k, "<missing>"), f"{path}.{k}" if path else k)
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{path}[{i}]")
        elif a != b:
            hint = f" (to use the checkpoint's: --config.{path}={a})" if path.endswith("attention_type") else ""
            out.append(f"{path}: checkpoint {a!r} vs config {b!r}{hint}")

    for key in keys or MODEL_KEYS:
        walk(saved.get(key, "<missing>"), current.get(key, "<missing>"), key)
    return out
