"""bench/profile_step.py: op names to model components, and a real trace of a small jitted train step read back;
bench/attention_kernel.py at tiny shapes."""

from __future__ import annotations

import importlib.util
import tempfile

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn

from .helpers import REPO

_spec = importlib.util.spec_from_file_location("profile_step", REPO / "bench" / "profile_step.py")
profile_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(profile_step)

FWD = (
    "jit(step)/while/body/closed_call/jvp(AbstractinatorPyramid)/AbstractinatorPyramid._levels/level_0/expander/"
    "expander.hidden/block_3/ffn/w3/dot_general"
)
BWD = (
    "jit(step)/while/body/closed_call/transpose(jvp(AbstractinatorPyramid))/AbstractinatorPyramid._levels/level_0/"
    "expander/expander.hidden/block_3/ffn/w3/dot_general"
)
TOP = (
    "jit(step)/while/body/closed_call/jvp(AbstractinatorPyramid)/AbstractinatorPyramid._top/top/cond/branch_13_fun/"
    "transpose(jvp(top._loss))/top.predict/block_2/attn/attn._forward/while/body/closed_call/checkpoint/"
    "rematted_computation/btnr,bsnr->bnts/dot_general"
)


def test_forward_and_backward_of_one_op_share_a_component():
    path = "AbstractinatorPyramid._levels/level_0/expander.hidden/block_3/ffn/w3/dot_general"
    assert profile_step.component(FWD, 99) == (path, False)
    assert profile_step.component(BWD, 99) == (path, True)
    assert profile_step.component(BWD, 3) == ("AbstractinatorPyramid._levels/level_0/expander.hidden", True)
    # control flow (cond branches, while bodies, checkpoints) is not a component
    assert profile_step.component(TOP, 99) == (
        "AbstractinatorPyramid._top/top._loss/top.predict/block_2/attn._forward/btnr,bsnr->bnts/dot_general",
        True,
    )
    assert profile_step.component("", 4) == ("(other)", False)
    # a module may be called `body` or `cond`: only a while loop's are control flow
    assert profile_step.component("jit(f)/jvp(Net)/body/cond/dot_general", 9) == ("Net/body/cond/dot_general", False)


def test_hlo_names_and_the_aggregate_split_forward_and_backward():
    hlo = "\n".join(
        (
            f'  %fusion.1 = f32[8,16]{{1,0}} fusion(%p), kind=kLoop, metadata={{op_name="{FWD}"}}',
            f'  ROOT %dot.2 = f32[8,16]{{1,0}} dot(%a, %b), metadata={{op_name="{BWD}" stack_frame_id=3}}',
            '  %while.3 = (s32[]) while(%t), metadata={op_name="jit(step)/while"}',
        )
    )
    ops = profile_step.hlo_ops(hlo)
    assert ops["fusion.1"] == (FWD, "f32[8,16]{1,0}") and ops["dot.2"][0] == BWD
    events = [
        ("fusion.1", 0.25),
        ("dot.2", 0.5),
        ("fusion.1", 0.25),
        ("while.3", 9.0),
        ("ThunkExecutor::Execute", 9.0),
        ("end: dot", 9.0),
        ("unknown.7", 0.125),
    ]
    by_path, by_op = profile_step.aggregate(events, ops, depth=4)
    assert by_path == {
        "AbstractinatorPyramid._levels/level_0/expander.hidden/block_3": [0.5, 0.5],
        "unknown.7": [0.125, 0.0],
    }
    assert by_op == {"fusion.1": 0.5, "dot.2": 0.5, "unknown.7": 0.125}


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="head")(jnp.tanh(nn.Dense(64, name="body")(x)))


@pytest.mark.filterwarnings("ignore")
def test_a_real_trace_is_read_back_by_component():
    """A jitted forward + backward of a two-layer flax model, traced: both layers' forward and backward time is
    found under their module names (the installed JAX's trace format and op_name metadata)."""
    net = _Net()
    x = jax.random.normal(jax.random.key(0), (512, 64))
    params = net.init(jax.random.key(1), x)
    step = jax.jit(jax.grad(lambda p, x: jnp.sum(net.apply(p, x) ** 2)))
    compiled = step.lower(params, x).compile()
    jax.block_until_ready(compiled(params, x))
    trace_dir = tempfile.mkdtemp()
    jax.profiler.start_trace(trace_dir)
    for _ in range(3):
        grads = compiled(params, x)
    jax.block_until_ready(grads)
    jax.profiler.stop_trace()
    events = profile_step.trace_events(trace_dir)
    by_path, _ = profile_step.aggregate(events, profile_step.hlo_ops(compiled.as_text()), depth=2)
    for layer in ("body", "head"):
        fwd, bwd = by_path[f"_Net/{layer}"]
        assert fwd > 0 and bwd > 0, (layer, by_path)


@pytest.mark.parametrize("args", [["--kind", "causal", "--length", "40"], ["--kind", "window", "--length", "40"]])
def test_attention_kernel_benchmark_times_a_kernel(args):
    """bench/attention_kernel.py at tiny shapes: one JSON line with its settings and times; bad head counts refused."""
    import json
    import subprocess
    import sys

    script = str(REPO / "bench" / "attention_kernel.py")
    tiny = ["--batch_size", "2", "--heads", "2", "--key_width", "8", "--value_width", "8", "--window", "8"]
    out = subprocess.run([sys.executable, script, *args, *tiny, "--reps", "2"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert line["kind"] == args[1] and line["length"] == 40 and 0 < line["min_ms"] <= line["median_ms"]
    bad = subprocess.run([sys.executable, script, *args, *tiny, "--value_heads", "3"], capture_output=True, text=True)
    assert bad.returncode != 0 and "--value_heads must be 1 (shared) or --heads=2" in bad.stderr
