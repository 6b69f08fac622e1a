"""A minimal OpenAI-compatible chat-completions server over a transformers vision-language model.

For tests and CPU development only (production uses ``vllm serve``, see docs/reward-service.md). It speaks the
subset of the protocol the ``OpenAIBackend`` uses, the way vLLM answers it: ``POST /v1/chat/completions`` with
text and ``image_url`` parts (base64 data URLs only), greedy decoding, ``max_tokens``/``max_completion_tokens``,
``logprobs`` + ``top_logprobs`` computed from the raw model logits, an error for an unknown model name;
``GET /v1/models``. Requests run one at a time. ``fail_first`` answers that many requests with HTTP 500 first
(for retry tests). What each request carried (image sizes and formats, parameters) is kept in
``app.state.received`` so tests can check what the client really sent.

    python -m mtflow.reward.openai_compat_server --model /tmp/tiny-qwen3vl --port 8001

``--scripted`` serves ``create_scripted_openai_app`` instead: no model, a fixed latency per request and answers
taken from a hash of the request, standing in for vLLM in tests and benchmarks of the judge's plumbing:

    python -m mtflow.reward.openai_compat_server --scripted --latency-ms 50 --port 8001
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import io
import json
import math
import os
import re
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError

from mtflow.reward.backends import TransformersBackend


class _RequestError(Exception):
    def __init__(self, status: int, message: str, kind: str = "BadRequestError") -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def _decode_data_url(url: str, where: str) -> Image.Image:
    if not isinstance(url, str) or not url.startswith("data:image/"):
        raise _RequestError(400, f"{where}: only data:image/...;base64 URLs are supported")
    header, _, data = url.partition(",")
    if not header.endswith(";base64"):
        raise _RequestError(400, f"{where}: image data URL is not base64")
    try:
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        image.load()
    except (ValueError, UnidentifiedImageError, OSError) as exc:
        raise _RequestError(400, f"{where}: cannot decode image ({exc})") from exc
    return image


def _convert_messages(messages: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """OpenAI messages -> transformers chat messages (PIL images) and a record of the images received."""
    if not isinstance(messages, list) or not messages:
        raise _RequestError(400, "messages must be a non-empty list")
    converted, received = [], []
    for m, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise _RequestError(400, f"messages[{m}]: needs a role of system, user or assistant")
        content = message.get("content")
        if isinstance(content, str):
            converted.append({"role": message["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise _RequestError(400, f"messages[{m}].content must be a string or a list of parts")
        parts = []
        for p, part in enumerate(content):
            where = f"messages[{m}].content[{p}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append({"type": "text", "text": str(part.get("text", ""))})
            elif kind == "image_url":
                image = _decode_data_url((part.get("image_url") or {}).get("url"), where)
                received.append({"size": list(image.size), "format": image.format, "mode": image.mode})
                parts.append({"type": "image", "image": image.convert("RGB")})
            else:
                raise _RequestError(400, f"{where}: unsupported content part type {kind!r}")
        converted.append({"role": message["role"], "content": parts})
    return converted, received


def create_openai_compat_app(
    backend: TransformersBackend,
    served_model_name: str,
    max_logprobs: int = 20,
    fail_first: int = 0,
) -> FastAPI:
    """The FastAPI app serving ``backend``'s model under ``served_model_name``.

    Args:
        backend: a loaded ``TransformersBackend`` (its model and processor are used directly).
        served_model_name: the name clients must put in ``model``.
        max_logprobs: largest ``top_logprobs`` accepted (vLLM's ``--max-logprobs``).
        fail_first: answer this many chat requests with HTTP 500 before serving normally.
    """
    app = FastAPI(title="mtflow OpenAI-compatible test server")
    app.state.received = deque(maxlen=1000)
    lock = threading.Lock()
    failures_left = [fail_first]
    tokenizer = backend.processor.tokenizer

    def token_entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    @torch.inference_mode()
    def complete(body: dict[str, Any]) -> dict[str, Any]:
        if body.get("model") != served_model_name:
            raise _RequestError(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
        messages, images = _convert_messages(body.get("messages"))
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 16
        temperature = body.get("temperature")
        if temperature not in (None, 0, 0.0):
            raise _RequestError(400, "this test server decodes greedily only (temperature 0)")
        want_logprobs = bool(body.get("logprobs"))
        top_logprobs = int(body.get("top_logprobs") or 0)
        if top_logprobs > max_logprobs:
            raise _RequestError(400, f"top_logprobs {top_logprobs} exceeds max_logprobs {max_logprobs}")
        app.state.received.append(
            {
                "images": images,
                "max_tokens": max_tokens,
                "logprobs": want_logprobs,
                "top_logprobs": top_logprobs,
            }
        )
        text = backend.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        pil_images = [
            part["image"]
            for m in messages
            if isinstance(m["content"], list)
            for part in m["content"]
            if part["type"] == "image"
        ]
        inputs = backend.processor(text=[text], images=pil_images or None, return_tensors="pt").to(
            backend.device
        )
        with lock:
            output = backend.model.generate(
                **inputs,
                max_new_tokens=int(max_tokens),
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
        new_tokens = output.sequences[0, inputs["input_ids"].shape[1] :].tolist()
        eos = backend.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        finish = "stop" if new_tokens and new_tokens[-1] in eos_ids else "length"
        content = tokenizer.decode(new_tokens, skip_special_tokens=True)
        logprobs = None
        if want_logprobs:
            entries = []
            for token_id, logits in zip(new_tokens, output.logits):
                row = torch.log_softmax(logits[0].float(), dim=-1)
                entry = token_entry(token_id, float(row[token_id]))
                values, ids = row.topk(top_logprobs) if top_logprobs else (torch.empty(0), torch.empty(0))
                entry["top_logprobs"] = [token_entry(int(i), float(v)) for v, i in zip(values, ids)]
                entries.append(entry)
            logprobs = {"content": entries}
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": served_model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "logprobs": logprobs,
                    "finish_reason": finish,
                }
            ],
            "usage": {
                "prompt_tokens": int(inputs["input_ids"].shape[1]),
                "completion_tokens": len(new_tokens),
                "total_tokens": int(inputs["input_ids"].shape[1]) + len(new_tokens),
            },
        }

    @app.post("/v1/chat/completions")
    def chat_completions(body: dict[str, Any]) -> JSONResponse:
        if failures_left[0] > 0:
            failures_left[0] -= 1
            return _error(500, "injected failure (fail_first)", "InternalServerError")
        try:
            return JSONResponse(complete(body))
        except _RequestError as exc:
            return _error(exc.status, str(exc), exc.kind)

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": served_model_name, "object": "model", "owned_by": "mtflow"}],
        }

    @app.exception_handler(ValueError)
    async def bad_json(request: Request, exc: ValueError) -> JSONResponse:
        return _error(400, str(exc), "BadRequestError")

    return app


def _count_images(messages: Any) -> int:
    """The number of base64 PNG image parts in OpenAI chat ``messages`` (the scripted judge never decodes them)."""
    if not isinstance(messages, list) or not messages:
        raise _RequestError(400, "messages must be a non-empty list")
    count = 0
    for m, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        for p, part in enumerate(content if isinstance(content, list) else []):
            if isinstance(part, dict) and part.get("type") == "image_url":
                url = (part.get("image_url") or {}).get("url")
                if not isinstance(url, str) or not url.startswith("data:image/png;base64,"):
                    raise _RequestError(400, f"messages[{m}].content[{p}]: only PNG data URLs are supported")
                count += 1
    return count


def scripted_answer(
    messages: list[dict[str, Any]], want_logprobs: bool, top_logprobs: int
) -> tuple[str, Any]:
    """The scripted judge's answer: a function of the request's content only (text and image bytes).

    With ``logprobs``: one digit token, its top alternatives being the digits "1".."5" (90 % of the mass, split
    by the request's SHA-256) and "The" (10 %). Otherwise a thinking-mode answer with a score tag per turn the
    prompt asks for (``<TurnkScore>``), or ``<Score>``, each a digit taken from the hash.
    """
    digest = hashlib.sha256(json.dumps(messages, sort_keys=True).encode("utf-8", "surrogatepass")).digest()
    if want_logprobs:
        weights = [1.0 + digest[d] for d in range(5)]
        total = sum(weights)
        alternatives = [(str(d + 1), math.log(0.9 * w / total)) for d, w in enumerate(weights)]
        alternatives.append(("The", math.log(0.1)))
        alternatives.sort(key=lambda alt: -alt[1])
        token, logprob = alternatives[0]

        def entry(text: str, value: float) -> dict[str, Any]:
            return {"token": text, "logprob": value, "bytes": list(text.encode())}

        content = [
            {**entry(token, logprob), "top_logprobs": [entry(*alt) for alt in alternatives[:top_logprobs]]}
        ]
        return token, {"content": content}
    text = " ".join(
        part.get("text", "") if isinstance(part, dict) else str(part)
        for message in messages
        for part in (
            message.get("content") if isinstance(message.get("content"), list) else [message.get("content")]
        )
    )
    turns = sorted({int(k) for k in re.findall(r"<Turn(\d+)Score>", text)})
    digits = [1 + digest[i] % 5 for i in range(max(1, len(turns)))]
    if turns:
        tags = " ".join(f"<Turn{k}Score>{d}</Turn{k}Score>" for k, d in zip(turns, digits))
    else:
        tags = f"<Score>{digits[0]}</Score>"
    return f"<Thought>scripted judge</Thought> {tags}", None


def create_scripted_openai_app(
    served_model_name: str = "Qwen/Qwen3-VL-8B-Instruct",
    latency_s: float = 0.05,
    max_concurrent: int | None = None,
    api_key: str | None = None,
) -> FastAPI:
    """An OpenAI-compatible server that answers like a judge after a fixed latency, without a model.

    It stands in for ``vllm serve`` in tests and benchmarks: every chat request is answered after ``latency_s``
    (``scripted_answer``), up to ``max_concurrent`` at once (None: no limit), as a GPU server's batch slots would.
    With ``api_key`` it answers 401 to requests without that bearer key; without one it ignores the header.
    ``app.state.received`` records, per request, the Authorization header sent, the image count and the time;
    ``app.state.peak_concurrency`` the most requests served at once.
    """
    app = FastAPI(title="mtflow scripted OpenAI-compatible judge")
    app.state.received = deque(maxlen=100_000)
    app.state.peak_concurrency = 0
    app.state.api_key = api_key  # tests may change it while the server runs
    slots = asyncio.Semaphore(max_concurrent) if max_concurrent else None
    active = [0]

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> JSONResponse:
        authorization = request.headers.get("authorization")
        if app.state.api_key is not None and authorization != f"Bearer {app.state.api_key}":
            return _error(401, "Incorrect API key provided.", "AuthenticationError")
        try:
            body = await request.json()
            images = _count_images(body.get("messages") if isinstance(body, dict) else None)
        except _RequestError as exc:
            return _error(exc.status, str(exc), exc.kind)
        except ValueError as exc:
            return _error(400, f"invalid JSON: {exc}", "BadRequestError")
        if body.get("model") != served_model_name:
            return _error(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
        app.state.received.append({"authorization": authorization, "images": images, "time": time.time()})
        async with slots if slots is not None else contextlib.nullcontext():
            active[0] += 1
            app.state.peak_concurrency = max(app.state.peak_concurrency, active[0])
            try:
                await asyncio.sleep(latency_s)
            finally:
                active[0] -= 1
        content, logprobs = scripted_answer(
            body["messages"], bool(body.get("logprobs")), int(body.get("top_logprobs") or 0)
        )
        return JSONResponse(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": served_model_name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "logprobs": logprobs,
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        )

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": served_model_name, "object": "model", "owned_by": "mtflow"}],
        }

    @app.get("/stats")
    def stats() -> dict[str, Any]:
        """Requests received and the most served at once (what tests and benchmarks check)."""
        return {"received": len(app.state.received), "peak_concurrency": app.state.peak_concurrency}

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from mtflow.reward.server import bind_socket

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="folder or hub id of the model (not with --scripted)")
    parser.add_argument("--scripted", action="store_true", help="answer from a hash of the request, no model")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="--scripted: latency of every answer")
    parser.add_argument(
        "--max-concurrent", type=int, default=None, help="--scripted: requests served at once"
    )
    parser.add_argument("--api-key", default=None, help="--scripted: require this bearer key")
    parser.add_argument("--served-model-name", default=None, help="name clients use (default: --model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001, help="0 picks a free port (see --ready-file)")
    parser.add_argument(
        "--ready-file", default=None, help="write {host, port, pid, url} JSON here once serving"
    )
    parser.add_argument("--max-logprobs", type=int, default=20)
    args = parser.parse_args(argv)
    if args.scripted == (args.model is not None):
        parser.error("give exactly one of --model and --scripted")
    if args.scripted:
        app = create_scripted_openai_app(
            args.served_model_name or "Qwen/Qwen3-VL-8B-Instruct",
            args.latency_ms / 1000.0,
            args.max_concurrent,
            args.api_key,
        )
    else:
        torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
        backend = TransformersBackend(args.model)
        app = create_openai_compat_app(backend, args.served_model_name or args.model, args.max_logprobs)
    sock = bind_socket(args.host, args.port)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))

    def announce() -> None:
        while not server.started:
            time.sleep(0.02)
        info = {"host": args.host, "port": port, "pid": os.getpid(), "url": f"http://{args.host}:{port}/v1"}
        temporary = Path(args.ready_file + ".tmp")
        temporary.write_text(json.dumps(info))
        temporary.replace(args.ready_file)

    if args.ready_file:
        threading.Thread(target=announce, daemon=True).start()
    print(f"serving on http://{args.host}:{port}/v1", flush=True)
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
