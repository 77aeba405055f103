"""`qvl-jax serve`: load the model, start the engine, run the app under uvicorn until SIGTERM/SIGINT.

Shutdown: uvicorn stops accepting connections, /health and new requests answer 503, and the requests
in flight get up to --shutdown-timeout seconds to finish; then the engine is closed, so that every
request still running or queued ends with a 503 `server_shutting_down` error object (a stream with an
error event and [DONE]) and its KV blocks are freed, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import uvicorn

import qvl_jax
from qvl_jax.engine.memory import format_size
from qvl_jax.engine.speculative import SpeculativeConfig
from qvl_jax.hub import resolve_model
from qvl_jax.processing.processor import Processor
from qvl_jax.serving import media
from qvl_jax.serving.app import ServerConfig, create_app


# After the cut, how long the cut requests have to write their error objects before uvicorn cancels
# their tasks (which answers a plain-text 500 and logs a traceback per request).
_CUT_GRACE_S = 10.0


class _Server(uvicorn.Server):
    """uvicorn's server, whose graceful shutdown first marks the app closing (new requests and /health
    get 503) and, once `cut_after` seconds have passed with requests still running, closes the engine:
    every engine request in flight or queued ends as cancelled, and its HTTP request answers a 503
    `server_shutting_down` error object (a stream: an error event, then [DONE])."""

    def __init__(self, config, engine, state, cut_after: float):
        super().__init__(config)
        self.engine, self.state, self.cut_after = engine, state, cut_after
        self._cutting = None

    def _cut(self) -> None:
        self._cutting = asyncio.get_running_loop().create_task(asyncio.to_thread(self.engine.close))

    async def shutdown(self, sockets=None) -> None:
        self.state.closing = True
        timer = asyncio.get_running_loop().call_later(self.cut_after, self._cut)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()
            if self._cutting is not None:
                await self._cutting


def run(args) -> int:
    policy = media.MediaPolicy(allowed_local_path=media.allowed_dir(args.allowed_local_media_path),
                               allow_remote=args.allow_remote_media, max_bytes=args.max_media_bytes,
                               timeout_s=args.media_timeout)
    spec = SpeculativeConfig.of(getattr(args, "speculative_config", None))  # a bad one fails before the load
    model_dir = resolve_model(args.model)  # no --model: the built-in tiny model, with a notice
    processor = Processor.from_pretrained(model_dir)
    model = qvl_jax.load(model_dir, dtype=args.dtype, attention=args.attention, verify=args.verify or None,
                         quantize=getattr(args, "quantize", None))
    engine = model.engine(max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len, processor=processor,
                          kv_cache_memory=args.kv_cache_memory, memory_fraction=args.kv_cache_memory_fraction,
                          max_num_batched_tokens=args.max_num_batched_tokens, decode_steps=args.decode_steps,
                          speculative_config=spec, packed_weights=getattr(args, "packed_weights", None))
    name = args.served_model_name or (args.model if args.model else "tiny-random")
    config = ServerConfig(served_model_name=name, api_key=args.api_key, media=policy,
                          max_body_bytes=args.max_body_bytes,
                          max_pending=args.max_pending or 8 * engine.max_num_seqs,
                          special_tokens_in_messages=args.special_tokens_in_messages, warm_up=args.warm_up,
                          exclude_tools_when_tool_choice_none=args.exclude_tools_when_tool_choice_none)
    app = create_app(engine, processor, config)
    server = _Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                    timeout_graceful_shutdown=args.shutdown_timeout + _CUT_GRACE_S, access_log=False),
                     engine, app.state.qvl, args.shutdown_timeout)
    # uvicorn re-raises the signal it caught once it has shut down; these handlers make that a no-op,
    # so a graceful SIGTERM ends with status 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    print(f"serving {name} on http://{args.host}:{args.port}/v1 (max_num_seqs={engine.max_num_seqs}, "
          f"max_model_len={engine.max_model_len})", file=sys.stderr, flush=True)
    print(f"KV cache: {engine.num_blocks} blocks x {engine.block_size} tokens = "
          f"{engine.num_blocks * engine.block_size} tokens, {engine.kv_cache_bytes} bytes "
          f"({format_size(engine.kv_cache_bytes)}; --kv-cache-memory)", file=sys.stderr, flush=True)
    if engine.packed_weights_off is None:
        print("decoder and lm_head weights packed for the CPU kernels' product (--no-packed-weights: off)",
              file=sys.stderr, flush=True)
    try:
        server.run()
    finally:
        engine.close()
    return 0
