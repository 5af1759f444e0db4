"""Language plugins: how one language turns documents into aligned fine/coarse ids.

The build engine (``data_prep/core.py``) is language-blind: it reads inputs, cuts the corpus into
deterministic shards, runs the shards on N processes (or MPI ranks), merges them and writes the
dataset. Everything that depends on the language lives in a ``Language`` subclass registered here.

How to implement a language (English does this in ``data_prep/english.py``)
-------------------------------------------------------------------------
1. Subclass ``Language`` and set ``name`` (the ``--lang`` value) and ``description``.
2. ``add_arguments(group)`` (classmethod): add your own CLI options to ``group`` (an argparse
   group). The shared options ``--fine-vocab-size``, ``--coarse-vocab-size``, ``--fine-min-count``
   and ``--valid-fraction`` are added by the core; read them from ``options`` as
   ``fine_vocab_size`` / ``coarse_vocab_size`` / ``fine_min_count`` (they are copied in; when the
   user omits them the class attributes ``default_fine_vocab_size`` etc. are used).
   ``options_from_args(args)`` (classmethod) returns a JSON-able dict of YOUR options (the
   defaults do: every option you added whose ``dest`` is in ``cls.option_names``). The dict is
   recorded in meta.json ``build.language_options`` and a ``--resume`` with different options is
   refused, so put every option that changes the output in it.
3. ``__init__(self, options)`` receives that dict (plus the shared options). It must be cheap and
   picklable: workers are separate processes that rebuild the plugin from the same dict.
4. ``check_sample(text, source)``: called on the first ~256 KB of every input BEFORE any expensive
   work; return an error message (naming the fix, e.g. "pass --lang en") if the text is clearly not
   your language, else None. ``--skip-language-check`` disables it.
5. ``demo_inputs()``: the built-in demo corpus used when no ``--input`` is given, as a list of
   ``inputs.InputSpec`` (usually text files found inside an installed registry package).
6. ``analyze_shard(documents, cache_dir) -> dict[str, Counter]``: runs in a worker once per shard.
   ``documents`` is the list of raw document strings of the shard, in corpus order. Normalise, split
   sentences, pre-tokenize (segment) and WRITE what ``encode_shard`` needs into ``cache_dir`` (so an
   expensive segmenter never runs twice); return count tables (e.g. {"char": ..., "word": ...}).
   The core sums the Counters of all shards (and all MPI ranks) key by key. A table may also be
   returned already packed (``PackedCounter``: the keys joined by NUL, an int64 count each).
   Optional, in the process that will run ``fit`` of a one-rank build: ``on_analysis_start``,
   ``on_shard_analysed`` (each shard in corpus order, as soon as it and those before it are
   analysed), ``on_analysis_end``, ``abort_background``: work on the shards' caches while the rest
   are analysed (English starts KenLM's lmplz there and feeds it each shard's words).
7. ``fit(counts, corpus, artifacts_dir) -> dict``: runs ONCE (main process / MPI rank 0) after
   every shard was analysed. ``counts`` are the summed Counters. ``corpus`` (a ``Corpus``) streams
   the documents again if a corpus-level training step needs the text: ``corpus.documents()``
   yields raw documents in order, ``corpus.shard_cache_dirs()`` gives each shard's cache dir, and
   ``corpus.scratch_dir`` is a private directory for large temporary files (e.g. the word-tokenized
   text for KenLM's lmplz); ``corpus.map_shards(fn, arg)`` / ``corpus.sum_shards(fn, arg)`` run a
   per-shard pass (e.g. counting) on the worker processes. Write ``fine_vocab.txt`` and ``coarse_vocab.txt`` (format.Vocab.save)
   and any extra files (fine_tokenizer.json, phrases.tsv, ...) into ``artifacts_dir``: every file
   there is copied into the dataset directory; subdirectories are build-time caches for ``load``
   (not copied). Return extra statistics for meta.json ``stats``.
   It must be deterministic (same counts/corpus -> same bytes): the build is reproducible and
   resumable, and the output must not depend on the number of workers.
8. ``load(artifacts_dir)``: runs in every worker before encoding; read back what ``fit`` wrote.
9. ``encode_shard(cache_dir) -> EncodedShard``: encode every document of the shard (one entry of
   ``document_sentences`` per input document of the shard, in order, 0 for a document that became
   empty). Build it with ``EncodedShardBuilder`` (one ``add_document`` per document) or directly
   from flat arrays. ``EncodedShard.extra`` holds integer counters that are summed into
   meta.json ``stats`` (e.g. {"phrase_tokens": 123}). The core checks the alignment invariant.
10. Optional ``finish(out_dir, stats, corpus) -> dict``: runs ONCE (rank 0) after the shards are
   merged into ``out_dir``, before meta.json is written; ``stats`` are the dataset's final
   statistics. Write reports into ``out_dir``; return statistics derived from the final counts.
   Optional ``prepare_finish(artifacts_dir, corpus)`` runs on rank 0 while the workers encode (the
   main process is otherwise idle there): do the expensive part of ``finish`` in it.
11. Register it: ``register(MyLanguage)`` at the end of your module and add the module name to
   ``PLUGIN_MODULES`` below (the registry imports it lazily, so a missing optional dependency of
   one language never breaks another).
12. ``--vocab-from DIR`` (a new dataset with the vocabularies of an existing one): the core takes
   the options of ``option_names`` that are not in ``fit_options`` / ``input_options`` from DIR's
   meta.json (an explicit different value is refused), refuses the ``fit_options`` (they would have
   no effect), and calls ``fit_from(source_dir, counts, corpus, artifacts_dir)`` instead of ``fit``:
   the default copies ``artifact_files`` from DIR; override it to also write the build-time caches
   your ``load`` / ``finish`` expect. The plugin is told by ``options["vocab_from"]`` (set on every
   worker too), e.g. to skip looking for tools only the fit needs.

Conventions every language must follow (``format.detokenize``): a token that continues the
previous word without a space starts with "##"; English coarse phrases join words with "_".
``python data_prep/build.py --verify DIR`` checks, for every document, that each coarse token
equals the concatenation of the fine tokens it covers (modulo those conventions) and that the
fine and coarse sides decode to the same text when neither contains [UNK].
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, NamedTuple

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from data_prep.inputs import InputSpec

# Modules that define (and register) a language, imported on first use of the registry.
PLUGIN_MODULES: dict[str, str] = {"zh": "data_prep.chinese", "en": "data_prep.english"}

_REGISTRY: dict[str, type[Language]] = {}


def sum_counters(counters: Sequence[Counter]) -> Counter:
    """The sum of several Counters: the same keys, values and key order as updating an empty Counter
    with each in turn, without a Python-level loop over the items (summing a corpus' shard counts,
    hundreds of thousands of words per shard, was a serial step of the build).

    Keys are numbered in first-seen order (``dict.fromkeys``), the values summed with ``bincount``
    (exact below 2**53; larger totals, or values that are not integers, take the plain loop)."""
    counters = [c for c in counters if c]
    if len(counters) < 2:
        return Counter(counters[0]) if counters else Counter()
    keys = list(itertools.chain.from_iterable(counters))
    values = None
    if set(map(type, itertools.chain.from_iterable(c.values() for c in counters))) == {int}:
        try:
            values = np.fromiter(itertools.chain.from_iterable(c.values() for c in counters), dtype=np.int64, count=len(keys))
        except OverflowError:
            pass
    if values is None or float(np.abs(values.astype(np.float64)).sum()) >= 2**53:
        total: Counter = Counter()
        for c in counters:
            total.update(c)
        return total
    unique = dict.fromkeys(keys)
    position = dict(zip(unique, range(len(unique))))
    codes = np.fromiter(map(position.__getitem__, keys), dtype=np.int64, count=len(keys))
    sums = np.bincount(codes, weights=values, minlength=len(unique)).astype(np.int64)
    return Counter(dict(zip(unique, sums.tolist())))


def concat_ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of arange(start, start + count) for each (start, count), vectorised: the
    positions of variable-length slices (a word's tokens in a flat array) gathered at once."""
    offsets = np.cumsum(counts) - counts
    return np.repeat(starts - offsets, counts) + np.arange(int(counts.sum()))


def compact_ints(values: np.ndarray) -> np.ndarray:
    """Integer ``values`` as int32 when every value fits (token ids, alignments, counts: an encoded
    shard's arrays in half the memory of int64), else unchanged (a value needs int64)."""
    values = np.asarray(values)
    if values.dtype != np.int32 and (not len(values) or (int(values.min()) >= -2**31 and int(values.max()) < 2**31)):
        return values.astype(np.int32)
    return values


def bincount(ids: np.ndarray, minlength: int = 0, chunk: int = 1 << 20) -> np.ndarray:
    """``np.bincount(ids, minlength=minlength)`` over slices of ``chunk`` ids: np.bincount makes an
    int64 copy of an int32 input (a shard's word ids: ~70 MB at 16M characters); slices bound it."""
    counts = np.bincount(ids[:chunk], minlength=minlength)
    for a in range(chunk, len(ids), chunk):
        part = np.bincount(ids[a:a + chunk], minlength=len(counts))
        if len(part) > len(counts):
            part[: len(counts)] += counts
            counts = part
        else:
            counts += part
    return counts


def count_chars(text: str, *patterns) -> list[int]:
    """How many characters of ``text`` each one-character regular expression matches, testing
    each distinct character once (a regex pass over 256k characters with a Unicode class such as
    ``[^\\W\\d_]`` takes ~25 ms; this, ~2 ms)."""
    cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    counts = np.bincount(cps)
    distinct = np.flatnonzero(counts)
    chars = [chr(c) for c in distinct.tolist()]
    return [int(counts[distinct[np.fromiter((p.fullmatch(c) is not None for c in chars), dtype=bool, count=len(chars))]].sum())
            for p in patterns]


def arrow_strings(chunks: Sequence[bytes]):
    """A pyarrow LargeStringArray of UTF-8 ``chunks``, made from its buffers: ``pa.array`` imports
    pandas on its first call (~0.15 s in every process that calls it: each pool worker)."""
    import pyarrow as pa

    offsets = np.zeros(len(chunks) + 1, dtype=np.int64)
    np.cumsum([len(c) for c in chunks], out=offsets[1:])
    return pa.LargeStringArray.from_buffers(len(chunks), pa.py_buffer(offsets), pa.py_buffer(b"".join(chunks)))


def arrow_ints(array) -> np.ndarray:
    """A pyarrow integer array without nulls as a NumPy view (``to_numpy(zero_copy_only=False)``
    imports pandas, see ``arrow_strings``)."""
    if array.null_count:
        raise ValueError("arrow_ints: the array has nulls")
    values = np.frombuffer(array.buffers()[1], dtype=np.dtype(f"int{array.type.bit_width}"))
    return values[array.offset:array.offset + len(array)]


ARRAYS_MAGIC = b"AMBARRS1"


def save_arrays(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Write NumPy ``arrays`` (numeric, any shape) into one file, raw: ``ARRAYS_MAGIC``, the header's
    length (8 bytes), a JSON header (each array's name, dtype, shape and offset) and the arrays' bytes,
    each at an 8-byte aligned offset. What np.savez would store, without its zip (a CRC and Python's
    zipfile per array): a Chinese shard's cache writes in ~0.7x and reads in ~0.3x the time
    (``load_arrays``). Not atomic: a marker written after it says the file is complete."""
    arrays = {name: np.asarray(a, order="C") for name, a in arrays.items()}
    entries, offset = [], 0
    for name, a in arrays.items():
        if a.dtype.hasobject:
            raise TypeError(f"save_arrays: {name} holds Python objects")
        entries.append({"name": name, "dtype": a.dtype.str, "shape": list(a.shape), "offset": offset})
        offset += -(-a.nbytes // 8) * 8
    header = json.dumps({"arrays": entries, "bytes": offset}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as fh:
        fh.write(ARRAYS_MAGIC + len(header).to_bytes(8, "little") + header)
        for a in arrays.values():
            fh.write(a.tobytes() if a.ndim == 0 else a)
            fh.write(bytes(-a.nbytes % 8))


def load_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays ``save_arrays`` wrote, by name: writable views into one buffer read at once."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        buf = bytearray(size)
        got = fh.readinto(buf)
    start = len(ARRAYS_MAGIC) + 8
    try:
        if got != size or buf[:len(ARRAYS_MAGIC)] != ARRAYS_MAGIC:
            raise ValueError("no array file header")
        length = int.from_bytes(buf[len(ARRAYS_MAGIC):start], "little")
        header = json.loads(bytes(buf[start:start + length]))
        base = start + length
        if base + header["bytes"] != size:
            raise ValueError(f"{size:,} bytes, the header says {base + header['bytes']:,}")
        out = {}
        for e in header["arrays"]:
            dtype, shape = np.dtype(e["dtype"]), tuple(e["shape"])
            out[e["name"]] = np.frombuffer(buf, dtype=dtype, count=int(np.prod(shape, dtype=np.int64)),
                                           offset=base + e["offset"]).reshape(shape)
        return out
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a complete array file ({exc})") from None


NATIVE_VERSION = 14  # data_prep/_native.c's VERSION this code expects


def load_native():
    """data_prep._native (the Chinese build's word numbering and sentence splitting in C, compiled by
    ``pip install -e .``), or None: not compiled
    (no C compiler at install time, a checkout not re-installed since), compiled from another version
    of _native.c, or AMBERT_PURE_PYTHON=1."""
    if os.environ.get("AMBERT_PURE_PYTHON", "") not in ("", "0"):
        return None
    try:
        _native = importlib.import_module("data_prep._native")
    except ImportError:
        return None
    return _native if getattr(_native, "VERSION", None) == NATIVE_VERSION else None


_native = load_native()


def cache_dir() -> Path | None:
    """Where data_prep keeps what it can rebuild at any time (jieba-c's built dictionary):
    $AMBERT_CACHE_DIR, else $XDG_CACHE_HOME/ambert, else ~/.cache/ambert; None when AMBERT_CACHE_DIR
    is set to the empty string (no cache: everything is built in each process)."""
    given = os.environ.get("AMBERT_CACHE_DIR")
    if given is not None:
        return Path(given).expanduser() if given else None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ambert"


def cached_bytes(name: str, recipe: str, build: Callable[[], bytes], kept: int = 4) -> bytes:
    """``build()``, through the disk cache: kept in ``cache_dir()`` as ``{name}-{sha1(recipe)}.bin``
    (``recipe``: everything the bytes depend on, e.g. the Unicode version and the rules' version), read
    back from there by later processes. A missing, damaged or unwritable cache costs only ``build()``;
    the ``kept`` newest files of ``name`` stay."""
    import hashlib

    folder = cache_dir()
    path = folder / f"{name}-{hashlib.sha1(recipe.encode()).hexdigest()[:20]}.bin" if folder is not None else None
    blob = read_cached(path)
    if blob is not None:
        return bytes(blob)
    data = build()
    if path is not None:
        keep_cached(path, data, kept)
    return data


def read_cached(path: Path | None) -> memoryview | None:
    """What ``keep_cached`` wrote to ``path`` (its CRC-32 checked), or None: no such file, unreadable
    or damaged (the caller builds the thing again; a damaged file is overwritten then)."""
    import logging
    import zlib

    if path is None or not path.is_file():
        return None
    try:
        blob = memoryview(path.read_bytes())
    except OSError as exc:
        logging.getLogger("data_prep").debug("%s: %s; building it again", path, exc)
        return None
    if len(blob) > 4 and zlib.crc32(blob[:-4]) == int.from_bytes(blob[-4:], "little"):
        return blob[:-4]
    logging.getLogger("data_prep").debug("%s: damaged (CRC-32); building it again", path)
    return None


def keep_cached(path: Path, data: bytes, kept: int) -> None:
    """Write ``data`` + its CRC-32 to ``path`` atomically (a temporary file renamed: a killed or
    concurrent writer never leaves a partial file under the name), then drop all but the ``kept``
    newest files of its folder named like it (the same prefix up to the last "-", the same suffix).
    Any OSError (a read-only home, a full disk): nothing kept, the caller goes on."""
    import logging
    import zlib

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.write(zlib.crc32(data).to_bytes(4, "little"))
        os.replace(tmp, path)
        siblings = path.parent.glob(f"{path.stem.rsplit('-', 1)[0]}-*{path.suffix}")
        for old in sorted(siblings, key=lambda p: p.stat().st_mtime, reverse=True)[kept:]:
            old.unlink(missing_ok=True)
    except OSError as exc:
        logging.getLogger("data_prep").debug("%s is not cached (%s)", path, exc)
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


class StringNumbering:
    """Ids of strings in first-seen order: ``numbering(strings)`` -> their ids (int64), numbering the
    new ones; ``index`` (a dict, complete) maps every string numbered to its id.

    With ``data_prep._native``: a C loop with a table of packed short strings in front of the dict
    (~30 ns a string). Without it: ``np.fromiter`` over the ``defaultdict``'s ``__getitem__`` (C as
    well, but a dict probe hashes each new string object and compares it with the stored key: ~250 ns).
    Same ids either way (tests/test_native.py)."""

    def __init__(self, native=None) -> None:
        native = _native if native is None else native
        self.index: defaultdict[str, int] = defaultdict()
        self.index.default_factory = self.index.__len__  # a new string's id: the strings numbered before it
        self._c = self.native = native.WordNumbers(self.index) if native else None

    def __len__(self) -> int:
        return len(self.index)

    def __call__(self, strings: Sequence[str]) -> np.ndarray:
        if self._c is None:
            return np.fromiter(map(self.index.__getitem__, strings), dtype=np.int64, count=len(strings))
        ids = np.empty(len(strings), dtype=np.int64)
        self._c.number(strings, ids)
        return ids

    def joined(self, text: str, sep: str) -> tuple[np.ndarray, list[str]]:
        """(ids of ``text.split(sep)``, the strings numbered anew, in id order). (The Chinese encoding's
        word memo without the extension; with it: ``_native.TokenIndex.number_joined``.)"""
        strings = text.split(sep)
        seen = len(self.index)
        ids = self(strings)
        where = np.flatnonzero(ids >= seen)
        first = where[np.unique(ids[where], return_index=True)[1]]  # each new string's first place, in id order
        return ids, [strings[i] for i in first.tolist()]


class PackedCounter(NamedTuple):
    """A count table of str keys as ONE string (the keys joined by NUL) and an int64 array: a shard's
    table (tens of thousands of words) pickles, loads and is summed without a Python object per key
    until the fit needs the Counter (``unpack``). ``pack`` keeps a table it cannot represent exactly
    (other key types, a NUL in a key, values that are not non-negative ints below 2**40) as it is."""

    keys: str
    values: np.ndarray

    @staticmethod
    def pack(table: Counter) -> PackedCounter | Counter:
        if not table:
            return PackedCounter("", np.zeros(0, dtype=np.int64))
        if set(map(type, table)) != {str} or set(map(type, table.values())) != {int}:
            return table
        keys = "\0".join(table)
        if keys.count("\0") != len(table) - 1:
            return table
        try:
            values = np.fromiter(table.values(), dtype=np.int64, count=len(table))
        except OverflowError:
            return table
        if values.min() < 0 or values.max() >= 2**40:
            return table
        return PackedCounter(keys, values)

    def key_list(self) -> list[str]:
        return self.keys.split("\0") if len(self.values) else []

    def unpack(self) -> Counter:
        return Counter(dict(zip(self.key_list(), self.values.tolist())))


def sum_count_tables(tables: Sequence[PackedCounter | Counter]) -> PackedCounter | Counter:
    """``sum_counters`` for tables that may be packed: the same keys, values and key order. Packed
    tables are summed in one pass over their keys (numbered in first-seen order, in C) and stay
    packed; any other table makes it the plain sum of Counters."""
    if len(tables) == 1 and isinstance(tables[0], PackedCounter):
        return tables[0]  # (its keys are distinct)
    packed = [t for t in tables if isinstance(t, PackedCounter)]
    bound = sum(int(t.values.max()) for t in packed if len(t.values))
    if len(packed) != len(tables) or bound >= 2**62:
        return sum_counters([t.unpack() if isinstance(t, PackedCounter) else t for t in tables])
    if _native is not None:  # in C, hashing the keys' code points: no str per key (~5x faster)
        live = [t for t in packed if len(t.values)]
        keys, sums = _native.sum_tables([t.keys for t in live], [np.ascontiguousarray(t.values, dtype=np.int64) for t in live])
        return PackedCounter(keys, np.frombuffer(sums, dtype=np.int64).copy())
    # Streamed, a table at a time (memory: the distinct keys, not every shard's keys at once). Arrow's
    # dictionary_encode over all the tables' joined keys was 4x faster (0.25 -> 0.06 s for 39 zh
    # shards) but held all their keys at once and imported pyarrow (~40 MB) into every Chinese
    # worker: the 2-worker build's peak grew with the corpus (5.5 -> 89 MB of text: 366 -> 503 MB
    # against 261 -> 289 MB).
    numbering = StringNumbering()
    total = np.zeros(0, dtype=np.int64)
    for table in packed:
        ids = numbering(table.key_list())
        if len(numbering) > len(total):
            total = np.concatenate([total, np.zeros(len(numbering) - len(total), dtype=np.int64)])
        total[ids] += table.values  # the keys of one table are distinct
    return PackedCounter("\0".join(numbering.index), total)


class LanguageError(ValueError):
    """Input that does not fit the chosen language (the message names the fix). ``final``: no
    ``--resume`` can get past it (the fix changes the input or the options), so a build that stops
    on it leaves no unfinished work behind."""

    def __init__(self, message: str, final: bool = False):
        super().__init__(message)
        self.final = final


@dataclass
class EncodedShard:
    """All encoded documents of one shard as flat arrays (sentences concatenated, in order)."""

    fine: np.ndarray
    """Fine ids of every sentence of the shard, concatenated."""
    coarse: np.ndarray
    """Coarse ids, concatenated."""
    align: np.ndarray
    """Per coarse token: how many fine tokens it covers (sum per sentence == fine length)."""
    fine_lengths: np.ndarray
    """Number of fine tokens of each sentence."""
    coarse_lengths: np.ndarray
    """Number of coarse tokens of each sentence."""
    document_sentences: np.ndarray
    """Per input document of the shard: its number of sentences (0 = empty, skipped)."""
    characters: int = 0
    """Characters of normalised text encoded (spaces excluded) for the statistics."""
    extra: dict[str, int] = field(default_factory=dict)
    """Language-specific integer counters, summed over shards into meta.json stats."""

    @property
    def num_documents(self) -> int:
        return len(self.document_sentences)


class EncodedShardBuilder:
    """Collects documents one at a time and produces an ``EncodedShard`` (for per-document encoders)."""

    def __init__(self) -> None:
        self._fine: list[np.ndarray] = []
        self._coarse: list[np.ndarray] = []
        self._align: list[np.ndarray] = []
        self._fine_lengths: list[int] = []
        self._coarse_lengths: list[int] = []
        self._document_sentences: list[int] = []
        self.characters = 0
        self.extra: Counter = Counter()

    def add_document(self, sentences: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]]) -> None:
        """One document as a list of (fine_ids, coarse_ids, align) sentences; [] for an empty document."""
        for fine, coarse, align in sentences:
            self._fine.append(np.asarray(fine, dtype=np.int64))
            self._coarse.append(np.asarray(coarse, dtype=np.int64))
            self._align.append(np.asarray(align, dtype=np.int64))
            self._fine_lengths.append(len(fine))
            self._coarse_lengths.append(len(coarse))
        self._document_sentences.append(len(sentences))

    def build(self) -> EncodedShard:
        def cat(parts: list[np.ndarray]) -> np.ndarray:
            return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

        return EncodedShard(
            fine=cat(self._fine),
            coarse=cat(self._coarse),
            align=cat(self._align),
            fine_lengths=np.asarray(self._fine_lengths, dtype=np.int64),
            coarse_lengths=np.asarray(self._coarse_lengths, dtype=np.int64),
            document_sentences=np.asarray(self._document_sentences, dtype=np.int64),
            characters=self.characters,
            extra={k: int(v) for k, v in self.extra.items()},
        )


class Corpus:
    """What ``Language.fit`` may stream over: the whole corpus, shard by shard, in order."""

    def __init__(self, shard_dirs: Sequence[Path], read_documents: Callable[[Path], list[str]], scratch_dir: Path,
                 mapper: Callable[[Callable, list[Path], object], list] | None = None):
        self._shard_dirs = list(shard_dirs)
        self._read_documents = read_documents
        self._mapper = mapper
        self.scratch_dir = Path(scratch_dir)
        """A private, initially empty directory for temporary files of the corpus-level step."""

    def map_shards(self, fn: Callable[[Path, object], object], arg: object = None) -> list:
        """``[fn(cache_dir, arg) for cache_dir in self.shard_cache_dirs()]``, run on the build's worker
        processes (``--workers``): a corpus-level pass (e.g. counting) in parallel over the shards.
        ``fn`` must be a module-level function; ``arg`` is pickled once and loaded once per worker.
        Results come back in shard order."""
        if self._mapper is None:
            return [fn(d, arg) for d in self.shard_cache_dirs()]
        return self._mapper(fn, self.shard_cache_dirs(), arg)

    def sum_shards(self, fn: Callable[[Path, object], Counter], arg: object = None) -> Counter:
        """The sum of ``fn(cache_dir, arg)`` (Counters) over every shard, on the build's workers; each
        worker sums its own shards first (sums of counts do not depend on the order)."""
        if self._mapper is None:
            return sum_counters([fn(d, arg) for d in self.shard_cache_dirs()])
        return self._mapper(fn, self.shard_cache_dirs(), arg, add=True)

    def documents(self) -> Iterator[str]:
        """Raw documents of the whole corpus in order (streamed: one shard in memory at a time)."""
        for shard in self._shard_dirs:
            yield from self._read_documents(shard)

    def shard_cache_dirs(self) -> list[Path]:
        """Each shard's cache directory (what ``analyze_shard`` wrote), in corpus order."""
        return [d / "cache" for d in self._shard_dirs]

    @property
    def num_shards(self) -> int:
        return len(self._shard_dirs)


class Language:
    """Base class of a language plugin; see the module docstring for the contract."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    option_names: ClassVar[tuple[str, ...]] = ()
    """argparse ``dest`` names of this language's own options (collected by ``options_from_args``)."""
    default_fine_vocab_size: ClassVar[int] = 21128
    """--fine-vocab-size when not given (the paper's sizes: zh 21,128; en 30,522)."""
    default_coarse_vocab_size: ClassVar[int] = 21128 + 72635
    """--coarse-vocab-size when not given (the paper's sizes: zh 21,128 characters + 72,635 words; en
    30,522 words + 77,645 phrases: the reading that gives its 176M / 194M parameters)."""
    default_fine_min_count: ClassVar[int] = 1
    """--fine-min-count when not given: a fine unit seen fewer times stays out of the vocabulary."""
    default_coarse_min_count: ClassVar[int] = 2
    """--coarse-min-count when not given: a coarse unit seen fewer times stays out of the vocabulary."""
    fit_options: ClassVar[tuple[str, ...]] = ()
    """``dest`` names of this language's options that only shape ``fit`` (the vocabularies): refused
    with --vocab-from, which takes the vocabularies of another dataset (the shared --fine-vocab-size,
    --coarse-vocab-size, --fine-min-count and --coarse-min-count always are)."""
    input_options: ClassVar[tuple[str, ...]] = ()
    """``dest`` names of options that only shape the input checks (``check_sample``), not the tokens:
    free with --vocab-from. Every other option of ``option_names`` shapes the encoding and is taken
    from the --vocab-from dataset."""
    run_options: ClassVar[tuple[str, ...]] = ()
    """``dest`` names of options that change how a build runs, not what it writes (a tool's path, a
    memory budget): a ``--resume`` may give them other values (e.g. to fix the one that stopped it)."""
    file_options: ClassVar[tuple[str, ...]] = ()
    """``dest`` names of options that name a file whose content shapes the output (a user dictionary):
    its sha256 is among the build's parameters, so a ``--resume`` after the file changed is refused."""
    artifact_files: ClassVar[tuple[str, ...]] = ("fine_vocab.txt", "coarse_vocab.txt")
    """The files ``fit`` writes into ``artifacts_dir`` that ``load`` reads (copied by ``fit_from``)."""
    reads_documents_again: ClassVar[bool] = True
    """False: after ``analyze_shard`` nothing of this language reads a shard's documents again (``fit``,
    ``prepare_finish``, ``finish`` and ``encode_shard`` use the counts and the shard caches only): a
    --workers 1 build then analyses each shard from the documents in hand and writes no copy of them
    (a killed build reads the inputs again for the shards it had not analysed)."""
    fit_takes_packed: ClassVar[bool] = False
    """True: ``fit`` / ``fit_from`` take the summed count tables as they are (``PackedCounter``: the keys
    joined in one string, the counts in an array; a Counter otherwise); False: as Counters (``unpack``:
    a Python object per key, ~0.4 s a million distinct keys)."""

    def __init__(self, options: dict):
        self.options = dict(options)

    # ---- command line ----------------------------------------------------------------------
    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        """Add this language's own options to ``group``."""

    @classmethod
    def options_from_args(cls, args: argparse.Namespace) -> dict:
        """JSON-able dict of this language's options (recorded in meta.json, checked on --resume)."""
        return {name: getattr(args, name) for name in cls.option_names if hasattr(args, name)}

    @classmethod
    def shard_characters_for(cls, text_bytes: int, workers: int) -> int:
        """The default shard size (characters; the core keeps it within [50k, 16M]) for ``text_bytes``
        of text and ``workers`` processes in all (ranks x --workers). This one: text_bytes / 32 for any
        number of workers (English: ~32 shards; its report's example sentences come from evenly spaced
        shards, so they would change with a size that followed the workers). A language whose output
        does not depend on the shard size may size them to the workers: fewer shards cost less fixed
        work (a shard's own tables of distinct words, its files), more share the work out evenly."""
        return text_bytes // 32

    @classmethod
    def same_option(cls, name: str, a, b) -> bool:
        """Whether option values ``a`` and ``b`` encode text the same way (a --vocab-from build may give
        either; e.g. two segmenters that give the same words)."""
        return a == b

    # ---- cheap checks ----------------------------------------------------------------------
    def check_build_options(self) -> None:
        """Raise LanguageError for build options that cannot work, before any work (a build calls it;
        loading a dataset does not: its recorded options were fine when it was built)."""
        return None

    def check_sample(self, text: str, source: str) -> str | None:
        """An error message if ``text`` (the start of input ``source``) is clearly not this language."""
        return None

    def demo_inputs(self) -> list[InputSpec]:
        raise LanguageError(f"--lang {self.name} has no built-in demo corpus: pass --input PATH")

    # ---- the build ---------------------------------------------------------------------------
    def warm_up(self) -> None:
        """Optional: load what ``analyze_shard`` needs (a segmenter's dictionary). Pool workers call
        it as they start, while the main process reads the first shard; an error here is ignored
        (the first ``analyze_shard`` raises it again, and the build reports it)."""
        return None

    def before_fork(self) -> None:
        """Optional: load, in the main process before it forks the pool, what the workers can share
        read-only (their pages stay one copy in memory and in the CPU's caches). Errors are ignored
        here too (each worker's first task raises them again)."""
        return None

    def analyze_shard(self, documents: list[str], cache_dir: Path) -> dict[str, Counter]:
        raise NotImplementedError

    def counts_so_far(self) -> dict[str, Counter | PackedCounter] | None:
        """Optional: the sum of every count table ``analyze_shard`` has returned on this object, kept
        as it analysed (each worker's sum then costs nothing at the end of the analysis: the build
        reads back only the tables of shards analysed elsewhere, e.g. by an earlier run before a
        --resume). None (the default): not kept, every shard's table is read back."""
        return None

    # ---- optional: work on the analysed shards while the rest are analysed -------------------
    def on_analysis_start(self, scratch_dir: Path, text_bytes: int | None) -> None:
        """Called by the process that will run ``fit`` (a one-rank build whose fit is still to do)
        before any shard is analysed: ``scratch_dir`` is this language's own directory in the work
        directory (it may hold files of a killed run), ``text_bytes`` the inputs' text size when known.
        Then ``on_shard_analysed(k, cache_dir)`` for shards 0, 1, ... in order, each as soon as it and
        every shard before it are analysed, ``on_analysis_end(num_shards)`` after the last, and
        ``fit``. ``abort_background()`` stops what these started (a build that failed or was stopped
        before its fit). English streams the shards' words into KenLM's lmplz here."""
        return None

    def on_shard_analysed(self, k: int, cache_dir: Path) -> None:
        return None

    def on_analysis_end(self, num_shards: int) -> None:
        return None

    def abort_background(self) -> None:
        return None

    def fit(self, counts: dict[str, Counter], corpus: Corpus, artifacts_dir: Path) -> dict:
        raise NotImplementedError

    @classmethod
    def dataset_options(cls, options: dict, directory: Path) -> dict:
        """The plugin options recorded in a dataset's meta.json (``build.language_options``), made usable
        where the dataset is now: an option naming a file the build copied into the dataset points at
        that copy (the original may be elsewhere, changed, or gone: a dataset or an export moves between
        machines). Used by TextEncoder (fine-tuning, inference), --vocab-from and segeval."""
        return dict(options)

    def fit_from(self, source_dir: Path, counts: dict[str, Counter], corpus: Corpus, artifacts_dir: Path) -> dict:
        """--vocab-from: instead of ``fit``, take the artifacts of the finished dataset ``source_dir``
        (built with this language and the same encoding options) into ``artifacts_dir``. The default
        copies ``artifact_files`` byte for byte; return extra statistics for meta.json ``stats``."""
        import shutil

        for name in self.artifact_files:
            source = Path(source_dir) / name
            if not source.is_file():
                raise LanguageError(f"--vocab-from {source_dir} has no {name} (a --lang {self.name} dataset needs it): "
                                    f"give a complete dataset built by data_prep/build.py", final=True)
            shutil.copyfile(source, Path(artifacts_dir) / name)
        return {}

    def load(self, artifacts_dir: Path) -> None:
        raise NotImplementedError

    def encode_shard(self, cache_dir: Path) -> EncodedShard:
        raise NotImplementedError

    # ---- optional: after the merge (reports, statistics of the final dataset) ----------------
    def prepare_finish(self, artifacts_dir: Path, corpus: Corpus) -> None:
        return None

    def cache_needed_after_encode(self, shard: int, num_shards: int) -> bool:
        """Whether ``prepare_finish`` / ``finish`` read shard ``shard``'s cache directory. The others are
        deleted as soon as their encoded part is written (unless --keep-work-dir): the build's peak
        disk use falls by the caches' size, about the input's."""
        return False

    def finish(self, out_dir: Path, stats: dict, corpus: Corpus) -> dict:
        return {}

    # ---- optional: versions of the libraries that shaped the output (meta.json) ------------
    def package_versions(self) -> dict[str, str]:
        return {}


def register(cls: type[Language]) -> type[Language]:
    """Make ``cls`` available as ``--lang cls.name`` (usable as a class decorator)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__}.name is empty")
    _REGISTRY[cls.name] = cls
    return cls


def available_languages() -> list[str]:
    return sorted(set(PLUGIN_MODULES) | set(_REGISTRY))


def get_language(name: str) -> type[Language]:
    """The plugin class for ``--lang name`` (imports its module on first use)."""
    if name not in _REGISTRY and name in PLUGIN_MODULES:
        try:
            importlib.import_module(PLUGIN_MODULES[name])
        except ModuleNotFoundError as exc:
            if exc.name == PLUGIN_MODULES[name]:
                raise LanguageError(f"--lang {name}: its plugin module {PLUGIN_MODULES[name]} is not installed") from exc
            raise
    if name not in _REGISTRY:
        raise LanguageError(f"unknown --lang {name!r}; available: {', '.join(available_languages())}")
    return _REGISTRY[name]


def load_all_plugins() -> None:
    """Import every known plugin module that is present (so each can add its CLI options)."""
    for name, module in PLUGIN_MODULES.items():
        if name in _REGISTRY:
            continue
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
