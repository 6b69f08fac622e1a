"""Judge backend for OpenAI-compatible chat-completions endpoints (``vllm serve Qwen/Qwen3-VL-8B-Instruct``).

Images travel as base64 PNG data URLs, downscaled on the client to ``image_max_side`` (vLLM ignores Qwen3-VL's
``max_pixels`` in recent releases, see docs/reward-service.md). Non-thinking mode asks for one token with
``logprobs``/``top_logprobs`` and reads the candidate digits among the first token's top-k (a digit outside the
top-k has probability 0 as far as we know; ``--max-logprobs`` on the server caps k).

One ``AsyncOpenAI`` client per endpoint lives on a private event-loop thread, so ``generate`` can be called from
any thread, including from inside another event loop. Prompts run concurrently up to ``max_concurrency``, spread
over the endpoints that are up (``mtflow.reward.endpoints``): an endpoint that fails a prompt (connection error,
timeout, 429 or 5xx after the openai client's own retries, which honour Retry-After) rests, and the prompt goes
to another endpoint. The whole call is bounded by ``deadline_s``; a prompt without an answer by then fails.
Other errors (400, 404, ...) fail that prompt only. A failed prompt is reported, never scored.

The API key is optional: without ``api_key`` (or with ``api_key_env`` naming an unset variable) no
``Authorization`` header is sent, as ``vllm serve`` without ``--api-key`` expects; a 401 then says so.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Coroutine, Sequence
from typing import Any

import openai  # at import, not in the first call: importing it can take seconds, which no deadline should pay

from mtflow.reward.backends import CandidateLogprobs, Generation, JudgeBackend, logsumexp
from mtflow.reward.endpoints import EndpointPool, LoopThread, as_url_list
from mtflow.reward.prompts import JudgePrompt
from mtflow.reward.wire import image_data_url


class _PromptFailed(Exception):
    """Internal: one prompt failed for good (message names the endpoints and causes)."""


class OpenAIBackend(JudgeBackend):
    """Judge served behind one or several OpenAI-compatible ``/v1/chat/completions`` endpoints."""

    def __init__(
        self,
        base_url: str | list[str],
        model: str,
        api_key: str | None = None,
        api_key_env: str | None = None,
        max_concurrency: int = 32,
        timeout_s: float = 120.0,
        deadline_s: float = 900.0,
        max_retries: int = 3,
        failover_rest_s: float = 5.0,
        image_max_side: int | None = 1024,
        top_logprobs: int = 20,
        temperature: float = 0.0,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        """
        Args:
            base_url: endpoint root including ``/v1`` (``http://judge-host:8001/v1``), or a list of equivalent ones.
            model: model name the servers serve (``Qwen/Qwen3-VL-8B-Instruct``).
            api_key: bearer key (vLLM's ``--api-key``); None sends no Authorization header.
            api_key_env: read the key from this environment variable; when it is unset, no key is sent.
            max_concurrency: requests in flight at once, over all endpoints.
            timeout_s: the openai client's timeout of one attempt, in seconds.
            deadline_s: wall-time bound of one backend call (all its prompts, retries included), in seconds.
            max_retries: the openai client's retries of one request on one endpoint (429 / 5xx / connection).
            failover_rest_s: how long an endpoint that failed a prompt is skipped first (doubling, up to 60 s).
            image_max_side: downscale images so that their longer side is at most this before sending.
            top_logprobs: how many first-token alternatives to request (<= the server's ``--max-logprobs``).
            temperature: sampling temperature of thinking-mode answers (0 = greedy).
            extra_body: extra request fields passed through (e.g. ``{"mm_processor_kwargs": {...}}``).
        """
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.key_source = "api_key" if api_key else None
        if api_key_env is not None and os.environ.get(api_key_env):
            api_key = os.environ[api_key_env]
            self.key_source = f"${api_key_env}"
        self.api_key_env = api_key_env
        self.base_urls = as_url_list(base_url, "OpenAIBackend")
        self.base_url = self.base_urls[0] if len(self.base_urls) == 1 else ", ".join(self.base_urls)
        self.model = model
        self._api_key = api_key or None
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.deadline_s = deadline_s
        self.max_retries = max_retries
        self.image_max_side = image_max_side
        self.top_logprobs = top_logprobs
        self.temperature = temperature
        self.extra_body = dict(extra_body or {})
        self.pool = EndpointPool(self.base_urls, failover_rest_s, 60.0)
        self._runner: LoopThread | None = None
        self._clients: dict[str, Any] = {}
        self._semaphore: asyncio.Semaphore | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # a copy gets its own loop and clients
        state = dict(self.__dict__)
        state.update(_runner=None, _clients={}, _semaphore=None, _lock=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        return {"backend": "openai", "model": self.model, "base_url": self.base_url}

    def _ensure_started(self) -> LoopThread:
        with self._lock:
            if self._runner is None:
                runner = LoopThread("openai-judge")

                async def make_clients() -> dict[str, Any]:
                    self._semaphore = asyncio.Semaphore(self.max_concurrency)
                    # The client requires some key to construct; without one, every request omits the header.
                    return {
                        url: openai.AsyncOpenAI(
                            base_url=url,
                            api_key=self._api_key or "no-key",
                            timeout=self.timeout_s,
                            max_retries=self.max_retries,
                        )
                        for url in self.base_urls
                    }

                self._clients = runner.run(make_clients())
                self._runner = runner
            return self._runner

    def close(self) -> None:
        with self._lock:
            if self._runner is not None:
                for client in self._clients.values():
                    self._runner.run(client.close())
                self._runner.stop()
                self._runner = None
                self._clients = {}

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

    def _explain(self, url: str, exc: BaseException) -> str:
        where = f"POST {url}/chat/completions ({self.model})"
        if isinstance(exc, openai.AuthenticationError):
            if self._api_key is None:
                variable = f"; set {self.api_key_env}" if self.api_key_env else ""
                return f"{where}: HTTP 401: the judge requires an API key and none was sent{variable}"
            return f"{where}: HTTP 401: the judge refused the API key from {self.key_source}"
        return f"{where}: {type(exc).__name__}: {exc}"

    async def _create(self, messages: list[dict[str, Any]], deadline: float, **kwargs: Any) -> Any:
        """One prompt: an endpoint that is up, failing over to the others; raises ``_PromptFailed``."""
        assert self._semaphore is not None
        failover = (
            openai.APIConnectionError,
            openai.RateLimitError,
            openai.InternalServerError,
            asyncio.TimeoutError,
        )
        headers = {} if self._api_key else {"Authorization": openai.Omit()}
        errors: list[str] = []
        tried: set[str] = set()
        async with self._semaphore:
            # Each endpoint at most once per prompt: one that is up first; a resting one only when all rest
            # (with a single endpoint that is every time, as without failover).
            while (picked := self.pool.pick(exclude=tried)) is not None and deadline > time.monotonic():
                endpoint = picked[0]
                tried.add(endpoint.url)
                self.pool.started(endpoint)
                try:
                    response = await asyncio.wait_for(
                        self._clients[endpoint.url].chat.completions.create(
                            model=self.model,
                            messages=messages,
                            extra_body=self.extra_body or None,
                            extra_headers=headers,
                            **kwargs,
                        ),
                        deadline - time.monotonic(),
                    )
                except failover as exc:
                    if isinstance(exc, asyncio.TimeoutError):
                        message = f"POST {endpoint.url}/chat/completions: no answer within the deadline of {self.deadline_s:g} s"
                    else:
                        message = self._explain(endpoint.url, exc)
                    self.pool.finished(endpoint, message)
                    errors.append(message)
                    continue
                except Exception as exc:  # the endpoint answered: the request itself is the problem
                    self.pool.finished(endpoint, None)
                    raise _PromptFailed(self._explain(endpoint.url, exc)) from None
                self.pool.finished(endpoint, None)
                return response
        if not errors:
            errors.append(
                f"{self.base_url}: no answer within the deadline of {self.deadline_s:g} s (not sent)"
            )
        raise _PromptFailed("; ".join(errors))

    async def _gather(self, coroutines: list[Coroutine], deadline: float) -> list[Any]:
        """Every prompt's response or exception; at the deadline the unfinished ones are cancelled and reported
        at once (their cancellation finishes on the loop, after the call has returned)."""
        tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
        if not tasks:
            return []
        done, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()))
        for task in pending:
            task.cancel()
        late = _PromptFailed(f"{self.base_url}: no answer within the deadline of {self.deadline_s:g} s")
        return [(task.exception() or task.result()) if task in done else late for task in tasks]

    def _run_all(self, prompts: Sequence[JudgePrompt], **kwargs: Any) -> list[Any]:
        deadline = time.monotonic() + self.deadline_s  # starting the client (first call) counts too
        runner = self._ensure_started()
        encoded: dict[int, str] = {}
        calls = [self._create(self.to_messages(p, encoded), deadline, **kwargs) for p in prompts]
        return runner.run(self._gather(calls, deadline))

    def generate(self, prompts: Sequence[JudgePrompt], max_new_tokens: int) -> list[Generation]:
        results = []
        for response in self._run_all(prompts, max_tokens=max_new_tokens, temperature=self.temperature):
            if isinstance(response, BaseException):
                results.append(Generation(None, str(response) or type(response).__name__))
                continue
            text = response.choices[0].message.content if response.choices else None
            results.append(Generation(text, None if text is not None else "empty completion"))
        return results

    def first_token_logprobs(
        self, prompts: Sequence[JudgePrompt], candidates: Sequence[str]
    ) -> list[CandidateLogprobs]:
        results = []
        kwargs = {"max_tokens": 1, "temperature": 0.0, "logprobs": True, "top_logprobs": self.top_logprobs}
        for response in self._run_all(prompts, **kwargs):
            if isinstance(response, BaseException):
                results.append(CandidateLogprobs(None, str(response) or type(response).__name__))
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
