r"""configs/tiny.py with the original's quantizer: one level, K=1024 codes, depth 1, d_c 64 (docs/ARCHITECTURE.md 3.6).

    python train.py --config configs/tiny_vq.py --config.data.path=../shared/data/tinystories_train.txt \
        --config.max_steps=500
"""

from pathlib import Path

from abstractinator_jax.cli import load_config_file


def get_config():
    c = load_config_file(Path(__file__).with_name("tiny.py"))
    c.run_name = "tiny_vq"
    lv = c.levels[0]
    lv.c_vq_K = 1024  # codes per stage (one stage; tiny.py sets the code width c_vq_d_c = 64)
    lv.c_vq_decay = 0.99  # EMA decay (the original: 0.999 at batch 64)
    # The original resets every 250 steps with batches of 64 rows; at 8 rows a step codes are used ~8x less often,
    # so dead codes are recycled more often.
    lv.c_vq_reset_interval = 50
    return c
