"""Extra-small single-level model: the original's experiments/super_tiny.py sizes, without its quantizer (K=8192,
depth 1, d_c 128 there). Only what differs from `base_config()` is set here."""

from abstractinator_jax.config import base_config


def get_config():
    c = base_config()
    c.run_name = "super_tiny"

    lv = c.levels[0]
    lv.D = 256  # model width
    lv.c_num_lm_encoder_layers = 2  # entropy-model blocks
    lv.c_num_compression_encoder_layers = 2  # compression blocks before pooling
    lv.c_output_length = 512  # segment slots per row
    lv.c_vq_d_c = 128  # code width, used once a quantizer is switched on (c_vq_K > 0)
    lv.d_layers = 2  # expander blocks

    top = c.top_transformer_config
    top.embed_dim = 256  # = levels[0].D
    top.dim = 384
    top.num_layers = 8
    top.num_heads = 12

    c.batch_size = 8
    c.gradient_accumulation_steps = 8  # 64 rows per optimizer step, as the original
    c.warmup_steps = 100
    return c
