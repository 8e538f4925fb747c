r"""Train an Abstractinator.

    python train.py --config configs/tiny.py --workdir runs/tiny
    python train.py --config configs/tiny.py \
        --config.data.path=../shared/data/tinystories_train.txt --config.max_steps=300

A second run with the same --workdir resumes from its latest intact checkpoint. TensorBoard: `tensorboard --logdir
<workdir>`. SIGTERM or Ctrl-C finishes the current step and writes a checkpoint (a second Ctrl-C exits at once).

Exit status: 0 done; 2 a problem to fix (config, data, workdir, checkpoint; one `error:` line); 3 training diverged
(too many skipped steps; lower the learning rate and rerun); 75 stopped by a signal after writing a checkpoint (rerun
the same command to resume); 130 a second Ctrl-C. See RELIABILITY.md.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from abstractinator_jax.checkpointing import CheckpointError
from abstractinator_jax.cli import check_config_args, fail
from abstractinator_jax.config import ConfigError
from abstractinator_jax.guard import TrainingDiverged
from abstractinator_jax.preemption import EXIT_PREEMPTED, Preemption

EXIT_DIVERGED = 3

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file under configs/.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, TensorBoard). Default: runs/<run_name>.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost",
    False,
    "Join several processes with jax.distributed.initialize() (a TPU pod slice, several GPU hosts). On TPU VMs and "
    "SLURM/MPI clusters the processes find each other; elsewhere pass the three flags below to every process.",
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "With --multihost: host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --multihost: how many processes in all.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --multihost: this process's index, 0..num_processes-1.")


def main(argv):
    del argv
    import jax

    if not flags.FLAGS["verbosity"].present:
        # Orbax logs every checkpoint step at INFO; keep the console for the progress bar and our own lines.
        absl_logging.set_verbosity(absl_logging.WARNING)

    if _MULTIHOST.value:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes (tests); others ignore it
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    from abstractinator_jax.train_loop import train

    cfg = _CONFIG.value
    workdir = _WORKDIR.value or f"runs/{cfg.run_name}"
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("abstractinator_jax").setLevel(logging.INFO)
    try:
        with Preemption() as preemption:  # from before the model is built: a signal during compilation counts too
            result = train(cfg, workdir, preemption=preemption)
    except (ConfigError, CheckpointError) as e:
        fail(str(e))
    except TrainingDiverged as e:
        fail(str(e), code=EXIT_DIVERGED)
    if result["preempted"]:
        print(
            f"stopped by {result['preempted']} at step {result['step']}: checkpoint written to {workdir}/checkpoints; "
            "rerun the same command to resume.",
            file=sys.stderr,
        )
        raise SystemExit(EXIT_PREEMPTED)
    print(f"done: step {result['step']}, workdir {workdir}")
    for k in (
        "bits_per_byte",
        "entropy/bits_per_byte",
        "entropy/loss",
        "level0/recon_bits_per_token_given_codes",
        "level0/entropy_model_bits_per_byte",
        "level0/recon_accuracy",
        "level0/input_tokens_per_segment",
    ):
        if k in result["eval"]:
            print(f"  eval {k} = {result['eval'][k]:.4f}")


if __name__ == "__main__":
    check_config_args(sys.argv)
    app.run(main)
