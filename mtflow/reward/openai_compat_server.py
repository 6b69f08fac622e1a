"""A minimal OpenAI-compatible chat-completions server over a transformers vision-language model.

For tests and CPU development only (production uses ``vllm serve``, see docs/reward-service.md). It speaks the
subset of the protocol the ``OpenAIBackend`` uses, the way vLLM answers it: ``POST /v1/chat/completions`` with
text and ``image_url`` parts (base64 data URLs only), greedy decoding, ``max_tokens``/``max_completion_tokens``,
``logprobs`` + ``top_logprobs`` computed from the raw model logits, an error for an unknown model name;
``GET /v1/models``. Requests run one at a time. ``fail_first`` answers that many requests with HTTP 500 first
(for retry tests). What each request carried (image sizes and formats, parameters) is kept in
``app.state.received`` so tests can check what the client really sent.

    python -m mtflow.reward.openai_compat_server --model /tmp/tiny-qwen3vl --port 8001
"""

from __future__ import annotations

import argparse
import base64
import io
import threading
import time
import uuid
from collections import deque
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


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="folder or hub id of the model")
    parser.add_argument("--served-model-name", default=None, help="name clients use (default: --model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--max-logprobs", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    backend = TransformersBackend(args.model)
    app = create_openai_compat_app(backend, args.served_model_name or args.model, args.max_logprobs)
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
