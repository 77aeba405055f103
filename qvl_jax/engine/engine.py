"""Continuous batching: `Engine` runs many requests over one model with a paged KV cache.

A background thread owns the device state (the pools, the penalty history, the window buffers) and
runs the scheduler (`qvl_jax.engine.scheduler`, host-only) in visits. Each visit (1) runs the prompt
chunks the scheduler plans within a token budget together with one decode step of every decoding
request (`steps.mixed`: the decode tokens ride on the chunks' reads of the weights, as vLLM
schedules prefill and decode in one step): all the visit's chunks packed into one jitted call where
the CPU kernels attend (`cpu_kernel`), else one call per chunk, (2) when no prompt waits to be
prefilled, runs up to `decode_steps` decode steps for every decoding request inside one jitted
`lax.while_loop` over those requests (rows padded to a power of two, each size compiled once), so
the host round trip is paid once per loop, and (3) hands new tokens to their handles
(`qvl_jax.engine.request`) and retires finished requests. Requests join and leave at those
boundaries; memory and preemption are the scheduler's. With speculative_config, step (2) runs the
speculative verify loop for the requests it serves (`qvl_jax.engine.speculative_runs`). Every
program has few shapes (a chunk length bucket, a row count; the attention window is a traced bucket
index), and `warm_up` compiles them all before the first request.

Exactness: every request keeps its own 3-D prompt positions and rope_delta (decode position = cache
index + rope_delta), DeepStack features at its visual tokens, its own sampling parameters, stop ids
and PRNG key (token i drawn with fold_in(key, i), as `model.generate` draws a batch of one), so its
tokens are those of the same request run alone.
"""

from __future__ import annotations

import collections
import itertools
import queue
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from qvl_jax import sharding
from qvl_jax.config import check_attention
from qvl_jax.engine import batch, cpu_kernel, memory, packed, paged, speculative, steps, warmup
from qvl_jax.engine.generate import INPUT_NAMES, controls
from qvl_jax.engine.output import OutputStream, TokenTable
from qvl_jax.engine.request import (EngineRequest, RequestHandle, RequestOutput, TokenChunk, logprob_fields,
                                    step_logprobs)
from qvl_jax.engine.scheduler import PrefillChunk, Scheduler
from qvl_jax.engine.speculative_runs import EngineSpeculation
from qvl_jax.engine.vision_cache import VisionCache
from qvl_jax.errors import InputError, NumericalError, QvlError, device_free_bytes, device_memory_errors
from qvl_jax.modeling.inputs import bucket_length
from qvl_jax.modeling.layout import feature_order, prepare_prompt
from qvl_jax.modeling.model import vision_tower
from qvl_jax.modeling.vision import VisionInputs
from qvl_jax.processing.processor import Processor

__all__ = ["Engine", "RequestHandle", "RequestOutput", "TokenChunk"]


# ---------------------------------------------------------------------------------------------
# The engine


def _dummy_vision(vc):
    """Tower inputs of one all-zero image of 64 patches (for shapes and dtypes only)."""
    m = vc.spatial_merge_size
    return VisionInputs.build(np.zeros((64, vc.patch_dim), np.float32), np.array([[1, m, 64 // m]]), vc, 64)


# Decode steps per jitted loop (`Engine(decode_steps=None)`). A request that arrives during a loop
# waits for its end; a loop's host round trip costs ~1% of a step on the CPU (2B widths) and more of
# one on an accelerator, where steps are short. On the CPU one step a call: at concurrency 8 (2B
# widths, `scripts/profile_engine.py`) TTFT p50 0.82 s against 1.34 s with 4 (bfloat16), 1.76
# against 2.94 s (float32), and more output tok/s; at concurrency 1, 3% fewer (docs/performance.md).
DECODE_STEPS = 8
CPU_DECODE_STEPS = 1


def _round_down(n: int) -> int:
    """n rounded down to two significant bits (2^k or 3 * 2^(k-1)). The pool's size is part of every
    compiled step's shapes, and free memory (host RAM on the CPU) moves by a few percent between
    starts: unrounded, each start compiled everything anew and the persistent compilation cache never
    served a second one."""
    if n < 4:
        return n
    shift = n.bit_length() - 2
    return (n >> shift) << shift


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class Engine:
    """Continuous batching over a paged KV cache. Build with `model.engine(...)`.

    max_num_seqs: decode slots (requests running at once). max_model_len: longest prompt + output
    (default: the model's context, at most 8192). block_size: tokens per KV block. kv_cache_memory:
    bytes the KV pool may take (an int, or a size such as "4GiB" or "512MiB"; `engine.kv_cache_bytes`
    is what it took). num_blocks: the pool in blocks instead. Neither given: what `memory_fraction`
    of free device memory holds, at most `memory.CPU_DEFAULT_BYTES` (4 GiB) on the CPU, rounded down
    to two significant bits so that it, and with it every compiled shape, is the same from one start
    to the next. Either way at most enough for every slot at max_model_len. max_num_batched_tokens: prompt tokens
    prefilled per scheduler visit (chunked prefill: a long prompt does not stall the running
    decodes). decode_steps: decode steps per jitted loop between scheduler visits (default: `CPU_DECODE_STEPS` on the CPU, `DECODE_STEPS` elsewhere). prefix_caching:
    reuse full blocks of identical prefixes. vision_cache_bytes: memory for cached image / video
    features. window_copy_bytes: a decode loop whose rows' attention windows (every layer's keys and
    values) fit in this many bytes gathers them once per loop, into buffers kept beside the pool,
    rather than once per step (the same numbers, faster; 0: never; unused where the CPU kernel reads
    the pages, below). attention: the paged kernel,
    one of `qvl_jax.config.ATTENTION_KERNELS` (default: the model's; "pallas" runs decode steps
    through JAX's Pallas paged attention kernel, `paged.PallasPagedView`). processor: the
    `Processor` whose tokens' bytes stop strings are matched on (default: the model's own, read from
    its directory when a request first has stop strings). speculative_config: prompt-lookup
    speculative decoding, vLLM's dict form (`qvl_jax.engine.speculative`), for the requests whose
    settings it serves; the others decode plainly (`qvl_jax.engine.speculative_runs`). cpu_kernel:
    on the CPU, decode rows attend through the engine's C++ kernel over the pages
    (`qvl_jax.engine.cpu_kernel`: the same tokens as XLA's gather, several times faster at long
    windows; compiled on first use). None (default): wherever it can run (the CPU backend, one
    device, attention "xla", float32 or bfloat16, a C++ compiler); False: never; True: required
    (an error where it cannot run). packed_weights: True: where the CPU kernels run a bfloat16
    model, the steps' decoder and lm_head products go through `cpu_kernel.gemm_packed` over a packed
    copy of those weights (`qvl_jax.engine.packed`: with AMX a 512-token chunk ~1.25-1.6x faster at
    2B widths, the same tokens; with AVX512_BF16 a decode step ~1.6x faster; their memory once
    more); an error where it cannot. None (default):
    where it can run, AMX tiles or AVX512_BF16 vectors run the product, and the copy fits in half of the
    host memory left beside the KV pool (`packed_weights_off` says why not, else None). False:
    never."""

    def __init__(self, model, max_num_seqs: int = 16, max_model_len: int | None = None, block_size: int = 16,
                 num_blocks: int | None = None, max_num_batched_tokens: int = 512, decode_steps: int | None = None,
                 memory_fraction: float = 0.5, prefix_caching: bool = True, vision_cache_bytes: int = 256 << 20,
                 window_copy_bytes: int = 1 << 30, attention: str | None = None, processor=None,
                 kv_cache_memory: int | str | None = None, speculative_config=None, cpu_kernel: bool | None = None,
                 packed_weights: bool | None = None):
        self.model = model
        self.cfg = model.config
        self.mesh = getattr(model, "mesh", None)  # the params' (and the pools') mesh; None: one device
        if self.mesh is not None and not sharding.is_local(self.mesh):
            # Each process's engine thread schedules on its own, so the processes would not run
            # the same steps in the same order, as a mesh over several hosts requires.
            raise sharding.MeshError("the engine (and the server) run on one host, but this model's mesh spans other "
                                     "processes' devices: run one engine per host, each over its own devices")
        text = self.cfg.text
        self.max_num_seqs = _positive_int("max_num_seqs", max_num_seqs)
        self.block_size = _positive_int("block_size", block_size)
        limit = text.max_position_embeddings
        self.max_model_len = _positive_int("max_model_len", min(limit, 8192) if max_model_len is None else max_model_len, 2)
        if self.max_model_len > limit:
            raise InputError(f"max_model_len={self.max_model_len} exceeds the model's context of {limit} tokens")
        self.max_num_batched_tokens = _positive_int("max_num_batched_tokens", max_num_batched_tokens)
        if decode_steps is None:
            decode_steps = CPU_DECODE_STEPS if jax.devices()[0].platform == "cpu" else DECODE_STEPS
        self.decode_steps = _positive_int("decode_steps", decode_steps)
        self.window_copy_bytes = _positive_int("window_copy_bytes", window_copy_bytes, 0)
        self.max_blocks_per_seq = -(-self.max_model_len // self.block_size)
        need_one = self.max_blocks_per_seq + 1  # one full-length sequence and the trash block
        per_block = paged.block_bytes(text, self.block_size, model.dtype)
        if num_blocks is None:
            budget, given = memory.pool_budget(kv_cache_memory, memory_fraction, device_free_bytes(),
                                               jax.devices()[0].platform == "cpu")
            fit = need_one if budget is None else budget // per_block
            if given and fit < need_one:
                raise InputError(f"kv_cache_memory={memory.format_size(budget)} holds {fit} KV blocks; one sequence "
                                 f"of max_model_len={self.max_model_len} needs {need_one} "
                                 f"({memory.format_size(need_one * per_block)}): give more, or a shorter max_model_len")
            num_blocks = max(need_one, min(fit if given else _round_down(fit),
                                           self.max_num_seqs * self.max_blocks_per_seq + 1))
        self.num_blocks = _positive_int("num_blocks", num_blocks, 2)
        self.kv_cache_bytes = self.num_blocks * per_block  # the pool: every layer's keys and values
        if self.num_blocks < need_one:
            raise InputError(f"num_blocks={self.num_blocks} cannot hold one sequence of max_model_len="
                             f"{self.max_model_len} ({need_one} blocks of {self.block_size} tokens with the "
                             "reserved one)")
        # The paged kernel: the model's attention setting unless given here ("pallas": Pallas decode).
        self.attention = model.config.attention if attention is None else check_attention(attention)
        self._pallas = self.attention == "pallas"
        self._cpu = self._use_cpu_kernel(cpu_kernel)
        if packed_weights:
            why = packed.why_not(model, self._cpu)
            if why is not None:
                raise InputError(f"packed_weights=True cannot run here: {why}")
        elif packed_weights is None:
            why = packed.default_off(model, self._cpu, device_free_bytes(), self.kv_cache_bytes)
        else:
            why = "packed_weights=False"
        self.packed_weights_off = why  # None: the steps' decoder products run over packed weights
        # The steps' and the vision tower's view of the model (`packed.StepParams`) where the CPU
        # kernels run (packing needs them too); elsewhere the model's own.
        self._view = packed.StepParams(model, why is None, self._cpu) if self._cpu else None
        self.speculative_config = speculative.SpeculativeConfig.of(speculative_config)
        self._spec = None
        if self.speculative_config is not None:
            if self._pallas:
                raise InputError("speculative_config does not combine with attention='pallas' yet: use 'xla'")
            self._spec = EngineSpeculation(self, self.speculative_config)
        self._prefix_caching, self._vision_cache_bytes = prefix_caching, vision_cache_bytes
        self._processor, self._token_table = processor, None
        self._features_dtype = None
        # prefill_tokens, decode_tokens, decode_chunks, mixed_steps, packed_steps (several chunks), preemptions, ...
        self.stats = collections.Counter()
        self._reset_device_state()
        self._commands: queue.Queue = queue.Queue()
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False

    def _use_cpu_kernel(self, wanted: bool | None) -> bool:
        """Whether decode rows attend through `cpu_kernel` (see the class docstring)."""
        if wanted is not None and not wanted:
            return False
        why = cpu_kernel.why_not_for(self.attention, self.mesh, self.model.dtype)
        if why is not None and wanted:
            raise InputError(f"cpu_kernel=True cannot run here: {why}")
        return why is None

    def _reset_device_state(self) -> None:
        """Fresh pages, penalty history, scheduler (block pool, slots, queues) and caches (at start,
        and after a failed step, whose donated buffers may be gone)."""
        text, s = self.cfg.text, self.max_num_seqs
        self._pages = self._windows = None  # the old pool's memory goes before the new one is allocated
        self.scheduler = Scheduler(self.num_blocks, self.block_size, s, self.max_blocks_per_seq,
                                   self.max_num_batched_tokens, self.decode_steps, self._prefix_caching, self.stats)
        self._sizes = self.scheduler.window_sizes()
        self._no_vision = {}
        self.vision_cache = VisionCache(self._vision_cache_bytes)
        self._pages = paged.allocate(text, self.num_blocks, self.block_size, self.model.dtype, self.mesh, self._pallas)
        self._seen = jnp.zeros((s, text.vocab_size), bool)
        self._counts = jnp.zeros((s, text.vocab_size), jnp.int32)

    @property
    def params(self):
        """(Structure, leaves) for the steps and the vision tower: the model's, with the decoder's weights
        packed where the engine packs them, and the vision blocks attending through the CPU kernel
        where the engine runs it (`qvl_jax.engine.packed.StepParams`)."""
        return self.model.split if self._view is None else self._view.split

    @property
    def blocks(self):
        """The block pool and prefix cache (`prefix_cache.BlockManager`)."""
        return self.scheduler.blocks

    # -- public API -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks a request could be given now (free, or cached and unreferenced)."""
        return self.blocks.num_free

    def submit(self, inputs: dict, max_new_tokens: int = 64, **sampling_kw) -> RequestHandle:
        """Queues one prompt (a processor's output, batch of one, HF names) with its own sampling
        settings: `sampling_params=qvl_jax.SamplingParams(...)` or its fields as keywords (as
        `model.generate` takes them: temperature, top_k, top_p, min_p, the penalties, seed,
        stop_token_ids, ignore_eos, stop (strings: the answer ends before the first one met, and
        `RequestOutput.text` holds it), logprobs), and pad_token_id. Returns at once; safe from any
        thread. A bad request gets a handle whose `result()` raises the one-line typed error; the
        others run on."""
        with self._lock:
            if self._closed:
                raise QvlError("the engine is closed")
            handle = RequestHandle(self, next(self._ids))
        try:
            req = self._make_request(handle, inputs, max_new_tokens, sampling_kw)
        except QvlError as e:
            handle._finish(None, e.with_traceback(None))
            return handle
        with self._lock:
            self._commands.put(("submit", req))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="qvl-engine", daemon=True)
                self._thread.start()
        return handle

    def generate(self, inputs: list[dict], max_new_tokens: int = 64, progress: bool | None = None,
                 return_exceptions: bool = False, **sampling_kw) -> list[RequestOutput]:
        """Offline batch: submits every prompt with the same settings (as `submit` takes them, stop
        strings included), returns their outputs in order (a progress bar on a terminal). A failed
        request raises its error once all are done, or with return_exceptions=True stands in the
        list as its exception."""
        handles = [self.submit(inp, max_new_tokens, **sampling_kw) for inp in inputs]
        if progress is None:
            progress = sys.stderr.isatty()
        bar = None
        if progress:
            bar = tqdm(total=len(handles), desc="generate", unit="req")
        out = []
        for h in handles:
            try:
                out.append(h.result())
            except QvlError as e:
                out.append(e)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        if not return_exceptions:
            for r in out:
                if isinstance(r, BaseException):
                    raise r
        return out

    def warm_up(self, sampling: tuple = ({},), vision_patches: int = 0, progress=None) -> float:
        """Compiles the engine's programs before its first requests (`qvl_jax.engine.warmup`): the
        prefill step for every chunk length bucket and the decode loop for every row count, for the
        sampler of each entry of `sampling` (keywords as `submit` takes them; default: greedy), and with vision_patches > 0 the vision tower for every patch bucket
        up to that many patches. progress(i, n, program) is called before each. Runs on the engine's
        thread between steps; returns the seconds it took."""
        flag_sets = list(dict.fromkeys(controls(self.model, 1, 1, dict(kw)).flags for kw in sampling))
        programs = warmup.plan(self, flag_sets, _positive_int("vision_patches", vision_patches, 0))
        done, box = threading.Event(), {}
        with self._lock:
            if self._closed:
                raise QvlError("the engine is closed")
            self._commands.put(("warm_up", (programs, progress, done, box)))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="qvl-engine", daemon=True)
                self._thread.start()
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["seconds"]

    def close(self) -> None:
        """Stops the scheduler; unfinished requests end as cancelled."""
        with self._lock:
            self._closed = True
            thread = self._thread
        self._commands.put(("close", None))
        if thread is not None:
            thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- request checks (caller's thread) ----------------------------------------------------------
    def _make_request(self, handle, inputs, max_new_tokens, kw) -> EngineRequest:
        if not isinstance(inputs, dict) and not hasattr(inputs, "keys"):
            raise InputError(f"submit takes a dict of model inputs (a processor's output), got {type(inputs).__name__}")
        inputs = dict(inputs)
        unknown = set(inputs) - set(INPUT_NAMES)
        if unknown:
            raise InputError(f"unknown input(s): {', '.join(sorted(unknown))}")
        if inputs.get("input_ids") is None:
            raise InputError("submit needs input_ids")
        layout = prepare_prompt(self.cfg, **inputs, batch_message="submit takes one prompt (a batch of one); got a "
                                                                  "batch of {n}: submit each row, or use engine.generate")
        n = len(layout)
        ctl = controls(self.model, 1, max_new_tokens, kw)
        max_new = ctl.max_new
        if n + max_new > self.max_model_len:
            raise InputError(f"prompt of {n} tokens + max_new_tokens={max_new} = {n + max_new} exceeds the "
                             f"engine's max_model_len of {self.max_model_len}")
        output = None
        if ctl.sampling.stop:
            stop_ids = ctl.stop_ids[ctl.stop_ids >= 0].tolist()
            output = OutputStream(self._tokens(), ctl.sampling.stop, stop_ids)
        return EngineRequest(handle=handle, layout=layout, max_new=max_new, flags=ctl.flags,
                             sp=tuple(a[0] for a in ctl.sampling.rows(1)),
                             key=steps.row_keys(ctl.sampling.seed, 1)[0], stop=ctl.stop_ids,
                             submitted=time.perf_counter(), n_top=ctl.sampling.logprobs, output=output,
                             matcher=None if ctl.grammar is None else ctl.grammar.matcher(),
                             speculate=self._spec is not None and speculative.unsupported(ctl.flags) is None)

    def _tokens(self) -> TokenTable:
        """The token bytes stop strings are matched on (the processor read once, on first need)."""
        with self._lock:
            if self._token_table is None:
                if self._processor is None:
                    if self.model.path is None:
                        raise InputError("stop strings need the model's tokenizer: build the engine with "
                                         "processor=qvl_jax.Processor.from_pretrained(...)")
                    self._processor = Processor.from_pretrained(self.model.path)
                self._token_table = TokenTable.of(self._processor)
            return self._token_table

    # -- scheduler thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            if not self._drain(block=not self.scheduler.requests):
                break
            if not self.scheduler.requests:
                continue
            try:
                with device_memory_errors("engine step"):
                    self._step()
            except Exception as e:  # a failure of the step itself: fail what was in flight, keep serving
                err = e if isinstance(e, QvlError) else QvlError(f"engine step failed: {type(e).__name__}: "
                                                                 f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}")
                for req in self.scheduler.requests:
                    self._retire(req, error=err)
                self._reset_device_state()

    def _drain(self, block: bool) -> bool:
        """Takes queued submissions and cancellations; False once closed."""
        while True:
            try:
                cmd, arg = self._commands.get(block=block)
            except queue.Empty:
                return True
            block = False
            if cmd == "submit":
                self.scheduler.add(arg)
            elif cmd == "cancel":
                req = next((r for r in self.scheduler.requests if r.handle is arg), None)
                if req is not None:
                    self._retire(req, reason="cancelled")
            elif cmd == "warm_up":
                programs, progress, done, box = arg
                try:
                    with device_memory_errors("engine warm-up"):
                        box["seconds"] = warmup.run(self, programs, progress)
                except Exception as e:  # the steps donate the pools: start from fresh ones
                    box["error"] = e if isinstance(e, QvlError) else QvlError(
                        f"engine warm-up failed: {type(e).__name__}: {str(e).strip()[:200]}")
                    for req in self.scheduler.requests:
                        self._retire(req, error=box["error"])
                    self._reset_device_state()
                finally:
                    done.set()
            elif cmd == "close":
                for req in self.scheduler.requests:
                    self._retire(req, reason="cancelled")
                # Submissions that raced with close end as cancelled too.
                while not self._commands.empty():
                    c, a = self._commands.get()
                    if c == "submit":
                        a.handle._finish(self._output(a, "cancelled"))
                return False

    def _step(self) -> None:
        t0 = time.perf_counter()
        chunks = self.scheduler.schedule_prefill()
        # The visit's chunks in one step, packed, where the CPU kernels attend over them; else a step each.
        for group in ([chunks] if self._cpu and chunks else [[c] for c in chunks]):
            if self._pallas:
                self._prefill(group[0])
            else:  # the decoding requests take a token with every step
                self._mixed(group, self.scheduler.schedule_decode_one())
        if chunks:
            # A prefill chunk that is not a prompt's last returns nothing to the host, so its work would
            # otherwise still run when the decode phase starts and be counted there: wait for it, so
            # that prefill_s / decode_s split the time truthfully (a wait the decode phase does anyway).
            jax.block_until_ready(self._pages)
        t1 = time.perf_counter()
        # While prompts wait to be prefilled, decoding rides on their chunks (as vLLM schedules it);
        # a decode loop of its own runs when no prefill work is left.
        batch = None if chunks and not self._pallas and self.scheduler.prefill_pending() \
            else self.scheduler.schedule_decode()
        if batch is not None:
            (self._decode if self._spec is None else self._spec.decode)(batch.requests, batch.limits)
        self.stats["steps"] += 1
        self.stats["prefill_s"] += t1 - t0
        self.stats["decode_s"] += time.perf_counter() - t1

    # -- results ----------------------------------------------------------------------------------
    def _output(self, req: EngineRequest, reason: str) -> RequestOutput:
        now = time.perf_counter()
        return RequestOutput(
            tokens=np.asarray(req.outputs, np.int32), finish_reason=reason, prompt_tokens=len(req.prompt),
            cached_tokens=req.cached_tokens or 0, preemptions=req.preemptions,
            queue_s=(req.admitted or now) - req.submitted, ttft_s=(req.first_token or now) - req.submitted,
            latency_s=now - req.submitted, **logprob_fields(req.n_top, req.lp),
            text=None if req.output is None else req.output.text + req.output.finish(reason),
            stop_reason=None if req.output is None or not isinstance(req.output.stop_reason, str)
            else req.output.stop_reason, proposed_tokens=req.proposed, accepted_tokens=req.accepted)

    def _retire(self, req: EngineRequest, reason: str = "", error: BaseException | None = None) -> None:
        self.scheduler.remove(req)
        req.handle._finish(None if error is not None else self._output(req, reason), error)

    # -- prefill ------------------------------------------------------------------------------------
    def _features(self, req: EngineRequest, start: int):
        """(feats, deepstack, items) of the media the uncached part of the prompt needs, in feature
        order (`layout.feature_order`): cached ones from the vision cache, the rest through one tower
        call (images before videos, as model.generate runs them when all are new)."""
        need = feature_order(req.layout.items_ending_after(start))
        got = {m.digest: self.vision_cache.get(m.digest) for m in need}
        miss = [m for m in need if got[m.digest] is None]
        if miss:
            # On the host from here: slicing and gathering device arrays compiles per image size.
            feats, deepstack = map(np.asarray, vision_tower(*self.params, req.layout.vision_inputs(miss)))
            self.stats["vision_encoded"] += len(miss)
            at = 0
            for m in miss:
                # Copies: a view would keep the whole call's features alive past the cache's bound.
                got[m.digest] = (feats[at:at + m.n_feats].copy(), deepstack[:, at:at + m.n_feats].copy())
                at += m.n_feats
                self.vision_cache.put(m.digest, *got[m.digest])
        parts = [got[m.digest] for m in need]
        row = sum(m.n_feats for m in need)
        pad = bucket_length(row, 16) - row
        feats = np.concatenate([f for f, _ in parts])
        deepstack = np.concatenate([d for _, d in parts], axis=1)
        return np.pad(feats, ((0, pad), (0, 0))), np.pad(deepstack, ((0, 0), (0, pad), (0, 0))), need

    def _text_vision(self, t: int, r: int = 0) -> tuple:
        """The vision input of a chunk of t padded tokens without media (and r decode rows in its
        step: DeepStack rows for their tokens too): zero features, no feature rows (-1), shaped as
        `_packed_inputs` shapes chunks with media, so that both run one compiled step (adding zero
        DeepStack features leaves the hidden states as they are)."""
        if (t, r) not in self._no_vision:
            d, k = self.cfg.text.hidden_size, len(self.cfg.vision.deepstack_visual_indexes)
            dt = self._vision_dtype()
            # device_put, not jnp.zeros: an eager jnp op compiles a program for each new shape.
            self._no_vision[t, r] = jax.device_put((np.zeros((t, d), dt), np.zeros((k, t + r, d), dt),
                                                    np.full((1, t), -1, np.int32)))
        return self._no_vision[t, r]

    def _vision_dtype(self):
        """The dtype of the vision tower's features (what `_features` hands `_packed_inputs`)."""
        if self._features_dtype is None:
            vis = self.model.split
            out = jax.eval_shape(lambda leaves: vision_tower(vis[0], leaves, _dummy_vision(self.cfg.vision))[0],
                                 vis[1])
            self._features_dtype = out.dtype
        return self._features_dtype

    def _chunk_inputs(self, chunk: PrefillChunk) -> tuple:
        """(t, ids [1, t], positions [3, 1, t], valid [1, t], vision) of a prefill chunk, padded to its
        length bucket (`_packed_inputs` of the one chunk)."""
        t, ids, positions, valid, _, _, _, vision = self._packed_inputs([chunk], 1, decode_rows=False)
        return t, ids, positions, valid, vision

    def _packed_inputs(self, chunks: list[PrefillChunk], r: int, decode_rows: bool = True) -> tuple:
        """(t, ids [1, t], positions [3, 1, t], valid [1, t], index [1, t], row [1, t], starts [r + 1],
        vision) of prefill chunks packed one after another (chunk i is row i's), padded to the
        length bucket of their sum, for a mixed step of r rows (the vision input in token order,
        `steps._embed_aligned`; with decode_rows, DeepStack rows for the step's r decode tokens
        too); a final chunk of a request with penalties also resets its penalty history."""
        extra = r if decode_rows else 0
        total = sum(c.n for c in chunks)
        # Four length buckets an octave: a chunk pads by under an eighth, not up to a power of two (a
        # 300-token chunk ran as 512 tokens; under a shared budget most chunks are such remainders).
        t = bucket_length(total, 16, per_octave=warmup.CHUNK_PER_OCTAVE)
        ids, index, row = (np.zeros((1, t), np.int32) for _ in range(3))
        positions = np.zeros((3, 1, t), np.int32)
        starts = np.full(r + 1, total, np.int32)
        feats = deepstack = feat_index = None
        at = 0
        for i, chunk in enumerate(chunks):
            req, o, n, end = chunk.request, chunk.start, chunk.n, chunk.end
            starts[i] = at
            ids[0, at:at + n] = req.seq(o, end)
            positions[:, 0, at:at + n] = req.seq_positions(o, end)
            index[0, at:at + n] = np.arange(o, end)
            index[0, at + n:] = end  # padding after the last chunk: past it, masked
            row[0, at:] = i
            if req.layout.items_overlapping(o, end):
                if req.features is None:
                    req.features = self._features(req, o)
                f, d, items = req.features
                if feats is None:
                    feats = np.zeros((t, f.shape[1]), f.dtype)
                    deepstack = np.zeros((d.shape[0], t + extra, d.shape[2]), d.dtype)
                    feat_index = np.full((1, t), -1, np.int32)
                ci = req.layout.chunk_feat_index(items, o, end)
                hit = np.flatnonzero(ci >= 0)
                feats[at + hit] = f[ci[hit]]
                deepstack[:, at + hit] = d[:, ci[hit]]
                feat_index[0, at + hit] = at + hit
            if chunk.final and req.flags.penalties:
                hist = np.full((1, bucket_length(req.seq_len, 16)), -1, np.int32)
                hist[0, :req.seq_len] = req.seq(0, req.seq_len)
                self._seen, self._counts = steps.set_history(self._seen, self._counts, np.array([req.slot], np.int32),
                                                             hist, np.array([len(req.prompt)], np.int32))
            at += n
        # device_put, not jnp.asarray: that compiles a copy program for each new shape (kept for good).
        vision = self._text_vision(t, extra) if feats is None else jax.device_put((feats, deepstack, feat_index))
        self.stats["prefill_tokens"] += total
        self.stats["prefill_padded_tokens"] += t
        return t, ids, positions, (np.arange(t) < total)[None], index, row, starts, vision

    def _prefill(self, chunk: PrefillChunk) -> None:
        """A prefill chunk alone (the Pallas kernel's path; otherwise `_mixed`)."""
        req = chunk.request
        t, ids, positions, valid, vision = self._chunk_inputs(chunk)
        cache = self._cache(self.scheduler.table[req.slot:req.slot + 1], chunk.end)
        cache, self._seen, self._counts, out, _ = steps.prefill(
            *self.params, req.flags, self.max_blocks_per_seq * self.block_size, False, cache, self._seen,
            self._counts, ids, positions, valid, np.array([chunk.start], np.int32), np.array([chunk.n - 1], np.int32),
            vision, batch.rows([req], 1), np.array([chunk.final]), mesh=self.mesh)
        self._pages = cache.pages
        if chunk.final:
            self._prefilled(req, jax.device_get(out))

    def _mixed(self, chunks: list[PrefillChunk], dec) -> None:
        """Prefill chunks (one, or with the CPU kernels the visit's) and one decode step of the
        decoding requests dec (a `DecodeBatch` of one token each, or None) in one jitted call
        (`steps.mixed`): the decode rows and the chunks share the weight reads. Rows: the chunks',
        then the decode rows, then idle ones (`batch.mixed_rows`: at most two compiled programs per
        chunk length bucket)."""
        reqs = [c.request for c in chunks]
        decs, limits = ([], []) if dec is None else (dec.requests, dec.limits)
        c = len(chunks)
        r = batch.mixed_rows(c + len(decs), self.max_num_seqs)
        t, ids, positions, valid, index, row, starts, vision = self._packed_inputs(chunks, r)
        rows = batch.rows(reqs + decs, r, [0] * c + limits)
        active = np.zeros(r, bool)
        active[c:c + len(decs)] = rows.seq_len[c:c + len(decs)] < rows.limit[c:c + len(decs)]
        final = np.zeros(r, bool)
        final[:c] = [ch.final for ch in chunks]
        last_idx = np.zeros(r, np.int32)
        last_idx[:c] = starts[1:c + 1] - 1
        table = batch.tables(reqs + decs, r, self.scheduler.table)
        cache = self._cache(table, max(ch.end for ch in chunks))
        cache, self._seen, self._counts, out = steps.mixed(
            *self.params, batch.flags(reqs + decs), self.max_blocks_per_seq * self.block_size, cache, self._seen,
            self._counts, ids, positions, valid, index, row, starts, last_idx, vision, final,
            batch.last_tokens(decs, r, c), active, rows, self._bucket(max(limits, default=1)), mesh=self.mesh)
        self._pages = cache.pages
        self.stats["packed_steps"] += c > 1
        if not final.any() and not active.any():
            return
        out = jax.device_get(out)
        for i, chunk in enumerate(chunks):
            if chunk.final:
                self._prefilled(chunk.request, out, i)
        self.stats["mixed_steps"] += 1
        self._decoded(decs, out, first=c)

    def _prefilled(self, req: EngineRequest, out, i: int = 0) -> None:
        """Takes the token a request's final prefill chunk chose (row i of out)."""
        req.features = None  # the vision cache keeps what may be needed again
        if out.bad[i] >= 0:
            self._retire(req, error=NumericalError("the model produced NaN/inf logits (prefill); check the "
                                                   "weights, or use float32 if a low-precision dtype overflowed"))
            return
        req.decoding = True
        self._accept(req, [int(out.tokens[i, 0])], step_logprobs(out, i, np.ones(1, bool)))

    def _accept(self, req: EngineRequest, toks: list[int], lps: list | None = None, advance: bool = False) -> None:
        """Appends new tokens (and their log-probabilities when req asked), streams them, and retires
        req when it stopped. advance: the tokens came from a decode step, which computed the keys and
        values of as many positions: the scheduler advances req by the tokens kept, after they are
        appended (it hashes the blocks they fill for the prefix cache, over the sequence as it then
        is) and before a stop retires req (which registers its full blocks)."""
        if not toks:
            return
        if req.first_token is None:
            req.first_token = time.perf_counter()
        if req.output is not None:  # stop strings: the token that completes one is the last
            before = req.output.n_tokens
            req.output.add(toks)
            toks = toks[:req.output.n_tokens - before]
            lps = None if lps is None else lps[:len(toks)]
        if req.matcher is not None:  # structured outputs: the grammar state follows the answer
            try:
                req.matcher.consume(toks)
            except QvlError as e:
                self._retire(req, error=e)
                return
        req.outputs += toks
        if advance:
            self.scheduler.advance(req, len(toks))
        new = []
        if req.n_top is not None:
            new = [(float(lp), ids[:req.n_top], top[:req.n_top]) for lp, ids, top in lps]
            req.lp += new
        req.handle._emit(TokenChunk(np.asarray(toks, np.int32), **logprob_fields(req.n_top, new)))
        if toks[-1] in set(req.stop[req.stop >= 0].tolist()) or (req.output is not None
                                                                 and req.output.finish_reason == "stop"):
            self._retire(req, "stop")
        elif len(req.outputs) >= req.max_new:
            self._retire(req, "length")

    # -- decode -------------------------------------------------------------------------------------
    def _cache(self, table: np.ndarray, n_tokens: int, windows: tuple = ()) -> paged.PagedCache:
        """The paged cache a step takes: the rows' whole block tables (host arrays: passed to the
        jitted step as they are), and the window bucket that n_tokens need as a traced index, so that
        one compiled step serves every window (`paged.PagedCache`)."""
        return paged.PagedCache(self._pages, table, windows, self._bucket(n_tokens), self.block_size, self._pallas,
                                self._sizes, self._cpu)

    def _bucket(self, n_tokens: int) -> np.int32:
        """The index of the window bucket n_tokens need, in `_sizes`."""
        return np.int32(self._sizes.index(self.scheduler.window_blocks(n_tokens) * self.block_size))

    def _window_buffers(self, rows: int) -> tuple:
        """The decode loop's window buffers for rows x the longest window that fits window_copy_bytes
        (windows up to it are read from them, longer ones from the pages), or () where none fits (or
        the kernel reads the pages itself). One set per row count is kept between loops, so that a
        loop writes into memory already touched (fresh memory of that size cost more page faults
        than the gathers it saves)."""
        fit = [w for w in self._sizes
               if paged.block_bytes(self.cfg.text, rows * w, self.model.dtype) <= self.window_copy_bytes]
        if self._pallas or self._cpu or not fit:
            return ()
        kept, self._windows = self._windows, None  # donated to the loop, which hands them back
        if kept is not None and kept[0] == rows:
            return kept[1]
        del kept  # the old set's memory goes first
        return paged.window_buffers(self.cfg.text, rows, fit[-1], self.model.dtype, self.mesh)

    def _decode(self, dec: list[EngineRequest], limits: list[int]) -> None:
        """One decode loop over the requests dec, request i growing to at most limits[i] tokens."""
        flags = batch.flags(dec)
        # A constrained request's next mask needs the token just chosen: such a batch runs one step.
        k = 1 if flags.constrained else self.decode_steps
        # Only the decoding requests run, padded to a power of two rows (each size compiles once):
        # one request alone costs one row, not max_num_seqs.
        s, bs = batch.padded_rows(len(dec), self.max_num_seqs), self.block_size
        rows = batch.rows(dec, s, limits)
        limit = rows.limit
        active = rows.seq_len < limit  # padding rows: 0 < 0
        if not active.any():
            return
        table = batch.tables(dec, s, self.scheduler.table)
        last_tok = batch.last_tokens(dec, s)
        cache = self._cache(table, int(limit.max()), self._window_buffers(s))
        cache, self._seen, self._counts, out = steps.decode(
            *self.params, flags, self.max_blocks_per_seq * bs, k, False, cache, self._seen, self._counts, last_tok,
            active, rows, mesh=self.mesh)
        self._pages = cache.pages
        if cache.windows:
            self._windows = (s, cache.windows)
        self.stats["decode_chunks"] += 1
        self._decoded(dec, jax.device_get(out))

    def _decoded(self, dec: list[EngineRequest], out, first: int = 0) -> None:
        """Takes the tokens rows first.. of out (`steps.Tokens` on the host) hold for the requests dec."""
        for i, r in enumerate(dec, first):
            ran = out.tokens[i] >= 0
            self._take_decoded(r, out.tokens[i][ran].tolist(), int(out.bad[i]), step_logprobs(out, i, ran))

    def _take_decoded(self, r: EngineRequest, toks: list[int], bad: int, lps: list | None = None) -> None:
        """A decoding request's new tokens from a decode call (plain or speculative): accepted and
        advanced, or with bad >= 0 (the n_out index of non-finite logits) the request retired."""
        self.stats["decode_tokens"] += len(toks)
        if bad >= 0:
            self.scheduler.advance(r, len(toks))
            self._retire(r, error=NumericalError(
                f"the model produced NaN/inf logits (new token {bad}); check the "
                "weights, or use float32 if a low-precision dtype overflowed"))
            return
        # Advanced once appended (hashed before, a block missing its last tokens got a hash no
        # prompt matches, and one that another answer sharing all but those tokens could take).
        self._accept(r, toks, lps, advance=True)
