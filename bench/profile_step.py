"""Where the train step's time goes: a profiler trace of the compiled step, each executed op's time added up by the
model component that emitted it (forward and backward apart), and the slowest single ops with their shapes.

    python bench/profile_step.py --config configs/tiny.py --top --sequence_length 1024
    python bench/profile_step.py --config configs/stage1_super_tiny.py --sequence_length 1024 \
        --trained_workdir runs/stage1 --depth 6        # at a trained model's segmentation
    python bench/profile_step.py --config configs/stage2_super_tiny.py --trained_workdir runs/stage1  # stage 2

The step is built as bench/vs_original.py builds ours (same flags: --top, --c_output_length, --top_row_buckets,
--top_batch_chunks, --trained_workdir), run twice untimed, then traced for --steps steps with jax.profiler. Every op
event of the trace is mapped to its HLO instruction's op_name (the jax/flax name stack, e.g.
`.../level_0/expander/block_3/ffn/w3/...`); control flow (while, cond, checkpoint) and the jvp/transpose wrappers are
dropped, so a component's forward and backward land on one path, `--depth` components long, with the backward share in
its own column (a rematerialized forward pass runs inside the backward pass and counts there). On a GPU or TPU the
device's "XLA Ops" line is read (device time; not yet run on one); on the CPU the XLA threads' op events, whose sum can
exceed the wall time when two ops run at once on different cores.
"""

from __future__ import annotations

import argparse
import collections
import glob
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# name-stack components that are control flow or transformation wrappers, not model structure
_DROP = re.compile(r"^(jit\(.*\)|while|closed_call|checkpoint|rematted_computation|remat|branch_\d+_fun)$")
# ... and these two, right after `while` (its body / condition) or before a `branch_N_fun` (lax.cond)
_LOOP_PARTS = ("body", "cond")
_WRAP = re.compile(r"^(?:transpose|jvp|vmap)\((.*)\)$")
# events that are not one op: control-flow thunks that contain other ops' events, the executor's own scopes and
# thread-pool waits (C++ names)
_CONTAINERS = re.compile(r"^(while|call|conditional)\b|::")


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, str]]:
    """{instruction name: (op_name metadata, result shape)} of every instruction of a compiled module's text."""
    ops = {}
    for line in hlo_text.splitlines():
        m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = (\S+) .*?op_name="([^"]*)"', line)
        if m:
            ops[m.group(1)] = (m.group(3), m.group(2))
    return ops


def component(op_name: str, depth: int) -> tuple[str, bool]:
    """(the op's model path, at most `depth` components; True when it belongs to the backward pass)."""
    backward = "transpose(" in op_name
    parts = []
    raw = op_name.split("/")
    for i, part in enumerate(raw):
        if part in _LOOP_PARTS and (
            (i > 0 and raw[i - 1] == "while") or (i + 1 < len(raw) and re.match(r"branch_\d+_fun$", raw[i + 1]))
        ):
            continue
        while (m := _WRAP.match(part)) is not None:
            part = m.group(1)
        if not part or _DROP.match(part):
            continue
        if parts and part.startswith(parts[-1] + "."):  # "Model/Model.method" -> "Model.method"
            parts[-1] = part
            continue
        parts.append(part)
    return "/".join(parts[:depth]) or "(other)", backward


def aggregate(events, ops: dict[str, tuple[str, str]], depth: int):
    """events: (instruction name, seconds) pairs -> ({path: [forward s, backward s]}, {instruction name: seconds})."""
    by_path = collections.defaultdict(lambda: [0.0, 0.0])
    by_op = collections.Counter()
    for name, seconds in events:
        if _CONTAINERS.search(name) or name.startswith("end:"):
            continue
        op_name = ops.get(name, (name, ""))[0]
        path, backward = component(op_name, depth)
        by_path[path][int(backward)] += seconds
        by_op[name] += seconds
    return dict(by_path), by_op


def trace_events(trace_dir: str):
    """(instruction name, seconds) of every op event in the trace: the device's 'XLA Ops' line when there is one,
    else the CPU's XLA threads (the client thread that runs the program and the Eigen pool that runs its ops)."""
    from jax._src.profiler import ProfileData

    files = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
    if not files:
        raise SystemExit(f"error: jax.profiler wrote no trace (*.xplane.pb) under {trace_dir}.")
    data = ProfileData.from_file(files[0])
    device = [
        line
        for plane in data.planes
        if plane.name.startswith("/device:")
        for line in plane.lines
        if line.name == "XLA Ops"
    ]
    lines = device or [line for plane in data.planes for line in plane.lines if line.name.startswith("tf_XLA")]
    return [(ev.name, ev.duration_ns / 1e9) for line in lines for ev in line.events]


def main():
    import jax
    import vs_original

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--sequence_length", type=int, default=1024)
    ap.add_argument("--top", action="store_true", help="train the config's top transformer too (use_top_code_lm)")
    ap.add_argument("--top_row_buckets", type=int, default=None)
    ap.add_argument("--top_batch_chunks", type=int, default=None)
    ap.add_argument("--c_output_length", type=int, default=None)
    ap.add_argument("--trained_workdir", default=None, help="a train.py run of the config: its segmentation")
    ap.add_argument("--steps", type=int, default=2, help="traced steps (averaged)")
    ap.add_argument("--depth", type=int, default=5, help="path components per row of the component table")
    ap.add_argument("--ops", type=int, default=25, help="how many of the slowest single ops to list")
    args = ap.parse_args()
    args.dtype = args.attention_impl = args.remat = None
    args.seed, args.components = 0, False
    args.segmentation = "trained" if args.trained_workdir else "init"

    cfg, _, ids, _ = vs_original.prepare(args)
    mesh, _, _, state, compiled, batch, _ = vs_original.ours_setup(cfg, ids, args.trained_workdir)
    with jax.set_mesh(mesh):
        for _ in range(2):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        wall = (time.perf_counter() - t0) / args.steps
        trace_dir = tempfile.mkdtemp()
        jax.profiler.start_trace(trace_dir)
        for _ in range(args.steps):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        jax.profiler.stop_trace()

    ops = hlo_ops(compiled.as_text())
    events = [(name, seconds / args.steps) for name, seconds in trace_events(trace_dir)]
    by_path, by_op = aggregate(events, ops, args.depth)
    total = sum(f + b for f, b in by_path.values())
    if total <= 0:
        sys.exit(
            f"error: the trace holds no XLA op events this tool can read on {jax.default_backend()} (it reads a "
            "device's 'XLA Ops' line, or the CPU's tf_XLA* threads); open the trace in TensorBoard's profiler instead."
        )
    print(f"# {Path(args.config).name} B={args.batch_size} S={args.sequence_length} on {jax.devices()[0].device_kind}")
    print(f"# step {wall:.3f} s (untraced); op time in the trace {total:.3f} s per step\n")
    print(f"{'s/step':>8} {'share':>6} {'fwd s':>7} {'bwd s':>7}  component")
    for path, (f, b) in sorted(by_path.items(), key=lambda kv: -sum(kv[1])):
        if f + b >= 0.001 * total:
            print(f"{f + b:8.3f} {100 * (f + b) / total:5.1f}% {f:7.3f} {b:7.3f}  {path}")
    print(f"\nslowest {args.ops} ops:")
    for name, seconds in by_op.most_common(args.ops):
        op_name, shape = ops.get(name, ("", ""))
        print(f"{seconds:8.4f} {100 * seconds / total:5.1f}%  {name} {shape}  {component(op_name, 99)[0]}")


if __name__ == "__main__":
    main()
