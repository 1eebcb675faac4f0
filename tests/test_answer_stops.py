"""Where an answer ends: a base model (plain question/answer frame) goes on writing "Question:"/"Answer:"
lines after its answer, so the answer is cut where the frame's next turn begins, and streaming never
shows any of that marker. The model's output is forced by a scripted output layer on a tiny model."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model
from tiny_tokenizers import byte_bpe_tokenizer

from longctx.model.backbone import Backbone, ModelInfo
from longctx.tasks.qa import ask
from longctx.tasks.sampling import TextStream, held_back
from longctx.text.prompts import INSTRUCTION, qa_frame

ANSWER = " Cinnamon."
RAMBLE = "\nQuestion: What is the secret ingredient?\nAnswer: Cinnamon.\nQuestion: Why?"


class ScriptedHead(torch.nn.Module):
    """An output layer that ignores the hidden state: its n-th call makes the n-th token of `script` the most
    likely one (the last one again once the script is used up). It keeps the replaced layer's weight, which
    the backbone reads its dtype and device from."""

    def __init__(self, script: list[int], weight: torch.nn.Parameter):
        super().__init__()
        self.script, self.vocab, self.calls, self.weight = script, weight.shape[0], 0, weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*hidden.shape[:-1], self.vocab)
        logits[..., self.script[min(self.calls, len(self.script) - 1)]] = 1.0
        self.calls += 1
        return logits


def plain_tokenizer():
    tok = copy.deepcopy(byte_bpe_tokenizer())
    tok.chat_template = None  # a base model: plain Document/Question/Answer prompts
    return tok


def forced_backbone(tok, text: str) -> Backbone:
    model = tiny_model()
    model.lm_head = ScriptedHead(tok(text, add_special_tokens=False)["input_ids"], model.lm_head.weight)
    return Backbone(model, tok, ModelInfo(model_id="tiny-scripted", source="test"))


def streamed(tok, text: str, stops) -> tuple[list[str], TextStream]:
    stream = TextStream(tok, stops)
    pieces = []
    for i in tok(text, add_special_tokens=False)["input_ids"]:
        pieces.append(stream.push(i))
        if stream.stopped:
            break
    return pieces, stream


def test_a_plain_frame_ends_answers_at_its_own_turn_markers_and_a_chat_frame_at_its_end_of_turn_token():
    tok = plain_tokenizer()
    assert qa_frame(tok).stops == (f"\n{INSTRUCTION}", "\nQuestion:", "\nAnswer:", "\nDocument:")
    assert qa_frame(tok, instruction="Be brief.\nUse the document.").stops[0] == "\nBe brief."
    assert qa_frame(tok, instruction=" ").stops == ("\nQuestion:", "\nAnswer:", "\nDocument:")
    assert qa_frame(byte_bpe_tokenizer()).stops == ()  # ChatML template: its end-of-turn token stops


def test_the_stream_stops_at_the_marker_and_never_shows_any_of_it():
    tok = plain_tokenizer()
    pieces, stream = streamed(tok, ANSWER + RAMBLE, qa_frame(tok).stops)
    assert stream.stopped and stream.text() == ANSWER
    assert "".join(pieces) == ANSWER  # not even the newline that starts the marker
    assert stream.flush() == ""
    shown = ""
    for p in pieces:  # every prefix shown is a prefix of the answer
        shown += p
        assert ANSWER.startswith(shown)


def test_a_held_back_beginning_that_does_not_become_a_marker_is_shown_after_all():
    tok = plain_tokenizer()
    stops = qa_frame(tok).stops
    text = " Tuesday.\nQuestions remain.\nQues"
    pieces, stream = streamed(tok, text, stops)
    assert not stream.stopped and "".join(pieces) == " Tuesday.\nQuestions remain."  # "\nQues" still held back
    assert stream.flush() == "\nQues" and stream.text() == text  # generation ended: nothing is lost
    assert held_back(" Tuesday.\nQuest", stops) == len("\nQuest") and held_back("Tuesday.", stops) == 0


@pytest.mark.parametrize("method", ["full", "xl"])
def test_ask_with_a_base_model_answers_up_to_the_next_question_line(tmp_path, method):
    tok = plain_tokenizer()
    backbone = forced_backbone(tok, ANSWER + RAMBLE)
    doc = tmp_path / "doc.txt"
    doc.write_text("The secret ingredient of the pudding is cinnamon. " * 20, encoding="utf-8")
    pieces: list[tuple[int, str]] = []
    report = ask(str(doc), ["What is the secret ingredient?"], method=method, backbone=backbone, segment=16,
                 allow_untrained=True, max_new_tokens=40, save=False, on_text=lambda i, p: pieces.append((i, p)))
    answer = report.answers[0]
    assert not report.chat and answer.text == ANSWER.strip() and answer.stopped == "stop"
    assert answer.tokens < 40  # stopped at the marker, not at the length limit
    assert "".join(p for _, p in pieces) == ANSWER  # streamed: the answer and nothing of the marker


def test_a_chat_frame_is_not_cut_at_question_lines(tmp_path):
    tok = byte_bpe_tokenizer()  # has a chat template: an instruct model may write "Question:" in its answer
    backbone = forced_backbone(tok, ANSWER + RAMBLE)
    doc = tmp_path / "doc.txt"
    doc.write_text("The secret ingredient of the pudding is cinnamon. " * 20, encoding="utf-8")
    report = ask(str(doc), ["What is the secret ingredient?"], method="full", backbone=backbone, segment=16,
                 allow_untrained=True, max_new_tokens=24, save=False)
    answer = report.answers[0]
    assert report.chat and answer.stopped == "length" and "\nQuestion:" in answer.text
