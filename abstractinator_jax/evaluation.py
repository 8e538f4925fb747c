"""Evaluation: the fixed held-out batches, the figures over them (`evaluate`: totals of the metric protocol,
metrics.py, of what scoring.py measures), segmented samples, the evaluation of a saved checkpoint (`evaluate_run`,
behind evaluate.py) and the code length of arbitrary texts (`TextScorer`, behind the lm-eval adapter). Training's
periodic evaluation and evaluate.py share all of it. `restore_run` (a saved run's config, model and checked state:
`saved_run_config` then `restore_state`) is the one way a saved run comes back, for evaluate.py, the lm-eval adapter
and generate.py alike."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from ml_collections import ConfigDict
from ml_collections.config_flags import config_path

from . import data as data_lib
from . import metrics, scoring, tokenizer
from .build import Run, build
from .checkpointing import CheckpointError, CheckpointManager
from .config import PAD_ID, ConfigError, from_dict, validate_config
from .data import resolve_data_config
from .recovery import restore_checked
from .sharding import LOGICAL_AXIS_RULES, batch_divisor, batch_sharding, replicated
from .steps import make_eval_step
from .train_state import TrainState, all_params


def make_eval_batches(cfg: ConfigDict, data_cfg: ConfigDict) -> list[dict]:
    """This process's share of the fixed held-out batches (`cfg.eval_batches` of them, `cfg.batch_size` rows)."""
    return data_lib.make_eval_batches(
        data_cfg,
        cfg.sequence_length,
        cfg.batch_size,
        cfg.eval_batches,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def evaluate(eval_step, state, eval_batches, mesh) -> dict[str, float]:
    """Every eval figure over all the held-out batches: each batch's totals (summed over the global batch inside the
    jitted step) are added up in float64 and divided once at the end (metrics.py). Independent of the batch size."""
    sh = batch_sharding(mesh, 2, 0)
    params = all_params(state)
    totals = []
    for b in eval_batches:  # every step is dispatched before the totals are fetched, once
        ids = jax.make_array_from_process_local_data(sh, b["ids"])
        pad = jax.make_array_from_process_local_data(sh, b["mask"])
        totals.append(eval_step(params, state.model_state, ids, pad)[0])
    return metrics.finalize(metrics.accumulate(totals))


def first_real_row(eval_batches):
    """The first held-out row with real bytes, (1, S), shown cut into segments in TensorBoard."""
    for b in eval_batches:
        for row in b["ids"]:
            if np.any(row != PAD_ID):
                return np.asarray(row)[None]
    return None


def shared_sample_row(eval_batches, seq_len: int):
    """`first_real_row` of process 0's eval share, the same on every process (each process holds a different share
    of the eval batches, and the sample is computed on replicated inputs); None when process 0 has no real row."""
    row = first_real_row(eval_batches)
    if jax.process_count() == 1:
        return row
    from jax.experimental import multihost_utils

    local = np.full((1, seq_len), PAD_ID, np.int32) if row is None else np.asarray(row, np.int32)
    row = np.asarray(multihost_utils.broadcast_one_to_all(local))
    return row if np.any(row != PAD_ID) else None


def segment_outputs(model, params, model_state, ids, pad):
    """Level 0's (segment ends (B, S), codes (B, Q), valid slots (B, Q)); a stage-0 model has only its entropy
    model: its segment ends, and no codes (Q = 0)."""
    if model.config.stage == 0:
        seg = model.apply({"params": params, **model_state}, ids, pad, method=model.level0_segments)
        none = jnp.zeros((ids.shape[0], 0), jnp.int32)
        return seg.patch_end_mask, none - 1, none.astype(bool)
    comp = model.apply({"params": params, **model_state}, ids, pad, method=model.compress_all)[0]
    return comp.segments.patch_end_mask, comp.codes, comp.valid_mask


def segmented_sample(segment_fn, state, ids, mesh) -> str:
    """The sample row cut into its segments, and (with a quantizer) the code id of each segment."""
    pad = ids == PAD_ID
    rep = replicated(mesh)
    ends, codes, valid = jax.device_get(
        segment_fn(all_params(state), state.model_state, jax.device_put(ids, rep), jax.device_put(pad, rep))
    )
    text = tokenizer.render_segments(ids[0], np.asarray(ends)[0])
    row_codes = np.asarray(codes)[0][np.asarray(valid)[0]]
    if row_codes.size and row_codes[0] >= 0:
        text += "\n\ncodes: " + " ".join(str(c) for c in row_codes)
    return text


def run_config(saved: dict, data_path: str | None, max_batches: int | None, overrides: dict) -> ConfigDict:
    """The saved config of a run with this evaluation's changes applied, validated."""
    try:
        cfg = from_dict(saved)
    except (TypeError, KeyError, AttributeError, ValueError) as e:
        raise ConfigError(
            f"the checkpoint's config does not fit this version's schema ({type(e).__name__}: {e})."
        ) from e
    if data_path:
        cfg.data.source = "auto"
        cfg.data.path = data_path
        cfg.data.eval_path = data_path
    if max_batches is not None:
        cfg.eval_batches = max_batches
    for path, value in overrides.items():
        config_path.set_value(path, cfg, value)
    return validate_config(cfg)


def describe_eval_data(d: ConfigDict) -> str:
    """Where the eval documents come from, in one line (for the JSON output)."""
    held_out = f"held-out {d.eval_fraction:g} of"
    if d.source == "hf":
        return f"hf {d.dataset_name} " + (f"split {d.eval_split}" if d.eval_split else f"{held_out} {d.train_split}")
    if d.source == "offline":
        return f"offline, {held_out} the corpus"
    return f"{d.source} {d.eval_path}" if d.eval_path else f"{d.source}, {held_out} {d.path}"


def segmented_rows(model, state, eval_batches, mesh, n: int) -> list[str]:
    """The first `n` held-out rows that hold real bytes, cut into their segments with '|'."""
    segment_fn = jax.jit(lambda p, ms, ids, pad: segment_outputs(model, p, ms, ids, pad))
    out = []
    for b in eval_batches:
        for row in b["ids"]:
            if len(out) == n:
                return out
            if np.any(row != PAD_ID):
                out.append(segmented_sample(segment_fn, state, np.asarray(row)[None], mesh))
    return out


def report_paths(path: str | Path, cfg: ConfigDict) -> list[Path]:
    """The files `write_report` writes: the HTML report, then one atlas TSV per quantized level beside it."""
    path = Path(path)
    tsvs = [path.with_name(f"{path.stem}.level{k}.atlas.tsv") for k, lv in enumerate(cfg.levels) if lv.c_vq_K > 0]
    return [path, *tsvs]


def write_report(cfg: ConfigDict, model, state: TrainState, eval_batches, path: str | Path, rows: int, title: str):
    """The segmentation report of `eval_batches` (report.py: the first `rows` rows that start a document in detail,
    summary plots over all of them, a codebook atlas per quantized level with each shown code's greedy expansion)
    as one HTML file at `path`, and each atlas as TSV beside it. Returns the paths written."""
    from .code_expansion import CodeExpander
    from .generation import model_variables
    from .report import atlas_tsv, segmentation_report

    variables = model_variables(state)
    compress = jax.jit(lambda v, ids, pad: model.apply(v, ids, pad, method=model.compress_all))
    expander = CodeExpander(model, variables, cfg)
    page, atlases = segmentation_report(
        lambda ids, pad: compress(variables, ids, pad),
        eval_batches,
        cfg.levels,
        model_state=state.model_state,
        max_rows=rows,
        title=title,
        expand_codes_fn=expander.to_bytes,
    )
    paths = report_paths(path, cfg)
    paths[0].write_text(page, encoding="utf-8")
    for atlas, tsv in zip(atlases, paths[1:]):
        tsv.write_text(atlas_tsv(atlas), encoding="utf-8")
    return paths


def saved_run_config(
    workdir: str, step: int | None, data_path: str | None, max_batches: int | None, overrides: dict
) -> tuple[ConfigDict, int]:
    """(the config saved with `workdir`'s checkpoint `step` (default: the latest) with this evaluation's changes,
    that step). Clear errors for a missing workdir, checkpoint or config."""
    if not Path(workdir).is_dir():
        raise CheckpointError(f"workdir {workdir!r} does not exist; pass the --workdir of a train.py run.")
    with CheckpointManager(workdir, max_to_keep=None) as ckpt:
        if step is None:
            step = ckpt.latest_step()
            if step is None:
                raise CheckpointError(f"no checkpoint under {ckpt.directory}; pass the --workdir of a train.py run.")
        saved = ckpt.restore_config(step)
        if saved is None:
            raise CheckpointError(f"checkpoint step {step} under {ckpt.directory} was saved without its config.")
    return run_config(saved, data_path, max_batches, overrides), step


def restore_state(workdir: str, step: int, cfg: ConfigDict) -> tuple[Run, TrainState]:
    """The model, mesh and state template as train() builds them for `cfg`, with checkpoint `step`'s values."""
    run = build(cfg)
    with CheckpointManager(workdir, max_to_keep=None) as ckpt:
        state = restore_checked(ckpt, step, run.abstract_state)  # damaged or non-finite: CheckpointDamaged
    return run, state


def restore_run(
    workdir: str,
    step: int | None = None,
    overrides: dict | None = None,
    *,
    data_path: str | None = None,
    max_batches: int | None = None,
    before_build: Callable[[ConfigDict], None] | None = None,
) -> tuple[ConfigDict, Run, TrainState]:
    """Restore `workdir`'s checkpoint `step` (the latest when None) with the config saved in it (`overrides`,
    `data_path`, `max_batches` applied, then validated): (config, the model, mesh and state as training built them
    with the checkpoint's checked values). `before_build(cfg)` runs before anything is built, to fail fast on bad
    input (evaluate_run reads its data there)."""
    cfg, step = saved_run_config(workdir, step, data_path, max_batches, overrides or {})
    if before_build is not None:
        before_build(cfg)
    run, state = restore_state(workdir, step, cfg)
    return cfg, run, state


def evaluate_run(
    workdir: str,
    step: int | None = None,
    data_path: str | None = None,
    max_batches: int | None = None,
    overrides: dict | None = None,
    show_segments: int = 0,
    report: str | None = None,
    report_rows: int = 6,
) -> tuple[dict, list[str]]:
    """Restore `workdir`'s checkpoint and evaluate it. Returns (the JSON result, segmented sample rows). With
    `report` (a path), also write the segmentation report of the same data there (`write_report`)."""
    data = {}

    def load_eval_data(cfg):  # data first: a bad path fails before the model is built
        if report and cfg.stage == 0:
            raise ConfigError(
                "--report shows segments, codes and their expansions, which a stage-0 run (level 0's entropy model "
                "alone) does not have; use --show_segments to see where its entropy model would cut."
            )
        data["cfg"] = resolve_data_config(cfg.data)
        try:
            data["batches"] = make_eval_batches(cfg, data["cfg"])
        except ConfigError as e:
            raise ConfigError(f"--data_path={data_path!r}: {e}" if data_path else str(e)) from e

    cfg, run, state = restore_run(
        workdir, step, overrides, data_path=data_path, max_batches=max_batches, before_build=load_eval_data
    )
    data_cfg, eval_batches = data["cfg"], data["batches"]
    mesh, model = run.mesh, run.model
    eval_step = make_eval_step(model, mesh, run.shardings)

    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        figures = evaluate(eval_step, state, eval_batches, mesh)
        if not figures.get("data/bytes"):
            raise ConfigError("the eval data holds no bytes; check --data_path / the run's data settings.")
        samples = segmented_rows(model, state, eval_batches, mesh, show_segments) if show_segments > 0 else []
        if report:
            title = f"{Path(workdir).name}, step {int(state.step)}: {describe_eval_data(data_cfg)}"
            written = write_report(cfg, model, state, eval_batches, report, report_rows, title)

    result = {
        "step": int(state.step),
        "workdir": str(workdir),
        "data": {
            "source": describe_eval_data(data_cfg),
            "batches": len(eval_batches),
            "rows": int(figures.pop("data/rows")),
            "bytes": int(figures.pop("data/bytes")),
            "documents": int(figures.pop("data/documents")),
        },
        "bits_per_byte": figures.pop("bits_per_byte", None),
        **scoring.describe(cfg),
    }
    if report:
        result["report"] = [str(p) for p in written]
    result.update(sorted(figures.items()))
    return result, samples


class TextScorer:
    """Code lengths (bits, scoring.py) of arbitrary texts under a model. Each text becomes `[BOS] + utf-8 bytes`
    (`+ [EOS]` when `eos`), cut into rows of the run's sequence_length like a document; the rows of all texts are
    scored in fixed-shape batches by the eval step (one compile) and summed per text.

    `kind`: 'code' (the whole model's code length; needs a discrete top transformer) or 'entropy_model' (level 0's
    logit entropy model as a byte LM)."""

    KINDS = ("code", "entropy_model")

    def __init__(self, cfg: ConfigDict, run: Run, state: TrainState, batch_size: int | None = None, kind="code"):
        if kind not in self.KINDS:
            raise ConfigError(f"scorer={kind!r}; choose one of {self.KINDS}.")
        if kind == "code" and not scoring.has_code_length(cfg):
            raise ConfigError(
                "this run has no code length (bits_per_byte is null: "
                + scoring.describe(cfg)["bits_per_byte_note"].removeprefix("null: ")
                + "); use scorer=entropy_model for a run with a logit entropy model."
            )
        if kind == "entropy_model" and cfg.levels[0].c_entropy_model != "logit":
            raise ConfigError("scorer=entropy_model needs levels[0].c_entropy_model='logit' (a byte LM).")
        self.cfg, self.run, self.state, self.kind = cfg, run, state, kind
        self.batch_size = int(batch_size or cfg.batch_size)
        divisor = batch_divisor(run.mesh)
        if self.batch_size % divisor:
            raise ConfigError(f"batch_size={self.batch_size} must be a multiple of the {divisor} data-parallel devices")
        self.eval_step = make_eval_step(run.model, run.mesh, run.shardings)

    @classmethod
    def from_workdir(cls, workdir: str, step: int | None = None, batch_size: int | None = None, kind="code"):
        cfg, run, state = restore_run(workdir, step)
        return cls(cfg, run, state, batch_size, kind)

    def rows(self, text: str | bytes, eos: bool) -> np.ndarray:
        ids = tokenizer.encode(text)
        return tokenizer.to_rows(ids if eos else ids[:-1], self.cfg.sequence_length)

    def bits(self, texts: list[str | bytes], eos: bool = False) -> np.ndarray:
        """(len(texts),) float64: the code length in bits of each text (rows coded independently, BOS given)."""
        per_text = [self.rows(t, eos) for t in texts]
        if not per_text:
            return np.zeros((0,), np.float64)
        owner = np.concatenate([np.full(len(r), i) for i, r in enumerate(per_text)])
        rows = np.concatenate(per_text)
        n, b = len(rows), self.batch_size
        rows = np.concatenate([rows, np.full((-n % b, rows.shape[1]), PAD_ID, np.int32)])
        sh = batch_sharding(self.run.mesh, 2, 0)
        params, model_state = all_params(self.state), self.state.model_state
        outs = []
        with jax.set_mesh(self.run.mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
            for i in range(0, len(rows), b):
                ids = jax.device_put(rows[i : i + b], sh)
                row_bits = self.eval_step(params, model_state, ids, jax.device_put(rows[i : i + b] == PAD_ID, sh))[1]
                outs.append(row_bits.total if self.kind == "code" else row_bits.entropy_model)
        per_row = np.concatenate([np.asarray(x, np.float64) for x in jax.device_get(outs)])[:n]
        out = np.zeros(len(texts), np.float64)
        np.add.at(out, owner, per_row)
        return out
