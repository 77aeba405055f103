"""Sharding over a device mesh, by JAX's own SPMD partitioner: params and the KV cache are placed
with `NamedSharding`s, the jitted functions take them as ordinary arguments, and XLA (GSPMD) works
out the partitioned program and its collectives. The model code knows nothing of the mesh.

The mesh has two axes: "data" (batch: data parallelism) and "model" (tensor parallelism over
attention heads, MLP width and vocabulary, Megatron-style: column-split in, row-split out, one
all-reduce after attention and one after the MLP). A Mixture-of-Experts model may add a third,
"expert" (expert parallelism: each device holds its share of every sparse layer's experts, and reads
only those from the checkpoint), and still splits each expert's MLP width over "model" (tensor
parallelism inside the experts). Every placement comes from one table,
`RULES` (logical axis -> mesh axis), applied to each array's logical axes: a Param's `axes`
metadata (Flax NNX), the KV cache's `CACHE_AXES` (qvl_jax.engine.cache). A dimension that the mesh
axis does not divide (e.g. 6 heads on 4 devices, 1 kv head) is replicated instead: uneven shards
are never needed, and a model always loads.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from qvl_jax.config import Qwen3VLConfig
from qvl_jax.errors import QvlError
from qvl_jax.modeling.model import abstract_model, state_key

DATA, MODEL, EXPERT = "data", "model", "expert"
AXES = (DATA, MODEL, EXPERT)


class MeshError(QvlError, ValueError):
    """A mesh that does not fit the devices, or whose axes qvl_jax does not know."""


# Logical axis -> mesh axis (None: replicated). The one table every placement derives from.
RULES: dict[str, str | None] = {
    "batch": DATA,
    "vocab": MODEL,
    "heads": MODEL,
    "kv_heads": MODEL,
    "mlp": MODEL,
    "vision_heads": MODEL,
    "vision_mlp": MODEL,
    "merger_mlp": MODEL,  # hidden width of the patch mergers (fc1 out, fc2 in)
    "embed": None,  # text model width: activations stay whole between the collectives
    "head_dim": None,
    "layers": None,  # the KV cache's layer axis
    "cache_len": None,
    "vision_embed": None,
    "vision_head_dim": None,
    "qkv": None,  # the q/k/v triple of the fused vision projection
    "patch": None,  # flattened C*T*P*P pixels of a patch
    "pos_table": None,  # rows of the learned vision position table
    "merger_in": None,  # 4 merged patches' width, input of the mergers
    "experts": EXPERT,  # the expert axis of the fused expert tensors (expert parallelism)
    "expert_mlp": MODEL,  # each expert's MLP width (gate_up_proj rows, down_proj columns)
    "router": None,  # the router's expert rows: small, every device routes every token
}

# Params carry their logical axes as metadata (`axes`, and `units`: how many consecutive entries of
# a dim one logical entry spans, a head's head_dim rows in a flattened projection); see
# qvl_jax.modeling.layers. The KV cache's axes are in qvl_jax.engine.cache.


def make_mesh(dp: int | None = None, tp: int | None = None, devices: Sequence | None = None,
              ep: int | None = None) -> Mesh:
    """A ("data", "model") mesh of dp x tp devices (default: all of jax.devices(), all on "model").

    Give one size and the other is the device count divided by it. The axes are of the Auto type:
    XLA's partitioner propagates the shardings of the arguments through the jitted functions.
    ep (Mixture-of-Experts models): a ("data", "expert", "model") mesh of dp x ep x tp devices, the
    experts split over "expert"; dp and tp then share the devices left over."""
    devices = list(jax.devices() if devices is None else devices)
    if ep is not None:
        if isinstance(ep, bool) or not isinstance(ep, (int, np.integer)) or ep < 1:
            raise MeshError(f"ep must be a positive integer, got {ep!r}")
        if len(devices) % ep:
            raise MeshError(f"ep={ep} does not divide the {len(devices)} devices")
        flat = make_mesh(dp, tp, devices[:len(devices) // ep])  # checks dp and tp against the rest
        dp, tp = int(flat.shape[DATA]), int(flat.shape[MODEL])
        grid = np.asarray(devices, dtype=object).reshape(dp, ep, tp)
        return Mesh(grid, (DATA, EXPERT, MODEL), axis_types=(AxisType.Auto,) * 3)
    n = len(devices)
    for name, size in (("dp", dp), ("tp", tp)):
        if size is not None and (isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1):
            raise MeshError(f"{name} must be a positive integer, got {size!r}")
    if dp is None and tp is None:
        dp, tp = 1, n
    elif dp is None or tp is None:
        given, name = (tp, "tp") if dp is None else (dp, "dp")
        if n % given:
            raise MeshError(f"{name}={given} does not divide the {n} devices")
        dp, tp = (n // given, given) if dp is None else (given, n // given)
    if dp * tp != n:
        raise MeshError(f"dp * tp = {dp} * {tp} = {dp * tp}, but there are {n} devices: the mesh must use "
                        f"every device (pass devices= to use fewer)")
    try:  # topology-aware device order on GPU / TPU
        grid = mesh_utils.create_device_mesh((dp, tp), devices)
    except Exception:
        grid = np.asarray(devices, dtype=object).reshape(dp, tp)
    return Mesh(grid, (DATA, MODEL), axis_types=(AxisType.Auto,) * 2)


def check_mesh(mesh: Mesh) -> Mesh:
    """The mesh, with its axes turned to Auto (GSPMD) when it was built Explicit (jax.make_mesh's
    default): the model code carries no sharding annotations for explicit mode to check."""
    if not isinstance(mesh, Mesh):
        raise MeshError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    unknown = [a for a in mesh.axis_names if a not in AXES]
    if unknown:
        raise MeshError(f"mesh axes must be named among {AXES}, got {tuple(mesh.axis_names)}")
    if any(t != AxisType.Auto for t in mesh.axis_types):
        mesh = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
    return mesh


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: dict[str, str | None] = RULES, units: Sequence[int] | None = None) -> P:
    """PartitionSpec of an array with these logical axes: each dim goes to its rule's mesh axis,
    unless that axis is absent from the mesh, already used by an earlier dim, or does not divide
    the dim's count of logical entries (size // units), in which case the dim is replicated. A
    logical axis of None is replicated. (Flax's own logical-rule helpers have no such fallback.)"""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match the shape {tuple(shape)}")
    units = units or (1,) * len(shape)
    sizes = dict(mesh.shape)
    used, spec = set(), []
    for name, size, unit in zip(axes, shape, units):
        mesh_axis = None if name is None else rules[name]
        if mesh_axis is None or mesh_axis not in sizes or mesh_axis in used or (size // unit) % sizes[mesh_axis]:
            spec.append(None)
        else:
            spec.append(mesh_axis)
            used.add(mesh_axis)
    while spec and spec[-1] is None:  # canonical form: P() for replicated
        spec.pop()
    return P(*spec)


def variable_spec(var, mesh: Mesh) -> P:
    """The PartitionSpec of a Param (or an abstract one) from its `axes` and `units` metadata."""
    meta = var.get_metadata()
    shape = var.shape if hasattr(var, "shape") else var[...].shape
    return logical_to_spec(meta["axes"], shape, mesh, units=meta.get("units"))


def state_shardings(state, mesh: Mesh):
    """A NamedSharding for every Param of an NNX state (concrete or abstract), as a tree shaped like
    the state's values."""
    mesh = check_mesh(mesh)
    return jax.tree.map(lambda v: NamedSharding(mesh, variable_spec(v, mesh)), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def flat_param_shardings(config: Qwen3VLConfig, mesh: Mesh) -> dict[str, NamedSharding]:
    """Hugging Face key -> NamedSharding of every param of this config (from the abstract model)."""
    state = nnx.state(abstract_model(config), nnx.Param)
    return key_shardings({state_key(path): v for path, v in nnx.to_flat_state(state)}, mesh)


def key_shardings(variables: dict, mesh: Mesh) -> dict[str, NamedSharding]:
    """{key: Param} -> {key: its NamedSharding}."""
    mesh = check_mesh(mesh)
    return {key: NamedSharding(mesh, variable_spec(v, mesh)) for key, v in variables.items()}


def constrain(x: jax.Array, mesh: Mesh | None, axes: Sequence[str | None]) -> jax.Array:
    """x laid out as the rules place these logical axes (None: replicated), inside a jitted function;
    x itself without a mesh. Lets the generation code pin the few layouts that decide where XLA puts
    the collectives of a step, without naming mesh axes."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh)))


def replicate(x: jax.Array, mesh: Mesh | None, axes: Sequence[str | None]) -> jax.Array:
    """x, laid out as the rules place these logical axes, made whole on every device (x itself
    without a mesh).

    Left alone, GSPMD gathers a layout split over both mesh axes with two all-gathers, one per axis.
    When the split dims lead, each is cut into (mesh blocks, rows per block), the block indices are
    moved to the front and flattened into one dim split over both mesh axes: a relabelling of what
    each device already holds, so the whole gather is a single all-gather over all devices."""
    if mesh is None:
        return x
    spec = logical_to_spec(axes, x.shape, mesh)
    x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    whole = NamedSharding(mesh, P())
    k = len(spec)
    if k < 2 or None in spec:  # at most one split dim (or not leading): one all-gather anyway
        return jax.lax.with_sharding_constraint(x, whole)
    blocks = [int(mesh.shape[a]) for a in spec]
    rest = x.shape[k:]
    split = x.reshape(tuple(d for n, size in zip(blocks, x.shape) for d in (n, size // n)) + rest)
    order = tuple(range(0, 2 * k, 2)) + tuple(range(1, 2 * k, 2)) + tuple(range(2 * k, split.ndim))
    front = split.transpose(order)  # [blocks..., rows per block..., rest...]
    flat = front.reshape((-1,) + front.shape[k:])
    flat = jax.lax.with_sharding_constraint(flat, NamedSharding(mesh, P(tuple(spec))))
    flat = jax.lax.with_sharding_constraint(flat, whole)
    back = flat.reshape(front.shape).transpose(tuple(int(i) for i in np.argsort(order)))
    return back.reshape(x.shape)


def vocab_blocks(vocab: int, mesh: Mesh | None) -> int:
    """Into how many contiguous blocks the rules split a vocabulary axis (lm_head output, embedding
    rows): the "model" size where it divides the vocabulary, else 1 (replicated)."""
    if mesh is None:
        return 1
    spec = logical_to_spec(("vocab",), (vocab,), mesh)
    return int(mesh.shape[spec[0]]) if len(spec) else 1


def is_local(mesh: Mesh) -> bool:
    """Whether every device of the mesh belongs to this process (false for a mesh over several hosts)."""
    return all(d.process_index == jax.process_index() for d in mesh.devices.flat)


def to_host(tree):
    """jax.device_get that also works where an array spans other processes' devices (a mesh over
    several hosts): a replicated array is read from this process's own copy, a split one is
    gathered from every process (a collective: every process must make the same call, as SPMD
    programs do). Arrays on this process's devices alone are fetched as jax.device_get does."""

    def local(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return x
        if x.is_fully_replicated:
            return x.addressable_data(0)
        return multihost_utils.process_allgather(x, tiled=True)

    return jax.device_get(jax.tree.map(local, tree))
