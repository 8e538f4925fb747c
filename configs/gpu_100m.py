r"""A ~100M-parameter single-level model with its discrete top transformer, sized for one large GPU (an H100/H200) at
S=8192 in bfloat16: the config of issue 12's GPU throughput figure (bench/gpu_check.py). Only what differs from
`base_config()` is set here.

    python train.py --config configs/gpu_100m.py --config.data.path=../shared/data/tinystories_train.txt
    python bench/train_step.py --config configs/gpu_100m.py --batch_size 16 --sequence_length 8192

Sizing (`python bench/param_counts.py --config configs/gpu_100m.py`: 100,828,928 parameters):
- Width. Level 0 runs every block over every byte, so its width sets most of the FLOPs and how well a GPU is used:
  at D=768 a token's matmuls (SwiGLU's 12 D^2 multiply-adds per block, plus the projections) outweigh its
  element-wise work (norms, RoPE, residuals, segmentation, pooling) far more than at the default D=512, which a
  model-FLOPs utilization near half the chip's peak needs. 12 heads keep the standard-attention head width at 64.
- Depth. 2 entropy-model blocks, 2 compression blocks and a 3-block expander run over the bytes (72.2M parameters
  with the embedding, pooler and quantizer); the top transformer runs over segments, a few bytes each, so its 3
  blocks at 768 (28.6M) cost about 1/(bytes per segment) of their parameter count in FLOPs per byte. flops.py:
  ~390 MFLOP per byte for a train step at initialisation's segmentation (~24 bytes per segment on English text in
  the CPU smoke run of bench/gpu_check.py), ~450 at 3 bytes per segment.
- Segments. 4096 slots per 8192-byte row (a trained level cuts ~2.5-4 bytes per segment: BENCHMARKS.md), run by
  the top in 4 row buckets (1024 ... 4096 rows: 4 compiled branches, not the default 8, for a shorter compile);
  one quantizer stage of K=8192 codes of width 128 (the original's super_tiny quantizer); the top predicts codes.
- Batch. 16 rows x 8192 bytes = 131,072 bytes per step. XLA's memory analysis of this train step at batch 1
  (`bench/train_step.py --compile_only` on CPU with its memory-minimising scheduler,
  XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false): 5.5 GB of temporaries per 8192-byte row with
  remat 'none', 1.9 GB with 'block' (its stacks scanned, one block recomputed at a time), linear in the batch. That
  overstates a GPU, where cuDNN attention keeps none of the blocked sliding-window kernel's score arrays: at batch
  16, at most ~88 GB ('none') or ~31 GB ('block'), plus 1.2 GB of parameters and AdamW state (float32). 'none' fits
  one H200 (141 GB; bench/gpu_run.sh lets JAX take 94% of it); on an 80 GB H100 or smaller set remat='block'
  (bench/gpu_check.py measures both).
"""

from abstractinator_jax.config import base_config


def get_config():
    c = base_config()
    c.run_name = "gpu_100m"

    lv = c.levels[0]
    lv.D = 768  # model width of the byte level
    lv.c_heads = 12  # compressor heads (latent attention: per-head width c_head_dim = 64, the default)
    lv.c_num_lm_encoder_layers = 2  # entropy-model blocks
    lv.c_num_compression_encoder_layers = 2  # compression blocks before pooling
    lv.c_output_length = 4096  # segment slots per 8192-byte row (2 bytes per segment at least)
    lv.c_vq_K = 8192  # codes per stage (one stage)
    lv.c_vq_d_c = 128  # code width
    lv.d_layers = 3  # expander blocks
    lv.d_heads = 12  # expander heads (its latent attention's scoring width D // d_heads = 64)

    top = c.top_transformer_config
    top.embed_dim = 768  # = levels[0].D
    top.dim = 768
    top.num_layers = 3
    top.num_heads = 12
    top.continuous = False  # predicts the next segment's code through the quantizer's codebook

    c.use_top_code_lm = True  # the top trains with the level (stage 1)
    c.top_row_buckets = 4  # 1024, 2048, 3072 or 4096 top rows: 4 compiled branches (compile time on one GPU call)
    c.top_batch_chunks = 1  # the whole batch in one pass: chunks keep a CPU's caches warm; a GPU wants the work at once
    c.sequence_length = 8192  # bytes per row
    c.batch_size = 16  # rows per step: 131,072 bytes (see the docstring's memory estimate)
    c.dtype = "bfloat16"  # compute dtype; parameters and optimizer state stay float32
    c.attention_impl = "auto"  # cuDNN on a CUDA GPU in bfloat16, else XLA
    c.remat = "none"  # fits at batch 16 by the estimate above; 'block' where memory binds
    return c
