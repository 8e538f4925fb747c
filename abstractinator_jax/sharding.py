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
    # rules are tried in order, and a mesh axis serves one dimension of a parameter: 'embed' takes 'fsdp' first;
    # tables without an 'embed' axis (code tables, code projections, latent-attention tensors) shard another axis
    (axes.VOCAB, "fsdp"),
    (axes.CODE, "fsdp"),
    (axes.LATENT, "fsdp"),  # latent attention's per-head tensors (heads, latent, retrieval) have no 'embed' axis
    (axes.RETRIEVAL, "fsdp"),
    (axes.KV, "fsdp"),  # last resort: per-head widths
    (axes.QUERIES, None),
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


def _mesh_spec(names: tuple, shape: tuple, mesh: Mesh) -> PartitionSpec:
    """The mesh PartitionSpec of a parameter with logical axis `names`: the rules are tried in order, and a rule
    gives its mesh axes to a dimension when that dimension has none yet, the mesh axes are still free in this
    parameter, and they divide the dimension (a 260-row byte table on 8 fsdp devices stays whole, and a later rule
    can shard another of its dimensions)."""
    spec: list = [None] * len(shape)
    used: set = set()
    for logical, mesh_axes in LOGICAL_AXIS_RULES:
        if mesh_axes is None or logical not in names:
            continue
        pos = names.index(logical)
        group = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        if spec[pos] is not None or used & set(group) or shape[pos] % math.prod(mesh.shape[a] for a in group):
            continue
        spec[pos] = mesh_axes
        used |= set(group)
    return PartitionSpec(*spec)


def logical_sharding(tree, mesh: Mesh):
    """NamedShardings for a pytree of (boxed or abstract) values carrying logical partition metadata."""
    specs = nn.get_partition_spec(tree)

    def sharding(x, logical):
        shape = (x.value if isinstance(x, nn.Partitioned) else x).shape
        names = tuple(logical) + (None,) * (len(shape) - len(logical))
        return NamedSharding(mesh, _mesh_spec(names, shape, mesh))

    return jax.tree.map(sharding, tree, specs, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
    """Sharding for input arrays: the batch axis over ('data', 'fsdp'), everything else replicated."""
    spec = [None] * ndim
    spec[batch_axis] = ("data", "fsdp")
    return NamedSharding(mesh, PartitionSpec(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_divisor(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]
