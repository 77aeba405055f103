"""Training against PyTorch: the loss and every gradient equal transformers', optax AdamW steps equal
torch AdamW steps, LoRA steps equal PEFT's, adapters and checkpoints move both ways."""

from __future__ import annotations

import copy

import jax
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from mm_inputs import PromptBuilder, batch_inputs, patch_dim
from parity import rel_err
import qvl_jax
from qvl_jax import CheckpointError, ConfigError, InputError
from qvl_jax.modeling.model import state_key
from qvl_jax.training import LoraConfig, Trainer

LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4


def _batch(hf, kind: str, seed: int = 0) -> dict:
    rng = np.random.RandomState(seed)
    rows = {
        "text": lambda: [PromptBuilder(rng).text(14)],
        "image": lambda: [PromptBuilder(rng).text(4).image(4, 6).text(6)],
        "video": lambda: [PromptBuilder(rng).text(3).video(2, 4, 4).text(5)],
        "padded": lambda: [PromptBuilder(rng).text(3).image(4, 4).text(8), PromptBuilder(rng).text(6)],
    }[kind]()
    inp = batch_inputs(rows, patch_dim(hf.config), rng)
    labels = np.where(inp["attention_mask"] > 0, inp["input_ids"], -100)
    labels[:, :3] = -100  # a "prompt" part that is not trained
    labels[:, 1:][inp["attention_mask"][:, :-1] == 0] = -100  # never predicted from a padding position
    return dict(inp, labels=labels)


def _torch_inputs(batch: dict) -> dict:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


def _fresh(jax_model, name):
    """A model of its own (the trainer changes the model it is given)."""
    m = jax_model(name)
    return qvl_jax.Model(m.config, m.graphdef, jax.tree.map(lambda a: a, m.params), m.generation_defaults)


def _grads_by_key(grads) -> dict:
    return {state_key(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)}


@pytest.mark.parametrize("kind", ["text", "image", "video", "padded"])
def test_loss_and_every_gradient_equal_torch(kind, hf_checkpoint, jax_model):
    hf, _ = hf_checkpoint("untied")
    batch = _batch(hf, kind)
    ref = copy.deepcopy(hf)
    out = ref(**_torch_inputs(batch))
    out.loss.backward()
    trainer = Trainer(_fresh(jax_model, "untied"), optax.sgd(0.0))
    loss, grads = trainer.loss_and_grads(batch)
    assert abs(loss - out.loss.item()) <= LOSS_RTOL * abs(out.loss.item())
    ours = _grads_by_key(grads)
    theirs = {k: p.grad.numpy() if p.grad is not None else np.zeros(p.shape, np.float32)
              for k, p in ref.named_parameters()}  # torch leaves an unused tower's grads unset: zero
    assert set(ours) == set(theirs)
    for key, g in theirs.items():
        if not np.abs(g).max():  # a weight the batch does not reach: exactly zero on both sides
            assert not np.abs(ours[key]).max(), key
            continue
        assert rel_err(ours[key], g) <= GRAD_RTOL, key


def test_tied_embedding_gradient_sums_both_uses(hf_checkpoint, jax_model):
    hf, _ = hf_checkpoint("tied")
    batch = _batch(hf, "image", seed=3)
    ref = copy.deepcopy(hf)
    ref(**_torch_inputs(batch)).loss.backward()
    _, grads = Trainer(_fresh(jax_model, "tied"), optax.sgd(0.0)).loss_and_grads(batch)
    key = "model.language_model.embed_tokens.weight"
    assert rel_err(_grads_by_key(grads)[key], dict(ref.named_parameters())[key].grad.numpy()) <= GRAD_RTOL


# Adam's first steps move each weight by about lr * g / (|g| + eps): with eps = 1e-8 that is
# lr * sign(g) for every gradient entry above 1e-8, so an entry whose gradient is float32 rounding
# noise on both sides (|g| ~ 1e-7 of the largest) moves by +-lr at random, and the comparison would
# measure that noise (seen: after one step with eps = 1e-8 the largest difference, 2.4e-4 of the
# weight's scale, sat on an entry whose gradient was 1.9e-8, 6e-7 of the largest; every gradient
# matches torch's to 1e-4 above). eps = 1e-5, the same on both sides, keeps the step smooth in g.
EPS = 1e-5


def test_three_adamw_steps_equal_torch(hf_checkpoint, jax_model):
    hf, _ = hf_checkpoint("untied")
    # Every batch reaches every weight: torch's AdamW skips a parameter whose gradient is None (the
    # vision tower under a text-only batch) where optax decays it with a zero gradient (docs).
    batches = [_batch(hf, k, seed=i) for i, k in enumerate(["image", "video", "padded"])]
    ref = copy.deepcopy(hf)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=EPS, weight_decay=0.01)
    model = _fresh(jax_model, "untied")
    trainer = Trainer(model, optax.adamw(1e-3, b1=0.9, b2=0.999, eps=EPS, weight_decay=0.01))
    for batch in batches:
        opt.zero_grad()
        out = ref(**_torch_inputs(batch))
        out.loss.backward()
        opt.step()
        loss = trainer.step(batch)
        assert abs(loss - out.loss.item()) <= LOSS_RTOL * abs(out.loss.item())
    ours = {state_key(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(model.params)}
    for key, p in ref.named_parameters():
        assert rel_err(ours[key], p.detach().numpy()) <= 1e-4, key
    # the model the trainer was given generates from the trained weights
    ids = _batch(hf, "text", seed=5)["input_ids"]
    with torch.no_grad():
        ref_logits = ref(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert rel_err(model.logits(ids), ref_logits) <= 1e-4


def test_gradient_accumulation_is_the_same_step(hf_checkpoint, jax_model):
    hf, _ = hf_checkpoint("tied")
    rng = np.random.RandomState(5)
    rows = [PromptBuilder(rng).text(5 + 3 * i) for i in range(4)]
    inp = batch_inputs(rows, patch_dim(hf.config), rng)
    labels = np.where(inp["attention_mask"] > 0, inp["input_ids"], -100)
    labels[:, 1:][inp["attention_mask"][:, :-1] == 0] = -100
    batch = dict(inp, labels=labels)
    whole = Trainer(_fresh(jax_model, "tied"), optax.sgd(0.0)).loss_and_grads(batch)
    split = Trainer(_fresh(jax_model, "tied"), optax.sgd(0.0), grad_accum=2).loss_and_grads(batch)
    assert abs(whole[0] - split[0]) <= 1e-6 * abs(whole[0])
    a, b = _grads_by_key(whole[1]), _grads_by_key(split[1])
    for key in a:
        if not np.abs(a[key]).max():  # the vision tower under a text batch
            assert not np.abs(b[key]).max(), key
            continue
        assert rel_err(b[key], a[key]) <= 1e-5, key


def test_frozen_vision_gets_no_gradients(hf_checkpoint, jax_model):
    hf, _ = hf_checkpoint("untied")
    trainer = Trainer(_fresh(jax_model, "untied"), optax.adam(0.1), freeze_vision=True)
    _, grads = trainer.loss_and_grads(_batch(hf, "image"))
    keys = set(_grads_by_key(grads))
    assert keys and not any(k.startswith("model.visual.") for k in keys)
    assert not any(k.startswith("model.visual.") for k in _grads_by_key(trainer.opt_state[0].mu))


# --- LoRA against PEFT ---

LORA_TARGETS = ["q_proj", "v_proj", "down_proj", "qkv", "linear_fc1"]


def _peft_adapter(hf, tmp_path, use_rslora=False):
    """A PEFT adapter made by PEFT itself, with B non-zero (init_lora_weights=False)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(copy.deepcopy(hf), PeftLoraConfig(
        r=4, lora_alpha=8, target_modules=LORA_TARGETS, lora_dropout=0.0, init_lora_weights=False,
        use_rslora=use_rslora))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    return peft_model, tmp_path / "adapter"


def test_lora_steps_equal_peft(hf_checkpoint, jax_model, tmp_path):
    hf, _ = hf_checkpoint("untied")
    peft_model, adapter = _peft_adapter(hf, tmp_path)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2, eps=EPS,
                            weight_decay=0.0)
    model = _fresh(jax_model, "untied")
    trainer = Trainer(model, optax.adamw(1e-2, eps=EPS, weight_decay=0.0), adapter=adapter)
    assert all(type(v).__name__ == "LoraParam" for _, v in nnx.to_flat_state(trainer.trainable))
    for i, kind in enumerate(["image", "video", "padded"]):  # each reaches every adapter (see EPS)
        batch = _batch(hf, kind, seed=i)
        opt.zero_grad()
        out = peft_model(**_torch_inputs(batch))
        out.loss.backward()
        opt.step()
        loss = trainer.step(batch)
        assert abs(loss - out.loss.item()) <= LOSS_RTOL * abs(out.loss.item()), i
    # the saved adapter loads in PEFT with equal logits
    trainer.save_adapter(tmp_path / "ours")
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "ours")).eval()
    ids = _batch(hf, "text", seed=9)["input_ids"]
    with torch.no_grad():
        want = peft_model.eval()(input_ids=torch.from_numpy(ids)).logits.numpy()
        got = reloaded(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert rel_err(got, want) <= 1e-4
    assert rel_err(model.logits(ids), want) <= 1e-4


@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("rslora", [False, True])
def test_load_applies_a_peft_adapter(merge, rslora, hf_checkpoint, converted, tmp_path):
    hf, _ = hf_checkpoint("untied")
    peft_model, adapter = _peft_adapter(hf, tmp_path, use_rslora=rslora)
    batch = _batch(hf, "image", seed=4)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        want = peft_model.eval()(**_torch_inputs(inputs)).logits.numpy()
    model = qvl_jax.load(converted("untied"), adapter=adapter, merge_adapter=merge)
    assert rel_err(model.logits(**inputs), want, inputs["attention_mask"][..., None].astype(bool)
                   .repeat(want.shape[-1], -1)) <= 1e-4


def test_save_pretrained_round_trips_through_transformers(hf_checkpoint, jax_model, converted, tmp_path):
    from transformers import Qwen3VLForConditionalGeneration

    hf, _ = hf_checkpoint("untied")
    model = qvl_jax.load(converted("untied"))
    trainer = Trainer(model, optax.sgd(1e-2), lora=LoraConfig(r=2, alpha=4, target_modules=["q_proj", "up_proj"]))
    trainer.step(_batch(hf, "text"))
    trainer.step(_batch(hf, "image"))  # B is non-zero now
    model.save_pretrained(tmp_path / "hf")
    loaded, info = Qwen3VLForConditionalGeneration.from_pretrained(str(tmp_path / "hf"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = _batch(hf, "text", seed=7)["input_ids"]
    with torch.no_grad():
        theirs = loaded.eval()(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert rel_err(model.logits(ids), theirs) <= 1e-4


def test_save_pretrained_refuses_a_nonempty_directory(jax_model, converted, tmp_path):
    model = qvl_jax.load(converted("tied"))
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty"):
        model.save_pretrained(tmp_path / "x")
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


# --- Bad adapters and batches: one-line typed errors ---

def _one_line(exc, match, fn):
    with pytest.raises(exc, match=match) as e:
        fn()
    assert "\n" not in str(e.value)


def test_adapter_errors(hf_checkpoint, converted, tmp_path):
    import json

    from safetensors.numpy import load_file, save_file

    hf, _ = hf_checkpoint("untied")
    _, adapter = _peft_adapter(hf, tmp_path)
    path = converted("untied")
    # shapes of another base model
    bad = tmp_path / "bad_shape"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    t = load_file(str(adapter / "adapter_model.safetensors"))
    t = {k: (np.zeros((v.shape[0], v.shape[1] + 1), v.dtype) if "lora_A" in k else v) for k, v in t.items()}
    save_file(t, str(bad / "adapter_model.safetensors"))
    _one_line(CheckpointError, "other base shapes", lambda: qvl_jax.load(path, adapter=bad))
    # a target module this model does not have
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (unknown / "adapter_config.json").write_text(json.dumps(dict(cfg, target_modules=["c_attn"])))
    (unknown / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    _one_line(CheckpointError, "which this model does not have", lambda: qvl_jax.load(path, adapter=unknown))
    _one_line(ConfigError, "match no Linear module", lambda: Trainer(
        qvl_jax.load(path), optax.sgd(0.1), lora=LoraConfig(target_modules=["c_attn"])))
    # an adapter for another model type (Qwen2-style paths)
    other = tmp_path / "other"
    other.mkdir()
    (other / "adapter_config.json").write_text(json.dumps(dict(cfg, target_modules=["q_proj"])))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((4, 64), np.float32),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.zeros((64, 4), np.float32)},
              str(other / "adapter_model.safetensors"))
    _one_line(CheckpointError, "another model type", lambda: qvl_jax.load(path, adapter=other))
    prefix = tmp_path / "prefix"
    prefix.mkdir()
    (prefix / "adapter_config.json").write_text(json.dumps(dict(cfg, peft_type="PREFIX_TUNING")))
    (prefix / "adapter_model.safetensors").write_bytes(b"")
    _one_line(ConfigError, "not supported", lambda: qvl_jax.load(path, adapter=prefix))


def test_bad_batches(hf_checkpoint, jax_model):
    hf, _ = hf_checkpoint("tied")
    trainer = Trainer(_fresh(jax_model, "tied"), optax.sgd(0.1))
    batch = _batch(hf, "text")
    _one_line(InputError, "needs labels", lambda: trainer.step({k: v for k, v in batch.items() if k != "labels"}))
    _one_line(InputError, "every label is -100", lambda: trainer.step(dict(batch, labels=np.full_like(batch["labels"], -100))))
    _one_line(InputError, "token ids", lambda: trainer.step(dict(batch, labels=batch["labels"] + 10_000)))
    _one_line(InputError, "shape", lambda: trainer.step(dict(batch, labels=batch["labels"][:, :-1])))
    padded = _batch(hf, "padded")
    _one_line(InputError, "the token before it is padding", lambda: trainer.step(
        dict(padded, labels=np.where(padded["attention_mask"] > 0, padded["input_ids"], -100))))
    assert trainer.steps == 0


def test_remat_same_gradients_less_activation_memory(hf_checkpoint, jax_model):
    """Recomputing each layer in the backward pass changes no number, and keeps far fewer
    activations for the backward pass: the residuals of the forward pass (what jax.vjp holds between
    the two passes; at this size 8.9 MB against 132 MB). XLA's memory analysis of the compiled step
    (temp_size_in_bytes) was measured here before: it is set by the backward pass's working set,
    not by the saved activations, and put the two within 1.5% of each other either way round as
    the attention's layout changed, so it cannot tell them apart at this size."""
    from qvl_jax.training import trainer as trainer_mod

    hf, _ = hf_checkpoint("untied")
    rng = np.random.RandomState(2)
    rows = [PromptBuilder(rng).text(200).image(4, 6).text(50)]
    inp = batch_inputs(rows, patch_dim(hf.config), rng)
    batch = dict(inp, labels=inp["input_ids"].copy())
    plain = Trainer(_fresh(jax_model, "untied"), optax.sgd(0.0))
    remat = Trainer(_fresh(jax_model, "untied"), optax.sgd(0.0), remat=True)
    (l1, g1), (l2, g2) = plain.loss_and_grads(batch), remat.loss_and_grads(batch)
    assert abs(l1 - l2) <= 1e-6 * abs(l1)
    a, b = _grads_by_key(g1), _grads_by_key(g2)
    for key in a:  # recomputation fuses differently: equal to float32 rounding, by the suite's measure
        assert not np.abs(a[key]).max() or rel_err(b[key], a[key]) <= 1e-5, key

    def residual_bytes(t):
        (args, static), = t._prepare(batch)
        ids, positions, valid, labels, vis_arrays, feat_index = args
        vis = None if vis_arrays is None else (*vis_arrays, static["packed"])

        def f(tr):
            return trainer_mod._loss_sum(t.graphdef, tr, t.frozen, static.get("compute_dtype"), t.remat, ids,
                                         positions, valid, labels, vis, feat_index)[0]
        _, pullback = jax.jit(lambda tr: jax.vjp(f, tr))(t.trainable)
        return sum(x.nbytes for x in jax.tree.leaves(pullback))

    assert residual_bytes(remat) * 4 < residual_bytes(plain)


def test_eval_loss_is_the_step_loss(hf_checkpoint, jax_model):
    hf, _ = hf_checkpoint("tied")
    batch = _batch(hf, "image", seed=8)
    trainer = Trainer(_fresh(jax_model, "tied"), optax.sgd(0.1))
    before = trainer.loss(batch)
    assert abs(before - trainer.step(batch)) <= 1e-6 * abs(before)
    assert trainer.loss(batch) < before  # the step moved downhill


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs the 8 fake CPU devices conftest sets up")
@pytest.mark.parametrize("dp,tp", [(2, 4), (8, 1)])
def test_training_under_a_mesh_equals_one_device(dp, tp, hf_checkpoint, converted):
    """Data and tensor parallel through the sharding rules: the same losses and weights as one device,
    with every weight still laid out as the rules place it."""
    from jax.sharding import NamedSharding

    from qvl_jax.sharding import make_mesh, variable_spec

    hf, _ = hf_checkpoint("untied")
    rng = np.random.RandomState(11)
    rows = [PromptBuilder(rng).text(4 + i).image(4, 4).text(3) for i in range(8)]
    inp = batch_inputs(rows, patch_dim(hf.config), rng)
    labels = np.where(inp["attention_mask"] > 0, inp["input_ids"], -100)
    labels[:, 1:][inp["attention_mask"][:, :-1] == 0] = -100
    batch = dict(inp, labels=labels)
    tx = optax.adamw(1e-3, eps=EPS)
    one = qvl_jax.load(converted("untied"))
    many = qvl_jax.load(converted("untied"), mesh=make_mesh(dp=dp, tp=tp))
    t1, t2 = Trainer(one, tx), Trainer(many, tx)
    for _ in range(2):
        l1, l2 = t1.step(batch), t2.step(batch)
        assert abs(l1 - l2) <= 1e-5 * abs(l1)
    a = {state_key(p): v for p, v in nnx.to_flat_state(one.params)}
    for path, var in nnx.to_flat_state(many.params):
        key = state_key(path)
        arr = var[...]
        assert arr.sharding.is_equivalent_to(NamedSharding(many.mesh, variable_spec(var, many.mesh)), arr.ndim), key
        assert rel_err(np.asarray(var[...]), np.asarray(a[key][...])) <= 1e-4, key


def test_remat_with_lora_equals_without(hf_checkpoint, jax_model):
    hf, _ = hf_checkpoint("tied")
    batch = _batch(hf, "image", seed=12)
    lora = LoraConfig(r=2, alpha=4, target_modules=["q_proj", "down_proj", "qkv"])
    plain = Trainer(_fresh(jax_model, "tied"), optax.sgd(0.0), lora=lora)
    remat = Trainer(_fresh(jax_model, "tied"), optax.sgd(0.0), lora=lora, remat=True)
    (l1, g1), (l2, g2) = plain.loss_and_grads(batch), remat.loss_and_grads(batch)
    assert abs(l1 - l2) <= 1e-6 * abs(l1)
    a, b = _grads_by_key(g1), _grads_by_key(g2)
    assert set(a) == set(b) and all(".lora_" in k for k in a)
    for key in a:
        assert not np.abs(a[key]).max() or rel_err(b[key], a[key]) <= 1e-5, key


def test_bfloat16_compute_keeps_float32_master_weights(hf_checkpoint, jax_model):
    import jax.numpy as jnp

    hf, _ = hf_checkpoint("tied")
    batch = _batch(hf, "image", seed=13)
    exact = Trainer(_fresh(jax_model, "tied"), optax.sgd(0.0)).loss(batch)
    model = _fresh(jax_model, "tied")
    trainer = Trainer(model, optax.adam(1e-3), compute_dtype="bfloat16")
    loss = trainer.step(batch)
    assert loss != exact and abs(loss - exact) <= 0.02 * exact  # bf16 rounding, not another model
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(model.params))
    _, grads = trainer.loss_and_grads(batch)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


def test_gradient_accumulation_with_images_splits_the_media(hf_checkpoint, jax_model, monkeypatch):
    """Each micro-batch encodes only its own rows' images and videos, and the step is the whole
    batch's."""
    from qvl_jax.training import trainer as trainer_mod

    hf, _ = hf_checkpoint("untied")
    rng = np.random.RandomState(14)
    rows = [PromptBuilder(rng).text(3).image(4, 4).text(2), PromptBuilder(rng).text(6),
            PromptBuilder(rng).text(2).video(2, 4, 4).text(1), PromptBuilder(rng).image(2, 6).text(2).image(4, 4)]
    inp = batch_inputs(rows, patch_dim(hf.config), rng)
    labels = np.where(inp["attention_mask"] > 0, inp["input_ids"], -100)
    labels[:, 1:][inp["attention_mask"][:, :-1] == 0] = -100
    batch = dict(inp, labels=labels)
    whole = Trainer(_fresh(jax_model, "untied"), optax.sgd(0.0)).loss_and_grads(batch)
    seen = []
    real = trainer_mod.prepare_inputs
    monkeypatch.setattr(trainer_mod, "prepare_inputs", lambda cfg, **kw: seen.append(kw) or real(cfg, **kw))
    split = Trainer(_fresh(jax_model, "untied"), optax.sgd(0.0), grad_accum=2).loss_and_grads(batch)
    assert [len(kw["image_grid_thw"]) if kw.get("image_grid_thw") is not None else 0 for kw in seen] == [1, 2]
    assert [kw.get("video_grid_thw") is not None for kw in seen] == [False, True]
    assert abs(whole[0] - split[0]) <= 1e-6 * abs(whole[0])
    a, b = _grads_by_key(whole[1]), _grads_by_key(split[1])
    for key in a:
        assert not np.abs(a[key]).max() or rel_err(b[key], a[key]) <= 1e-5, key
