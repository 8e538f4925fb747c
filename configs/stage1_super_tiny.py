r"""Stage 1 of the two-stage recipe (the reference's experiments/stage1_super_tiny.py sizes): one level with a
quantizer, trained without the top transformer.

    python train.py --config configs/stage1_super_tiny.py --workdir runs/stage1
    python train.py --config configs/stage2_super_tiny.py --config.stage=2 --config.init_from=runs/stage1 \
        --workdir runs/stage2
"""

from abstractinator_jax.config import base_config


def configure_levels(c):
    """The pyramid shared by stage 1 and stage 2 (stage 2 refuses a checkpoint whose levels differ)."""
    lv = c.levels[0]
    lv.D = 128
    lv.c_heads = 8
    lv.c_window = 64
    lv.c_num_shared_encoder_layers = 0
    lv.c_num_lm_encoder_layers = 2
    lv.c_num_compression_encoder_layers = 1
    lv.c_num_queries = 1
    lv.c_entropy_delta = 0.2
    lv.c_output_length = 512
    lv.c_vq_K = 2048
    lv.c_vq_depth = 1
    lv.c_vq_d_c = 64
    lv.c_vq_beta = 0.25
    lv.c_vq_decay = 0.99
    lv.c_vq_reset_interval = 50  # the reference: 250 at batch 64; codes are used ~8x less often at batch 8
    lv.d_layers = 1
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


def get_config():
    c = base_config()
    c.run_name = "stage1_super_tiny"
    configure_levels(c)
    c.stage = 1
    c.use_top_code_lm = False
    c.aux_lm_loss_weight = 0.1
    c.learning_rate = 5e-4
    c.batch_size = 8  # the reference: 64 (on a GPU: --config.batch_size=64)
    c.gradient_accumulation_steps = 1
    c.sequence_length = 1024
    c.warmup_steps = 100
    c.eval_interval = 100
    c.checkpoint_interval = 100
    c.data.dataset_name = "roneneldan/TinyStories"
    c.sample_text = "Once upon a time, in a land far, far away,"
    return c
