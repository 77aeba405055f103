"""The whole model: embed -> splice vision features at pad tokens -> decoder -> lm_head.

`load(path)` gives a `Model` holding the config and the param pytree. `Model.logits` is the full
forward pass over a prompt; everything shape-dependent and data-dependent (3-D positions, where the
vision features go, padding to length buckets) is worked out on the host with numpy, so the jitted
functions see only arrays of bucketed shapes and the params as arguments.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from qvl_jax.modeling import positions as positions_mod
from qvl_jax.modeling import text
from qvl_jax.modeling import vision as vision_mod
from qvl_jax.checkpoint import load_params
from qvl_jax.config import Qwen3VLConfig
from qvl_jax.errors import InputError, device_memory_errors


def bucket_length(n: int, minimum: int = 16, per_octave: int = 1) -> int:
    """The length that n pads to (>= minimum): lengths compile once per bucket.

    per_octave=1: the smallest power of two >= n (prompts, cache windows). per_octave=k (a power of
    two): n rounded up to a multiple of p / (2k), p that power of two, so each octave (p/2, p] holds
    k buckets and padding stays under 1/k of n."""
    p = max(minimum, 1 << max(0, int(n) - 1).bit_length())
    if per_octave <= 1 or p <= minimum:
        return p
    step = max(1, p // (2 * per_octave))
    return max(minimum, -(-int(n) // step) * step)


def vision_bucket(n_patches: int) -> int:
    """The patch bucket of a vision call: four per octave (784 -> 896, 1040 -> 1280), so padding is
    under a quarter of the patches rather than up to all of them (the tower compiles quickly; its
    work grows with the padded count)."""
    return bucket_length(n_patches, 64, per_octave=4)


def embed(params: dict, ids: jax.Array) -> jax.Array:
    return jnp.take(params["model"]["language_model"]["embed_tokens"]["embedding"], ids, axis=0)


def lm_head(params: dict, cfg: Qwen3VLConfig, h: jax.Array) -> jax.Array:
    if cfg.tie_word_embeddings:
        return text.linear(h, {"weight": params["model"]["language_model"]["embed_tokens"]["embedding"]})
    return text.linear(h, params["lm_head"])


def causal_mask(valid: jax.Array) -> jax.Array:
    """valid [b, t] -> [b, t, t]: query i sees key j when j <= i and j is a real token."""
    t = valid.shape[1]
    return jnp.tril(jnp.ones((t, t), dtype=bool))[None] & valid[:, None, :]


def splice_vision(x: jax.Array, feat_index: jax.Array, feats: jax.Array) -> jax.Array:
    """Replaces the embedding of each vision placeholder token by its feature row.

    feat_index [b, t]: row of `feats` for that token, -1 for every other token."""
    rows = jnp.take(feats, jnp.maximum(feat_index, 0), axis=0).astype(x.dtype)
    return jnp.where(feat_index[..., None] >= 0, rows, x)


def deepstack_at_tokens(deepstack: jax.Array, feat_index: jax.Array) -> jax.Array:
    """[K, n_feats, d] DeepStack features -> [K, b, t, d], zero away from vision tokens."""
    rows = jnp.take(deepstack, jnp.maximum(feat_index, 0), axis=1)
    return jnp.where(feat_index[None, ..., None] >= 0, rows, jnp.zeros_like(rows))


def embed_inputs(params: dict, cfg: Qwen3VLConfig, input_ids: jax.Array, vision: tuple | None):
    """Token embeddings with vision features spliced in, and the per-token DeepStack features."""
    x = embed(params, input_ids)
    if vision is None:
        return x, None
    feats, deepstack, feat_index = vision
    x = splice_vision(x, feat_index, feats)
    return x, (deepstack_at_tokens(deepstack, feat_index).astype(x.dtype) if deepstack.shape[0] else None)


@functools.partial(jax.jit, static_argnames=("cfg",))
def forward_logits(params: dict, cfg: Qwen3VLConfig, input_ids: jax.Array, positions: jax.Array,
                   valid: jax.Array, vision: tuple | None = None) -> jax.Array:
    """Full-prompt forward: logits [b, t, vocab] in float32.

    vision: (features [n, d], deepstack [K, n, d], feat_index [b, t]) or None for text-only input."""
    x, deepstack = embed_inputs(params, cfg, input_ids, vision)
    h, _ = text.decoder(params["model"]["language_model"], cfg.text, x, positions, causal_mask(valid),
                        deepstack=deepstack)
    return lm_head(params, cfg, h).astype(jnp.float32)


def _as_batch(name: str, value, dtype_kind: str = "iu") -> np.ndarray:
    try:
        arr = np.asarray(value)
    except Exception as e:  # ragged lists and the like
        raise InputError(f"{name} must be an array of shape [batch, length] ({e})") from None
    if arr.size == 0:  # before the dtype check: np.asarray([]) is float64
        raise InputError(f"{name} is empty (shape {list(arr.shape)}); it needs at least one token per row")
    if arr.dtype.kind not in dtype_kind:
        raise InputError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise InputError(f"{name} must have shape [batch, length] with length > 0, got {list(arr.shape)}")
    return arr


@dataclasses.dataclass(frozen=True)
class PreparedInputs:
    """Host-side result of checking and laying out one batch of model inputs (unpadded)."""

    input_ids: np.ndarray  # [b, t] int32
    mask: np.ndarray  # [b, t] int32
    positions: np.ndarray  # [3, b, t] int32
    rope_delta: np.ndarray  # [b] int32
    feat_index: np.ndarray | None  # [b, t] int32 row of the vision features, -1 elsewhere
    vision: vision_mod.VisionInputs | None


def _feature_index(ids: np.ndarray, cfg: Qwen3VLConfig, n_image: int, n_video: int) -> np.ndarray:
    """Image tokens take image features in row-major order, video tokens the video features (which
    follow the image features in the tower's output), as transformers' masked_scatter does."""
    is_img, is_vid = ids == cfg.image_token_id, ids == cfg.video_token_id
    for kind, mask, n in (("image", is_img, n_image), ("video", is_vid, n_video)):
        if int(mask.sum()) != n:
            raise InputError(f"{kind} features and {kind} tokens do not match: {int(mask.sum())} "
                             f"{kind} placeholder tokens in input_ids, {n} {kind} features from the grids")
    index = np.full(ids.shape, -1, np.int32)
    index[is_img] = np.arange(n_image)
    index[is_vid] = n_image + np.arange(n_video)
    return index


def _mask(attention_mask, shape) -> np.ndarray:
    if attention_mask is None:
        return np.ones(shape, np.int32)
    mask = _as_batch("attention_mask", attention_mask, "iub")
    if mask.shape != shape:
        raise InputError(f"attention_mask shape {list(mask.shape)} != input_ids shape {list(shape)}")
    if not np.isin(mask, (0, 1)).all():
        raise InputError("attention_mask must hold only 0 and 1")
    if not mask.any(axis=1).all():
        raise InputError("attention_mask has a row with no real tokens")
    return mask.astype(np.int32)


def prepare_inputs(cfg: Qwen3VLConfig, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                   pixel_values_videos=None, video_grid_thw=None, mm_token_type_ids=None) -> PreparedInputs:
    """Checks a batch of HF-style inputs and computes everything shape- or data-dependent on the host."""
    ids = _as_batch("input_ids", input_ids)
    vocab = cfg.text.vocab_size
    if ids.min() < 0 or ids.max() >= vocab:
        raise InputError(f"input_ids must lie in [0, {vocab}), got values in [{ids.min()}, {ids.max()}]")
    mask = _mask(attention_mask, ids.shape)
    types = positions_mod.token_types(ids, cfg.image_token_id, cfg.video_token_id)
    if mm_token_type_ids is not None:
        given = _as_batch("mm_token_type_ids", mm_token_type_ids)
        if given.shape != ids.shape or not np.array_equal(given, types):
            raise InputError("mm_token_type_ids disagrees with the image/video placeholder tokens in input_ids")

    vcfg = cfg.vision
    grid = {}
    for kind, pix, g in (("image", pixel_values, image_grid_thw), ("video", pixel_values_videos, video_grid_thw)):
        if (pix is None) != (g is None):
            raise InputError(f"{kind} pixel values and {kind}_grid_thw must be given together")
        grid[kind] = None if g is None else vision_mod.check_grid_thw(g, vcfg, f"{kind}_grid_thw")
    positions, delta = positions_mod.rope_index(types, mask, grid["image"], grid["video"], vcfg.spatial_merge_size)

    group = vcfg.spatial_merge_size ** 2
    n_feats = {k: 0 if g is None else int(g.prod(-1).sum()) // group for k, g in grid.items()}
    feat_index = _feature_index(ids, cfg, n_feats["image"], n_feats["video"])
    vis = None
    present = [(pix, grid[k]) for k, pix in (("image", pixel_values), ("video", pixel_values_videos))
               if pix is not None]
    if present:
        # Images and videos go through the tower in one call: attention never crosses a frame, so
        # this equals running them apart, and the video features land right after the image ones.
        all_grids = np.concatenate([g for _, g in present])
        pix = [np.asarray(p) for p, _ in present]
        widths = {p.shape[-1] for p in pix if p.ndim == 2}
        if any(p.ndim != 2 for p in pix) or len(widths) != 1:
            raise InputError(f"pixel values must be [patches, {vcfg.patch_dim}] arrays, got shapes "
                             f"{[list(p.shape) for p in pix]}")
        n_patches = int(all_grids.prod(-1).sum())
        vis = vision_mod.VisionInputs.build(np.concatenate(pix), all_grids, vcfg, vision_bucket(n_patches))
    return PreparedInputs(ids.astype(np.int32), mask, positions, delta, feat_index if present else None, vis)


def run_vision(params: dict, cfg: Qwen3VLConfig, vis: vision_mod.VisionInputs) -> tuple[jax.Array, jax.Array]:
    """Merged features [bucket / m^2, d] and DeepStack features [K, bucket / m^2, d] of all images and
    videos, in Hugging Face's token order (padding rows last)."""
    return vision_mod.tower_jit(params["model"]["visual"], cfg.vision, jnp.asarray(vis.patches),
                                jnp.asarray(vis.pos_idx), jnp.asarray(vis.pos_w), jnp.asarray(vis.rope_pos),
                                jnp.asarray(vis.frame), jnp.asarray(vis.merged_order), packed=vis.packed)


def unstack_layers(params: dict) -> dict:
    """The converter stores decoder layers and vision blocks stacked along a leading axis (one tensor
    per weight kind); the model runs them from separate per-layer arrays. Replaces `layers` / `blocks`
    by lists of per-layer dicts *in place* and returns the same tree (already-split trees pass
    through).

    In place, because a caller's reference to the stacked tree (qvl_jax.load's own, for one) would
    otherwise keep every stacked weight alive beside its per-layer copy: 1.5x the params on the device
    until the load returns. Each stacked array is dropped as soon as it is split, so the transient
    extra memory is one weight kind."""
    for parent, key in ((params["model"]["language_model"], "layers"), (params["model"]["visual"], "blocks")):
        if isinstance(parent[key], list):
            continue
        # After the pop only `leaves` holds the stacked arrays, so clearing an entry frees it.
        leaves, treedef = jax.tree.flatten(parent.pop(key))
        n = leaves[0].shape[0]
        per_leaf = []
        for i in range(len(leaves)):
            per_leaf.append([leaves[i][j] for j in range(n)])
            leaves[i] = None
        parent[key] = [jax.tree.unflatten(treedef, [pl[j] for pl in per_leaf]) for j in range(n)]
    return params


@dataclasses.dataclass
class Model:
    """A loaded Qwen3-VL model: `config`, `params` (the param pytree) and the inference entry points.

    `params` is the converter's tree with the stacked decoder layers and vision blocks split into
    lists of per-layer dicts (`unstack_layers`)."""

    config: Qwen3VLConfig
    params: dict
    generation_defaults: dict = dataclasses.field(default_factory=dict)  # from generation_config.json
    mesh: jax.sharding.Mesh | None = None  # the params' (and KV caches') mesh; None: one device

    def __post_init__(self):
        self.params = unstack_layers(self.params)

    @property
    def dtype(self):
        """Activation / KV-cache dtype: that of the decoder weights."""
        return self.params["model"]["language_model"]["embed_tokens"]["embedding"].dtype

    def generate(self, max_new_tokens: int = 64, **kwargs):
        """Generates up to max_new_tokens new tokens for each row of a batch.

        Inputs as for `logits` (any padding side). With no sampling argument decoding is greedy.
        Keyword arguments: temperature (0 = greedy), top_k, top_p, min_p, repetition_penalty,
        frequency_penalty, presence_penalty (each a number or one per row), seed, stop_token_ids
        (default: the checkpoint's eos ids), pad_token_id, return_logprobs, return_logits.
        Returns a `GenerateOutput`: tokens np.int32 [b, n] (stop token included, pad after it),
        lengths [b], and optionally logprobs [b, n] and raw logits [b, n, vocab]."""
        from qvl_jax.engine import generate

        with device_memory_errors("generate"):
            return generate.generate(self, max_new_tokens, **kwargs)

    def stream(self, max_new_tokens: int = 64, **kwargs):
        """Like `generate`, as an iterator of np.int32 [b] tokens, one step at a time."""
        from qvl_jax.engine import generate

        def guarded():
            with device_memory_errors("stream"):
                yield from generate.stream(self, max_new_tokens, **kwargs)

        return guarded()

    def chat_session(self, max_cache_len: int | None = None):
        """A `ChatSession`: multi-turn generation that reuses the KV cache across turns."""
        from qvl_jax.engine import generate

        return generate.ChatSession(self, max_cache_len)

    def logits(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
               pixel_values_videos=None, video_grid_thw=None, mm_token_type_ids=None) -> np.ndarray:
        """Logits of every prompt position: np.float32 [batch, length, vocab].

        Inputs as Hugging Face's processor returns them; mm_token_type_ids is derived from input_ids
        when not given. Positions of padding tokens (attention_mask == 0) hold unspecified values."""
        inp = prepare_inputs(self.config, input_ids, attention_mask, pixel_values, image_grid_thw,
                             pixel_values_videos, video_grid_thw, mm_token_type_ids)
        with device_memory_errors("logits"):
            return self._logits(inp)

    def _logits(self, inp: PreparedInputs) -> np.ndarray:
        b, t = inp.input_ids.shape
        tb = bucket_length(t)
        pad = ((0, 0), (0, tb - t))
        vision = None
        if inp.vision is not None:
            feats, deepstack = run_vision(self.params, self.config, inp.vision)
            vision = (feats, deepstack, jnp.asarray(np.pad(inp.feat_index, pad, constant_values=-1)))
        out = forward_logits(self.params, self.config, jnp.asarray(np.pad(inp.input_ids, pad)),
                             jnp.asarray(np.pad(inp.positions, ((0, 0), *pad))),
                             jnp.asarray(np.pad(inp.mask, pad) > 0), vision)
        return np.asarray(out[:, :t])


def load(path: str | os.PathLike, dtype=None, mesh=None, verify: bool = False) -> Model:
    """Loads a converted qvl_jax directory, or a Hugging Face checkpoint directory (converted in memory).

    dtype: cast every param to this dtype on load (default: as stored).
    mesh: a ("data", "model") mesh (qvl_jax.sharding.make_mesh, or jax.make_mesh with those axis
    names): each param is read straight into its NamedSharding (tensor parallel on "model"), KV
    caches are split the same way, and the jitted functions run partitioned by XLA.
    verify: recompute the converted params file's sha256 and compare it with the one recorded at
    conversion (CheckpointError if it differs); without it only the file size is checked.
    """
    if mesh is not None:
        from qvl_jax.sharding import check_mesh

        mesh = check_mesh(mesh)
    config, params = load_params(path, dtype, mesh, verify)
    return Model(config, params, _generation_defaults(path), mesh)


def _generation_defaults(path) -> dict:
    """eos_token_id (as a list) and pad_token_id from generation_config.json, when the model has one."""
    import json
    from pathlib import Path

    f = Path(path) / "generation_config.json"
    if not f.is_file():
        return {}
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    eos = d.get("eos_token_id")
    out = {}
    if eos is not None:
        out["eos_token_id"] = [eos] if isinstance(eos, int) else list(eos)
    if isinstance(d.get("pad_token_id"), int):
        out["pad_token_id"] = d["pad_token_id"]
    return out
