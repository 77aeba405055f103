"""Training a Mixture-of-Experts model against PyTorch: the loss and every gradient (routers and
experts included) equal transformers', the routers frozen by default, LoRA steps on attention
equal PEFT's."""

from __future__ import annotations

import copy

import numpy as np
import optax
import pytest
import torch
from flax import nnx
from parity import rel_err
from test_training import EPS, GRAD_RTOL, LOSS_RTOL, _batch, _fresh, _grads_by_key, _torch_inputs

from qvl_jax.training import LoraConfig, Trainer


@pytest.mark.parametrize("kind", ["image", "padded"])
def test_loss_and_every_gradient_equal_torch(kind, hf_checkpoint, jax_model):
    hf, _ = hf_checkpoint("moe")
    batch = _batch(hf, kind)
    ref = copy.deepcopy(hf).train()  # (no dropout anywhere: train mode changes nothing but the flag)
    out = ref(**_torch_inputs(batch))
    assert out.aux_loss is None  # transformers adds no load-balancing loss unless asked
    out.loss.backward()
    trainer = Trainer(_fresh(jax_model, "moe"), optax.sgd(0.0), train_router=True)
    loss, grads = trainer.loss_and_grads(batch)
    assert abs(loss - out.loss.item()) <= LOSS_RTOL * abs(out.loss.item())
    ours = _grads_by_key(grads)
    theirs = {k: p.grad.numpy() if p.grad is not None else np.zeros(p.shape, np.float32)
              for k, p in ref.named_parameters()}
    assert set(ours) == set(theirs)
    assert any(".mlp.gate." in k for k in ours) and any(".experts.gate_up_proj" in k for k in ours)
    for key, g in theirs.items():
        if not np.abs(g).max():
            assert not np.abs(ours[key]).max(), key
            continue
        assert rel_err(ours[key], g) <= GRAD_RTOL, key


def test_routers_frozen_by_default(jax_model):
    trainer = Trainer(_fresh(jax_model, "moe"), optax.sgd(0.0))
    keys = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(trainer.trainable)}
    assert not any(".mlp.gate." in k for k in keys)
    assert any(".experts.down_proj" in k for k in keys) and any("mlp.gate_proj" in k for k in keys)


def test_lora_steps_equal_peft(hf_checkpoint, jax_model, tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    hf, _ = hf_checkpoint("moe")
    torch.manual_seed(0)
    peft_model = get_peft_model(copy.deepcopy(hf), PeftLoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], lora_dropout=0.0,
        init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2, eps=EPS,
                            weight_decay=0.0)
    model = _fresh(jax_model, "moe")
    trainer = Trainer(model, optax.adamw(1e-2, eps=EPS, weight_decay=0.0), adapter=tmp_path / "adapter")
    for i, kind in enumerate(["image", "padded"]):
        batch = _batch(hf, kind, seed=i)
        opt.zero_grad()
        out = peft_model(**_torch_inputs(batch))
        out.loss.backward()
        opt.step()
        loss = trainer.step(batch)
        assert abs(loss - out.loss.item()) <= LOSS_RTOL * abs(out.loss.item()), i
    ids = _batch(hf, "text", seed=9)["input_ids"]
    with torch.no_grad():
        want = peft_model.eval()(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert rel_err(model.logits(ids), want) <= 1e-4
    assert isinstance(trainer.lora, LoraConfig)
