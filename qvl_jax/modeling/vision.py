"""The Qwen3-VL vision tower as Flax NNX modules (transformers' paths: `visual.patch_embed.proj`,
`visual.pos_embed`, `visual.blocks[i].attn.qkv`, `visual.merger`, `visual.deepstack_merger_list[k]`):
patch embed, learned position embedding, 2-D rotary, ViT blocks, patch merger and DeepStack mergers.

Everything that depends on the image grids (`grid_thw`) is computed on the host with numpy
(`VisionInputs.build`): the bilinear taps into the learned 48x48 position table, the (row, col) rotary
positions, and which frame each patch belongs to (attention is full inside a frame and blocked across
frames and images).

Patches arrive in Hugging Face's order: per image/frame, merge blocks of spatial_merge_size**2
neighbouring patches, row-major over blocks. The tower does not run them in that order: the host packs
the frames into attention blocks of one size (`block_layout`), and attention is
computed per block, [blocks, S, S] scores instead of [P, P] over the whole call. A video of 16 frames
of 784 patches thus costs 16 x 1024^2 score entries instead of 16384^2. Inside a block a frame mask
still separates frames that were packed together. The merged features are gathered back to Hugging
Face's order at the end. Block and patch counts are bucketed, so a new image size reuses a compiled
tower when it falls in a known bucket; padding slots belong to no frame and their outputs are never
used.

Einsum letters: p patches (queries), q patches (keys), d width, j heads, h head_dim, c the q/k/v
triple, f MLP width.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qvl_jax.config import VisionConfig
from qvl_jax.errors import InputError
from qvl_jax.modeling import attention
from qvl_jax.modeling.layers import Embedding, LayerNorm, Linear, apply_rope, gelu, rope_inv_freq


def _merge_block_rows_cols(h: int, w: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of each patch of an h x w frame, listed in merge-block order."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // merge, merge, w // merge, merge)
    return rows.reshape(shape).transpose(0, 2, 1, 3).ravel(), cols.reshape(shape).transpose(0, 2, 1, 3).ravel()


def _axis_taps(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear, align_corners=True taps of `size` target points into a `side`-long table (float32 as
    the reference): source coordinate i * (side - 1) / (size - 1)."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    taps = floor.astype(np.int64)[:, None] + np.arange(2)
    weights = np.clip(1 - np.abs(src[:, None] - floor[:, None] - np.arange(2, dtype=np.float32)), 0, None)
    return np.clip(taps, 0, side - 1), weights.astype(np.float32)


def pos_embed_taps(grid_thw: np.ndarray, cfg: VisionConfig) -> tuple[np.ndarray, np.ndarray]:
    """For every patch, 4 indices into the learned position table and their bilinear weights:
    the side x side table resized to each frame's (h, w), tiled over t, in merge-block order."""
    side, merge = cfg.num_grid_per_side, cfg.spatial_merge_size
    idx, wts = [], []
    for t, h, w in grid_thw:
        rows, cols = _merge_block_rows_cols(h, w, merge)
        rt, rw = _axis_taps(rows, h, side)
        ct, cw = _axis_taps(cols, w, side)
        i = (rt[:, :, None] * side + ct[:, None, :]).reshape(-1, 4)
        wt = (rw[:, :, None] * cw[:, None, :]).reshape(-1, 4)
        idx.append(np.tile(i, (t, 1)))
        wts.append(np.tile(wt, (t, 1)))
    return np.concatenate(idx).astype(np.int32), np.concatenate(wts).astype(np.float32)


def rope_positions(grid_thw: np.ndarray, merge: int) -> np.ndarray:
    """[patches, 2] (row, col) of every patch, merge-block order, repeated for each of the t frames."""
    out = []
    for t, h, w in grid_thw:
        rows, cols = _merge_block_rows_cols(h, w, merge)
        out.append(np.tile(np.stack([rows, cols], -1), (t, 1)))
    return np.concatenate(out).astype(np.int32)


def frame_ids(grid_thw: np.ndarray) -> np.ndarray:
    """[patches] index of the frame (temporal step of an image or video) each patch belongs to."""
    sizes = np.repeat(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return np.repeat(np.arange(len(sizes)), sizes).astype(np.int32)


def vision_rope_inv_freq(cfg: VisionConfig) -> np.ndarray:
    """head_dim/4 frequencies shared by the row and the column halves of each head."""
    return rope_inv_freq(cfg.head_dim // 2, cfg.rope_theta)


def check_grid_thw(grid_thw, cfg: VisionConfig, name: str) -> np.ndarray:
    try:
        grid = np.asarray(grid_thw)
    except Exception:
        raise InputError(f"{name} must be an integer array of shape [n, 3]") from None
    if grid.dtype.kind not in "iu" or grid.ndim != 2 or grid.shape[1] != 3 or len(grid) == 0:
        raise InputError(f"{name} must be an integer array of shape [n, 3], got {grid.dtype} {list(grid.shape)}")
    if (grid <= 0).any():
        raise InputError(f"{name} entries must be positive, got {grid.tolist()}")
    m = cfg.spatial_merge_size
    if (grid[:, 1] % m).any() or (grid[:, 2] % m).any():
        raise InputError(f"{name} heights and widths must be multiples of spatial_merge_size={m}, got {grid.tolist()}")
    return grid.astype(np.int64)


def block_layout(sizes: np.ndarray, bucket: int, pack: bool = True) -> tuple[int, int, np.ndarray]:
    """Packs frames of `sizes` patches into attention blocks: (block size S, block count B, the flat
    slot of each frame's first patch).

    S is the power of two (>= 64) that holds the largest frame, or the bucket where that is smaller
    (buckets need not be powers of two: one 784-patch image is one block of 896); frames go first-fit, largest first,
    so small images share a block (their frame mask keeps them apart). B is at least bucket // S,
    which keeps the slot count at the patch bucket whenever the frames pack without loss (always for
    one image, or frames of one video whose size is a power of two), and a power of two otherwise.
    Sizes are multiples of spatial_merge_size**2, so every frame starts on a merge-group boundary.
    pack=False gives every frame a block of its own, starting at the block's first slot (what the
    fused attention kernels need: a block's padding is then its tail, masked by a length).
    """
    size = min(bucket, max(64, 1 << (int(sizes.max()) - 1).bit_length()))
    free: list[int] = []
    block_of = np.zeros(len(sizes), np.int64)
    offset = np.zeros(len(sizes), np.int64)
    for f in sorted(range(len(sizes)), key=lambda i: -int(sizes[i])):  # stable: ties keep their order
        b = next((i for i, room in enumerate(free) if room >= sizes[f]), len(free)) if pack else len(free)
        if b == len(free):
            free.append(size)
        block_of[f], offset[f] = b, size - free[b]
        free[b] -= int(sizes[f])
    blocks = max(bucket // size, 1 << (len(free) - 1).bit_length())
    return size, blocks, block_of * size + offset


@dataclasses.dataclass(frozen=True)
class VisionInputs:
    """Host-computed inputs of one vision-tower call, laid out in attention blocks (`block_layout`)."""

    patches: np.ndarray  # [B*S, C*T*P*P] float, zero in padding slots
    pos_idx: np.ndarray  # [B*S, 4] int32
    pos_w: np.ndarray  # [B*S, 4] float32
    rope_pos: np.ndarray  # [B*S, 2] int32
    frame: np.ndarray  # [B, S] int32 frame of each slot, -1 for padding
    merged_order: np.ndarray  # [bucket / m^2] int32: for each merged token in HF order, its merged row
    packed: bool = True  # several frames may share a block (False: one frame per block, at its start)

    @classmethod
    def build(cls, pixel_values, grid_thw: np.ndarray, cfg: VisionConfig, bucket: int,
              pack: bool | None = None) -> "VisionInputs":
        """pack: whether frames may share a block; default: as the config's attention kernel needs
        (`attention.packs_frames`)."""
        if pack is None:
            pack = attention.packs_frames(cfg.attention)
        pixels = np.asarray(pixel_values)
        if pixels.dtype.kind != "f":
            raise InputError(f"pixel values must be floating point, got dtype {pixels.dtype}")
        n = int((grid_thw[:, 0] * grid_thw[:, 1] * grid_thw[:, 2]).sum())
        if pixels.ndim != 2 or pixels.shape != (n, cfg.patch_dim):
            raise InputError(f"pixel values have shape {list(pixels.shape)}; the grids imply [{n}, {cfg.patch_dim}]")
        if not np.isfinite(pixels).all():
            raise InputError("pixel values contain NaN or inf")
        frame = frame_ids(grid_thw)
        sizes = np.bincount(frame)
        size, blocks, starts = block_layout(sizes, bucket, pack)
        # slot[i]: where patch i (HF order) sits in the block layout.
        first = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        slot = starts[frame] + np.arange(n) - first[frame]
        slots = blocks * size

        def place(a, fill=0):
            out = np.full((slots, *a.shape[1:]), fill, a.dtype)
            out[slot] = a
            return out

        pos_idx, pos_w = pos_embed_taps(grid_thw, cfg)
        group = cfg.spatial_merge_size ** 2
        merged_order = np.zeros(bucket // group, np.int32)
        merged_order[: n // group] = slot[::group] // group
        return cls(
            patches=place(pixels), pos_idx=place(pos_idx), pos_w=place(pos_w),
            rope_pos=place(rope_positions(grid_thw, cfg.spatial_merge_size)),
            frame=place(frame, -1).reshape(blocks, size), merged_order=merged_order, packed=pack,
        )


@jax.custom_jvp
def _same(p: jax.Array) -> jax.Array:
    """p itself, through nextafter(p, p) (see `_attend`); differentiable as the identity."""
    return jax.lax.nextafter(p, p)


_same.defjvp(lambda primals, tangents: (_same(primals[0]), tangents[0]))


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Attention inside one block: q, k, v [S, heads, head_dim], mask [S, S]; softmax in float32."""
    scores = jnp.einsum("pjh,qjh->jpq", q, k, preferred_element_type=jnp.float32) * (q.shape[-1] ** -0.5)
    scores = jnp.where(mask[None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    # The same values as the softmax alone. Without an op YNNPACK does not take between them, XLA:CPU
    # fuses the whole softmax into YNNPACK's product of the probabilities and the values, which runs
    # it several times slower than XLA's own fusion (18 blocks over 256 patches: bfloat16 224 -> 200
    # ms, float32 594-601 -> 552-555 ms; the same bits out). bfloat16 rounds to its bits first
    # (reduce_precision); float32 takes nextafter(p, p) = p (a float32 reduce_precision is folded
    # away). In the decoder's `attention.attend` the bfloat16 form measured slower (512 queries over
    # 512 keys: 15-18 against 14-15 ms), so it is not used there.
    if v.dtype == jnp.bfloat16:
        probs = jax.lax.reduce_precision(probs, exponent_bits=8, mantissa_bits=7)
    else:
        probs = _same(probs)
    probs = probs.astype(v.dtype)
    # float32 result, rounded once (as `attention.attend`: XLA:CPU's bfloat16-result product is slow)
    return jnp.einsum("jpq,qjh->pjh", probs, v, preferred_element_type=jnp.float32).astype(v.dtype)


def block_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, loop: bool | None = None):
    """Attention of q, k, v [B*S, heads, head_dim] inside each of the B blocks of mask [B, S, S].

    loop (default: on CPU): blocks one after another (lax.map) rather than batched (vmap). XLA CPU
    ran the batched form, an einsum with two batch dims, at 1.4-1.5x the time of the one-block form;
    on accelerators the batched form keeps every block in one kernel."""
    blocks, size = mask.shape[:2]
    if loop is None:
        loop = jax.default_backend() == "cpu"
    if blocks == 1:
        return _attend(q, k, v, mask[0])
    q, k, v = (a.reshape(blocks, size, *a.shape[1:]) for a in (q, k, v))
    out = jax.lax.map(lambda a: _attend(*a), (q, k, v, mask)) if loop else jax.vmap(_attend)(q, k, v, mask)
    return out.reshape(blocks * size, *out.shape[2:])


class PatchEmbed(nnx.Module):
    """Conv3d with stride == kernel over patches already flattened as (C, T, P, P): a matmul with
    the [out, C, T, P, P] weight viewed as [out, C*T*P*P] (Linear does that reshape)."""

    def __init__(self, cfg: VisionConfig, *, rngs, dtype=jnp.float32):
        kernel = (cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = Linear(kernel, cfg.hidden_size, bias=True, axes=("vision_embed",) + ("patch",) * 4,
                           rngs=rngs, dtype=dtype)

    def __call__(self, patches: jax.Array) -> jax.Array:
        return self.proj(patches.astype(self.proj.weight.dtype))


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs, dtype=jnp.float32):
        D, hd = cfg.hidden_size, cfg.head_dim
        # The fused [3 * D, D] projection is split as reshape(3, heads, head_dim): a split of its
        # output axis would cut across q, k and v, so it stays whole ("qkv" is never sharded).
        self.qkv = Linear(D, 3 * D, bias=True, axes=("qkv", "vision_embed"), rngs=rngs, dtype=dtype)
        self.proj = Linear(D, D, bias=True, axes=("vision_embed", "vision_heads"), units=(1, hd), rngs=rngs,
                           dtype=dtype)
        self.num_heads, self.head_dim = cfg.num_heads, hd

    def __call__(self, x, cos, sin, mask, lengths=None, impl: str = "einsum"):
        qkv = self.qkv(x, (3, self.num_heads, self.head_dim))  # [P, 3, heads, head_dim]
        q, k, v = apply_rope(qkv[:, 0], cos, sin), apply_rope(qkv[:, 1], cos, sin), qkv[:, 2]
        kernel = getattr(self, "attend_kernel", None)  # the engine's CPU kernel, where its view sets one
        if impl == "einsum":
            attn = block_attention(q, k, v, mask) if kernel is None else kernel(q, k, v, mask)
        else:
            q, k, v = (a.reshape(lengths.shape[0], -1, *a.shape[1:]) for a in (q, k, v))
            attn = attention.fused(q, k, v, impl, lengths=lengths).reshape(x.shape[0], *q.shape[2:])
        return self.proj(attn.reshape(x.shape[0], -1))


class VisionMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs, dtype=jnp.float32):
        D, F = cfg.hidden_size, cfg.intermediate_size
        self.linear_fc1 = Linear(D, F, bias=True, axes=("vision_mlp", "vision_embed"), rngs=rngs, dtype=dtype)
        self.linear_fc2 = Linear(F, D, bias=True, axes=("vision_embed", "vision_mlp"), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_fc2(gelu(self.linear_fc1(x), approximate=True))  # tanh-GELU, as the reference


class VisionBlock(nnx.Module):
    """One ViT block: pre-LayerNorm attention and tanh-GELU MLP, both residual."""

    def __init__(self, cfg: VisionConfig, *, rngs, dtype=jnp.float32):
        self.norm1 = LayerNorm(cfg.hidden_size, axes=("vision_embed",), dtype=dtype)
        self.norm2 = LayerNorm(cfg.hidden_size, axes=("vision_embed",), dtype=dtype)
        self.attn = VisionAttention(cfg, rngs=rngs, dtype=dtype)
        self.mlp = VisionMLP(cfg, rngs=rngs, dtype=dtype)

    def __call__(self, x, cos, sin, mask, lengths=None, impl: str = "einsum"):
        """x [B*S, d] in block layout; attention runs inside each of the B blocks, mask [B, S, S].
        With a fused kernel (impl "xla" / "cudnn", one frame per block) lengths [B] masks each
        block's tail instead, and mask is None."""
        x = x + self.attn(self.norm1(x), cos, sin, mask, lengths, impl)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """Groups spatial_merge_size**2 consecutive patches (one merge block) into one token of the text
    width. The main merger normalises each patch and then groups (postshuffle_norm False); the
    DeepStack mergers group first and normalise the grouped vector. Both use exact (erf) GELU."""

    def __init__(self, cfg: VisionConfig, postshuffle_norm: bool, *, rngs, dtype=jnp.float32):
        self.group = cfg.spatial_merge_size ** 2
        wide = cfg.hidden_size * self.group
        self.postshuffle_norm = postshuffle_norm
        self.norm = LayerNorm(wide if postshuffle_norm else cfg.hidden_size,
                              axes=("merger_in",) if postshuffle_norm else ("vision_embed",), dtype=dtype)
        self.linear_fc1 = Linear(wide, wide, bias=True, axes=("merger_mlp", "merger_in"), rngs=rngs, dtype=dtype)
        self.linear_fc2 = Linear(wide, cfg.out_hidden_size, bias=True, axes=("embed", "merger_mlp"), rngs=rngs,
                                 dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.postshuffle_norm:
            x = self.norm(x.reshape(-1, x.shape[-1] * self.group))
        else:
            x = self.norm(x).reshape(-1, x.shape[-1] * self.group)
        return self.linear_fc2(gelu(self.linear_fc1(x), approximate=False))


class VisionModel(nnx.Module):
    """The tower (transformers' Qwen3VLVisionModel)."""

    def __init__(self, cfg: VisionConfig, *, rngs, dtype=jnp.float32):
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg, rngs=rngs, dtype=dtype)
        self.pos_embed = Embedding(cfg.num_position_embeddings, cfg.hidden_size, axes=("pos_table", "vision_embed"),
                                   rngs=rngs, dtype=dtype)
        self.blocks = nnx.List([VisionBlock(cfg, rngs=rngs, dtype=dtype) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, False, rngs=rngs, dtype=dtype)
        self.deepstack_merger_list = nnx.List([PatchMerger(cfg, True, rngs=rngs, dtype=dtype)
                                               for _ in cfg.deepstack_visual_indexes])

    def __call__(self, patches: jax.Array, pos_idx: jax.Array, pos_w: jax.Array, rope_pos: jax.Array,
                 frame: jax.Array, merged_order: jax.Array, packed: bool = True) -> tuple[jax.Array, jax.Array]:
        """(merged [n, out], deepstack [K, n, out]) in Hugging Face's token order, n = len(merged_order),
        for patches [B*S, C*T*P*P] in block layout (see VisionInputs; packed as VisionInputs.packed)."""
        cfg = self.config
        dtype = self.patch_embed.proj.weight.dtype
        impl = "einsum" if packed else attention.implementation(cfg.attention, dtype)
        x = self.patch_embed(patches)
        pos = self.pos_embed(pos_idx)  # [P, 4, d]
        x = x + jnp.sum(pos * pos_w[..., None].astype(pos.dtype), axis=1).astype(x.dtype)

        inv_freq = jnp.asarray(vision_rope_inv_freq(cfg))
        freqs = rope_pos.astype(jnp.float32)[..., None] * inv_freq  # [P, 2, head_dim/4]
        emb = jnp.concatenate([freqs[:, 0], freqs[:, 1]], axis=-1)
        emb = jnp.concatenate([emb, emb], axis=-1)
        cos, sin = jnp.cos(emb), jnp.sin(emb)
        if impl == "einsum":
            mask, lengths = (frame[:, :, None] == frame[:, None, :]) & (frame[:, None, :] >= 0), None  # [B, S, S]
        else:  # one frame per block, at its start: the padding is each block's tail
            mask, lengths = None, jnp.sum(frame >= 0, axis=1)  # [B]

        taps = []
        for i, blk in enumerate(self.blocks):  # unrolled, as the text decoder (see text.TextModel)
            x = blk(x, cos, sin, mask, lengths, impl)
            if i in cfg.deepstack_visual_indexes:
                taps.append(x)
        merged = jnp.take(self.merger(x), merged_order, axis=0)
        if not taps:
            return merged, jnp.zeros((0, *merged.shape), merged.dtype)
        deepstack = jnp.stack([m(t) for m, t in zip(self.deepstack_merger_list, taps)])
        return merged, jnp.take(deepstack, merged_order, axis=1)
