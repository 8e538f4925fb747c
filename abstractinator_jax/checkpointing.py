"""Checkpoints of a training run: a thin, strict wrapper over Orbax.

A run's checkpoints live in ``<workdir>/checkpoints/<step>``. Each step is one atomic Orbax composite checkpoint
(Orbax writes ``<step>.orbax-checkpoint-tmp`` and renames it once every item is written) with up to three items:

* ``state``:  the training state, any pytree of arrays (``StandardSave``): params, optimizer state, step, RNG keys,
  mutable model collections. Supported leaves: ``jax.Array`` (any sharding), ``numpy.ndarray``, NumPy scalars and
  Python ``int``/``float``/``bool``; ``None`` and empty containers are kept as structure. RNG keys: both raw
  ``uint32`` keys (``jax.random.PRNGKey``) and typed keys (``jax.random.key``, any impl) round-trip; Orbax stores a
  typed key as its ``key_data`` plus the impl name and rebuilds the typed key on restore.
* ``data``:   the grain iterator's state (``grain.checkpoint.CheckpointSave``), when an iterator is given. Restoring
  it resumes the iterator at exactly the next batch.
* ``config``: the run's config as JSON (``ocp.args.JsonSave``), when given.

Saving is asynchronous (the device-to-host copy happens before ``save`` returns; the file writes run in the
background): call ``wait()`` before reading the files and ``close()`` (or use the manager as a context manager)
before the process exits, or the last checkpoint may be lost. Every failure, including one of an earlier
background write, raises ``CheckpointError``; nothing is dropped silently.

Restoring checks the saved tree against the caller's template first and reports every path whose key, shape or
dtype differs, instead of Orbax's deep traceback.

Integrity: every save records checksums of what it writes (integrity.py: per-array sums of the state computed on the
devices, sha256 of the iterator state and the config) in the step's Orbax metadata (``_CHECKPOINT_METADATA``), and
every restore recomputes them from what it read. A step that cannot be read, or reads back differently, raises
``CheckpointDamaged`` (one line: the step and the first problem); ``intact_steps`` lists the steps that verify.
Checkpoints saved before checksums existed restore with a warning that they are unverified.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from . import integrity
from .config import to_dict

__all__ = [
    "CHECKPOINT_SUBDIR",
    "CheckpointDamaged",
    "CheckpointError",
    "CheckpointManager",
    "resolve_init_from",
]

CHECKPOINT_SUBDIR = "checkpoints"
_STATE, _DATA, _CONFIG = "state", "data", "config"
_MAX_LISTED = 20  # mismatching paths listed in one error message
_INTEGRITY = "integrity"  # key of the checksums in a step's custom metadata
_STEP_METADATA_FILE = "_CHECKPOINT_METADATA"

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or does not fit the model. The message names the problem and the fix."""


class CheckpointDamaged(CheckpointError):
    """A checkpoint step cannot be read or does not match the checksums recorded when it was saved."""

    def __init__(self, directory: Path, step: int, problems: list[str]):
        self.step, self.problems = step, problems
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        super().__init__(f"checkpoint step {step} under {directory} is damaged: {problems[0]}{more}")


def _short(e: BaseException, limit: int = 240) -> str:
    """An exception as one short line (TensorStore errors carry pages of spec)."""
    text = " ".join(str(e).split("See full TensorStore details")[0].split()) or "(no message)"
    text = f"{type(e).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------------------------------
# Tree helpers
# ---------------------------------------------------------------------------------------------------------------------


def _key_str(key: Any) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def _path_str(path: tuple[Any, ...]) -> str:
    """A key path as 'params/level_0/dense/kernel'. Orbax stores tuples as lists and namedtuples / dataclasses as
    dicts of their fields, so sequence indices and attribute names both map to plain path components."""
    return "/".join(_key_str(k) for k in path) or "<root>"


def _is_key_dtype(dtype: Any) -> bool:
    return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _is_python_scalar(x: Any) -> bool:
    return isinstance(x, bool | int | float) and not isinstance(x, np.generic)


def _check_saveable(state: Any) -> None:
    bad = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if not isinstance(leaf, jax.Array | np.ndarray | np.generic) and not _is_python_scalar(leaf):
            bad.append(f"{_path_str(path)}: {type(leaf).__name__}")
    if bad:
        raise CheckpointError(
            "the training state holds leaves that cannot be checkpointed (only jax/numpy arrays, numpy scalars and "
            "Python int/float/bool are supported; keep other values out of the state pytree, e.g. as "
            "flax.struct.field(pytree_node=False)):\n  - " + "\n  - ".join(bad[:_MAX_LISTED])
        )


def _to_abstract_leaf(path: tuple[Any, ...], x: Any) -> Any:
    """A template leaf Orbax's StandardRestore accepts, keeping shardings and typed-key dtypes."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, np.generic):
        return np.asarray(x)  # Orbax rejects NumPy scalars as templates; restored as a 0-d array, converted back.
    if isinstance(x, np.ndarray) or _is_python_scalar(x):
        return x
    raise CheckpointError(
        f"restore template leaf {_path_str(path)} has type {type(x).__name__}; use jax.ShapeDtypeStruct, "
        "jax/numpy arrays or Python scalars."
    )


def _expected_stored(leaf: Any) -> tuple[tuple[int, ...], Any]:
    """(shape, dtype) a template leaf should find on disk; dtype None means 'do not compare'."""
    if _is_python_scalar(leaf):
        return (), None
    if _is_key_dtype(leaf.dtype):
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
        return tuple(data.shape), np.dtype(data.dtype)
    return tuple(leaf.shape), np.dtype(leaf.dtype)


def _is_meta_leaf(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, Mapping)


def _saved_leaves(saved_tree: Any) -> dict[str, Any]:
    """{path: ArrayMetadata/ScalarMetadata} of a checkpoint's state tree."""
    return {
        _path_str(p): m
        for p, m in jax.tree_util.tree_flatten_with_path(saved_tree, is_leaf=_is_meta_leaf)[0]
        if _is_meta_leaf(m)
    }


def _tree_differences(saved_tree: Any, template: Any, partial: bool) -> list[str]:
    saved = _saved_leaves(saved_tree)
    wanted = {_path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(template)[0]}
    problems = []
    for path in sorted(set(wanted) - set(saved)):
        problems.append(f"{path}: in the model but not in the checkpoint")
    if not partial:
        for path in sorted(set(saved) - set(wanted)):
            problems.append(f"{path}: in the checkpoint but not in the model")
    for path in sorted(set(saved) & set(wanted)):
        meta, leaf = saved[path], wanted[path]
        shape, dtype = _expected_stored(leaf)
        saved_shape = tuple(meta.shape) if meta.shape is not None else ()
        if saved_shape != shape:
            problems.append(f"{path}: checkpoint {saved_shape} vs model {shape}")
            continue
        python_scalar_on_disk = type(meta).__name__ == "ScalarMetadata"
        if dtype is not None and not python_scalar_on_disk and np.dtype(meta.dtype) != dtype:
            problems.append(f"{path}: checkpoint dtype {np.dtype(meta.dtype)} vs model dtype {dtype}")
    return problems


def _sharding_problems(restored: Any, abstract: Any) -> list[str]:
    problems = []
    pairs = zip(jax.tree_util.tree_flatten_with_path(abstract)[0], jax.tree_util.tree_leaves(restored), strict=True)
    for (path, want), got in pairs:
        sharding = getattr(want, "sharding", None)
        if sharding is None or not isinstance(got, jax.Array):
            continue
        if not got.sharding.is_equivalent_to(sharding, got.ndim):
            problems.append(f"{_path_str(path)}: restored {got.sharding} vs requested {sharding}")
    return problems


def _config_to_dict(config: Any) -> dict:
    plain = to_dict(config)
    if not isinstance(plain, dict):
        raise CheckpointError(f"config must be a ConfigDict or a mapping, got {type(config).__name__}.")
    try:
        return json.loads(json.dumps(plain, allow_nan=True))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"the config cannot be stored as JSON ({e}); keep config values JSON-friendly.") from e


def _summarise(problems: list[str]) -> str:
    shown = problems[:_MAX_LISTED]
    more = len(problems) - len(shown)
    return "\n  - " + "\n  - ".join(shown) + (f"\n  ... and {more} more" if more else "")


# ---------------------------------------------------------------------------------------------------------------------
# The manager
# ---------------------------------------------------------------------------------------------------------------------


def _item_handlers(partial: bool = False) -> dict[str, Any]:
    state_handler = ocp.PyTreeCheckpointHandler() if partial else ocp.StandardCheckpointHandler()
    return {_STATE: state_handler, _DATA: grain.checkpoint.CheckpointHandler(), _CONFIG: ocp.JsonCheckpointHandler()}


class CheckpointManager:
    """Saves and restores a run's checkpoints under ``<workdir>/checkpoints``.

    Constructing a manager creates nothing on disk; the directory is created by the first ``save``. Keep at most
    ``max_to_keep`` checkpoints (``None`` keeps all); ``save`` without ``force`` only writes steps that
    ``save_interval_steps`` divides. Every process of a multi-host job must call ``save`` and ``restore``.
    """

    def __init__(self, workdir: str | os.PathLike, max_to_keep: int | None = 3, save_interval_steps: int = 1):
        # Orbax needs absolute paths (a relative one fails only in its background commit thread).
        self.workdir = Path(os.path.expanduser(os.fspath(workdir))).absolute()
        self.directory = self.workdir / CHECKPOINT_SUBDIR
        self._max_to_keep = max_to_keep
        self._save_interval_steps = save_interval_steps
        self._mngr = self._new_manager(partial=False)
        self._partial_mngr: ocp.CheckpointManager | None = None
        self._closed = False
        self._pending_step: int | None = None
        self._unverified_warned: set[int] = set()

    def _new_manager(self, partial: bool) -> ocp.CheckpointManager:
        if partial:  # only restores
            options = ocp.CheckpointManagerOptions(create=False, read_only=True, save_interval_steps=0)
        else:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=self._max_to_keep,
                save_interval_steps=self._save_interval_steps,
                create=False,  # created by the first save, so reading a mistyped path leaves no stray directories
            )
        return ocp.CheckpointManager(self.directory, options=options, item_handlers=_item_handlers(partial))

    def __repr__(self) -> str:
        return f"CheckpointManager({str(self.directory)!r}, steps={self.all_steps()})"

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- queries -------------------------------------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Steps with a finished (or in-flight, in this process) checkpoint, oldest first."""
        return sorted(int(s) for s in self._mngr.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def _resolve_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(
                f"no checkpoint under {self.directory}; check --workdir / --config.init_from "
                "(a run workdir, its checkpoints/ directory, or checkpoints/<step>)."
            )
        if step is None:
            return steps[-1]
        if int(step) not in steps:
            raise CheckpointError(
                f"no checkpoint for step {int(step)} under {self.directory}; available steps: {steps}. "
                "Pick one of them, or omit the step to use the latest."
            )
        return int(step)

    def _item_metadata(self, step: int) -> Any:
        try:
            metadata = self._mngr.item_metadata(step)
        except Exception as e:  # an incomplete or foreign directory
            raise CheckpointDamaged(
                self.directory, step, [f"its metadata cannot be read ({_short(e)}); it is incomplete or foreign"]
            ) from e
        if metadata is not None and _STATE in self._items(metadata) and metadata[_STATE] is None:
            missing = self.directory / str(step) / _STATE / "_METADATA"
            raise CheckpointDamaged(self.directory, step, [f"the state's metadata {missing} is missing or unreadable"])
        return metadata

    def saved_state_keys(self, step: int) -> set[str]:
        """The top-level keys of the state saved at ``step`` (e.g. to restore a checkpoint of an older version that
        lacks a newer part of the state)."""
        metadata = self._item_metadata(step)
        tree = getattr(metadata[_STATE], "tree", None) if _STATE in self._items(metadata) else None
        return {str(k) for k in tree} if isinstance(tree, Mapping) else set()

    def _saved_checksums(self, step: int) -> dict | None:
        """The checksums recorded at save time, or None for a checkpoint saved before they existed."""
        path = self.directory / str(step) / _STEP_METADATA_FILE
        if not path.is_file():
            raise CheckpointDamaged(self.directory, step, [f"{path} is missing"])
        try:
            custom = json.loads(path.read_text()).get("custom_metadata") or {}
        except (OSError, ValueError, AttributeError) as e:
            raise CheckpointDamaged(self.directory, step, [f"{path} cannot be read ({_short(e)})"]) from e
        found = custom.get(_INTEGRITY)
        if found is None:
            if step not in self._unverified_warned:
                self._unverified_warned.add(step)
                log.warning(
                    "checkpoint step %d under %s has no checksums (saved by an older version); not verified",
                    step,
                    self.directory,
                )
            return None
        if not isinstance(found, dict) or found.get("format") != integrity.FORMAT:
            raise CheckpointDamaged(self.directory, step, [f"{path} holds checksums in an unknown format"])
        return found

    def verify(self, step: int, state: Any = None, data_iterator: Any = None, config: Any = None) -> None:
        """Raise CheckpointDamaged unless the restored parts given match the checksums saved with ``step``. ``state``
        may be a subtree of the saved state (a partial restore): only its paths are compared."""
        saved = self._saved_checksums(step)
        if saved is None:
            return
        problems = []
        if state is not None:
            got = integrity.array_checksums(state)
            want = {p: c for p, c in saved[_STATE].items() if p in got}
            problems += integrity.compare(want, got, "array")
            problems += [f"array {p}: restored but has no saved checksum" for p in got if p not in saved[_STATE]]
        if data_iterator is not None and integrity.json_digest(data_iterator.get_state()) != saved.get(_DATA):
            problems.append("the data iterator's state reads back differently from the one saved")
        if config is not None and integrity.json_digest(config) != saved.get(_CONFIG):
            problems.append("the config reads back differently from the one saved")
        if problems:
            raise CheckpointDamaged(self.directory, step, problems)

    def intact_steps(self, abstract_state: Any = None, exclude: tuple[int, ...] = ()) -> list[int]:
        """Steps (oldest first) that restore and match their checksums; reads every step, so it is slow for big
        states. ``abstract_state``: the restore template (None: the saved tree as is)."""
        good = []
        for step in self.all_steps():
            if step in exclude:
                continue
            try:
                self.restore(step, abstract_state=abstract_state)
            except CheckpointDamaged:
                continue
            good.append(step)
        return good

    @staticmethod
    def _items(metadata: Any) -> set[str]:
        return set(metadata.keys()) if metadata is not None else set()

    # -- save ----------------------------------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        state: Any,
        data_iterator: Any = None,
        config: Any = None,
        force: bool = False,
    ) -> bool:
        """Start writing one checkpoint of ``state`` (+ iterator state, + config) at ``step``.

        Returns True when a checkpoint was started; False when ``step`` is already saved (nothing to do) or, without
        ``force``, when ``save_interval_steps`` does not divide ``step``. Raises ``CheckpointError`` on any failure,
        including an earlier background write's, and when ``step`` is older than the newest saved step (mixing it
        in would let the retention policy delete newer checkpoints).
        """
        self._check_open()
        step = int(step)
        if self._pending_step is not None:
            self.wait()  # surface a failed background write of the previous checkpoint before going on
        steps = self.all_steps()
        if step in steps:
            log.info("checkpoint for step %d already exists under %s; not saving it again", step, self.directory)
            return False
        if steps and step < steps[-1]:
            raise CheckpointError(
                f"cannot save step {step}: {self.directory} already holds the newer step {steps[-1]}. Resume from "
                "the latest checkpoint, use a fresh --workdir, or delete the newer steps."
            )
        _check_saveable(state)
        items: dict[str, Any] = {_STATE: ocp.args.StandardSave(state)}
        if data_iterator is not None:
            if not (hasattr(data_iterator, "get_state") and hasattr(data_iterator, "set_state")):
                raise CheckpointError(
                    f"data_iterator of type {type(data_iterator).__name__} has no get_state/set_state; pass a grain "
                    "iterator (iter(grain.IterDataset) or iter(grain.DataLoader))."
                )
            items[_DATA] = grain.checkpoint.CheckpointSave(data_iterator)
        checksums: dict[str, Any] = {"format": integrity.FORMAT, _STATE: integrity.array_checksums(state)}
        if data_iterator is not None:
            checksums[_DATA] = integrity.json_digest(data_iterator.get_state())
        if config is not None:
            items[_CONFIG] = ocp.args.JsonSave(_config_to_dict(config))
            checksums[_CONFIG] = integrity.json_digest(_config_to_dict(config))
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            saved = self._mngr.save(
                step, args=ocp.args.Composite(**items), force=force, custom_metadata={_INTEGRITY: checksums}
            )
        except Exception as e:
            raise CheckpointError(
                f"saving the checkpoint for step {step} under {self.directory} failed: {type(e).__name__}: {e}"
            ) from e
        if saved:
            self._pending_step = step
        return bool(saved)

    def wait(self) -> None:
        """Block until every started save is on disk; raise ``CheckpointError`` if one failed."""
        try:
            self._mngr.wait_until_finished()
            self._mngr.check_for_errors()
        except Exception as e:
            raise CheckpointError(f"writing a checkpoint under {self.directory} failed: {type(e).__name__}: {e}") from e
        pending, self._pending_step = self._pending_step, None
        if pending is None:
            return
        self._mngr.reload()  # re-read the directory: a step whose commit failed is not listed
        if pending not in self._mngr.all_steps():
            raise CheckpointError(
                f"the checkpoint for step {pending} under {self.directory} was not completed (see the log above for "
                "Orbax's error); the previous checkpoints are intact."
            )

    def reload(self) -> None:
        """Re-read the directory (after steps were moved or deleted by hand)."""
        self._mngr.reload()

    def check_background_save(self) -> None:
        """Raise ``CheckpointError`` if a background save has finished and failed; never blocks on one in progress.
        Cheap enough to call every step, so a failed save stops a run at once rather than at the next save."""
        if self._pending_step is not None and not self._mngr.is_saving_in_progress():
            self.wait()

    def close(self) -> None:
        """Wait for pending saves, then release Orbax's resources. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        finally:
            self._mngr.close()
            if self._partial_mngr is not None:
                self._partial_mngr.close()

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError(f"the checkpoint manager for {self.directory} is closed; create a new one.")

    # -- restore -------------------------------------------------------------------------------------------------------

    def restore_config(self, step: int | None = None) -> dict | None:
        """The config saved with ``step`` (default: latest) as a dict, or None if it was saved without one."""
        self._check_open()
        self.wait()
        step = self._resolve_step(step)
        if _CONFIG not in self._items(self._item_metadata(step)):
            return None
        try:
            config = self._mngr.restore(step, args=ocp.args.Composite(**{_CONFIG: ocp.args.JsonRestore()}))[_CONFIG]
        except Exception as e:
            raise CheckpointDamaged(self.directory, step, [f"its config cannot be read ({_short(e)})"]) from e
        self.verify(step, config=config)
        return config

    def restore(
        self,
        step: int | None = None,
        abstract_state: Any = None,
        data_iterator: Any = None,
        *,
        partial: bool = False,
    ) -> tuple[Any, dict | None]:
        """Restore ``step`` (default: latest). Returns ``(state, config_dict_or_None)``.

        ``abstract_state`` is the template: a pytree of ``jax.ShapeDtypeStruct`` (set ``.sharding`` to restore onto
        a mesh) or of concrete arrays (their shardings are used). Restored jax arrays carry the template's shardings;
        NumPy leaves come back as NumPy, NumPy scalars as NumPy scalars, Python scalars as Python scalars, typed RNG
        keys as typed keys. A ``ShapeDtypeStruct`` without a sharding restores with the sharding recorded in the
        checkpoint (which only works on the same device layout). Before restoring, the saved tree is compared with
        the template and every differing path (missing/extra key, shape, dtype) is reported in one
        ``CheckpointError``.

        ``abstract_state=None`` restores the saved tree as is (tuples come back as lists, namedtuples and
        dataclasses as dicts, arrays with their saved shardings): for inspection only.

        ``partial=True`` restores only the template's subtree of the saved state (e.g. ``{'params': ...}`` of a
        stage-1 run for stage-2 ``init_from``); keys the template lacks are skipped, not reported.

        ``data_iterator`` (a grain iterator) is restored in place, so its next batch is the one after the
        checkpoint; the checkpoint must hold iterator state then.
        """
        self._check_open()
        self.wait()
        step = self._resolve_step(step)
        metadata = self._item_metadata(step)
        items = self._items(metadata)
        if _STATE not in items:
            raise CheckpointError(f"checkpoint step {step} under {self.directory} holds no training state.")
        if data_iterator is not None and _DATA not in items:
            raise CheckpointError(
                f"checkpoint step {step} under {self.directory} holds no data-iterator state (it was saved without "
                "data_iterator); pass data_iterator=None to start the data from the beginning."
            )

        abstract = None
        if abstract_state is not None:
            abstract = jax.tree_util.tree_map_with_path(_to_abstract_leaf, abstract_state)
            problems = _tree_differences(metadata[_STATE].tree, abstract, partial)
            if problems:
                raise CheckpointError(
                    f"checkpoint step {step} under {self.directory} does not match the model's state:"
                    f"{_summarise(problems)}\nIt was written by a different model/optimizer configuration: compare "
                    "the configs (CheckpointManager.restore_config), or use a fresh --workdir."
                )
        elif partial:
            raise CheckpointError("restore(partial=True) needs abstract_state: the subtree to restore.")

        args: dict[str, Any] = {}
        if partial:
            # PyTreeRestore would turn a ShapeDtypeStruct without sharding into NumPy; StandardRestore gives a jax
            # array for a leaf saved from one. Match that: such leaves go to the first local device.
            saved = _saved_leaves(metadata[_STATE].tree)
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

            def _default_sharding(path: tuple[Any, ...], x: Any) -> Any:
                meta = saved.get(_path_str(path))
                if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is None and getattr(meta, "sharding", None):
                    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device)
                return x

            abstract = jax.tree_util.tree_map_with_path(_default_sharding, abstract)
            restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
            args[_STATE] = ocp.args.PyTreeRestore(abstract, restore_args=restore_args, partial_restore=True)
        else:
            args[_STATE] = ocp.args.StandardRestore(abstract)
        if data_iterator is not None:
            args[_DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
        if _CONFIG in items:
            args[_CONFIG] = ocp.args.JsonRestore()

        manager = self._mngr
        if partial:
            if self._partial_mngr is None:
                self._partial_mngr = self._new_manager(partial=True)
            self._partial_mngr.reload()
            manager = self._partial_mngr
        try:
            restored = manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:
            raise CheckpointDamaged(self.directory, step, [f"reading it failed ({_short(e)})"]) from e
        self.verify(step, restored[_STATE], data_iterator, restored[_CONFIG] if _CONFIG in items else None)

        state = restored[_STATE]
        if abstract_state is not None:
            problems = _sharding_problems(state, abstract)
            if problems:
                raise CheckpointError(f"restored arrays do not carry the requested shardings:{_summarise(problems)}")
            state = jax.tree.map(
                lambda want, got: want.dtype.type(got[()]) if isinstance(want, np.generic) else got,
                abstract_state,
                state,
            )
        config = restored[_CONFIG] if _CONFIG in items else None
        return state, config


# ---------------------------------------------------------------------------------------------------------------------
# init_from
# ---------------------------------------------------------------------------------------------------------------------


def resolve_init_from(path: str | os.PathLike) -> tuple[str, int]:
    """Where to initialise from: ``(workdir, step)`` for ``CheckpointManager(workdir).restore(step, ...)``.

    Accepts a run workdir (its latest step), its ``checkpoints`` directory (latest step), or one step directory
    ``<workdir>/checkpoints/<step>``.
    """
    p = Path(os.path.expanduser(os.fspath(path)))
    forms = "a run workdir, its checkpoints/ directory, or a step directory checkpoints/<step>"
    if not os.fspath(path) or not p.is_dir():
        raise CheckpointError(f"init_from path {str(p)!r} is not a directory; pass {forms}.")
    if p.name.isdigit() and p.parent.name == CHECKPOINT_SUBDIR:
        workdir, step = p.parent.parent, int(p.name)
    elif p.name == CHECKPOINT_SUBDIR:
        workdir, step = p.parent, None
    elif (p / CHECKPOINT_SUBDIR).is_dir():
        workdir, step = p, None
    else:
        raise CheckpointError(f"init_from path {str(p)!r} holds no {CHECKPOINT_SUBDIR}/ directory; pass {forms}.")
    manager = CheckpointManager(workdir)
    try:
        step = manager._resolve_step(step)
    finally:
        manager.close()
    return str(workdir), step
