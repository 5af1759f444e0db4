"""The on-disk format of a paired AMBERT dataset: the ONLY contract between data_prep and pipeline.

A dataset directory looks like::

    DIR/
      meta.json                    # FORMAT_VERSION, language, build params, versions, checksums, stats
      fine_vocab.txt               # one token a line; line number == id
      coarse_vocab.txt             # one token a line; line number == id
      fine_tokenizer.json          # (English only) the HF tokenizers model that produced fine ids
      phrases.tsv                  # (English only) the phrase dictionary used for coarse tokens
      train_fine.{bin,idx}         # megatron-core IndexedDataset: fine ids, one sequence a sentence
      train_coarse.{bin,idx}       #                               coarse ids, one sequence a sentence
      train_align.{bin,idx}        #   for each coarse token, how many fine tokens it covers
      valid_fine.{bin,idx} ...     # the same three for the valid split

The three IndexedDatasets of a split have the same number of sequences (sentences) and the same
document boundaries; for sentence s, ``sum(align[s]) == len(fine[s])`` and
``len(align[s]) == len(coarse[s])``. Coarse token k of a sentence covers fine tokens
``[cumsum(align)[k-1], cumsum(align)[k])``: a coarse boundary is always a fine boundary.

Special tokens have the same ids in both vocabularies (``SPECIAL_TOKENS`` below), so one [PAD],
[CLS], [SEP] and [MASK] id serves both granularities.

A build writes into ``DIR.partial-<pid>`` and renames it to ``DIR`` only when everything, meta.json
last, is on disk: a directory named DIR with a meta.json is complete.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# megatron-core warns at import that TransformerEngine/Apex are absent: irrelevant to data files
# (the reader and builder this module imports from it are plain NumPy/torch code).
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")

FORMAT_VERSION = 1

# ---------------------------------------------------------------------------------------------
# Special tokens: ids 0..4 in BOTH vocabularies.
# ---------------------------------------------------------------------------------------------
PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, CLS, SEP, MASK)
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(len(SPECIAL_TOKENS))
NUM_SPECIAL = len(SPECIAL_TOKENS)

SPLITS = ("train", "valid")
STREAMS = ("fine", "coarse", "align")
META_FILE = "meta.json"
FINE_VOCAB_FILE = "fine_vocab.txt"
COARSE_VOCAB_FILE = "coarse_vocab.txt"
FINE_TOKENIZER_FILE = "fine_tokenizer.json"
PHRASES_FILE = "phrases.tsv"
USER_DICT_FILE = "user_dict.txt"  # zh: a copy of the build's --user-dict (the segmentation depends on it)
TEXT_REPORT = "phrase_report.txt"  # en: the phrase list and coarse-tokenized examples, for people
HTML_REPORT = "phrase_report.html"


# The files that give the ids their meaning: their sha256 is in meta.json ``files_sha256``.
TOKEN_FILES = (FINE_VOCAB_FILE, COARSE_VOCAB_FILE, FINE_TOKENIZER_FILE, PHRASES_FILE, USER_DICT_FILE)


def read_json_object(path: str | os.PathLike) -> dict:
    """The JSON object in ``path``; OSError / ValueError (bad JSON, or JSON that is not an object) as
    they come, for the caller to name the file and the fix."""
    value = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(value, dict):
        raise ValueError(f"a JSON {type(value).__name__}, not an object")
    return value


def token_file_problems(directory: str | os.PathLike, meta: dict) -> list[str]:
    """The files that give the ids their meaning (``TOKEN_FILES``) that are missing or differ from the
    sha256 ``meta.json`` recorded at build time (datasets built before it record none)."""
    problems = []
    for name, digest in sorted((meta.get("files_sha256") or {}).items()):
        path = Path(directory) / name
        if not path.is_file():
            problems.append(f"{path} is missing (meta.json records it): restore it, or rebuild the dataset")
        elif hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            problems.append(f"{name} was changed after the build (its sha256 is not the one meta.json records), so "
                            f"the stored ids would decode to other tokens: restore it, or rebuild the dataset")
    return problems


def dataset_file_names() -> frozenset[str]:
    """Every file a data_prep build may write into a dataset directory (what --overwrite may delete)."""
    names = {META_FILE, FINE_VOCAB_FILE, COARSE_VOCAB_FILE, FINE_TOKENIZER_FILE, PHRASES_FILE, USER_DICT_FILE,
             TEXT_REPORT, HTML_REPORT}
    return frozenset(names | {f"{sp}_{st}.{ext}" for sp in SPLITS for st in STREAMS for ext in ("bin", "idx")})


def not_replaceable(directory: str | os.PathLike) -> str | None:
    """Why ``directory`` must not be replaced by a new build (None: missing, empty, or a data_prep dataset
    holding only the files a build writes). Replacing deletes the folder and everything in it."""
    directory = Path(directory)
    if not directory.is_dir() or not any(directory.iterdir()):
        return None
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        return f"it is not a dataset (no {META_FILE})"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"its {META_FILE} is not a data_prep dataset's ({type(exc).__name__}: {exc})"
    if not isinstance(meta, dict) or "format_version" not in meta or "language" not in meta:
        return f"its {META_FILE} is not a data_prep dataset's (no format_version / language)"
    known = set(dataset_file_names())
    try:  # a language plugin's own files (its fit's artifacts are copied into the dataset)
        from data_prep.languages import get_language

        known |= set(get_language(meta["language"]).artifact_files)
    except Exception:  # noqa: BLE001 - an unknown language: only the common files
        pass
    foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir() if p.name not in known)
    if foreign:
        shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
        return f"it holds {len(foreign)} file(s) a data_prep build does not write ({shown}), which would be deleted"
    return None

# Alignment counts are stored as uint16: one coarse token never covers more than 65535 fine ones.
ALIGN_DTYPE = np.uint16


class FormatError(ValueError):
    """A dataset directory is missing, incomplete or inconsistent. The message says how to fix it."""


class NotADataset(FormatError):
    """A directory (or path) with no meta.json and no build of it under way or interrupted."""


def id_dtype(vocab_size: int) -> type:
    """Smallest dtype that holds every id of a vocabulary (uint16 up to 65,535 entries)."""
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def prefix(directory: str | os.PathLike, split: str, stream: str) -> str:
    """Path prefix (no extension) of one IndexedDataset of a split."""
    if split not in SPLITS or stream not in STREAMS:
        raise ValueError(f"unknown split/stream {split!r}/{stream!r}; expected {SPLITS} x {STREAMS}")
    return str(Path(directory) / f"{split}_{stream}")


# ---------------------------------------------------------------------------------------------
# Vocabularies
# ---------------------------------------------------------------------------------------------
def _whose(path: str | os.PathLike) -> str:
    """What a vocabulary file belongs to, for the fix of an error about it: an exported model (its
    folder holds the weights) is exported again, a dataset is rebuilt."""
    folder = Path(path).parent
    if any((folder / name).exists() for name in ("model.safetensors", "config.json", "training.json")):
        return f"the export (`python -m pipeline.convert export CHECKPOINT {folder}`)"
    return "the dataset"


class Vocab:
    """A token <-> id table whose first NUM_SPECIAL entries are SPECIAL_TOKENS."""

    def __init__(self, tokens: Sequence[str]):
        tokens = list(tokens)
        if tuple(tokens[:NUM_SPECIAL]) != SPECIAL_TOKENS:
            raise FormatError(
                f"a vocabulary must start with the special tokens {SPECIAL_TOKENS}, got {tokens[:NUM_SPECIAL]}"
            )
        self.tokens = tokens
        self.index = dict(zip(tokens, range(len(tokens))))
        if len(self.index) != len(tokens):
            seen: set[str] = set()
            dup = next(t for t in tokens if t in seen or seen.add(t))
            raise FormatError(f"duplicate vocabulary entry {dup!r}")

    @classmethod
    def from_tokens(cls, regular_tokens: Iterable[str]) -> Vocab:
        """Special tokens followed by ``regular_tokens`` (order kept, specials skipped)."""
        return cls(list(SPECIAL_TOKENS) + [t for t in regular_tokens if t not in SPECIAL_TOKENS])

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: str) -> bool:
        return token in self.index

    def id(self, token: str) -> int:
        return self.index.get(token, UNK_ID)

    def token(self, token_id: int) -> str:
        if not 0 <= token_id < len(self.tokens):  # a negative id would index from the end, silently
            raise FormatError(f"token id {token_id} is outside the vocabulary (ids 0..{len(self.tokens) - 1})")
        return self.tokens[token_id]

    def save(self, path: str | os.PathLike) -> None:
        self.save_tokens(path, self.tokens)

    @staticmethod
    def save_tokens(path: str | os.PathLike, tokens: Sequence[str]) -> None:
        """Write a vocabulary file of ``tokens`` (one a line) without making a Vocab of them (its
        table): for a writer that knows they are valid; ``load`` checks them all the same."""
        text = "\n".join(tokens) + "\n"
        if text.count("\n") != len(tokens) or "\r" in text:
            bad = next(t for t in tokens if "\n" in t or "\r" in t)
            raise FormatError(f"vocabulary entry {bad!r} contains a line break")
        Path(path).write_text(text, encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocab:
        """A vocabulary file (one token a line); errors name the file (and what to rebuild: ``_whose``)."""
        try:
            text = Path(path).read_text(encoding="utf-8")
            return cls(text.split("\n")[:-1] if text.endswith("\n") else text.split("\n"))
        except FileNotFoundError:
            raise FormatError(f"{path} is missing: restore it, or rebuild {_whose(path)}") from None
        except (UnicodeDecodeError, FormatError) as exc:
            raise FormatError(f"{path}: {exc}; restore it, or rebuild {_whose(path)}") from None

    @staticmethod
    def size_of(path: str | os.PathLike) -> int:
        """The number of tokens ``load`` gives for ``path`` (its errors alike), without checking or
        indexing them (~1 ms against ~30 ms for 100k tokens): for a caller that needs only the size
        while others load the file."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FormatError(f"{path} is missing: restore it, or rebuild {_whose(path)}") from None
        except UnicodeDecodeError as exc:
            raise FormatError(f"{path}: {exc}; restore it, or rebuild {_whose(path)}") from None
        return text.count("\n") + (0 if text.endswith("\n") else 1)

    def fingerprint(self) -> str:
        return hashlib.sha256("\n".join(self.tokens).encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def _builder(path_prefix: str, dtype):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    return IndexedDatasetBuilder(path_prefix + ".bin", dtype=dtype)


class SplitWriter:
    """Appends aligned documents to the three IndexedDatasets of one split.

    ``add_document`` takes a list of sentences, each ``(fine_ids, coarse_ids, align)``, and checks
    the alignment invariant before writing anything, so a bad document never reaches the disk.
    """

    def __init__(self, directory: str | os.PathLike, split: str, fine_vocab_size: int, coarse_vocab_size: int):
        self.directory = Path(directory)
        self.split = split
        self.fine_vocab_size = fine_vocab_size
        self.coarse_vocab_size = coarse_vocab_size
        self.dtypes = {
            "fine": id_dtype(fine_vocab_size),
            "coarse": id_dtype(coarse_vocab_size),
            "align": ALIGN_DTYPE,
        }
        self.builders = {s: _builder(prefix(directory, split, s), self.dtypes[s]) for s in STREAMS}
        self.documents = 0
        self.sentences = 0
        self.fine_tokens = 0
        self.coarse_tokens = 0

    def add_document(self, sentences: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]]) -> None:
        if not sentences:
            raise FormatError("a document needs at least one sentence")
        arrays = []
        for fine, coarse, align in sentences:
            fine = np.asarray(fine, dtype=np.int64)
            coarse = np.asarray(coarse, dtype=np.int64)
            align = np.asarray(align, dtype=np.int64)
            check_sentence(fine, coarse, align, self.fine_vocab_size, self.coarse_vocab_size)
            arrays.append((fine, coarse, align))
        for fine, coarse, align in arrays:
            self.builders["fine"].add_item(_tensor(fine, self.dtypes["fine"]))
            self.builders["coarse"].add_item(_tensor(coarse, self.dtypes["coarse"]))
            self.builders["align"].add_item(_tensor(align, self.dtypes["align"]))
            self.fine_tokens += len(fine)
            self.coarse_tokens += len(coarse)
        for b in self.builders.values():
            b.end_document()
        self.documents += 1
        self.sentences += len(arrays)

    def add_shard(self, shard_directory: str | os.PathLike) -> None:
        """Append a whole split written by another SplitWriter (same vocabularies) in ``shard_directory``."""
        for s in STREAMS:
            self.builders[s].add_index(prefix(shard_directory, self.split, s))
        reader = PairedSplit(shard_directory, self.split)
        self.documents += len(reader)
        self.sentences += reader.num_sentences
        self.fine_tokens += int(reader.fine.sequence_lengths.sum())
        self.coarse_tokens += int(reader.coarse.sequence_lengths.sum())

    def finalize(self) -> dict:
        for s in STREAMS:
            self.builders[s].finalize(prefix(self.directory, self.split, s) + ".idx")
        return {
            "documents": self.documents,
            "sentences": self.sentences,
            "fine_tokens": self.fine_tokens,
            "coarse_tokens": self.coarse_tokens,
        }


def _tensor(array: np.ndarray, dtype):
    import torch  # IndexedDatasetBuilder.add_item takes a tensor and casts it to the builder dtype

    return torch.from_numpy(np.ascontiguousarray(array))


def check_sentence(fine, coarse, align, fine_vocab_size: int, coarse_vocab_size: int) -> None:
    """Raise FormatError unless one sentence satisfies the alignment invariant and the id ranges."""
    if len(coarse) == 0 or len(fine) == 0:
        raise FormatError("empty sentence (0 fine or 0 coarse tokens)")
    if len(align) != len(coarse):
        raise FormatError(f"{len(align)} alignment counts for {len(coarse)} coarse tokens")
    if np.any(np.asarray(align) <= 0) or np.any(np.asarray(align) > np.iinfo(ALIGN_DTYPE).max):
        raise FormatError("every coarse token must cover between 1 and 65535 fine tokens")
    if int(np.sum(align)) != len(fine):
        raise FormatError(f"alignment covers {int(np.sum(align))} fine tokens, the sentence has {len(fine)}")
    for name, ids, size in (("fine", fine, fine_vocab_size), ("coarse", coarse, coarse_vocab_size)):
        ids = np.asarray(ids)
        if ids.min() < 0 or ids.max() >= size:
            raise FormatError(f"{name} id out of range [0, {size}): min {ids.min()}, max {ids.max()}")


# ---------------------------------------------------------------------------------------------
# Bulk writing and merging of IndexedDataset files (no megatron-core / torch import)
# ---------------------------------------------------------------------------------------------
# megatron-core's .idx layout (version 1): header, version, dtype code, sequence count, document
# count, then int32 sequence lengths, int64 byte pointers, int64 document indices (sequence index
# where each document starts, plus a final entry). ``tests/test_format.py`` checks that these
# functions write the same bytes as megatron-core's IndexedDatasetBuilder and read back with its
# IndexedDataset.
_INDEX_HEADER = b"MMIDIDX\x00\x00"
_INDEX_VERSION = 1
_INDEX_HEADER_BYTES = len(_INDEX_HEADER) + 8 + 1 + 8 + 8  # magic, version, dtype code, sequences, documents + 1
_DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6, np.float32: 7,
                np.uint16: 8}
_DTYPES = {code: np.dtype(t) for t, code in _DTYPE_CODES.items()}
_COPY_CHUNK = 16 << 20
_copy_file_range = getattr(os, "copy_file_range", None)  # Linux (Python 3.8+)
_WRITE_CHUNK = 1 << 20  # values converted to the file's dtype at a time


def _write_index_header(fh, dtype, num_sequences: int, num_documents: int) -> None:
    fh.write(_INDEX_HEADER)
    fh.write(struct.pack("<Q", _INDEX_VERSION))
    fh.write(struct.pack("<B", _DTYPE_CODES[np.dtype(dtype).type]))
    fh.write(struct.pack("<Q", num_sequences))
    fh.write(struct.pack("<Q", num_documents))


def _pointers(lengths: np.ndarray, itemsize: int, start: int = 0) -> np.ndarray:
    """Byte offset of each sequence in the .bin (``start``: offset of the first one)."""
    pointers = np.empty(len(lengths), dtype=np.int64)
    if len(lengths):
        pointers[0] = start
        np.cumsum(lengths[:-1].astype(np.int64) * itemsize, out=pointers[1:])
        pointers[1:] += start
    return pointers


def write_indexed_dataset(path_prefix: str, dtype, values: np.ndarray | Iterable[np.ndarray], sequence_lengths: np.ndarray,
                          document_indices: np.ndarray) -> None:
    """Write ``.bin``/``.idx`` byte-identical to megatron-core's IndexedDatasetBuilder, in one go.

    The builder takes one tensor per sentence (a Python call each); a shard holds ~1e5 sentences,
    so a whole shard is written from flat arrays instead. ``values``: the stream's values, as one
    array or as an iterable of consecutive slices of it.
    """
    if isinstance(values, (np.ndarray, list, tuple)):
        whole = np.asarray(values)
        values = (whole[i:i + _WRITE_CHUNK] for i in range(0, len(whole), _WRITE_CHUNK))
    with open(path_prefix + ".bin", "wb") as fh:
        for part in values:  # converted a slice at a time: no full-size copy of the stream
            fh.write(memoryview(np.ascontiguousarray(part, dtype=dtype)).cast("B"))
    lengths = np.asarray(sequence_lengths, dtype=np.int32)
    docs = np.asarray(document_indices, dtype=np.int64)
    with open(path_prefix + ".idx", "wb") as fh:
        _write_index_header(fh, dtype, len(lengths), len(docs))
        fh.write(lengths.tobytes())
        fh.write(_pointers(lengths, np.dtype(dtype).itemsize).tobytes())
        fh.write(docs.tobytes())


@dataclass
class IndexInfo:
    """What an .idx file says: element dtype, per-sequence lengths, document start indices."""

    dtype: np.dtype
    sequence_lengths: np.ndarray
    document_indices: np.ndarray


def check_index_size(path_prefix: str) -> None:
    """FormatError unless ``path_prefix.idx`` has a megatron-core header and the size it implies (O(1):
    the header only), so that a truncated index is named instead of failing inside megatron-core."""
    path = path_prefix + ".idx"
    with open(path, "rb") as fh:
        head = fh.read(len(_INDEX_HEADER) + 8 + 1 + 8 + 8)
    if len(head) < len(_INDEX_HEADER) + 25 or head[: len(_INDEX_HEADER)] != _INDEX_HEADER:
        raise FormatError(f"{path} is not a megatron-core IndexedDataset index (bad header); rebuild the dataset")
    _, _, num_seq, num_docs = struct.unpack("<QBQQ", head[len(_INDEX_HEADER):])
    expected = len(head) + num_seq * 4 + num_seq * 8 + num_docs * 8
    actual = os.path.getsize(path)
    if actual != expected:
        raise FormatError(f"{path} has {actual:,} bytes, its header describes {expected:,}: it was truncated or "
                          f"written to; rebuild the dataset")


def _read_index_header(fh, path: str) -> tuple[np.dtype, int, int]:
    """dtype, sequences and document indices of the open .idx file ``fh`` (at its start), left after the header."""
    head = fh.read(len(_INDEX_HEADER) + 8 + 1 + 8 + 8)
    if len(head) < 34 or head[: len(_INDEX_HEADER)] != _INDEX_HEADER:
        raise FormatError(f"{path} is not a megatron-core IndexedDataset index (bad header); rebuild the dataset")
    version, code, num_seq, num_docs = struct.unpack("<QBQQ", head[len(_INDEX_HEADER):])
    if version != _INDEX_VERSION or code not in _DTYPES:
        raise FormatError(f"{path}: unsupported index version {version} / dtype code {code}")
    return _DTYPES[code], num_seq, num_docs


def read_index(path_prefix: str) -> IndexInfo:
    """Parse ``path_prefix.idx`` (megatron-core's layout) without megatron-core."""
    path = path_prefix + ".idx"
    with open(path, "rb") as fh:
        dtype, num_seq, num_docs = _read_index_header(fh, path)
        lengths = np.fromfile(fh, dtype=np.int32, count=num_seq)
        fh.seek(num_seq * 8, os.SEEK_CUR)  # pointers: recomputed from the lengths
        docs = np.fromfile(fh, dtype=np.int64, count=num_docs)
    if len(lengths) != num_seq or len(docs) != num_docs:
        raise FormatError(f"{path} is truncated; rebuild the dataset")
    return IndexInfo(dtype, lengths, docs)


@dataclass
class MergeTotals:
    sequences: int
    documents: int
    tokens: int


def _check_part_dtype(p: PartSection, part_dtype: np.dtype, dtype: np.dtype) -> None:
    if part_dtype != dtype:
        where = f"{p.index_path}.idx" if p.index_path is not None else p.path
        raise FormatError(f"{where} holds {part_dtype} ids, the merged dataset {dtype}: the parts "
                          f"were built with different vocabularies; rebuild them with the same ones")


def merge_indexed_datasets(out_prefix: str, parts: Sequence[PartSection], dtype, bin_written: bool = False) -> MergeTotals:
    """Concatenate IndexedDatasets in order into ``out_prefix``: the bytes megatron-core's
    ``IndexedDatasetBuilder.add_index`` + ``finalize`` write, without importing it (~5 s with torch).
    ``parts``: sections of part files or plain .bin/.idx pairs (``_sources``). The values are copied
    in chunks (``bin_written``: the caller already wrote their concatenation to ``out_prefix.bin``;
    its size is checked); the indexes are read one part at a time per section."""
    dtype = np.dtype(dtype)
    shapes = [p.shape() for p in parts]  # (dtype, sequences, document indices): no index read yet
    for p, (part_dtype, _, _) in zip(parts, shapes):
        _check_part_dtype(p, part_dtype, dtype)
    num_seq = sum(n for _, n, _ in shapes)
    num_docs = sum(d - 1 for _, _, d in shapes)
    if bin_written:
        expected = sum(p.nbytes for p in parts)
        if os.path.getsize(out_prefix + ".bin") != expected:
            raise FormatError(f"{out_prefix}.bin holds {os.path.getsize(out_prefix + '.bin')} bytes, its parts "
                              f"{expected}: the concatenation was interrupted; rebuild")
    else:
        with open(out_prefix + ".bin", "wb") as out:
            for p in parts:
                p.copy_values(out)
    # Each part's index is read once and its three pieces written where they go in the three sections
    # (sequence lengths, byte pointers, document starts): one part's index in memory at a time.
    with open(out_prefix + ".idx", "wb") as out:
        _write_index_header(out, dtype, num_seq, num_docs + 1)
        lengths_at = out.tell()
        pointers_at = lengths_at + 4 * num_seq
        docs_at = pointers_at + 8 * num_seq
        out.seek(docs_at)
        out.write(np.zeros(1, dtype=np.int64).tobytes())
        seq = doc = byte_offset = 0
        for p, (_, n, nd) in zip(parts, shapes):
            info = p.index()
            lengths = info.sequence_lengths
            if len(lengths) != n or len(info.document_indices) != nd:
                raise FormatError(f"{p.index_path or p.path} changed during the merge; rebuild it")
            out.seek(lengths_at + 4 * seq)
            out.write(lengths.tobytes())
            out.seek(pointers_at + 8 * seq)
            out.write(_pointers(lengths, dtype.itemsize, byte_offset).tobytes())
            out.seek(docs_at + 8 * (1 + doc))
            out.write((info.document_indices[1:] + seq).tobytes())
            seq, doc = seq + n, doc + nd - 1
            byte_offset += int(lengths.sum(dtype=np.int64)) * dtype.itemsize
    return MergeTotals(sequences=num_seq, documents=num_docs, tokens=byte_offset // dtype.itemsize)


def merge_splits(directory: str | os.PathLike, split: str, parts: Sequence[str | os.PathLike],
                 fine_vocab_size: int, coarse_vocab_size: int, bin_written: bool = False) -> dict:
    """Concatenate one split of several parts (same vocabularies), in order, into ``directory``;
    returns the split's documents / sentences / fine_tokens / coarse_tokens. A part is a part file
    (``write_part``) or a directory of plain IndexedDatasets. ``bin_written``: the .bin files are
    already there (``BinConcatenator``)."""
    dtypes = _stream_dtypes(fine_vocab_size, coarse_vocab_size)
    sources = [_sources(p, split) for p in parts]
    totals = {s: merge_indexed_datasets(prefix(directory, split, s), [src[(split, s)] for src in sources],
                                        dtypes[s], bin_written) for s in STREAMS}
    return _split_totals(directory, split, totals, dtypes)


def _stream_dtypes(fine_vocab_size: int, coarse_vocab_size: int) -> dict[str, np.dtype]:
    return {"fine": id_dtype(fine_vocab_size), "coarse": id_dtype(coarse_vocab_size), "align": np.dtype(ALIGN_DTYPE)}


def _split_totals(directory: str | os.PathLike, split: str, totals: dict[str, MergeTotals], dtypes: dict) -> dict:
    """A merged split's documents / sentences / tokens, its three streams checked against each other
    and against their .bin files' sizes."""
    if len({(t.sequences, t.documents) for t in totals.values()}) != 1:
        raise FormatError(f"{split}: the parts' fine/coarse/align streams have different sentence or document "
                          f"counts; rebuild them")
    for s, total in totals.items():  # a part's values damaged after its index was written (cheap: sizes only)
        path = prefix(directory, split, s) + ".bin"
        expected = total.tokens * np.dtype(dtypes[s]).itemsize
        if os.path.getsize(path) != expected:
            raise FormatError(f"{path} has {os.path.getsize(path):,} bytes, but the parts' indexes describe "
                              f"{expected:,}: a part's .bin file was truncated or changed after it was written")
    return {
        "documents": totals["fine"].documents,
        "sentences": totals["fine"].sequences,
        "fine_tokens": totals["fine"].tokens,
        "coarse_tokens": totals["coarse"].tokens,
    }


class BinConcatenator:
    """Appends the values (.bin bytes) of parts, in part order, to one .bin file per split and stream
    in ``directory`` while the parts are still being produced: ``append_ready(is_ready)`` copies every
    leading part that is ready and not yet copied. The bulk of a merge (the token bytes) thus overlaps
    the encoding; ``merge_splits(..., bin_written=True)`` then writes only the indexes. Given the
    vocabularies' sizes (``vocab_sizes``) it also builds the indexes as it goes (``_IndexPieces``), and
    ``write_split`` writes them (the merge's index work overlaps the encoding too); ``extras`` holds the
    ``extra`` of each part file copied (``read_part``). A part is a part file or a directory of plain
    IndexedDatasets, as for ``merge_splits``."""

    def __init__(self, directory: str | os.PathLike, parts: Sequence[str | os.PathLike],
                 vocab_sizes: tuple[int, int] | None = None):
        self.directory = Path(directory)
        self.parts = [Path(d) for d in parts]
        self.done = 0  # leading parts copied
        self.extras: list[dict | None] = []
        self.directory.mkdir(parents=True, exist_ok=True)
        self._files = {(sp, st): open(prefix(self.directory, sp, st) + ".bin", "wb") for sp in SPLITS for st in STREAMS}
        self._dtypes = _stream_dtypes(*vocab_sizes) if vocab_sizes is not None else None
        self._indexes = None if vocab_sizes is None else {
            (sp, st): _IndexPieces(prefix(self.directory, sp, st), self._dtypes[st]) for sp, st in self._files}

    def append_ready(self, is_ready) -> None:
        while self.done < len(self.parts) and is_ready(self.done):
            part = self.parts[self.done]
            sections, extra = (_sources(part), None) if part.is_dir() else read_part(part)
            for key, out in self._files.items():
                sections[key].copy_values(out)
                if self._indexes is not None:
                    self._indexes[key].add(sections[key])
            self.extras.append(extra)
            self.done += 1

    @property
    def complete(self) -> bool:
        return self.done == len(self.parts)

    @property
    def indexed(self) -> bool:
        return self._indexes is not None

    def write_split(self, directory: str | os.PathLike, split: str) -> dict:
        """``merge_splits(directory, split, ..., bin_written=True)`` from the indexes built while
        copying (every part copied, the split's .bin files moved into ``directory``); the same bytes."""
        if not (self.indexed and self.complete):
            raise FormatError("internal: write_split needs every part copied, with vocab_sizes given")
        self.close()
        totals = {st: self._indexes[(split, st)].write(prefix(directory, split, st) + ".idx") for st in STREAMS}
        return _split_totals(directory, split, totals, self._dtypes)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        for pieces in (self._indexes or {}).values():
            pieces.close()


class _IndexPieces:
    """A merged IndexedDataset's index built part by part (``add``) into three files beside its .bin
    (``.idx.lengths``, ``.idx.pointers``, ``.idx.docs``: the three sections of an index), which
    ``write`` joins behind the header: the bytes ``merge_indexed_datasets`` writes."""

    SECTIONS = ("lengths", "pointers", "docs")

    def __init__(self, path_prefix: str, dtype) -> None:
        self.dtype = np.dtype(dtype)
        self.paths = [f"{path_prefix}.idx.{name}" for name in self.SECTIONS]
        self._files = [open(p, "wb") for p in self.paths]
        self.sequences = self.documents = self.nbytes = 0

    def add(self, section: PartSection) -> None:
        info = section.index()
        _check_part_dtype(section, info.dtype, self.dtype)
        lengths = np.asarray(info.sequence_lengths, dtype=np.int32)
        lengths_out, pointers_out, docs_out = self._files
        lengths_out.write(lengths.tobytes())
        pointers_out.write(_pointers(lengths, self.dtype.itemsize, self.nbytes).tobytes())
        docs_out.write((np.asarray(info.document_indices[1:], dtype=np.int64) + self.sequences).tobytes())
        self.sequences += len(lengths)
        self.documents += len(info.document_indices) - 1
        self.nbytes += int(lengths.sum(dtype=np.int64)) * self.dtype.itemsize

    def write(self, idx_path: str) -> MergeTotals:
        self.close()
        with open(idx_path, "wb") as out:
            _write_index_header(out, self.dtype, self.sequences, self.documents + 1)
            for name, path in zip(self.SECTIONS, self.paths):
                if name == "docs":
                    out.write(np.zeros(1, dtype=np.int64).tobytes())
                with open(path, "rb") as fh:
                    shutil.copyfileobj(fh, out, _COPY_CHUNK)
                os.unlink(path)
        expected = (self.sequences * 12 + 8 * (self.documents + 1))
        if os.path.getsize(idx_path) - _INDEX_HEADER_BYTES != expected:
            raise FormatError(f"{idx_path}: its index pieces are incomplete (a full disk?); rebuild")
        return MergeTotals(sequences=self.sequences, documents=self.documents, tokens=self.nbytes // self.dtype.itemsize)

    def close(self) -> None:
        for f in self._files:
            f.close()

# ---------------------------------------------------------------------------------------------
# Shard parts: a build's per-shard datasets, one file per shard (the build's work directory only)
# ---------------------------------------------------------------------------------------------
# A part file holds the six IndexedDatasets of one shard (train/valid x fine/coarse/align) that
# ``merge_splits`` concatenates into the dataset: for each section, in SPLITS x STREAMS order, the
# bytes its .bin would hold, then its int32 sequence lengths and int64 document indices; then a JSON
# directory of the sections (dtype, byte offsets, counts) and the writer's ``extra`` (the shard's
# statistics), its length (8 bytes, little endian) and ``_PART_MAGIC``. One file instead of 12 (+ the
# statistics and a marker): creating a file is the costly metadata operation of parallel filesystems
# (Lustre, GPFS, NFS: a round trip to the metadata server) and of some local ones (0.03-0.8 ms on
# this project's CI machine, ~20 files per shard before), while its bytes stream at disk speed.
_PART_MAGIC = b"AMBPART1"
_PART_TRAILER = 8 + len(_PART_MAGIC)


@dataclass
class PartSection:
    """One IndexedDataset inside a part file (or, with ``index_path``, a plain .bin/.idx pair)."""

    path: str  # the file holding the values
    dtype: np.dtype
    offset: int  # of the values, in ``path``
    nbytes: int
    num_sequences: int = 0
    lengths_offset: int = 0
    num_document_indices: int = 0
    docs_offset: int = 0
    index_path: str | None = None  # a plain IndexedDataset: ``read_index`` of this prefix

    def shape(self) -> tuple[np.dtype, int, int]:
        """dtype, sequences and document indices (of a plain IndexedDataset: its header only)."""
        if self.index_path is None:
            return self.dtype, self.num_sequences, self.num_document_indices
        path = self.index_path + ".idx"
        with open(path, "rb") as fh:
            return _read_index_header(fh, path)

    def index(self) -> IndexInfo:
        if self.index_path is not None:
            return read_index(self.index_path)
        with open(self.path, "rb") as fh:  # (one open: the lengths and document indices are adjacent)
            fh.seek(self.lengths_offset)
            lengths = np.fromfile(fh, dtype=np.int32, count=self.num_sequences)
            fh.seek(self.docs_offset)
            docs = np.fromfile(fh, dtype=np.int64, count=self.num_document_indices)
        if len(lengths) != self.num_sequences or len(docs) != self.num_document_indices:
            raise FormatError(f"{self.path} is truncated; rebuild it")
        return IndexInfo(self.dtype, lengths, docs)

    def copy_values(self, out) -> None:
        """Append the values' bytes to the open binary file ``out``: inside the kernel where it can
        (``os.copy_file_range``: no copy through Python's buffers, ~4x less CPU on ext4; a reflink on
        XFS/btrfs), else read and written in blocks."""
        with open(self.path, "rb") as fh:
            left = self.nbytes
            if left and _copy_file_range is not None:
                out.flush()  # the kernel appends at the descriptor's position, after what was buffered
                try:
                    while left:
                        copied = _copy_file_range(fh.fileno(), out.fileno(), min(left, 1 << 30), self.offset + self.nbytes - left)
                        if not copied:
                            raise FormatError(f"{self.path} is truncated; rebuild it")
                        left -= copied
                    return
                except OSError as exc:  # a filesystem (or a kernel) without it: the plain way, for the rest
                    if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
                        raise
                finally:
                    out.seek(0, os.SEEK_END)  # the buffered file learns the descriptor's new position
            fh.seek(self.offset + self.nbytes - left)
            while left:
                block = fh.read(min(left, _COPY_CHUNK))
                if not block:
                    raise FormatError(f"{self.path} is truncated; rebuild it")
                out.write(block)
                left -= len(block)


def write_part(path: str | os.PathLike, sections: dict[tuple[str, str], tuple], extra: dict | None = None) -> None:
    """Write a part file (layout above) to a temporary name and rename it to ``path``: a part file
    that exists is complete. ``sections[(split, stream)] = (dtype, values, sequence_lengths,
    document_indices)``, ``values`` one array or an iterable of consecutive slices of it."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    directory: dict[str, Any] = {"sections": {}, "extra": extra or {}}
    try:
        with open(tmp, "wb") as fh:
            for (split, stream), (dtype, values, lengths, docs) in sections.items():
                dtype = np.dtype(dtype)
                if isinstance(values, (np.ndarray, list, tuple)):
                    whole = np.asarray(values)
                    values = (whole[i:i + _WRITE_CHUNK] for i in range(0, len(whole), _WRITE_CHUNK))
                start = fh.tell()
                for part in values:
                    fh.write(memoryview(np.ascontiguousarray(part, dtype=dtype)).cast("B"))
                nbytes = fh.tell() - start
                lengths = np.asarray(lengths, dtype=np.int32)
                docs = np.asarray(docs, dtype=np.int64)
                lengths_offset = fh.tell()
                fh.write(lengths.tobytes())
                docs_offset = fh.tell()
                fh.write(docs.tobytes())
                directory["sections"][f"{split}/{stream}"] = {
                    "dtype": dtype.name, "offset": start, "nbytes": nbytes, "num_sequences": len(lengths),
                    "lengths_offset": lengths_offset, "num_document_indices": len(docs), "docs_offset": docs_offset}
            blob = json.dumps(directory, sort_keys=True).encode()
            fh.write(blob)
            fh.write(struct.pack("<Q", len(blob)))
            fh.write(_PART_MAGIC)
    except BaseException:  # a full disk, a signal: no temporary file is left behind
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def read_part(path: str | os.PathLike) -> tuple[dict[tuple[str, str], PartSection], dict]:
    """The sections of a part file and the ``extra`` it was written with (its directory only)."""
    path = str(path)
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        if size >= _PART_TRAILER:
            fh.seek(size - _PART_TRAILER)
            trailer = fh.read(_PART_TRAILER)
        if size < _PART_TRAILER or trailer[8:] != _PART_MAGIC:
            raise FormatError(f"{path} is not a complete shard part (no trailer): it was truncated or written "
                              f"to; rebuild it")
        (length,) = struct.unpack("<Q", trailer[:8])
        if length > size - _PART_TRAILER:
            raise FormatError(f"{path}: its directory claims {length:,} bytes of {size:,}; rebuild it")
        fh.seek(size - _PART_TRAILER - length)
        try:
            directory = json.loads(fh.read(length))
        except ValueError:
            raise FormatError(f"{path}: its directory is not JSON; rebuild it") from None
    sections = {}
    for key, s in directory["sections"].items():
        split, stream = key.split("/")
        sections[(split, stream)] = PartSection(
            path, np.dtype(s["dtype"]), s["offset"], s["nbytes"], s["num_sequences"], s["lengths_offset"],
            s["num_document_indices"], s["docs_offset"])
    return sections, directory["extra"]


def _sources(part: str | os.PathLike, split: str | None = None) -> dict[tuple[str, str], PartSection]:
    """The sections of ``part``: a part file, or a directory of plain IndexedDatasets (``prefix`` names)."""
    if os.path.isdir(part):
        keys = [(sp, st) for sp in SPLITS for st in STREAMS if split in (None, sp)]
        out = {}
        for sp, st in keys:
            p = prefix(part, sp, st)
            # (the dtype is the index's: ``index()`` reads it; uint8 here only counts bytes)
            out[(sp, st)] = PartSection(p + ".bin", np.dtype(np.uint8), 0, os.path.getsize(p + ".bin"), index_path=p)
        return out
    return read_part(part)[0]


# ---------------------------------------------------------------------------------------------
# Atomic output directory
# ---------------------------------------------------------------------------------------------
class AtomicDirectory:
    """Build into ``<target>.partial-<pid>``; ``commit()`` renames it to ``target``.

    On an exception (or a kill) the target is never touched: a directory named ``target`` is either
    the previous complete dataset or the new complete one. With ``overwrite`` an existing target is
    replaced only at commit time.
    """

    def __init__(self, target: str | os.PathLike, overwrite: bool = False):
        self.target = Path(target)
        self.overwrite = overwrite
        if self.target.exists() and not overwrite:
            raise FileExistsError(
                f"output directory {self.target} already exists; pass --overwrite to replace it "
                f"(it is replaced only once the new build is complete) or choose another --output"
            )
        self.path = self.target.parent / f"{self.target.name}.partial-{os.getpid()}"

    def __enter__(self) -> Path:
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        return self.path

    def commit(self) -> None:
        old = None
        if self.target.exists():
            old = self.target.parent / f"{self.target.name}.old-{os.getpid()}"
            self.target.rename(old)
        self.path.rename(self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)


def write_meta(directory: str | os.PathLike, meta: dict) -> None:
    """Write meta.json atomically (tmp + rename). Adds ``format_version``."""
    meta = {"format_version": FORMAT_VERSION, **meta}
    path = Path(directory) / META_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
@dataclass
class Sentence:
    fine: np.ndarray
    coarse: np.ndarray
    align: np.ndarray


@dataclass
class Document:
    """One document: its sentences concatenated, with sentence boundaries kept.

    ``fine_offsets[s]:fine_offsets[s+1]`` are the fine tokens of sentence s (likewise coarse);
    ``align`` concatenates the per-sentence alignment counts, so it is valid for the whole document.
    """

    fine: np.ndarray
    coarse: np.ndarray
    align: np.ndarray
    fine_offsets: np.ndarray
    coarse_offsets: np.ndarray

    @property
    def num_sentences(self) -> int:
        return len(self.fine_offsets) - 1

    def coarse_to_fine_spans(self) -> np.ndarray:
        """[num_coarse, 2] array: fine [start, end) covered by each coarse token."""
        ends = np.cumsum(self.align, dtype=np.int64)
        return np.stack([ends - self.align, ends], axis=1)


class PairedSplit:
    """Reads one split (train or valid) of a paired dataset: documents of aligned fine/coarse ids."""

    def __init__(self, directory: str | os.PathLike, split: str = "train"):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.directory = Path(directory)
        self.split = split
        for s in STREAMS:
            for ext in (".bin", ".idx"):
                if not Path(prefix(directory, split, s) + ext).is_file():
                    raise FormatError(
                        f"{prefix(directory, split, s) + ext} is missing: {directory} is not a complete "
                        f"paired dataset; rebuild it with `python data_prep/build.py ... --output {directory}`"
                    )
        # An empty .bin cannot be memory-mapped (an empty split is legal: e.g. no valid documents).
        mmap = os.path.getsize(prefix(directory, split, "fine") + ".bin") > 0
        streams = {}
        for s in STREAMS:
            path = prefix(directory, split, s)
            check_index_size(path)
            try:
                streams[s] = IndexedDataset(path, mmap=mmap)
            except Exception as exc:  # megatron-core raises ValueError / AssertionError / struct.error on damage
                raise FormatError(f"cannot read {path}.idx/.bin ({type(exc).__name__}: {exc}): the files are truncated "
                                  f"or damaged; rebuild the dataset with `python data_prep/build.py ... --output "
                                  f"{directory}`") from None
            index = streams[s].index
            n = len(index.sequence_lengths)  # the last sequence's end, O(1): pointers are byte offsets
            expected = int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * index.dtype_size if n else 0
            actual = os.path.getsize(path + ".bin")
            if actual != expected:
                raise FormatError(f"{path}.bin has {actual:,} bytes, its .idx describes {expected:,}: the file was "
                                  f"truncated or written to; rebuild the dataset with `python data_prep/build.py ... "
                                  f"--output {directory}`")
        self.fine, self.coarse, self.align = streams["fine"], streams["coarse"], streams["align"]
        n = len(self.fine)
        for s in ("coarse", "align"):
            if len(streams[s]) != n:
                raise FormatError(f"{prefix(directory, split, s)}.idx has {len(streams[s]):,} sentences, "
                                  f"{prefix(directory, split, 'fine')}.idx {n:,}: the files are damaged or from "
                                  f"different builds; rebuild the dataset")
        docs = self.fine.document_indices
        for s in ("coarse", "align"):
            if not np.array_equal(docs, streams[s].document_indices):
                raise FormatError(f"{prefix(directory, split, s)}.idx and {prefix(directory, split, 'fine')}.idx have "
                                  f"other document boundaries: the files are damaged or from different builds; "
                                  f"rebuild the dataset")
        # Copies, not views into the memory-mapped .idx: megatron-core unmaps it when the reader is
        # collected, and a view that outlives it (`PairedDataset(d).split("train").document_indices`)
        # crashed the interpreter with a segmentation fault.
        self.document_indices = np.array(docs, dtype=np.int64)
        self.num_sentences = n

    def check_index(self, chunk: int = 1 << 22) -> None:
        """Every sentence's pointer where the lengths before it put it, in every stream; coarse and align
        lengths equal; document boundaries from 0 to the last sentence, never decreasing. Opening checks
        only the ends (O(1)): a flipped byte inside an .idx made the reader return other tokens, silently.
        O(sentences), ``chunk`` at a time (--verify runs it)."""
        n = self.num_sentences
        for s, stream in (("fine", self.fine), ("coarse", self.coarse), ("align", self.align)):
            index, path = stream.index, prefix(self.directory, self.split, s) + ".idx"
            start = 0
            for lo in range(0, n, chunk):
                hi = min(n, lo + chunk)
                lengths = np.asarray(index.sequence_lengths[lo:hi], dtype=np.int64)
                if s == "align" and not np.array_equal(lengths, self.coarse.index.sequence_lengths[lo:hi]):
                    first = lo + int(np.flatnonzero(lengths != self.coarse.index.sequence_lengths[lo:hi])[0])
                    raise FormatError(f"{path} and {prefix(self.directory, self.split, 'coarse')}.idx give sentence "
                                      f"{first:,} other lengths (one align count per coarse token): one of them is "
                                      f"damaged; rebuild the dataset")
                ends = start + np.cumsum(lengths) * index.dtype_size
                expected = np.concatenate([[start], ends[:-1]])
                bad = np.flatnonzero(np.asarray(index.sequence_pointers[lo:hi], dtype=np.int64) != expected)
                if bad.size:
                    i = int(bad[0])
                    raise FormatError(f"{path}: sentence {lo + i:,} starts at byte {int(index.sequence_pointers[lo + i]):,} "
                                      f"of the .bin, but the lengths before it put it at {int(expected[i]):,}: the "
                                      f"index is damaged; rebuild the dataset")
                start = int(ends[-1])
        docs = self.document_indices
        if len(docs) < 1 or docs[0] != 0 or docs[-1] != n or np.any(np.diff(docs) < 0):
            raise FormatError(f"{prefix(self.directory, self.split, 'fine')}.idx: the document boundaries do not run "
                              f"from 0 to its {n:,} sentences in order: the index is damaged; rebuild the dataset")

    def __len__(self) -> int:
        return len(self.document_indices) - 1

    def sentence(self, s: int) -> Sentence:
        # copies (small), for the reason given for document_indices: the reader unmaps its .bin when collected
        return Sentence(np.array(self.fine[s]), np.array(self.coarse[s]), np.array(self.align[s]))

    def document(self, i: int) -> Document:
        if not 0 <= i < len(self):
            raise IndexError(f"document {i} out of range ({len(self)} documents)")
        lo, hi = int(self.document_indices[i]), int(self.document_indices[i + 1])
        fine_lens = self.fine.sequence_lengths[lo:hi].astype(np.int64)
        coarse_lens = self.coarse.sequence_lengths[lo:hi].astype(np.int64)
        # Sentences of a document are contiguous on disk: a slice is one read per stream.
        fine = np.concatenate(self.fine[lo:hi])
        coarse = np.concatenate(self.coarse[lo:hi])
        align = np.concatenate(self.align[lo:hi])
        return Document(
            fine=fine,
            coarse=coarse,
            align=align,
            fine_offsets=np.concatenate([[0], np.cumsum(fine_lens)]),
            coarse_offsets=np.concatenate([[0], np.cumsum(coarse_lens)]),
        )

    def document_lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """(fine, coarse) token count of every document, without reading token data."""
        idx = self.document_indices
        fine = np.add.reduceat(self.fine.sequence_lengths.astype(np.int64), idx[:-1]) if len(self) else np.zeros(0, np.int64)
        coarse = np.add.reduceat(self.coarse.sequence_lengths.astype(np.int64), idx[:-1]) if len(self) else np.zeros(0, np.int64)
        return fine, coarse


def build_lock_path(output: str | os.PathLike) -> Path:
    """``.DIR.build-lock`` next to DIR: held (flock) by the build writing DIR while it runs."""
    out = Path(output)
    return out.parent / f".{out.name}.build-lock"


def running_build(output: str | os.PathLike) -> str | None:
    """Who holds DIR's build lock ("pid N on HOST") while a build of DIR runs, else None."""
    return lock_holder(build_lock_path(output))


def lock_holder(path: str | os.PathLike) -> str | None:
    """Who holds the flock on the lock file ``path`` ("pid N on HOST", what the holder wrote in it) while
    it runs; None if nobody does (no file, or one a finished or killed process left). Read-only: takes
    no lock that outlives the call. (data_prep's build lock; pre-training's and fine-tuning's run lock.)"""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.read(fd, 200).decode(errors="replace").strip() or "a process"
    except OSError:
        return None
    finally:
        os.close(fd)  # releases the shared lock, if taken
    return None


def _file_identity(path: Path) -> tuple[int, int, int] | None:
    """(inode, mtime, size) of a file, None if it is gone: a rebuilt dataset's meta.json differs in all three."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class PairedDataset:
    """A complete dataset directory: meta, vocabularies, and its splits."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        meta_path = self.directory / META_FILE
        if self.directory.is_file():
            raise FormatError(f"{self.directory} is a file, not a dataset directory; give the directory that "
                              f"`python data_prep/build.py --output DIR` wrote")
        if not meta_path.is_file():
            unfinished = self.directory.with_name(self.directory.name.removesuffix(".partial"))
            work = unfinished.with_name(unfinished.name + ".partial")  # a build's work directory (DIR.partial/)
            if work.is_dir() and (unfinished / META_FILE).is_file():
                raise FormatError(f"{self.directory} is the work directory of the build of {unfinished} (kept with "
                                  f"--keep-work-dir, or of an --overwrite that was stopped), not a dataset: the dataset "
                                  f"is {unfinished}")
            holder = running_build(unfinished) if work.is_dir() else None
            if holder:
                raise FormatError(f"{self.directory} is not a dataset yet: a data_prep build of {unfinished} is running "
                                  f"({holder}, its work in {work}); wait for it to finish")
            if work.is_dir():
                raise FormatError(
                    f"{self.directory} is not a dataset: an interrupted data_prep build of {unfinished} left its work "
                    f"in {work}; finish it by running the same `python data_prep/build.py ... --output "
                    f"{unfinished}` command again with --resume"
                )
            partial = sorted(self.directory.parent.glob(self.directory.name + ".partial-*"))
            hint = f" (found unfinished build {partial[0]}; it was interrupted, rebuild)" if partial else ""
            what = f"{META_FILE} is missing" if self.directory.is_dir() else "it does not exist"
            raise NotADataset(
                f"{self.directory} is not a paired dataset: {what}{hint}. "
                f"Build one with `python data_prep/build.py --lang zh|en --output {self.directory}`"
            )
        try:
            self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FormatError(f"{meta_path} is not valid JSON ({exc}): the dataset is damaged; rebuild it") from None
        if not isinstance(self.meta, dict):
            raise FormatError(f"{meta_path} holds a JSON {type(self.meta).__name__}, not the object data_prep writes: "
                              f"the dataset is damaged; rebuild it")
        version = self.meta.get("format_version")
        if version != FORMAT_VERSION:
            raise FormatError(
                f"{self.directory}: format version {version}, this code reads version {FORMAT_VERSION}; "
                f"rebuild the dataset with this version of data_prep/build.py"
            )
        self.language = self.meta.get("language")
        for name in (FINE_VOCAB_FILE, COARSE_VOCAB_FILE):
            if not (self.directory / name).is_file():
                raise FormatError(f"{self.directory / name} is missing: {self.directory} is not a complete paired "
                                  f"dataset; rebuild it with `python data_prep/build.py ... --output {self.directory}`")
        self.fine_vocab = Vocab.load(self.directory / FINE_VOCAB_FILE)
        self.coarse_vocab = Vocab.load(self.directory / COARSE_VOCAB_FILE)
        for name, vocab in (("fine", self.fine_vocab), ("coarse", self.coarse_vocab)):
            recorded = self.meta.get(f"{name}_vocab_size")
            if recorded is not None and recorded != len(vocab):
                raise FormatError(f"{self.directory}: meta.json says {name}_vocab_size={recorded}, the file has {len(vocab)}")
        self._splits: dict[str, PairedSplit] = {}
        self._identity = _file_identity(meta_path)

    def split(self, name: str = "train") -> PairedSplit:
        if name not in self._splits:
            now = _file_identity(self.directory / META_FILE)
            if now is not None and now != self._identity:  # splits open lazily; the vocabularies were read at open
                raise FormatError(f"{self.directory} was rebuilt after this reader opened it: its {name} split would be "
                                  f"read with the old vocabularies. Open the dataset again")
            self._splits[name] = PairedSplit(self.directory, name)
        return self._splits[name]

    @property
    def fingerprint(self) -> str:
        """Identifies the data a checkpoint was trained on (vocabularies + content checksums)."""
        h = hashlib.sha256()
        h.update(self.fine_vocab.fingerprint().encode())
        h.update(self.coarse_vocab.fingerprint().encode())
        h.update(json.dumps(self.meta.get("splits", {}), sort_keys=True).encode())
        return h.hexdigest()[:16]

    # --- decoding -------------------------------------------------------------------------
    def fine_tokens(self, ids: Iterable[int]) -> list[str]:
        return [self.fine_vocab.token(int(i)) for i in ids]

    def coarse_tokens(self, ids: Iterable[int]) -> list[str]:
        return [self.coarse_vocab.token(int(i)) for i in ids]

    def decode_fine(self, ids: Iterable[int]) -> str:
        return detokenize(self.fine_tokens(ids), self.language)

    def decode_coarse(self, ids: Iterable[int]) -> str:
        return detokenize(self.coarse_tokens(ids), self.language)


# ---------------------------------------------------------------------------------------------
# Token strings <-> text. One convention for both languages and both granularities:
#   - a token that continues the previous word (no space before it) starts with "##";
#   - for Chinese, CJK characters and punctuation join without spaces, Latin/digit words are
#     separated by one space, as in the normalised text;
#   - for English, every token not starting with "##" is preceded by a space; a coarse phrase
#     token joins its words with "_" ("new_york"), which decodes to a space.
# ---------------------------------------------------------------------------------------------
CONTINUATION = "##"
PHRASE_JOINER = "_"


def _is_wordlike(ch: str) -> bool:
    return ch.isascii() and ch.isalnum()


def detokenize(tokens: Sequence[str], language: str | None) -> str:
    out: list[str] = []
    prev = ""
    for tok in tokens:
        if tok.startswith(CONTINUATION) and len(tok) > len(CONTINUATION):
            piece = tok[len(CONTINUATION):]
            out.append(piece)
            prev = piece
            continue
        piece = tok.replace(PHRASE_JOINER, " ") if language == "en" and len(tok) > 1 else tok
        if out:
            if language == "en":
                out.append(" ")
            elif _is_wordlike(prev[-1:]) and _is_wordlike(piece[:1]):
                out.append(" ")
        out.append(piece)
        prev = piece
    return "".join(out)
