"""Config parsing: both config.json dialects, the real Qwen3-VL sizes, and clear rejections."""

from __future__ import annotations

import copy
import json

import pytest

from qvl_jax import ConfigError, Qwen3VLConfig

# config.json of Qwen/Qwen3-VL-2B-Instruct as released (rope_scaling dialect), written out by hand.
QWEN3_VL_2B = {
    "architectures": ["Qwen3VLForConditionalGeneration"],
    "image_token_id": 151655,
    "model_type": "qwen3_vl",
    "text_config": {
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643, "dtype": "bfloat16",
        "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048,
        "initializer_range": 0.02, "intermediate_size": 6144, "max_position_embeddings": 262144,
        "model_type": "qwen3_vl_text", "num_attention_heads": 16, "num_hidden_layers": 28,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
        "rope_theta": 5000000, "tie_word_embeddings": True, "use_cache": True, "vocab_size": 151936,
    },
    "tie_word_embeddings": True,
    "transformers_version": "4.57.0.dev0",
    "video_token_id": 151656,
    "vision_config": {
        "deepstack_visual_indexes": [5, 11, 17], "depth": 24, "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 1024, "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 4096,
        "model_type": "qwen3_vl", "num_heads": 16, "num_position_embeddings": 2304, "out_hidden_size": 2048,
        "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
    },
    "vision_end_token_id": 151653,
    "vision_start_token_id": 151652,
}

# Qwen/Qwen3-VL-8B-Instruct: untied, 36 layers, larger vision tower with deepstack at [8, 16, 24].
QWEN3_VL_8B = copy.deepcopy(QWEN3_VL_2B)
QWEN3_VL_8B["tie_word_embeddings"] = False
QWEN3_VL_8B["text_config"].update(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                  num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
QWEN3_VL_8B["vision_config"].update(depth=27, hidden_size=1152, intermediate_size=4304,
                                    out_hidden_size=4096, deepstack_visual_indexes=[8, 16, 24])


def _to_rope_parameters(d):
    """The same config in the dialect transformers 5 writes."""
    d = copy.deepcopy(d)
    t = d["text_config"]
    t["rope_parameters"] = dict(t.pop("rope_scaling"), rope_theta=t.pop("rope_theta"))
    d["vision_config"]["rope_parameters"] = {"rope_type": "axial", "rope_theta": 10000.0}
    return d


def test_2b_released_dialect():
    cfg = Qwen3VLConfig.from_hf_dict(QWEN3_VL_2B)
    t, v = cfg.text, cfg.vision
    assert cfg.tie_word_embeddings
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.head_dim) == \
        (2048, 28, 16, 8, 128)
    assert t.rope_theta == 5_000_000.0 and t.mrope_section == (24, 20, 20) and t.num_kv_groups == 2
    assert (v.depth, v.hidden_size, v.head_dim, v.deepstack_visual_indexes) == (24, 1024, 64, (5, 11, 17))
    assert v.num_grid_per_side == 48 and v.patch_dim == 3 * 2 * 16 * 16 and v.rope_theta == 10000.0
    assert cfg.image_token_id == 151655 and cfg.video_token_id == 151656


def test_8b_untied():
    cfg = Qwen3VLConfig.from_hf_dict(QWEN3_VL_8B)
    assert not cfg.tie_word_embeddings
    assert cfg.text.num_hidden_layers == 36 and cfg.text.num_kv_groups == 4
    assert cfg.vision.head_dim == 72 and cfg.vision.deepstack_visual_indexes == (8, 16, 24)


@pytest.mark.parametrize("d", [QWEN3_VL_2B, QWEN3_VL_8B], ids=["2b", "8b"])
def test_both_dialects_agree(d):
    assert Qwen3VLConfig.from_hf_dict(d) == Qwen3VLConfig.from_hf_dict(_to_rope_parameters(d))


def test_tie_flag_only_in_text_config():
    d = copy.deepcopy(QWEN3_VL_2B)
    del d["tie_word_embeddings"]
    assert Qwen3VLConfig.from_hf_dict(d).tie_word_embeddings


def test_transformers_written_config_parses(hf_checkpoint):
    _, path = hf_checkpoint("untied")
    cfg = Qwen3VLConfig.from_json_file(path / "config.json")
    assert cfg.text.mrope_section == (4, 3, 3) and cfg.text.rope_theta == 50000.0
    assert cfg.vision.deepstack_visual_indexes == (1, 3, 4) and not cfg.tie_word_embeddings


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(model_type="qwen3_vl_moe"), "missing required key 'num_experts'"),
    (lambda d: d.update(model_type="llama"), "model_type='llama' is not supported"),
    (lambda d: d.pop("text_config"), "missing 'text_config'"),
    (lambda d: d["text_config"].pop("hidden_size"), "missing required key 'hidden_size'"),
    (lambda d: d["text_config"].update(num_key_value_heads=5), "not a multiple of num_key_value_heads"),
    (lambda d: d["text_config"]["rope_scaling"].update(mrope_section=[24, 20, 10]), "mrope_section"),
    (lambda d: d["text_config"]["rope_scaling"].update(rope_type="yarn"), "rope_type='yarn'"),
    (lambda d: d["text_config"].update(hidden_act="gelu"), "hidden_act"),
    (lambda d: d["vision_config"].update(deepstack_visual_indexes=[5, 30]), "deepstack_visual_indexes"),
    (lambda d: d["vision_config"].update(num_position_embeddings=2300), "perfect square"),
    (lambda d: d["vision_config"].update(out_hidden_size=1024), "out_hidden_size"),
    (lambda d: d["text_config"].update(num_hidden_layers="28"), "must be an integer"),
])
def test_bad_configs_rejected(mutate, message):
    d = copy.deepcopy(QWEN3_VL_2B)
    mutate(d)
    with pytest.raises(ConfigError, match=message) as e:
        Qwen3VLConfig.from_hf_dict(d)
    assert "\n" not in str(e.value)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        Qwen3VLConfig.from_json_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Qwen3VLConfig.from_json_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match="JSON object"):
        Qwen3VLConfig.from_json_file(tmp_path / "config.json")


# ----------------------------------------------------------------------------------------------------
# values of the wrong type or an impossible value: a ConfigError naming the field, never a coercion


def _text(**kw):
    return lambda d: d["text_config"].update(**kw)


def _vision(**kw):
    return lambda d: d["vision_config"].update(**kw)


def _rope(**kw):
    return lambda d: d["text_config"]["rope_scaling"].update(**kw)


@pytest.mark.parametrize("mutate, message", [
    (_text(num_attention_heads=0), r"text_config\.num_attention_heads must be positive, got 0"),
    (_text(num_attention_heads=-16), r"text_config\.num_attention_heads must be positive"),
    (_text(num_key_value_heads=0), r"text_config\.num_key_value_heads must be positive"),
    (_vision(num_heads=0), r"vision_config\.num_heads must be positive"),
    (_vision(depth=0), r"vision_config\.depth must be positive"),
    (_vision(depth=-24), r"vision_config\.depth must be positive"),
    (_text(num_hidden_layers=0), r"text_config\.num_hidden_layers must be positive"),
    (_text(num_hidden_layers=-1), r"text_config\.num_hidden_layers must be positive"),
    (_text(rope_theta=float("nan")), r"text_config\.rope_theta must be a finite positive number"),
    (_text(rope_theta=float("inf")), r"text_config\.rope_theta must be a finite positive number"),
    (_text(rope_theta=-1.0), r"text_config\.rope_theta must be a finite positive number"),
    (_text(rope_theta="5e6"), r"text_config\.rope_theta must be a number"),
    (_vision(rope_theta=float("nan")), r"vision_config\.rope_theta must be a finite positive number"),
    (_text(rms_norm_eps=float("nan")), r"text_config\.rms_norm_eps"),
    (_text(max_position_embeddings=0), r"text_config\.max_position_embeddings must be positive"),
    (_text(max_position_embeddings=-262144), r"text_config\.max_position_embeddings must be positive"),
    (_text(max_position_embeddings=2**40), r"text_config\.max_position_embeddings=\d+ is out of range"),
    (_text(hidden_size=True), r"text_config\.hidden_size must be an integer, got True"),
    (_vision(spatial_merge_size=True), r"vision_config\.spatial_merge_size must be an integer, got True"),
    (_text(intermediate_size=6144.0), r"text_config\.intermediate_size must be an integer, got 6144\.0"),
    (_vision(patch_size=3.7), r"vision_config\.patch_size must be an integer, got 3\.7"),
    (_vision(num_position_embeddings="2304"), r"vision_config\.num_position_embeddings must be an integer"),
    (_vision(deepstack_visual_indexes="12"), r"vision_config\.deepstack_visual_indexes must be a list of integers"),
    (_vision(deepstack_visual_indexes=[5.0, 11, 17]), r"deepstack_visual_indexes\[0\] must be an integer"),
    (_vision(deepstack_visual_indexes=[True, 11]), r"deepstack_visual_indexes\[0\] must be an integer"),
    (_rope(mrope_section="242020"), r"mrope_section must be a list of integers"),
    (_rope(mrope_section=[24.0, 20, 20]), r"mrope_section\[0\] must be an integer"),
    (_text(attention_bias="false"), r"text_config\.attention_bias must be true or false"),
    (lambda d: d.update(tie_word_embeddings=1), r"tie_word_embeddings must be true or false"),
    (lambda d: d.update(image_token_id="151655"), r"image_token_id must be an integer"),
    (lambda d: d.update(video_token_id=-1), r"video_token_id must be >= 0"),
    (lambda d: d.update(text_config=[1, 2]), r"'text_config' must be an object, got list"),
    (lambda d: d.update(vision_config="none"), r"'vision_config' must be an object, got str"),
    (lambda d: d["text_config"].update(rope_scaling="default"), r"text_config\.rope_scaling must be an object"),
    (_vision(rope_parameters=[10000.0]), r"vision_config\.rope_parameters must be an object"),
])
def test_wrong_types_and_impossible_values_rejected(mutate, message):
    d = copy.deepcopy(QWEN3_VL_2B)
    mutate(d)
    with pytest.raises(ConfigError, match=message) as e:
        Qwen3VLConfig.from_hf_dict(d)
    assert "\n" not in str(e.value)


def test_deeply_nested_and_malformed_json_files(tmp_path):
    f = tmp_path / "config.json"
    f.write_text("[" * 100_000 + "]" * 100_000)  # json recurses once per level
    with pytest.raises(ConfigError, match="nested too deeply"):
        Qwen3VLConfig.from_json_file(f)
    f.write_text('{"model_type": "qwen3_vl", "x": ' + "9" * 5000 + "}")  # past Python's int digit limit
    with pytest.raises(ConfigError, match="not valid JSON"):
        Qwen3VLConfig.from_json_file(f)
    f.write_bytes(b'{"model_type": "\xff"}')
    with pytest.raises(ConfigError, match="not valid JSON"):
        Qwen3VLConfig.from_json_file(f)


def test_unreadable_config_says_permission_denied(tmp_path, monkeypatch):
    import builtins

    f = tmp_path / "config.json"
    f.write_text(json.dumps(QWEN3_VL_2B))
    real_open = builtins.open

    def no_access(path, *args, **kwargs):
        if str(path) == str(f):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_access)
    with pytest.raises(ConfigError, match="permission denied"):
        Qwen3VLConfig.from_json_file(f)


# ----------------------------------------------------------------------------------------------------
# generation_config.json


@pytest.mark.parametrize("content, expected", [
    ({"eos_token_id": 151645, "pad_token_id": 151643}, {"eos_token_id": [151645], "pad_token_id": 151643}),
    ({"eos_token_id": [151645, 151643]}, {"eos_token_id": [151645, 151643]}),
    ({"eos_token_id": None, "pad_token_id": None, "temperature": 0.7}, {}),
    ({}, {}),
])
def test_generation_defaults(tmp_path, content, expected):
    from qvl_jax.config import generation_defaults

    (tmp_path / "generation_config.json").write_text(json.dumps(content))
    assert generation_defaults(tmp_path) == expected
    assert generation_defaults(tmp_path / "elsewhere") == {}


@pytest.mark.parametrize("text, message", [
    ('{"eos_token_id": "151645"}', "eos_token_id must be a token id"),
    ('{"eos_token_id": 151645.0}', "eos_token_id must be a token id"),
    ('{"eos_token_id": 3.7}', "eos_token_id must be a token id"),
    ('{"eos_token_id": true}', "eos_token_id must be a token id"),
    ('{"eos_token_id": [151645, [151643]]}', "eos_token_id must be a token id"),
    ('{"eos_token_id": [151645, "x"]}', "eos_token_id must be a token id"),
    ('{"eos_token_id": -1}', "eos_token_id must be a token id"),
    ('{"eos_token_id": 4294967296}', "eos_token_id must be a token id"),
    ('{"eos_token_id": {"id": 1}}', "eos_token_id must be a token id"),
    ('{"pad_token_id": "0"}', "pad_token_id must be a token id"),
    ('{"pad_token_id": false}', "pad_token_id must be a token id"),
    ('[151645]', "must hold a JSON object"),
    ('{"eos_token_id": ', "not valid JSON"),
    ("[" * 100_000, "nested too deeply"),
])
def test_bad_generation_config_is_a_config_error(tmp_path, text, message):
    from qvl_jax.config import generation_defaults

    (tmp_path / "generation_config.json").write_text(text)
    with pytest.raises(ConfigError, match=message) as e:
        generation_defaults(tmp_path)
    assert "\n" not in str(e.value)
