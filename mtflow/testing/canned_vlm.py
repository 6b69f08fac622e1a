"""A vision-language model with scripted answers, for tests of what mtflow does *with* an answer (parsing,
filtering, retries, resuming): a tiny random VLM only ever answers garbage.

The answer to a request is chosen by the pixels of its first image (``image_key``), so it does not depend on the
order or concurrency of requests: ``answers[key]`` is a list of answers for the 1st, 2nd, ... request with that
image (the last one repeats); an image without a script gets ``default``. Two faces, both real protocol:

- ``CannedBackend``: a ``JudgeBackend`` in process;
- ``create_canned_openai_app``: an OpenAI-compatible ``/v1/chat/completions`` server (FastAPI), for the real
  ``OpenAIBackend`` over loopback HTTP. Images arrive as base64 data URLs, as from vLLM's clients.

Both record every request's image key in ``asked`` (tests check what was, and was not, asked again).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from mtflow.reward.backends import CandidateLogprobs, Generation, JudgeBackend
from mtflow.reward.prompts import JudgePrompt
from mtflow.workflow.sources import pixel_hash

image_key = pixel_hash  # sha256 of an image's RGB pixels and size (independent of file format)


class CannedAnswers:
    """Scripted answers by image key, thread-safe, with a record of what was asked."""

    def __init__(self, answers: Mapping[str, Sequence[str]], default: str = "") -> None:
        self.answers = {k: list(v) for k, v in answers.items()}
        self.default = default
        self.asked: list[str] = []
        self._lock = threading.Lock()

    def answer(self, key: str | None) -> str:
        with self._lock:
            attempt = self.asked.count(key) if key is not None else 0
            self.asked.append(key or "")
        script = self.answers.get(key or "", [])
        if not script:
            return self.default
        return script[min(attempt, len(script) - 1)]


class CannedBackend(JudgeBackend):
    """``JudgeBackend`` answering from a ``CannedAnswers`` script."""

    def __init__(self, answers: CannedAnswers) -> None:
        self.script = answers

    def describe(self) -> dict[str, Any]:
        return {"backend": "canned", "model": "canned"}

    def generate(self, prompts: Sequence[JudgePrompt], max_new_tokens: int) -> list[Generation]:
        return [Generation(self.script.answer(image_key(p.images[0]) if p.images else None)) for p in prompts]

    def first_token_logprobs(self, prompts, candidates) -> list[CandidateLogprobs]:
        return [CandidateLogprobs(None, "canned backend: no log-probabilities") for _ in prompts]


def create_canned_openai_app(
    answers: CannedAnswers, served_model_name: str = "canned-vlm", delay_s: float = 0.0
):
    """FastAPI app speaking OpenAI's chat completions for ``answers`` (the first image of the request picks the
    answer); an unknown model name is a 404 as in vLLM. ``delay_s``: each answer takes this long (a slow model,
    so that a test can kill its client midway)."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from mtflow.reward.wire import decode_image

    app = FastAPI(title="mtflow canned VLM")

    @app.post("/v1/chat/completions")
    def chat_completions(body: dict[str, Any]) -> JSONResponse:
        if body.get("model") != served_model_name:
            return JSONResponse(
                {"error": {"message": f"The model `{body.get('model')}` does not exist.", "code": 404}}, 404
            )
        key = None
        for message in body.get("messages", []):
            for part in message.get("content") if isinstance(message.get("content"), list) else []:
                if part.get("type") == "image_url" and key is None:
                    key = image_key(decode_image(part["image_url"]["url"], "image_url"))
        time.sleep(delay_s)
        text = answers.answer(key)
        return JSONResponse(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": served_model_name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            }
        )

    return app
