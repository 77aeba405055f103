"""Sharding over a device mesh, by JAX's own SPMD partitioner: params and the KV cache are placed
with `NamedSharding`s, the jitted functions take them as ordinary arguments, and XLA (GSPMD) works
out the partitioned program and its collectives. The model code knows nothing of the mesh.

The mesh has two axes: "data" (batch: data parallelism) and "model" (tensor parallelism over
attention heads, MLP width and vocabulary, Megatron-style: column-split in, row-split out, one
all-reduce after attention and one after the MLP). Every placement comes from one table,
`RULES` (logical axis -> mesh axis), applied to each array's logical axes (`PARAM_AXES`,
`CACHE_AXES`). A dimension that the mesh axis does not divide (e.g. 6 heads on 4 devices, 1 kv
head) is replicated instead: uneven shards are never needed, and a model always loads.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from qvl_jax.config import Qwen3VLConfig, TextConfig
from qvl_jax.errors import QvlError

DATA, MODEL = "data", "model"
AXES = (DATA, MODEL)


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
    "layers": None,  # the scanned stack axis (also vision blocks, DeepStack mergers)
    "cache_len": None,
    "vision_embed": None,
    "vision_head_dim": None,
    "qkv": None,  # the q/k/v triple of the fused vision projection
    "patch": None,  # flattened C*T*P*P pixels of a patch
    "pos_table": None,  # rows of the learned vision position table
    "merger_in": None,  # 4 merged patches' width, input of the mergers
}

_TL = "model/language_model/"
_V = "model/visual/"

# Every param key (as the converter writes it, convert/table.py) -> the logical axis of each dim.
PARAM_AXES: dict[str, tuple[str, ...]] = {
    _TL + "embed_tokens/embedding": ("vocab", "embed"),
    _TL + "norm/scale": ("embed",),
    _TL + "layers/input_layernorm/scale": ("layers", "embed"),
    _TL + "layers/post_attention_layernorm/scale": ("layers", "embed"),
    _TL + "layers/self_attn/q_proj/weight": ("layers", "heads", "head_dim", "embed"),
    _TL + "layers/self_attn/k_proj/weight": ("layers", "kv_heads", "head_dim", "embed"),
    _TL + "layers/self_attn/v_proj/weight": ("layers", "kv_heads", "head_dim", "embed"),
    _TL + "layers/self_attn/o_proj/weight": ("layers", "embed", "heads", "head_dim"),
    _TL + "layers/self_attn/q_proj/bias": ("layers", "heads", "head_dim"),
    _TL + "layers/self_attn/k_proj/bias": ("layers", "kv_heads", "head_dim"),
    _TL + "layers/self_attn/v_proj/bias": ("layers", "kv_heads", "head_dim"),
    _TL + "layers/self_attn/o_proj/bias": ("layers", "embed"),
    _TL + "layers/self_attn/q_norm/scale": ("layers", "head_dim"),
    _TL + "layers/self_attn/k_norm/scale": ("layers", "head_dim"),
    _TL + "layers/mlp/gate_proj/weight": ("layers", "mlp", "embed"),
    _TL + "layers/mlp/up_proj/weight": ("layers", "mlp", "embed"),
    _TL + "layers/mlp/down_proj/weight": ("layers", "embed", "mlp"),
    "lm_head/weight": ("vocab", "embed"),
    _V + "patch_embed/proj/weight": ("vision_embed", "patch"),
    _V + "patch_embed/proj/bias": ("vision_embed",),
    _V + "pos_embed/embedding": ("pos_table", "vision_embed"),
    _V + "blocks/norm1/scale": ("layers", "vision_embed"),
    _V + "blocks/norm1/bias": ("layers", "vision_embed"),
    _V + "blocks/norm2/scale": ("layers", "vision_embed"),
    _V + "blocks/norm2/bias": ("layers", "vision_embed"),
    _V + "blocks/attn/qkv/weight": ("layers", "qkv", "vision_heads", "vision_head_dim", "vision_embed"),
    _V + "blocks/attn/qkv/bias": ("layers", "qkv", "vision_heads", "vision_head_dim"),
    _V + "blocks/attn/proj/weight": ("layers", "vision_embed", "vision_heads", "vision_head_dim"),
    _V + "blocks/attn/proj/bias": ("layers", "vision_embed"),
    _V + "blocks/mlp/linear_fc1/weight": ("layers", "vision_mlp", "vision_embed"),
    _V + "blocks/mlp/linear_fc1/bias": ("layers", "vision_mlp"),
    _V + "blocks/mlp/linear_fc2/weight": ("layers", "vision_embed", "vision_mlp"),
    _V + "blocks/mlp/linear_fc2/bias": ("layers", "vision_embed"),
    _V + "merger/norm/scale": ("vision_embed",),
    _V + "merger/norm/bias": ("vision_embed",),
    _V + "merger/linear_fc1/weight": ("merger_mlp", "merger_in"),
    _V + "merger/linear_fc1/bias": ("merger_mlp",),
    _V + "merger/linear_fc2/weight": ("embed", "merger_mlp"),
    _V + "merger/linear_fc2/bias": ("embed",),
    _V + "deepstack_merger_list/norm/scale": ("layers", "merger_in"),
    _V + "deepstack_merger_list/norm/bias": ("layers", "merger_in"),
    _V + "deepstack_merger_list/linear_fc1/weight": ("layers", "merger_mlp", "merger_in"),
    _V + "deepstack_merger_list/linear_fc1/bias": ("layers", "merger_mlp"),
    _V + "deepstack_merger_list/linear_fc2/weight": ("layers", "embed", "merger_mlp"),
    _V + "deepstack_merger_list/linear_fc2/bias": ("layers", "embed"),
}

# KV cache fields (kv_cache.KVCache) -> logical axes.
CACHE_AXES = dict(
    k=("layers", "batch", "cache_len", "kv_heads", "head_dim"),
    v=("layers", "batch", "cache_len", "kv_heads", "head_dim"),
    start=("batch",),
    end=(),
    delta=("batch",),
)


def make_mesh(dp: int | None = None, tp: int | None = None, devices: Sequence | None = None) -> Mesh:
    """A ("data", "model") mesh of dp x tp devices (default: all of jax.devices(), all on "model").

    Give one size and the other is the device count divided by it. The axes are of the Auto type:
    XLA's partitioner propagates the shardings of the arguments through the jitted functions."""
    devices = list(jax.devices() if devices is None else devices)
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
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh((dp, tp), devices)
    except Exception:
        grid = np.asarray(devices, dtype=object).reshape(dp, tp)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * 2)


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


def logical_to_spec(axes: Sequence[str], shape: Sequence[int], mesh: Mesh,
                    rules: dict[str, str | None] = RULES) -> P:
    """PartitionSpec of an array with these logical axes: each dim goes to its rule's mesh axis,
    unless that axis is absent from the mesh, already used by an earlier dim, or does not divide
    the dim, in which case the dim is replicated. A logical axis of None is replicated."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match the shape {tuple(shape)}")
    sizes = dict(mesh.shape)
    used, spec = set(), []
    for name, size in zip(axes, shape):
        mesh_axis = None if name is None else rules[name]
        if mesh_axis is None or mesh_axis not in sizes or mesh_axis in used or size % sizes[mesh_axis]:
            spec.append(None)
        else:
            spec.append(mesh_axis)
            used.add(mesh_axis)
    while spec and spec[-1] is None:  # canonical form: P() for replicated
        spec.pop()
    return P(*spec)


def param_shapes(config: Qwen3VLConfig) -> dict[str, tuple[int, ...]]:
    """Flat key -> shape of every param of this config (the converter's key table)."""
    from qvl_jax.convert.table import rules_for

    return {r.target: tuple(r.target_shape) for r in rules_for(config)}


def flat_param_shardings(config: Qwen3VLConfig, mesh: Mesh) -> dict[str, NamedSharding]:
    """Flat key ("model/language_model/...") -> NamedSharding of every param of this config."""
    mesh = check_mesh(mesh)
    out = {}
    for key, shape in param_shapes(config).items():
        if key not in PARAM_AXES:
            raise KeyError(f"no sharding rule for param {key!r}: add it to qvl_jax.sharding.PARAM_AXES")
        out[key] = NamedSharding(mesh, logical_to_spec(PARAM_AXES[key], shape, mesh))
    return out


def param_shardings(config: Qwen3VLConfig, mesh: Mesh, per_layer: bool = True) -> dict:
    """NamedSharding of every param, as a pytree shaped like the params.

    per_layer=True: shaped like `Model.params`, whose decoder layers and vision blocks are lists of
    per-layer dicts (model.unstack_layers); each entry's sharding is the stacked one without the
    layer axis. per_layer=False: shaped like the converter's stacked tree (what the file holds)."""
    from qvl_jax.checkpoint import unflatten

    tree = unflatten(flat_param_shardings(config, mesh))
    if per_layer:
        def split(stacked: dict, n: int) -> list:
            one = jax.tree.map(lambda s: NamedSharding(s.mesh, P(*s.spec[1:])), stacked)
            return [one] * n

        lm, vis = tree["model"]["language_model"], tree["model"]["visual"]
        lm["layers"] = split(lm["layers"], config.text.num_hidden_layers)
        vis["blocks"] = split(vis["blocks"], config.vision.depth)
    return tree


def cache_sharding(config: Qwen3VLConfig | TextConfig, mesh: Mesh, batch: int):
    """A KVCache whose fields are the NamedShardings of a cache of `batch` rows: k, v split over
    kv heads on "model" and over rows on "data" (each where it divides), positions over rows."""
    from qvl_jax.engine.cache import KVCache

    mesh = check_mesh(mesh)
    cfg = getattr(config, "text", config)
    kv_shape = (cfg.num_hidden_layers, batch, 1, cfg.num_key_value_heads, cfg.head_dim)  # length never split
    shapes = dict(k=kv_shape, v=kv_shape, start=(batch,), end=(), delta=(batch,))
    return KVCache(**{f: NamedSharding(mesh, logical_to_spec(CACHE_AXES[f], shapes[f], mesh))
                      for f in KVCache._fields})


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
