"""Recall training data: invented facts, then distractor book text, then a question whose answer is scored.

A sample (`FactRecall.draw`) is `n` segments: the question frame's head, one to `max_facts` invented facts
("The parlour clock at Wendlecombe was bought for 417 guineas."), book text from the *training* novels, and
at the very end the frame's tail with a question about one fact, followed by its answer. Only the answer's
tokens are scored. Variants: several facts where the others are distractors, and two-hop facts ("Orvanel's
godmother is Tessaly Brindle. Tessaly Brindle was born in Hathermouth." -> "Where was Orvanel's godmother
born?"). Answers are numbers, names, places, colours and codes.

The evaluation (`bench retention`, `bench needle`: bench/needle.py) keeps its own fact templates, word
lists and held-out novel: these templates and lists are written apart from them, names and places are
generated from syllables, and tests/test_facts.py checks that no template, phrase or entity is shared.
Everything is drawn from the sample's generator, so a (seed, step, lane) gives the same sample every time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..errors import UsageError
from ..methods.base import Method
from ..model.backbone import Backbone
from ..stream import forward_segment
from ..text.prompts import QAFrame
from ..text.segments import Segment
from .samples import SampleSource, window_segments

# ---- entities: generated names and places, fixed lists for colours and objects -------------------------------
NAME_HEADS = ("Bran", "Cor", "Del", "Fen", "Gar", "Hal", "Isol", "Jor", "Kel", "Lor", "Mer", "Nor", "Orv", "Per",
              "Quen", "Ros", "Sel", "Tam", "Ulv", "Vel", "Wyn", "Yar", "Zen", "Ead", "Bel", "Cal", "Dor", "Tess")
NAME_MIDS = ("a", "e", "i", "o", "an", "el", "en", "in", "or", "ar", "is", "al")
NAME_TAILS = ("nel", "vane", "mond", "rick", "wyn", "beth", "lyn", "ston", "dric", "mira", "ley", "vyn", "dell",
              "ric", "bard", "wen", "thea", "mund")
PLACE_HEADS = ("Hather", "Wendle", "Brock", "Ashen", "Cray", "Dunse", "Elm", "Fallow", "Gorse", "Holm", "Inch",
               "Kessel", "Lark", "Mire", "Nettle", "Oak", "Pell", "Quarry", "Rush", "Stan", "Thistle", "Wick")
PLACE_TAILS = ("mouth", "combe", "ford", "bury", "stead", "wick", "ham", "thorpe", "dale", "minster", "by",
               "field", "holt", "ley")
TRAIN_COLOURS = ("scarlet", "violet", "amber", "indigo", "grey", "brown", "white", "black", "pink", "purple",
                 "turquoise", "maroon", "ivory", "olive", "lavender", "copper")
RELATIONS = ("godmother", "godfather", "cousin", "landlord", "tutor", "neighbour", "guardian", "physician")
CODE_LETTERS = "ABCDEFGHJKLMNPRSTUVWXYZ"

ANSWER_TYPES = ("number", "name", "place", "colour", "code")


@dataclass(frozen=True)
class Template:
    """A fact about `{who}` with an answer slot `{answer}` of `answer_type`, and the question that asks it."""

    statement: str
    question: str
    answer_type: str


TEMPLATES: tuple[Template, ...] = (
    Template("{who} bought the parlour clock for {answer} guineas.", "How many guineas did {who} pay for the parlour clock?", "number"),
    Template("The lodging of {who} is number {answer} on the high street.", "At what number on the high street does {who} lodge?", "number"),
    Template("{who} owes the miller exactly {answer} shillings.", "How many shillings does {who} owe the miller?", "number"),
    Template("The regiment of {who} marched {answer} miles in a single day.", "How many miles did the regiment of {who} march in a day?", "number"),
    Template("{who} married a young sailor called {answer}.", "What was the name of the sailor {who} married?", "name"),
    Template("The physician who attends {who} is named {answer}.", "Who is the physician that attends {who}?", "name"),
    Template("{who} named the new puppy {answer}.", "What did {who} name the new puppy?", "name"),
    Template("{who} was born in the town of {answer}.", "In which town was {who} born?", "place"),
    Template("Every summer {who} travels to {answer} by coach.", "Where does {who} travel by coach every summer?", "place"),
    Template("{who} keeps a cottage near {answer}.", "Near which town does {who} keep a cottage?", "place"),
    Template("The bonnet ribbons of {who} are always {answer}.", "What colour are the bonnet ribbons of {who}?", "colour"),
    Template("{who} painted the front door {answer} last spring.", "What colour did {who} paint the front door?", "colour"),
    Template("The carriage of {who} is lined with {answer} velvet.", "What colour is the velvet lining the carriage of {who}?", "colour"),
    Template("The lock on the writing desk of {who} opens with the code {answer}.", "Which code opens the writing desk of {who}?", "code"),
    Template("{who} signs every letter with the cipher {answer}.", "With which cipher does {who} sign letters?", "code"),
    Template("The trunk of {who} is marked {answer} in chalk.", "What is marked in chalk on the trunk of {who}?", "code"),
)
# the first fact of a two-hop pair: `{who}`'s relation is `{other}`; the question then asks about "{who}'s relation"
HOP = "The {relation} of {who} is {other}."


def generated_name(gen: torch.Generator) -> str:
    """A first name and a surname from syllables (never a word list the evaluation uses)."""
    first = _pick(NAME_HEADS, gen) + _pick(NAME_TAILS, gen)
    last = _pick(NAME_HEADS, gen) + _pick(NAME_MIDS, gen) + _pick(NAME_TAILS, gen)
    return f"{first} {last}"


def generated_place(gen: torch.Generator) -> str:
    return _pick(PLACE_HEADS, gen) + _pick(PLACE_TAILS, gen)


def generated_code(gen: torch.Generator) -> str:
    """Two letters, a dash and three digits: 'KT-407'."""
    letters = "".join(_pick(CODE_LETTERS, gen) for _ in range(2))
    return f"{letters}-{int(torch.randint(100, 1000, (1,), generator=gen))}"


def _pick(options: Sequence[str], gen: torch.Generator) -> str:
    return options[int(torch.randint(len(options), (1,), generator=gen))]


def answer_of(answer_type: str, gen: torch.Generator) -> str:
    """A random answer of the type."""
    if answer_type == "number":
        return str(int(torch.randint(12, 1000, (1,), generator=gen)))
    if answer_type == "name":
        return generated_name(gen).split()[0]
    if answer_type == "place":
        return generated_place(gen)
    if answer_type == "colour":
        return _pick(TRAIN_COLOURS, gen)
    return generated_code(gen)


@dataclass(frozen=True)
class FactSet:
    """The sentences read first, the question asked last and its answer."""

    sentences: tuple[str, ...]
    question: str
    answer: str
    answer_type: str
    hops: int


def make_fact_set(gen: torch.Generator, facts: int, two_hop: float) -> FactSet:
    """`facts` facts about distinct people in random order; one is asked (two-hop with probability `two_hop`)."""
    people: list[str] = []
    while len(people) < facts + 1:  # one spare name for a two-hop's second person
        who = generated_name(gen)
        if who not in people:
            people.append(who)
    sentences, asked = [], int(torch.randint(facts, (1,), generator=gen))
    question = answer = answer_type = ""
    hops = 1
    for i in range(facts):
        t = TEMPLATES[int(torch.randint(len(TEMPLATES), (1,), generator=gen))]
        value = answer_of(t.answer_type, gen)
        if i == asked and float(torch.rand((), generator=gen)) < two_hop:
            relation, other = _pick(RELATIONS, gen), people[-1]
            sentences += [HOP.format(relation=relation, who=people[i], other=other),
                          t.statement.format(who=other, answer=value)]
            subject, hops = f"the {relation} of {people[i]}", 2
        else:
            sentences.append(t.statement.format(who=people[i], answer=value))
            subject = people[i]
        if i == asked:
            question, answer, answer_type = t.question.format(who=subject), value, t.answer_type
    sentences = [s[0].upper() + s[1:] for s in sentences]
    return FactSet(tuple(sentences), question, answer, answer_type, hops)


@dataclass
class FactRecall:
    """Fact -> distractor -> question samples over `filler` token ids (the training novels', concatenated).

    `frame` is the question frame `ask` and `bench retention` use (its head before the facts, its tail with
    the question after the distractor), so the trained answer is the one those commands generate."""

    tokenizer: Any
    filler: torch.Tensor
    frame: QAFrame
    max_facts: int = 4
    two_hop: float = 0.25

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def sample(self, n: int, segment: int, gen: torch.Generator) -> tuple[torch.Tensor, int, FactSet]:
        """`n * segment + 1` ids ending with the answer, and the index of the answer's first token."""
        facts = make_fact_set(gen, 1 + int(torch.randint(self.max_facts, (1,), generator=gen)), self.two_hop)
        head = self.tokenizer(self.frame.head, add_special_tokens=not self.frame.chat)["input_ids"]  # as retention
        prefix = head + self.encode(" ".join(facts.sentences) + "\n\n")
        suffix = self.encode(self.frame.tail(facts.question))
        answer = self.encode(" " + facts.answer if not self.frame.chat else facts.answer)
        total = n * segment + 1
        room = total - len(prefix) - len(suffix) - len(answer)
        if room < 0:
            raise UsageError(f"{n} segment(s) of {segment} tokens cannot hold a fact sample of {total - room} tokens; "
                             "use a longer --segment or start the curriculum at more segments")
        start = int(torch.randint(0, len(self.filler) - room, (1,), generator=gen))
        ids = torch.tensor([*prefix, *self.filler[start : start + room].tolist(), *suffix, *answer], dtype=torch.long)
        return ids, total - len(answer), facts

    def draw(self, n: int, segment: int, gen: torch.Generator) -> list[Segment]:
        """A training sample (the trainer's SampleSource): only the answer's tokens are scored."""
        ids, first, _ = self.sample(n, segment, gen)
        scored = torch.zeros(len(ids) - 1, dtype=torch.bool)
        scored[first - 1 :] = True  # target j is ids[j + 1]: the answer's tokens
        return window_segments(ids, segment, scored)


@dataclass
class Mixed:
    """Draws from `lm` (ordinary next-token samples) with probability `lm_share`, else from `recall`, so that
    training for recall keeps the language model it starts from."""

    recall: SampleSource
    lm: SampleSource
    lm_share: float

    def draw(self, n: int, segment: int, gen: torch.Generator) -> list[Segment]:
        source = self.lm if float(torch.rand((), generator=gen)) < self.lm_share else self.recall
        return source.draw(n, segment, gen)


Control = Literal["swapped", "reset"]


def answer_scores(backbone: Backbone, method: Method, source: FactRecall, *, segments: int, segment: int,
                  samples: int, seed: int = 4321, controls: Sequence[Control] = ()) -> dict[str, Any]:
    """Teacher-forced scores of the answers of `samples` fixed fact samples (the same ones at every call with
    the same arguments): `answer_accuracy`, the share whose every answer token is the greedy one (so greedy
    decoding would produce the answer), and `answer_nll`, the mean NLL per answer token.

    `controls` also reads each question's segment (the last) with a memory other than its own, in the same
    pass, scored as `answer_accuracy_<control>` and `answer_nll_<control>`: `swapped`, the memory the *next*
    sample's earlier segments wrote (cyclically: the same kind of text and facts, but not the asked one);
    `reset`, the method's initial memory. A memory that carries the fact scores better with its own than
    under the controls; a model that only guesses the answer's kind scores alike."""
    if "swapped" in controls and samples < 2:
        raise UsageError("another sample's memory needs at least 2 samples")
    gen = torch.Generator().manual_seed(seed)
    draws = [source.draw(segments, segment, gen) for _ in range(samples)]
    if any(bool((seg.targets >= 0).any()) for segs in draws for seg in segs[:-1]):
        raise UsageError(f"an answer is longer than a segment of {segment} tokens; use a longer --segment")
    sums = {suffix: _AnswerSums() for suffix in ("", *(f"_{c}" for c in controls))}
    with torch.inference_mode():
        first = None  # sample 0's memory: the swapped control of the last sample reads it
        for i, segs in enumerate(draws):
            state = method.init_state()
            for seg in segs[:-1]:  # the earlier segments are read once, whatever reads their memory
                state, _, _ = forward_segment(backbone, method, state, seg)
            if "reset" in controls:
                sums["_reset"].add(backbone, method, method.init_state(), segs[-1])
            if "swapped" in controls:
                if i == 0:
                    first = method.fork_state(state)
                else:
                    sums["_swapped"].add(backbone, method, method.fork_state(state), draws[i - 1][-1])
            sums[""].add(backbone, method, state, segs[-1])
        if "swapped" in controls:
            sums["_swapped"].add(backbone, method, first, draws[-1][-1])
    out: dict[str, Any] = {"recall_segments": segments, "recall_samples": samples}
    for suffix, total in sums.items():
        out[f"answer_accuracy{suffix}"] = total.exact / max(samples, 1)
        out[f"answer_nll{suffix}"] = total.nll / max(total.tokens, 1)
    return out


@dataclass
class _AnswerSums:
    """Running sums of one reading's answer scores."""

    exact: int = 0
    nll: float = 0.0
    tokens: int = 0

    def add(self, backbone: Backbone, method: Method, state: Any, question: Segment) -> None:
        """Read the question's segment over `state` and add its answer's NLL and exactness."""
        _, hidden, _ = forward_segment(backbone, method, state, question)
        scored = question.targets >= 0
        logits = backbone.model.lm_head(hidden[scored.to(hidden.device)]).float()
        want = question.targets[scored].to(logits.device)
        self.nll += float(torch.nn.functional.cross_entropy(logits, want, reduction="sum"))
        self.tokens += int(want.numel())
        self.exact += bool((logits.argmax(-1) == want).all())
