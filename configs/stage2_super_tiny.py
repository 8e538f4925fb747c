r"""Stage 2 of the two-stage recipe: the stage-1 pyramid, frozen, and the top transformer trained over its code rows
(the reference's experiments/stage2_super_tiny.py top transformer).

    python train.py --config configs/stage2_super_tiny.py --config.stage=2 --config.init_from=runs/stage1 \
        --workdir runs/stage2
"""

from pathlib import Path

from abstractinator_jax.cli import load_config_file


def get_config():
    c = load_config_file(Path(__file__).with_name("stage1_super_tiny.py"))
    c.run_name = "stage2_super_tiny"
    c.stage = 2
    c.init_from = ""  # a stage-1 workdir (its latest checkpoint) or <workdir>/checkpoints/<step>
    c.use_top_code_lm = True  # only the top transformer trains
    # The step is mostly the top transformer, whose cost follows the rows it runs over: 16 row buckets (steps of 32
    # slots) fit a trained pyramid's ~200 rows per 512 bytes more tightly than 8 (B=8, S=512: 1.24 s per step
    # instead of 1.38 s, BENCHMARKS.md). Each bucket is a compiled branch of the top transformer alone.
    c.top_row_buckets = 16
    return c
