"""The `Model` facade and `load`: what users hold.

`load(path)` reads a checkpoint into the NNX module's Param state (split once); the inference entry
points pass (graphdef, state) to jitted pure functions that merge inside the trace, so no call walks
the object graph. `model.module` is the merged `nnx.Module` for inspection, LoRA and training.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qvl_jax.checkpoint import load_state, save_hf, save_quantized
from qvl_jax.config import Qwen3VLConfig, generation_defaults
from qvl_jax.engine import generate
from qvl_jax.engine.engine import Engine
from qvl_jax.errors import ConfigError, device_memory_errors
from qvl_jax.hub import resolve_model
from qvl_jax.modeling.inputs import PreparedInputs, bucket_length, prepare_inputs
from qvl_jax.modeling import quant
from qvl_jax.modeling.model import (Qwen3VLForConditionalGeneration, forward_logits, set_attention, set_moe_impl,
                                    split, state_key, vision_tower)
from qvl_jax.sharding import check_mesh, to_host
from qvl_jax.training.lora import lora_modules, merge_lora
from qvl_jax.training.peft import load_adapter_into


class Model:
    """A loaded Qwen3-VL model: `config`, `graphdef` and `params` (the module split by `nnx.split`:
    its static structure and its Param state, whose flattened paths are Hugging Face's keys), and
    the inference entry points.

    The jitted paths take the state flattened once (`split`); assigning `model.params` a new state
    refreshes that, so change weights by assignment (`model.params = new_state`), not by writing
    into the Variables of the current one."""

    def __init__(self, config: Qwen3VLConfig, graphdef: nnx.GraphDef, params: nnx.State,
                 generation_defaults: dict | None = None, mesh: jax.sharding.Mesh | None = None):
        self.config = config
        self.graphdef = graphdef
        self.params = params
        self.generation_defaults = generation_defaults or {}  # from generation_config.json
        self.mesh = mesh  # the params' (and KV caches') mesh; None: one device
        self.path: str | None = None  # the directory loaded from (save_pretrained copies its config files)

    @property
    def params(self) -> nnx.State:
        return self._params

    @params.setter
    def params(self, state: nnx.State) -> None:
        self._params = state
        self.split = split(self.graphdef, state)  # (Structure, leaves) for the jitted functions

    @classmethod
    def from_module(cls, module: Qwen3VLForConditionalGeneration, mesh=None, **kw) -> "Model":
        graphdef, params = nnx.split(module)
        return cls(module.config, graphdef, params, mesh=mesh, **kw)

    @classmethod
    def random(cls, config: Qwen3VLConfig, seed: int = 0, dtype=jnp.float32) -> "Model":
        """A model of this config with random weights (nnx.Rngs(seed))."""
        return cls.from_module(Qwen3VLForConditionalGeneration(config, rngs=nnx.Rngs(seed), dtype=dtype))

    @property
    def module(self) -> Qwen3VLForConditionalGeneration:
        """The merged nnx.Module (a new view of the same arrays on each access)."""
        return nnx.merge(self.graphdef, self.params)

    def set_attention(self, kernel: str) -> None:
        """Switches the attention kernel (one of `qvl_jax.config.ATTENTION_KERNELS`; see
        `qvl_jax.modeling.attention`) for every later call: generate, logits, engines made after."""
        module = self.module
        set_attention(module, kernel)
        self.config = module.config
        self.set_module_state(*nnx.split(module))

    def set_moe_impl(self, impl: str) -> None:
        """Switches how a Mixture-of-Experts model computes its experts (one of
        `qvl_jax.config.MOE_IMPLS`; see `qvl_jax.modeling.moe`) for every later call."""
        module = self.module
        set_moe_impl(module, impl)
        self.config = module.config
        self.set_module_state(*nnx.split(module))

    def set_module_state(self, graphdef: nnx.GraphDef, state: nnx.State) -> None:
        """Replaces the module (e.g. with LoRA adapters added, or trained weights)."""
        self.graphdef = graphdef
        self.params = state

    def save_pretrained(self, directory) -> None:
        """Writes a Hugging Face checkpoint (config, model.safetensors under HF keys, tokenizer and
        processor files) that transformers loads with no missing or unexpected keys. LoRA adapters
        are merged into the saved weights; the model itself keeps them."""
        if self.quantization is not None:
            raise ConfigError(f"this model's weights are quantized ({self.quantization}): a transformers checkpoint "
                              "cannot hold them; save_quantized(directory) writes a qvl_jax one")
        module = self.module
        if lora_modules(module):
            module = nnx.clone(module)  # the model keeps its adapters
            merge_lora(module)
        save_hf(nnx.state(module, nnx.Param), self.path, directory)

    @property
    def quantization(self) -> str | None:
        """"int8" / "int4" where the decoder's weights are quantized (`qvl_jax.modeling.quant`), else None."""
        return quant.state_mode(quant.flat_vars(self.params, state_key))

    def quantize(self, mode: str) -> None:
        """Quantizes the decoder's projection weights in place (`qvl_jax.modeling.quant`): "int8" (one
        scale per output channel) or "int4" (one scale per group of 128 inputs). The vision tower, norms,
        biases and the embedding / lm_head keep their dtype."""
        quant.check_mode(mode)
        if lora_modules(self.module):
            raise ConfigError("quantize the model before adding LoRA adapters, not after")
        quant.quantize_flat(quant.flat_vars(self.params, state_key), mode)
        self.params = self.params  # the Variables changed in place: refresh the jitted functions' leaves

    def save_quantized(self, directory) -> None:
        """Writes this quantized model as a converted qvl_jax directory (int8 / int4 values and their
        scales; config and tokenizer files copied), which `qvl_jax.load` reads without quantizing again."""
        if self.quantization is None:
            raise ConfigError("save_quantized needs a quantized model (qvl_jax.load(path, quantize=...))")
        if lora_modules(self.module):
            raise ConfigError("save_quantized saves base weights only; save LoRA adapters with the Trainer")
        save_quantized(self.params, self.quantization, self.path, directory)

    @property
    def dtype(self):
        """Activation / KV-cache dtype: that of the decoder weights."""
        return self.params["model"]["language_model"]["embed_tokens"]["weight"][...].dtype

    def generate(self, max_new_tokens: int = 64, **kwargs):
        """Generates up to max_new_tokens new tokens for each row of a batch.

        Inputs as for `logits` (any padding side). Sampling: `sampling_params=qvl_jax.SamplingParams(...)`
        or its fields as keywords (temperature (0 = greedy), top_k, top_p, min_p, repetition_penalty,
        frequency_penalty, presence_penalty (each a number or one per row), seed, stop_token_ids
        (default: the checkpoint's eos ids), ignore_eos); with none, decoding is greedy. Also
        pad_token_id, return_logprobs, return_logits. Row r draws as it would alone (see
        `SamplingParams`). speculative_config: prompt-lookup speculative decoding, vLLM's dict form
        ({"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": n}; the same tokens,
        fewer forwards where the answer copies its context; `qvl_jax.engine.speculative`), which adds
        proposed_tokens / accepted_tokens [b] to the output; not with penalties, logprobs, logits or
        structured outputs. Returns a `GenerateOutput`: tokens np.int32 [b, n] (stop token included,
        pad after it), lengths [b], and optionally logprobs [b, n] and raw logits [b, n, vocab]."""
        with device_memory_errors("generate"):
            return generate.generate(self, max_new_tokens, **kwargs)

    def stream(self, max_new_tokens: int = 64, **kwargs):
        """Like `generate`, as an iterator of np.int32 [b] tokens, one step at a time."""

        def guarded():
            with device_memory_errors("stream"):
                yield from generate.stream(self, max_new_tokens, **kwargs)

        return guarded()

    def engine(self, **kw):
        """A continuous-batching `Engine` over this model (paged KV cache, prefix and vision caches):
        `submit` one prompt at a time from any thread, or `generate` a list. Keyword arguments as
        `qvl_jax.engine.engine.Engine` takes them (max_num_seqs, max_model_len, block_size, ...)."""
        return Engine(self, **kw)

    def chat_session(self, max_cache_len: int | None = None):
        """A `ChatSession`: multi-turn generation that reuses the KV cache across turns."""
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

    def _vision(self, vis):
        return vision_tower(*self.split, vis)

    def _logits(self, inp: PreparedInputs) -> np.ndarray:
        b, t = inp.input_ids.shape
        tb = bucket_length(t)
        pad = ((0, 0), (0, tb - t))
        vision = None
        if inp.vision is not None:
            feats, deepstack = self._vision(inp.vision)
            vision = (feats, deepstack, jnp.asarray(np.pad(inp.feat_index, pad, constant_values=-1)))
        out = forward_logits(*self.split, jnp.asarray(np.pad(inp.input_ids, pad)),
                             jnp.asarray(np.pad(inp.positions, ((0, 0), *pad))),
                             jnp.asarray(np.pad(inp.mask, pad) > 0), vision)
        return np.asarray(to_host(out[:, :t]))


def load(path: str | os.PathLike = "tiny-random", dtype=None, mesh=None, verify: bool | None = None, adapter=None,
         merge_adapter: bool = False, attention: str = "xla", quantize: str | None = None,
         moe_impl: str = "auto") -> Model:
    """Loads a model as the CLI's --model names it: a converted qvl_jax directory, a Hugging Face
    checkpoint directory, "tiny-random" (the built-in random model) or a hub id such as
    Qwen/Qwen3-VL-2B-Instruct (downloaded first). A Hugging Face checkpoint is converted once into
    the cache ($QVL_JAX_CACHE, else ~/.cache/qvl_jax; qvl_jax.hub.resolve_model), as stored, and
    read from there memory-mapped, one tensor at a time: beside the params, the host holds about
    one tensor (and the map's file pages, which the kernel can drop), never the whole model
    converted in memory; later loads of the unchanged directory reuse the conversion.

    dtype: cast every param to this dtype on load (default: as stored).
    mesh: a ("data", "model") mesh (qvl_jax.sharding.make_mesh, or jax.make_mesh with those axis
    names): each param is read straight into its NamedSharding (tensor parallel on "model"), KV
    caches are split the same way, and the jitted functions run partitioned by XLA.
    adapter: a PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors) to
    apply; merge_adapter=True folds it into the weights (W + scaling * B A) instead of keeping it
    as a separate branch.
    attention: the attention kernel, one of "xla" (default), "cudnn", "pallas" (the engine's paged
    decode), "dot_product" (qvl_jax.modeling.attention says what each runs).
    moe_impl: how a Mixture-of-Experts model computes its experts: "auto" (default: on the CPU
    "scan", a loop over the tokens sorted by expert that reads each chosen expert's weights in
    place; elsewhere gathered weights for a few tokens, grouped matmuls otherwise), "scan",
    "ragged", "gather" or "dense" (qvl_jax.modeling.moe).
    quantize: "int8" or "int4": weight-only quantization of the decoder's projections with qwix
    (`qvl_jax.modeling.quant`; the vision tower, norms and embedding / lm_head keep `dtype`). A
    checkpoint written by `save_quantized` loads quantized as it was saved, with or without it.
    verify: whether to recompute the sha256 of the converted params file and of every file the
    manifest lists and compare them with the ones recorded at conversion (CheckpointError if one
    differs). None (default): on the first load after a conversion, a copy or any change of the
    files, then not again while they stay as they were (a stamp file in the directory records
    their size, mtime, ctime and inode when they passed); True: on every load; False: never (only
    the params file's size is checked). The header is checked against the config always.
    """
    quant.check_mode(quantize)
    if mesh is not None:
        if quantize is not None:
            raise ConfigError("quantize= with a mesh is not supported yet: load quantized weights on one device")
        mesh = check_mesh(mesh)
    # A converted directory as is; anything else (an HF directory, tiny-random, a hub id) through
    # the convert-once cache, as the CLI's --model does, never converted whole into host memory.
    path = resolve_model(path, log=False)
    config, graphdef, params = load_state(path, dtype, mesh, verify)
    model = Model(config, graphdef, params, generation_defaults(path), mesh)
    model.path = os.fspath(path)
    if attention != model.config.attention:
        model.set_attention(attention)
    if moe_impl != model.config.text.moe_impl:
        model.set_moe_impl(moe_impl)
    stored = model.quantization
    if stored is not None and mesh is not None:
        raise ConfigError(f"{path} holds {stored} weights: a mesh is not supported with them yet")
    if quantize is not None and stored not in (None, quantize):
        raise ConfigError(f"{path} holds {stored} weights; it cannot be loaded as {quantize}")
    if quantize is not None and stored is None:
        model.quantize(quantize)
    if adapter is not None and merge_adapter and model.quantization is not None:
        raise ConfigError("merge_adapter=True cannot fold an adapter into quantized weights; keep it separate")
    if adapter is not None:
        module = model.module
        load_adapter_into(module, adapter)
        if merge_adapter:
            merge_lora(module)
        model.set_module_state(*nnx.split(module))
    return model
