"""Device mesh and logical-axis rules: data parallel, FSDP (parameters and optimizer state sharded over 'fsdp')
and tensor-parallel axes, one set of rules for all of them.

Parameters and activations carry logical axis names (see layers.py); `LOGICAL_AXIS_RULES` maps them onto the mesh
axes ('data', 'fsdp', 'tensor'). With the default mesh {data: all devices, fsdp: 1, tensor: 1} the batch is split
over devices and parameters are replicated; raising `mesh.fsdp` shards parameters' 'embed' axis, `mesh.tensor` the
heads / feed-forward axes, with no model change.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from . import axes
from .config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_AXIS_RULES = (
    # activations
    (axes.BATCH, ("data", "fsdp")),
    (axes.LENGTH, None),
    (axes.ACT_EMBED, None),
    (axes.ACT_HEADS, "tensor"),
    (axes.ACT_MLP, "tensor"),
    # parameters
    (axes.EMBED, "fsdp"),
    (axes.EMBED_OUT, None),
    (axes.MLP, "tensor"),
    (axes.HEADS, "tensor"),
    (axes.KV, None),
    # rules are tried in order, and a mesh axis serves one dimension of a parameter: 'embed' takes 'fsdp' first;
    # tables without an 'embed' axis (code tables, code projections) shard their rows or code width instead
    (axes.VOCAB, "fsdp"),
    (axes.CODE, "fsdp"),
    (axes.QUERIES, None),
    (axes.LATENT, None),
    (axes.RETRIEVAL, None),
)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """A mesh over all (or the given) devices; one axis size may be -1 ('the rest')."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ConfigError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ConfigError(f"mesh: {len(devices)} devices are not divisible by the fixed axes' product {known}.")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ConfigError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but {len(devices)} are present; "
            "set --config.mesh.data=-1 to use them all."
        )
    arr = np.asarray(devices).reshape(sizes)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_sharding(tree, mesh: Mesh):
    """NamedShardings for a pytree of (boxed or abstract) values carrying logical partition metadata.

    A dimension that the mesh axes the rules give it do not divide (e.g. a 260-row byte table on 8 fsdp devices) is
    replicated instead: every config runs on every mesh, and the large dimensions are still sharded."""
    specs = nn.get_partition_spec(tree)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_AXIS_RULES)

    def divisible(x, sh):
        shape = (x.value if isinstance(x, nn.Partitioned) else x).shape
        spec = list(sh.spec) + [None] * (len(shape) - len(sh.spec))
        for i, names in enumerate(spec):
            if names is not None:
                n = math.prod(mesh.shape[a] for a in ((names,) if isinstance(names, str) else names))
                spec[i] = names if shape[i] % n == 0 else None
        return NamedSharding(mesh, PartitionSpec(*spec))

    return jax.tree.map(divisible, tree, shardings, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
    """Sharding for input arrays: the batch axis over ('data', 'fsdp'), everything else replicated."""
    spec = [None] * ndim
    spec[batch_axis] = ("data", "fsdp")
    return NamedSharding(mesh, PartitionSpec(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_divisor(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]
