"""A two-level pyramid: level 0 compresses bytes into codes (configs/tiny_vq.py's level), level 1 compresses those
code rows again and reconstructs them through level 0's codebooks. Stage 1 (no top transformer).

    python train.py --config configs/two_level_tiny.py --config.data.path=../shared/data/tinystories_train.txt
"""

import copy
from pathlib import Path

from abstractinator_jax.cli import load_config_file


def get_config():
    c = load_config_file(Path(__file__).with_name("tiny_vq.py"))
    c.run_name = "two_level_tiny"
    lv1 = copy.deepcopy(c.levels[0])  # level 1 starts as level 0 (D=128, 4 heads, gaussian entropy model, ...)
    lv1.vocab_size = c.levels[0].c_vq_K ** c.levels[0].c_vq_depth  # informational: level 0's composed codes
    lv1.c_window = 32  # over level-0 code rows
    lv1.c_num_compression_encoder_layers = 1
    lv1.c_output_length = 128  # segment slots over level 0's 512 rows
    lv1.c_vq_K = 256
    lv1.c_vq_depth = 2  # composed ids up to 256**2, embedded and predicted per stage (never a 65536-row table)
    lv1.c_vq_d_c = 32
    lv1.d_layers = 2
    lv1.d_heads = 4
    lv1.d_window = 64
    c.levels = [c.levels[0], lv1]
    c.num_levels = 2
    c.top_transformer_config.embed_dim = lv1.D  # the top models level 1's rows
    return c
