"""The FastAPI app: OpenAI's chat completions, completions and models endpoints over an `Engine`,
with /health and /metrics.

A request is checked, its media loaded and its prompt rendered in a worker thread; each of its n
choices is one engine request, and the request's task turns their tokens into text events
(serving/runs.py: detokenization and stop strings by qvl_jax.engine.output). The same event stream
feeds both the SSE and the one-shot response. A client that goes away cancels its engine requests,
which frees their KV blocks at the scheduler's next visit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import secrets
import sys
import threading
import time
import uuid

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qvl_jax.engine.output import MAX_STOP_STRINGS, TokenTable, check_stop
from qvl_jax.engine.sampling import SamplingParams
from qvl_jax.engine.structured import StructuredOutputs
from qvl_jax.errors import InputError, QvlError
from qvl_jax.serving import heap, media, media_budget, tools
from qvl_jax.serving.metrics import Metrics
from qvl_jax.serving.protocol import (ApiError, ChatCompletionRequest, CompletionRequest, MediaURL, chat_logprobs,
                                      completion_logprobs, error_body, sse, structure, unsupported)
from qvl_jax.serving.runs import Run

log = logging.getLogger("qvl_jax.serve")

_MODEL_INPUTS = ("input_ids", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                 "mm_token_type_ids")


@dataclasses.dataclass
class ServerConfig:
    served_model_name: str = "qvl-jax"
    api_key: str | None = None
    media: media.MediaPolicy = dataclasses.field(default_factory=media.MediaPolicy)
    max_body_bytes: int = 64 << 20
    max_pending: int = 256  # engine requests (choices) admitted and not finished; more get 503
    special_tokens_in_messages: bool = False  # True: typed <|im_start|> becomes a control token (transformers)
    # tool_choice "none" renders the request's tools into the prompt all the same (vLLM's default: the
    # prompt, and so the prefix cache, does not change with tool_choice); True leaves them out (vLLM's
    # --exclude-tools-when-tool-choice-none). Either way no tool call is parsed from the answer.
    exclude_tools_when_tool_choice_none: bool = False
    # Before /health says ready: "full" compiles every engine program the common requests meet
    # (`_warm_up`), "requests" only runs a text and an image prompt, "none" (or False) nothing.
    warm_up: str | bool = "full"


# ---------------------------------------------------------------------------------------------------


class _State:
    def __init__(self, engine, processor, config: ServerConfig):
        self.engine, self.processor, self.cfg = engine, processor, config
        self.metrics = Metrics(engine)
        self.pending = 0
        self.lock = threading.Lock()
        if config.warm_up not in WARM_UP_MODES:
            raise ValueError(f"warm_up must be one of {', '.join(map(str, WARM_UP_MODES))}, got {config.warm_up!r}")
        self.ready = config.warm_up in (False, "none")
        self.warming = ""  # warm-up progress: "i/n" programs compiled
        self.closing = False
        self.vocab = engine.cfg.text.vocab_size
        self.created = int(time.time())
        self.table = TokenTable.of(processor)
        # Thinking checkpoints: their template handles <think>; answers are split into reasoning and content.
        self.reasoning = "</think>" in processor.chat_template
        self.tool_ids = tuple(processor.tokenizer.token_to_id(t) for t in (tools.OPEN, tools.CLOSE))
        self.think_close = processor.tokenizer.token_to_id("</think>")
        # The most characters one token stands for (byte-level entries: at least one byte a character).
        self.token_chars = max(1, max(map(len, processor.tokenizer.get_vocab(with_added_tokens=True))))


def _key_ok(headers: list, key: str) -> bool:
    """Whether the ASGI headers carry `Authorization: Bearer <key>` (compared in constant time)."""
    got = dict(headers).get(b"authorization", b"").decode("latin-1")
    scheme, _, token = got.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


class _Gate:
    """Pure ASGI middleware in front of every handler: with an API key, a /v1/ request without it gets
    401 before anything of its body is read or parsed; a request body over the limit gets 413 before
    any handler reads it."""

    def __init__(self, app, limit: int, state: _State, key: str | None):
        self.app, self.limit, self.state, self.key = app, limit, state, key

    async def _refuse(self, scope, receive, send, status: int, body: dict) -> None:
        self.state.metrics.refused.labels(str(status)).inc()
        await JSONResponse(body, status_code=status)(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.key is not None and scope["path"].startswith("/v1/") and not _key_ok(scope["headers"], self.key):
            return await self._refuse(scope, receive, send, 401, error_body(
                "invalid or missing API key (send Authorization: Bearer <key>)", type="authentication_error",
                code="invalid_api_key"))
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        too_big = length is not None and length.isdigit() and int(length) > self.limit
        chunks, size = [], 0
        while not too_big:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            too_big = size > self.limit
            if not msg.get("more_body"):
                break
        if too_big:
            if size >= heap.LARGE_BODY_BYTES:
                chunks = None
                heap.give_back()
            return await self._refuse(scope, receive, send, 413, error_body(
                f"request body is larger than this server's limit of {self.limit:,} bytes", code="request_too_large"))
        body, done = b"".join(chunks), False
        chunks = None

        async def replay():
            nonlocal done, body
            if not done:
                done, msg, body = True, {"type": "http.request", "body": body, "more_body": False}, None
                return msg
            return await receive()  # then the client's disconnect, when it comes

        try:
            return await self.app(scope, replay, send)
        finally:
            if size >= heap.LARGE_BODY_BYTES:  # its pieces, copies and parse are free now: give them back
                body = None
                heap.give_back()


def create_app(engine, processor, config: ServerConfig | None = None) -> FastAPI:
    """The server app over a running engine and its model's processor."""
    cfg = config or ServerConfig()
    st = _State(engine, processor, cfg)

    async def lifespan(app):
        task = None if st.ready else asyncio.create_task(asyncio.to_thread(_warm_up, st))
        try:
            yield
        finally:
            st.closing = True
            if task is not None:
                task.cancel()

    app = FastAPI(title="qvl_jax", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.qvl = st
    app.add_middleware(_Gate, limit=cfg.max_body_bytes, state=st, key=cfg.api_key)

    def refuse(status: int, body: dict, headers: dict | None = None) -> JSONResponse:
        st.metrics.refused.labels(str(status)).inc()
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return refuse(e.status, e.body(), e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        msg = err.get("msg", "invalid request")
        return refuse(400, error_body(f"{loc}: {msg}" if loc else msg, param=loc or None))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        return refuse(e.status_code, error_body(str(e.detail), type="invalid_request_error"))

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        log.exception("internal error")
        return refuse(500, error_body(f"internal error: {type(e).__name__}", type="server_error"))

    @app.get("/health")
    async def health():
        if st.closing:
            return Response(status_code=503, content="shutting down")
        return Response(status_code=200 if st.ready else 503,
                        content="ok" if st.ready else f"warming up (compiling {st.warming})")

    @app.get("/metrics")
    async def metrics():
        return Response(st.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request):
        return {"object": "list", "data": [{"id": cfg.served_model_name, "object": "model", "created": st.created,
                                            "owned_by": "qvl_jax", "max_model_len": engine.max_model_len}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request, body: ChatCompletionRequest):
        return await _serve(st, request, body, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        return await _serve(st, request, body, chat=False)

    return app


# The vision tower is compiled at start for every patch bucket up to one image of the processor's
# largest size, at most this many patches (a 1024 x 1024 image at patch size 16); larger images
# compile on first use.
WARM_UP_MAX_PATCHES = 4096
WARM_UP_MODES = ("full", "requests", "none", True, False)


def _warm_up(st: _State) -> None:
    """Before /health says ready: compiles every engine program the common requests meet
    (`Engine.warm_up`: each prefill chunk bucket and decode row count, for greedy requests, for
    requests that give no sampling fields (temperature 1) and for constrained ones (structured
    outputs, forced tool calls), and the vision tower's patch buckets up to one image of the
    processor's largest size), then runs a text and an image prompt through the whole path."""
    try:
        if st.cfg.warm_up in (True, "full"):
            ip = st.processor.image_processor
            patches = min(WARM_UP_MAX_PATCHES, ip.max_pixels // ip.patch_size ** 2)

            def progress(i, n, prog):
                st.warming = f"{i}/{n}"
                if i % 10 == 0:
                    print(f"warm-up: compiling program {i + 1} of {n} ({prog[0]})", file=sys.stderr, flush=True)

            # Greedy, and a request without sampling fields (temperature 1, as _sampling reads it).
            sampling = [{"temperature": 0.0}, {"temperature": 1.0}]
            if st.engine.model.path is not None:
                # A constrained request (response_format, structured_outputs, forced tool calls), greedy
                # or sampled, alone or batched with others: one more sampler (`SamplingParams.flags`).
                # The server's stop ids also build llguidance's tokenizer for them here.
                sampling.append({"temperature": 1.0, "structured": {"json_object": True},
                                 "stop_token_ids": sorted(st.processor.eos_token_ids)})
            secs = st.engine.warm_up(sampling=tuple(sampling), vision_patches=patches, progress=progress)
            print(f"warm-up: the engine's programs are ready ({secs:.1f} s)", file=sys.stderr, flush=True)
        img = np.full((64, 64, 3), 128, np.uint8)
        for content in ("warm up", [{"type": "image", "image": img}, {"type": "text", "text": "warm up"}]):
            inp = st.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                   tokenize=True, return_dict=True)
            st.engine.submit({k: inp[k] for k in _MODEL_INPUTS if k in inp}, max_new_tokens=2,
                             stop_token_ids=[]).result()
    except QvlError as e:
        log.warning("warm-up failed: %s", e)
    st.ready = True


# ---------------------------------------------------------------------------------------------------
# Request -> engine requests


def _media_url(x) -> str:
    return x.url if isinstance(x, MediaURL) else x


def _too_long(st: _State, chars: int, param: str) -> None:
    """Refuses text that cannot fit the context whatever it tokenizes to, before tokenizing it: a token
    covers at most `st.token_chars` characters (the longest vocabulary entry), and Unicode
    normalization (NFC) merges at most 3 characters into one (Hangul jamo), so `chars` characters are
    at least chars / (3 token_chars) tokens. (A 60 MB message was tokenized whole before the context
    check, and the process grew past 15 GB.)"""
    limit, per_token = st.engine.max_model_len, 3 * st.token_chars
    if chars > limit * per_token:
        raise ApiError(400, f"the prompt has {chars:,} characters: at least {-(-chars // per_token):,} tokens, "
                            f"more than this model's context of {limit} tokens", param=param,
                       code="context_length_exceeded")


def _chat_inputs(st: _State, req: ChatCompletionRequest) -> list[dict]:
    """Messages -> one processor output (worker thread: media loading and preprocessing). The
    request's mm_processor_kwargs are checked, and every image's and video's tokens counted from its
    header against the context (a video's pixels against the server's limit too), before any image
    or video is decoded (media_budget.py)."""
    policy = st.cfg.media
    _too_long(st, sum(len(m.content) if isinstance(m.content, str) else
                      sum(len(p.text) for p in m.content if p.type == "text") if m.content else 0
                      for m in req.messages), "messages")
    settings = media_budget.request_settings(req.mm_processor_kwargs, st.processor)
    budget = media_budget.VisionBudget(st.processor, settings, st.engine.max_model_len)

    def fetched(p):  # an image's bytes, or a video's bytes and number, counted from their headers
        if p.type == "image_url":
            return budget.image(media.fetch_bytes(_media_url(p.image_url), policy, "image"))
        data = media.fetch_bytes(_media_url(p.video_url), policy, "video")
        return data, budget.video_header(media.video_header(data, policy))

    items = iter([fetched(p) for m in req.messages if isinstance(m.content, list) for p in m.content
                  if p.type != "text"])
    msgs = []
    for m in req.messages:
        if m.content is None or isinstance(m.content, str):
            content = m.content or ""
        else:
            content = []
            for p in m.content:
                if p.type == "text":
                    content.append({"type": "text", "text": p.text})
                elif p.type == "image_url":
                    content.append({"type": "image", "image": media.decode_image(next(items), policy)})
                else:
                    data, number = next(items)
                    frames, fps = media.decode_video(data, policy)
                    budget.video(number, frames, fps)
                    content.append({"type": "video", "video": frames, **({"video_fps": fps} if fps else {})})
        msg = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.tool_calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.function.name,
                                  "arguments": c.function.arguments}} for c in m.tool_calls]
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        if m.reasoning_content is not None:
            msg["reasoning_content"] = m.reasoning_content
        msgs.append(msg)
    kw = dict(req.chat_template_kwargs or {})
    taken = sorted(set(kw) & {"messages", "tools", "documents", "add_generation_prompt", "continue_final_message",
                              "tokenize", "return_dict", "chat_template", "literal_content"})
    if taken:
        raise ApiError(400, f"chat_template_kwargs may not set {', '.join(taken)}", param="chat_template_kwargs")
    if req.tools and not (req.tool_choice == "none" and st.cfg.exclude_tools_when_tool_choice_none):
        kw["tools"] = [t.model_dump(exclude_none=True) for t in req.tools]
    try:
        inp = st.processor.apply_chat_template(
            msgs, add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
            continue_final_message=req.continue_final_message, tokenize=True, return_dict=True,
            literal_content=not st.cfg.special_tokens_in_messages, **kw, **settings)
    except InputError as e:
        raise ApiError(400, str(e)) from None
    return [{k: inp[k] for k in _MODEL_INPUTS if k in inp}]


def _completion_inputs(st: _State, req: CompletionRequest) -> list[dict]:
    prompts = req.prompt
    if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not prompts:
        raise ApiError(400, "prompt is empty", param="prompt")
    out = []
    for p in prompts:
        if isinstance(p, str):
            _too_long(st, len(p), "prompt")
        # The completions prompt is the model's raw input: special tokens in it are meant (as in vLLM).
        ids = st.processor.encode(p) if isinstance(p, str) else list(p)
        if not ids:
            raise ApiError(400, "prompt encodes to no tokens", param="prompt")
        if min(ids) < 0 or max(ids) >= st.vocab:
            raise ApiError(400, f"prompt token ids must lie in [0, {st.vocab})", param="prompt")
        out.append({"input_ids": np.asarray([ids], np.int64)})
    return out


def _sampling(st: _State, req, n_prompt: int, thinking: bool = False) -> tuple[SamplingParams, int, tuple[str, ...],
                                                                             set[int]]:
    """The request's SamplingParams (checked once, here: a bad value is a 400 naming it), its token
    budget, stop strings and stop ids. thinking: the answer starts inside a reasoning part, which a
    constraint leaves free (it applies after `</think>`)."""
    name = unsupported(req)
    if name is not None:
        raise ApiError(400, f"{name} is not supported by this server", param=name, code="unsupported_parameter")
    limit = st.engine.max_model_len
    max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens
    if n_prompt >= limit:
        raise ApiError(400, f"the prompt is {n_prompt} tokens; this model's context is {limit} tokens",
                       param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
                       code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = limit - n_prompt
    elif n_prompt + max_tokens > limit:
        raise ApiError(400, f"the prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) = {n_prompt + max_tokens} "
                       f"is more than this model's context of {limit} tokens", param="max_tokens",
                       code="context_length_exceeded")
    stops = req.stop if isinstance(req.stop, list) else [] if req.stop is None else [req.stop]
    if len(stops) > MAX_STOP_STRINGS:
        raise ApiError(400, f"stop takes at most {MAX_STOP_STRINGS} entries (strings or token ids), got {len(stops)}",
                       param="stop")
    try:
        stop_strings = check_stop([s for s in stops if isinstance(s, str)])
    except InputError as e:
        raise ApiError(400, str(e), param="stop") from None
    eos = set() if req.ignore_eos else set(st.processor.eos_token_ids)
    stop_ids = eos | {s for s in stops if isinstance(s, int)} | set(req.stop_token_ids or [])
    if stop_ids and (max(stop_ids) >= st.vocab or min(stop_ids) < 0):
        raise ApiError(400, f"stop token ids must lie in [0, {st.vocab})", param="stop_token_ids")
    temperature = 1.0 if req.temperature is None else req.temperature
    kw = {"temperature": temperature, "stop_token_ids": sorted(stop_ids)}
    for name in ("top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        if getattr(req, name) is not None:
            kw[name] = getattr(req, name)
    if req.top_k is not None and req.top_k > 0:
        kw["top_k"] = req.top_k
    if temperature > 0:
        kw["seed"] = req.seed if req.seed is not None else secrets.randbits(63)
    if isinstance(req, ChatCompletionRequest):
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
        if req.logprobs:
            kw["logprobs"] = req.top_logprobs or 0
    elif req.logprobs is not None:
        kw["logprobs"] = req.logprobs
    so = structure(req)
    if isinstance(req, ChatCompletionRequest):
        forced = tools.forced(req.tool_choice, [t.model_dump(exclude_none=True) for t in req.tools or []])
        if forced:
            if so is not None:
                raise ApiError(400, "tool_choice required or a named function cannot go with response_format or "
                                    "structured_outputs", param="tool_choice")
            so = {"grammar": tools.call_grammar(forced, *st.tool_ids, parallel=req.parallel_tool_calls,
                                                think_close=st.think_close if thinking else None)}
        elif so is not None and thinking:
            try:
                so = StructuredOutputs.of(so).after_reasoning(st.think_close)
            except InputError as e:
                raise ApiError(400, str(e), param="structured_outputs") from None
    if so is not None:
        kw["structured"] = so
    try:
        sp = SamplingParams(**kw)
    except InputError as e:
        raise ApiError(400, str(e), param="structured_outputs" if "structured" in str(e) else None) from None
    return sp, max_tokens, stop_strings, stop_ids


def _thinking(st: _State, inputs: list[dict]) -> bool:
    """Whether a chat prompt ends in an open <think> (a Thinking template's generation prompt)."""
    ids = inputs[0]["input_ids"][0, -4:].tolist()
    return st.reasoning and st.think_close is not None and \
        st.processor.decode(ids, skip_special_tokens=False).rstrip().endswith("<think>")


def _chat_output(st: _State, req, thinking: bool) -> tools.ChatOutput:
    """A choice's ChatOutput: reasoning split for Thinking templates (started: the prompt opened
    <think>), tool calls parsed when tools were given."""
    return tools.ChatOutput(reasoning=st.reasoning, started=thinking,
                            tools=bool(req.tools) and req.tool_choice != "none")


async def _serve(st: _State, request: Request, req, chat: bool):
    cfg = st.cfg
    if st.closing:
        raise ApiError(503, "the server is shutting down", type="server_error", code="server_shutting_down",
                       headers={"Retry-After": "5"})
    if req.model is not None and req.model != cfg.served_model_name:
        raise ApiError(404, f"the model {req.model!r} does not exist; this server serves {cfg.served_model_name!r}",
                       param="model", code="model_not_found")
    n_prompts = 1 if chat or isinstance(req.prompt, str) or (req.prompt and isinstance(req.prompt[0], int)) \
        else len(req.prompt)
    want = req.n * n_prompts
    if want > cfg.max_pending:  # it could never be admitted: not a matter of retrying
        raise ApiError(400, f"the request asks for {want} completions (prompts x n), more than this server "
                            f"admits at once ({cfg.max_pending}, --max-pending)", param="n")
    with st.lock:
        if st.pending + want > cfg.max_pending:
            full = True
        else:
            full, st.pending = False, st.pending + want
    if full:
        raise ApiError(503, "the server is at capacity; retry shortly", type="server_error", code="overloaded",
                       headers={"Retry-After": "1"})
    released, handed_off = False, False

    def release():
        nonlocal released
        if not released:
            released = True
            with st.lock:
                st.pending -= want

    try:
        t0 = time.perf_counter()
        inputs = await asyncio.to_thread(_chat_inputs if chat else _completion_inputs, st, req)
        n_prompt = [int(x["input_ids"].shape[1]) for x in inputs]
        handles, stop_strings, stop_ids = [], (), set()
        thinking = chat and _thinking(st, inputs)
        try:
            for inp, n in zip(inputs, n_prompt):
                sp, max_tokens, stop_strings, stop_ids = _sampling(st, req, n, thinking)
                for j in range(req.n):
                    sp_j = sp if sp.seed is None or j == 0 else dataclasses.replace(sp, seed=(sp.seed + j) % 2**64)
                    h = st.engine.submit(inp, max_new_tokens=max_tokens, sampling_params=sp_j)
                    handles.append(h)
                    if h.done():  # refused by the engine's own checks
                        h.result()
        except InputError as e:
            for h in handles:
                h.cancel()
            raise ApiError(400, str(e)) from None
        except QvlError as e:  # the engine is closed
            for h in handles:
                h.cancel()
            raise ApiError(503, str(e), type="server_error", code="server_shutting_down",
                           headers={"Retry-After": "5"}) from None
        st.metrics.waiting.inc()
        run = Run(handles, st.table, stop_strings, stop_ids, t0, st.metrics, want_logprobs=sp.logprobs is not None)
        outs = [_chat_output(st, req, thinking) for _ in run.choices] if chat else None
        meta = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, "created": int(time.time()),
                "model": cfg.served_model_name}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            gen = _stream(st, run, meta, chat, n_prompt, req.n, include_usage, release, outs)
            handed_off = True  # the stream releases its admission when it ends
            return _SSEResponse(gen, run)
        return await _complete(st, request, run, meta, chat, n_prompt, req.n, outs)
    finally:
        if not handed_off:
            release()


def _finished(st: _State, run: Run, n_prompt: list[int], per: int) -> dict:
    """Metrics at the end of a request; returns its usage object."""
    m = st.metrics
    if run.first_token:
        m.running.dec()
    else:
        m.waiting.dec()
    completion = sum(c.out.n_tokens for c in run.choices)
    cached = sum(c.result.cached_tokens for c in run.choices[::per] if c.result is not None)
    prompt = sum(n_prompt)
    m.prompt_tokens.inc(prompt)
    m.cached_tokens.inc(min(cached, prompt))
    m.latency.observe(time.perf_counter() - run.t0)
    for c in run.choices:
        m.finished.labels(c.finish or "cancelled").inc()
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _error_of(run: Run) -> ApiError | None:
    for c in run.choices:
        if c.error is not None:
            e = c.error
            return ApiError(400 if isinstance(e, InputError) else 500, str(e).splitlines()[0] if str(e) else
                            type(e).__name__, type="invalid_request_error" if isinstance(e, InputError) else "server_error")
        if c.finish == "cancelled":
            return ApiError(503, "the request was cancelled: the server is shutting down", type="server_error",
                            code="server_shutting_down", headers={"Retry-After": "5"})
    return None


async def _watch(request: Request, run: Run) -> None:
    while True:
        await asyncio.sleep(0.2)
        if await request.is_disconnected():
            run.cancel()
            return


def _finish_reason(c, out) -> str | None:
    """A chat choice's finish reason: tool_calls when it ended (not cut) after calls."""
    return "tool_calls" if out is not None and out.calls and c.finish == "stop" else c.finish


async def _complete(st, request, run: Run, meta, chat, n_prompt, per, outs=None):
    watcher = asyncio.create_task(_watch(request, run))
    try:
        async for _ in run.events():
            pass
    finally:
        watcher.cancel()
        run.cancel()
    usage = _finished(st, run, n_prompt, per)
    err = _error_of(run)
    if err is not None:
        raise err
    want_lp, token_bytes = run.want_logprobs, st.processor.token_bytes
    if chat:
        for c, o in zip(run.choices, outs):
            o.feed(c.out.text)
            o.finish()
        choices = [{"index": i, "message": o.message(), "finish_reason": _finish_reason(c, o),
                    "logprobs": chat_logprobs(token_bytes, c.logprobs) if want_lp else None}
                   for i, (c, o) in enumerate(zip(run.choices, outs))]
        return {**meta, "object": "chat.completion", "choices": choices, "usage": usage}
    choices = [{"index": i, "text": c.out.text, "finish_reason": c.finish,
                "logprobs": completion_logprobs(token_bytes, c.logprobs, 0) if want_lp else None}
               for i, c in enumerate(run.choices)]
    return {**meta, "object": "text_completion", "choices": choices, "usage": usage}


class _SSEResponse(StreamingResponse):
    """An SSE stream whose engine requests are cancelled as soon as the client disconnects (even
    while nothing is being sent), and whose generator is closed when the response ends either way:
    under ASGI 2.4 starlette only notices a disconnect when a send fails, and leaves the generator
    to the garbage collector."""

    def __init__(self, gen, run: Run):
        super().__init__(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.run = run

    async def __call__(self, scope, receive, send):
        async def listen():
            while (await receive())["type"] != "http.disconnect":
                pass
            self.run.cancel()

        listener = asyncio.create_task(listen())
        try:
            await super().__call__(scope, receive, send)
        finally:
            listener.cancel()
            await self.body_iterator.aclose()


async def _stream(st, run: Run, meta, chat, n_prompt, per, include_usage, release, outs=None):
    obj = "chat.completion.chunk" if chat else "text_completion"
    extra = {"usage": None} if include_usage else {}

    offsets = [0] * len(run.choices)  # text offset of each choice's next token (completions logprobs)

    def chunk(i, delta, finish, first=False, lps=(), d=None):
        lp = None
        if run.want_logprobs and not first:
            if chat:
                lp = chat_logprobs(st.processor.token_bytes, lps)
            else:
                lp = completion_logprobs(st.processor.token_bytes, lps, offsets[i])
                offsets[i] += sum(map(len, lp["tokens"]))
        if chat:
            if d is None:
                d = {"role": "assistant", "content": delta} if first else ({"content": delta} if delta else {})
            choice = {"index": i, "delta": d, "finish_reason": finish, "logprobs": lp}
        else:
            choice = {"index": i, "text": delta, "finish_reason": finish, "logprobs": lp}
        return sse({**meta, "object": obj, "choices": [choice], **extra})

    done = False
    try:
        if chat:
            for i in range(len(run.choices)):
                yield chunk(i, "", None, first=True)
        async for i, delta, finish, lps in run.events():
            if finish in ("error", "cancelled"):
                continue
            if chat:  # reasoning, content and tool-call deltas, then the finish on its own
                ds = outs[i].feed(delta) + (outs[i].finish() if finish else [])
                for k, d in enumerate(ds):
                    yield chunk(i, "", None, lps=lps if k == 0 else (), d=d)
                if finish or (lps and not ds):
                    yield chunk(i, "", _finish_reason(run.choices[i], outs[i]) if finish else None,
                                lps=lps if not ds else (), d={})
            elif delta or finish or lps:
                yield chunk(i, delta, finish, lps=lps)
        usage = _finished(st, run, n_prompt, per)
        done = True
        err = _error_of(run)
        if err is not None:
            yield sse(err.body())
        elif include_usage:
            yield sse({**meta, "object": obj, "choices": [], "usage": usage})
        yield "data: [DONE]\n\n"
    finally:
        # A client that went away lands here (the task is cancelled): its engine requests stop too.
        run.cancel()
        if not done:
            m = st.metrics
            (m.running if run.first_token else m.waiting).dec()
            for c in run.choices:
                m.finished.labels("cancelled").inc()
        release()
