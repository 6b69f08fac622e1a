"""Judge backend for any OpenAI-compatible chat-completions endpoint (``vllm serve Qwen/Qwen3-VL-8B-Instruct``).

Images travel as base64 PNG data URLs, downscaled on the client to ``image_max_side`` (vLLM ignores Qwen3-VL's
``max_pixels`` in recent releases, see docs/reward-service.md). Non-thinking mode asks for one token with
``logprobs``/``top_logprobs`` and reads the candidate digits among the first token's top-k (a digit outside the
top-k has probability 0 as far as we know; ``--max-logprobs`` on the server caps k).

One ``AsyncOpenAI`` client lives on a private event-loop thread, so ``score`` can be called from any thread,
including from inside another event loop. Requests run concurrently up to ``max_concurrency``; connection
errors, timeouts, 429 and 5xx are retried ``max_retries`` times with exponential backoff and jitter; other
errors (400, 404, ...) fail that prompt only. A failed prompt is reported, never scored.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
from collections.abc import Coroutine, Sequence
from typing import Any

from mtflow.reward.backends import CandidateLogprobs, Generation, JudgeBackend, logsumexp
from mtflow.reward.prompts import JudgePrompt
from mtflow.reward.wire import image_data_url


class _LoopThread:
    """An asyncio event loop running forever on a daemon thread."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


class OpenAIBackend(JudgeBackend):
    """Judge served behind an OpenAI-compatible ``/v1/chat/completions`` endpoint."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str = "EMPTY",
        api_key_env: str | None = None,
        max_concurrency: int = 32,
        timeout_s: float = 120.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        backoff_max_s: float = 8.0,
        image_max_side: int | None = 1024,
        top_logprobs: int = 20,
        temperature: float = 0.0,
        extra_body: dict[str, Any] | None = None,
        seed: int | None = None,
    ) -> None:
        """
        Args:
            base_url: endpoint root including ``/v1`` (e.g. ``http://judge-host:8000/v1``).
            model: model name the server serves (``Qwen/Qwen3-VL-8B-Instruct``).
            api_key: bearer key (vLLM's ``--api-key``); ``EMPTY`` when the server has none.
            api_key_env: read the key from this environment variable instead (keeps it out of configs).
            max_concurrency: requests in flight at once.
            timeout_s: per-request timeout in seconds.
            max_retries: retries of a request after a connection error, timeout, 429 or 5xx.
            backoff_s: first retry delay in seconds; doubles per retry (with jitter).
            backoff_max_s: cap on one retry delay in seconds.
            image_max_side: downscale images so that their longer side is at most this before sending.
            top_logprobs: how many first-token alternatives to request (<= the server's ``--max-logprobs``).
            temperature: sampling temperature of thinking-mode answers (0 = greedy).
            extra_body: extra request fields passed through (e.g. ``{"mm_processor_kwargs": {...}}``).
            seed: seed of the retry jitter.
        """
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if api_key_env is not None:
            if api_key_env not in os.environ:
                raise ValueError(
                    f"OpenAIBackend: environment variable {api_key_env!r} (api_key_env) is not set"
                )
            api_key = os.environ[api_key_env]
        self.base_url = base_url.rstrip("/")
        self.model = model
        self._api_key = api_key
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.image_max_side = image_max_side
        self.top_logprobs = top_logprobs
        self.temperature = temperature
        self.extra_body = dict(extra_body or {})
        self._random = random.Random(seed)
        self._runner: _LoopThread | None = None
        self._client = None
        self._semaphore: asyncio.Semaphore | None = None
        self._lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        return {"backend": "openai", "model": self.model, "base_url": self.base_url}

    def _ensure_started(self) -> _LoopThread:
        with self._lock:
            if self._runner is None:
                import openai

                runner = _LoopThread(f"openai-judge-{self.base_url}")

                async def make_client():
                    # Retries are ours (bounded, logged in the error); the SDK's would hide them.
                    self._semaphore = asyncio.Semaphore(self.max_concurrency)
                    return openai.AsyncOpenAI(
                        base_url=self.base_url, api_key=self._api_key, timeout=self.timeout_s, max_retries=0
                    )

                self._client = runner.run(make_client())
                self._runner = runner
            return self._runner

    def close(self) -> None:
        with self._lock:
            if self._runner is not None:
                if self._client is not None:
                    self._runner.run(self._client.close())
                self._runner.stop()
                self._runner = None
                self._client = None

    def to_messages(self, prompt: JudgePrompt, encoded: dict[int, str]) -> list[dict[str, Any]]:
        """OpenAI chat messages for ``prompt``; ``encoded`` caches data URLs by image identity within one call."""
        content = []
        for part in prompt.content:
            if isinstance(part, str):
                content.append({"type": "text", "text": part})
            else:
                if id(part) not in encoded:
                    encoded[id(part)] = image_data_url(part, self.image_max_side)
                content.append({"type": "image_url", "image_url": {"url": encoded[id(part)]}})
        return [{"role": "system", "content": prompt.system}, {"role": "user", "content": content}]

    def _retry_delay(self, attempt: int) -> float:
        return min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1)) * self._random.uniform(0.5, 1.0)

    async def _create(self, messages: list[dict[str, Any]], **kwargs: Any):
        import openai

        retryable = (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError)
        attempt = 0
        while True:
            try:
                assert self._semaphore is not None and self._client is not None
                async with self._semaphore:
                    return await self._client.chat.completions.create(
                        model=self.model, messages=messages, extra_body=self.extra_body or None, **kwargs
                    )
            except retryable:
                attempt += 1
                if attempt > self.max_retries:
                    raise
                await asyncio.sleep(self._retry_delay(attempt))

    def _describe_error(self, exc: BaseException) -> str:
        return f"POST {self.base_url}/chat/completions ({self.model}): {type(exc).__name__}: {exc}"

    async def _gather(self, coroutines: list[Coroutine]) -> list[Any]:
        return await asyncio.gather(*coroutines, return_exceptions=True)

    def generate(self, prompts: Sequence[JudgePrompt], max_new_tokens: int) -> list[Generation]:
        runner = self._ensure_started()
        encoded: dict[int, str] = {}
        calls = [
            self._create(
                self.to_messages(p, encoded), max_tokens=max_new_tokens, temperature=self.temperature
            )
            for p in prompts
        ]
        results = []
        for response in runner.run(self._gather(calls)):
            if isinstance(response, BaseException):
                results.append(Generation(None, self._describe_error(response)))
                continue
            text = response.choices[0].message.content if response.choices else None
            results.append(Generation(text, None if text is not None else "empty completion"))
        return results

    def first_token_logprobs(
        self, prompts: Sequence[JudgePrompt], candidates: Sequence[str]
    ) -> list[CandidateLogprobs]:
        runner = self._ensure_started()
        encoded: dict[int, str] = {}
        calls = [
            self._create(
                self.to_messages(p, encoded),
                max_tokens=1,
                temperature=0.0,
                logprobs=True,
                top_logprobs=self.top_logprobs,
            )
            for p in prompts
        ]
        results = []
        for response in runner.run(self._gather(calls)):
            if isinstance(response, BaseException):
                results.append(CandidateLogprobs(None, self._describe_error(response)))
                continue
            results.append(self._read_first_token(response, candidates))
        return results

    def _read_first_token(self, response: Any, candidates: Sequence[str]) -> CandidateLogprobs:
        try:
            first = response.choices[0].logprobs.content[0]
        except (AttributeError, IndexError, TypeError):
            return CandidateLogprobs(None, f"{self.base_url}: response carries no first-token logprobs")
        alternatives = list(first.top_logprobs or [])
        if not any(alt.token == first.token for alt in alternatives):
            alternatives.append(first)
        # " 3" and "3" are different tokens that mean the same answer: add their probabilities.
        logprobs = [
            logsumexp([alt.logprob for alt in alternatives if alt.token.strip() == candidate])
            for candidate in candidates
        ]
        return CandidateLogprobs(logprobs)
