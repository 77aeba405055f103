"""Weight-only quantization (qwix int8 / int4) and QLoRA on the tiny random model.

The quantized format is checked against a numpy rebuild of qwix's symmetric scheme; the quantized
model's outputs against the same model in float32 with the dequantized weights (the only change a
quantized weight may make is its rounding); accuracy against the float32 model with the bounds
explained at `test_logits_error_and_greedy_agreement`."""

from __future__ import annotations

import json

import jax
import numpy as np
import optax
import pytest
import qwix
from flax import nnx

import qvl_jax
from qvl_jax import CheckpointError, ConfigError
from qvl_jax.modeling import quant
from qvl_jax.modeling.model import state_key
from qvl_jax.training import LoraConfig, Trainer

PROMPTS = np.random.default_rng(0).integers(0, 256, size=(8, 12))  # byte tokens of the tiny vocabulary
N_NEW = 8


@pytest.fixture(scope="module")
def models():
    return {mode: qvl_jax.load("tiny-random", quantize=mode) for mode in (None, "int8", "int4")}


def _flat(model) -> dict:
    return {k: v.get_value() for k, v in quant.flat_vars(model.params, state_key).items()}


def _dequantized(model) -> qvl_jax.Model:
    """The same model in float32 with every quantized weight replaced by its dequantized value."""
    graphdef, state = nnx.split(nnx.clone(model.module))
    for var in quant.flat_vars(state, state_key).values():
        var.set_value(quant.dequantize(var.get_value()))
    out = qvl_jax.Model(model.config, graphdef, state)
    out.path = model.path
    return out


def _reference_quantize(w: np.ndarray, qmax: int, group: int | None):
    """qwix's symmetric absmax scheme rebuilt in numpy: scale = absmax / (qmax + 0.5) per output row
    (per `group` inputs of a row); w / scale, to be rounded to the nearest integer."""
    out, inp = w.shape
    g = inp if group is None else group
    blocks = w.reshape(out, inp // g, g).astype(np.float64)
    scale = np.abs(blocks).max(axis=-1) / (qmax + 0.5)
    return (blocks / scale[..., None]).reshape(out, inp), scale


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_format_and_which_weights(models, mode):
    ref, got = _flat(models[None]), _flat(models[mode])
    qkeys = [k for k in got if isinstance(got[k], qwix.QArray)]
    # The decoder's seven projections per layer, nothing else.
    layers = models[None].config.text.num_hidden_layers
    assert len(qkeys) == 7 * layers
    assert all(".language_model.layers." in k and k.endswith("_proj.weight") for k in qkeys)
    for key, value in got.items():
        if key not in qkeys:  # vision tower, norms, embedding: untouched
            np.testing.assert_array_equal(np.asarray(value), np.asarray(ref[key]))
            continue
        w = np.asarray(ref[key])
        group = None if mode == "int8" else quant.group_size(mode, w.shape[1])
        qmax = 127 if mode == "int8" else 7
        ratio, scale = _reference_quantize(w, qmax, group)
        assert str(value.qvalue.dtype) == mode
        got_q = np.asarray(value.qvalue).astype(np.int32)
        # Nearest integer; a row's absmax lands on the +-(qmax + 0.5) boundary by construction, where
        # float32 rounding decides between the two neighbours (the positive side saturates at qmax).
        tie = np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) < 1e-4
        np.testing.assert_array_equal(got_q[~tie], np.clip(np.round(ratio[~tie]), -qmax - 1, qmax))
        assert np.all(np.abs(got_q[tie] - ratio[tie]) <= 0.5 + 1e-4) and got_q.max() <= qmax
        np.testing.assert_allclose(np.asarray(value.scale), scale, rtol=1e-6)
        assert value.scale.shape == (w.shape[0], 1 if group is None else w.shape[1] // group)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_is_the_float_model_on_dequantized_weights(models, mode):
    """The jitted steps run the QArray leaves unchanged: logits (and, int8, static generate and the
    engine) give what the float32 model with the dequantized weights gives."""
    m = models[mode]
    d = _dequantized(m)
    np.testing.assert_allclose(m.logits(PROMPTS), d.logits(PROMPTS), atol=1e-5, rtol=1e-5)
    if mode == "int4":
        return
    got = m.generate(input_ids=PROMPTS, max_new_tokens=N_NEW).tokens
    np.testing.assert_array_equal(got, d.generate(input_ids=PROMPTS, max_new_tokens=N_NEW).tokens)
    engine = m.engine(max_num_seqs=4, max_model_len=64)
    try:
        outs = engine.generate([{"input_ids": p[None]} for p in PROMPTS], max_new_tokens=N_NEW)
    finally:
        engine.close()
    for row, out in zip(got, outs):
        np.testing.assert_array_equal(np.asarray(out.tokens), row[:len(out.tokens)])


def _agreement(m, ref_tokens) -> float:
    """Teacher-forced greedy agreement: the share of the float model's greedy tokens that m also
    ranks first, fed the float model's own continuation."""
    full = np.concatenate([PROMPTS, ref_tokens[:, :-1]], axis=1)
    top = m.logits(full)[:, PROMPTS.shape[1] - 1:].argmax(-1)
    return float((top == ref_tokens).mean())


def _expected_rounding_error(model) -> float:
    """The relative RMS error int8 rounding should give the logits: rounding to a step of
    s = absmax / 127.5 adds uniform noise of RMS s / sqrt(12) to each weight, a relative error
    eps = s / (sqrt(12) * rms(w)) in each matmul's output (per row, averaged); the 28 matmuls'
    independent errors add in quadrature on the way to the logits (residual adds and RMS norms
    pass a relative error through, they do not grow it): sqrt(sum eps^2)."""
    eps = []
    for key, value in _flat(model).items():
        if quant.is_quantized_key(key):
            w = np.asarray(value, np.float64)
            eps.append(np.mean(np.abs(w).max(1) / (127.5 * np.sqrt(12)) / np.sqrt((w * w).mean(1))))
    return float(np.sqrt(np.sum(np.square(eps))))


def test_logits_error_and_greedy_agreement(models):
    """int8: the logits' relative RMS error within what independent per-matmul rounding noise gives
    (`_expected_rounding_error`, about 3% for these weights), and at least 90% teacher-forced greedy
    agreement with float32. int4 (15 levels, groups of <= 128 inputs: about 17x coarser steps) is
    reported, and must be worse than int8."""
    ref = models[None].logits(PROMPTS)
    ref_tokens = models[None].generate(input_ids=PROMPTS, max_new_tokens=N_NEW).tokens
    report = {}
    for mode in ("int8", "int4"):
        diff = models[mode].logits(PROMPTS) - ref
        report[mode] = {"rms_rel": float(np.linalg.norm(diff) / np.linalg.norm(ref)),
                        "max_rel": float(np.abs(diff).max() / np.abs(ref).max()),
                        "greedy_agreement": _agreement(models[mode], ref_tokens)}
    bound = _expected_rounding_error(models[None])
    print(f"quantized vs float32 (int8 rms bound {bound:.4f}):", report)
    assert 0 < report["int8"]["rms_rel"] <= bound
    assert report["int8"]["greedy_agreement"] >= 0.9
    assert report["int4"]["rms_rel"] > report["int8"]["rms_rel"]


def test_saved_quantized_loads_without_quantizing(models, tmp_path, monkeypatch):
    m = models["int8"]
    m.save_quantized(tmp_path / "q8")
    manifest = json.loads((tmp_path / "q8" / "qvl_jax.json").read_text())
    assert manifest["quantization"]["mode"] == "int8"

    def refuse(*a, **k):
        raise AssertionError("quantized again")

    monkeypatch.setattr(quant, "quantize_array", refuse)
    back = qvl_jax.load(tmp_path / "q8", verify=True, quantize="int8")
    assert back.quantization == "int8"
    a, b = _flat(m), _flat(back)
    assert a.keys() == b.keys()
    for k in a:
        jax.tree.map(np.testing.assert_array_equal, a[k], b[k])
    with pytest.raises(ConfigError, match="cannot be loaded as int4"):
        qvl_jax.load(tmp_path / "q8", quantize="int4")
    # bfloat16 on load casts the float params and the scales; the int8 values stay.
    bf = qvl_jax.load(tmp_path / "q8", dtype="bfloat16")
    w = _flat(bf)["model.language_model.layers.0.mlp.up_proj.weight"]
    assert str(w.qvalue.dtype) == "int8" and str(w.scale.dtype) == "bfloat16"
    assert len(bf.generate(input_ids=PROMPTS[:1], max_new_tokens=2).tokens[0]) == 2


def test_bad_requests_are_typed_and_leave_nothing(models, tmp_path):
    with pytest.raises(ConfigError, match="quantize must be one of int8, int4"):
        qvl_jax.load("tiny-random", quantize="int3")
    mesh = jax.make_mesh((1, 1), ("data", "model"))
    with pytest.raises(ConfigError, match="mesh"):
        qvl_jax.load("tiny-random", quantize="int8", mesh=mesh)
    with pytest.raises(ConfigError, match="needs a quantized model"):
        models[None].save_quantized(tmp_path / "f")
    with pytest.raises(ConfigError, match="save_quantized"):
        models["int8"].save_pretrained(tmp_path / "hf")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty"):
        models["int8"].save_quantized(tmp_path / "full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    with pytest.raises(ConfigError, match="trained directly"):
        Trainer(models["int8"], optax.sgd(0.1))


def _batch():
    ids = PROMPTS[:4]
    labels = ids.copy()
    labels[:, :4] = -100
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_qlora_gradients_are_those_over_the_dequantized_weights(models, mode, tmp_path):
    """QLoRA: LoRA over frozen quantized weights through the same Trainer. Its loss and LoRA gradients
    are those of LoRA over the float32 model with the dequantized weights; steps lower the loss; the
    saved adapter applied to a fresh quantized load answers as the trained model."""
    lora = LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"))
    q = qvl_jax.load("tiny-random", quantize=mode)
    d = _dequantized(q)
    tq, td = Trainer(q, optax.adam(1e-2), lora=lora), Trainer(d, optax.adam(1e-2), lora=lora)
    (lq, gq), (ld, gd) = tq.loss_and_grads(_batch()), td.loss_and_grads(_batch())
    assert abs(lq - ld) <= 1e-5 * abs(ld)
    for a, b in zip(jax.tree.leaves(gq), jax.tree.leaves(gd)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    if mode == "int4":
        return
    before = tq.loss(_batch())
    for _ in range(3):
        tq.step(_batch())
    assert tq.loss(_batch()) < before
    assert q.quantization == mode  # the frozen base is still the quantized one
    tq.save_adapter(tmp_path / "adapter")
    back = qvl_jax.load("tiny-random", quantize=mode, adapter=tmp_path / "adapter")
    np.testing.assert_allclose(back.logits(PROMPTS[:2]), q.logits(PROMPTS[:2]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="cannot fold"):
        qvl_jax.load("tiny-random", quantize=mode, adapter=tmp_path / "adapter", merge_adapter=True)


def test_cli_quantize_flag(models, tmp_path, capsys):
    """`--quantize int8` on generate answers as the saved int8 checkpoint does without the flag."""
    from qvl_jax import cli

    models["int8"].save_quantized(tmp_path / "q8")
    answers = []
    for argv in (["--model", "tiny-random", "--quantize", "int8"], ["--model", str(tmp_path / "q8")]):
        rc = cli.main(["generate", *argv, "--prompt", "hello", "--max-new-tokens", "4", "--json"])
        out = capsys.readouterr()
        assert rc == 0, out.err
        answers.append(json.loads(out.out.strip().splitlines()[-1])["tokens"])
    assert answers[0] == answers[1] and len(answers[0]) == 4
    with pytest.raises(SystemExit):
        cli.main(["generate", "--quantize", "int3", "--prompt", "x"])
