"""Sample text from a trained run: continue a prompt through the whole pyramid with cached, jitted decoding.

    python generate.py --workdir runs/stage2 --prompt "Once upon a time" --max_bytes 400
    python generate.py --workdir runs/stage2 --prompt_file prompts.txt --num_samples 4 --top_p 0.9 --json
    python generate.py --workdir runs/tiny --from_entropy_model --greedy

The model, mesh and settings come from the config saved with the checkpoint (latest step, or --step). Generation
needs a top transformer (`use_top_code_lm`), which proposes each new segment; `--from_entropy_model` instead samples
level 0's entropy model alone, a small causal byte LM (runs whose level 0 has c_entropy_model='logit'). Output is the
prompt and its continuation as UTF-8 text (bytes that do not decode become U+FFFD), or with --json one JSON object
per sample: prompt, continuation, bytes (new bytes, EOS not counted), stop ('eos' | 'max_bytes'), seconds (the wall
time of the whole batch, compilation included). `--config.<key>=value` changes a saved setting, e.g.
--config.levels[0].gen_max_segment_len=16.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from abstractinator_jax.checkpointing import CheckpointError
from abstractinator_jax.cli import define_saved_config_overrides, fail
from abstractinator_jax.config import ConfigError

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by train.py (holds checkpoints/).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to sample from. Default: the latest.")
_PROMPT = flags.DEFINE_string("prompt", None, "Text to continue. Default: the run's sample_text.")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "A UTF-8 file with one prompt per line (blank lines skipped).")
_MAX_BYTES = flags.DEFINE_integer("max_bytes", 256, "New bytes per sample at most (EOS stops a sample earlier).")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Softmax temperature of every sampling stage (0 = greedy).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely ids at each stage (0 = all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Keep the smallest set of most likely ids with this much mass (1 = all).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed; sample i of a run depends only on (seed, i).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Continuations per prompt (one batch).")
_GREEDY = flags.DEFINE_bool("greedy", False, "Always take the most likely id (ignores temperature, top_k, top_p).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object per sample instead of text.")
_FROM_LM = flags.DEFINE_bool(
    "from_entropy_model", False, "Sample from level 0's entropy model alone (a byte LM; needs c_entropy_model=logit)."
)


def _prompts(default: str) -> list[bytes]:
    if _PROMPT.value is not None and _PROMPT_FILE.value:
        fail("pass --prompt or --prompt_file, not both.")
    if _PROMPT_FILE.value:
        try:
            lines = Path(_PROMPT_FILE.value).read_bytes().splitlines()
        except OSError as e:
            fail(f"cannot read --prompt_file={_PROMPT_FILE.value!r}: {e.strerror or e}.")
        prompts = [line for line in lines if line.strip()]
        if not prompts:
            fail(f"--prompt_file={_PROMPT_FILE.value!r} holds no prompt (one per line).")
        return prompts
    return [(default if _PROMPT.value is None else _PROMPT.value).encode("utf-8")]


def main(argv):
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every step at INFO; keep stderr for errors
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; see python generate.py --help.")
    if not _WORKDIR.value:
        fail("missing --workdir; pass the run directory of a train.py run, e.g. --workdir runs/stage2.")
    if _MAX_BYTES.value < 1:
        fail(f"--max_bytes={_MAX_BYTES.value} must be >= 1.")
    if _NUM_SAMPLES.value < 1:
        fail(f"--num_samples={_NUM_SAMPLES.value} must be >= 1.")

    import jax
    from flax import linen as nn

    from abstractinator_jax import generation
    from abstractinator_jax.evaluation import restore_run
    from abstractinator_jax.sharding import LOGICAL_AXIS_RULES

    try:
        sp = generation.sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value, _GREEDY.value)
    except ValueError as e:
        fail(f"--{e}")
    overrides = config_flags.get_override_values(flags.FLAGS["config"])
    try:
        cfg, run, state = restore_run(
            _WORKDIR.value,
            _STEP.value,
            overrides,
            before_build=lambda c: generation.check_can_generate(c, _FROM_LM.value),
        )
        gen = generation.Generator(run.model, cfg, from_entropy_model=_FROM_LM.value)
    except (ConfigError, CheckpointError, generation.GenerationError) as e:
        fail(str(e))
    prompts = [p for p in _prompts(cfg.sample_text) for _ in range(_NUM_SAMPLES.value)]
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        results = generation.generate_text(
            gen, generation.model_variables(state), prompts, _MAX_BYTES.value, sp, _SEED.value, run.mesh
        )
    sys.stdout.reconfigure(encoding="utf-8", errors="replace")
    for i, r in enumerate(results):
        if _JSON.value:
            print(json.dumps(r, ensure_ascii=False))
        else:
            if len(results) > 1:
                print(f"--- sample {i} ({r['bytes']} bytes, stop: {r['stop']}) ---")
            print(r["prompt"] + r["continuation"])


if __name__ == "__main__":
    define_saved_config_overrides(sys.argv, "generate.py")
    app.run(main)
