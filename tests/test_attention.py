"""The fused-attention path (qvl_jax.modeling.attention): its inputs, checked on CPU through XLA's
implementation of the same `jax.nn.dot_product_attention` call that runs cuDNN on a GPU.

With attention="dot_product" the vision tower lays frames out one per block and masks each block's
padding by a sequence length, and text prefill passes its mask to the kernel. Both must still match
transformers at the float32 tolerance. cuDNN itself cannot run here; scripts/gpu_check.sh runs it."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mm_inputs import PromptBuilder, batch_inputs, patch_dim, torch_logits
from parity import LOGITS_RTOL, rel_err
import qvl_jax
from qvl_jax import ConfigError
from qvl_jax.modeling import attention
from qvl_jax.modeling import vision as vision_mod
from test_generate import _assert_same_greedy
from test_multimodal_parity import _inputs
from test_text_parity import _ids, _torch_logits


@pytest.fixture
def fused_xla(monkeypatch):
    """Counts the fused kernel's traced calls (models loaded with attention="dot_product" run it)."""
    calls = []
    real = attention.fused

    def spy(*args, **kwargs):
        calls.append("lengths" if kwargs.get("lengths") is not None else "mask")
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "fused", spy)
    jax.clear_caches()
    yield calls
    monkeypatch.undo()
    jax.clear_caches()


def _fused_model(converted, name):
    return qvl_jax.load(converted(name), attention="dot_product")


@pytest.mark.parametrize("case", ["three_images", "batch_with_video"])
def test_fused_path_matches_transformers(case, fused_xla, hf_checkpoint, converted):
    hf, _ = hf_checkpoint("untied")
    inp = _inputs(hf, case, seed=3)
    ours = _fused_model(converted, "untied").logits(**inp)
    assert rel_err(ours, torch_logits(hf, inp), inp["attention_mask"].astype(bool)) <= LOGITS_RTOL
    assert "lengths" in fused_xla and "mask" in fused_xla  # both towers of the fused path ran


def test_fused_path_left_padded_text(fused_xla, hf_checkpoint, converted):
    hf, _ = hf_checkpoint("tied")
    ids = _ids((2, 11), seed=8)
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    ours = _fused_model(converted, "tied").logits(ids, attention_mask=mask)
    assert rel_err(ours, _torch_logits(hf, ids, mask), mask.astype(bool)) <= LOGITS_RTOL
    assert fused_xla == ["mask"] * len(fused_xla) and fused_xla


def test_fused_path_generates_as_the_einsum_path(hf_checkpoint, jax_model, converted):
    """Greedy generation (prefill through the kernel, decode through the einsum) and a second chat
    turn on the same cache (a prefill at a non-zero cache offset) agree with the einsum path."""
    hf, _ = hf_checkpoint("untied")
    dim = patch_dim(hf.config)
    first = PromptBuilder(np.random.RandomState(14)).text(4).image(4, 6).text(3)
    inp1 = batch_inputs([first], dim, np.random.RandomState(1))

    def run(m):
        jax.clear_caches()
        session = m.chat_session()
        out1 = session.generate(**inp1, max_new_tokens=6, stop_token_ids=[], return_logits=True)
        second = PromptBuilder(np.random.RandomState(15))
        second.ids = list(first.ids) + list(out1.tokens[0])
        second.image_grids = list(first.image_grids)
        second.text(5)
        inp2 = dict(inp1, input_ids=np.array([second.ids]), attention_mask=None, mm_token_type_ids=None)
        out2 = session.generate(**inp2, max_new_tokens=6, stop_token_ids=[], return_logits=True)
        assert out2.reused_tokens > 0
        return out1, out2

    want = run(jax_model("untied"))
    got = run(_fused_model(converted, "untied"))
    jax.clear_caches()
    for w, g in zip(want, got):
        assert rel_err(g.logits, w.logits) <= 1e-5
        _assert_same_greedy(g.tokens, w.tokens, w.logits)


@pytest.mark.parametrize("sizes, bucket", [([784], 1024), ([48, 16, 16], 128), ([1024] + [16] * 8, 2048),
                                           ([520] * 3, 2048)])
def test_unpacked_layout_gives_each_frame_its_own_block(sizes, bucket):
    sizes = np.array(sizes)
    size, blocks, starts = vision_mod.block_layout(sizes, bucket, pack=False)
    assert size >= sizes.max() and blocks * size >= bucket
    assert blocks >= len(sizes)
    assert sorted(starts % size) == [0] * len(sizes)
    assert len(set(starts // size)) == len(sizes)


def test_cudnn_applies_only_on_gpu_with_16_bit():
    on_gpu = jax.default_backend() == "gpu"
    assert attention.implementation("cudnn", np.float32) == "einsum"
    assert attention.implementation("cudnn", jax.numpy.bfloat16) == ("cudnn" if on_gpu else "einsum")
    assert attention.implementation("dot_product", np.float32) == "xla"
    assert attention.implementation("xla", jax.numpy.bfloat16) == "einsum"
    assert attention.implementation("pallas", jax.numpy.bfloat16) == "einsum"


def test_unknown_attention_setting_is_refused(converted):
    with pytest.raises(ConfigError, match="attention='flash': expected one of xla, cudnn, pallas, dot_product"):
        qvl_jax.load(converted("tied"), attention="flash")
    assert qvl_jax.load(converted("tied"), attention=" Dot_Product ").config.attention == "dot_product"


def test_cli_reports_a_bad_setting_in_one_line(tmp_path):
    """A bad --attention is an argparse error: one line naming the choices, exit status 2."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, QVL_JAX_CACHE=str(tmp_path), QVL_JAX_COMPILATION_CACHE="0")
    run = subprocess.run([sys.executable, "-m", "qvl_jax", "generate", "--prompt", "hi", "--max-new-tokens", "2",
                          "--attention", "flash"],
                         capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1], timeout=240)
    assert run.returncode == 2, run.stderr
    assert "--attention: invalid choice: 'flash'" in run.stderr.strip().splitlines()[-1], run.stderr


@pytest.mark.parametrize("rows,s", [(1, 40), (8, 40), (16, 40), (1, 520)])
def test_one_query_attention_matches_torch(rows, s):
    """A decode step's attention (one query per row; from ONE_QUERY_MIN_ROWS rows or ONE_QUERY_MIN_KEYS
    keys the multiply-reduce form) equals torch's GQA attention in float64 over the same keys, values
    and mask."""
    import torch

    from qvl_jax.modeling.attention import ONE_QUERY_MIN_KEYS, ONE_QUERY_MIN_ROWS, attend

    # both forms are exercised by the cases above: einsums at (1, 40), the multiply-reduce at the others
    assert ONE_QUERY_MIN_ROWS in range(2, 9) and ONE_QUERY_MIN_KEYS in range(41, 521)
    r = np.random.RandomState(rows)
    n, kv, h = 4, 2, 16
    q, k, v = (r.randn(rows, t, heads, h).astype(np.float32) for t, heads in ((1, n), (s, kv), (s, kv)))
    mask = np.arange(s)[None, None, :] <= r.randint(0, s, size=(rows, 1, 1))
    got = np.asarray(attend(q, k, v, mask)).reshape(rows, n, h)
    tq, tk, tv = (torch.from_numpy(x).double().transpose(1, 2) for x in (q, k, v))  # [b, heads, len, h]
    tk, tv = tk.repeat_interleave(n // kv, 1), tv.repeat_interleave(n // kv, 1)
    want = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=torch.from_numpy(mask)[:, None])
    np.testing.assert_allclose(got, want[:, :, 0].numpy(), rtol=1e-5, atol=1e-6)
