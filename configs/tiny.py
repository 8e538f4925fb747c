"""Tiny single-level model (the reference's experiments/tiny.py sizes), no quantizer.

python train.py --config configs/tiny.py --config.data.path=../shared/data/tinystories_train.txt
"""

from abstractinator_jax.config import base_config


def get_config():
    c = base_config()
    c.run_name = "tiny"
    lv = c.levels[0]
    lv.D = 128
    lv.c_heads = 4
    lv.c_window = 128
    lv.c_num_shared_encoder_layers = 0
    lv.c_num_lm_encoder_layers = 2
    lv.c_num_compression_encoder_layers = 2
    lv.c_num_queries = 1
    lv.c_entropy_delta = 0.2
    lv.c_output_length = 512
    lv.c_vq_K = 0  # the reference's tiny uses K=1024, depth 1, d_c 64: see configs/tiny_vq.py (issue 3)
    lv.c_vq_d_c = 64
    lv.d_layers = 4
    lv.d_heads = 8
    lv.d_cross_window = 1
    lv.d_residual_conditioning = True
    lv.d_use_sqdist_logits = False
    lv.d_predict_specials = False
    lv.d_max_len = 1024
    lv.d_lo_d_c = 64

    top = c.top_transformer_config
    top.embed_dim = 128
    top.dim = 256
    top.num_layers = 8
    top.num_heads = 8
    top.ffn_dim_multiplier = 4
    top.continuous = True

    # The reference trains tiny with batch_size=32 x gradient_accumulation_steps=2; 8 x 1 keeps a CPU run short.
    # On an accelerator: --config.batch_size=32 --config.gradient_accumulation_steps=2.
    c.batch_size = 8
    c.gradient_accumulation_steps = 1
    c.sequence_length = 1024
    c.learning_rate = 5e-4
    c.warmup_steps = 100
    c.eval_interval = 100
    c.checkpoint_interval = 100
    c.data.dataset_name = "roneneldan/TinyStories"
    c.sample_text = "Once upon a time, in a land far, far away,"
    return c
