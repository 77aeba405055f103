"""Speculative decoding driven from the host: `SpecRun` for the static path (`model.generate`,
`model.stream`) and `EngineSpeculation` for the engine's decode phase. Both run the verify loop of
`qvl_jax.engine.speculative`; what differs is where the rows' tokens and caches come from.

Static path: after the shared prefill, each row's tokens by cache index (prompt with its left
padding as -1, then the first token) go to the device once, and every verify loop hands them back
extended. Rows accept different numbers of tokens, so the tokens of a loop are left-aligned per row
(-1 after them) and gathered per row at the end.

Engine: speculation is the engine's setting (`Engine(model, speculative_config=...)`). In a decode
phase, the requests whose settings speculation serves (`speculative.unsupported`) run the verify
loop; the others run the plain decode loop, in a call of their own. Prompt chunks keep taking one
plain decode token per request (`steps.mixed`). Each speculative request is granted blocks for
decode_steps * (k + 1) more tokens where the pool has them free (never preempting for it); the
tokens it keeps are appended to it before the scheduler advances it, so the prefix cache hashes and
registers blocks of kept tokens only.
"""

from __future__ import annotations

import collections

import jax
import numpy as np

from qvl_jax import sharding
from qvl_jax.engine import batch, speculative
from qvl_jax.engine.prefix_cache import TRASH_BLOCK
from qvl_jax.engine.speculative import SpeculativeConfig
from qvl_jax.errors import NumericalError
from qvl_jax.modeling.inputs import bucket_length


class SpecRun:
    """A static batch decoded speculatively after its prefill (`generate._Run` holds the prefill's
    state: cache, rows, the first tokens)."""

    def __init__(self, run, spec: SpeculativeConfig, req):
        self.run, self.spec = run, spec
        self.gen, self.ctl = run.gen, run.ctl
        b, t = req.ids.shape
        first = np.asarray(sharding.to_host(run.last.tokens[:, 0]), np.int32)
        hist = np.full((b, run.cache.max_len + 1), -1, np.int32)
        hist[:, :t] = np.where(req.valid, req.ids, -1)
        hist[:, t] = first  # the prefill wrote indices < t; the first token is fed at t
        self.hist = jax.device_put(hist, self.gen._where)
        self.cache, self.rows, self.last = run.cache, run.rows, run.last
        self.parts = [run.last.tokens]  # per call: tokens [b, n], each row's left-aligned, -1 after
        self.bad = [run.last.bad]
        self.proposed = np.zeros(b, np.int64)
        self.accepted = np.zeros(b, np.int64)
        self._limits: dict[int, jax.Array] = {}

    def step(self, n_steps: int):
        """One verify loop of up to n_steps steps: the host copy of its new tokens [b, n] (-1 after
        each row's), or None when every row is finished."""
        last = self.last
        seq_len, active, n_out = sharding.to_host((last.seq_len, last.active, last.n_out))
        active = active & (n_out < self.ctl.max_new)  # rows advance by different counts: each its own budget
        if not active.any():
            return None
        window = min(self.cache.max_len, bucket_length(int(seq_len.max()) + self.spec.num_speculative_tokens + 1, 64))
        if window not in self._limits:
            self._limits[window] = jax.device_put(np.full(len(seq_len), window, np.int32), self.gen._where)
        rows = self.rows._replace(seq_len=last.seq_len, n_out=last.n_out, limit=self._limits[window])
        self.cache, out = speculative.verify(
            *self.gen.model.split, self.ctl.flags, window, n_steps, self.spec, self.cache, self.hist, last.last_tok,
            last.active, rows, mesh=self.gen.mesh)
        self.hist, self.last = out.hist, out
        toks, bad, proposed, accepted = sharding.to_host((out.tokens, out.bad, out.proposed, out.accepted))
        self.parts.append(toks)
        self.bad.append(bad)
        self.proposed += proposed
        self.accepted += accepted
        return toks

    def run_all(self) -> None:
        n_steps = bucket_length(self.ctl.max_new, 16)
        while self.step(n_steps) is not None:
            pass

    def collect(self, **extra):
        """The tokens so far as `model.generate` returns them (NumericalError for a bad row), with
        each row's proposed and accepted counts."""
        from qvl_jax.engine.generate import GenerateOutput

        parts = [np.asarray(p) for p in sharding.to_host(self.parts)]
        bad = np.max([np.asarray(x) for x in sharding.to_host(self.bad)], axis=0)
        if (bad >= 0).any():
            row = int(np.flatnonzero(bad >= 0)[0])
            raise NumericalError(f"the model produced NaN/inf logits (batch row {row}, new token {int(bad[row])}); "
                                 "check the weights, or use float32 if a low-precision dtype overflowed")
        seqs = [np.concatenate([p[i][p[i] >= 0] for p in parts]) for i in range(parts[0].shape[0])]
        stop = self.ctl.stop_ids[self.ctl.stop_ids >= 0]
        n = max(len(s) for s in seqs)
        tokens = np.full((len(seqs), n), self.ctl.pad_id, np.int32)
        lengths = np.zeros(len(seqs), np.int32)
        for i, s in enumerate(seqs):
            hit = np.flatnonzero(np.isin(s, stop))
            lengths[i] = hit[0] + 1 if hit.size else min(len(s), self.ctl.max_new)
            tokens[i, :lengths[i]] = s[:lengths[i]]
        return GenerateOutput(tokens=tokens, lengths=lengths, proposed_tokens=self.proposed.copy(),
                              accepted_tokens=self.accepted.copy(), **extra)

    def stream(self):
        """Yields np.int32 [b]: the next token of each row (pad once a row stopped), one per row per
        yield as `model.stream` does, running a verify step whenever a running row has none left."""
        b = self.parts[0].shape[0]
        pad = self.ctl.pad_id
        queues = [collections.deque() for _ in range(b)]
        first = np.asarray(self.parts[0][:, 0] if isinstance(self.parts[0], np.ndarray)
                           else sharding.to_host(self.parts[0][:, 0]), np.int32)
        yield first
        finished = False
        while True:
            running = np.asarray(sharding.to_host(self.last.active))
            while not finished and any(running[i] and not queues[i] for i in range(b)):
                toks = self.step(1)
                if toks is None:
                    finished = True
                    break
                for i in range(b):
                    queues[i].extend(toks[i][toks[i] >= 0].tolist())
                running = np.asarray(sharding.to_host(self.last.active))
            if not any(queues):
                return
            yield np.array([queues[i].popleft() if queues[i] else pad for i in range(b)], np.int32)


class EngineSpeculation:
    """The engine's speculative decode phase (`Engine._step` calls `decode` in place of `_decode`)."""

    def __init__(self, engine, spec: SpeculativeConfig):
        self.engine, self.spec = engine, spec

    def decode(self, dec: list, limits: list[int]) -> None:
        """One decode phase over the requests dec (granted up to limits[i] tokens by the scheduler)."""
        eng = self.engine
        plain = [(r, n) for r, n in zip(dec, limits) if not r.speculate]
        if plain:
            eng._decode([r for r, _ in plain], [n for _, n in plain])
        reqs = [r for r in dec if r.speculate and r in eng.scheduler.running]
        if reqs:
            self._verify(reqs)

    def warm_up(self, flags, s: int) -> None:
        """Compiles the verify loop for s rows and these flags on idle inputs (no row active)."""
        eng = self.engine
        window = eng.max_blocks_per_seq * eng.block_size
        table = np.full((s, eng.max_blocks_per_seq), TRASH_BLOCK, np.int32)
        cache, _ = speculative.verify(
            *eng.params, flags, window, eng.decode_steps, self.spec, eng._cache(table, 1),
            np.full((s, window + 1), -1, np.int32), np.zeros(s, np.int32), np.zeros(s, bool), batch.rows([], s),
            mesh=eng.mesh)
        eng._pages = cache.pages

    def _verify(self, reqs: list) -> None:
        eng, k = self.engine, self.spec.num_speculative_tokens
        room = eng.decode_steps * (k + 1)
        limits = [eng.scheduler.grant(r, min(room, r.max_new - len(r.outputs))) for r in reqs]
        s = batch.padded_rows(len(reqs), eng.max_num_seqs)
        rows = batch.rows(reqs, s, limits)
        active = rows.seq_len < rows.limit
        if not active.any():
            return
        window = eng.max_blocks_per_seq * eng.block_size
        hist = np.full((s, window + 1), -1, np.int32)
        for i, r in enumerate(reqs):
            hist[i, :r.seq_len] = r.seq(0, r.seq_len)
        cache = eng._cache(batch.tables(reqs, s, eng.scheduler.table), int(rows.limit.max()))
        cache, out = speculative.verify(
            *eng.params, batch.flags(reqs), window, eng.decode_steps, self.spec, cache, hist,
            batch.last_tokens(reqs, s), active, rows, mesh=eng.mesh)
        eng._pages = cache.pages
        out = jax.device_get(out._replace(hist=None))
        eng.stats["decode_chunks"] += 1
        for i, r in enumerate(reqs):
            toks = out.tokens[i][out.tokens[i] >= 0].tolist()
            r.proposed += int(out.proposed[i])
            r.accepted += int(out.accepted[i])
            eng.stats["spec_decode_num_draft_tokens"] += int(out.proposed[i])
            eng.stats["spec_decode_num_accepted_tokens"] += int(out.accepted[i])
            eng._take_decoded(r, toks, int(out.bad[i]))
