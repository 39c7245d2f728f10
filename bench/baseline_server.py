"""A minimal OpenAI-compatible chat endpoint built the way the original ChatMed Flask service works.

    python -m bench.baseline_server --base-model PATH --adapter chatmed-consult=PATH \\
        --adapter chatmed-tcm=PATH --port 8001

One request at a time behind a global lock, transformers `generate` + peft with the adapter chosen per
request by `model`, the ChatMed prompt `<s>问：\\n{q}\\n答：\\n`, no batching. It does not stream: with
`stream: true` the whole answer arrives as one chunk at the end, so its time to first token equals
its end-to-end latency. It lives in bench/ as the yardstick, never in the product.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from bench.hf_baseline import (
    CHATMED_MAX_NEW_TOKENS,
    CHATMED_REPETITION_PENALTY,
    CHATMED_TEMPERATURE,
    CHATMED_TOP_P,
    GenerateOptions,
    PeftGenerator,
)

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024
DEFAULT_BASE_NAME = "chatmed-base"
NOTE = "baseline: one request at a time, no streaming; its TTFT equals its end-to-end latency"


class BadRequest(Exception):
    """A request the baseline refuses, with the HTTP status and OpenAI error fields to send."""

    def __init__(self, status: HTTPStatus, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


@dataclass(frozen=True)
class ChatRequest:
    """The parts of a chat completion body the baseline honours."""

    model: str
    messages: list[dict[str, str]]
    options: GenerateOptions
    stream: bool
    include_usage: bool


class BaselineService:
    """The model and its global lock: generate() runs one request at a time, like the original."""

    def __init__(self, generator: PeftGenerator, base_name: str = DEFAULT_BASE_NAME) -> None:
        self.generator = generator
        self.base_name = base_name
        self.lock = threading.Lock()

    def model_names(self) -> list[str]:
        return [self.base_name, *self.generator.adapter_names]

    def complete(self, request: ChatRequest) -> tuple[str, int, int, str]:
        """(text, prompt tokens, completion tokens, finish reason) of one request."""
        if request.model not in self.model_names():
            raise BadRequest(HTTPStatus.NOT_FOUND, "unknown model", "model", "model_not_found")
        try:
            prompt_ids = self.generator.chatmed_prompt_ids(request.messages)
        except ValueError as exc:
            raise BadRequest(HTTPStatus.BAD_REQUEST, str(exc), "messages") from exc
        if len(prompt_ids) + request.options.max_new_tokens > self.generator.max_model_len:
            raise BadRequest(HTTPStatus.BAD_REQUEST, "prompt plus max_tokens is too long", "max_tokens")
        adapter = None if request.model == self.base_name else request.model
        with self.lock:
            new_ids = self.generator.generate(prompt_ids, adapter, request.options)
        eos = self.generator.eos_token_id
        stopped = bool(new_ids) and new_ids[-1] == eos
        text_ids = new_ids[:-1] if stopped else new_ids
        text = str(self.generator.tokenizer.decode(text_ids, skip_special_tokens=True))
        return text, len(prompt_ids), len(new_ids), "stop" if stopped else "length"


def parse_chat_request(body: Any) -> ChatRequest:
    """Validate the body's shape and map OpenAI fields (plus vLLM-style extras) to GenerateOptions."""
    if not isinstance(body, dict):
        raise BadRequest(HTTPStatus.BAD_REQUEST, "body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest(HTTPStatus.BAD_REQUEST, "messages must be a non-empty list", "messages")
    parsed = [_message(message) for message in messages]
    max_tokens = _number(body, "max_completion_tokens", _number(body, "max_tokens", CHATMED_MAX_NEW_TOKENS))
    if int(max_tokens) < 1:
        raise BadRequest(HTTPStatus.BAD_REQUEST, "max_tokens must be at least 1", "max_tokens")
    min_tokens = int(max_tokens) if body.get("ignore_eos") else int(_number(body, "min_tokens", 0))
    seed = body.get("seed")
    options = GenerateOptions(
        max_new_tokens=int(max_tokens),
        min_new_tokens=min(min_tokens, int(max_tokens)),
        temperature=float(_number(body, "temperature", CHATMED_TEMPERATURE)),
        top_p=float(_number(body, "top_p", CHATMED_TOP_P)),
        repetition_penalty=float(_number(body, "repetition_penalty", CHATMED_REPETITION_PENALTY)),
        seed=seed if isinstance(seed, int) else None,
    )
    stream_options = body.get("stream_options") or {}
    return ChatRequest(
        model=str(body.get("model", "")),
        messages=parsed,
        options=options,
        stream=bool(body.get("stream", False)),
        include_usage=bool(isinstance(stream_options, dict) and stream_options.get("include_usage")),
    )


def _message(message: Any) -> dict[str, str]:
    if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
        raise BadRequest(HTTPStatus.BAD_REQUEST, "each message needs a known role", "messages")
    content = message.get("content")
    if isinstance(content, list):  # content parts: keep the text ones
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    if not isinstance(content, str):
        raise BadRequest(HTTPStatus.BAD_REQUEST, "message content must be text", "messages")
    return {"role": message["role"], "content": content}


def _number(body: dict[str, Any], name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(HTTPStatus.BAD_REQUEST, f"{name} must be a number", name)
    return value


def chat_completion(request_id: str, model: str, text: str, usage: dict[str, int], finish: str) -> dict:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
        "usage": usage,
    }


def stream_frames(
    request_id: str, model: str, text: str, usage: dict[str, int], finish: str, include_usage: bool
) -> list[bytes]:
    """The SSE frames of one answer sent whole: content chunk, finish chunk, usage chunk, [DONE]."""

    def chunk(delta: dict[str, str], finish_reason: str | None) -> dict[str, Any]:
        return {
            "id": request_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }

    payloads: list[dict[str, Any]] = [chunk({"role": "assistant", "content": text}, None), chunk({}, finish)]
    if include_usage:
        payloads.append({**chunk({}, None), "choices": [], "usage": usage})
    frames = [f"data: {json.dumps(p, ensure_ascii=False)}\n\n".encode() for p in payloads]
    return [*frames, b"data: [DONE]\n\n"]


class BaselineHandler(BaseHTTPRequestHandler):
    """HTTP routes: GET /health, GET /v1/models, POST /v1/chat/completions."""

    server: BaselineHTTPServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path == "/health":
            self._send_json(HTTPStatus.OK, {"status": "ok"})
        elif self.path == "/v1/models":
            names = self.server.service.model_names()
            data = [{"id": name, "object": "model", "owned_by": "baseline"} for name in names]
            self._send_json(HTTPStatus.OK, {"object": "list", "data": data})
        else:
            self._send_error(BadRequest(HTTPStatus.NOT_FOUND, "not found"))

    def do_POST(self) -> None:
        if self.path != "/v1/chat/completions":
            self._send_error(BadRequest(HTTPStatus.NOT_FOUND, "not found"))
            return
        try:
            request = parse_chat_request(self._read_json())
            text, num_prompt, num_output, finish = self.server.service.complete(request)
        except BadRequest as exc:
            self._send_error(exc)
            return
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        usage = {"prompt_tokens": num_prompt, "completion_tokens": num_output}
        usage["total_tokens"] = num_prompt + num_output
        if request.stream:
            frames = stream_frames(request_id, request.model, text, usage, finish, request.include_usage)
            self._send_bytes(HTTPStatus.OK, b"".join(frames), "text/event-stream")
        else:
            self._send_json(HTTPStatus.OK, chat_completion(request_id, request.model, text, usage, finish))

    def _read_json(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "body too large")
        try:
            return json.loads(self.rfile.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRequest(HTTPStatus.BAD_REQUEST, "body is not valid JSON") from exc

    def _send_error(self, error: BadRequest) -> None:
        kind = "invalid_request_error" if error.status < 500 else "server_error"
        body = {"error": {"message": error.message, "type": kind, "param": error.param, "code": error.code}}
        self._send_json(error.status, body)

    def _send_json(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
        self._send_bytes(status, json.dumps(payload, ensure_ascii=False).encode(), "application/json")

    def _send_bytes(self, status: HTTPStatus, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        # The default writes every request line to stderr; keep access logs at debug level.
        logger.debug(format, *args)


class BaselineHTTPServer(ThreadingHTTPServer):
    """Threads accept and parse requests (so 16 clients connect at once, as they would to Flask);
    the service's lock lets one of them generate at a time."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], service: BaselineService) -> None:
        super().__init__(address, BaselineHandler)
        self.service = service


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline_server", description=NOTE)
    parser.add_argument("--base-model", type=Path, required=True)
    parser.add_argument("--adapter", action="append", default=[], help="NAME=PATH, repeatable")
    parser.add_argument("--served-model-name", default=DEFAULT_BASE_NAME, help="name of the bare base")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    return parser.parse_args(argv)


def parse_adapter_flags(flags: Sequence[str]) -> list[tuple[str, Path]]:
    """`NAME=PATH` flags as (name, path) pairs."""
    pairs: list[tuple[str, Path]] = []
    for flag in flags:
        name, sep, path = flag.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--adapter expects NAME=PATH, got {flag!r}")
        pairs.append((name, Path(path)))
    return pairs


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    generator = PeftGenerator(args.base_model, parse_adapter_flags(args.adapter), args.device, args.dtype)
    service = BaselineService(generator, args.served_model_name)
    with BaselineHTTPServer((args.host, args.port), service) as server:
        logger.info("%s; serving %s on http://%s:%d", NOTE, service.model_names(), args.host, args.port)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            logger.info("stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
