"""Model configuration: frozen dataclasses built from a Hugging Face `config.json`.

`Qwen3VLConfig.from_hf_dict` reads both dialects of the Qwen3-VL config: the released checkpoints'
(`text_config.rope_scaling` + `text_config.rope_theta`) and the one transformers 5 writes
(`text_config.rope_parameters`). Every dense Qwen3-VL size (2B, 4B, 8B, 32B) is described by these
fields alone; the Mixture-of-Experts variants (`qwen3_vl_moe`: 30B-A3B, 235B-A22B) add the expert
fields of `TextConfig` (num_experts, num_experts_per_tok, moe_intermediate_size, decoder_sparse_step,
mlp_only_layers). Other architectures are rejected with a `ConfigError` rather than loaded half-right.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from qvl_jax.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("qwen3_vl", "qwen3_vl_moe")
# How the expert MLPs compute (qvl_jax.modeling.moe): a load setting, not from config.json.
MOE_IMPLS = ("auto", "scan", "ragged", "gather", "dense")


def _get(d: dict, key: str, where: str, default: Any = dataclasses.MISSING) -> Any:
    if key in d and d[key] is not None:
        return d[key]
    if default is dataclasses.MISSING:
        raise ConfigError(f"config.json: {where} is missing required key {key!r}")
    return default


def _name(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _as_int(value: Any, key: str, where: str, minimum: int = 1) -> int:
    """An integer field: ints only (no bools, floats or strings, which int() would coerce silently)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"config.json: {_name(where, key)} must be an integer, got {value!r}")
    if value < minimum:
        what = "positive" if minimum == 1 else f">= {minimum}"
        raise ConfigError(f"config.json: {_name(where, key)} must be {what}, got {value}")
    if value >= 2**31:  # sizes and ids end up in int32 arrays
        raise ConfigError(f"config.json: {_name(where, key)}={value} is out of range (must be < 2**31)")
    return value


def _int(d: dict, key: str, where: str, default: Any = dataclasses.MISSING, minimum: int = 1) -> int:
    return _as_int(_get(d, key, where, default), key, where, minimum)


def _positive_float(value: Any, key: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"config.json: {_name(where, key)} must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"config.json: {_name(where, key)} must be a finite positive number, got {value!r}")
    return float(value)


def _bool(d: dict, key: str, where: str, default: bool) -> bool:
    value = _get(d, key, where, default)
    if not isinstance(value, bool):
        raise ConfigError(f"config.json: {_name(where, key)} must be true or false, got {value!r}")
    return value


def _int_list(value: Any, key: str, where: str, minimum: int = 0) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"config.json: {_name(where, key)} must be a list of integers, got {value!r}")
    return tuple(_as_int(v, f"{key}[{i}]", where, minimum) for i, v in enumerate(value))


def _section(d: dict, key: str, where: str) -> dict:
    """An optional nested object (rope parameters): absent is {}, anything but an object is an error."""
    value = d.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"config.json: {_name(where, key)} must be an object, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5_000_000.0
    mrope_section: tuple[int, int, int] = (24, 20, 20)
    attention_bias: bool = False
    max_position_embeddings: int = 262144
    attention: str = "xla"  # the attention kernel (a load setting, not from config.json): ATTENTION_KERNELS
    # Mixture of experts (qwen3_vl_moe); num_experts == 0 is the dense model.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.0
    moe_impl: str = "auto"  # a load setting: MOE_IMPLS

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_sparse(self, layer: int) -> bool:
        """Whether decoder layer `layer` has the expert MLP (transformers' rule), else the dense one."""
        return (self.num_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    @property
    def idle_expert_params(self) -> int:
        """Parameters a token does not use: the experts its router does not choose, in every sparse
        layer (total minus this is the active parameter count)."""
        sparse = sum(self.is_sparse(i) for i in range(self.num_hidden_layers))
        per_expert = 3 * self.moe_intermediate_size * self.hidden_size
        return sparse * (self.num_experts - self.num_experts_per_tok) * per_expert

    @classmethod
    def from_hf_dict(cls, d: dict, moe: bool = False) -> "TextConfig":
        where = "text_config"
        act = _get(d, "hidden_act", where, "silu")
        if act != "silu":
            raise ConfigError(f"config.json: text_config.hidden_act={act!r} is not supported (only 'silu')")
        # transformers 5 writes rope_parameters (theta inside); released checkpoints have rope_scaling
        # with rope_theta beside it in text_config.
        rope_key = "rope_parameters" if d.get("rope_parameters") is not None else "rope_scaling"
        rope = _section(d, rope_key, where)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise ConfigError(f"config.json: text_config rope_type={rope_type!r} is not supported (only 'default')")
        if rope.get("mrope_interleaved", True) is not True:
            raise ConfigError("config.json: text_config mrope_interleaved=false (Qwen2.5-VL style) is not supported")
        theta = rope.get("rope_theta", d.get("rope_theta", 5_000_000.0))
        hidden = _int(d, "hidden_size", where)
        heads = _int(d, "num_attention_heads", where)
        layers = _int(d, "num_hidden_layers", where)
        experts = _moe_fields(d, layers) if moe else {}
        # An all-sparse MoE model never uses intermediate_size (transformers defaults it).
        all_sparse = experts and all((i + 1) % experts["decoder_sparse_step"] == 0
                                     and i not in experts["mlp_only_layers"] for i in range(layers))
        dense_width = 5632 if all_sparse else dataclasses.MISSING
        cfg = cls(
            vocab_size=_int(d, "vocab_size", where),
            hidden_size=hidden,
            intermediate_size=_int(d, "intermediate_size", where, dense_width),
            num_hidden_layers=_int(d, "num_hidden_layers", where),
            num_attention_heads=heads,
            num_key_value_heads=_int(d, "num_key_value_heads", where, heads),
            head_dim=_int(d, "head_dim", where, hidden // heads),
            rms_norm_eps=_positive_float(_get(d, "rms_norm_eps", where, 1e-6), "rms_norm_eps", where),
            rope_theta=_positive_float(theta, "rope_theta", where),
            mrope_section=_int_list(rope.get("mrope_section", (24, 20, 20)), "mrope_section",
                                    f"{where}.{rope_key}"),  # type: ignore[arg-type]
            attention_bias=_bool(d, "attention_bias", where, False),
            max_position_embeddings=_int(d, "max_position_embeddings", where, 262144),
            **experts,
        )
        cfg._validate()
        return cfg

    def _validate(self) -> None:
        if self.moe_impl not in MOE_IMPLS:
            raise ConfigError(f"moe_impl={self.moe_impl!r}: expected one of {', '.join(MOE_IMPLS)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config.json: text_config.{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config.json: text_config.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"config.json: text_config.head_dim={self.head_dim} must be even for rotary embeddings")
        if len(self.mrope_section) != 3 or sum(self.mrope_section) != self.head_dim // 2:
            raise ConfigError(
                f"config.json: mrope_section={list(self.mrope_section)} must have 3 entries summing to "
                f"head_dim/2={self.head_dim // 2}")


def _moe_fields(d: dict, layers: int) -> dict:
    """The expert fields of a qwen3_vl_moe text_config. transformers writes the expert count as
    num_local_experts (its attribute map), released checkpoints as num_experts; its router always
    renormalises the top-k weights, so a config asking otherwise is refused, not run differently."""
    where = "text_config"
    key = "num_local_experts" if d.get("num_experts") is None and d.get("num_local_experts") is not None \
        else "num_experts"
    experts = _int(d, key, where)
    k = _int(d, "num_experts_per_tok", where)
    if k > experts:
        raise ConfigError(f"config.json: text_config.num_experts_per_tok={k} exceeds {key}={experts}")
    if _get(d, "norm_topk_prob", where, True) is not True:
        raise ConfigError("config.json: text_config.norm_topk_prob must be true for qwen3_vl_moe (its router "
                          "always renormalises the top-k weights)")
    only = _int_list(_get(d, "mlp_only_layers", where, []), "mlp_only_layers", where)
    bad = [i for i in only if i >= layers]
    if bad:
        raise ConfigError(f"config.json: text_config.mlp_only_layers {bad} outside the {layers} decoder layers")
    coef = _get(d, "router_aux_loss_coef", where, 0.001)
    if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not math.isfinite(coef) or coef < 0:
        raise ConfigError(f"config.json: text_config.router_aux_loss_coef must be a number >= 0, got {coef!r}")
    return dict(num_experts=experts, num_experts_per_tok=k,
                moe_intermediate_size=_int(d, "moe_intermediate_size", where),
                decoder_sparse_step=_int(d, "decoder_sparse_step", where, 1),
                mlp_only_layers=tuple(sorted(set(only))), router_aux_loss_coef=float(coef))


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    deepstack_visual_indexes: tuple[int, ...]
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    num_position_embeddings: int = 2304
    rope_theta: float = 10000.0
    attention: str = "xla"  # the attention kernel (a load setting, not from config.json): ATTENTION_KERNELS

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_grid_per_side(self) -> int:
        return math.isqrt(self.num_position_embeddings)

    @property
    def patch_dim(self) -> int:
        """Length of one flattened (C, T, P, P) patch: the width of `pixel_values`."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @classmethod
    def from_hf_dict(cls, d: dict) -> "VisionConfig":
        where = "vision_config"
        act = _get(d, "hidden_act", where, "gelu_pytorch_tanh")
        if act not in ("gelu_pytorch_tanh", "gelu_new"):
            raise ConfigError(f"config.json: vision_config.hidden_act={act!r} is not supported (only tanh GELU)")
        rope = _section(d, "rope_parameters", where)
        cfg = cls(
            depth=_int(d, "depth", where),
            hidden_size=_int(d, "hidden_size", where),
            intermediate_size=_int(d, "intermediate_size", where),
            num_heads=_int(d, "num_heads", where),
            out_hidden_size=_int(d, "out_hidden_size", where),
            deepstack_visual_indexes=_int_list(_get(d, "deepstack_visual_indexes", where),
                                               "deepstack_visual_indexes", where),
            in_channels=_int(d, "in_channels", where, 3),
            patch_size=_int(d, "patch_size", where, 16),
            temporal_patch_size=_int(d, "temporal_patch_size", where, 2),
            spatial_merge_size=_int(d, "spatial_merge_size", where, 2),
            num_position_embeddings=_int(d, "num_position_embeddings", where, 2304),
            rope_theta=_positive_float(rope.get("rope_theta", d.get("rope_theta", 10000.0)), "rope_theta", where),
        )
        cfg._validate()
        return cfg

    def _validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"config.json: vision_config.hidden_size={self.hidden_size} is not a multiple of "
                f"num_heads={self.num_heads}")
        if self.head_dim % 4:
            raise ConfigError(f"config.json: vision head_dim={self.head_dim} must be a multiple of 4 (2-D rotary)")
        if self.num_grid_per_side ** 2 != self.num_position_embeddings:
            raise ConfigError(
                f"config.json: vision_config.num_position_embeddings={self.num_position_embeddings} "
                "is not a perfect square")
        bad = [i for i in self.deepstack_visual_indexes if not 0 <= i < self.depth]
        if bad:
            raise ConfigError(f"config.json: deepstack_visual_indexes {bad} outside the {self.depth} vision blocks")
        if sorted(set(self.deepstack_visual_indexes)) != list(self.deepstack_visual_indexes):
            raise ConfigError(
                f"config.json: deepstack_visual_indexes {list(self.deepstack_visual_indexes)} must be increasing")


@dataclasses.dataclass(frozen=True)
class Qwen3VLConfig:
    text: TextConfig
    vision: VisionConfig
    tie_word_embeddings: bool = False
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    model_type: str = "qwen3_vl"

    @property
    def is_moe(self) -> bool:
        return self.text.is_moe

    @classmethod
    def from_hf_dict(cls, d: dict) -> "Qwen3VLConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"config.json must hold a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"config.json: model_type={model_type!r} is not supported; qvl_jax runs "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} checkpoints")
        text_d = d.get("text_config")
        vision_d = d.get("vision_config")
        for key, value in (("text_config", text_d), ("vision_config", vision_d)):
            if value is None:
                raise ConfigError(f"config.json: missing {key!r} object")
            if not isinstance(value, dict):
                raise ConfigError(f"config.json: {key!r} must be an object, got {type(value).__name__}")
        # The tie flag lives at the top level in both dialects; some exports only have it in text_config.
        tie = _bool(d, "tie_word_embeddings", "", _bool(text_d, "tie_word_embeddings", "text_config", False))
        text = TextConfig.from_hf_dict(text_d, moe=model_type == "qwen3_vl_moe")
        vision = VisionConfig.from_hf_dict(vision_d)
        if vision.out_hidden_size != text.hidden_size:
            raise ConfigError(
                f"config.json: vision_config.out_hidden_size={vision.out_hidden_size} != "
                f"text_config.hidden_size={text.hidden_size}")
        if len(vision.deepstack_visual_indexes) > text.num_hidden_layers:
            raise ConfigError("config.json: more deepstack mergers than decoder layers")
        return cls(
            text=text,
            vision=vision,
            tie_word_embeddings=tie,
            image_token_id=_int(d, "image_token_id", "", 151655, minimum=0),
            video_token_id=_int(d, "video_token_id", "", 151656, minimum=0),
            vision_start_token_id=_int(d, "vision_start_token_id", "", 151652, minimum=0),
            vision_end_token_id=_int(d, "vision_end_token_id", "", 151653, minimum=0),
            model_type=model_type,
        )

    @property
    def attention(self) -> str:
        """The attention kernel the model runs (qvl_jax.modeling.attention)."""
        return self.text.attention

    def with_attention(self, kernel: str) -> "Qwen3VLConfig":
        """The same config with another attention kernel (one of ATTENTION_KERNELS)."""
        kernel = check_attention(kernel)
        return dataclasses.replace(self, text=dataclasses.replace(self.text, attention=kernel),
                                   vision=dataclasses.replace(self.vision, attention=kernel))

    def with_moe_impl(self, impl: str) -> "Qwen3VLConfig":
        """The same config with another expert computation (one of MOE_IMPLS)."""
        if impl not in MOE_IMPLS:
            raise ConfigError(f"moe_impl={impl!r}: expected one of {', '.join(MOE_IMPLS)}")
        return dataclasses.replace(self, text=dataclasses.replace(self.text, moe_impl=impl))

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "Qwen3VLConfig":
        if not os.path.lexists(path):
            raise ConfigError(f"no config.json at {os.fspath(path)}")
        return cls.from_hf_dict(read_json(path))


# The attention kernels a model can run (qvl_jax.modeling.attention says what each does).
ATTENTION_KERNELS = ("xla", "cudnn", "pallas", "dot_product")


def check_attention(kernel) -> str:
    """A checked attention kernel name (ConfigError naming the choices otherwise)."""
    if not isinstance(kernel, str) or kernel.strip().lower() not in ATTENTION_KERNELS:
        raise ConfigError(f"attention={kernel!r}: expected one of {', '.join(ATTENTION_KERNELS)}")
    return kernel.strip().lower()


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file's contents. Unreadable, undecodable and pathologically nested files (json's
    recursion would otherwise escape as a RecursionError) are a one-line ConfigError."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except PermissionError:
        raise ConfigError(f"cannot read {path}: permission denied") from None
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, ints beyond Python's digit limit
        raise ConfigError(f"{path} is not valid JSON: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise ConfigError(f"{path} is nested too deeply to be a config file") from None


def generation_defaults(model_dir: str | os.PathLike) -> dict:
    """eos_token_id (always a list) and pad_token_id from a model directory's generation_config.json;
    {} when there is none. A malformed file is a ConfigError, never skipped: ignoring it would
    silently drop the stop tokens."""
    path = os.path.join(os.fspath(model_dir), "generation_config.json")
    if not os.path.isfile(path):
        return {}
    d = read_json(path)
    if not isinstance(d, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(d).__name__}")
    out = {}
    eos = d.get("eos_token_id")
    if eos is not None:
        ids = eos if isinstance(eos, list) else [eos]
        try:
            out["eos_token_id"] = [_as_int(i, "eos_token_id", "", minimum=0) for i in ids]
        except ConfigError:
            raise ConfigError(f"generation_config.json: eos_token_id must be a token id (an integer >= 0) or a "
                              f"list of them, got {eos!r}") from None
    if d.get("pad_token_id") is not None:
        try:
            out["pad_token_id"] = _as_int(d["pad_token_id"], "pad_token_id", "", minimum=0)
        except ConfigError:
            raise ConfigError(f"generation_config.json: pad_token_id must be a token id (an integer >= 0), "
                              f"got {d['pad_token_id']!r}") from None
    return out
