"""Tiny tokenizers built in-process (no network) for tests.

- `byte_bpe_tokenizer()`: GPT-2 style byte-level BPE shaped like SmolLM2's (no BOS added by default).
- `sentencepiece_tokenizer()`: Llama-style SentencePiece BPE (byte fallback, dummy prefix, adds BOS),
  loaded through transformers' `LlamaTokenizer` (a `TokenizersBackend`, so offsets work).
- `wordpiece_tokenizer()`: BERT-style uncased WordPiece, for a tiny sentence encoder (RAG).
- `sample_text()`: a deterministic ~10 KB awkward text (mixed newlines, tabs, CJK, emoji, combining marks).

Import from tests as `from tiny_tokenizers import byte_bpe_tokenizer` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import functools
import random
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import LlamaTokenizer, PreTrainedTokenizerFast
from transformers.tokenization_utils_base import generate_merges

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_WORDS = (
    "the of and to in a is that it was for on are as with his they at be this from have or by one had not "
    "but what all were when we there can an your which their said if do will each about how up out them then "
    "she many some so these would other into has more her two like him see time could no make than first "
    "been its who now people my made over did down only way find use may water long little very after words "
    "called just where most know get through back much before go good new write our used me man too any day "
    "same right look think also around another came come work three word must because does part even place "
    "well such here take why things help put years different away again off went old number great tell men "
    "say small every found still between name should home big give air line set own under read last never "
    "us left end along while might next sound below saw something thought both few those always looked show "
    "large often together asked house world going want school important until form food keep children feet "
    "land side without boy once animals life enough took sometimes four head above kind began almost live page "
    "got earth need far hand high year mother light parts country father let night following picture being "
    "study second eyes soon times story boys since white days ever paper hard near sentence better best across "
    "during today others however sure means knew try told young miles sun ways thing whole hear example heard "
    "several change answer room sea against top turned learn point city play toward five using himself usually "
    "café naïve résumé façade"
).split()


@functools.lru_cache(maxsize=1)
def training_corpus() -> tuple[str, ...]:
    """A deterministic English-ish corpus (~8 KB) as lines: words, punctuation, digits, capitals."""
    rng = random.Random(20240611)
    lines = []
    for _ in range(120):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        words[0] = words[0].capitalize()
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
        if rng.random() < 0.3:
            i = rng.randrange(len(words))
            words[i] += rng.choice([",", ";", ":", " -"])
        lines.append(" ".join(words) + rng.choice([".", ".", ".", "?", "!"]))
    return tuple(lines)


@functools.lru_cache(maxsize=None)
def byte_bpe_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A SmolLM2-shaped byte-level BPE: `<|endoftext|>`=0, `<|im_start|>`=1, `<|im_end|>`=2, no BOS added.

    Returns a shared cached instance: do not mutate it in tests.
    """
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


@functools.lru_cache(maxsize=None)
def sentencepiece_tokenizer(vocab_size: int = 400) -> LlamaTokenizer:
    """A Llama-style SentencePiece BPE (`<unk>`=0, `<s>`=1, `</s>`=2; byte fallback; adds BOS).

    Trained with the `sentencepiece` library into a temporary directory, then converted the way
    transformers 5 converts a Llama `tokenizer.model` (vocab + merges generated from the piece order,
    into `LlamaTokenizer`, a `TokenizersBackend`). We extract the pieces with `sentencepiece` itself
    because transformers' own extractor needs `protobuf`, which is not a dependency.
    Returns a shared cached instance: do not mutate it in tests.
    """
    import sentencepiece as spm

    with tempfile.TemporaryDirectory(prefix="longctx-spm-") as tmp:
        prefix = str(Path(tmp) / "tokenizer")
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(training_corpus()),
            model_prefix=prefix,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            add_dummy_prefix=True,
            remove_extra_whitespaces=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            normalization_rule_name="identity",
            character_coverage=1.0,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=1,
            minloglevel=2,
        )
        sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    return LlamaTokenizer(
        vocab=vocab,
        merges=generate_merges(vocab),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        add_bos_token=True,
        add_eos_token=False,
        extra_special_tokens=[p for i, p in enumerate(pieces) if sp.is_control(i)],
    )


def wordpiece_tokenizer() -> PreTrainedTokenizerFast:
    """A BERT-style uncased WordPiece tokenizer ([CLS] text [SEP]) trained on the tiny corpus."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(training_corpus(), trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials,
                                                                         show_progress=False))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def sample_text(size: int = 10_000, seed: int = 7) -> str:
    """A deterministic awkward text of about `size` characters.

    Mixes CRLF/LF/CR newlines, runs of spaces and tabs, digits, punctuation, accented Latin (precomposed and
    with combining marks), CJK, 4-byte emoji, and special-token look-alikes split across words.
    """
    rng = random.Random(seed)
    oddities = [
        "\r\n", "\n", "\r", "\r\n\r\n", "\n\n\n", "  ", "    ", "\t", " \t ", "\t\t", "        ",
        "12345", "3.14159", "1,000,000", "--", "...", "?!", "(x)", "[a]", "{b}", "\"q\"", "'s", "e-mail",
        "café", "naïve", "Ångström", "cafe\u0301", "n\u0303o", "Zürich", "æøå", "ß",
        "漢字", "日本語のテキスト", "中文", "한국어",
        "😀", "🚀🚀", "👩\u200d💻", "🇫🇷", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
        "\u00a0", "\u3000", "<|im_end", "|>",
    ]
    parts: list[str] = []
    total = 0
    while total < size:
        if rng.random() < 0.35:
            piece = rng.choice(oddities)
        else:
            piece = rng.choice(_WORDS)
            if rng.random() < 0.1:
                piece = piece.upper()
        sep = "" if rng.random() < 0.15 else " "
        parts.append(piece + sep)
        total += len(piece) + len(sep)
    return "".join(parts)
