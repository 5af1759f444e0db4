"""Chinese: characters as fine tokens, segmenter words as coarse tokens.

Fine tokens
    One token per character (CJK, punctuation, symbols), vocabulary = the most frequent characters
    of the corpus seen at least --fine-min-count times, up to --fine-vocab-size.
    Runs of ASCII letters/digits (after NFKC, so full-width "１９９８" is "1998") are treated like
    WordPiece words: a run frequent enough (>= --latin-min-count) is ONE token ("1998", "GDP");
    any other run is split greedily into the longest in-vocabulary pieces, the first piece plain and
    the following ones with the "##" continuation prefix ("iPhone6s" -> "iPhone" "##6" "##s").
    All 62 single letters/digits and their "##" forms are always in the vocabulary, so a Latin run
    never becomes [UNK]. A run that continues the previous coarse word without a space (the
    segmenter cut inside it) starts with "##" too, so ``format.detokenize`` restores the text exactly:
    decode(fine) == decode(coarse) == the normalised sentence (data_prep/normalize.py).
Coarse tokens
    Words of a segmenter: jieba-c by default (jieba's algorithm, dictionary and HMM in C, in
    data_prep/_native.c: the same words as jieba, which tests/test_native.py checks word for word, at
    1.5-1.8x the speed of rjieba and ~25x jieba's, its words numbered without a Python string each);
    rjieba (the Rust port of jieba; with a post-processing rule for non-Chinese runs and the text cut
    around the Han characters jieba does not take for Chinese, see RJiebaSegmenter, its output is
    identical to jieba's on every sentence of People's Daily, which tests/test_data_prep_zh.py checks,
    and on all but 15 of the 147,595 lines of the shared corpora, where its HMM joins two characters
    jieba keeps apart ("常在不": jieba "常" "在" "不", rjieba "常在" "不"); the default where _native.c is
    not compiled), jieba, or pkuseg (optional extra). The three jiebas give the same words up to those
    rare HMM cases: jieba-c and jieba datasets byte-identical, rjieba's on People's Daily.
    --user-dict adds words (jieba format: "word [freq] [tag]" per line).
    Vocabulary = specials + every fine token (so any text the fine side knows can be spelled) + the
    most frequent multi-token words, up to --coarse-vocab-size. A word outside the vocabulary backs
    off to in-vocabulary words by greedy longest match over its fine tokens, finally to single fine
    tokens: never to [UNK] for text the fine side knows.
Alignment
    Fine tokens are produced inside each coarse word, so every coarse boundary is a fine boundary.

Segmentation runs once per shard (``analyze_shard`` -> ``segment_shard``): jieba-c segments and
numbers the shard's sentences in one C pass (``Jieba.segment_sentences``); the other jieba segmenters
get one call per ~16k characters of sentences, whose words are numbered at once (``WordIds``). The
shard's cache is its distinct words (joined by U+001F, a control character normalisation removes from the text), an
int32 word id per token and the words per sentence; ``encode_shard`` only reads the cache. Each
distinct word is encoded once per worker (``_EncodedWords``; most go through array operations: one
fine token per character through a code-point table) and the tokens are gathered by id.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import logging
import os
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from operator import itemgetter
from pathlib import Path

import numpy as np

from data_prep import format as fmt
from data_prep import languages
from data_prep.languages import (
    Corpus,
    EncodedShard,
    Language,
    LanguageError,
    PackedCounter,
    StringNumbering,
    bincount,
    compact_ints,
    concat_ranges,
    count_chars,
    register,
    sum_count_tables,
)
from data_prep.normalize import normalize_documents, normalize_text, split_sentences, split_sentences_batch

SEGMENTERS = ("jieba-c", "rjieba", "jieba", "pkuseg")
# The default: jieba-c where data_prep/_native.c is compiled (setup.sh, pip install -e .), else rjieba.
DEFAULT_SEGMENTER = "jieba-c" if languages._native is not None else "rjieba"
# Segmenters that give the same words (jieba's): a --vocab-from build may use any of them.
SAME_WORDS = frozenset({"jieba-c", "rjieba", "jieba"})
WORD_SEP = "\x1f"
# A shard's cache (``analyze_shard``), one file of raw arrays (``languages.save_arrays``): its distinct
# words (UTF-8, joined by WORD_SEP), the word id of every token (int32), the words of every sentence,
# and the sentences of every document (``write_shard_cache`` / ``read_shard_cache``).
SHARD_CACHE_FILE = "segmented.arrays"
_ASCII_ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_ASCII_ALNUM_SET = frozenset(_ASCII_ALNUM)
_ASCII_ALNUM_TABLE = np.zeros(128, dtype=bool)  # by code point
_ASCII_ALNUM_TABLE[[ord(c) for c in _ASCII_ALNUM]] = True
_ALNUM_TABLE = np.zeros(128, dtype=bool)
_ALNUM_TABLE[[ord(c) for c in _ASCII_ALNUM]] = True
_NEEDS_CARE = re.compile(r"[ #A-Za-z0-9]")
_RUN_OR_CHAR = re.compile(r"[A-Za-z0-9]+|.", re.DOTALL)
_RUN = re.compile(r"[A-Za-z0-9]+")
_CUT_RUN = re.compile("[A-Za-z0-9]\x1f[A-Za-z0-9]")
# Latin/digit runs of cached words: a "##" continuation run at a word start, or any run of >= 2.
_CACHED_RUN = re.compile("(?:^|(?<=[\x1f\n]))##[A-Za-z0-9]+|[A-Za-z0-9]{2,}", re.MULTILINE)
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]")
MAX_BACKOFF_PIECES = 16
_LETTER = re.compile(r"[^\W\d_]")


# ---------------------------------------------------------------------------------------------
# Segmenters
# ---------------------------------------------------------------------------------------------
class Segmenter:
    """cut(sentence) -> words (may include whitespace tokens, which the caller drops)."""

    name = ""

    def cut(self, text: str) -> list[str]:
        raise NotImplementedError

    @staticmethod
    def _user_words(path: str | None) -> list[tuple[str, int | None, str | None]]:
        return read_user_dict(path) if path else []


# jieba's own parsing of a user dictionary line (``jieba.re_userdict``): the word may hold spaces.
_USER_DICT_LINE = re.compile(r"^(.+?)( [0-9]+)?( [a-z]+)?$")


def read_user_dict(path: str | os.PathLike) -> list[tuple[str, int | None, str | None]]:
    """(word, freq, tag) of a jieba-format user dictionary, parsed as ``jieba.Tokenizer.load_userdict``
    parses it (UTF-8, a BOM ignored, "word [freq] [tag]" with the word possibly holding spaces), so
    that rjieba segments as jieba does. Raises LanguageError naming the file for a missing or
    non-UTF-8 one: called before any work, not first in a worker after the corpus was read."""
    path = Path(path)
    if not path.is_file():
        raise LanguageError(f"--user-dict {path} does not exist (or is not a file): pass a jieba-format "
                            f"dictionary (\"word [freq] [tag]\" per line)", final=True)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise LanguageError(
            f"--user-dict {path} is not UTF-8 (byte {exc.start:,}, line {line}): convert it, e.g. "
            f"`iconv -f GB18030 -t UTF-8 {path} > {path}.utf8` (jieba's dictionaries are UTF-8)", final=True) from None
    words = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip().lstrip("\ufeff")
        if not line:
            continue
        word, freq, tag = _USER_DICT_LINE.match(line).groups()
        if "\t" in word or word != word.strip():  # jieba would add a word no text holds: the entry does nothing
            raise LanguageError(f"--user-dict {path}:{number}: {line[:40]!r} is not \"word [freq] [tag]\" with one space "
                                f"between the fields (a tab, or two spaces, make them part of the word, as jieba reads "
                                f"it); fix the line", final=True)
        words.append((word, int(freq) if freq else None, tag.strip() if tag else None))
    return words


# jieba's HMM fallback (finalseg.cut) splits a run of non-Chinese characters outside the dictionary
# with this pattern ("1.3nm" -> "1.3" "nm"); jieba-rs (rjieba) does not. Re-splitting such words
# makes rjieba's output identical to jieba's (all 44,544 sentences of People's Daily; tested).
_JIEBA_SKIP = re.compile(r"([a-zA-Z0-9]+(?:\.\d+)?%?)")
_JIEBA_HAN = re.compile("[\u4E00-\u9FD5]")
_ASCII_ALNUM_RE = re.compile("[A-Za-z0-9]")
# A whole word (between separators) without Chinese characters that contains a letter/digit.
_NON_HAN_WORD = re.compile("(?<![^\x1f])[^\x1f\u4E00-\u9FD5]*[A-Za-z0-9][^\x1f\u4E00-\u9FD5]*(?![^\x1f])")
_NON_HAN = re.compile("[^\x1f\u4E00-\u9FD5]*[A-Za-z0-9][^\x1f\u4E00-\u9FD5]*")  # the same, for one word


# Han characters that jieba (0.42) leaves outside its Chinese blocks, yielding each one alone, and that
# jieba-rs (rjieba) takes into them (CJK Extension A, Extensions B and later, the compatibility
# ideographs, U+9FD6-U+9FFF), so that it joins runs of them into words ("𫄥𫄥" for jieba's "𫄥" "𫄥"):
# rjieba cuts the text between them instead, which gives jieba's words (the rare characters of
# classical poetry; tested on the shared corpora).
_RJIEBA_ONLY_HAN = re.compile("([\u3400-\u4DBF\u9FD6-\u9FFF\uF900-\uFAFF\U00020000-\U0003FFFF])")


class RJiebaSegmenter(Segmenter):
    """rjieba (jieba-rs): jieba's algorithm and dictionary in Rust, ~20x faster, jieba's words (but for
    rare HMM cases, see the module docstring)."""

    name = "rjieba"

    def __init__(self, user_dict: str | None = None):
        import rjieba

        words = self._user_words(user_dict)
        # Its own dictionary when there are user words (0.2 s to load): rjieba.add_word changes the module's
        # shared one, for every later segmenter of the process (a second build without --user-dict, in a
        # notebook or a test, segmented with the first one's words).
        jieba = rjieba.Jieba() if words else rjieba
        for word, freq, tag in words:
            jieba.add_word(word, freq, tag)
        self._cut = jieba.cut
        self._has_word = jieba.has_word

    def cut_raw(self, text: str) -> list[str]:
        """rjieba's words, before the rule that makes them jieba's (``split_like_jieba``); each Han
        character jieba does not take for Chinese is a word alone (``_RJIEBA_ONLY_HAN``)."""
        if not _RJIEBA_ONLY_HAN.search(text):
            return self._cut(text)
        words: list[str] = []
        for i, piece in enumerate(_RJIEBA_ONLY_HAN.split(text)):
            if i % 2:
                words.append(piece)
            elif piece:
                words += self._cut(piece)
        return words

    def split_like_jieba(self, word: str) -> list[str] | None:
        """The pieces jieba gives for this rjieba word, or None if jieba gives the word itself."""
        if (len(word) > 1 and _NON_HAN.fullmatch(word) and not _JIEBA_SKIP.fullmatch(word)
                and not self._has_word(word)):
            return [x for x in _JIEBA_SKIP.split(word) if x]
        return None

    def cut(self, text: str) -> list[str]:
        words = self.cut_raw(text)
        if not _ASCII_ALNUM_RE.search(text):
            return words
        # A word changes only if it is non-Chinese, contains a letter/digit, is not ONE match of the
        # pattern (most are: "1998", "GDP", "3.5%") and is not a dictionary word. Find those few
        # through one pass over the joined words; the rest of the list is kept as it is.
        joined = WORD_SEP.join(words)
        fixes: list[tuple[int, list[str]]] = []
        index = offset = 0
        for m in _NON_HAN_WORD.finditer(joined):
            w = m.group()
            if len(w) > 1 and not _JIEBA_SKIP.fullmatch(w) and not self._has_word(w):
                index += joined.count(WORD_SEP, offset, m.start())  # the word's index in ``words``
                offset = m.start()
                fixes.append((index, [x for x in _JIEBA_SKIP.split(w) if x]))
        if not fixes:
            return words
        out: list[str] = []
        last = 0
        for index, parts in fixes:
            out += words[last:index]
            out += parts
            last = index + 1
        out += words[last:]
        return out


# The dictionary jieba-c built last in this process (~25 MB; 0.13 s to build), by its user words: the
# segmenters of later builds share it (read-only once built), and so do a build's pool workers, forked
# after the main process built it (``Chinese.before_fork``): one copy in memory and in the CPU caches,
# which the trie's reads are bound by, instead of one per worker.
_JIEBA_C: dict[tuple, object] = {}

_JIEBA_C_KEPT = 4  # jieba-c states kept in the cache folder (the most recently written)


def _jieba_folder() -> Path:
    """jieba's package folder, found without importing it (0.03 s); a LanguageError if not installed."""
    import importlib.util

    spec = importlib.util.find_spec("jieba")
    if spec is None or not spec.submodule_search_locations:
        raise LanguageError("--segmenter jieba-c reads jieba's dictionary and HMM tables, but jieba is not installed: "
                            "`pip install jieba==0.42.1` (launchers/setup.sh does), or use --segmenter rjieba", final=True)
    return Path(list(spec.submodule_search_locations)[0])


def _jieba_c_dictionary(native, source: Path):
    """jieba's dictionary (``source``, its dict.txt) built by jieba-c, through a disk cache: building
    it parses ~350k entries (0.15-0.2 s a process); its state (``Jieba.state``, ~23 MB) is kept in
    ``languages.cache_dir()`` under a name made from the bytes of the dictionary and of jieba's HMM
    tables (finalseg/prob_*.py) and _native.c's version (``languages.keep_cached``: a CRC-32 after
    it), and read back in ~0.03 s (without importing jieba: 0.03 s more). A missing, damaged or
    unwritable cache only costs the build: the dictionary is built again (and the state rewritten if
    it can be)."""
    data = source.read_bytes()
    digest = hashlib.sha1(data)
    for name in ("prob_start.py", "prob_trans.py", "prob_emit.py"):
        digest.update((source.parent / "finalseg" / name).read_bytes())
    digest.update(f"|native {native.VERSION}".encode())
    key = digest.hexdigest()[:20]
    folder = languages.cache_dir()
    path = folder / f"jieba-c-{key}.state" if folder is not None else None
    state = languages.read_cached(path)
    if state is not None:
        try:
            return native.Jieba.from_state(state)
        except ValueError as exc:
            logging.getLogger("data_prep").debug("%s: %s; building jieba's dictionary again", path, exc)
    from jieba.finalseg import prob_emit, prob_start, prob_trans

    built = native.Jieba(data.decode("utf-8"), prob_start.P, prob_trans.P, prob_emit.P)
    if path is not None:
        languages.keep_cached(path, built.state(), _JIEBA_C_KEPT)
    return built


class JiebaCSegmenter(Segmenter):
    """jieba in C (data_prep/_native.c, ``Jieba``): jieba's dictionary (its dict.txt) and HMM (its
    finalseg tables), the same words as jieba word for word (tests/test_native.py), 1.5-1.8x rjieba's
    speed; ``segment_shard`` numbers its words in C (``segment_sentences``), a str only for a new word.
    Needs data_prep._native compiled."""

    name = "jieba-c"

    def __init__(self, user_dict: str | None = None):
        native = languages._native
        if native is None:  # (make_segmenter gives rjieba instead)
            raise LanguageError("--segmenter jieba-c needs data_prep/_native.c compiled (it is not, or it is stale): "
                                "run `bash launchers/setup.sh` (or `pip install -e .`; needs gcc), or use "
                                "--segmenter rjieba (the same words)", final=True)
        words = self._user_words(user_dict)
        key = (native, tuple(words))
        self.jieba = _JIEBA_C.get(key)
        if self.jieba is None:
            source = _jieba_folder() / "dict.txt"
            try:
                self.jieba = _jieba_c_dictionary(native, source)
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                raise LanguageError(f"--segmenter jieba-c reads jieba's dictionary, {source}, which is missing or damaged "
                                    f"({exc}): reinstall jieba (`pip install --force-reinstall jieba==0.42.1`), or use "
                                    f"--segmenter rjieba (the same words)", final=True) from None
            for word, freq, _tag in words:  # jieba's load_userdict -> add_word
                self.jieba.add_word(word, freq if freq is not None else self._suggest_freq(word))
            _JIEBA_C.clear()  # one kept (a process building with several user dictionaries does not pile them up)
            _JIEBA_C[key] = self.jieba

    def _suggest_freq(self, word: str) -> int:
        """jieba's ``suggest_freq(word, tune=False)``: the frequency add_word gives a user word without one."""
        total = self.jieba.total
        freq = 1.0
        for piece in self.jieba.cut(word, hmm=False):
            known = self.jieba.get(piece)
            freq *= (1 if known is None else known) / float(total)
        known = self.jieba.get(word)
        return max(int(freq * total) + 1, 1 if known is None else known)

    def cut(self, text: str) -> list[str]:
        return self.jieba.cut(text)

    def segment_sentences(self, sentences: list[str], start: int, numbers, ids: np.ndarray, lengths: np.ndarray,
                          pos: int) -> tuple[int, int, list[str]]:
        """The build's words of ``sentences[start:]`` (``segment_shard``): see ``_native.Jieba.segment_sentences``."""
        return self.jieba.segment_sentences(sentences, start, numbers, ids, lengths, pos)


class JiebaSegmenter(Segmenter):
    name = "jieba"

    def __init__(self, user_dict: str | None = None):
        import logging

        import jieba

        jieba.setLogLevel(logging.WARNING)
        self.tokenizer = jieba.Tokenizer()
        # jieba caches its prefix dictionary (9 MB) in the temp dir; keep it per user.
        self.tokenizer.tmp_dir = os.environ.get("AMBERT_JIEBA_CACHE", tempfile.gettempdir())
        if user_dict:
            if not Path(user_dict).is_file():
                raise LanguageError(f"--user-dict {user_dict} does not exist")
            self.tokenizer.load_userdict(user_dict)

    def cut(self, text: str) -> list[str]:
        return self.tokenizer.lcut(text)


class PkusegSegmenter(Segmenter):
    name = "pkuseg"

    def __init__(self, user_dict: str | None = None):
        try:
            import pkuseg
        except ImportError:
            raise LanguageError(
                "--segmenter pkuseg needs the pkuseg package, which is not installed: in the repository, "
                "pip install -e '.[pkuseg]'"
                + (f" (its last release, 0.0.25, builds only on Python <= 3.10: this is {sys.version_info.major}."
                   f"{sys.version_info.minor}, so use a Python 3.10 environment)" if sys.version_info >= (3, 11) else "")
                + "; or use --segmenter rjieba"
            ) from None
        self.seg = pkuseg.pkuseg(user_dict=user_dict or "default")

    def cut(self, text: str) -> list[str]:
        return self.seg.cut(text)


def make_segmenter(name: str, user_dict: str | None = None) -> Segmenter:
    """The segmenter ``name``; jieba-c where data_prep._native is not compiled: rjieba (the same words,
    slower), with a warning, so a dataset built with jieba-c is still read and extended everywhere."""
    classes = {"jieba-c": JiebaCSegmenter, "rjieba": RJiebaSegmenter, "jieba": JiebaSegmenter, "pkuseg": PkusegSegmenter}
    if name not in classes:
        raise LanguageError(f"unknown --segmenter {name!r}; choose one of {SEGMENTERS}")
    if name == "jieba-c" and languages._native is None:
        if not _FALLBACK_WARNED:
            _FALLBACK_WARNED.append(True)
            logging.getLogger("data_prep").warning(
                "--segmenter jieba-c needs data_prep/_native.c compiled (it is not, or it is stale): segmenting with "
                "rjieba instead (the same words, slower). Compile it with `bash launchers/setup.sh` (or `pip install "
                "-e .`; needs gcc)")
        name = "rjieba"
    return classes[name](user_dict)


_FALLBACK_WARNED: list[bool] = []


def segment_sentence(segmenter: Segmenter, sentence: str) -> list[str]:
    """Coarse words of one normalised sentence, spaces dropped, continuation words marked "##".

    A word whose first character is an ASCII letter/digit directly after a word ending in one (no
    space between: the segmenter cut a Latin run) gets the "##" prefix, the detokenize convention.
    Leading "#"s of a word that starts with "##" are split off so a cached word never starts with a
    literal "##".
    """
    words = segmenter.cut(sentence)
    if not _NEEDS_CARE.search(sentence):
        return words
    if " " not in sentence and "#" not in sentence and not _CUT_RUN.search(WORD_SEP.join(words)):
        return words  # Latin/digits present, but no run was cut by the segmenter
    out = []
    prev = ""
    for word in words:
        if not word.strip():
            prev = " "
            continue
        if word.startswith("##"):
            body = word.lstrip("#")
            out.extend("#" * (len(word) - len(body)))
            prev = "#"
            if not body:
                continue
            word = body
        if word[0] in _ASCII_ALNUM and prev and prev[-1] in _ASCII_ALNUM:
            out.append("##" + word)
        else:
            out.append(word)
        prev = word
    return out


_CONTINUATION_CUT = re.compile("\x1f(?<=[A-Za-z0-9]\x1f)(?=[A-Za-z0-9])")  # starts with the separator: 2x faster
_SPACE_WORD = re.compile("\x1f \x1f")


def _segment_lines(segmenter: Segmenter, sentences: list[str]) -> list[str] | None:
    """Cached lines of ``sentences`` (no "##" in them) with ONE segmenter call; None if a check fails.

    jieba/rjieba emit every whitespace character as its own word and never join across it, so
    cutting the sentences joined by "\n" gives the per-sentence segmentation."""
    text = "\n".join(sentences)
    joined = WORD_SEP.join(segmenter.cut(text)).replace(WORD_SEP + "\n" + WORD_SEP, "\n")
    if " " in text:
        # continuation marks first (a space word separates, so "Windows 98" is not marked) ...
        joined = _CONTINUATION_CUT.sub(WORD_SEP + "##", joined)
        # ... then drop the space words (normalisation leaves single spaces between letters/digits)
        joined = _SPACE_WORD.sub(WORD_SEP, joined)
    elif _ASCII_ALNUM_RE.search(text):
        joined = _CONTINUATION_CUT.sub(WORD_SEP + "##", joined)
    lines = joined.split("\n")
    if len(lines) != len(sentences) or " " in joined:
        return None
    return lines


def _fast_path(segmenter: Segmenter) -> bool:
    return isinstance(segmenter, (JiebaCSegmenter, RJiebaSegmenter, JiebaSegmenter))


def segment_document(segmenter: Segmenter, sentences: list[str]) -> list[str]:
    """Cached lines (words joined by U+001F) of a document's sentences: ``segment_sentence`` for each,
    done with ONE segmenter call and a few regular-expression passes over the whole document.
    Any surprise (a line count that does not match, a literal "##") falls back to the per-sentence path.
    """
    if not sentences:
        return []
    lines = None
    if _fast_path(segmenter) and not any("##" in s for s in sentences):
        lines = _segment_lines(segmenter, sentences)
    if lines is None:
        return [WORD_SEP.join(w) for w in (segment_sentence(segmenter, s) for s in sentences) if w]
    return lines


_NOT_COMPILED_WARNED = []


def _warn_if_not_compiled() -> None:
    """Once per process: the build runs without data_prep._native (same output, slower)."""
    if languages._native is None and not _NOT_COMPILED_WARNED and os.environ.get("AMBERT_PURE_PYTHON", "") in ("", "0"):
        _NOT_COMPILED_WARNED.append(True)
        logging.getLogger("data_prep").warning(
            "data_prep/_native.c is not compiled (or was compiled from an older version of it): the Chinese build "
            "numbers words and splits sentences in Python (the same output, "
            "~1.5-2 s slower per 20 MB of text). Compile it with `bash launchers/setup.sh` (or `pip install -e .`; needs gcc)")


class WordIds:
    """Shard-local word ids: each distinct word gets the next id the first time it is seen.

    The numbering runs in C (``StringNumbering``), so a shard's words become one integer array
    without a Python-level loop, and the strings of a chunk are freed as soon as it is numbered (the
    segmenter's output is never kept). Ids 0 and 1 are the line break (a sentence boundary) and the
    space (dropped)."""

    NEWLINE, SPACE = 0, 1

    def __init__(self) -> None:
        self.numbering = StringNumbering()
        self.index = self.numbering.index
        self.numbering(["\n", " "])  # ids 0 and 1
        self.words: list[str] = []  # id -> word, extended by ``_extend``
        self.starts_alnum = np.zeros(0, dtype=bool)
        self.ends_alnum = np.zeros(0, dtype=bool)
        self.odd = np.zeros(0, dtype=bool)  # whitespace inside a word other than the two above
        self.pieces: dict[int, np.ndarray] = {}  # rjieba words jieba splits -> the pieces' ids
        self.split = np.zeros(0, dtype=bool)  # the ids that are keys of ``pieces``
        self.shard_ids = np.zeros(0, dtype=np.int64)  # the ids of the last ``segment_shard``'s words, in its order
        self.shard_counts = np.zeros(0, dtype=np.int64)  # and how often each occurs in it
        self._extend(list(self.index))

    def __call__(self, words: list[str]) -> np.ndarray:
        """Ids of ``words``, numbering the new ones."""
        seen = len(self.words)
        ids = self.numbering(words)
        if len(self.index) > seen:  # new ids were handed out in order of first occurrence
            where = np.flatnonzero(ids >= seen)
            first = where[np.unique(ids[where], return_index=True)[1]]
            self._extend([words[i] for i in first.tolist()])
        return ids

    def _extend(self, new: list[str]) -> None:
        """The per-word tables of words just numbered (in id order), from their code points at once."""
        self.words += new
        if not new:
            return
        lens = np.fromiter(map(len, new), dtype=np.int64, count=len(new))
        if not lens.all():  # an empty word (no segmenter gives one): the plain way
            alnum = _ASCII_ALNUM_SET
            starts_alnum = [bool(w) and w[0] in alnum for w in new]
            ends_alnum = [bool(w) and w[-1] in alnum for w in new]
            odd = [(" " in w or "\n" in w) and w != " " and w != "\n" for w in new]
        else:
            cps = np.frombuffer("".join(new).encode("utf-32-le"), dtype=np.uint32)
            first = np.cumsum(lens) - lens
            alnum = _ALNUM_TABLE[np.minimum(cps, 127)] & (cps < 128)
            starts_alnum, ends_alnum = alnum[first], alnum[first + lens - 1]
            # whitespace inside a word other than the one-character words " " and "\n"
            odd = (np.add.reduceat(((cps == 32) | (cps == 10)).astype(np.int64), first) > 0) & (lens > 1)
        self.starts_alnum = np.append(self.starts_alnum, starts_alnum)
        self.ends_alnum = np.append(self.ends_alnum, ends_alnum)
        self.odd = np.append(self.odd, odd)
        self.split = np.append(self.split, np.zeros(len(new), dtype=bool))

    def chunk(self, segmenter: Segmenter, sentences: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
        """(word ids, words per sentence) of ``sentences`` (none containing "##") with ONE segmenter
        call: ``_segment_lines`` in id space. None if a check fails (the caller takes the general path).

        A word that starts with an ASCII letter/digit right after one that ends with one (no space
        word between: the segmenter cut a Latin run) becomes its "##" form; space words are dropped."""
        text = "\n".join(sentences)
        if not isinstance(segmenter, RJiebaSegmenter):
            ids = self(segmenter.cut(text))
        else:  # rjieba's words made jieba's on the distinct words (RJiebaSegmenter.cut does it per call)
            seen = len(self.words)
            ids = self(segmenter.cut_raw(text))
            # Only new words without Chinese characters that contain a letter/digit can change:
            # found with one regular-expression pass over the new words joined.
            for m in _NON_HAN_WORD.finditer(WORD_SEP.join(self.words[seen:])):
                pieces = segmenter.split_like_jieba(m.group())
                if pieces is not None:
                    word_id = self.index[m.group()]
                    self.pieces[word_id] = self(pieces)
                    self.split[word_id] = True
            if self.pieces:
                where = np.flatnonzero(self.split[ids])
                if len(where):
                    parts, last = [], 0
                    for pos in where.tolist():
                        parts += [ids[last:pos], self.pieces[int(ids[pos])]]
                        last = pos + 1
                    ids = np.concatenate(parts + [ids[last:]])
        if self.odd[ids].any():
            return None
        cont = np.flatnonzero(self.ends_alnum[ids[:-1]] & self.starts_alnum[ids[1:]]) + 1
        if len(cont):
            distinct, where = np.unique(ids[cont], return_inverse=True)
            ids[cont] = self(["##" + self.words[i] for i in distinct.tolist()])[where]
        ids = ids[ids != self.SPACE]
        breaks = np.flatnonzero(ids == self.NEWLINE)
        if len(breaks) != len(sentences) - 1:
            return None
        lengths = np.diff(np.concatenate(([-1], breaks, [len(ids)]))) - 1
        if not lengths.all():
            return None
        return ids[ids != self.NEWLINE], lengths

    def sentence(self, segmenter: Segmenter, sentence: str) -> np.ndarray:
        """Word ids of one sentence through the general path (``segment_sentence``)."""
        return self(segment_sentence(segmenter, sentence))


def segment_shard(segmenter: Segmenter, sentences: list[str], chunk_chars: int = 1 << 14,
                  table: WordIds | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``_segment_shard`` with the shard's words as a list (``table.words`` at its ids)."""
    table = WordIds() if table is None else table
    used, ids, lengths = _segment_shard(segmenter, sentences, chunk_chars, table)
    words = [table.words[int(used[0])]] if len(used) == 1 else list(itemgetter(*used.tolist())(table.words)) if len(used) else []
    return words, ids, lengths


def _segment_shard(segmenter: Segmenter, sentences: list[str], chunk_chars: int,
                   table: WordIds) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Segment a shard's sentences into (words, word ids, words per sentence): ``words[id]`` is the
    cached word (``segment_sentence``'s output, "##" marks included) of each id; every listed word
    occurs; a sentence may have 0 words (only when the general path gives none).

    Equal to ``segment_document`` over the same sentences (a test checks it). jieba-c does it all in
    C, one sentence after the other (``Jieba.segment_sentences``: no str for a word seen before, no
    pass over the ids afterwards), handing a sentence the general path must take back to it. The
    other jieba segmenters get one call per ~``chunk_chars`` characters of sentences, whose words are numbered and freed at
    once (the build's time inside rjieba fell by about a third against one call per megabyte whose
    words were kept); a sentence containing "##", a chunk that fails a check, and other segmenters
    take the per-sentence path.

    ``table``: a ``WordIds`` kept across a worker's shards (``Chinese.analyze_shard``), so a shard only
    numbers the words no earlier shard had (most recur); the shard's words are listed in the table's
    order either way. Returns the shard's words as their ids in ``table`` (``used``: word k of the shard
    is ``table.words[used[k]]``)."""
    ids_parts: list[np.ndarray] = []
    length_parts: list[np.ndarray] = []

    def general(batch: list[str]) -> None:
        for sentence in batch:
            ids = table.sentence(segmenter, sentence)
            ids_parts.append(compact_ints(ids))
            length_parts.append(np.array([len(ids)], dtype=np.int64))

    if isinstance(segmenter, JiebaCSegmenter) and table.numbering.native is not None:
        n = len(sentences)
        out = np.empty(sum(map(len, sentences)), dtype=np.int32)  # room: a word is at least one character
        lengths = np.empty(n, dtype=np.int64)
        start = pos = 0
        while start < n:
            start, pos, new = segmenter.segment_sentences(sentences, start, table.numbering.native, out, lengths, pos)
            table._extend(new)
            if start < n:  # "##" in it, or a word holding whitespace: the general path
                ids = table.sentence(segmenter, sentences[start])
                out[pos:pos + len(ids)] = ids
                lengths[start] = len(ids)
                pos += len(ids)
                start += 1
        ids_parts.append(out[:pos])
        length_parts.append(lengths)
    elif not _fast_path(segmenter):
        general(sentences)
    else:
        # Chunks: a chunk ends before the first sentence at which its sentences (+1 each) reach
        # ``chunk_chars``, and around each sentence holding "##" (the general path); found with one
        # search per chunk over the prefix sums, not a Python step per sentence.
        n = len(sentences)
        hashes = [i for i, s in enumerate(sentences) if "##" in s] if "##" in "\n".join(sentences) else []
        hashes.append(n)
        prefix = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, sentences), dtype=np.int64, count=n) + 1, out=prefix[1:])
        start = next_hash = 0
        while start < n:
            while hashes[next_hash] < start:
                next_hash += 1
            end = min(int(np.searchsorted(prefix, prefix[start] + max(chunk_chars, 1))), hashes[next_hash], n)
            if start < end:
                done = table.chunk(segmenter, sentences[start:end])
                if done is None:
                    general(sentences[start:end])
                else:
                    ids_parts.append(compact_ints(done[0]))
                    length_parts.append(done[1])
            if end == hashes[next_hash] and end < n:
                general([sentences[end]])
                end += 1
            start = end
    empty = np.zeros(0, dtype=np.int64)
    ids = np.concatenate(ids_parts) if ids_parts else empty
    ids_parts.clear()  # the shard's ids are held once (int32: the chunks are compacted as they come)
    lengths = np.concatenate(length_parts) if length_parts else empty
    # Keep the words that occur (not the line break, the space, nor a word seen only before its "##").
    counts = bincount(ids, minlength=len(table.words))
    used = table.shard_ids = np.flatnonzero(counts)
    table.shard_counts = counts[used]  # (the count of each word listed)
    remap = np.zeros(len(table.words), dtype=np.int32 if len(table.words) < 2**31 else np.int64)
    remap[used] = np.arange(len(used))
    return used, remap[ids], lengths


_ENCODE_CHUNK = 1 << 18  # words per slice of encode_shard's gather


class _EncodedWords:
    """The encodings of the words a worker has met, kept across its shards: a shard only encodes
    the words no earlier shard had (most words recur), then gathers every token from these arrays.

    ``slots(words)`` -> the slot of each word (numbered in C by a growing ``_native.TokenIndex`` over
    the words' code points: a new word costs no str, a dict entry or a Python int; else by
    ``StringNumbering``). With data_prep._native ("packed") slot k's tokens are one block of ``data``
    (its fine ids, then coarse ids, then their alignments; int32) at ``heads[2k]``, with
    ``heads[2k + 1] = nf | nc << 32``: ``_native.gather_words`` copies a shard's tokens from them in one
    pass. Without it slot k's fine ids are ``fine[fine_start[k]:fine_start[k] + fine_count[k]]``, its
    coarse ids and alignment likewise (in packed mode these are derived from the blocks when asked
    for; a value that needs int64 turns the memo into this layout, which keeps int64). Ids, alignments
    and counts are kept as int32 where every value fits, so the shard's tokens gathered from them are
    int32 too. Bounded: once it holds more than ``max_words`` words (a huge corpus) it starts over at
    the next shard (the frequent words are encoded again, once)."""

    def __init__(self, max_words: int = 500_000) -> None:
        # (numbered in C a word kept takes ~60 bytes, ~30 MB at the cap (measured on real text);
        # in Python it is a str in a dict, ~170 bytes with its entry: ~85 MB, as for the analysis's
        # word table, ``Chinese.MAX_KEPT_WORDS``; its encodings add ~35-40 bytes (packed) or ~55
        # (separate arrays), by their sizes, and up to half again of room to grow)
        self.max_words = max_words
        self._native = languages._native
        self._clear()

    def _clear(self) -> None:
        # the kept words -> their slots (slot k = the k-th word kept)
        self.slot = self._native.TokenIndex([]) if self._native is not None else StringNumbering()
        self._fine_count, self._coarse_count = _Growing(np.int32), _Growing(np.int32)
        self._chars = _Growing(np.int32)  # characters of text per word ("##" marks excluded)
        self.packed = self._native is not None
        self._heads, self._data = _Growing(np.int64), _Growing(np.int32)  # (packed)
        self._separate = {name: _Growing(np.int32) for name in ("fine", "coarse", "align")}  # (not packed)
        self._separate.update(fine_start=_Growing(np.int64), coarse_start=_Growing(np.int64))
        self._derived: dict[str, np.ndarray] | None = None  # (packed: the separate arrays, when asked for)

    fine_count = property(lambda self: self._fine_count.values)
    coarse_count = property(lambda self: self._coarse_count.values)
    chars = property(lambda self: self._chars.values)
    heads = property(lambda self: self._heads.values if self.packed else None)
    data = property(lambda self: self._data.values if self.packed else None)
    fine = property(lambda self: self._array("fine"))
    coarse = property(lambda self: self._array("coarse"))
    align = property(lambda self: self._array("align"))
    fine_start = property(lambda self: self._array("fine_start"))
    coarse_start = property(lambda self: self._array("coarse_start"))

    def _array(self, name: str) -> np.ndarray:
        """One of the separate arrays (views, valid until the next ``slots``); packed: from the blocks."""
        if not self.packed:
            return self._separate[name].values
        if self._derived is None:
            heads = self._heads.values.reshape(-1, 2)
            start, nf, nc = heads[:, 0], heads[:, 1] & 0xFFFFFFFF, heads[:, 1] >> 32
            data = self._data.values
            self._derived = {
                "fine": data[concat_ranges(start, nf)], "coarse": data[concat_ranges(start + nf, nc)],
                "align": data[concat_ranges(start + nf + nc, nc)],
                "fine_start": np.cumsum(nf) - nf, "coarse_start": np.cumsum(nc) - nc}
        return self._derived[name]

    def __len__(self) -> int:
        """How many words are kept."""
        return len(self.slot) if isinstance(self.slot, StringNumbering) else self.slot.size

    def slots(self, words: str | list[str], encode) -> np.ndarray:
        """The slot of each of ``words`` (distinct words, or them joined by WORD_SEP), encoding
        (``encode``) those not kept yet."""
        if not isinstance(words, str):
            if not words:
                return np.zeros(0, dtype=np.int64)
            words = WORD_SEP.join(words)
        if isinstance(self.slot, StringNumbering):
            if len(self.slot) > self.max_words:
                self._clear()
            slots, new_words = self.slot.joined(words, WORD_SEP)
            new = new_words or None
            if new:
                lens = np.fromiter(map(len, new_words), dtype=np.int64, count=len(new_words))
                cps = _code_points(new_words)
        else:
            if self.slot.size > self.max_words:
                self._clear()
            slots = np.empty(words.count(WORD_SEP) + 1, dtype=np.int64)
            _, _, cps_bytes, lens_bytes = self.slot.number_joined(words, WORD_SEP, slots)
            new = None
            if lens_bytes:
                lens = np.frombuffer(lens_bytes, dtype=np.int64)
                cps = np.frombuffer(cps_bytes, dtype=np.uint32)
                new = _WordsOfCodePoints(cps_bytes, lens)
        if new is not None:
            fine, coarse, align, fine_count, coarse_count = encode(new, lens, cps, distinct=True)
            self._add(compact_ints(fine), compact_ints(coarse), compact_ints(align),
                      np.asarray(fine_count, dtype=np.int64), np.asarray(coarse_count, dtype=np.int64))
            # characters of text: a word's length less its "##" mark (a continuation: "##" + a Latin run)
            starts = np.cumsum(lens) - lens
            marked = lens >= 2
            marked[marked] = (cps[starts[marked]] == 0x23) & (cps[starts[marked] + 1] == 0x23)
            self._chars.append(compact_ints(lens - 2 * marked))
        return slots

    def _add(self, fine: np.ndarray, coarse: np.ndarray, align: np.ndarray, nf: np.ndarray, nc: np.ndarray) -> None:
        """Keep the new words' encodings: as blocks (packed), or in the separate arrays."""
        self._derived = None
        if self.packed and any(a.dtype != np.int32 for a in (fine, coarse, align)):
            self._unpack()  # (a value needs int64: blocks are int32)
        self._fine_count.append(compact_ints(nf))
        self._coarse_count.append(compact_ints(nc))
        if not self.packed:
            separate = self._separate
            # each word's first fine / coarse value, continuing the kept ones
            separate["fine_start"].append(len(separate["fine"]) + np.cumsum(nf) - nf)
            separate["coarse_start"].append(len(separate["coarse"]) + np.cumsum(nc) - nc)
            for name, values in (("fine", fine), ("coarse", coarse), ("align", align)):
                separate[name].append(values)
            return
        sizes = nf + 2 * nc
        local = np.cumsum(sizes) - sizes  # each new block's start among the new blocks
        block = np.empty(int(sizes.sum()), dtype=np.int32)
        # element e of word w's fine ids goes to local[w] + (e - its first fine index) (likewise the rest)
        for values, counts, offset in ((fine, nf, local), (coarse, nc, local + nf), (align, nc, local + nf + nc)):
            firsts = np.cumsum(counts) - counts
            block[np.repeat(offset - firsts, counts) + np.arange(len(values))] = values
        heads = np.empty(2 * len(nf), dtype=np.int64)
        heads[0::2] = len(self._data) + local
        heads[1::2] = nf | (nc << 32)
        self._data.append(block)
        self._heads.append(heads)

    def _unpack(self) -> None:
        """Packed -> separate arrays (the words kept so far, from their blocks)."""
        for name in self._separate:
            self._separate[name] = _Growing(np.int64 if name.endswith("_start") else np.int32)
            self._separate[name].append(self._array(name))
        self.packed = False
        self._heads, self._data, self._derived = _Growing(np.int64), _Growing(np.int32), None


class _Growing:
    """An array appended to in place: its capacity grows by half (amortised O(1) a value, where
    growing by ``np.concatenate`` copied the whole array at every shard); ``values`` is a view of what
    it holds. A value its dtype cannot hold widens it (as ``np.concatenate`` would)."""

    def __init__(self, dtype) -> None:
        self._buf = np.zeros(0, dtype=dtype)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    @property
    def values(self) -> np.ndarray:
        return self._buf[: self._n]

    def append(self, values: np.ndarray) -> None:
        values = np.asarray(values)
        dtype = np.result_type(self._buf.dtype, values.dtype)
        need = self._n + len(values)
        if need > len(self._buf) or dtype != self._buf.dtype:
            grown = np.empty(max(need, len(self._buf) * 3 // 2, 1024), dtype=dtype)
            grown[: self._n] = self._buf[: self._n]
            self._buf = grown
        self._buf[self._n: need] = values
        self._n = need


class _Picked:
    """words[at[0]], words[at[1]], ... as a sequence, each taken when asked for."""

    def __init__(self, words: Sequence[str], at: np.ndarray) -> None:
        self._words, self._at = words, at

    def __len__(self) -> int:
        return len(self._at)

    def __getitem__(self, k: int) -> str:
        return self._words[int(self._at[k])]

    def __iter__(self):
        return map(self.__getitem__, range(len(self)))


class _WordsOfCodePoints:
    """Words as a sequence of str, made on demand from their code points (UTF-32 bytes, concatenated)
    and lengths: ``encode_words`` needs the str of only a few of the new words it encodes."""

    def __init__(self, cps: bytes, lens: np.ndarray) -> None:
        self._cps, self._lens = cps, lens
        self._text: str | None = None
        self._starts: list[int] | None = None

    def __len__(self) -> int:
        return len(self._lens)

    def __getitem__(self, w: int) -> str:
        if self._text is None:
            self._text = self._cps.decode("utf-32-le")
            self._starts = (np.cumsum(self._lens) - self._lens).tolist()
        a = self._starts[w]
        return self._text[a:a + int(self._lens[w])]

    def __iter__(self):
        return map(self.__getitem__, range(len(self)))


def write_shard_cache(cache_dir: Path, words: list[str] | str, ids: np.ndarray, sentence_words: np.ndarray,
                      sentences_per_document: np.ndarray) -> None:
    """A shard's segmentation, in one file (file creation is what shared filesystems are slow at).
    ``words``: the distinct words, or them joined by WORD_SEP."""
    joined = words if isinstance(words, str) else WORD_SEP.join(words)
    languages.save_arrays(Path(cache_dir) / SHARD_CACHE_FILE, words=np.frombuffer(joined.encode("utf-8"), dtype=np.uint8),
                          ids=ids.astype(np.int32, copy=False), sentence_words=np.asarray(sentence_words, dtype=np.int64),
                          sentences_per_document=np.asarray(sentences_per_document, dtype=np.int64))


def read_shard_cache(cache_dir: Path) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """(distinct words joined by WORD_SEP, word id per token, words per sentence, sentences per document)."""
    z = languages.load_arrays(Path(cache_dir) / SHARD_CACHE_FILE)
    return (z["words"].tobytes().decode("utf-8"), z["ids"], z["sentence_words"], z["sentences_per_document"])


def _code_points(strings: list[str]) -> np.ndarray:
    """The code points of ``strings``, concatenated (one UTF-32 buffer)."""
    return np.frombuffer("".join(strings).encode("utf-32-le"), dtype=np.uint32)


def _tokens_code_points(tokens: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The code points of ``tokens`` concatenated, each token's length and its start among them."""
    lens = np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))
    return _code_points(tokens), lens, np.cumsum(lens) - lens


def _in_sorted(values: np.ndarray, table: np.ndarray) -> np.ndarray:
    """``np.isin(values, table)`` for a sorted, unique ``table``: a binary search per value (np.isin
    hashes the table again on every call, ~6 ms for the encoder's tens of thousands of pairs, once
    per shard's new words)."""
    if not len(table):
        return np.zeros(len(values), dtype=bool)
    pos = np.minimum(np.searchsorted(table, values), len(table) - 1)
    return table[pos] == values


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """``np.unique(values)`` for integers by one sort: NumPy 2.4's hashing np.unique took 14-40 ms for the
    73k prefix pairs of a coarse vocabulary, the sort 1.5 ms."""
    values = np.sort(values)
    return values[np.concatenate(([True], values[1:] != values[:-1]))] if len(values) else values


def _by_count_then_token(items: list[tuple[str, int]]) -> None:
    """Sort (token, count) pairs by count descending, then token: the same order as the key
    (-count, token), as two stable sorts on C-level keys (no tuple per item)."""
    items.sort(key=itemgetter(0))
    items.sort(key=itemgetter(1), reverse=True)


def _word_table(words: Counter | PackedCounter) -> tuple[str, np.ndarray]:
    """(the distinct words joined by WORD_SEP, their counts as int64) of a word count table: a
    PackedCounter (the build's) without a Python object per word, or a Counter (tools, tests)."""
    if isinstance(words, PackedCounter):
        return words.keys.replace("\0", WORD_SEP), words.values.astype(np.int64, copy=False)
    return WORD_SEP.join(words), np.fromiter(words.values(), dtype=np.int64, count=len(words))


def _word_bounds(joined: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(code points, start, length) of each word of ``joined`` (words joined by WORD_SEP; not empty):
    word k is ``joined[start[k]:start[k] + length[k]]``."""
    cps = np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32)
    ends = np.append(np.flatnonzero(cps == ord(WORD_SEP)), len(cps))
    starts = np.concatenate([[0], ends[:-1] + 1])
    return cps, starts, ends - starts


def _vocab_coverage(joined: str, counts: np.ndarray, vocab: fmt.Vocab) -> tuple[int, int]:
    """(words of text, of which in ``vocab``) from the distinct words (``joined`` by WORD_SEP) and
    their ``counts``: in C through a TokenIndex of the vocabulary (no str per word), else word by word."""
    if not len(counts):
        return 0, 0
    native = languages._native
    if native is None:
        words = joined.split(WORD_SEP)
        known = np.fromiter(map(vocab.index.__contains__, words), dtype=bool, count=len(words))
    else:
        known = _words_in(_word_bounds(joined), vocab.tokens)
    return int(counts.sum()), int(counts[known].sum())


def _words_in(bounds: tuple[np.ndarray, np.ndarray, np.ndarray], tokens: Sequence[str]) -> np.ndarray:
    """Which of the words ``bounds`` (``_word_bounds``) are among ``tokens``: in C, by code points."""
    cps, starts, lens = bounds
    ids = np.empty(len(lens), dtype=np.int64)
    languages._native.TokenIndex(tokens).lookup(np.delete(cps, starts[1:] - 1), lens, ids, -1)
    return ids >= 0


def _top_words(joined: str, counts: np.ndarray, min_count: int, fine: fmt.Vocab, k: int,
               bounds: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
               in_fine: np.ndarray | None = None) -> tuple[list[str], np.ndarray]:
    """The coarse vocabulary's words: the ``k`` most frequent (then by text: ``_by_count_then_token``)
    of the distinct words (``joined`` by WORD_SEP, with their ``counts``) seen at least ``min_count``
    times that are no fine token nor white space; and their indices among the distinct words. A str is
    made only for the words that can be among them (in C the fine tokens are found by code points:
    ``in_fine``, which the caller may pass with the words' ``bounds``; most distinct words are rarer
    than ``min_count``, and only those counted at least as often as the k-th are sorted)."""
    frequent = np.flatnonzero(counts >= min_count)
    if not len(frequent) or k <= 0:
        return [], np.zeros(0, dtype=np.int64)
    cps, starts, lens = bounds if bounds is not None else _word_bounds(joined)

    def words_at(at: np.ndarray):
        return map(joined.__getitem__, map(slice, starts[at].tolist(), (starts[at] + lens[at]).tolist()))

    native = languages._native
    if in_fine is not None:
        keep = frequent[~in_fine[frequent]]
    elif native is not None:
        ids = np.empty(len(frequent), dtype=np.int64)
        native.TokenIndex(fine.tokens).lookup(cps[concat_ranges(starts[frequent], lens[frequent])], lens[frequent], ids, -1)
        keep = frequent[ids < 0]
    else:
        in_fine = np.fromiter(map(fine.index.__contains__, words_at(frequent)), dtype=bool, count=len(frequent))
        keep = frequent[~in_fine]
    # White space: a word can be only if its first character is (each distinct first character asked once).
    lead = keep[lens[keep] > 0]
    firsts = cps[starts[lead]]
    spacey = [c for c in _sorted_unique(firsts).tolist() if chr(c).isspace()]
    if spacey:
        maybe = lead[np.isin(firsts, spacey)]
        space = maybe[np.fromiter(map(str.isspace, words_at(maybe)), dtype=bool, count=len(maybe))]
        keep = np.setdiff1d(keep, space, assume_unique=True)
    if len(keep) > k:  # every word counted at least as often as the k-th most frequent (ties by text)
        kth = np.partition(counts[keep], len(keep) - k)[len(keep) - k]
        keep = keep[counts[keep] >= kth]
    words, order = _by_count_then_text(joined, cps, starts, lens, keep, counts[keep])
    return words[:k], keep[order[:k]]


_SORT_CELLS = 1 << 23  # _by_count_then_text sorts in NumPy up to this many code points (32 MB), else in Python


def _by_count_then_text(joined: str, cps: np.ndarray, starts: np.ndarray, lens: np.ndarray, at: np.ndarray,
                        counts: np.ndarray) -> tuple[list[str], np.ndarray]:
    """The words ``at`` (of ``joined``: ``_word_bounds``) with their ``counts``, as str, in
    ``_by_count_then_token``'s order (count descending, then text), and that order (positions in ``at``);
    sorted in NumPy as fixed-width
    UTF-32 strings (padded with NUL, which sorts a word before the longer words it begins, as
    Python's str order does): 72k words 30-55 ms against ~125 ms for a str each and the list sorts.
    Words holding a NUL, or too many code points padded (one long word), take the Python sort."""
    if not len(at):
        return [], np.zeros(0, dtype=np.int64)
    width = max(int(lens[at].max()), 1)
    points = cps[concat_ranges(starts[at], lens[at])]
    if len(at) * width > _SORT_CELLS or not points.all():
        items = list(zip(map(joined.__getitem__, map(slice, starts[at].tolist(), (starts[at] + lens[at]).tolist())),
                         counts.tolist(), range(len(at))))
        _by_count_then_token(items)
        return [w for w, _, _ in items], np.fromiter((i for _, _, i in items), dtype=np.int64, count=len(items))
    table = np.zeros((len(at), width), dtype=np.uint32)
    table[np.arange(width) < lens[at][:, None]] = points
    text = table.view(f"<U{width}").ravel()
    order = np.argsort(text, kind="stable")
    order = order[np.argsort(-counts[order], kind="stable")]
    return text[order].tolist(), order


def char_and_run_counts(words: Counter | PackedCounter) -> tuple[Counter, Counter]:
    """Character counts and Latin-run counts (``_CACHED_RUN``) of a text, from its word counts.

    Computed over the distinct words, each weighted by its count (a fraction of the text): a
    code-point histogram for the characters, one regular-expression pass for the runs over the words
    that hold a Latin letter or digit (a run never crosses a word boundary; over all the words the
    pattern took ~0.25 s for 631k of them, ~9k runs)."""
    chars: Counter = Counter()
    runs: Counter = Counter()
    joined, weight = _word_table(words)
    if not len(weight):
        return chars, runs
    cps = np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32)
    ends = np.append(np.flatnonzero(cps == ord(WORD_SEP)), len(cps))  # where each word ends (its separator)
    span = np.diff(ends, prepend=-1)  # each word's length + its separator
    hist = np.bincount(cps, weights=np.repeat(weight, span)[: len(cps)]).astype(np.int64)
    hist[ord(WORD_SEP)] = 0  # the separators (words never contain one)
    for cp in np.nonzero(hist)[0].tolist():
        chars[chr(cp)] = int(hist[cp])
    ascii_cps = cps[cps < 128]
    if not _ASCII_ALNUM_TABLE[ascii_cps].any():
        return chars, runs
    starts = np.cumsum(span) - span
    has_latin = np.zeros(len(weight), dtype=bool)
    alnum = np.zeros(len(cps), dtype=bool)
    alnum[cps < 128] = _ASCII_ALNUM_TABLE[ascii_cps]
    has_latin[np.searchsorted(starts, np.flatnonzero(alnum), side="right") - 1] = True
    latin = np.flatnonzero(has_latin)
    # (each word keeps its separator before it in the joined sub-text: the "##" pattern's look-behind)
    sub = WORD_SEP.join(map(joined.__getitem__, map(slice, starts[latin].tolist(), (starts + span - 1)[latin].tolist())))
    matches = [(m.start(), m.group()) for m in _CACHED_RUN.finditer(sub)]
    if matches:
        sub_lens = span[latin]  # (each word's length + 1)
        sub_starts = np.cumsum(sub_lens) - sub_lens
        owner = latin[np.searchsorted(sub_starts, [pos for pos, _ in matches], side="right") - 1]
        for (_, run), n in zip(matches, weight[owner].tolist()):
            runs[run] += n
    return chars, runs


def _check_fine_vocab_size(max_fine: int) -> None:
    """The fine vocabulary always holds the specials and the Latin letters/digits (and their "##" forms)."""
    least = fmt.NUM_SPECIAL + 2 * len(_ASCII_ALNUM) + 100
    if max_fine < least:
        raise LanguageError(f"--fine-vocab-size {max_fine} is too small for Chinese: it needs {fmt.NUM_SPECIAL} "
                            f"special tokens + {len(_ASCII_ALNUM)} Latin letters/digits and their {len(_ASCII_ALNUM)} "
                            f"\"##\" continuation forms + room for at least 100 characters; use at least {least}",
                            final=True)


# ---------------------------------------------------------------------------------------------
# The language plugin
# ---------------------------------------------------------------------------------------------
@register
class Chinese(Language):
    name = "zh"
    description = "Chinese: characters (fine) and segmenter words (coarse)"
    option_names = ("segmenter", "user_dict", "latin_min_count", "max_sentence_chars",
                    "min_cjk_fraction")
    fit_options = ("latin_min_count",)  # --vocab-from refuses it (it only shapes the fine vocabulary)
    input_options = ("min_cjk_fraction",)  # only the input check: free with --vocab-from
    file_options = ("user_dict",)  # each shard is segmented with it: a --resume must see the same words
    fit_takes_packed = True  # (a corpus's million distinct words are never a Counter)
    reads_documents_again = False  # (the shard caches hold every word: encode_shard reads them)

    @classmethod
    def shard_characters_for(cls, text_bytes: int, workers: int) -> int:
        """~4 shards a worker (Chinese text is ~3 bytes a character in UTF-8): each shard costs ~10-20 ms
        of fixed work (its distinct words listed, numbered and stored again, its files), and nothing of
        the output depends on the shard size (a test). People's Daily x4 (22 MB), 1 worker: 4 shards
        instead of 11, 1.22x faster (real text 1.09x); 2 workers: 8, as fast as 11 (0.99x)."""
        return text_bytes // (12 * max(workers, 1))
    default_fine_vocab_size = 21128
    # The paper's 72,635 words on top of the 21,128 characters the coarse vocabulary also holds (the
    # back-off spelling): the reading that gives its 176M parameters, as pipeline/model/config.py.
    default_coarse_vocab_size = 21128 + 72635
    default_fine_min_count = 1
    # Distinct words a worker's shard-to-shard word table (``analyze_shard``) may hold before it starts
    # a new one: ~100 bytes a word (the string, its dict entry, the per-word flags).
    MAX_KEPT_WORDS = 500_000

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--segmenter", choices=SEGMENTERS, default=DEFAULT_SEGMENTER,
                           help="word segmenter for coarse tokens (default %(default)s; jieba-c, rjieba and jieba "
                                "give the same words: jieba-c is jieba in C, the fastest, compiled by the set-up)")
        group.add_argument("--user-dict", help="extra words for the segmenter (jieba format: word [freq] [tag])")
        group.add_argument("--latin-min-count", type=int, default=5,
                           help="a Latin/digit run seen this often becomes one fine token")
        group.add_argument("--max-sentence-chars", type=int, default=510,
                           help="longer sentences are cut (at a comma if possible)")
        group.add_argument("--min-cjk-fraction", type=float, default=0.25,
                           help="refuse an input whose letters are less than this share Chinese")

    @classmethod
    def same_option(cls, name: str, a, b) -> bool:
        return a == b or (name == "segmenter" and a in SAME_WORDS and b in SAME_WORDS)

    @classmethod
    def options_from_args(cls, args: argparse.Namespace) -> dict:
        options = super().options_from_args(args)
        if options.get("user_dict"):
            options["user_dict"] = str(Path(options["user_dict"]).resolve())
        return options

    def __init__(self, options: dict):
        defaults = {"segmenter": DEFAULT_SEGMENTER, "user_dict": None, "latin_min_count": 5, "coarse_min_count": 2,
                    "max_sentence_chars": 510, "min_cjk_fraction": 0.25}
        super().__init__({**defaults, **options})
        if self.options["segmenter"] not in SEGMENTERS:
            raise LanguageError(f"unknown --segmenter {self.options['segmenter']!r}; choose one of {SEGMENTERS}")
        for name, low in (("max_sentence_chars", 1), ("latin_min_count", 1), ("coarse_min_count", 1)):
            value = self.options[name]
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise LanguageError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}", final=True)
        if not 0 <= self.options["min_cjk_fraction"] <= 1:
            raise LanguageError(f"--min-cjk-fraction must be between 0 and 1, got {self.options['min_cjk_fraction']!r}",
                                final=True)
        if self.options["segmenter"] == "pkuseg":
            make_segmenter("pkuseg")  # fail now, with the install hint, not in a worker
        if self.options["user_dict"]:
            read_user_dict(self.options["user_dict"])  # missing or not UTF-8: said now, not in a worker
        self._segmenter: Segmenter | None = None
        self._word_ids: WordIds | None = None
        self._totals: np.ndarray | None = np.zeros(0, dtype=np.int64)
        self._folded: tuple[PackedCounter, ...] = ()

    def check_build_options(self) -> None:
        if self.options.get("fine_vocab_size") is not None:
            _check_fine_vocab_size(self.options["fine_vocab_size"])
        _warn_if_not_compiled()
        fixed = fmt.NUM_SPECIAL + 2 * len(_ASCII_ALNUM)  # in every fine vocabulary, so in every coarse one
        coarse = self.options.get("coarse_vocab_size")
        if coarse is not None and coarse < fixed:  # refused before the analysis, not after it
            raise LanguageError(f"--coarse-vocab-size {coarse} is smaller than the fine vocabulary can be: the coarse "
                                f"vocabulary holds the whole fine one, which always has {fmt.NUM_SPECIAL} special tokens "
                                f"+ {2 * len(_ASCII_ALNUM)} Latin letters/digits and their \"##\" forms, plus the "
                                f"corpus's characters; use a few thousand more than --fine-vocab-size", final=True)

    @property
    def segmenter(self) -> Segmenter:
        if self._segmenter is None:
            self._segmenter = make_segmenter(self.options["segmenter"], self.options["user_dict"])
        return self._segmenter

    def __getstate__(self):
        return {"options": self.options, "_segmenter": None}

    def warm_up(self) -> None:
        self.segmenter.cut("预热")  # rjieba imports (and jieba loads) its dictionary: ~0.25 s

    def before_fork(self) -> None:
        from data_prep import normalize

        normalize._fast_tables()  # the normalisation's code-point tables (from the disk cache: ~1 ms)
        normalize._fast_tables(normalize._PLANES_0_TO_3)  # (and for the CJK extensions': each worker built it)
        normalize._cleanup_flags()
        if self.options["segmenter"] == "jieba-c":
            make_segmenter("jieba-c", self.options["user_dict"])  # kept in _JIEBA_C, inherited by the workers

    def package_versions(self) -> dict[str, str]:
        from importlib.metadata import PackageNotFoundError, version

        try:  # jieba-c: jieba's dictionary and HMM tables, from the jieba package
            name = "jieba" if self.options["segmenter"] == "jieba-c" else self.options["segmenter"]
            return {name: version(name)}
        except PackageNotFoundError:
            return {}

    # ---- checks / demo -------------------------------------------------------------------------
    def check_sample(self, text: str, source: str) -> str | None:
        letters, cjk = count_chars(text, _LETTER, _CJK)
        if letters < 50:
            return None
        fraction = cjk / letters
        if fraction < self.options["min_cjk_fraction"]:
            return (f"{source} does not look like Chinese: only {100 * fraction:.1f}% of the letters in its first "
                    f"{len(text):,} characters are Chinese characters (threshold {100 * self.options['min_cjk_fraction']:.0f}%, "
                    f"--min-cjk-fraction). Pass the right --lang (e.g. --lang en)")
        return None

    def demo_inputs(self):
        from data_prep.demo import peoples_daily_inputs

        return peoples_daily_inputs()

    # ---- analyze: normalise, split, segment, cache, count --------------------------------------
    def analyze_shard(self, documents: list[str], cache_dir: Path) -> dict[str, Counter | PackedCounter]:
        sentences = split_sentences_batch(normalize_documents(documents), self.options["max_sentence_chars"])
        flat = list(itertools.chain.from_iterable(sentences))
        table = self._word_ids
        if table is None or len(table.words) > self.MAX_KEPT_WORDS:  # bounded: a new table past the cap
            self._fold_totals()
            table = self._word_ids = WordIds()
        used, ids, lengths = _segment_shard(self.segmenter, flat, 1 << 14, table)
        # Sentences without words (the general path can give none) are not kept.
        sentences_per_document = np.fromiter(map(len, sentences), dtype=np.int64, count=len(sentences))
        if not lengths.all():
            document = np.repeat(np.arange(len(sentences)), sentences_per_document)
            sentences_per_document = np.bincount(document[lengths > 0], minlength=len(sentences))
        if languages._native is not None:  # (no list of the shard's ~40k words)
            joined = languages._native.join_items(table.words, used, WORD_SEP)
        else:
            joined = WORD_SEP.join([table.words[i] for i in used.tolist()])
        write_shard_cache(cache_dir, joined, ids, lengths[lengths > 0], sentences_per_document)
        # Character and Latin-run counts follow from the word counts: ``fit`` derives them once.
        counts = table.shard_counts  # (of the words listed: bincount(ids))
        keys = joined.replace(WORD_SEP, "\0")  # packed as it is (no Counter of the shard's words)
        if "\0" in joined or (counts >= 2**40).any():
            self._totals = None  # (``counts_so_far``: a table it cannot keep; the build reads them all back)
            return {"word": Counter(dict(zip(joined.split(WORD_SEP), counts.tolist())))}  # cannot be packed: left to core
        self._add_to_totals(table, counts)
        return {"word": PackedCounter(keys, counts.astype(np.int64, copy=False))}

    # The sum of the word counts of the shards this object analysed (``counts_so_far``): ``_totals``,
    # an int64 array over the kept word table's ids (``_word_ids``: adding a shard's counts is one
    # indexed add, no string is hashed; None once a shard's table could not be kept), plus the
    # tables of word tables dropped at the cap (``_folded``).
    def _add_to_totals(self, table: WordIds, counts: np.ndarray) -> None:
        if self._totals is None:
            return
        if len(self._totals) < len(table.words):  # grown by half at least: not a copy per shard
            grown = np.zeros(max(len(table.words), len(self._totals) * 3 // 2), dtype=np.int64)
            grown[: len(self._totals)] = self._totals
            self._totals = grown
        self._totals[table.shard_ids] += counts  # the shard's words (distinct) in the table's ids

    def _fold_totals(self) -> None:
        """Keep the totals of the word table about to be dropped (at ``MAX_KEPT_WORDS``) as a packed table."""
        table = self._word_ids
        if table is not None and self._totals is not None:
            self._folded = (*self._folded, self._packed_totals(table))
            self._totals = np.zeros(0, dtype=np.int64)

    def _packed_totals(self, table: WordIds) -> PackedCounter:
        used = np.flatnonzero(self._totals)
        if languages._native is not None:  # (in C: no list of the ~100k words)
            return PackedCounter(languages._native.join_items(table.words, used, "\0"), self._totals[used])
        return PackedCounter("\0".join([table.words[i] for i in used.tolist()]), self._totals[used])

    def counts_so_far(self) -> dict[str, PackedCounter | Counter] | None:
        table = self._word_ids
        if self._totals is None or (table is None and not self._folded):
            return None if self._totals is None else {}
        tables = list(self._folded) + ([self._packed_totals(table)] if table is not None else [])
        return {"word": sum_count_tables(tables) if len(tables) > 1 else tables[0]}

    # ---- fit: vocabularies ----------------------------------------------------------------------
    def fit(self, counts: dict[str, Counter], corpus: Corpus, artifacts_dir: Path) -> dict:
        max_fine = self.options["fine_vocab_size"]
        max_coarse = self.options["coarse_vocab_size"]
        min_count = self.options["fine_min_count"]
        words = counts.get("word", Counter())  # a PackedCounter from the build (``fit_takes_packed``)
        if "char" in counts:  # given (tools, tests); analyze_shard leaves them to be derived here
            chars, runs = counts["char"], counts.get("run", Counter())
        else:
            chars, runs = char_and_run_counts(words)
        joined, values = _word_table(words)
        # "#" only appears in the char counts through real text ("##" prefixes are not counted).
        always = list(_ASCII_ALNUM) + ["##" + c for c in _ASCII_ALNUM]
        _check_fine_vocab_size(max_fine)
        candidates = [(c, n) for c, n in chars.items() if n >= min_count and c not in _ASCII_ALNUM and not c.isspace()]
        always_set = set(always)
        candidates += [(r, n) for r, n in runs.items()
                       if n >= max(min_count, self.options["latin_min_count"]) and r not in always_set]
        _by_count_then_token(candidates)
        room = max_fine - fmt.NUM_SPECIAL - len(always)
        fine_tokens = always + [t for t, _ in candidates[:room]]
        fine = fmt.Vocab.from_tokens(fine_tokens)
        # Coarse: every fine token (back-off spelling), then the most frequent multi-token words.
        if max_coarse < len(fine):
            raise LanguageError(f"--coarse-vocab-size {max_coarse} is smaller than the fine vocabulary ({len(fine)}): "
                                f"the coarse vocabulary contains every fine token so out-of-vocabulary words can back "
                                f"off; raise --coarse-vocab-size or lower --fine-vocab-size",
                                final=True)  # the fix is an option, which a --resume refuses: nothing kept
        bounds = in_fine = None
        if languages._native is not None and len(values):  # which words are fine tokens, found once
            bounds = _word_bounds(joined)
            in_fine = _words_in(bounds, fine.tokens)
        multi, chosen = _top_words(joined, values, self.options["coarse_min_count"], fine, max_coarse - len(fine),
                                   bounds, in_fine)
        fine.save(artifacts_dir / fmt.FINE_VOCAB_FILE)
        if in_fine is not None:
            # A word is in the coarse vocabulary if it is a fine token or one of ``multi`` (none is a fine
            # token): its coverage needs no table of 100k words, and the file none either (every worker
            # checks it as it loads it, ``fmt.Vocab.load``).
            fmt.Vocab.save_tokens(artifacts_dir / fmt.COARSE_VOCAB_FILE, fine.tokens + multi)
            total_words, in_vocab = int(values.sum()), int(values[in_fine].sum()) + int(values[chosen].sum())
        else:
            coarse = fmt.Vocab(fine.tokens + multi)
            coarse.save(artifacts_dir / fmt.COARSE_VOCAB_FILE)
            total_words, in_vocab = _vocab_coverage(joined, values, coarse)
        self._keep_user_dict(artifacts_dir)
        return {
            "segmenter": self.options["segmenter"],
            "fine_vocab_latin_runs": sum(1 for t in fine.tokens if len(t) > 1 and t[0] != "[" and not t.startswith("##")),
            "coarse_vocab_words": len(multi),
            "distinct_words": len(values),
            "word_vocab_coverage": round(in_vocab / total_words, 6) if total_words else None,
        }

    def fit_from(self, source_dir: Path, counts: dict[str, Counter], corpus: Corpus, artifacts_dir: Path) -> dict:
        """--vocab-from: the source's vocabularies, and how well its coarse words cover this corpus."""
        stats = super().fit_from(source_dir, counts, corpus, artifacts_dir)
        self._keep_user_dict(artifacts_dir)  # DIR's copy (``dataset_options``), as it segmented this text
        joined, values = _word_table(counts.get("word", Counter()))
        coarse = fmt.Vocab.load(Path(artifacts_dir) / fmt.COARSE_VOCAB_FILE)
        total_words, in_vocab = _vocab_coverage(joined, values, coarse)
        return {**stats, "segmenter": self.options["segmenter"], "distinct_words": len(values),
                "word_vocab_coverage": round(in_vocab / total_words, 6) if total_words else None}

    def _keep_user_dict(self, artifacts_dir: Path) -> None:
        """The dataset keeps a copy of its --user-dict: encoding more text as the dataset was encoded
        (fine-tuning, inference, exports, --vocab-from) must not depend on the original file's path."""
        if self.options.get("user_dict"):
            import shutil

            shutil.copyfile(self.options["user_dict"], Path(artifacts_dir) / fmt.USER_DICT_FILE)

    @classmethod
    def dataset_options(cls, options: dict, directory: Path) -> dict:
        options = dict(options)
        copy = Path(directory) / fmt.USER_DICT_FILE
        if options.get("user_dict") and copy.is_file():  # datasets built before the copy keep the path
            options["user_dict"] = str(copy)
        return options

    # ---- encode ---------------------------------------------------------------------------------
    def load(self, artifacts_dir: Path) -> None:
        self._encoded = _EncodedWords()
        self.fine_vocab = fmt.Vocab.load(Path(artifacts_dir) / fmt.FINE_VOCAB_FILE)
        self.coarse_vocab = fmt.Vocab.load(Path(artifacts_dir) / fmt.COARSE_VOCAB_FILE)
        # Code point -> id tables (int32: every pool worker fills them; int64 took twice the time).
        self.char_table = np.full(0x110000, fmt.UNK_ID, dtype=np.int32)
        self.special_chars = np.zeros(0x110000, dtype=bool)
        self.special_chars[[ord(c) for c in _ASCII_ALNUM + "#"]] = True
        # The vocabularies' code points and lengths (one UTF-32 buffer each, no Python expression per
        # token: every pool worker loads this).
        fine_cps, fine_lens, fine_starts = _tokens_code_points(self.fine_vocab.tokens)
        coarse_cps, coarse_lens, coarse_starts = _tokens_code_points(self.coarse_vocab.tokens)
        single = np.flatnonzero(fine_lens == 1)
        self.char_table[fine_cps[fine_starts[single]]] = single
        # Coarse ids of single characters: the fine ones, plus characters that are coarse words only
        # (rare characters outside a full fine vocabulary that occur as words).
        self.coarse_char_table = self.char_table.copy()
        n_fine = len(self.fine_vocab)
        rare = n_fine + np.flatnonzero(coarse_lens[n_fine:] == 1)
        self.coarse_char_table[coarse_cps[coarse_starts[rare]]] = rare
        # Latin runs of the fine vocabulary (a cheap first-character test before the pattern)
        latin = [t for t in self.fine_vocab.tokens
                 if t.removeprefix("##")[:1] in _ASCII_ALNUM_SET and _RUN.fullmatch(t.removeprefix("##"))]
        self.max_run_piece = max((len(t.removeprefix("##")) for t in latin), default=1)
        body_lens = coarse_lens[fmt.NUM_SPECIAL:]
        multi = fmt.NUM_SPECIAL + np.flatnonzero(body_lens > 1)
        self.max_coarse_chars = int(coarse_lens[multi].max()) if len(multi) else 1  # bounds ``_backoff_plain``'s longest match
        self.max_word_pieces = min(MAX_BACKOFF_PIECES, int(body_lens.max()) if len(body_lens) else 1)
        self.max_token_chars = int(coarse_lens.max()) if len(coarse_lens) else 1  # special tokens included
        # The first two characters of every multi-character coarse word, as code-point pair keys: an
        # out-of-vocabulary word none of whose adjacent character pairs is among them backs off to
        # single characters (``_backoff_plain`` cannot match anything longer).
        first = coarse_starts[multi]
        pairs = coarse_cps[first].astype(np.int64) * 0x110000 + coarse_cps[first + 1]
        self.prefix_pairs = _sorted_unique(pairs)
        # The coarse vocabulary by code points, for encode_words' lookups and back-offs in C (None:
        # through the dict in Python; the same ids).
        native = languages._native
        self.coarse_index = native.TokenIndex(self.coarse_vocab.tokens) if native is not None else None

    def _split_run(self, run: str, continuation: bool) -> list[str]:
        index = self.fine_vocab.index
        whole = "##" + run if continuation else run
        if whole in index:
            return [whole]
        pieces = []
        pos = 0
        while pos < len(run):
            plain = pos == 0 and not continuation
            for end in range(min(len(run), pos + self.max_run_piece), pos, -1):
                token = run[pos:end] if plain else "##" + run[pos:end]
                if token in index:
                    break
            pieces.append(token)
            pos = end
        return pieces

    def fine_pieces(self, word: str) -> list[str]:
        """Fine token strings of one cached coarse word (which may start with the "##" mark)."""
        continuation = word.startswith("##")
        body = word[2:] if continuation else word
        pieces: list[str] = []
        for m in _RUN_OR_CHAR.finditer(body):
            piece = m.group()
            if piece[0] in _ASCII_ALNUM:
                pieces.extend(self._split_run(piece, continuation and m.start() == 0))
            else:
                pieces.append(piece)
        return pieces

    def _backoff(self, pieces: list[str]) -> tuple[list[int], list[int]]:
        """Coarse ids + alignment for a word outside the coarse vocabulary: greedy longest match."""
        index = self.coarse_vocab.index
        ids, align = [], []
        i, n = 0, len(pieces)
        if all(len(p) == 1 for p in pieces):
            return self._backoff_plain("".join(pieces))
        bare = [p.removeprefix("##") for p in pieces]
        longest = self.max_token_chars  # (no longer candidate can be in the vocabulary)
        while i < n:
            # pieces i..j-1 joined, for j = i + 2 .. i + max_word_pieces, built once each (not re-joined
            # for every j) and only while they fit; tried longest first
            candidates = []
            candidate = pieces[i]
            for j in range(i + 1, min(n, i + self.max_word_pieces)):
                candidate += bare[j]
                if len(candidate) > longest:
                    break
                candidates.append(candidate)
            for k in range(len(candidates) - 1, -1, -1):
                cid = index.get(candidates[k])
                if cid is not None:
                    ids.append(cid)
                    align.append(k + 2)
                    i += k + 2
                    break
            else:
                ids.append(index.get(pieces[i], fmt.UNK_ID))
                align.append(1)
                i += 1
        return ids, align

    def _backoff_plain(self, word: str) -> tuple[list[int], list[int]]:
        """``_backoff`` for a word of one fine token per character: forward longest match over the
        coarse vocabulary, at most ``max_coarse_chars`` characters at a time."""
        get, longest = self.coarse_vocab.index.get, self.max_coarse_chars
        ids, align = [], []
        i, n = 0, len(word)
        while i < n:
            for j in range(min(n, i + longest), i + 1, -1):
                cid = get(word[i:j])
                if cid is not None:
                    break
            else:
                j, cid = i + 1, get(word[i], fmt.UNK_ID)
            ids.append(cid)
            align.append(j - i)
            i = j
        return ids, align

    def encode_word(self, word: str, special: bool | None = None) -> tuple[list[int], list[int], list[int]]:
        """(fine ids, coarse ids, align) of one cached word, the slow but general path.

        ``special``: the word has Latin letters/digits or "#" (None: find out)."""
        fget = self.fine_vocab.index.get
        if special is None:
            special = self._needs_pieces(word)
        if not special:  # one fine token per character
            fine = [fget(c, fmt.UNK_ID) for c in word]
            cid = self.coarse_vocab.index.get(word)
            if cid is not None:
                return fine, [cid], [len(word)]
            coarse, align = self._backoff_plain(word)
            return fine, coarse, align
        pieces = self.fine_pieces(word)
        fine = [fget(p, fmt.UNK_ID) for p in pieces]
        cid = self.coarse_vocab.index.get(word)
        if cid is not None:
            return fine, [cid], [len(pieces)]
        coarse, align = self._backoff(pieces)
        return fine, coarse, align

    @staticmethod
    def _needs_pieces(word: str) -> bool:
        return _NEEDS_CARE.search(word) is not None

    def encode_words(self, words: Sequence[str], lens: np.ndarray | None = None, cps: np.ndarray | None = None,
                     distinct: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Encode a flat list of cached words -> (fine, coarse, align, fine count per word, coarse count per word).

        Regular words (in the coarse vocabulary, no Latin letters/digits) are encoded with array
        operations: one fine token per character through the code-point table. The others (a few
        percent) go through ``encode_word`` once per distinct word and are gathered into place.
        ``lens`` (characters per word) and ``cps`` (the words' code points, concatenated) may be
        passed when the caller has them; ``distinct``: no word occurs twice (the word memo's new
        words), so a str is made only for the words the general path takes.
        """
        W = len(words)
        if lens is None:
            lens = np.fromiter(map(len, words), dtype=np.int64, count=W)
        if cps is None:
            cps = np.frombuffer("".join(words).encode("utf-32-le"), dtype=np.uint32)
        index = getattr(self, "coarse_index", None)
        if index is not None:  # in C, from the code points (no dict probe per word)
            coarse_w = np.empty(W, dtype=np.int64)
            index.lookup(cps, lens, coarse_w, -1)
        else:
            cget = self.coarse_vocab.index.get
            coarse_w = np.fromiter(map(cget, words, itertools.repeat(-1, W)), dtype=np.int64, count=W)
        fine_chars = self.char_table[cps]
        special = np.zeros(W, dtype=bool)
        special_char = self.special_chars[cps]
        word_of_char = None
        if special_char.any():
            word_of_char = np.repeat(np.arange(W), lens)
            special[word_of_char[special_char]] = True
        # Out-of-vocabulary words of one fine token per character back off to single characters
        # unless an adjacent character pair could start a coarse word: those are encoded here.
        trivial = ~special & (coarse_w < 0)
        if trivial.any():
            if word_of_char is None:
                word_of_char = np.repeat(np.arange(W), lens)
            keys = cps[:-1].astype(np.int64) * 0x110000 + cps[1:]
            inside = (word_of_char[:-1] == word_of_char[1:]) & trivial[word_of_char[:-1]]
            hits = inside.copy()
            hits[inside] = _in_sorted(keys[inside], self.prefix_pairs)
            trivial[word_of_char[:-1][hits]] = False
        irregular = np.nonzero(special | ((coarse_w < 0) & ~trivial))[0]
        if len(irregular) == 0 and not trivial.any():
            return fine_chars, coarse_w, lens.copy(), lens, np.ones(W, dtype=np.int64)
        # Distinct irregular words, each encoded once; ``code`` maps each occurrence to its word.
        if distinct:
            code, first = np.arange(len(irregular)), irregular
            names: Sequence[str] = _Picked(words, irregular)
        else:
            seen: dict[str, int] = {}
            code = np.array([seen.setdefault(words[w], len(seen)) for w in irregular.tolist()], dtype=np.int64)
            first = np.zeros(len(seen), dtype=np.int64)
            first[code[::-1]] = irregular[::-1]  # an occurrence of each distinct word
            names = list(seen)
        char_start = np.cumsum(lens) - lens
        d_fine, d_coarse, d_align, d_fine_count, d_coarse_count, order = self._encode_distinct(
            names, first, special, lens, cps, char_start, fine_chars)
        if order is not None:  # the distinct words were encoded in another order: renumber them
            rank = np.empty(len(order), dtype=np.int64)
            rank[order] = np.arange(len(order))
            code = rank[code]
        irr_fine_count = d_fine_count[code]
        irr_coarse_count = d_coarse_count[code]
        irr_fine = d_fine[concat_ranges((np.cumsum(d_fine_count) - d_fine_count)[code], irr_fine_count)]
        coarse_src = concat_ranges((np.cumsum(d_coarse_count) - d_coarse_count)[code], irr_coarse_count)
        fine_count = lens.copy()
        fine_count[irregular] = irr_fine_count
        coarse_count = np.ones(W, dtype=np.int64)
        coarse_count[trivial] = lens[trivial]
        coarse_count[irregular] = irr_coarse_count
        fine_start = np.cumsum(fine_count) - fine_count
        coarse_start = np.cumsum(coarse_count) - coarse_count
        fine = np.empty(int(fine_count.sum()), dtype=np.int64)
        coarse = np.empty(int(coarse_count.sum()), dtype=np.int64)
        align = np.empty(len(coarse), dtype=np.int64)
        # Regular words: scatter characters / coarse ids to their output positions.
        regular = np.ones(W, dtype=bool)
        regular[irregular] = False
        if word_of_char is None:
            word_of_char = np.repeat(np.arange(W), lens)
        regular_char = regular[word_of_char]
        wc = word_of_char[regular_char]
        fine[fine_start[wc] + (np.nonzero(regular_char)[0] - char_start[wc])] = fine_chars[regular_char]
        single = regular & ~trivial
        coarse[coarse_start[single]] = coarse_w[single]
        align[coarse_start[single]] = lens[single]
        if trivial.any():  # their characters' fine ids, one coarse token each
            positions = concat_ranges(coarse_start[trivial], lens[trivial])
            coarse[positions] = self.coarse_char_table[cps[trivial[word_of_char]]]
            align[positions] = 1
        # Irregular words: their encodings go to [start, start + count) of each occurrence.
        fine[concat_ranges(fine_start[irregular], irr_fine_count)] = irr_fine
        positions = concat_ranges(coarse_start[irregular], irr_coarse_count)
        coarse[positions] = d_coarse[coarse_src]
        align[positions] = d_align[coarse_src]
        return fine, coarse, align, fine_count, coarse_count

    def _encode_distinct(self, words: Sequence[str], first: np.ndarray, special: np.ndarray, lens: np.ndarray,
                         cps: np.ndarray, char_start: np.ndarray, fine_chars: np.ndarray):
        """``encode_word`` for each of the distinct ``words`` (word k occurs at position first[k] of the
        batch) -> (fine, coarse, align, fine count, coarse count, order): the encodings concatenated in
        ``order`` (the words' indices; None: as given). With the C index the plain words (one fine token
        per character, outside the coarse vocabulary: most of them) back off in one C call, ahead of
        the special ones (Latin letters, digits, "#"), which take the general path."""
        index = getattr(self, "coarse_index", None)
        if index is None:
            order, plain_n, general = None, 0, words
        else:
            is_special = special[first]
            plain, rest = np.flatnonzero(~is_special), np.flatnonzero(is_special)
            order, plain_n = np.concatenate([plain, rest]), len(plain)
            general = [words[k] for k in rest.tolist()]
        parts: list[tuple[np.ndarray, ...]] = []
        if plain_n:
            at = first[order[:plain_n]]
            p_lens = lens[at]
            chars = concat_ranges(char_start[at], p_lens)
            p_cps = np.ascontiguousarray(cps[chars])
            ids, align = np.empty(len(p_cps), dtype=np.int64), np.empty(len(p_cps), dtype=np.int64)
            counts = np.empty(plain_n, dtype=np.int64)
            n = index.backoff(p_cps, p_lens, self.max_coarse_chars, fmt.UNK_ID, ids, align, counts)
            parts.append((fine_chars[chars].astype(np.int64), ids[:n], align[:n], p_lens, counts))
        if general:
            flags = special[first[order[plain_n:]]] if order is not None else special[first]
            encoded = [self.encode_word(word, bool(flag)) for word, flag in zip(general, flags.tolist())]
            fine_count = np.fromiter(map(len, (e[0] for e in encoded)), dtype=np.int64, count=len(encoded))
            coarse_count = np.fromiter(map(len, (e[1] for e in encoded)), dtype=np.int64, count=len(encoded))
            fine = np.fromiter(itertools.chain.from_iterable(e[0] for e in encoded), dtype=np.int64, count=int(fine_count.sum()))
            coarse = np.fromiter(itertools.chain.from_iterable(e[1] for e in encoded), dtype=np.int64, count=int(coarse_count.sum()))
            align = np.fromiter(itertools.chain.from_iterable(e[2] for e in encoded), dtype=np.int64, count=len(coarse))
            parts.append((fine, coarse, align, fine_count, coarse_count))
        if not parts:  # (no irregular word: only trivial ones)
            parts.append(tuple(np.zeros(0, dtype=np.int64) for _ in range(5)))
        joined = [np.concatenate(column) for column in zip(*parts)]
        return (*joined, order)

    def encode_shard(self, cache_dir: Path) -> EncodedShard:
        """Each distinct word is encoded once per worker (``encode_words``, kept across shards by
        ``_EncodedWords``); the shard's tokens are gathered from those encodings by word id.

        The gather fills preallocated output arrays (of the memo's dtype: int32): with data_prep._native
        in one C pass over the words from the memo's per-word blocks (``_native.gather_words``: no index
        array); else over slices of ``_ENCODE_CHUNK`` words, so its index arrays take memory per slice,
        not per shard token."""
        cache_dir = Path(cache_dir)
        text, ids, sentence_words, sentences_per_document = read_shard_cache(cache_dir)
        empty = np.zeros(0, dtype=np.int64)
        if not len(ids):
            return EncodedShard(empty, empty, empty, empty, empty, sentences_per_document, 0, {})
        if int(sentence_words.sum()) != len(ids):
            raise fmt.FormatError(f"{cache_dir}: the shard cache is inconsistent ({int(sentence_words.sum())} words in its "
                                  f"sentences, {len(ids)} word ids); delete the build's .partial work directory and run again")
        memo = self._encoded
        slots = memo.slots(text, self.encode_words)  # (the words joined: no str for a word kept already)
        del text
        # Totals from the occurrences of each distinct word (exact int64 dot products).
        occurrences = bincount(ids, minlength=len(slots))
        fine_total = int(occurrences @ memo.fine_count[slots].astype(np.int64))
        coarse_total = int(occurrences @ memo.coarse_count[slots].astype(np.int64))
        characters = int(occurrences @ memo.chars[slots])
        del occurrences
        fine = np.empty(fine_total, dtype=np.int32 if memo.packed else memo.fine.dtype)
        coarse = np.empty(coarse_total, dtype=np.int32 if memo.packed else memo.coarse.dtype)
        align = np.empty(coarse_total, dtype=np.int32 if memo.packed else memo.align.dtype)
        if memo.packed:  # (int32 throughout)
            # one pass in C over the words, from their blocks (no per-slice index arrays)
            fine_lengths = np.empty(len(sentence_words), dtype=np.int64)
            coarse_lengths = np.empty(len(sentence_words), dtype=np.int64)
            languages._native.gather_words(memo.heads, memo.data, slots, np.ascontiguousarray(ids),
                                           np.ascontiguousarray(sentence_words, dtype=np.int64), fine, coarse, align,
                                           fine_lengths, coarse_lengths)
            return EncodedShard(fine=fine, coarse=coarse, align=align, fine_lengths=fine_lengths,
                                coarse_lengths=coarse_lengths, document_sentences=sentences_per_document,
                                characters=characters)
        # Per sentence: the offset of its first fine / coarse token (lengths are their differences).
        sentence_starts = np.cumsum(sentence_words, dtype=np.int64) - sentence_words
        fine_offsets = np.empty(len(sentence_starts) + 1, dtype=np.int64)
        coarse_offsets = np.empty(len(sentence_starts) + 1, dtype=np.int64)
        fine_offsets[-1], coarse_offsets[-1] = fine_total, coarse_total
        f = c = 0
        for a in range(0, len(ids), _ENCODE_CHUNK):
            tokens = slots[ids[a:a + _ENCODE_CHUNK]]
            fine_count, coarse_count = memo.fine_count[tokens], memo.coarse_count[tokens]
            fine_local = np.cumsum(fine_count, dtype=np.int64) - fine_count
            coarse_local = np.cumsum(coarse_count, dtype=np.int64) - coarse_count
            lo, hi = np.searchsorted(sentence_starts, [a, a + len(tokens)])
            fine_offsets[lo:hi] = f + fine_local[sentence_starts[lo:hi] - a]
            coarse_offsets[lo:hi] = c + coarse_local[sentence_starts[lo:hi] - a]
            nf, nc = int(fine_local[-1]) + int(fine_count[-1]), int(coarse_local[-1]) + int(coarse_count[-1])
            if languages._native is not None:  # each word's tokens copied in C (one pass, no index arrays)
                gather = languages._native.gather_ranges
                tokens = tokens.astype(np.int64, copy=False)
                gather(memo.fine, memo.fine_start, memo.fine_count, tokens, fine[f:f + nf])
                gather(memo.coarse, memo.coarse_start, memo.coarse_count, tokens, coarse[c:c + nc])
                gather(memo.align, memo.coarse_start, memo.coarse_count, tokens, align[c:c + nc])
            else:
                fine[f:f + nf] = memo.fine[concat_ranges(memo.fine_start[tokens], fine_count)]
                coarse_src = concat_ranges(memo.coarse_start[tokens], coarse_count)
                coarse[c:c + nc] = memo.coarse[coarse_src]
                align[c:c + nc] = memo.align[coarse_src]
            f, c = f + nf, c + nc
        return EncodedShard(
            fine=fine,
            coarse=coarse,
            align=align,
            fine_lengths=np.diff(fine_offsets),
            coarse_lengths=np.diff(coarse_offsets),
            document_sentences=sentences_per_document,
            characters=characters,
        )

    # ---- convenience for tests / tools ----------------------------------------------------------
    def encode_text(self, text: str) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Encode one document (after ``load``): [(fine, coarse, align)] per sentence."""
        out = []
        for sentence in split_sentences(normalize_text(text), self.options["max_sentence_chars"]):
            words = segment_sentence(self.segmenter, sentence)
            if words:
                fine, coarse, align, _, _ = self.encode_words(words)
                out.append((fine, coarse, align))
        return out
