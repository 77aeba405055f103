"""`Trainer`: optax steps on the NNX module tree, full or LoRA, exact against transformers + torch.

The module is split once into the trainable Params (all Params, or the LoRA adapters only, less the
vision tower when it is frozen) and the rest. A jitted step takes both, merges them inside the
trace, and differentiates the loss with respect to the trainable part only, so only it gets
gradients and optimizer state. After each step the model the trainer was given sees the new
weights (`model.params` is reassigned), so `model.generate` and `model.save_pretrained` use them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import qwix
from flax import nnx
from jax.sharding import NamedSharding

from qvl_jax.errors import ConfigError, InputError
from qvl_jax.modeling.inputs import bucket_length, prepare_inputs
from qvl_jax.sharding import logical_to_spec
from qvl_jax.training.lora import LoraConfig, LoraParam, apply_lora
from qvl_jax.training.loss import IGNORE, loss_sum_and_count
from qvl_jax.training.peft import load_adapter_into, save_adapter


def _loss_sum(graphdef, trainable, frozen, compute_dtype, remat, ids, positions, valid, labels, vis, feat_index):
    if compute_dtype is not None:  # bf16 compute over float32 master weights: the cast is differentiated
        # Floating leaves only: quantized weights keep their int8 / int4 values (their scales are cast).
        trainable, frozen = jax.tree.map(
            lambda a: a.astype(compute_dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, (trainable, frozen))
    m = nnx.merge(graphdef, trainable, frozen)
    vision = None
    if vis is not None:
        feats, deepstack = m.model.visual(*vis[:-1], packed=vis[-1])
        vision = (feats, deepstack, feat_index)
    return loss_sum_and_count(m(ids, positions, valid, vision, remat=remat), labels)


@functools.partial(jax.jit, static_argnames=("graphdef", "compute_dtype", "packed", "remat"))
def _grads(graphdef, trainable, frozen, ids, positions, valid, labels, vis_arrays, feat_index,
           compute_dtype=None, packed=True, remat=False):
    """(loss sum, token count, gradients of the loss sum) of one micro-batch."""
    vis = None if vis_arrays is None else (*vis_arrays, packed)

    def f(t):
        total, count = _loss_sum(graphdef, t, frozen, compute_dtype, remat, ids, positions, valid, labels, vis,
                                 feat_index)
        return total, count

    (total, count), grads = jax.value_and_grad(f, has_aux=True)(trainable)
    return total, count, grads


@functools.partial(jax.jit, static_argnames=("graphdef", "compute_dtype", "packed"))
def _eval(graphdef, trainable, frozen, ids, positions, valid, labels, vis_arrays, feat_index,
          compute_dtype=None, packed=True):
    vis = None if vis_arrays is None else (*vis_arrays, packed)
    return _loss_sum(graphdef, trainable, frozen, compute_dtype, False, ids, positions, valid, labels, vis, feat_index)


@functools.partial(jax.jit, static_argnames=("tx",))
def _apply(tx, trainable, opt_state, grads, count):
    grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1), grads)  # mean over every counted token
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state


class Trainer:
    """`Trainer(model, optax_tx, lora=LoraConfig(...) | None, adapter=PEFT_DIR | None)`.

    Options: `freeze_vision` (no gradients into the vision tower), `compute_dtype` (e.g. bfloat16
    compute over the model's float32 master weights), `grad_accum` (each batch split into that many
    micro-batches along its rows, gradients summed and divided by the batch's total token count:
    the same step as the whole batch at once, in less memory), `max_grad_norm` (global-norm
    clipping before the optimizer), `remat` (each decoder layer recomputed in the backward pass:
    activation memory of one layer instead of all, for long multimodal sequences), `train_router`
    (a Mixture-of-Experts model's routers `mlp.gate` train too in full fine-tuning; frozen by
    default). Learning-rate schedules go in the optax transformation. The loss is transformers'
    default one: its router load-balancing loss is added only when output_router_logits is set,
    which its configs leave off, so none is added here.

    Under a mesh (`qvl_jax.load(..., mesh=...)`) the params, gradients and optimizer state keep the
    rules' layout (tensor parallel on "model") and each batch is split over "data" along its rows.

    One difference from torch: a weight that a batch does not reach (the vision tower under a
    text-only batch) gets a zero gradient here, so optax still decays it and moves it by its Adam
    momentum, where torch's optimizers skip a parameter whose gradient is None. Freeze the vision
    tower (`freeze_vision=True`) when training on text alone."""

    def __init__(self, model, optimizer: optax.GradientTransformation, lora: LoraConfig | None = None,
                 adapter=None, *, freeze_vision: bool = False, compute_dtype=None, grad_accum: int = 1,
                 max_grad_norm: float | None = None, remat: bool = False, seed: int = 0,
                 train_router: bool = False):
        if lora is not None and adapter is not None:
            raise InputError("give lora= (a new adapter) or adapter= (an existing PEFT adapter), not both")
        if isinstance(grad_accum, bool) or not isinstance(grad_accum, int) or grad_accum < 1:
            raise InputError(f"grad_accum must be a positive integer, got {grad_accum!r}")
        self.model = model
        module = model.module
        if adapter is not None:
            lora = load_adapter_into(module, adapter)
        elif lora is not None:
            apply_lora(module, lora, seed)
        self.lora = lora
        what = LoraParam if lora is not None else nnx.Param
        if freeze_vision:
            what = nnx.All(what, nnx.Not(nnx.PathContains("visual")))
        if model.config.is_moe and not train_router:
            what = nnx.All(what, nnx.Not(nnx.PathContains("gate")))  # the routers (not "gate_proj")
        self.graphdef, self.trainable, self.frozen = nnx.split(module, what, ...)
        if lora is None and any(isinstance(v, qwix.QArray) for v in jax.tree.leaves(
                self.trainable, is_leaf=lambda v: isinstance(v, qwix.QArray))):
            raise ConfigError("quantized weights cannot be trained directly: train LoRA adapters over them "
                              "(QLoRA: lora=LoraConfig(...)), or load the model without quantize=")
        if not jax.tree.leaves(self.trainable):
            raise InputError("nothing to train: every parameter is frozen")
        if max_grad_norm is not None:
            optimizer = optax.chain(optax.clip_by_global_norm(max_grad_norm), optimizer)
        self.tx = optimizer
        self.opt_state = optimizer.init(self.trainable)
        self.grad_accum = grad_accum
        self.compute_dtype = None if compute_dtype is None else jnp.dtype(compute_dtype)
        self.remat = bool(remat)
        self.steps = 0
        self.publish()

    def publish(self) -> None:
        """The model the trainer was given now holds the current weights (adapters included); each
        step does this, and so must anything that replaces `trainable` (a checkpoint restore)."""
        self.model.set_module_state(self.graphdef, nnx.merge_state(self.trainable, self.frozen))

    def _prepare(self, batch: dict, k: int | None = None) -> list[tuple[tuple, dict]]:
        """The checked batch as `grad_accum` micro-batches of (device arguments, static arguments)
        for `_grads` / `_eval`. Rows are split before the host lays out the vision inputs, so each
        micro-batch encodes only its own images and videos."""
        batch = dict(batch)
        if "labels" not in batch:
            raise InputError("the batch needs labels [batch, length] (-100 where no loss is taken)")
        ids = np.asarray(batch["input_ids"])
        b = ids.shape[0] if ids.ndim == 2 else 1
        k = self.grad_accum if k is None else k
        if b % k:
            raise InputError(f"a batch of {b} rows does not split into grad_accum={k} micro-batches")
        parts = [self._micro(m) for m in _split_rows(batch, k, self.model.config)]
        if not any(counted for _, _, counted in parts):
            raise InputError("every label is -100 (after the shift by one): nothing to learn from this batch")
        return [(args, static) for args, static, _ in parts]

    def _micro(self, batch: dict):
        labels = np.asarray(batch.pop("labels"))
        cfg = self.model.config
        inp = prepare_inputs(cfg, **batch)
        b, t = inp.input_ids.shape
        if labels.shape != (b, t) or labels.dtype.kind not in "iu":
            raise InputError(f"labels must be integers of shape {[b, t]} (as input_ids), got "
                             f"{labels.dtype} {list(labels.shape)}")
        bad = (labels != IGNORE) & ((labels < 0) | (labels >= cfg.text.vocab_size))
        if bad.any():
            raise InputError(f"labels must be token ids in [0, {cfg.text.vocab_size}) or -100")
        after_pad = (labels[:, 1:] != IGNORE) & (inp.mask[:, :-1] == 0)
        if after_pad.any():
            r, c = np.argwhere(after_pad)[0]
            raise InputError(f"labels[{r}, {c + 1}] is counted but the token before it is padding: that prediction "
                             "would come from a padding position; set such labels to -100")
        pad = ((0, 0), (0, bucket_length(t) - t))
        args = [self._rows(np.pad(inp.input_ids, pad)), self._rows(np.pad(inp.positions, ((0, 0), *pad)), 1),
                self._rows(np.pad(inp.mask, pad) > 0), self._rows(np.pad(labels, pad, constant_values=IGNORE)),
                None, None]
        static = dict(compute_dtype=self.compute_dtype, packed=True)
        if inp.vision is not None:
            v = inp.vision
            args[4] = tuple(jnp.asarray(a) for a in (v.patches, v.pos_idx, v.pos_w, v.rope_pos, v.frame,
                                                      v.merged_order))
            args[5] = self._rows(np.pad(inp.feat_index, pad, constant_values=-1))
            static["packed"] = v.packed
        return tuple(args), static, bool((labels[:, 1:] != IGNORE).any())

    def _rows(self, a: np.ndarray, axis: int = 0) -> jax.Array:
        """A batch array on the device; under a mesh split over "data" along its rows where that
        divides (data parallel; the params are already laid out by the same rules)."""
        mesh = getattr(self.model, "mesh", None)
        if mesh is None:
            return jnp.asarray(a)
        axes = [None] * a.ndim
        axes[axis] = "batch"
        return jax.device_put(a, NamedSharding(mesh, logical_to_spec(axes, a.shape, mesh)))

    def loss_sum(self, batch: dict) -> tuple[float, int]:
        """(sum of token losses, counted tokens) of a batch at the current weights, no gradients:
        evaluation over several batches divides the summed sums by the summed counts."""
        (args, static), = self._prepare(batch, k=1)  # nothing to accumulate without gradients
        total, count = _eval(self.graphdef, self.trainable, self.frozen, *args, **static)
        return float(total), int(count)

    def loss(self, batch: dict) -> float:
        """The loss of a batch at the current weights (evaluation)."""
        total, count = self.loss_sum(batch)
        return total / max(count, 1)

    def loss_and_grads(self, batch: dict):
        """(loss, gradients) of a batch at the current weights, without a step (for checks)."""
        total, count, grads = self._accumulate(self._prepare(batch))
        return float(total / max(int(count), 1)), jax.tree.map(lambda g: g / max(int(count), 1), grads)

    def _accumulate(self, parts):
        total = count = grads = None
        for args, static in parts:
            t, c, g = _grads(self.graphdef, self.trainable, self.frozen, *args, **static, remat=self.remat)
            total, count = (t, c) if total is None else (total + t, count + c)
            grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
        return total, count, grads

    def step(self, batch: dict) -> float:
        """One optimizer step on a batch (processor output plus `labels`); returns the loss computed
        before the step (transformers' shifted cross-entropy, mean over the counted tokens)."""
        total, count, grads = self._accumulate(self._prepare(batch))
        loss = float(total / jnp.maximum(count, 1))
        self.trainable, self.opt_state = _apply(self.tx, self.trainable, self.opt_state, grads, count)
        self.steps += 1
        self.publish()
        return loss

    def save_adapter(self, directory) -> None:
        """The LoRA adapter in PEFT's format (adapter_config.json, adapter_model.safetensors)."""
        if self.lora is None:
            raise InputError("this trainer trains every weight, not a LoRA adapter: use model.save_pretrained")
        save_adapter(self.model.module, self.lora, directory)


def _split_rows(batch: dict, k: int, cfg) -> list[dict]:
    """A processor batch (plus labels) as k batches of consecutive rows, each with its own images and
    videos: pixel rows and grids go, in order, to the rows whose placeholder tokens they fill."""
    if k == 1:
        return [dict(batch)]
    ids = np.asarray(batch["input_ids"])
    b = ids.shape[0]
    media = {}  # kind -> (pixel rows per row of the batch, grids per row)
    group = cfg.vision.spatial_merge_size ** 2
    for kind, token, pix_key, grid_key in (("image", cfg.image_token_id, "pixel_values", "image_grid_thw"),
                                           ("video", cfg.video_token_id, "pixel_values_videos", "video_grid_thw")):
        if batch.get(grid_key) is None:
            continue
        grids = np.asarray(batch[grid_key])
        if grids.ndim != 2 or grids.shape[-1] != 3:
            _refuse_split(grid_key)
        per_item = grids.prod(-1) // group
        want = (ids == token).sum(1)
        owner = np.searchsorted(np.cumsum(want), np.cumsum(per_item) - 1, side="right")  # row of each item
        if len(owner) and owner.max() >= b or not np.array_equal(np.bincount(owner, per_item, b), want):
            _refuse_split(grid_key)
        media[kind] = (owner, grids.prod(-1), pix_key, grid_key)
    out = []
    for i in range(k):
        rows = range(i * b // k, (i + 1) * b // k)
        part = {key: (np.asarray(v)[rows.start:rows.stop] if key in _ROW_KEYS and v is not None else v)
                for key, v in batch.items()}
        for owner, n_pix, pix_key, grid_key in media.values():
            take = (owner >= rows.start) & (owner < rows.stop)
            starts = np.concatenate([[0], np.cumsum(n_pix)])
            part[grid_key] = np.asarray(batch[grid_key])[take] if take.any() else None
            part[pix_key] = (np.concatenate([np.asarray(batch[pix_key])[starts[j]:starts[j + 1]]
                                             for j in np.flatnonzero(take)]) if take.any() else None)
        out.append(part)
    return out


_ROW_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "labels")


def _refuse_split(grid_key: str) -> None:
    raise InputError(f"{grid_key} does not match the placeholder tokens of input_ids, so the batch cannot be "
                     "split into micro-batches")
