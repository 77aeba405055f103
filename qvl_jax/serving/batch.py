"""`qvl-jax batch IN.jsonl OUT.jsonl`: OpenAI batch files run through the engine.

Input: OpenAI's batch input format, one request a line:
    {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}
(`/v1/completions` bodies too). Output: OpenAI's batch output format, one result a line, in the
order results finish:
    {"id": "batch_req_...", "custom_id": "r1", "response": {"status_code": 200, "request_id": "...",
     "body": <chat.completion>}, "error": null}
A body the server refuses keeps its status code and OpenAI error object under `response`, and
`error` holds its code and message. A line that is not a request (not JSON, an unknown key, a
wrong method or url, a repeated custom_id) gets `"response": null` and an `error` whose `line`
names it; its `custom_id` is the line's when it could be read, else null.

Every body goes through the server's own app in this process (serving/app.py, over an in-process
ASGI transport, no socket): the same validation, media policy, sampling and response building as
`qvl-jax serve`, so a batch result equals what the server answers for the same body. Up to
`concurrency` requests are in flight at once, keeping the engine's slots full.

Resumable: each result is appended as one whole line, flushed and fsynced before the next is
written. A rerun reads OUT first, cuts off a partial last line (a kill mid-write: the start of a
result line; an OUT holding anything else is refused and left as it is), and skips every
request whose custom_id already has a result and every bad line whose line number has one;
requests in flight at the kill have no result yet and run again. So OUT never holds an id twice
and, after a rerun to the end, holds every line of IN once.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import sys
import time
import uuid
from pathlib import Path

import httpx

from qvl_jax.errors import InputError

URLS = ("/v1/chat/completions", "/v1/completions")
_KEYS = ("custom_id", "method", "url", "body")
_LINE_START = b'{"id":"batch_req_'


class _BadLine(Exception):
    def __init__(self, message: str, custom_id: str | None = None):
        super().__init__(message)
        self.custom_id = custom_id


def _parse(raw: bytes, n: int) -> dict:
    """One input line -> the request; _BadLine says why it is not one."""
    try:
        line = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise _BadLine(f"line {n} is not valid JSON: {' '.join(str(e).split())[:200]}") from None
    if not isinstance(line, dict):
        raise _BadLine(f"line {n} must be a JSON object with {', '.join(_KEYS)}, got {type(line).__name__}")
    cid = line.get("custom_id")
    if not isinstance(cid, str) or not cid:
        raise _BadLine(f"line {n}: custom_id must be a non-empty string, got {cid!r}")
    unknown = [k for k in line if k not in _KEYS]
    if unknown:
        raise _BadLine(f"line {n}: unknown field {unknown[0]!r}; a batch line has {', '.join(_KEYS)}", cid)
    if line.get("method", "POST") != "POST":
        raise _BadLine(f"line {n}: method must be POST, got {line.get('method')!r}", cid)
    if line.get("url") not in URLS:
        raise _BadLine(f"line {n}: url must be one of {', '.join(URLS)}, got {line.get('url')!r}", cid)
    body = line.get("body")
    if not isinstance(body, dict):
        raise _BadLine(f"line {n}: body must be a JSON object (the request body), got {type(body).__name__}", cid)
    if body.get("stream"):
        raise _BadLine(f"line {n}: stream is not supported in a batch (each result is one whole response)", cid)
    return line


class ResultFile:
    """OUT: the results already there (read at open, a partial last line cut off), and appends of
    one whole line each, flushed and fsynced."""

    def __init__(self, path: Path):
        self.path = path
        self.done_ids: set[str] = set()
        self.done_lines: set[int] = set()  # input lines that were not requests (keyed by line number)
        self.repaired = 0  # bytes of a partial last line cut off
        self.f = open(path, "a+b")
        try:  # one run at a time: two appending to one OUT could each run an id
            fcntl.flock(self.f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._read()
        except BaseException as e:
            self.f.close()
            if isinstance(e, BlockingIOError):
                raise InputError(f"{path} is being written by another qvl-jax batch run") from None
            raise

    def _read(self) -> None:
        self.f.seek(0)
        data = self.f.read()
        end = data.rfind(b"\n") + 1
        tail = data[end:]
        # What a kill mid-write leaves: the start of one of our lines (written compact, "id" first).
        if tail and not (tail.startswith(_LINE_START) or _LINE_START.startswith(tail)):
            raise self._not_results(data.count(b"\n") + 1)
        for n, raw in enumerate(data[:end].splitlines(), 1):
            if not raw.strip():
                continue
            try:
                res = json.loads(raw)
            except ValueError:
                res = None
            if not isinstance(res, dict) or "custom_id" not in res:
                raise self._not_results(n)
            if res["custom_id"] is not None:
                self.done_ids.add(str(res["custom_id"]))
            if isinstance(res.get("error"), dict) and isinstance(res["error"].get("line"), int):
                self.done_lines.add(res["error"]["line"])
        if tail:  # checked above: a partial result line, never anything of the user's
            self.repaired = len(tail)
            self.f.truncate(end)
            os.fsync(self.f.fileno())

    def _not_results(self, n: int) -> InputError:
        return InputError(f"{self.path} line {n} is not a batch result; OUT must be a results file of an earlier "
                          "run of this batch (or absent)")

    def write(self, result: dict) -> None:
        # ASCII JSON: any str (a lone surrogate from a \ud800 escape in the input too) can be written
        self.f.write((json.dumps(result, separators=(",", ":")) + "\n").encode("ascii"))
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


def _error_result(custom_id: str | None, message: str, code: str, line: int | None = None) -> dict:
    err = {"code": code, "message": message}
    if line is not None:
        err["line"] = line
    return {"id": "batch_req_" + uuid.uuid4().hex, "custom_id": custom_id, "response": None, "error": err}


def _http_result(custom_id: str, status: int, body) -> dict:
    request_id = body.get("id") if status == 200 and isinstance(body, dict) else None
    result = {"id": "batch_req_" + uuid.uuid4().hex, "custom_id": custom_id,
              "response": {"status_code": status, "request_id": request_id or uuid.uuid4().hex, "body": body},
              "error": None}
    if status != 200:
        err = body.get("error") if isinstance(body, dict) else None
        err = err if isinstance(err, dict) else {}
        result["error"] = {"code": err.get("code") or err.get("type") or f"http_{status}",
                           "message": err.get("message") or f"HTTP {status}"}
    return result


class _Progress:
    """Counts on stderr: a tqdm bar on a terminal; in a log, a plain line every `every` seconds and
    one at the end (no carriage returns)."""

    def __init__(self, total: int, enabled: bool = True, every: float = 10.0):
        self.total, self.enabled, self.every = total, enabled, every
        self.done = self.failed = 0
        self.t0 = self.last = time.monotonic()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm  # lazy, as the CLI's other bars

            self.bar = tqdm(total=total, file=sys.stderr, unit="req", dynamic_ncols=True)

    def update(self, failed: bool) -> None:
        self.done += 1
        self.failed += failed
        if self.bar is not None:
            if failed:
                self.bar.set_postfix(failed=self.failed, refresh=False)
            self.bar.update(1)
        elif self.enabled and time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            self._line()

    def _line(self) -> None:
        rate = self.done / max(time.monotonic() - self.t0, 1e-9)
        print(f"batch: {self.done}/{self.total} lines done ({self.failed} failed), {rate:.1f}/s",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            self._line()


def _count_lines(path: Path) -> int:
    n = 0
    with open(path, "rb") as f:
        for raw in f:
            n += bool(raw.strip())
    return n


async def run_batch(app, in_path, out_path, *, concurrency: int = 32, progress: bool = True) -> dict:
    """Runs every request of IN not yet in OUT through `app` (the server's ASGI app), appending
    results to OUT. Returns counts: total, skipped (already in OUT), ok, failed, repaired_bytes."""
    in_path, out_path = Path(in_path), Path(out_path)
    if not in_path.is_file():
        raise InputError(f"no such batch input file: {in_path}")
    if out_path.exists() and (not out_path.is_file() or out_path.resolve() == in_path.resolve()):
        raise InputError(f"{out_path} is not a results file (it is the input, or not a regular file)")
    if concurrency < 1:
        raise InputError(f"concurrency must be at least 1, got {concurrency}")
    total = _count_lines(in_path)
    out = ResultFile(out_path)
    counts = {"total": total, "skipped": 0, "ok": 0, "failed": 0, "repaired_bytes": out.repaired}
    bar = _Progress(total, progress)
    slots = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task] = set()
    first_line: dict[str, int] = {}

    def record(result: dict) -> None:
        out.write(result)
        failed = result["error"] is not None
        counts["failed" if failed else "ok"] += 1
        bar.update(failed)

    async def one(client: httpx.AsyncClient, line: dict) -> None:
        try:
            try:
                r = await client.post(line["url"], json=line["body"])
            except Exception as e:  # the transport's own failure: this request's result, not the batch's end
                record(_error_result(line["custom_id"], f"internal error: {type(e).__name__}", "internal_error"))
                return
            try:
                body = r.json()
            except ValueError:
                body = {"error": {"message": r.text[:200] or f"HTTP {r.status_code}", "type": "server_error"}}
            record(_http_result(line["custom_id"], r.status_code, body))
        finally:
            slots.release()

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://batch", timeout=None) as client:
            with open(in_path, "rb") as f:
                for n, raw in enumerate(f, 1):
                    if not raw.strip():
                        continue
                    try:
                        line = _parse(raw, n)
                        cid = line["custom_id"]
                        if cid in first_line:
                            raise _BadLine(f"line {n}: custom_id {cid!r} repeats line {first_line[cid]}'s")
                        first_line[cid] = n
                    except _BadLine as e:
                        # Keyed by its line number; it keeps its custom_id unless an earlier line has it.
                        cid = e.custom_id if e.custom_id not in first_line else None
                        if cid is not None:
                            first_line[cid] = n
                        if n in out.done_lines:
                            counts["skipped"] += 1
                            bar.update(False)
                        else:
                            record(_error_result(cid, str(e), "invalid_line", n))
                        continue
                    if cid in out.done_ids:
                        counts["skipped"] += 1
                        bar.update(False)
                        continue
                    await slots.acquire()
                    task = asyncio.create_task(one(client, line))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        bar.close()
        out.close()
    return counts


def run(args) -> int:
    """The `qvl-jax batch` command: load the model, start the engine, run the file, close."""
    import qvl_jax
    from qvl_jax.hub import resolve_model
    from qvl_jax.processing.processor import Processor
    from qvl_jax.serving import media
    from qvl_jax.serving.app import ServerConfig, create_app

    in_path, out_path = Path(args.input), Path(args.output)
    if not in_path.is_file():
        raise InputError(f"no such batch input file: {in_path}")
    if args.concurrency is not None and args.concurrency < 1:
        raise InputError(f"--concurrency must be at least 1, got {args.concurrency}")
    policy = media.MediaPolicy(allowed_local_path=media.allowed_dir(args.allowed_local_media_path),
                               allow_remote=args.allow_remote_media, max_bytes=args.max_media_bytes,
                               timeout_s=args.media_timeout)
    model_dir = resolve_model(args.model)
    processor = Processor.from_pretrained(model_dir)
    model = qvl_jax.load(model_dir, dtype=args.dtype, attention=args.attention)
    engine = model.engine(max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len, processor=processor)
    concurrency = args.concurrency if args.concurrency is not None else 2 * engine.max_num_seqs
    # n <= 16 choices a request: the app never answers "at capacity" to this many requests in flight.
    config = ServerConfig(served_model_name=args.served_model_name or (args.model or "tiny-random"), media=policy,
                          max_body_bytes=1 << 62, max_pending=16 * concurrency,
                          special_tokens_in_messages=args.special_tokens_in_messages, warm_up=False)
    app = create_app(engine, processor, config)
    t0 = time.perf_counter()
    try:
        counts = asyncio.run(run_batch(app, in_path, out_path, concurrency=concurrency,
                                       progress=not args.no_progress))
    finally:
        engine.close()
    counts["seconds"] = round(time.perf_counter() - t0, 3)
    print(json.dumps(counts), file=sys.stderr)
    return 0
