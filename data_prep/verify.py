"""Re-read a built dataset and check every document: ``python data_prep/build.py --verify DIR [--workers N]``.

Checks (any failure is a defect; the command exits non-zero):
- the directory is a complete dataset (format.PairedDataset opens it: meta, vocabularies, splits);
- meta.json vocab sizes and per-split document/sentence/token counts match the files;
- every split has at least one document;
- per document: every id is inside its vocabulary;
- per sentence: 1 <= align, sum(align) == len(fine), len(align) == len(coarse);
- per coarse token: its string equals the concatenation of the fine tokens it covers, modulo the
  "##" continuation and "_" phrase conventions (skipped when either side has a special token);
- per sentence: detokenize(fine) == detokenize(coarse) (skipped when either contains [UNK]).

The checks run over chunks of whole documents (~``CHUNK_TOKENS`` fine tokens each) as array
operations: a vocabulary's token strings become code-point tables, a chunk's tokens are gathered
from them into one character stream per side (each character tagged with the coarse token or the
sentence it belongs to), and the two streams are compared at once. The result, defect messages and
their order included, is that of checking one sentence at a time in Python with
``format.detokenize`` (tests hold them equal), at tens of times its speed; ``workers`` > 1 checks
chunks in parallel processes.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import dataclass, field

import numpy as np

from data_prep import format as fmt
from data_prep.core import _progress, check_pool_alive, detach_pool_worker, kill_pool, pool_pids
from data_prep.languages import concat_ranges

MAX_REPORTED = 20
CHUNK_TOKENS = 1 << 19  # fine tokens per chunk (whole documents; ~100 bytes a token while checked): small
# enough for the arrays of a chunk to stay in the caches more (English: 2.1-2.4 s against 3.1 s at 1 << 21)

# Defect kinds, in the order the checks of one sentence report them.
_UNREADABLE, _BEYOND, _EMPTY, _ALIGN, _TOKEN, _DECODE = range(6)


@dataclass
class VerifyReport:
    directory: str
    ok: bool = True
    defects: list[str] = field(default_factory=list)
    num_defects: int = 0
    counts: dict = field(default_factory=dict)
    seconds: float = 0.0

    def defect(self, message: str) -> None:
        self.ok = False
        self.num_defects += 1
        if len(self.defects) < MAX_REPORTED:
            self.defects.append(message)

    def summary(self) -> str:
        lines = [f"verify {self.directory}: {'OK' if self.ok else 'FAILED'} ({self.seconds:.1f}s)"]
        for split, c in self.counts.items():
            lines.append(
                f"  {split}: {c['documents']:,} documents, {c['sentences']:,} sentences, {c['fine_tokens']:,} fine / "
                f"{c['coarse_tokens']:,} coarse tokens; coarse tokens checked against their fine tokens: "
                f"{c['coarse_checked']:,}; sentences decoded identically: {c['decoded_equal']:,} "
                f"(skipped with [UNK]: {c['decode_skipped']:,})"
            )
        if not self.ok:
            lines.append(f"  {self.num_defects} defect(s); first {len(self.defects)}:")
            lines += [f"    - {d}" for d in self.defects]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# A vocabulary's strings as arrays
# ---------------------------------------------------------------------------------------------
class _Strings:
    """Strings ``0..n-1`` as one code-point array: ``gather(ids)`` -> (their characters
    concatenated, the number of characters of each)."""

    def __init__(self, strings: list[str]):
        self.lengths = np.fromiter(map(len, strings), dtype=np.int64, count=len(strings))
        self.starts = np.cumsum(self.lengths) - self.lengths
        self.chars = np.frombuffer("".join(strings).encode("utf-32-le"), dtype=np.uint32)

    def gather(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lengths = self.lengths[ids]
        return self.chars[concat_ranges(self.starts[ids], lengths)], lengths


class _VocabTables:
    """What the checks need of one vocabulary, per token id (see ``format.detokenize``):

    - ``joined``: ids ``t`` -> the token as the first piece of a coarse span (as it is), ids ``t + n``
      -> as a later piece ("##" stripped from a continuation);
    - ``decoded``: ids ``t`` -> the token's decoded piece, ids ``t + n`` -> a space and that piece;
    - ``cont`` (a "##" continuation: no space before it), ``first_wordlike`` / ``last_wordlike`` (of
      the decoded piece: Chinese puts a space between two Latin/digit pieces), ``special``."""

    def __init__(self, tokens: list[str], language: str | None):
        n = len(tokens)
        mark = fmt.CONTINUATION
        cont = [t.startswith(mark) and len(t) > len(mark) for t in tokens]
        stripped = [t[len(mark):] if c else t for t, c in zip(tokens, cont)]
        en = language == "en"
        pieces = [s if c else (t.replace(fmt.PHRASE_JOINER, " ") if en and len(t) > 1 else t)
                  for t, s, c in zip(tokens, stripped, cont)]
        self.n = n
        self.tokens = tokens
        self.joined = _Strings(tokens + stripped)
        self.decoded = _Strings(pieces + [" " + p for p in pieces])
        self.cont = np.array(cont, dtype=bool)
        self.first_wordlike = np.array([fmt._is_wordlike(p[:1]) for p in pieces], dtype=bool)
        self.last_wordlike = np.array([fmt._is_wordlike(p[-1:]) for p in pieces], dtype=bool)
        self.special = np.arange(n) < fmt.NUM_SPECIAL


def _differing(a: np.ndarray, a_owner: np.ndarray, b: np.ndarray, b_owner: np.ndarray, owners: int) -> np.ndarray:
    """Which of ``owners`` groups differ: ``a`` and ``b`` are character streams, each character
    tagged with its group (groups in increasing order in both); a group differs when its two
    strings differ in length or in any character."""
    a_len = np.bincount(a_owner, minlength=owners)
    b_len = np.bincount(b_owner, minlength=owners)
    bad = a_len != b_len
    same_length = ~bad
    a_keep, b_keep = same_length[a_owner], same_length[b_owner]
    # the groups of equal length line up character for character once the others are removed
    unequal = a[a_keep] != b[b_keep]
    bad[a_owner[a_keep][unequal]] = True
    return bad


# ---------------------------------------------------------------------------------------------
# One chunk of documents
# ---------------------------------------------------------------------------------------------
@dataclass
class _ChunkResult:
    counts: dict
    records: list  # (document, sentence in document, kind, position, message): the first MAX_REPORTED
    num_defects: int
    unreadable: bool = False


def _check_chunk(split: str, first_document: int, doc_sentences: np.ndarray, fine: np.ndarray, coarse: np.ndarray,
                 align: np.ndarray, fine_lens: np.ndarray, coarse_lens: np.ndarray, fine_vocab: _VocabTables,
                 coarse_vocab: _VocabTables, language: str | None) -> _ChunkResult:
    """Every check of documents ``first_document ..`` (``doc_sentences`` sentences each) whose
    tokens are the flat arrays given (``fine_lens`` / ``coarse_lens`` per sentence)."""
    fine = fine.astype(np.int64, copy=False)
    coarse = coarse.astype(np.int64, copy=False)
    align = align.astype(np.int64, copy=False)
    fine_lens = fine_lens.astype(np.int64, copy=False)
    coarse_lens = coarse_lens.astype(np.int64, copy=False)
    num_docs, num_sents = len(doc_sentences), len(fine_lens)
    counts = {"fine_tokens": len(fine), "coarse_tokens": len(coarse), "coarse_checked": 0, "decoded_equal": 0,
              "decode_skipped": 0}
    doc_of_sent = np.repeat(np.arange(num_docs), doc_sentences)
    sent_in_doc = np.arange(num_sents) - np.repeat(np.cumsum(doc_sentences) - doc_sentences, doc_sentences)
    sent_of_fine = np.repeat(np.arange(num_sents), fine_lens)
    sent_of_coarse = np.repeat(np.arange(num_sents), coarse_lens)
    found: dict[int, np.ndarray] = {}  # kind -> sentences (or documents) with that defect, in order

    # ids beyond the vocabulary: the whole document is skipped
    bad_in = {}  # stream -> documents with an id beyond its vocabulary
    for stream, ids, n, owner in (("fine", fine, fine_vocab.n, sent_of_fine), ("coarse", coarse, coarse_vocab.n, sent_of_coarse)):
        outside = (ids >= n) | (ids < 0)
        bad_in[stream] = np.zeros(num_docs, dtype=bool)
        bad_in[stream][doc_of_sent[owner[outside]]] = True
    bad_doc = bad_in["fine"] | bad_in["coarse"]
    found[_BEYOND] = np.flatnonzero(bad_doc)
    ok = ~bad_doc[doc_of_sent]
    empty = ok & ((fine_lens == 0) | (coarse_lens == 0))
    found[_EMPTY] = np.flatnonzero(empty)
    ok &= ~empty
    align_sum = np.bincount(sent_of_coarse, weights=align, minlength=num_sents).astype(np.int64)
    align_bad = ok & ((align_sum != fine_lens) | (np.bincount(sent_of_coarse[align < 1], minlength=num_sents) > 0))
    found[_ALIGN] = np.flatnonzero(align_bad)
    ok &= ~align_bad

    # ---- each coarse token against the fine tokens it covers (sentences that passed the above)
    c_sel = np.flatnonzero(ok[sent_of_coarse])
    f_ids = fine[ok[sent_of_fine]]
    c_ids, c_align = coarse[c_sel], align[c_sel]
    owner = np.repeat(np.arange(len(c_sel)), c_align)  # coarse token (of c_sel) of each fine token
    skip = coarse_vocab.special[c_ids] | (np.bincount(owner[fine_vocab.special[f_ids]], minlength=len(c_sel)) > 0)
    counts["coarse_checked"] = int(len(c_sel) - skip.sum())
    first_piece = np.zeros(len(f_ids), dtype=bool)
    first_piece[np.cumsum(c_align) - c_align] = True
    use = ~skip[owner]
    f_chars, f_count = fine_vocab.joined.gather(f_ids[use] + fine_vocab.n * ~first_piece[use])
    f_owner = np.repeat(owner[use], f_count)
    checked = np.flatnonzero(~skip)
    c_chars, c_count = coarse_vocab.joined.gather(c_ids[checked])
    c_owner = np.repeat(checked, c_count)
    if language == "en":  # a phrase's "_" is dropped on both sides (tokens of more than one character)
        longer = coarse_vocab.joined.lengths[c_ids] > 1
        joiner = ord(fmt.PHRASE_JOINER)
        keep = ~((f_chars == joiner) & longer[f_owner])
        f_chars, f_owner = f_chars[keep], f_owner[keep]
        keep = ~((c_chars == joiner) & longer[c_owner])
        c_chars, c_owner = c_chars[keep], c_owner[keep]
    bad = _differing(f_chars, f_owner, c_chars, c_owner, len(c_sel)) & ~skip
    token_defects = c_sel[np.flatnonzero(bad)]

    # ---- the decode round trip of each sentence without [UNK]
    unk = (np.bincount(sent_of_fine[fine == fmt.UNK_ID], minlength=num_sents)
           + np.bincount(sent_of_coarse[coarse == fmt.UNK_ID], minlength=num_sents)) > 0
    counts["decode_skipped"] = int((ok & unk).sum())
    decode = ok & ~unk
    streams = []
    for ids, owner_sent, vocab in ((fine, sent_of_fine, fine_vocab), (coarse, sent_of_coarse, coarse_vocab)):
        sel = decode[owner_sent]
        t_ids, t_sent = ids[sel], owner_sent[sel]
        first = np.ones(len(t_ids), dtype=bool)
        first[1:] = t_sent[1:] != t_sent[:-1]
        space = ~first & ~vocab.cont[t_ids]
        if language != "en":
            previous = np.roll(t_ids, 1)
            space &= vocab.last_wordlike[previous] & vocab.first_wordlike[t_ids]
        chars, count = vocab.decoded.gather(t_ids + vocab.n * space)
        streams += [chars, np.repeat(t_sent, count)]
    decode_bad = _differing(*streams, num_sents) & decode
    counts["decoded_equal"] = int(decode.sum() - decode_bad.sum())
    found[_DECODE] = np.flatnonzero(decode_bad)

    # ---- the defects, in the order one sentence at a time would report them
    num_defects = sum(len(v) for v in found.values()) + len(token_defects)
    candidates = []
    for kind, where in found.items():
        for i in where[:MAX_REPORTED].tolist():
            if kind == _BEYOND:
                candidates.append((i, -1, kind, 0))
            else:
                candidates.append((int(doc_of_sent[i]), int(sent_in_doc[i]), kind, i))
    for k in token_defects[:MAX_REPORTED].tolist():
        s = int(sent_of_coarse[k])
        candidates.append((int(doc_of_sent[s]), int(sent_in_doc[s]), _TOKEN, k))
    candidates.sort()
    coarse_offsets = np.cumsum(coarse_lens) - coarse_lens
    fine_offsets = np.cumsum(fine_lens) - fine_lens
    records = []
    for d, s_in_doc, kind, pos in candidates[:MAX_REPORTED]:
        document = first_document + d
        if kind == _BEYOND:
            files = " and ".join(f"{split}_{stream}.bin" for stream in ("fine", "coarse") if bad_in[stream][d])
            records.append((document, -1, kind, 0, f"{split} document {document}: id beyond the vocabulary in {files}"))
            continue
        s = pos if kind != _TOKEN else int(sent_of_coarse[pos])
        where = f"{split} document {document} sentence {s_in_doc}"
        f_span = fine[fine_offsets[s]:fine_offsets[s] + fine_lens[s]]
        c_span = coarse[coarse_offsets[s]:coarse_offsets[s] + coarse_lens[s]]
        if kind == _EMPTY:
            message = f"{where}: empty sentence"
        elif kind == _ALIGN:
            message = f"{where}: alignment covers {int(align_sum[s])} fine tokens, the sentence has {len(f_span)}"
        elif kind == _TOKEN:
            start = int(align[coarse_offsets[s]:pos].sum())
            pieces = [fine_vocab.tokens[i] for i in f_span[start:start + int(align[pos])].tolist()]
            message = f"{where}: coarse token {coarse_vocab.tokens[int(coarse[pos])]!r} covers fine tokens {pieces}"
        else:
            a = fmt.detokenize([fine_vocab.tokens[i] for i in f_span.tolist()], language)
            b = fmt.detokenize([coarse_vocab.tokens[i] for i in c_span.tolist()], language)
            message = f"{where}: fine decodes to {a[:80]!r}, coarse to {b[:80]!r}"
        records.append((document, s_in_doc, kind, pos, message))
    return _ChunkResult(counts, records, num_defects)


# ---------------------------------------------------------------------------------------------
# Chunks, workers, the report
# ---------------------------------------------------------------------------------------------
def _chunks(data: fmt.PairedSplit, chunk_tokens: int) -> list[tuple[int, int]]:
    """[first, last) document ranges of about ``chunk_tokens`` fine tokens each (at least one document)."""
    fine_per_doc, _ = data.document_lengths()
    ends = np.cumsum(fine_per_doc)
    bounds, first = [], 0
    while first < len(data):
        base = int(ends[first - 1]) if first else 0
        last = max(first + 1, int(np.searchsorted(ends, base + chunk_tokens, side="right")))
        bounds.append((first, min(last, len(data))))
        first = last
    return bounds


class _Checker:
    """Reads and checks document ranges of one dataset (one per process)."""

    def __init__(self, directory: str):
        self.ds = fmt.PairedDataset(directory)
        self.fine = _VocabTables(self.ds.fine_vocab.tokens, self.ds.language)
        self.coarse = _VocabTables(self.ds.coarse_vocab.tokens, self.ds.language)

    def check(self, split: str, first: int, last: int) -> _ChunkResult:
        data = self.ds.split(split)
        try:
            lo, hi = int(data.document_indices[first]), int(data.document_indices[last])
            streams = {name: _read_sentences(getattr(data, name), lo, hi) for name in fmt.STREAMS}
            if not (len(streams["coarse"][0]) == len(streams["align"][0])
                    and np.array_equal(streams["coarse"][1], streams["align"][1])):
                raise ValueError("the coarse and align streams have different sentence lengths")
        except (ValueError, OSError, IndexError) as exc:  # damaged files that still opened
            message = f"{split} documents {first}..{last - 1}: cannot be read ({exc}); rebuild the dataset"
            return _ChunkResult({}, [(first, -1, _UNREADABLE, 0, message)], 1, unreadable=True)
        doc_sentences = np.diff(data.document_indices[first:last + 1])
        (fine, fine_lens), (coarse, coarse_lens), (align, _) = (streams[s] for s in fmt.STREAMS)
        return _check_chunk(split, first, doc_sentences, fine, coarse, align, fine_lens, coarse_lens, self.fine,
                            self.coarse, self.ds.language)


def _read_sentences(stream, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of sentences [lo, hi) of a megatron-core IndexedDataset (contiguous on disk: one read)
    and the length of each."""
    index = stream.index
    lengths = np.asarray(index.sequence_lengths[lo:hi], dtype=np.int64)
    total = int(lengths.sum())
    if not total:
        return np.zeros(0, dtype=index.dtype), lengths
    offset = int(index.sequence_pointers[lo])
    if hi < len(index.sequence_lengths) and int(index.sequence_pointers[hi]) != offset + total * index.dtype_size:
        raise ValueError(f"sentences {lo}..{hi} are not contiguous in the .bin file")
    return stream.bin_reader.read(dtype=index.dtype, count=total, offset=offset), lengths


_WORKER: dict = {}


def _worker_check(task: tuple[str, str, int, int]) -> _ChunkResult:
    directory, split, first, last = task
    if _WORKER.get("directory") != directory:
        _WORKER.update(directory=directory, checker=_Checker(directory))
    return _WORKER["checker"].check(split, first, last)


def _watched(pool, results, count: int):
    """The results of ``pool.imap``, checking every half second that no worker died (a dead worker's
    chunk never comes: --verify waited forever)."""
    pids = pool_pids(pool)
    for _ in range(count):
        while True:
            try:
                yield results.next(timeout=0.5)
                break
            except mp.TimeoutError:
                check_pool_alive(pool, pids, "Run --verify again (with fewer --workers if memory ran out)")


def verify_dataset(directory: str, progress: bool = True, workers: int = 1,
                   chunk_tokens: int = CHUNK_TOKENS) -> VerifyReport:
    """Check every document of the dataset in ``directory`` (see the module docstring); ``workers``
    processes check chunks of ~``chunk_tokens`` fine tokens in parallel."""
    started = time.time()
    report = VerifyReport(str(directory))
    try:
        checker = _Checker(str(directory))
    except (fmt.FormatError, OSError, ValueError) as exc:
        report.defect(str(exc))
        return report
    ds = checker.ds
    for problem in fmt.token_file_problems(directory, ds.meta):
        report.defect(problem)
    tasks: dict[str, list[tuple[int, int]]] = {}
    unopened: dict[str, str] = {}
    for split in fmt.SPLITS:
        try:
            data = ds.split(split)
            data.check_index()
        except fmt.FormatError as exc:
            unopened[split] = str(exc)
            continue
        report.counts[split] = {"documents": len(data), "sentences": data.num_sentences, "fine_tokens": 0,
                                "coarse_tokens": 0, "coarse_checked": 0, "decoded_equal": 0, "decode_skipped": 0}
        tasks[split] = _chunks(data, chunk_tokens)
    ordered = [(str(directory), split, first, last) for split, ranges in tasks.items() for first, last in ranges]
    total_docs = sum(len(ds.split(split)) for split in tasks)
    pool = None
    if workers > 1 and len(ordered) > 1:
        _WORKER.update(directory=str(directory), checker=checker)  # inherited by the forked workers
        pool = mp.get_context("fork").Pool(min(workers, len(ordered)), initializer=detach_pool_worker)
        results = _watched(pool, pool.imap(_worker_check, ordered), len(ordered))
    else:
        results = map(lambda task: checker.check(*task[1:]), ordered)
    records: dict[str, list] = {split: [] for split in tasks}
    defects: dict[str, int] = {split: 0 for split in tasks}
    stopped: set[str] = set()
    try:
        # a bar on a terminal; in a job's log file one line every 15 s (as the build's)
        with _progress(progress, total=total_docs, desc="verify", unit="doc") as bar:
            for (_, split, first, last), result in zip(ordered, results):
                bar.update(last - first)
                if split in stopped:  # a chunk could not be read: the split's check ends there
                    continue
                for key, value in result.counts.items():
                    report.counts[split][key] += value
                defects[split] += result.num_defects
                records[split] += result.records[:MAX_REPORTED - len(records[split])]
                if result.unreadable:
                    stopped.add(split)
    except BaseException:
        if pool is not None:
            kill_pool(pool)
        raise
    if pool is not None:  # every chunk's result is in: the workers exit at the end of the task queue
        pool.close()
        pool.join()
    for split in fmt.SPLITS:
        if split in unopened:
            report.defect(unopened[split])
            continue
        data = ds.split(split)
        if len(data) == 0:
            report.defect(f"{split}: 0 documents (every split needs at least one)")
        for _, _, _, _, message in records[split]:
            report.defect(message)
        report.num_defects += defects[split] - len(records[split])
        report.ok = report.ok and not defects[split]
        recorded = ds.meta.get("splits", {}).get(split)
        if recorded is not None:
            counts = report.counts[split]
            for key in ("documents", "sentences", "fine_tokens", "coarse_tokens"):
                if key in recorded and recorded[key] != counts[key]:
                    report.defect(f"{split}: meta.json says {key}={recorded[key]}, the files have {counts[key]}")
    for name, size in (("fine", len(ds.fine_vocab)), ("coarse", len(ds.coarse_vocab))):
        if ds.meta.get(f"{name}_vocab_size") != size:
            report.defect(f"meta.json {name}_vocab_size={ds.meta.get(f'{name}_vocab_size')}, the vocabulary has {size}")
    report.seconds = time.time() - started
    return report
