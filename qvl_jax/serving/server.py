"""`qvl-jax serve`: load the model, start the engine, run the app under uvicorn until SIGTERM/SIGINT.

Shutdown: uvicorn stops accepting connections and waits up to --shutdown-timeout seconds for the
requests in flight; what is still running then is cancelled (its engine requests freed), the engine
is closed, and the process exits 0.
"""

from __future__ import annotations

import signal
import sys

import uvicorn

import qvl_jax
from qvl_jax.hub import resolve_model
from qvl_jax.processing.processor import Processor
from qvl_jax.serving import media
from qvl_jax.serving.app import ServerConfig, create_app


def run(args) -> int:
    policy = media.MediaPolicy(allowed_local_path=media.allowed_dir(args.allowed_local_media_path),
                               allow_remote=args.allow_remote_media, max_bytes=args.max_media_bytes,
                               timeout_s=args.media_timeout)
    model_dir = resolve_model(args.model)  # no --model: the built-in tiny model, with a notice
    processor = Processor.from_pretrained(model_dir)
    model = qvl_jax.load(model_dir, dtype=args.dtype, attention=args.attention, verify=args.verify or None,
                         quantize=getattr(args, "quantize", None))
    engine = model.engine(max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len, processor=processor)
    name = args.served_model_name or (args.model if args.model else "tiny-random")
    config = ServerConfig(served_model_name=name, api_key=args.api_key, media=policy,
                          max_body_bytes=args.max_body_bytes,
                          max_pending=args.max_pending or 8 * engine.max_num_seqs,
                          special_tokens_in_messages=args.special_tokens_in_messages, warm_up=args.warm_up)
    app = create_app(engine, processor, config)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=args.shutdown_timeout, access_log=False))
    # uvicorn re-raises the signal it caught once it has shut down; these handlers make that a no-op,
    # so a graceful SIGTERM ends with status 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    print(f"serving {name} on http://{args.host}:{args.port}/v1 (max_num_seqs={engine.max_num_seqs}, "
          f"max_model_len={engine.max_model_len})", file=sys.stderr, flush=True)
    try:
        server.run()
    finally:
        engine.close()
    return 0
