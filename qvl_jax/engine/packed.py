"""The decoder's and lm_head's weights packed for the CPU kernels' bfloat16 product
(`cpu_kernel.gemm_packed`): the engine's default on a CPU with AMX or AVX512_BF16
(`Engine(packed_weights=...)`, `qvl-jax serve --packed-weights / --no-packed-weights`).

On an Intel CPU with AMX, XLA's bfloat16 product of a prompt chunk with a decoder weight runs at
about two thirds of what the tile unit gives over a weight laid out for it, and the products are
three quarters of a chunk's step (`scripts/bench_products.py`, docs/performance.md); there the
packed product is XLA's bit for bit, and a 512-token step at 2B widths, 4 layers, is ~1.25-1.6x
faster. On a CPU with AVX512_BF16 and no AMX (AMD Zen 4 / 5), XLA's product reads the weight of a
decode step's few rows at ~10 GB/s; the packed one (VDPBF16PS) 2-3x faster, as fast as XLA's at a
prompt chunk's rows: a 2B decode step of 8 rows ~1.6x faster; its float32 sums run in another
order, so a token may differ from the unpacked engine's where the top two logits tie in bfloat16.
`StepParams` gives the engine's steps the model with each decoder `Linear`'s weight and the
lm_head's (the embedding table where tied) also packed (`PackedWeight` beside its Param); such a
module computes through `gemm_packed`: the float32 sums rounded to bfloat16 as `matmul_t` rounds
them (`layers.round_to`). The packed copies hold those weights once more (the 2B model: ~3.4 GB).
`Engine(packed_weights=None)`, the default, packs where AMX or AVX512_BF16 runs the
product and that copy fits in half of the host memory left beside the KV pool (`default_off` says
why not elsewhere). The copies follow the model: when its params change (training, LoRA,
`set_attention`), the next step packs them again. Only the engine's steps use them; generate and
training keep the model's own. The same view (`StepParams`) has the vision blocks attend through
`cpu_kernel.block_attention` wherever the engine runs the CPU kernels (any dtype). A mixed step's
padding tokens (its chunks' length rounded up to a bucket) skip the packed products (`skip_rows`):
a 300-token chunk in a 384-token bucket costs its 300 rows' products, not 384.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp
from flax import nnx

from qvl_jax.engine import cpu_kernel
from qvl_jax.modeling.layers import Embedding, Linear, PackedWeight
from qvl_jax.modeling.model import split


def why_not(model, cpu_kernels: bool) -> str | None:
    """Why the engine cannot pack this model's decoder weights; None if it can."""
    if not cpu_kernels:
        return "the engine does not run the CPU kernels here"
    if jnp.dtype(model.dtype) != jnp.bfloat16:
        return f"the model is {jnp.dtype(model.dtype).name}; the packed product is bfloat16"
    if model.quantization is not None:
        return f"the decoder's weights are quantized ({model.quantization})"
    return None


def default_off(model, cpu_kernels: bool, free: int | None, pool_bytes: int) -> str | None:
    """Why the engine does not pack by default here (None: it packs): where packing cannot run, where
    the kernels' product would run on neither AMX nor AVX512_BF16 (the plain loop it falls back to
    is far slower than XLA's product), or where the packed copy would take more than half of the host
    memory left free beside the KV pool (`free`: the free host memory before the pool)."""
    why = why_not(model, cpu_kernels)
    if why is not None:
        return why
    if cpu_kernel.product_unit() is None:
        return "the CPU kernels' product has neither AMX tiles nor AVX512_BF16 vectors here"
    need = nbytes(model)
    if free is not None and need > (free - pool_bytes) // 2:
        return (f"the packed copy ({need >> 20} MiB) would take more than half of the free host memory "
                f"beside the KV pool ({max(free - pool_bytes, 0) >> 20} MiB)")
    return None


def nbytes(model) -> int:
    """The packed copy's size: the packed decoder projections' and lm_head's weights, once more."""
    return sum(w.nbytes for _, w in _packable(model.module))


def _packable(module):
    """(module, weight) of each decoder layer's plain bfloat16 projection and of the lm_head (the
    embedding table where tied), where the weight's dims are multiples of 32."""
    def fits(w):
        return (isinstance(w, jax.Array) and w.ndim == 2 and w.dtype == jnp.bfloat16
                and not w.shape[0] % 32 and not w.shape[1] % 32)

    for layer in module.model.language_model.layers:
        for _, node in nnx.iter_graph(layer):
            if type(node) is Linear and fits(w := node.weight.get_value()):
                yield node, w
    head = module.lm_head if module.lm_head is not None else module.model.language_model.embed_tokens
    if type(head) in (Linear, Embedding) and fits(w := head.weight.get_value()):
        yield head, w


_SKIP = contextvars.ContextVar("qvl_packed_skip", default=None)


@contextlib.contextmanager
def skip_rows(rows: int, lo, hi: int):
    """While a step traces its decoder over `rows` flattened rows: the packed products of that many
    rows leave rows [lo, hi) out (a mixed step's padding tokens: `steps.mixed`), their outputs zeros.
    A product over another row count (the lm_head over the step's rows) computes every row."""
    token = _SKIP.set((rows, lo, hi))
    try:
        yield
    finally:
        _SKIP.reset(token)


def product(x: jax.Array, wp: jax.Array) -> jax.Array:
    """`cpu_kernel.gemm_packed` of a packed module, leaving out the rows `skip_rows` names."""
    skip = _SKIP.get()
    rows = x.size // x.shape[-1]
    return cpu_kernel.gemm_packed(x, wp, skip=skip[1:] if skip is not None and skip[0] == rows else None)


class StepParams:
    """The (Structure, leaves) the engine's steps and vision tower take: the model's, seen through a
    view where pack_weights packs the decoder's weights, and where vision_kernel the vision blocks
    attend through `cpu_kernel.block_attention` (the CPU kernels' tiles: the 2B tower over 784
    patches ~1.45x faster at bfloat16, ~1.2x at float32; its sums in another order, so the engine's
    image features differ from `model.generate`'s by rounding: a few bfloat16 steps after 18 blocks,
    ~1e-6 relative at float32)."""

    def __init__(self, model, pack_weights: bool, vision_kernel: bool):
        self.model, self.pack_weights, self.vision_kernel = model, pack_weights, vision_kernel
        self._for = self._split = None

    @property
    def split(self):
        current = self.model.split
        if self._for is not current:
            module = self.model.module  # a new view: what is set here stays out of the model
            if self.pack_weights:
                for node, w in _packable(module):
                    node.packed = PackedWeight(cpu_kernel.pack_weight(w))
                    node.packed_product = product
            if self.vision_kernel and module.model.visual is not None:
                for block in module.model.visual.blocks:
                    block.attn.attend_kernel = cpu_kernel.block_attention
            self._split, self._for = split(*nnx.split(module)), current
        return self._split
