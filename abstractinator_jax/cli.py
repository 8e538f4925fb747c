"""Command-line helpers shared by train.py, evaluate.py and bench/: loading a config file, and clear one-line errors
(`error: ...`, exit 2) for unknown `--config.<key>` overrides and other bad input, raised before absl or JAX would
print a traceback."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from .config import base_config, unknown_overrides


def fail(message: str, code: int = 2):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def load_config_file(path: str):
    """Import a config file and return its get_config()."""
    p = Path(path)
    if not p.is_file():
        fail(f"config file {path!r} does not exist; pass e.g. --config configs/tiny.py")
    spec = importlib.util.spec_from_file_location(f"_config_{p.stem}", p)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        fail(f"config file {path!r} has no get_config() function.")
    return module.get_config()


def _config_path(argv) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def check_config_args(argv) -> None:
    """Reject unknown `--config.<key>` overrides with one clear message (the final config, overrides applied, is
    validated by the program itself)."""
    if any(a in ("-h", "--help", "--helpfull", "--helpshort") for a in argv[1:]):
        return  # absl prints the help
    path = _config_path(argv)
    if path is None:
        fail("missing --config; pass e.g. --config configs/tiny.py")
    cfg = load_config_file(path)
    bad = unknown_overrides(cfg, argv)
    if bad:
        fail(
            "unknown config key(s): "
            + ", ".join(f"'{b}'" for b in bad)
            + f". Keys are those of {path} (see abstractinator_jax/config.py for the full list)."
        )


def define_saved_config_overrides(argv, program: str) -> None:
    """For programs that read the config saved with a checkpoint (evaluate.py, generate.py): reject `--config FILE`
    and unknown `--config.<key>` overrides with one clear line, then define the `--config.<key>=value` flag, typed by
    the schema. Call before `app.run`: the flag parses sys.argv when it is defined and would raise a traceback on an
    unknown key."""
    from absl import flags
    from ml_collections import config_flags

    for arg in argv[1:]:
        if arg == "--config" or arg.startswith("--config="):
            fail(f"{program} reads the config saved with the checkpoint; change settings with --config.<key>=value.")
    bad = unknown_overrides(base_config(), argv)
    if bad:
        fail("unknown config key(s): " + ", ".join(f"'{b}'" for b in bad) + " (see abstractinator_jax/config.py).")
    config_flags.DEFINE_config_dict(
        "config", base_config(), "Overrides of the run's saved config: --config.<key>=value.", lock_config=True
    )
    flags.FLAGS["config"].default_as_str = None  # --help: the defaults are the run's saved config, not the schema's
