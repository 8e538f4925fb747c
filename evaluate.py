"""Evaluate a trained run on held-out data and print its figures as one JSON object.

    python evaluate.py --workdir runs/tiny
    python evaluate.py --workdir runs/tiny --step 300 --show_segments 3
    python evaluate.py --workdir runs/tiny --data_path ../shared/data/tinystories_valid.txt --max_batches 16
    python evaluate.py --workdir runs/tiny --data_path held_out.jsonl --max_batches 0 --output result.json
    python evaluate.py --workdir runs/tiny --max_batches 4 --report runs/tiny/report.html

The model, mesh and data settings come from the config saved with the checkpoint (latest step, or --step); the eval
data is that run's held-out split (data.eval_path / data.eval_split, or the data.eval_fraction held out of the
training documents), unless --data_path names other files (.txt, .jsonl or .parquet). `--config.<key>=value` changes
any other saved setting (e.g. --config.batch_size=4, --config.data.max_eval_documents=0). The figures are those of
training's eval/* scalars, each a ratio of totals over the whole evaluation, plus `bits_per_byte` (the whole model's
code length per real UTF-8 byte, or null with `bits_per_byte_note` saying why); see the README's "Scoring". The JSON
object is the last line of stdout, and is also written to --output when given. `--report F.html` also writes the
segmentation report of the same data (segments, per-byte entropy and the boundary rule, summary plots, and for each
quantized level a codebook atlas, also as TSV beside the report); its paths are listed under "report".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from abstractinator_jax.checkpointing import CheckpointDamaged, CheckpointError
from abstractinator_jax.cli import define_saved_config_overrides, fail
from abstractinator_jax.config import ConfigError
from abstractinator_jax.evaluation import evaluate_run
from abstractinator_jax.recovery import intact_steps

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by train.py (holds checkpoints/).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to evaluate. Default: the latest.")
_DATA_PATH = flags.DEFINE_string(
    "data_path",
    None,
    "Evaluate on these files (a path, a glob or a comma-separated list; .txt/.jsonl/.parquet by extension) instead "
    "of the run's held-out split: sets data.path and data.eval_path (and data.source=auto).",
)
_MAX_BATCHES = flags.DEFINE_integer(
    "max_batches", None, "Evaluate at most this many batches of batch_size rows (sets eval_batches; 0 = all)."
)
_OUTPUT = flags.DEFINE_string("output", None, "Also write the JSON object to this file.")
_REPORT = flags.DEFINE_string(
    "report",
    None,
    "Also write a segmentation report of the same data to this HTML file (one self-contained page: segments, "
    "entropy, summary plots, codebook atlas) and each quantized level's atlas as <name>.level<k>.atlas.tsv beside it.",
)
_REPORT_ROWS = flags.DEFINE_integer("report_rows", 6, "Rows shown in detail in the --report (summaries use all).")
_SHOW_SEGMENTS = flags.DEFINE_integer(
    "show_segments", 0, "Print this many held-out rows cut into their segments ('|'), before the JSON line."
)


def main(argv):
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every step at INFO; keep stderr for errors
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; see python evaluate.py --help.")
    if not _WORKDIR.value:
        fail("missing --workdir; pass the run directory of a train.py run, e.g. --workdir runs/tiny.")
    for name, value in (("output", _OUTPUT.value), ("report", _REPORT.value)):
        if value and not Path(value).parent.is_dir():
            fail(f"--{name}={value!r}: its directory does not exist.")
    if _REPORT.value and not _REPORT.value.endswith((".html", ".htm")):
        fail(f"--report={_REPORT.value!r}: name an .html file, e.g. --report runs/x/report.html.")
    if _REPORT_ROWS.value < 0:
        fail(f"--report_rows={_REPORT_ROWS.value} must be >= 0.")
    overrides = config_flags.get_override_values(flags.FLAGS["config"])
    try:
        result, samples = evaluate_run(
            _WORKDIR.value,
            _STEP.value,
            _DATA_PATH.value,
            _MAX_BATCHES.value,
            overrides,
            _SHOW_SEGMENTS.value,
            report=_REPORT.value,
            report_rows=_REPORT_ROWS.value,
        )
    except CheckpointDamaged as e:
        intact = intact_steps(_WORKDIR.value, exclude=(e.step,))
        hint = f" (evaluate one with --step {intact[-1]})." if intact else "."
        fail(f"{e}. Intact steps: {intact or 'none'}{hint}")
    except (ConfigError, CheckpointError) as e:
        fail(str(e))
    line = json.dumps(result)
    if _OUTPUT.value:
        try:
            Path(_OUTPUT.value).write_text(line + "\n")
        except OSError as e:
            fail(f"--output={_OUTPUT.value!r}: cannot write it ({e.strerror or e}).")
    for i, text in enumerate(samples):
        print(f"--- segmented row {i} ---\n{text}")
    print(line)


if __name__ == "__main__":
    define_saved_config_overrides(sys.argv, "evaluate.py")
    app.run(main)
