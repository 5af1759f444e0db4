"""Text normalisation and sentence splitting shared by the language plugins.

Choices (the decode round trip depends on them, see ``format.detokenize``):
- Unicode NFKC: People's Daily writes digits and Latin letters full width ("１９９８", "ＧＤＰ");
  NFKC makes them ASCII so "1998" is one token whatever the source used. It also maps the
  ideographic space U+3000 to a space.
- Control characters (C0/C1 except tab/newline), zero-width characters and the BOM are removed;
  U+FFFD (from --encoding-errors replace) is kept so the damage stays visible as [UNK].
- Whitespace: for Chinese (``keep_space="wordlike"``) a space survives only between two ASCII
  letters/digits ("Windows 98"), everything else is joined, exactly what detokenize rebuilds; for
  English (``keep_space="all"``) runs of whitespace become one space.
- Sentences end after 。！？!?… (and closing quotes/brackets that follow), after "." followed by a
  space, and at every line break of the document. For Chinese the space after such a "." is dropped
  with the others, so normalisation turns it into the line break that ends the sentence
  ("stable. It" -> "stable.\nIt"; it used to become "stable.It", one sentence). A sentence longer than ``max_sentence_chars``
  is cut at the last comma-like mark, else hard (a sentence is a training unit, not a whole book).
"""

from __future__ import annotations

import functools
import re
import sys
import unicodedata
from collections.abc import Callable, Iterator

import numpy as np

from data_prep import languages

# C0/C1 controls except \t \n, zero-width space/joiners, word joiner, BOM, soft hyphen.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u00ad\u200b-\u200d\u2060\ufeff]")
_LINE_BREAKS = re.compile("\r\n|[\r\u2028\u2029\x85]")
_SPACES = re.compile(r"[^\S\n]+")
# A space NOT between two ASCII letters/digits: dropped for Chinese. (Written to start with the
# space itself, so the regular-expression engine jumps from space to space: 7x faster.)
_NON_WORD_SPACE = re.compile(r" (?:(?<![A-Za-z0-9] )|(?![A-Za-z0-9]))")
_LINE_BREAK_CHARS = ("\r", "\u2028", "\u2029", "\x85")
# A Western sentence end (see _SENTENCE_END) whose space the Chinese clean-up would drop.
_PERIOD_SPACE = re.compile(r"\. ")
# (The lookahead names the possible first characters up front, so the engine skips to them:
# scanning a batch takes half the time.)
_SENTENCE_END = re.compile(r"(?=[。！？!?….])(?:[。！？!?]+|…+|\.(?= ))[”’」』）)\]】\"'》]*")
_SOFT_CUT = re.compile(r"[，,、；;：:]")
# Full-width ASCII forms and the ideographic space: NFKC maps each to one ASCII character.
_WIDE = re.compile("[\u3000\uff01-\uff5e]+")
_WIDE_TO_ASCII = {0x3000: " ", **{c: chr(c - 0xFEE0) for c in range(0xFF01, 0xFF5F)}}


def _wide_to_ascii(m: re.Match) -> str:
    return m.group().translate(_WIDE_TO_ASCII)


def nfkc(text: str) -> str:
    """``unicodedata.normalize("NFKC", text)``, ~2x faster on Chinese text with full-width forms.

    Replacing a character by its full compatibility decomposition does not change the NFKC of the
    text, so the full-width runs are mapped to ASCII first (one regular-expression pass); most text
    is then already NFKC, which ``is_normalized`` confirms far faster than ``normalize`` builds it."""
    text = _WIDE.sub(_wide_to_ascii, text)
    return text if unicodedata.is_normalized("NFKC", text) else unicodedata.normalize("NFKC", text)


def normalize_text(text: str, keep_space: str = "wordlike") -> str:
    """NFKC + control-character removal + whitespace clean-up; line breaks are kept (as '\\n')."""
    text = nfkc(text)
    text = _LINE_BREAKS.sub("\n", text)
    text = _CONTROL.sub("", text)
    return _clean_spaces(text, keep_space)


def _clean_spaces(text: str, keep_space: str) -> str:
    """Runs of whitespace (not line breaks) -> one space; "wordlike": then ". " -> ".\n" and only
    the spaces between two ASCII letters/digits kept (in C with data_prep._native: one pass)."""
    if languages._native is not None:
        return languages._native.clean_spaces(text, keep_space == "wordlike")
    text = _SPACES.sub(" ", text)
    if keep_space == "wordlike":
        if ". " in text:
            text = _PERIOD_SPACE.sub(".\n", text)
        text = _NON_WORD_SPACE.sub("", text)
    return text


# Joins documents for batch normalisation: a private-use character (no decomposition, not a
# control, space or letter/digit, a starter that composes with nothing).
_DOC_SEP = "\ue000"


def batches(items: list, size: Callable[[object], int], limit: int) -> Iterator[list]:
    """Consecutive runs of ``items`` whose sizes add up to at most ``limit`` (one item if it alone
    is larger): bounds the memory of the batch-wise passes below."""
    batch: list = []
    total = 0
    for item in items:
        n = size(item)
        if batch and total + n > limit:
            yield batch
            batch, total = [], 0
        batch.append(item)
        total += n
    if batch:
        yield batch


def normalize_documents(documents: list[str], keep_space: str = "wordlike", batch_chars: int = 1 << 20) -> list[str]:
    """``[normalize_text(d, keep_space) for d in documents]``, several times faster on short documents.

    With data_prep._native, one C pass over each document's characters through a table per code point
    (``_fast_tables``: ~5x faster than the passes below); a document holding a character whose NFKC
    may depend on its neighbours (combining marks and what they compose with), or one beyond plane 3,
    is left to the batch path. That path processes ~``batch_chars`` characters at a time as one string
    (one pass of each regular expression instead of one per document), joined by ``_DOC_SEP``, which
    no step changes or matches across: full-width forms are mapped to ASCII as code-point arithmetic,
    then ``is_normalized`` picks the documents that still need NFKC. It falls back to one document at a
    time if a document contains the separator."""
    native = languages._native
    if native is not None and documents:
        wordlike = keep_space == "wordlike"
        texts, rest = native.normalize_fast(documents, *_fast_tables(), wordlike)
        astral = [i for i in rest if documents[i] and max(documents[i]) > "\uffff"]
        if astral:  # (CJK extensions B-G: the table of planes 0-3, built when first needed)
            done, still = native.normalize_fast([documents[i] for i in astral], *_fast_tables(_PLANES_0_TO_3), wordlike)
            for i, text in zip(astral, done):
                texts[i] = text
            rest = sorted(set(rest) - set(astral) | {astral[j] for j in still})
        if rest:
            for i, text in zip(rest, _normalize_in_batches([documents[i] for i in rest], keep_space, batch_chars)):
                texts[i] = text
        return texts
    return _normalize_in_batches(documents, keep_space, batch_chars)


def _normalize_in_batches(documents: list[str], keep_space: str, batch_chars: int) -> list[str]:
    if sum(map(len, documents)) > batch_chars:
        return [d for batch in batches(documents, len, batch_chars) for d in _normalize_batch(batch, keep_space)]
    return _normalize_batch(documents, keep_space)


# The kinds of code point of ``_native.normalize_fast`` (its comment says what each does).
_NK_UNSAFE, _NK_KEEP, _NK_MAP, _NK_BREAK, _NK_DROP, _NK_SPACE = range(6)


_PLANES_0_TO_3 = 0x40000


_TABLES_VERSION = 1  # of ``_derive_fast_tables``'s rules (a change makes the disk cache's entries stale)


@functools.cache
def _fast_tables(size: int = 0x10000) -> tuple[bytes, np.ndarray, np.ndarray]:
    """``_native.normalize_fast``'s tables for the first ``size`` code points (the BMP, or planes 0-3
    for the CJK extensions): (kinds: a byte per code point, map_starts, map_data). Derived from this
    Python's unicodedata (``_derive_fast_tables``: ~40 ms for the BMP, ~0.12 s for planes 0-3: in each
    pool worker that met a CJK extension character, 0.2 s of its first shard), so kept in
    ``languages.cache_dir()`` under a name made from the Unicode version, the rules' version and the
    patterns they use, and read back in ~1 ms (both before the workers fork: they inherit them). A
    missing, damaged or unwritable cache costs only the derivation."""
    recipe = f"{size}|{sys.version_info[:2]}|{unicodedata.unidata_version}|{_TABLES_VERSION}|{_CONTROL.pattern}|{_LINE_BREAK_CHARS}|{_SPACES}"
    blob = languages.cached_bytes("nfkc-tables", recipe, lambda: _table_bytes(*_derive_fast_tables(size)))
    if len(blob) >= 5 * size + 4 and (len(blob) - size) % 4 == 0:
        starts = np.frombuffer(blob, dtype="<i4", count=size + 1, offset=size).astype(np.int32, copy=False)
        data = np.frombuffer(blob, dtype="<i4", offset=5 * size + 4).astype(np.int32, copy=False)
        if starts[0] == 0 and starts[-1] == len(data) and (np.diff(starts) >= 0).all():
            return blob[:size], starts, data
    return _derive_fast_tables(size)  # (bytes of another layout under the name: never written by this version)


def _table_bytes(kinds: bytes, starts: np.ndarray, data: np.ndarray) -> bytes:
    """The tables as ``_fast_tables`` keeps them: kinds, then starts and data as little-endian int32."""
    return kinds + starts.astype("<i4").tobytes() + data.astype("<i4").tobytes()


def _derive_fast_tables(size: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    """``_fast_tables`` from unicodedata.

    A code point is *plain* if NFKC leaves it and its neighbours alone whatever they are: no
    decomposition, combining class 0, and not the second character of any canonical pair (NFC composes
    those with the character before them: combining marks, a few vowel signs; Hangul vowels and final
    consonants, composed by rule) nor a Hangul jamo; surrogates are not. A plain line break, control
    character or space is BREAK, DROP or SPACE (as ``normalize_text`` handles them after NFKC), any
    other plain one KEEP. A code point with a decomposition is MAP if its NFKD is all plain characters
    (so nothing composes: its NFKC is that NFKD, next to anything) that are KEEP or SPACE, itself of
    class 0 and not a second character: ``normalize_text`` gives the same as with the map applied
    first. Everything else is UNSAFE (its document takes the general path)."""
    # every code point below size as a str (surrogates too), from one UTF-32 decode (faster than chr)
    chars = list(np.arange(size, dtype="<u4").tobytes().decode("utf-32-le", "surrogatepass"))
    decomposition = list(map(unicodedata.decomposition, chars))
    seconds = np.zeros(size, dtype=bool)
    seconds[[int(d.split()[1], 16) for d in decomposition if d and d[0] != "<" and len(d.split()) == 2]] = True
    seconds[0x1100:0x1200] = seconds[0xD800:0xE000] = True  # Hangul jamo, surrogates
    plain = ~(np.fromiter(map(bool, decomposition), dtype=bool, count=size) | seconds
              | np.fromiter(map(unicodedata.combining, chars), dtype=np.int32, count=size).astype(bool))
    spaces, controls = _space_and_control_code_points()  # (none lies beyond the BMP)
    kinds = np.where(plain, _NK_KEEP, _NK_UNSAFE).astype(np.uint8)
    for found, kind in ((spaces, _NK_SPACE), (controls, _NK_DROP), ([ord(c) for c in _LINE_BREAK_CHARS], _NK_BREAK)):
        kinds[found] = np.where(plain[found], kind, _NK_UNSAFE)
    starts = np.zeros(size + 1, dtype=np.int32)
    data: list[int] = []
    allowed = (_NK_KEEP, _NK_SPACE)
    for c in np.flatnonzero(~plain & ~seconds).tolist():
        nfkd = unicodedata.normalize("NFKD", chars[c]) if decomposition[c] else ""
        if (nfkd and all(ord(x) < size and kinds[ord(x)] in allowed for x in nfkd)
                and unicodedata.combining(chars[c]) == 0 and unicodedata.normalize("NFKC", chars[c]) == nfkd):
            kinds[c] = _NK_MAP
            data.extend(map(ord, nfkd))
            starts[c + 1] = len(data)
    np.maximum.accumulate(starts, out=starts)
    return kinds.tobytes(), starts, np.array(data, dtype=np.int32)


_SPACE, _CONTROL_CHAR = 1, 2


@functools.cache
def _cleanup_flags() -> np.ndarray:
    """BMP code point -> _SPACE (whitespace other than a line break, ``_SPACES``; the ideographic space
    too, before it becomes a space) | _CONTROL_CHAR (``_CONTROL``); none lies beyond the BMP."""
    spaces, controls = _space_and_control_code_points()
    flags = np.zeros(0x10000, dtype=np.uint8)
    flags[spaces] |= _SPACE
    flags[controls] |= _CONTROL_CHAR
    return flags


@functools.cache
def _space_and_control_code_points() -> tuple[list[int], list[int]]:
    """The BMP's whitespace other than the line break, and its ``_CONTROL`` characters (one regular
    expression pass over a string of them all)."""
    every = "".join(map(chr, range(0x10000)))
    return ([m.start() for m in re.finditer(r"[^\S\n]", every)], [m.start() for m in _CONTROL.finditer(every)])


def _found_flags(cps: np.ndarray) -> int:
    """The ``_cleanup_flags`` of these code points, or-ed."""
    return int(np.bitwise_or.reduce(_cleanup_flags()[np.minimum(cps, 0xFFFF)])) if len(cps) else 0


def _normalize_batch(documents: list[str], keep_space: str) -> list[str]:
    if len(documents) < 2:
        return [normalize_text(d, keep_space) for d in documents]
    joined = _DOC_SEP.join(documents)
    if joined.count(_DOC_SEP) != len(documents) - 1:
        return [normalize_text(d, keep_space) for d in documents]
    try:
        cps = np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32)
    except UnicodeEncodeError:  # lone surrogates
        return [normalize_text(d, keep_space) for d in documents]
    wide = (cps >= 0xFF01) & (cps <= 0xFF5E)
    ideographic_space = cps == 0x3000
    if wide.any() or ideographic_space.any():
        cps = cps.copy()
        cps[wide] -= 0xFEE0
        cps[ideographic_space] = 0x20
        joined = cps.tobytes().decode("utf-32-le")
    parts = joined.split(_DOC_SEP)
    is_normalized, normalize = unicodedata.is_normalized, unicodedata.normalize
    # Which clean-ups have anything to do, from the code points (one table lookup each, ~5x faster
    # than a regex pass finding nothing: Chinese text often has no space nor control at all); NFKC
    # may make spaces ("\u00a8" -> " \u0308"), so the documents it changed are looked at again after it.
    found = _found_flags(cps)
    if not all(is_normalized("NFKC", d) for d in parts):
        changed = []
        for i, d in enumerate(parts):
            if not is_normalized("NFKC", d):
                parts[i] = normalize("NFKC", d)
                changed.append(parts[i])
        joined = _DOC_SEP.join(parts)
        try:
            found |= _found_flags(np.frombuffer("".join(changed).encode("utf-32-le"), dtype=np.uint32))
        except UnicodeEncodeError:
            found = _SPACE | _CONTROL_CHAR
    if any(c in joined for c in _LINE_BREAK_CHARS):  # four C-speed scans, not one regex pass
        joined = _LINE_BREAKS.sub("\n", joined)
    if found & _CONTROL_CHAR:
        joined = _CONTROL.sub("", joined)
    if not found & _SPACE:
        return joined.split(_DOC_SEP)
    return _clean_spaces(joined, keep_space).split(_DOC_SEP)


def split_sentences(text: str, max_sentence_chars: int = 512) -> list[str]:
    """Sentences of normalised text: split at sentence ends and line breaks; no empty sentence."""
    sentences: list[str] = []
    for line in text.split("\n"):
        start = 0
        for m in _SENTENCE_END.finditer(line):
            _add(sentences, line[start:m.end()], max_sentence_chars)
            start = m.end()
        _add(sentences, line[start:], max_sentence_chars)
    return sentences


def _with_newline(m: re.Match) -> str:  # 20% faster than the template "\\g<0>\n" (expanded in Python)
    return m.group() + "\n"


def split_sentences_batch(documents: list[str], max_sentence_chars: int = 512) -> list[list[str]]:
    """``[split_sentences(d, max_sentence_chars) for d in documents]`` in a few passes over the whole
    batch: a line break is inserted after every sentence end (one regular-expression substitution;
    a match never spans a line break, so the pieces are those of the per-line scan), documents are
    told apart by a NUL line (no document holds a NUL: the reader removes them), and only sentences
    over the limit go through the cutting loop. A test compares it with the per-document function.

    With data_prep._native (compiled C), one scan of each document's characters finds the same ends
    and strips the same pieces (~5x faster); only documents with a sentence over the limit go through
    the cutting loop here."""
    if languages._native is not None:
        out, long_documents = languages._native.split_sentences(documents, max_sentence_chars)
        for i in long_documents:
            cut: list[str] = []
            for sentence in out[i]:
                _add(cut, sentence, max_sentence_chars)
            out[i] = cut
        return out
    joined = "\n\0\n".join(documents)
    if joined.count("\0") != max(0, len(documents) - 1):  # a NUL inside a document
        return [split_sentences(d, max_sentence_chars) for d in documents]
    out: list[list[str]] = []
    doc: list[str] = []
    for sentence in [p.strip() for p in _SENTENCE_END.sub(_with_newline, joined).split("\n")]:
        if not sentence:
            continue
        if sentence == "\0":
            out.append(doc)
            doc = []
        elif len(sentence) > max_sentence_chars:
            _add(doc, sentence, max_sentence_chars)
        else:
            doc.append(sentence)
    if documents:
        out.append(doc)
    return out


def _add(out: list[str], sentence: str, limit: int) -> None:
    sentence = sentence.strip()
    while len(sentence) > limit:
        cut = None
        for m in _SOFT_CUT.finditer(sentence, limit // 2, limit):
            cut = m.end()
        cut = cut or limit
        head, sentence = sentence[:cut].strip(), sentence[cut:].strip()
        if head:
            out.append(head)
    if sentence:
        out.append(sentence)
