"""Encode raw text with EXACTLY the tokenizers a pre-training dataset was built with.

Fine-tuning and inference must see the same fine tokens, the same segmentation / phrase dictionary
and the same vocabularies as pre-training; any drift silently degrades the model. So nothing here
re-implements a tokenizer: the language plugin is rebuilt from the options recorded in the
dataset's ``meta.json`` (``build.language_options``) and its own ``load(artifacts_dir)`` reads the
artifacts (vocabularies, fine_tokenizer.json, phrases.tsv) back, as every build worker does.

    encoder = TextEncoder.from_directory("data/demo-zh")      # a dataset or an exported model dir
    enc = encoder.encode("今天天气很好。")                    # EncodedText(fine, coarse, align)
    enc, unit_of_fine = encoder.encode_units(["今天", "天气"])  # token tasks: which input unit each fine token is in

``encode`` returns the tokens of the text WITHOUT special tokens (all sentences concatenated); the
fine-tuning data side adds [CLS] / [SEP] and truncates at coarse-token boundaries, so a coarse
token never loses part of the fine tokens it covers.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep import format as fmt
from data_prep.languages import Language, get_language


class EncodeError(ValueError):
    """Text that cannot be encoded (empty, or nothing left after normalisation). The message names the fix."""


@dataclass
class EncodedText:
    """One text as aligned fine / coarse ids (no special tokens)."""

    fine: np.ndarray
    """Fine ids (int64)."""
    coarse: np.ndarray
    """Coarse ids (int64)."""
    align: np.ndarray
    """For each coarse token, how many fine tokens it covers (sum == len(fine))."""

    def fine_to_coarse(self) -> np.ndarray:
        """Index of the coarse token covering each fine token."""
        return np.repeat(np.arange(len(self.coarse), dtype=np.int64), self.align)


def _concat(parts: Sequence[tuple]) -> EncodedText:
    if not parts:
        empty = np.zeros(0, dtype=np.int64)
        return EncodedText(empty, empty.copy(), empty.copy())
    return EncodedText(
        np.concatenate([np.asarray(p[0], dtype=np.int64) for p in parts]),
        np.concatenate([np.asarray(p[1], dtype=np.int64) for p in parts]),
        np.concatenate([np.asarray(p[2], dtype=np.int64) for p in parts]),
    )


class TextEncoder:
    """The tokenizers of one dataset (or exported model) directory, for single texts."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        meta_path = self.directory / fmt.META_FILE
        if not meta_path.is_file():
            raise fmt.FormatError(
                f"{self.directory} has no {fmt.META_FILE}: pass a dataset directory built by "
                f"`python data_prep/build.py` or a model exported by `python -m pipeline.convert export`"
            )
        try:
            self.meta = fmt.read_json_object(meta_path)
        except (OSError, ValueError) as exc:
            raise fmt.FormatError(f"{meta_path} cannot be read ({' '.join(str(exc).split())[:200]}): restore it from the "
                                  f"pre-training dataset it was copied from (or rebuild / export again)") from None
        self.language: str = self.meta.get("language") or self.meta.get("build", {}).get("language")
        if not self.language:
            raise fmt.FormatError(f"{meta_path} records no language; rebuild the dataset with data_prep/build.py")
        problems = fmt.token_file_problems(self.directory, self.meta)
        if problems:  # a missing or edited file would encode with other ids than the model was trained on
            raise fmt.FormatError(f"{self.directory}: {problems[0]}")
        self.fine_vocab = fmt.Vocab.load(self.directory / fmt.FINE_VOCAB_FILE)
        self.coarse_vocab = fmt.Vocab.load(self.directory / fmt.COARSE_VOCAB_FILE)
        self.plugin = self._load_plugin()

    @classmethod
    def from_directory(cls, directory: str | os.PathLike) -> TextEncoder:
        return cls(directory)

    # ---- plugin ------------------------------------------------------------------------------
    def _load_plugin(self) -> Language:
        lang_cls = get_language(self.language)
        # the files the build copied into the dataset (en: phrases.tsv; zh: user_dict.txt), not the paths
        # they were built from
        options = lang_cls.dataset_options(self.meta.get("build", {}).get("language_options", {}), self.directory)
        plugin = lang_cls(options)
        plugin.load(self.directory)
        return plugin

    @property
    def vocab_fingerprint(self) -> str:
        """Identifies the two vocabularies (a model trained on others cannot use these ids)."""
        return self.fine_vocab.fingerprint() + self.coarse_vocab.fingerprint()

    # ---- encoding ----------------------------------------------------------------------------
    def _sentences(self, text: str) -> list[tuple]:
        if self.language == "zh":
            return self.plugin.encode_text(text)
        if self.language == "en":
            from data_prep.english import document_sentences

            word_lists = document_sentences(text, self.plugin.config.lowercase)
            return self.plugin.tokenizers.encode_words(word_lists) if word_lists else []
        if hasattr(self.plugin, "encode_text"):  # a third-party plugin with the single-text API
            return self.plugin.encode_text(text)
        raise EncodeError(
            f"language plugin {self.language!r} has no single-text API: add "
            f"`encode_text(text) -> [(fine, coarse, align)]` to it (as data_prep/chinese.py does)"
        )

    def encode(self, text: str, where: str = "text") -> EncodedText:
        """All sentences of ``text`` concatenated; EncodeError if nothing is left to encode."""
        if not isinstance(text, str):
            raise EncodeError(f"{where}: expected a string, got {type(text).__name__} ({text!r})")
        if not text.strip():
            raise EncodeError(f"{where} is empty; remove the example or give it a text")
        out = _concat(self._sentences(text))
        if len(out.fine) == 0:
            raise EncodeError(f"{where} ({text[:40]!r}) has no tokens after normalisation; remove the example")
        return out

    def encode_units(self, units: Sequence[str], where: str = "example") -> tuple[EncodedText, np.ndarray]:
        """Encode pre-split units (words or characters, one tag each) as ONE text.

        Returns the encoding and, for each fine token, the index of the unit it belongs to (a fine
        token spanning several units is given the first). The coarse side is the dataset's own
        segmentation / phrases of the whole text, not of the units."""
        enc, first, _, _ = self.encode_unit_spans(units, where)
        return enc, first

    def encode_unit_spans(self, units: Sequence[str], where: str = "example", text: str | None = None
                          ) -> tuple[EncodedText, np.ndarray, np.ndarray, np.ndarray]:
        """``encode_units`` with, for each fine token, the first AND the last unit it covers (a Chinese
        Latin/digit run is one fine token over several character units) and its character offsets
        [start in the first unit, end in the last unit) (an English WordPiece piece is part of its word:
        "1990" of "1990s"); span extraction maps a predicted token span back to the text with them.
        A unit whose normalised form is not its own characters one for one (NFKC: "½", "ﬁ") counts
        as a whole for each of its tokens.

        ``text``: the text the units were cut from, in order (span extraction's context). English then
        splits the units' words into the build's sentences (line breaks, sentence ends, the 256-word
        cut), so that phrases never join across them, as in pre-training; without it (or if the text's
        words are not the units' words) the units are one sentence. Chinese needs no text: the units
        are its characters, blanks and line breaks included."""
        if not units or not any(isinstance(u, str) and u.strip() for u in units):
            raise EncodeError(f"{where}: no tokens; remove the example")
        if self.language == "zh":
            enc, first, last = self._encode_units_zh(units, where)
            ends = np.fromiter((len(units[k]) for k in last.tolist()), dtype=np.int64, count=len(last))
            return enc, first, last, np.stack([np.zeros_like(ends), ends], axis=1)
        if self.language == "en":
            return self._encode_units_en(units, where, text)
        raise EncodeError(f"token tasks are implemented for zh and en; {self.language!r} needs an encode_units path")

    def _encode_units_zh(self, units: Sequence[str], where: str) -> tuple[EncodedText, np.ndarray, np.ndarray]:
        from data_prep.normalize import normalize_text

        normalized = [normalize_text(u).replace(" ", "").replace("\n", "") for u in units]
        owner = np.repeat(np.arange(len(units), dtype=np.int64), [len(u) for u in normalized])
        # A blank unit stays a blank in the text encoded, a line break as a line break ("Windows 98" of a
        # context split into characters is tokenized as in pre-training, not as "Windows98", and the
        # segmenter does not join words across a line break); the tokens cover the other characters.
        enc = self.encode("".join(("\n" if _LINE_BREAK.match(u) else " ") if u.isspace() else n
                                  for u, n in zip(units, normalized)), where)
        # Chinese fine tokens are characters or Latin/digit runs ("##" marks a continuation): their
        # length in characters is their string length; [UNK] stands for one character.
        lengths = np.array([1 if t == fmt.UNK else len(t.removeprefix("##"))
                            for t in (self.fine_vocab.tokens[i] for i in enc.fine)], dtype=np.int64)
        if int(lengths.sum()) != len(owner):
            raise EncodeError(
                f"{where}: the fine tokens cover {int(lengths.sum())} characters but the units have {len(owner)}; "
                f"the units contain characters normalisation drops or joins (controls, line breaks, a letter and "
                f"a separate combining mark such as U+0301): clean them, or give such a letter and its marks as one unit"
            )
        starts = np.cumsum(lengths) - lengths
        return enc, owner[starts], owner[starts + lengths - 1]

    def _encode_units_en(self, units: Sequence[str], where: str, text: str | None
                         ) -> tuple[EncodedText, np.ndarray, np.ndarray, np.ndarray]:
        from data_prep.english import MAX_SENTENCE_WORDS, document_sentences, normalize, words_of

        lowercase = self.plugin.config.lowercase
        tokenizers = self.plugin.tokenizers
        words: list[str] = []
        word_owner: list[int] = []
        exact: list[bool] = []  # the unit is exactly one word, character for character: piece offsets are unit offsets
        for k, unit in enumerate(units):
            w = words_of(normalize(unit, lowercase))
            words += w
            word_owner += [k] * len(w)
            exact += [len(w) == 1 and len(w[0]) == len(unit)] * len(w)
        if not words:
            raise EncodeError(f"{where}: no words after normalisation; remove the example")
        sizes = [len(w) for w in document_sentences(text, lowercase)] if text is not None else []
        if sum(sizes) != len(words):  # no text, or its words are cut otherwise (a dropped invisible character)
            sizes = [min(MAX_SENTENCE_WORDS, len(words) - k) for k in range(0, len(words), MAX_SENTENCE_WORDS)]
        bounds = np.cumsum([0, *sizes]).tolist()
        enc = _concat(tokenizers.encode_words([words[a:b] for a, b in zip(bounds, bounds[1:])]))
        # The same fine tokenizer again, to learn which word each piece came from and where in it.
        pieces = tokenizers.fine_tokenizer.encode(words, is_pretokenized=True, add_special_tokens=False)
        word_of_piece = np.asarray(pieces.word_ids, dtype=np.int64)
        owner = np.asarray(word_owner, dtype=np.int64)[word_of_piece]
        offsets = np.asarray(pieces.offsets, dtype=np.int64).reshape(-1, 2)
        whole = ~np.asarray(exact, dtype=bool)[word_of_piece]
        offsets[whole, 0] = 0
        offsets[whole, 1] = np.fromiter((len(units[k]) for k in owner[whole].tolist()), dtype=np.int64, count=int(whole.sum()))
        if len(word_of_piece) != len(enc.fine):
            raise EncodeError(f"{where}: the fine tokenizer gives {len(word_of_piece)} pieces for the words but the "
                              f"dataset's encoding {len(enc.fine)}; the tokenizer files do not belong to this dataset")
        return enc, owner, owner, offsets


_LINE_BREAK = re.compile("[\n\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")

# Artifacts a directory must carry for TextEncoder (copied next to exported weights).
TOKENIZER_FILES = (fmt.META_FILE, *fmt.TOKEN_FILES)


def copy_tokenizer_files(source: str | os.PathLike, target: str | os.PathLike) -> list[str]:
    """Copy meta.json, the vocabularies and the tokenizer artifacts that exist from ``source`` to ``target``."""
    import shutil

    copied = []
    for name in TOKENIZER_FILES:
        path = Path(source) / name
        if path.is_file():
            shutil.copyfile(path, Path(target) / name)
            copied.append(name)
    return copied


__all__ = ["EncodeError", "EncodedText", "TextEncoder", "TOKENIZER_FILES", "copy_tokenizer_files"]
