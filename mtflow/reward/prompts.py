"""Judge prompt templates: instruction following (IF) and content consistency (CC), 1-5 rubric or binary.

A prompt is a system message plus one user message of interleaved text and images (``JudgePrompt``); backends
turn it into their own chat format. Four axes select the wording (docs/design.md section 4):

- criterion ``"if"`` (was the instruction carried out?) or ``"cc"`` (was everything else preserved?);
- style ``"multi_turn"`` (the judge sees y0, every output and every instruction of the trajectory) or
  ``"single_turn"`` (only the image before the turn, its instruction and the image after it);
- scale ``"likert"`` (integer 1-5) or ``"binary"`` (0 or 1, mapped to 1 or 5 on the shared judge scale);
- mode ``"thinking"`` (analysis in <Thought>, then <TurnkScore>X</TurnkScore> per turn, or <Score>X</Score>
  single-turn) or ``"non_thinking"`` (one prompt per turn asking for a single digit, whose first-token
  probabilities give an expected score).

In multi-turn non-thinking mode every per-turn prompt carries the whole trajectory and differs only in its last
sentence, so an OpenAI-compatible server with prefix caching (vLLM) encodes the images once per trajectory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from PIL import Image

Criterion = Literal["if", "cc"]
PromptStyle = Literal["multi_turn", "single_turn"]
Scale = Literal["likert", "binary"]
Mode = Literal["thinking", "non_thinking"]

SYSTEM_PROMPT = (
    "You are a meticulous judge of image edits. You compare images carefully and answer exactly in the "
    "requested format."
)

IF_RUBRIC = (
    "Rate how well an edit follows its instruction on this scale:\n"
    "1 (failed): the instruction was ignored or the opposite was done, or critical original content was "
    "destroyed.\n"
    "2 (minimal): only small parts of the instruction were followed; major elements are missing or wrong, or "
    "there is severe content loss or unintended change.\n"
    "3 (partial): the key elements of the instruction were followed but incompletely or inaccurately, with "
    "noticeable content loss or unintended changes.\n"
    "4 (mostly compliant): the instruction was largely carried out with minor flaws; the original content is "
    "well preserved with few unintended changes.\n"
    "5 (fully compliant): the instruction was carried out accurately and completely, and all content it does "
    "not target is perfectly preserved.\n"
)

CC_RUBRIC = (
    "Rate only how well an edit preserves the content its instruction does not target; ignore whether the "
    "requested change itself was made. Use this scale:\n"
    "1: the image was essentially redrawn; little of the content the instruction does not target survives.\n"
    "2: major unintended changes: objects, layout, identity or background changed that should not have.\n"
    "3: noticeable unintended changes to some of the content the instruction does not target.\n"
    "4: small unintended changes, such as slight shifts in colour, texture or detail.\n"
    "5: everything the instruction does not target is preserved exactly.\n"
)

IF_BINARY = (
    "Decide whether an edit follows its instruction: 1 if the instruction was carried out accurately and "
    "completely without damaging content it does not target, otherwise 0.\n"
)

CC_BINARY = (
    "Decide whether an edit preserves the content its instruction does not target (ignore whether the "
    "requested change itself was made): 1 if everything the instruction does not target is preserved, "
    "otherwise 0.\n"
)


@dataclass
class JudgePrompt:
    """One chat request to the judge.

    Attributes:
        system: the system message.
        content: the user message, text and images in reading order.
        criterion: ``"if"`` or ``"cc"``.
        turn: the 1-based turn a per-turn prompt asks about; None when the prompt asks for every turn.
    """

    system: str
    content: list[str | Image.Image]
    criterion: Criterion
    turn: int | None = None

    @property
    def images(self) -> list[Image.Image]:
        return [part for part in self.content if isinstance(part, Image.Image)]

    @property
    def text(self) -> str:
        """All text of the prompt (system and user), images left out."""
        return "\n".join([self.system] + [part for part in self.content if isinstance(part, str)])


def score_range(scale: Scale) -> tuple[int, int]:
    """Integer range the judge is asked to answer in: (1, 5) for likert, (0, 1) for binary."""
    return (1, 5) if scale == "likert" else (0, 1)


def _rubric(criterion: Criterion, scale: Scale) -> str:
    if criterion == "if":
        return IF_RUBRIC if scale == "likert" else IF_BINARY
    return CC_RUBRIC if scale == "likert" else CC_BINARY


def _answer_phrase(scale: Scale) -> str:
    return "an integer from 1 to 5" if scale == "likert" else "1 or 0"


def _what_to_judge(criterion: Criterion) -> str:
    if criterion == "if":
        return "how well the edit follows its instruction"
    return "how well the edit preserves the content its instruction does not target"


def _quote(instruction: str) -> str:
    # One line per instruction keeps the turn structure of the prompt unambiguous.
    return '"' + " ".join(instruction.split()) + '"'


def _multi_turn_context(
    source: Image.Image, outputs: Sequence[Image.Image], instructions: Sequence[str]
) -> list:
    num_turns = len(instructions)
    content: list[str | Image.Image] = [
        f"An image was edited in {num_turns} turn{'s' if num_turns > 1 else ''}; each turn edits the result of "
        "the previous turn.\nOriginal image:",
        source,
    ]
    for k, (instruction, output) in enumerate(zip(instructions, outputs), start=1):
        content += [f"\nTurn {k} instruction: {_quote(instruction)}\nImage after turn {k}:", output]
    return content


def _single_turn_context(before: Image.Image, after: Image.Image, instruction: str) -> list:
    return [
        "Image before the edit:",
        before,
        f"\nInstruction: {_quote(instruction)}\nImage after the edit:",
        after,
    ]


def multi_turn_prompt(
    criterion: Criterion,
    scale: Scale,
    source: Image.Image,
    outputs: Sequence[Image.Image],
    instructions: Sequence[str],
) -> JudgePrompt:
    """Thinking-mode prompt scoring every turn of a trajectory in one answer (<TurnkScore> tags)."""
    num_turns = len(instructions)
    tags = " ".join(f"<Turn{k}Score>X</Turn{k}Score>" for k in range(1, num_turns + 1))
    ask = (
        f"\n\n{_rubric(criterion, scale)}"
        f"For every turn k, judge {_what_to_judge(criterion)}: compare the image before turn k with the image "
        "after turn k against instruction k. Write your analysis of each turn inside <Thought></Thought>, then "
        f"give one score per turn exactly as {tags}, where X is {_answer_phrase(scale)}."
    )
    return JudgePrompt(SYSTEM_PROMPT, _multi_turn_context(source, outputs, instructions) + [ask], criterion)


def multi_turn_question_prompt(
    criterion: Criterion,
    scale: Scale,
    source: Image.Image,
    outputs: Sequence[Image.Image],
    instructions: Sequence[str],
    turn: int,
) -> JudgePrompt:
    """Non-thinking prompt: the whole trajectory, then a question about ``turn`` (1-based) answered by a digit."""
    ask = (
        f"\n\n{_rubric(criterion, scale)}"
        f"Judge turn {turn} only: {_what_to_judge(criterion)}, comparing the image before turn {turn} with the "
        f"image after turn {turn} against instruction {turn}. Answer with {_answer_phrase(scale)} as a single "
        "digit and nothing else."
    )
    context = _multi_turn_context(source, outputs, instructions)
    return JudgePrompt(SYSTEM_PROMPT, context + [ask], criterion, turn=turn)


def single_turn_prompt(
    criterion: Criterion,
    scale: Scale,
    mode: Mode,
    before: Image.Image,
    after: Image.Image,
    instruction: str,
    turn: int,
) -> JudgePrompt:
    """Prompt judging one edit in isolation; thinking mode answers <Score>X</Score>, non-thinking one digit."""
    if mode == "thinking":
        ask = (
            f"\n\n{_rubric(criterion, scale)}"
            f"Judge {_what_to_judge(criterion)}. Write your analysis inside <Thought></Thought>, then give the "
            f"score exactly as <Score>X</Score>, where X is {_answer_phrase(scale)}."
        )
    else:
        ask = (
            f"\n\n{_rubric(criterion, scale)}"
            f"Judge {_what_to_judge(criterion)}. Answer with {_answer_phrase(scale)} as a single digit and "
            "nothing else."
        )
    return JudgePrompt(
        SYSTEM_PROMPT, _single_turn_context(before, after, instruction) + [ask], criterion, turn=turn
    )


def build_prompts(
    criterion: Criterion,
    style: PromptStyle,
    scale: Scale,
    mode: Mode,
    source: Image.Image,
    outputs: Sequence[Image.Image],
    instructions: Sequence[str],
) -> list[JudgePrompt]:
    """All prompts needed to score one trajectory on one criterion.

    Returns one prompt (multi-turn thinking) or K prompts in turn order (every other combination).
    """
    if style == "multi_turn" and mode == "thinking":
        return [multi_turn_prompt(criterion, scale, source, outputs, instructions)]
    if style == "multi_turn":
        return [
            multi_turn_question_prompt(criterion, scale, source, outputs, instructions, k)
            for k in range(1, len(instructions) + 1)
        ]
    befores = [source, *outputs[:-1]]
    return [
        single_turn_prompt(criterion, scale, mode, before, after, instruction, k)
        for k, (before, after, instruction) in enumerate(zip(befores, outputs, instructions), start=1)
    ]


def all_template_texts() -> list[str]:
    """The text of every prompt variant (with placeholder instructions): a tokenizer training corpus."""
    blank = Image.new("RGB", (1, 1))
    instructions = ["add a red circle to the left", "make the sky blue", "remove the cat"]
    texts = []
    for criterion in ("if", "cc"):
        for style in ("multi_turn", "single_turn"):
            for scale in ("likert", "binary"):
                for mode in ("thinking", "non_thinking"):
                    for prompt in build_prompts(
                        criterion, style, scale, mode, blank, [blank] * 3, instructions
                    ):  # type: ignore[arg-type]
                        texts.append(prompt.text)
    return texts
