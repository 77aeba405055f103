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
from flax import nnx

from qvl_jax.errors import InputError
from qvl_jax.modeling.inputs import bucket_length, prepare_inputs
from qvl_jax.training.lora import LoraConfig, LoraParam, apply_lora
from qvl_jax.training.loss import IGNORE, loss_sum_and_count


def _loss_sum(graphdef, trainable, frozen, compute_dtype, remat, ids, positions, valid, labels, vis, feat_index):
    if compute_dtype is not None:  # bf16 compute over float32 master weights: the cast is differentiated
        trainable, frozen = jax.tree.map(lambda a: a.astype(compute_dtype), (trainable, frozen))
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
    activation memory of one layer instead of all, for long multimodal sequences). Learning-rate
    schedules go in the optax transformation.

    Under a mesh (`qvl_jax.load(..., mesh=...)`) the params, gradients and optimizer state keep the
    rules' layout (tensor parallel on "model") and each batch is split over "data" along its rows.

    One difference from torch: a weight that a batch does not reach (the vision tower under a
    text-only batch) gets a zero gradient here, so optax still decays it and moves it by its Adam
    momentum, where torch's optimizers skip a parameter whose gradient is None. Freeze the vision
    tower (`freeze_vision=True`) when training on text alone."""

    def __init__(self, model, optimizer: optax.GradientTransformation, lora: LoraConfig | None = None,
                 adapter=None, *, freeze_vision: bool = False, compute_dtype=None, grad_accum: int = 1,
                 max_grad_norm: float | None = None, remat: bool = False, seed: int = 0):
        if lora is not None and adapter is not None:
            raise InputError("give lora= (a new adapter) or adapter= (an existing PEFT adapter), not both")
        if isinstance(grad_accum, bool) or not isinstance(grad_accum, int) or grad_accum < 1:
            raise InputError(f"grad_accum must be a positive integer, got {grad_accum!r}")
        self.model = model
        module = model.module
        if adapter is not None:
            from qvl_jax.training.peft import load_adapter_into

            lora = load_adapter_into(module, adapter)
        elif lora is not None:
            apply_lora(module, lora, seed)
        self.lora = lora
        what = LoraParam if lora is not None else nnx.Param
        if freeze_vision:
            what = nnx.All(what, nnx.Not(nnx.PathContains("visual")))
        self.graphdef, self.trainable, self.frozen = nnx.split(module, what, ...)
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

    def _prepare(self, batch: dict):
        batch = dict(batch)
        if "labels" not in batch:
            raise InputError("the batch needs labels [batch, length] (-100 where no loss is taken)")
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
        if not (labels[:, 1:] != IGNORE).any():
            raise InputError("every label is -100 (after the shift by one): nothing to learn from this batch")
        if b % self.grad_accum:
            raise InputError(f"a batch of {b} rows does not split into grad_accum={self.grad_accum} micro-batches")
        tb = bucket_length(t)
        pad = ((0, 0), (0, tb - t))
        arrays = dict(ids=np.pad(inp.input_ids, pad), positions=np.pad(inp.positions, ((0, 0), *pad)),
                      valid=np.pad(inp.mask, pad) > 0, labels=np.pad(labels, pad, constant_values=IGNORE))
        vis = None
        if inp.vision is not None:
            v = inp.vision
            vis = (v.patches, v.pos_idx, v.pos_w, v.rope_pos, v.frame, v.merged_order), v.packed
            arrays["feat_index"] = np.pad(inp.feat_index, pad, constant_values=-1)
        return arrays, vis

    def loss(self, batch: dict) -> float:
        """The loss of a batch at the current weights, without gradients (evaluation)."""
        arrays, vis = self._prepare(batch)
        total, count = _eval(self.graphdef, self.trainable, self.frozen, jnp.asarray(arrays["ids"]),
                             jnp.asarray(arrays["positions"]), jnp.asarray(arrays["valid"]),
                             jnp.asarray(arrays["labels"]),
                             None if vis is None else tuple(jnp.asarray(a) for a in vis[0]),
                             None if vis is None else jnp.asarray(arrays["feat_index"]),
                             compute_dtype=self.compute_dtype, packed=True if vis is None else vis[1])
        return float(total / jnp.maximum(count, 1))

    def loss_and_grads(self, batch: dict):
        """(loss, gradients) of a batch at the current weights, without a step (for checks)."""
        total, count, grads = self._accumulate(*self._prepare(batch))
        return float(total / max(int(count), 1)), jax.tree.map(lambda g: g / max(int(count), 1), grads)

    def _rows(self, a: np.ndarray, axis: int = 0) -> jax.Array:
        """A batch array on the device; under a mesh split over "data" along its rows where that
        divides (data parallel; the params are already laid out by the same rules)."""
        mesh = getattr(self.model, "mesh", None)
        if mesh is None:
            return jnp.asarray(a)
        from jax.sharding import NamedSharding

        from qvl_jax.sharding import logical_to_spec

        axes = [None] * a.ndim
        axes[axis] = "batch"
        return jax.device_put(a, NamedSharding(mesh, logical_to_spec(axes, a.shape, mesh)))

    def _accumulate(self, arrays, vis):
        b = arrays["ids"].shape[0]
        k = self.grad_accum
        total = count = grads = None
        for i in range(k):
            rows = slice(i * b // k, (i + 1) * b // k)
            # Every micro-batch runs the whole vision call: feature rows are indexed per token.
            t, c, g = _grads(self.graphdef, self.trainable, self.frozen, self._rows(arrays["ids"][rows]),
                             self._rows(arrays["positions"][:, rows], 1), self._rows(arrays["valid"][rows]),
                             self._rows(arrays["labels"][rows]),
                             None if vis is None else tuple(jnp.asarray(a) for a in vis[0]),
                             None if vis is None else self._rows(arrays["feat_index"][rows]),
                             compute_dtype=self.compute_dtype, packed=True if vis is None else vis[1],
                             remat=self.remat)
            total, count = (t, c) if total is None else (total + t, count + c)
            grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
        return total, count, grads

    def step(self, batch: dict) -> float:
        """One optimizer step on a batch (processor output plus `labels`); returns the loss computed
        before the step (transformers' shifted cross-entropy, mean over the counted tokens)."""
        total, count, grads = self._accumulate(*self._prepare(batch))
        loss = float(total / jnp.maximum(count, 1))
        self.trainable, self.opt_state = _apply(self.tx, self.trainable, self.opt_state, grads, count)
        self.steps += 1
        self.publish()
        return loss

    def save_adapter(self, directory) -> None:
        """The LoRA adapter in PEFT's format (adapter_config.json, adapter_model.safetensors)."""
        from qvl_jax.training.peft import save_adapter

        if self.lora is None:
            raise InputError("this trainer trains every weight, not a LoRA adapter: use model.save_pretrained")
        save_adapter(self.model.module, self.lora, directory)
