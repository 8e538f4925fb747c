"""Tiny single-level model: the original's experiments/tiny.py sizes, without its quantizer (configs/tiny_vq.py has
it). Only what differs from `base_config()` is set here.

    python train.py --config configs/tiny.py --config.data.path=../shared/data/tinystories_train.txt
"""

from abstractinator_jax.config import base_config


def get_config():
    c = base_config()
    c.run_name = "tiny"

    lv = c.levels[0]
    lv.D = 128  # model width
    lv.c_heads = 4  # compressor heads (width 32 each)
    lv.c_num_lm_encoder_layers = 2  # entropy-model blocks
    lv.c_num_compression_encoder_layers = 2  # compression blocks before pooling
    lv.c_output_length = 512  # segment slots per row
    lv.c_vq_d_c = 64  # code width, used once a quantizer is switched on (c_vq_K > 0)
    lv.d_layers = 4  # expander blocks

    top = c.top_transformer_config  # trained with --config.use_top_code_lm=True (stage 1) or in stage 2
    top.embed_dim = 128  # = levels[0].D
    top.dim = 256
    top.num_layers = 8
    top.continuous = True  # no quantizer: the top predicts the next row's vector

    # The original trains tiny at batch_size=32 x gradient_accumulation_steps=2; 8 x 1 keeps a CPU run short.
    # On an accelerator: --config.batch_size=32 --config.gradient_accumulation_steps=2.
    c.batch_size = 8
    c.warmup_steps = 100
    c.eval_interval = 100
    c.checkpoint_interval = 100
    return c
