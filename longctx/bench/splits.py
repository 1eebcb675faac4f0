"""Tuning set and report set of the retrieval benchmarks: tune on one, report on the other.

Method design and presets may look at the *tuning* set only (the Persuasion filler, seeds below 1000, the
Landmark key wording every earlier figure used). The *report* set changes everything a method could have
been fitted to: another novel, seeds from 1000 (so other keys, depths order and haystack offsets) and a
second key wording (another information line, question and answer prime). A figure measured on the report
set is one no tuning decision has seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError

REPORT_SEED_START = 1000
SEED_LIMIT = 2**31  # random.Random takes larger seeds; this only keeps the ranges printable


@dataclass(frozen=True)
class KeyWording:
    """How the passkey is stated and asked for. `info` holds `{key}` twice (statement and repetition)."""

    name: str
    info: str
    question: str
    prime: str  # the answer's first words, so the key is the next thing to generate

    def info_line(self, key: int) -> str:
        return self.info.format(key=key)


# Mohtashami & Jaggi's Landmark wording: the prompts of every tuning-set figure, byte for byte
LANDMARK = KeyWording("landmark", "\nThe pass key is {key}. Remember it. {key} is the pass key.\n",
                      "What is the pass key?", "The pass key is")
# Written for the report set: the same facts in other words, so a method tuned to one phrasing shows it
REPORTED = KeyWording("report", "\nHere is the pass key: {key}. Keep it in mind, because the pass key is {key}.\n",
                      "Which number was the pass key?", "The pass key was")


@dataclass(frozen=True)
class EvalSet:
    """One side of the split: its seeds, its key wording and the novel it is documented with."""

    name: str
    seeds: range
    wording: KeyWording
    novel: str  # file name of the filler the docs use for this set (the filler itself stays an argument)

    def seed(self, seed: int | None) -> int:
        """`seed`, or the set's first seed when None; a seed of the other set is refused."""
        if seed is None:
            return self.seeds.start
        if seed not in self.seeds:
            raise UsageError(f"seed {seed} is not in the {self.name} set (seeds {self.seeds.start}.."
                             f"{self.seeds.stop - 1}); pick --set {_other(self.name)} or a seed in range")
        return seed

    def check_filler(self, path: str) -> None:
        """The report set must not be cut from the tuning novel: that is the text the methods were tuned on."""
        tuning = SETS["tuning"].novel
        if self.name != "tuning" and Path(path).name == tuning:
            raise UsageError(f"the {self.name} set needs another novel than the tuning set's {tuning} "
                             f"(e.g. {self.novel})")

    def describe(self, wording: bool = True) -> dict[str, object]:
        """What a result file records about the set; `wording=False` for benchmarks without a key line
        (needle QA, whose report set differs by seeds and novel)."""
        out: dict[str, object] = {"name": self.name, "seeds": [self.seeds.start, self.seeds.stop - 1],
                                  "novel": self.novel}
        if wording:
            out.update({"wording": self.wording.name, "info": self.wording.info, "question": self.wording.question,
                        "prime": self.wording.prime})
        return out


SETS = {
    "tuning": EvalSet("tuning", range(0, REPORT_SEED_START), LANDMARK, "austen_persuasion.txt"),
    "report": EvalSet("report", range(REPORT_SEED_START, SEED_LIMIT), REPORTED, "austen_emma.txt"),
}


def _other(name: str) -> str:
    return "report" if name == "tuning" else "tuning"


def eval_set(name: str) -> EvalSet:
    """The named set (tuning or report)."""
    try:
        return SETS[name]
    except KeyError:
        raise UsageError(f"unknown set '{name}' (choose: {', '.join(SETS)})") from None
