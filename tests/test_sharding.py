"""Sharding over a device mesh: the mesh, the rules, loading straight into the sharded layout, and
logits / greedy generation under 1x8, 2x4 and 8x1 (data x model) meshes equal to one device.

The mesh tests need 8 devices: tests/conftest.py gives the CPU 8 fake ones
(XLA_FLAGS=--xla_force_host_platform_device_count=8) before JAX starts.
"""

from __future__ import annotations

import re

import jax
from flax import nnx
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import qvl_jax
from mm_inputs import PromptBuilder, batch_inputs, patch_dim
from parity import rel_err
from qvl_jax import sharding
from qvl_jax.engine import cache as cache_mod
from qvl_jax.engine import generate
from qvl_jax.engine.generate import Generator
from qvl_jax.sharding import MeshError, make_mesh

N_DEV = 8
MESHES = [(1, 8), (2, 4), (8, 1)]
RTOL = 1e-5  # float32: only the summation order of the split contractions differs
N_NEW = 8


def needs_8(fn):
    """The mesh tests fail (never skip) without the 8 devices conftest.py provides."""
    def wrapped(*args, **kwargs):
        assert jax.device_count() >= N_DEV, f"needs {N_DEV} devices; tests/conftest.py sets XLA_FLAGS for that"
        return fn(*args, **kwargs)
    import functools
    return functools.wraps(fn)(wrapped)


# -- the mesh -----------------------------------------------------------------------------------------

def test_make_mesh_rejects_sizes_that_do_not_fit():
    one = jax.devices()[:1]
    with pytest.raises(MeshError, match=r"dp \* tp = 2 \* 1 = 2, but there are 1 devices"):
        make_mesh(2, 1, devices=one)
    with pytest.raises(MeshError, match="tp=2 does not divide the 1 devices"):
        make_mesh(tp=2, devices=one)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(MeshError, match="dp must be a positive integer"):
            make_mesh(dp=bad, devices=one)
    mesh = make_mesh(devices=one)
    assert mesh.axis_names == ("data", "model") and dict(mesh.shape) == {"data": 1, "model": 1}
    with pytest.raises(MeshError, match="mesh axes must be named among"):
        sharding.check_mesh(jax.make_mesh((1,), ("x",), devices=one))


@needs_8
def test_make_mesh_sizes():
    assert dict(make_mesh().shape) == {"data": 1, "model": 8}
    assert dict(make_mesh(dp=2).shape) == {"data": 2, "model": 4}
    assert dict(make_mesh(tp=2).shape) == {"data": 4, "model": 2}
    assert dict(make_mesh(8, 1).shape) == {"data": 8, "model": 1}
    assert sorted(d.id for d in make_mesh(2, 4).devices.flat) == list(range(8))
    with pytest.raises(MeshError, match=r"dp \* tp = 2 \* 2 = 4, but there are 8 devices"):
        make_mesh(2, 2)
    with pytest.raises(MeshError, match="dp=3 does not divide the 8 devices"):
        make_mesh(dp=3)
    # jax.make_mesh builds Explicit axes by default; the model runs under Auto (GSPMD) ones.
    mesh = sharding.check_mesh(jax.make_mesh((2, 4), ("data", "model")))
    assert all(t == AxisType.Auto for t in mesh.axis_types)


@needs_8
def test_rules_fall_back_to_replication():
    mesh = make_mesh(2, 4)
    spec = sharding.logical_to_spec
    assert spec(("layers", "embed", "heads", "head_dim"), (3, 64, 8, 16), mesh) == P(None, None, "model")
    assert spec(("layers", "embed", "heads", "head_dim"), (3, 64, 6, 16), mesh) == P()  # 6 heads on 4
    assert spec(("layers", "embed", "kv_heads", "head_dim"), (3, 64, 1, 16), mesh) == P()
    assert spec(("vocab", "embed"), (352, 96), mesh) == P("model")
    assert spec(("batch",), (3,), mesh) == P()  # 3 rows on 2
    assert spec(("batch", None, "vocab"), (4, 8, 352), mesh) == P("data", None, "model")  # None: replicated
    assert sharding.vocab_blocks(352, mesh) == 4 and sharding.vocab_blocks(350, mesh) == 1
    assert sharding.vocab_blocks(352, None) == 1
    # One mesh axis serves one dim: the second dim that wants "model" is replicated.
    assert spec(("heads", "mlp"), (8, 8), mesh) == P("model")
    assert spec(("layers", "batch", "cache_len", "kv_heads", "head_dim"), (2, 4, 64, 4, 8), mesh) == \
        P(None, "data", None, "model")


# -- loading under a mesh ---------------------------------------------------------------------------

_MODELS: dict = {}


@pytest.fixture(scope="module")
def mesh_model(converted):
    def get(name: str, dp: int, tp: int):
        key = (name, dp, tp)
        if key not in _MODELS:
            _MODELS[key] = qvl_jax.load(converted(name), mesh=make_mesh(dp, tp))
        return _MODELS[key]

    yield get
    _MODELS.clear()


def _check_param_layout(model, mesh):
    """Every param sits in the sharding its `axes` metadata gives under the rules, split into
    equal blocks on every device; the set of params is the abstract model's."""
    from qvl_jax.modeling.model import state_key

    expected = sharding.flat_param_shardings(model.config, mesh)
    seen = set()
    for path, var in nnx.to_flat_state(model.params):
        key, arr = state_key(path), var[...]
        spec = sharding.variable_spec(var, mesh)
        assert expected[key].spec == spec
        seen.add(key)
        want = NamedSharding(mesh, spec)
        assert arr.sharding.is_equivalent_to(want, arr.ndim), f"{key}: {arr.sharding.spec} != {spec}"
        shard = want.shard_shape(arr.shape)
        for dim, axis in enumerate(spec):
            if axis is not None:
                assert shard[dim] == arr.shape[dim] // mesh.shape[axis]
        assert len(arr.addressable_shards) == N_DEV
        assert all(s.data.shape == shard for s in arr.addressable_shards), key
    assert seen == set(expected)


@needs_8
@pytest.mark.parametrize("dp,tp", MESHES)
@pytest.mark.parametrize("name", ["tied", "untied"])
def test_params_follow_the_rules(name, dp, tp, mesh_model):
    model = mesh_model(name, dp, tp)
    assert model.mesh is not None and dict(model.mesh.shape) == {"data": dp, "model": tp}
    _check_param_layout(model, model.mesh)
    shardings = sharding.state_shardings(model.params, model.mesh)
    leaves = jax.tree.leaves(model.params)
    assert [a.sharding for a in leaves] == jax.tree.leaves(shardings)


@needs_8
def test_rules_by_hand(mesh_model):
    """The table's effect on the two test models, written out independently of it."""
    lm = lambda m: m.params["model"]["language_model"]  # noqa: E731
    vis = lambda m: m.params["model"]["visual"]  # noqa: E731
    spec = lambda v: v[...].sharding.spec  # noqa: E731

    tied = mesh_model("tied", 1, 8)  # 4 heads, 2 kv heads, mlp 128, vocab 320 on 8
    layer = lm(tied)["layers"][0]
    assert spec(layer["self_attn"]["q_proj"]["weight"]) == P()  # 4 heads do not split 8 ways
    assert spec(layer["self_attn"]["k_proj"]["weight"]) == P()
    assert spec(layer["mlp"]["gate_proj"]["weight"]) == P("model")
    assert spec(layer["mlp"]["down_proj"]["weight"]) == P(None, "model")
    assert spec(lm(tied)["embed_tokens"]["weight"]) == P("model")
    assert lm(tied)["embed_tokens"]["weight"][...].addressable_shards[0].data.shape == (40, 64)

    tied = mesh_model("tied", 2, 4)
    layer = lm(tied)["layers"][0]
    assert spec(layer["self_attn"]["q_proj"]["weight"]) == P("model")  # 4 heads on 4
    assert spec(layer["self_attn"]["o_proj"]["weight"]) == P(None, "model")
    assert spec(layer["self_attn"]["k_proj"]["weight"]) == P()  # 2 kv heads on 4: replicated
    assert spec(vis(tied)["blocks"][0]["mlp"]["linear_fc1"]["weight"]) == P("model")

    untied = mesh_model("untied", 2, 4)  # 6 heads, 1 kv head, mlp 160, vocab 352 on 4
    layer = lm(untied)["layers"][0]
    assert spec(layer["self_attn"]["q_proj"]["weight"]) == P()
    assert spec(layer["mlp"]["up_proj"]["weight"]) == P("model")
    assert spec(untied.params["lm_head"]["weight"]) == P("model")
    assert untied.params["lm_head"]["weight"][...].addressable_shards[0].data.shape == (88, 96)
    assert spec(vis(untied)["blocks"][0]["attn"]["qkv"]["weight"]) == P()  # 3 vision heads on 4


class _Recorder:
    """Wraps safetensors.safe_open: records the shape of every block read, forbids whole reads."""

    def __init__(self, real):
        self.real, self.reads = real, {}

    def __call__(self, *a, **kw):
        rec = self

        class Handle:
            def __init__(self):
                self.f = rec.real(*a, **kw)

            def __enter__(self):
                self.inner = self.f.__enter__()
                return self

            def __exit__(self, *exc):
                return self.f.__exit__(*exc)

            def keys(self):
                return self.inner.keys()

            def get_tensor(self, key):
                raise AssertionError(f"whole tensor {key} read under a mesh")

            def get_slice(self, key):
                sl = self.inner.get_slice(key)

                class Slice:
                    def get_shape(self):
                        return sl.get_shape()

                    def get_dtype(self):
                        return sl.get_dtype()

                    def __getitem__(self, index):
                        block = sl[index]
                        rec.reads.setdefault(key, []).append(block.shape)
                        return block

                return Slice()

        return Handle()


@needs_8
def test_load_reads_and_places_only_shards(converted, monkeypatch):
    import safetensors

    path = converted("untied")
    mesh = make_mesh(2, 4)
    rec = _Recorder(safetensors.safe_open)
    monkeypatch.setattr(safetensors, "safe_open", rec)
    placed = []
    real_put = jax.device_put
    monkeypatch.setattr(jax, "device_put", lambda x, *a, **k: placed.append(np.shape(x)) or real_put(x, *a, **k))
    from qvl_jax.checkpoint import load_state
    from qvl_jax.modeling.model import state_key

    cfg, _, params = load_state(path, mesh=mesh)
    assert placed == []  # nothing went to a device whole first
    flat = {state_key(path_): v[...] for path_, v in nnx.to_flat_state(params)}
    shardings = sharding.flat_param_shardings(cfg, mesh)
    assert set(flat) == set(shardings) == set(rec.reads)
    n_split = 0
    for key, arr in flat.items():
        want = shardings[key]
        shard = want.shard_shape(arr.shape)
        assert arr.sharding.is_equivalent_to(want, arr.ndim)
        assert all(s.data.shape == shard for s in arr.addressable_shards)
        # Each distinct block is read once: a split param is never read (nor held) whole.
        n_blocks = len({tuple((s.start, s.stop) for s in idx)
                        for idx in want.addressable_devices_indices_map(arr.shape).values()})
        assert rec.reads[key] == [shard] * n_blocks, key
        if shard != arr.shape:
            n_split += 1
            assert all(s.data.shape != arr.shape for s in arr.addressable_shards)
    assert n_split >= 8  # mlp, lm_head, embedding, merger and vision mlp weights at least
    with pytest.raises(qvl_jax.CheckpointError, match="whole tensor"):  # the recorder does catch whole reads
        load_state(path)


@needs_8
def test_load_hf_dir_and_jax_make_mesh(hf_checkpoint):
    """An HF directory (converted in memory) and a mesh from jax.make_mesh (Explicit axes) both work."""
    _, hf_dir = hf_checkpoint("tied")
    model = qvl_jax.load(hf_dir, mesh=jax.make_mesh((2, 4), ("data", "model")))
    assert all(t == AxisType.Auto for t in model.mesh.axis_types)
    _check_param_layout(model, model.mesh)
    with pytest.raises(MeshError, match="mesh must be a jax.sharding.Mesh"):
        qvl_jax.load(hf_dir, mesh="2x4")


# -- running under a mesh -----------------------------------------------------------------------

def _inputs(hf, n_rows: int):
    """A padded batch: rows of different lengths, two of them with an image."""
    rng = np.random.RandomState(1)
    rows = [PromptBuilder(rng).text(3).image(4, 4).text(2), PromptBuilder(rng).text(9)]
    rows += [PromptBuilder(rng).text(2 + 3 * i) for i in range(n_rows - 3)]
    rows += [PromptBuilder(rng).text(1).image(2, 6).text(4)]
    return batch_inputs(rows, patch_dim(hf.config), rng)


_REF: dict = {}


@needs_8
@pytest.mark.parametrize("dp,tp", MESHES)
@pytest.mark.parametrize("name", ["tied", "untied"])
def test_logits_and_greedy_equal_one_device(name, dp, tp, hf_checkpoint, jax_model, mesh_model):
    hf, _ = hf_checkpoint(name)
    inp = _inputs(hf, 8)
    if name not in _REF:
        ref_model = jax_model(name)
        norm = ref_model.params["model"]["language_model"]["norm"]["weight"][...]
        assert ref_model.mesh is None and len(norm.devices()) == 1
        _REF[name] = (ref_model.logits(**inp),
                      ref_model.generate(**inp, max_new_tokens=N_NEW, stop_token_ids=[]).tokens)
    ref_logits, ref_tokens = _REF[name]
    model = mesh_model(name, dp, tp)
    valid = np.broadcast_to(inp["attention_mask"][..., None] > 0, ref_logits.shape)
    assert rel_err(model.logits(**inp), ref_logits, valid) <= RTOL
    out = model.generate(**inp, max_new_tokens=N_NEW, stop_token_ids=[])
    np.testing.assert_array_equal(out.tokens, ref_tokens)


@needs_8
@pytest.mark.parametrize("dp,tp,batch", [(2, 4, 8), (8, 1, 3)])
def test_cache_is_sharded_and_stays_so(dp, tp, batch, hf_checkpoint, mesh_model):
    """The cache is created in its sharding (kv heads on "model" where they divide, rows on "data"),
    and prefill and the decode loop hand it back in the same layout (no silent gather)."""
    model = mesh_model("tied", dp, tp)  # 2 kv heads: replicated on 4, split on 1
    mesh = model.mesh
    gen = Generator(model)
    cache = gen.new_cache(batch, 64)
    rows = "data" if batch % dp == 0 else None
    kv = "model" if 2 % tp == 0 else None
    want = cache_mod.cache_sharding(model.config, mesh, batch)
    assert cache.k.sharding.is_equivalent_to(NamedSharding(mesh, P(None, rows, None, kv)), 5)
    assert cache.k.sharding.spec == want.k.spec
    for field in cache._fields:
        assert getattr(cache, field).sharding.is_equivalent_to(getattr(want, field), getattr(cache, field).ndim)
    shard = NamedSharding(mesh, P(None, rows, None, kv)).shard_shape(cache.k.shape)
    assert all(s.data.shape == shard for s in cache.k.addressable_shards)

    hf, _ = hf_checkpoint("tied")
    inp = _inputs(hf, batch)
    req = gen.request({k: v for k, v in inp.items()})
    ctl = generate.controls(model, batch, N_NEW, {"stop_token_ids": []})
    run = gen.start(req, cache, 0, ctl, gen.history(ctl, req.seen_ids), False)
    assert run.cache.k.sharding.is_equivalent_to(want.k, 5)
    run.run()
    assert len(run.parts) > 1  # the decode loop ran
    assert run.cache.k.sharding.is_equivalent_to(want.k, 5)
    assert run.cache.v.sharding.is_equivalent_to(want.v, 5)


# -- collectives of a decode step -------------------------------------------------------------------

_COLLECTIVE = re.compile(r"\b(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(")
_CALLED = re.compile(r"\b(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-]+)")


def _loop_collectives(hlo: str) -> tuple[list[str], list[str]]:
    """(collectives of the while loop's body, of its condition), each with the computations it calls,
    from compiled HLO text: one entry per op, its kind ("all-reduce", ...)."""
    comps, name = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            name = head.group(1)
            comps[name] = []
        elif name is not None:
            comps[name].append(line)
    loops = [line for lines in comps.values() for line in lines if " while(" in line]
    assert len(loops) == 1, f"expected one while loop, found {len(loops)}"

    def ops(root: str) -> list[str]:
        seen, todo, out = set(), [root], []
        while todo:
            c = todo.pop()
            if c in seen or c not in comps:
                continue
            seen.add(c)
            for line in comps[c]:
                out += [m.group(1) for m in _COLLECTIVE.finditer(line)]
                todo += _CALLED.findall(line)
        return out

    body = re.search(r"body=%?([\w.\-]+)", loops[0]).group(1)
    cond = re.search(r"condition=%?([\w.\-]+)", loops[0]).group(1)
    return ops(body), ops(cond)


def _decode_hlo(model, batch: int, pin: bool = True, logprobs: bool = False, **kw) -> str:
    """Compiled HLO of the decode loop of a batch (greedy unless kw says otherwise). pin=False: the
    jitted steps without their mesh argument, i.e. without the layouts the steps pin."""
    from qvl_jax.engine import steps

    gen = Generator(model)
    if not pin:
        gen.mesh = None  # the static argument that pins the layouts
    ids = np.random.RandomState(0).randint(0, 200, size=(batch, 9))
    req = gen.request({"input_ids": ids})
    ctl = generate.controls(model, batch, N_NEW, dict(kw, stop_token_ids=[]), logprobs)
    run = gen.start(req, gen.new_cache(batch, 64), 0, ctl, gen.history(ctl, req.seen_ids), False)
    rows = run.rows._replace(seq_len=np.asarray(run.last.seq_len), n_out=np.asarray(run.last.n_out))
    return steps.decode.lower(*model.split, ctl.flags, 64, 16, False, run.cache, run.seen, run.counts,
                              run.last.last_tok, run.last.active, rows, mesh=gen.mesh).compile().as_text()


@needs_8
@pytest.mark.parametrize("dp,tp,kw", [(1, 8, {}), (2, 4, {}), (1, 8, dict(logprobs=True, repetition_penalty=1.3))])
def test_decode_step_collectives(dp, tp, kw, mesh_model):
    """A greedy decode step holds only the inherent collectives: per layer one all-reduce after
    attention (where the heads are split) and one after the MLP (where its width is), plus one
    all-gather of the vocab blocks' candidates (token, log-probability terms, and the next step's
    embedding row). The sampler's finite check / max / first-index all-reduces, the log-softmax's
    and the embedding lookup's all-reduces, and the loop condition's all-reduce over "data" are
    gone (unpinned, this tiny model's step has 7 at 1x8 and 11 at 2x4; 4 and 7 here)."""
    model = mesh_model("tied", dp, tp)  # 3 layers, 4 heads, MLP 128, vocab 320
    text = model.config.text
    split = lambda n: n % tp == 0  # noqa: E731
    layers = text.num_hidden_layers
    inherent = layers * (split(text.num_attention_heads) + split(text.intermediate_size))
    body, cond = _loop_collectives(_decode_hlo(model, 8, **kw))
    assert cond == [], cond
    assert body.count("all-gather") == 1 and body.count("all-reduce") <= inherent, body
    assert len(body) <= inherent + 1, body
    # The count is not vacuous: the per-layer all-reduces are seen, and the unpinned loop has more.
    assert body.count("all-reduce") >= layers
    old_body, old_cond = _loop_collectives(_decode_hlo(model, 8, pin=False, **kw))
    assert len(old_body) + len(old_cond) > inherent + 1, old_body


@needs_8
def test_generation_paths_equal_one_device(hf_checkpoint, jax_model, mesh_model, monkeypatch):
    """Under a 2x4 mesh the blocked greedy path (rows split over "data", vocab blocks over "model")
    equals one device also where rows stop early (finished rows are fed their last token again: their
    raw logits after the stop match too), with log-probabilities, with a repetition penalty, when
    streaming, and when the next step looks its embedding up instead of carrying it; sampling
    (the unblocked sampler under a mesh) agrees as well."""
    from qvl_jax.engine import steps

    hf, _ = hf_checkpoint("tied")
    inp = _inputs(hf, 8)
    ref_model, model = jax_model("tied"), mesh_model("tied", 2, 4)
    first = ref_model.generate(**inp, max_new_tokens=N_NEW, stop_token_ids=[]).tokens
    stops = [int(first[0, 2]), int(first[5, 4])]

    def both(**kw):
        return (ref_model.generate(**inp, max_new_tokens=N_NEW, **kw),
                model.generate(**inp, max_new_tokens=N_NEW, **kw))

    ref, out = both(stop_token_ids=stops, return_logits=True, return_logprobs=True)
    assert (ref.lengths < N_NEW).sum() >= 2  # some rows stop while others go on
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    assert rel_err(out.logits, ref.logits) <= RTOL
    np.testing.assert_allclose(out.logprobs, ref.logprobs, rtol=1e-5, atol=1e-5)
    assert (ref.logprobs < -1e-3).any()  # not all zeros
    ref, out = both(stop_token_ids=[], repetition_penalty=1.5)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    ref, out = both(stop_token_ids=[], temperature=0.7, seed=3, return_logprobs=True)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, rtol=1e-5, atol=1e-5)
    streamed = np.stack(list(model.stream(**inp, max_new_tokens=N_NEW, stop_token_ids=[])), axis=1)
    np.testing.assert_array_equal(streamed, first)
    # The fallback of large batches: the loop decides (at trace time) not to carry the embedding.
    monkeypatch.setattr(steps, "CARRY_EMBED_MAX_BYTES", 0)
    steps.decode.clear_cache()
    try:
        out = model.generate(**inp, max_new_tokens=N_NEW, stop_token_ids=[])
    finally:
        steps.decode.clear_cache()
    np.testing.assert_array_equal(out.tokens, first)


@needs_8
def test_engine_under_a_mesh_equals_one_device(hf_checkpoint, jax_model, mesh_model):
    """The engine over a 2x4 mesh (pools split over kv heads, the window switch and mixed steps under
    sharding) answers as the one-device engine does, text and image requests together."""
    hf, _ = hf_checkpoint("untied")
    rng = np.random.RandomState(4)
    builders = [PromptBuilder(rng).text(3).image(4, 4).text(2), PromptBuilder(rng).text(30), PromptBuilder(rng).text(5)]
    inputs = []
    for b in builders:
        inp = batch_inputs([b], patch_dim(hf.config), rng)
        inp.pop("attention_mask")
        inputs.append(inp)
    outs = []
    for m in (jax_model("untied"), mesh_model("untied", 2, 4)):
        eng = m.engine(max_num_seqs=4, max_model_len=96, block_size=4, num_blocks=120, decode_steps=4,
                       max_num_batched_tokens=16)
        handles = [eng.submit(inp, max_new_tokens=10, stop_token_ids=[]) for inp in inputs]
        outs.append([h.result(timeout=300).tokens.tolist() for h in handles])
        eng.close()
    assert outs[0] == outs[1]
