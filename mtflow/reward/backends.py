"""Judge backends: run ``JudgePrompt``s through a vision-language model.

A backend does two things, batched over prompts:

- ``generate``: greedy text answers (thinking mode);
- ``first_token_logprobs``: log-probabilities of a few candidate answer tokens (the digits) at the first answer
  position, normalised over the whole vocabulary (non-thinking mode).

Per-prompt failures come back as results with ``error`` set, never as exceptions and never as made-up values.
``TransformersBackend`` runs ``Qwen3VLForConditionalGeneration`` in process; ``OpenAIBackend``
(``mtflow.reward.openai_backend``) talks to any OpenAI-compatible endpoint such as ``vllm serve``.
"""

from __future__ import annotations

import logging
import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from PIL import Image

from mtflow.dtypes import DTYPES
from mtflow.reward.prompts import JudgePrompt

log = logging.getLogger(__name__)


@dataclass
class Generation:
    """Greedy answer to one prompt.

    Attributes:
        text: the answer (special tokens removed); None when the backend failed on this prompt.
        error: why it failed, naming the backend.
    """

    text: str | None
    error: str | None = None


@dataclass
class CandidateLogprobs:
    """First-answer-token log-probabilities of the candidate tokens for one prompt.

    Attributes:
        logprobs: C floats, log P(first token = candidate c) under the full-vocabulary distribution; -inf for a
            candidate the backend did not report (outside an OpenAI endpoint's top-k). None when the backend
            failed on this prompt.
        error: why it failed, naming the backend.
    """

    logprobs: list[float] | None
    error: str | None = None


class JudgeBackend(ABC):
    """Runs judge prompts through a vision-language model."""

    @abstractmethod
    def generate(self, prompts: Sequence[JudgePrompt], max_new_tokens: int) -> list[Generation]:
        """Greedy answers, one per prompt, in order."""

    @abstractmethod
    def first_token_logprobs(
        self, prompts: Sequence[JudgePrompt], candidates: Sequence[str]
    ) -> list[CandidateLogprobs]:
        """Log-probabilities of ``candidates`` (single tokens, e.g. "1".."5") as the first answer token."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Facts for logs and ``/health``: at least ``backend`` and ``model``."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release connections or threads (no-op by default)."""


def to_chat_messages(prompt: JudgePrompt) -> list[dict[str, Any]]:
    """``prompt`` as transformers chat messages (images as PIL objects)."""
    user = [
        {"type": "image", "image": part} if isinstance(part, Image.Image) else {"type": "text", "text": part}
        for part in prompt.content
    ]
    return [{"role": "system", "content": prompt.system}, {"role": "user", "content": user}]


class TransformersBackend(JudgeBackend):
    """In-process Qwen3-VL (or any ``AutoModelForImageTextToText`` with a chat-template processor)."""

    def __init__(
        self,
        model: str,
        processor: str | None = None,
        device: str = "cpu",
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        max_batch_size: int = 8,
        attn_implementation: str | None = "sdpa",
        max_pixels: int | None = None,
    ) -> None:
        """
        Args:
            model: hub id or local folder of the judge model (e.g. ``Qwen/Qwen3-VL-8B-Instruct``).
            processor: hub id or folder of its processor; defaults to ``model``.
            device: torch device to run on (``cpu``, ``cuda``, ``cuda:1``).
            dtype: weight and activation dtype.
            max_batch_size: prompts per forward pass / generate call.
            attn_implementation: transformers attention implementation (``sdpa``, ``flash_attention_2``, ...).
            max_pixels: upper bound on pixels per image after the processor's resize; None keeps its setting.
        """
        from transformers import AutoModelForImageTextToText, AutoProcessor, ProcessorMixin

        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model_name = model
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_batch_size = max_batch_size
        self.processor = AutoProcessor.from_pretrained(processor or model)
        if not isinstance(self.processor, ProcessorMixin) or not hasattr(self.processor, "image_processor"):
            # AutoProcessor silently falls back to a bare tokenizer when e.g. torchvision is missing.
            raise TypeError(
                f"AutoProcessor.from_pretrained({processor or model!r}) returned {type(self.processor).__name__}, "
                "not a multimodal processor (is torchvision installed?)"
            )
        if max_pixels is not None:
            self.processor.image_processor.size = {
                "shortest_edge": self.processor.image_processor.size["shortest_edge"],
                "longest_edge": max_pixels,
            }
        self.processor.tokenizer.padding_side = "left"
        kwargs: dict[str, Any] = {"dtype": DTYPES[dtype]}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        self.model = AutoModelForImageTextToText.from_pretrained(model, **kwargs).to(self.device).eval()
        # the reward service calls scorers from several threads; one model runs one batch at a time
        self._lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "transformers",
            "model": self.model_name,
            "device": str(self.device),
            "dtype": self.dtype,
        }

    def render(self, prompt: JudgePrompt) -> str:
        """The chat-templated text of ``prompt`` with the generation prompt appended."""
        return self.processor.apply_chat_template(
            to_chat_messages(prompt), add_generation_prompt=True, tokenize=False
        )

    def encode(self, prompts: Sequence[JudgePrompt]) -> dict[str, torch.Tensor]:
        """Model inputs for ``prompts``: left-padded ``input_ids`` [P, L], ``attention_mask`` [P, L], pixels."""
        texts = [self.render(p) for p in prompts]
        images = [image.convert("RGB") for p in prompts for image in p.images]
        inputs = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}

    def candidate_token_ids(self, candidates: Sequence[str]) -> list[int]:
        """Vocabulary ids of ``candidates``; each must be exactly one token."""
        ids = []
        for candidate in candidates:
            encoded = self.processor.tokenizer.encode(candidate, add_special_tokens=False)
            if len(encoded) != 1:
                raise ValueError(
                    f"judge answer candidate {candidate!r} is {len(encoded)} tokens in {self.model_name}"
                )
            ids.append(encoded[0])
        return ids

    def _chunks(self, prompts: Sequence[JudgePrompt]):
        for start in range(0, len(prompts), self.max_batch_size):
            yield prompts[start : start + self.max_batch_size]

    def _failure(self, exc: Exception) -> str:
        return f"transformers backend ({self.model_name}): {type(exc).__name__}: {exc}"

    @torch.inference_mode()
    def first_token_logprobs(
        self, prompts: Sequence[JudgePrompt], candidates: Sequence[str]
    ) -> list[CandidateLogprobs]:
        token_ids = torch.tensor(self.candidate_token_ids(candidates), device=self.device)
        results: list[CandidateLogprobs] = []
        for chunk in self._chunks(prompts):
            try:
                inputs = self.encode(chunk)
                with self._lock:
                    logits = self.model(**inputs, logits_to_keep=1).logits[:, -1, :].float()
                logprobs = torch.log_softmax(logits, dim=-1)[:, token_ids]
                results += [CandidateLogprobs(row) for row in logprobs.cpu().tolist()]
            except Exception as exc:  # one failing chunk must not lose the others' scores
                log.warning("judge forward failed on %d prompts: %s", len(chunk), exc)
                results += [CandidateLogprobs(None, self._failure(exc)) for _ in chunk]
        return results

    @torch.inference_mode()
    def generate(self, prompts: Sequence[JudgePrompt], max_new_tokens: int) -> list[Generation]:
        results: list[Generation] = []
        for chunk in self._chunks(prompts):
            try:
                inputs = self.encode(chunk)
                with self._lock:
                    sequences = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
                new_tokens = sequences[:, inputs["input_ids"].shape[1] :]
                texts = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
                results += [Generation(text) for text in texts]
            except Exception as exc:  # one failing chunk must not lose the others' answers
                log.warning("judge generate failed on %d prompts: %s", len(chunk), exc)
                results += [Generation(None, self._failure(exc)) for _ in chunk]
        return results


def logsumexp(values: Sequence[float]) -> float:
    """log(sum(exp(values))) of plain floats; -inf for an empty or all -inf input."""
    finite = [v for v in values if v != -math.inf]
    if not finite:
        return -math.inf
    top = max(finite)
    return top + math.log(sum(math.exp(v - top) for v in finite))
