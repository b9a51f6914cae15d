"""Task -> prompt text -> input ids, in DeepSeek-OCR's "plain" format (no chat markup).

``infer()`` formats the conversation with the "plain" template, which reduces to the
prompt itself: ``[bos] + enc(text before <image>) + [<image>] * N + enc(text after)``,
no eos. The official prompts are below; a raw prompt must hold exactly one ``<image>``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .names import Task

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_ID = 128815
BOS_ID = 0


TASK_PROMPTS: dict[Task, str] = {
    Task.markdown: "<image>\n<|grounding|>Convert the document to markdown.",
    Task.ocr: "<image>\n<|grounding|>OCR this image.",
    Task.free: "<image>\nFree OCR.",
    Task.figure: "<image>\nParse the figure.",
    Task.describe: "<image>\nDescribe this image in detail.",
    Task.locate: "<image>\nLocate <|ref|>{ref}<|/ref|> in the image.",
}


def build_prompt(task: Task | str = Task.markdown, *, ref: str | None = None, prompt: str | None = None) -> str:
    """The prompt text for a task, or a validated raw prompt (which wins over the task)."""
    if prompt is not None:
        if prompt.count(IMAGE_TOKEN) != 1:
            raise ValueError(
                f"a raw prompt must contain exactly one {IMAGE_TOKEN} placeholder, e.g. '{IMAGE_TOKEN}\\nFree OCR.'"
            )
        return prompt.strip()
    task = Task(task)
    if task is Task.locate:
        if not ref or not ref.strip():
            raise ValueError("task 'locate' needs `ref`: the text or object to find on the page")
        return TASK_PROMPTS[task].format(ref=ref.strip())
    if ref:
        raise ValueError(f"`ref` is only used by task 'locate', not {task.value!r}")
    return TASK_PROMPTS[task]


@dataclass(frozen=True)
class PromptIds:
    """A prompt's text tokens on either side of the image: tokenized once per page, then sized to its
    visual block (before pruning, to check the room left; after, to assemble)."""

    head: tuple[int, ...]  # BOS and the text before <image>
    tail: tuple[int, ...]  # the text after it

    @property
    def image_start(self) -> int:
        """Index of the first image placeholder."""
        return len(self.head)

    def length(self, n_image_tokens: int) -> int:
        return len(self.head) + n_image_tokens + len(self.tail)

    def ids(self, n_image_tokens: int) -> list[int]:
        """Input ids with ``n_image_tokens`` placeholders."""
        return [*self.head, *[IMAGE_TOKEN_ID] * n_image_tokens, *self.tail]


def tokenize_prompt(tokenizer, prompt: str) -> PromptIds:
    """The prompt text (one ``<image>``) as ids: ``[bos] + enc(before)`` and ``enc(after)``."""
    before, after = prompt.split(IMAGE_TOKEN)
    head = (BOS_ID, *tokenizer.encode(before, add_special_tokens=False))
    return PromptIds(head, tuple(tokenizer.encode(after, add_special_tokens=False)))
