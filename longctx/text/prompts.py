"""How a task is put to the model around a long document: chat template for instruct models, plain text else.

The document is read into memory once, so the prompt is cut in two around it: a *head* read before the
document (the chat template's opening and the user turn's start) and a *tail* read after it (the question
and the template's hand-over to the assistant). Both come from rendering the model's own template with a
marker where the document goes, so any chat template works, not only SmolLM2's.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError

MARKER = "\u0000LONGCTX-DOCUMENT\u0000"
# Measured on SmolLM2-135M-Instruct (docs/ask.md): asking it to say when the document does not contain the
# answer made it refuse questions the document does answer, so the default instruction does not ask that.
INSTRUCTION = "Answer the question about the document above in a few words."
# The line openings of the plain (no chat template) frame: "Document:\n...\n\nQuestion: ...\nAnswer:".
PLAIN_MARKERS = ("Question:", "Answer:", "Document:")


def chat_halves(tokenizer, system: str | None = None) -> tuple[str, str]:
    """The chat template rendered around one user message, split where the message goes (generation prompt
    included): `before + message + after` is exactly the template applied to that message."""
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError("this model's tokenizer has no chat template; use plain prompts (--no-chat)")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": MARKER}]
    framed = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if framed.count(MARKER) != 1:
        raise UsageError("the chat template does not place the user's message verbatim; use --no-chat")
    before, after = framed.split(MARKER)
    return before, after


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


@dataclass(frozen=True)
class QAFrame:
    """Text read before the document (`head`) and after it (`tail(question)`)."""

    head: str
    tail_template: str  # contains "{instruction}" and "{question}"
    chat: bool
    instruction: str = INSTRUCTION

    def tail(self, question: str) -> str:
        """The text read after the document for `question` (the instruction sits next to it: a small model
        follows what it read last)."""
        return self.tail_template.replace("{instruction}", self.instruction).replace("{question}", question)

    @property
    def stops(self) -> tuple[str, ...]:
        """Text that ends an answer: none in a chat frame (the template's end-of-turn token does); in a plain
        frame, the start of a line that opens the frame's next turn (the instruction line, "Question:",
        "Answer:", "Document:"), since a base model goes on writing question/answer pairs after its answer."""
        if self.chat:
            return ()
        first = self.instruction.strip().splitlines()[0] if self.instruction.strip() else ""
        return tuple(f"\n{marker}" for marker in ((first,) if first else ()) + PLAIN_MARKERS)


def qa_frame(tokenizer, chat: bool | None = None, instruction: str | None = None) -> QAFrame:
    """The question-answering frame; `chat` None = the chat template when the tokenizer has one."""
    chat = has_chat_template(tokenizer) if chat is None else chat
    instruction = INSTRUCTION if instruction is None else instruction.strip()
    if not chat:
        return QAFrame("Document:\n", "\n\n{instruction}\nQuestion: {question}\nAnswer:", False, instruction)
    before, after = chat_halves(tokenizer)
    return QAFrame(before + "Document:\n", "\n\n{instruction}\nQuestion: {question}" + after, True, instruction)


def check_question(question: str) -> str:
    """A question must have words; it is used stripped."""
    q = (question or "").strip()
    if not q:
        raise UsageError("the question is empty; ask something about the document")
    return q
