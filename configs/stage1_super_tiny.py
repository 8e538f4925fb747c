r"""Stage 1 of the two-stage recipe (the original's experiments/stage1_super_tiny.py sizes): one level with a
quantizer, trained without the top transformer. Only what differs from `base_config()` is set here.

    python train.py --config configs/stage1_super_tiny.py --workdir runs/stage1
    python train.py --config configs/stage2_super_tiny.py --config.stage=2 --config.init_from=runs/stage1 \
        --workdir runs/stage2
"""

from abstractinator_jax.config import base_config


def configure_levels(c):
    """The pyramid and top transformer shared by stage 1 and stage 2 (stage 2 refuses a checkpoint whose levels
    differ)."""
    lv = c.levels[0]
    lv.D = 128  # model width
    lv.c_window = 64  # compressor attention window
    lv.c_num_lm_encoder_layers = 2  # entropy-model blocks
    lv.c_num_compression_encoder_layers = 1  # compression blocks before pooling
    lv.c_output_length = 512  # segment slots per row
    lv.c_vq_K = 2048  # codes per stage (one stage)
    lv.c_vq_d_c = 64  # code width
    lv.c_vq_decay = 0.99  # EMA decay (the original: 0.999 at batch 64)
    lv.c_vq_reset_interval = 50  # the original: 250 at batch 64; codes are used ~8x less often at batch 8
    lv.d_layers = 1  # expander blocks

    top = c.top_transformer_config
    top.embed_dim = 128  # = levels[0].D
    top.dim = 256
    top.num_layers = 8
    top.continuous = True  # predicts the next row's vector


def get_config():
    c = base_config()
    c.run_name = "stage1_super_tiny"
    configure_levels(c)
    c.batch_size = 8  # the original: 64 (on a GPU: --config.batch_size=64)
    c.warmup_steps = 100
    c.eval_interval = 100
    c.checkpoint_interval = 100
    return c
