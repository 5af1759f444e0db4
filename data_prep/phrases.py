r"""English phrase dictionary (AMBERT's coarse vocabulary): KenLM mining and greedy longest match.

Mining, as in the paper: n-gram statistics come from KenLM (``lmplz``) over the word-tokenized
corpus, one sentence a line, so no n-gram crosses a sentence boundary. A candidate n-gram
``w1 .. wn`` (2 <= n <= order) is kept when

- every transition is "sticky": ``log10 p(w_k | w_1 .. w_{k-1}) >= min_logprob`` for k = 2..n,
  read from lmplz's model (KenLM's interpolated modified Kneser-Ney estimate; its intermediate
  binary files, which hold the numbers of the ARPA file; an ARPA file can be read too);
- every transition into a content word is informative: its lift
  ``log10 p(w_k | w_1 .. w_{k-1}) - log10 p(w_k)`` (a pointwise mutual information) is at least
  ``min_lift``. This is what rejects "said the"-like pairs whose last word is merely frequent;
- it neither starts nor ends with a stop word, has no function word inside other than a few
  "glue" words (of, and, the, ...: "secretary of the treasury" yes, "command is valid" no), contains no punctuation / digits-only token
  (those make fragments like "of the", "1 ."), and occurs at least ``min_count`` times. KenLM models
  carry probabilities, not counts, so candidates are counted in a second streaming pass whose
  memory is bounded by the number of candidates (lmplz's own ``--prune`` already drops n-grams
  rarer than ``min_count``);
- its words are not all one word repeated ("ff ff", "5a 5a 5a", "yes yes": residue of hex dumps,
  tables and dialogue, not names);
- it is not subsumed: if one longer phrase accounts for nearly all of its occurrences
  ("minister tony blair" inside "prime minister tony blair"), only the longer one is kept.

Phrases are scored by ``min_lift_over_transitions * log10(count)`` -- strong association weighted
by how much text the phrase covers -- and written, best first, as ``phrases.tsv``.

Tokenization is a greedy left-to-right longest match over words (``PhraseTokenizer``): phrase
boundaries are word boundaries, so the fine/coarse alignment stays exact.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.languages import arrow_ints, arrow_strings, load_arrays, save_arrays

log = logging.getLogger("data_prep.phrases")

LMPLZ_ENV = "AMBERT_LMPLZ"
REPO_ROOT = Path(__file__).resolve().parent.parent

# English function words. A phrase never starts or ends with one (they make fragments such as
# "of the", "in a", "the united states"), but may contain one ("united states of america").
STOP_WORDS: frozenset[str] = frozenset(
    """
    a an the and or but nor so yet if then else than that this these those there here
    of to in on at by for from with without within into onto upon about above below over under
    between among through during before after since until till against along across around
    behind beyond near off out up down via per as like unlike
    i me my mine myself we us our ours ourselves you your yours yourself yourselves
    he him his himself she her hers herself it its itself they them their theirs themselves
    who whom whose which what where when why how whoever whatever
    is am are was were be been being do does did doing done have has had having
    will would shall should can could may might must ought
    not no nor only also too very just even still already
    all any both each every either neither few many more most much other others some such
    own same one ones s t d ll m re ve n't 't 's 'd 'll 'm 're 've
    thee thou thy thine ye hath doth art shalt wilt
    """.split()
)

# The only function words allowed INSIDE a phrase ("secretary of the treasury", "research and
# development", "point of view"). Others ("is", "that", "by", "has") inside an n-gram mark a clause
# fragment ("command is valid", "driver that implements"), not a fixed expression.
GLUE_WORDS: frozenset[str] = frozenset("of and the in on for de la le du von van der da".split())

_CONTENT_WORD = re.compile(r"[^\W\d_]", re.UNICODE)  # at least one letter


class PhraseMiningError(RuntimeError):
    """Phrase mining cannot run on this input / machine. The message says how to fix it."""


@dataclass
class PhraseMiningConfig:
    """Parameters of the KenLM phrase miner (each maps to a build.py option)."""

    ngram_order: int = 4
    """--ngram-order: KenLM order; also the longest phrase, in words."""
    min_count: int = 5
    """--phrase-min-count: a phrase must occur at least this many times in the corpus."""
    min_logprob: float = -2.0
    """--phrase-min-logprob: every transition needs log10 p(w_k | previous words) >= this."""
    min_lift: float = 2.0
    """--phrase-min-lift: every transition into a content word needs log10(p(w|ctx)/p(w)) >= this."""
    subsume_ratio: float = 0.9
    """Drop a phrase when one phrase one word longer covers at least this share of its occurrences."""
    max_phrases: int = 0
    """Keep at most this many phrases, best score first (0 = no limit)."""
    lmplz: str | None = None
    """--lmplz: path of the lmplz binary (else $AMBERT_LMPLZ, PATH, <repo>/third_party/kenlm/bin)."""
    lmplz_memory: str = "auto"
    """--lmplz-memory: lmplz -S sorting memory (it spills to its temp dir beyond that); "auto": see
    ``lmplz_memory()``."""
    discount_fallback: bool = False
    """--discount-fallback: pass --discount_fallback to lmplz (needed for small corpora)."""
    lm_sample: str = "4G"
    """--lm-sample: lmplz estimates its model on at most this much word text ("0" = all of it): every
    k-th sentence of the corpus; the candidates are still counted over the whole corpus. lmplz is
    one serial step (~1.4 cores): on hundreds of GB it would otherwise dominate the build."""

    def validate(self) -> None:
        if not 2 <= self.ngram_order <= 8:
            raise ValueError(f"--ngram-order must be between 2 and 8, got {self.ngram_order}")
        if self.min_count < 1:
            raise ValueError(f"--phrase-min-count must be >= 1, got {self.min_count}")
        if not math.isfinite(self.min_logprob) or self.min_logprob > 0:
            raise ValueError(f"--phrase-min-logprob is a log10 probability (finite, <= 0), got {self.min_logprob}")
        if not math.isfinite(self.min_lift):
            raise ValueError(f"--phrase-min-lift must be a finite number (a log10 ratio), got {self.min_lift}")
        if self.max_phrases < 0:
            raise ValueError(f"--max-phrases must be >= 0 (0: no limit), got {self.max_phrases}")
        if not 0 < self.subsume_ratio <= 1:
            raise ValueError(f"subsume_ratio must be in (0, 1], got {self.subsume_ratio}")
        parse_size(self.lm_sample, "--lm-sample")
        memory = re.fullmatch(r"(\d+)([bKMGTPEZY%]?)", str(self.lmplz_memory))  # lmplz takes whole numbers only
        if self.lmplz_memory != "auto" and not memory:
            whole = (" (a whole number: lmplz refuses 1.5G; write 1536M)"
                     if re.fullmatch(r"\d*\.\d+[bKMGTPEZY%]?", str(self.lmplz_memory)) else "")
            raise ValueError(f"--lmplz-memory must be auto, a size such as 512M, 8G or 80% (a share of the RAM; "
                             f"lmplz's suffixes: b K M G T P E Z Y %){whole}, got {self.lmplz_memory!r}")
        if memory:  # lmplz's own failures come after the corpus pass: say these before it
            value, unit = float(memory.group(1)), memory.group(2)
            if unit == "%" and not 0 < value <= 100:
                raise ValueError(f"--lmplz-memory {self.lmplz_memory} is not a share of the RAM (0-100%); use e.g. 50%")
            scale = {"b": 1, "": 1 << 10, "K": 1 << 10, "M": 1 << 20}.get(unit)  # lmplz reads a bare number as KiB
            if scale is not None and value * scale < 1 << 20:
                raise ValueError(f"--lmplz-memory {self.lmplz_memory} is below the 1 MB lmplz needs to sort (its "
                                 f"smallest sort block is 8 KB per n-gram order and file); use e.g. 64M, or auto")


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int, option: str) -> int:
    """Bytes of a size such as 4G, 500M, 1048576 (0 = no limit)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"{option} must be a size such as 4G, 500M or 0 (no limit), got {text!r}")
    size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    if size == 0 and float(m.group(1)) > 0:  # "0.5" is not 0, which means no limit
        raise ValueError(f"{option} must be a size such as 4G, 500M or 0 (no limit), got {text!r}: less than a byte")
    return size


@dataclass
class Phrase:
    words: tuple[str, ...]
    count: int
    score: float
    min_logprob: float
    """Weakest transition: min over k of log10 p(w_k | w_1..w_{k-1})."""
    min_lift: float
    """Weakest content-word lift: min over k of log10 p(w_k | ctx) - log10 p(w_k)."""

    @property
    def text(self) -> str:
        return " ".join(self.words)


def is_stop_word(word: str) -> bool:
    return word in STOP_WORDS


def is_content_token(word: str) -> bool:
    """A token that may appear in a phrase at all: has a letter (no punctuation, no bare numbers)."""
    return bool(_CONTENT_WORD.search(word))


# ---------------------------------------------------------------------------------------------
# lmplz
# ---------------------------------------------------------------------------------------------
def find_lmplz(explicit: str | None = None) -> str:
    """The lmplz binary: --lmplz, then $AMBERT_LMPLZ, then PATH, then <repo>/third_party/kenlm/bin."""
    tried = []
    for source, candidate in (
        ("--lmplz", explicit),
        (f"${LMPLZ_ENV}", os.environ.get(LMPLZ_ENV)),
        ("PATH", shutil.which("lmplz")),
        ("repository", str(REPO_ROOT / "third_party" / "kenlm" / "bin" / "lmplz")),
    ):
        if not candidate:
            continue
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
        tried.append(f"{source}: {candidate}")
        if source in ("--lmplz", f"${LMPLZ_ENV}"):
            # An explicit choice that does not work is an error, not something to silently skip.
            raise PhraseMiningError(
                f"lmplz given by {source} ({candidate}) is not an executable file. Fix the path, or run "
                f"`bash launchers/setup.sh` which builds KenLM into third_party/kenlm/bin."
            )
    raise PhraseMiningError(
        "KenLM's lmplz was not found (needed to mine the English phrase dictionary); tried "
        + (", ".join(tried) or "--lmplz, $AMBERT_LMPLZ, PATH")
        + ". Run `bash launchers/setup.sh` (builds it into third_party/kenlm/bin), or pass --lmplz PATH / set "
        f"{LMPLZ_ENV}, or reuse an existing dictionary with --phrases FILE."
    )


LMPLZ_TEXT_PER_MEMORY = 16
"""--lmplz-memory auto: lmplz -S is the words text / this (plus its vocabulary table)."""
LMPLZ_MIN_MEMORY = 16 << 20


LMPLZ_DEFAULT_VOCAB_ESTIMATE = 1_000_000  # lmplz --vocab_estimate's default


def lmplz_vocabulary_bytes(vocab_size: int = 0) -> int:
    """lmplz's vocabulary hash table (taken out of -S before anything else; lmplz refuses to start
    when -S is smaller): a power-of-two number of buckets >= 1.5x ``--vocab_estimate`` (the build
    passes the distinct words + 3; lmplz's default otherwise), 12-byte entries (16 here, a margin)."""
    estimate = vocab_size + 3 if vocab_size > 0 else LMPLZ_DEFAULT_VOCAB_ESTIMATE
    buckets = max(estimate + 1, int(1.5 * estimate))
    return 16 * (1 << (buckets - 1).bit_length())


def lmplz_memory(setting: str, words_bytes: int, vocab_size: int = 0) -> str:
    """lmplz ``-S`` for ``--lmplz-memory``: as given, or for "auto" 1/16 of the words text (at least
    16 MB) plus lmplz's vocabulary hash table (``lmplz_vocabulary_bytes``), at most half the RAM.

    Small on purpose. lmplz sizes its n-gram dedupe hash table and sort blocks by -S; beyond it, it
    sorts runs on its temp dir (-T) and merges them. Memory it allocates and touches costs time, the
    runs on -T little. Side by side on a 2-core VM (same models, byte for byte): 51 MB of word text,
    -S 16M / 64M / 400M (the former default, 8x the text) 9.1-10.1 / 9.6-10.1 / 12.7-12.8 s; 20 MB,
    16M to 158M all 2.2-2.8 s, but 2.0 s against 8.6-10 s in a period when the VM's memory was slow;
    372 MB (that period), 8M / 32M / 128M / 512M / 2G 68 / 73 / 90 / 131 / 143 s. A fixed ratio to
    the text keeps the number of sorted runs lmplz merges the same at every size; their bytes grow
    with the text, and here they stayed in the page cache. Not measured beyond 372 MB: for a
    multi-GB --lm-sample on a machine with little RAM to spare for the page cache, a larger
    --lmplz-memory keeps lmplz's runs off the disk.
    """
    if setting != "auto":
        return setting
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 8 << 30
    memory = max(LMPLZ_MIN_MEMORY, words_bytes // LMPLZ_TEXT_PER_MEMORY) + lmplz_vocabulary_bytes(vocab_size)
    return f"{max(LMPLZ_MIN_MEMORY, min(memory, ram // 2)) >> 20}M"


def lm_line_stride(words_bytes: int, limit: int) -> int:
    """Every how many-th sentence lmplz reads: 1 when the words text fits in ``limit`` bytes
    (``--lm-sample``; 0 = no limit), else the smallest stride that brings it within."""
    if limit <= 0 or words_bytes <= limit:
        return 1
    return -(-words_bytes // limit)


def _die_with_parent():
    """A preexec_fn that makes the child die (SIGKILL) when the build process dies, kill -9 included
    (Linux PR_SET_PDEATHSIG): an orphaned lmplz held its -S memory and a core, and could hang on the
    scratch folder a --resume deleted. None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import signal

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


def run_lmplz(words_files: str | os.PathLike | Sequence[str | os.PathLike], arpa_file: str | os.PathLike | None,
              config: PhraseMiningConfig, temp_dir: str | os.PathLike,
              while_running: Callable[[], None] | None = None, vocab_size: int | None = None,
              line_stride: int = 1, intermediate: str | os.PathLike | None = None) -> None:
    """Estimate a pruned order-N model of the words files (one sentence a line, read in the given
    order as one text) into ``arpa_file`` and/or, with ``intermediate`` (a path prefix), KenLM's
    intermediate binary files (``read_intermediate``: the same n-grams and probabilities, without
    the ARPA text stage). ``LmplzRun`` with every file given at once: see there.
    ``while_running()`` is called while lmplz works (the build trains the fine vocabulary there)."""
    files = [words_files] if isinstance(words_files, (str, os.PathLike)) else list(words_files)
    missing = [str(f) for f in files if not os.path.exists(f)]
    if missing:
        raise PhraseMiningError(f"words file(s) for lmplz missing: {', '.join(missing[:3])}")
    run = LmplzRun(config, temp_dir, sum(os.path.getsize(f) for f in files), vocab_size, line_stride,
                   arpa_file=arpa_file, intermediate=intermediate, described=f"{len(files)} words file(s)")
    try:
        run.add(files)
        run.close()
        run.wait(while_running)
    finally:
        run.kill()


class LmplzRun:
    """KenLM's lmplz estimating a model of words files (one sentence a line) named in corpus order
    by ``add``, also while later ones are still being written (the build streams each shard's words
    into it as soon as that shard and every one before it are analysed); ``close()`` ends its input,
    ``wait()`` waits for the model and raises ``PhraseMiningError`` with the fix, ``kill()`` stops it.

    The files reach lmplz's stdin through ``xargs -0 -n 1 cat`` (each file read once it is named; no
    concatenated copy, no Python in the data path); with ``line_stride`` k > 1 only every k-th
    sentence of that stream (``awk``), spread evenly over the corpus. ``words_bytes`` (the words
    text's size, or an estimate before it is written) sizes ``-S`` for --lmplz-memory auto and the
    progress lines; ``vocab_size`` (distinct words, when known) sizes lmplz's hash table instead of its
    default guess of a million words. Neither changes the model."""

    def __init__(self, config: PhraseMiningConfig, temp_dir: str | os.PathLike, words_bytes: int,
                 vocab_size: int | None = None, line_stride: int = 1, arpa_file: str | os.PathLike | None = None,
                 intermediate: str | os.PathLike | None = None, described: str = "streamed words files"):
        lmplz = find_lmplz(config.lmplz)
        for tool, package in (("xargs", "findutils"), ("cat", "coreutils")) + ((("awk", "mawk"),) if line_stride > 1 else ()):
            if shutil.which(tool) is None:
                raise PhraseMiningError(f"`{tool}` is not on PATH (it feeds lmplz): install {package}"
                                        + (" or pass --lm-sample 0" if tool == "awk" else ""))
        if arpa_file is None and intermediate is None:
            raise ValueError("run_lmplz needs arpa_file and/or intermediate")
        self.lmplz, self.line_stride, self.order = lmplz, line_stride, config.ngram_order
        order = config.ngram_order
        self.memory = memory = lmplz_memory(config.lmplz_memory, words_bytes // line_stride, vocab_size or 0)
        # lmplz --prune drops n-grams whose raw count is <= threshold; order 1 must stay 0. On a sample
        # the threshold shrinks with it: a phrase seen min_count times in the corpus is expected
        # min_count / stride times in the sample (its count is then taken over the whole corpus).
        # Singletons of a sample are always dropped (when min_count > 1): they are most of its distinct
        # n-grams, and on a corpus big enough to be sampled a phrase seen once in the sample is far too
        # rare for the coarse vocabulary; keeping them would make the ARPA file of a 4G sample huge.
        threshold = max(0, -(-config.min_count // line_stride) - 1)
        if line_stride > 1 and config.min_count > 1:
            threshold = max(threshold, 1)
        self.prune = prune = ["0"] + [str(threshold)] * (order - 1)
        self.min_count = config.min_count
        cmd = [lmplz, "-o", str(order), "-S", memory, "-T", str(temp_dir), "--prune", *prune]
        cmd += ["--arpa", str(arpa_file)] if arpa_file is not None else []
        cmd += ["--intermediate", str(intermediate)] if intermediate is not None else []
        if vocab_size:
            cmd += ["--vocab_estimate", str(vocab_size + 3)]  # + <s>, </s>, <unk>
        if config.discount_fallback:
            cmd.append("--discount_fallback")
        self.started = time.time()
        log.info("phrases: running %s < %s%s", " ".join(cmd), described,
                 f", every {line_stride}-th sentence" if line_stride > 1 else "")
        self._files: list[tempfile._TemporaryFileWrapper] = []  # lmplz's and the feeders' stderr
        self.err = self._temp(temp_dir)
        dies_with_us = _die_with_parent()
        self.processes: list[subprocess.Popen] = []
        try:
            # one `cat` a name, run as the name arrives (xargs would otherwise wait for a batch of names)
            self.feeders = [subprocess.Popen(["xargs", "-0", "-n", "1", "cat", "--"], stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, stderr=self._temp(temp_dir),
                                             preexec_fn=dies_with_us)]
            self.processes.append(self.feeders[0])
            if line_stride > 1:
                self.feeders.append(subprocess.Popen(["awk", f"NR % {line_stride} == 1"], stdin=self.feeders[0].stdout,
                                                     stdout=subprocess.PIPE, stderr=self._temp(temp_dir),
                                                     preexec_fn=dies_with_us))
                self.processes.append(self.feeders[-1])
                self.feeders[0].stdout.close()
            self.proc = subprocess.Popen(cmd, stdin=self.feeders[-1].stdout, stdout=subprocess.DEVNULL, stderr=self.err,
                                         preexec_fn=dies_with_us)
            self.processes.append(self.proc)
            self.feeders[-1].stdout.close()  # lmplz holds the read end; the feeders get SIGPIPE if it dies
        except BaseException:
            self.kill()
            raise
        # The names go through a thread: a feeder blocked on a slow lmplz must not block the caller.
        self._names: queue.SimpleQueue = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_names, name="lmplz-names", daemon=True)
        self._writer.start()
        self.progress = _LmplzProgress(self.proc.pid, self.err.fileno(), words_bytes // line_stride)
        self.progress.start()
        self.closed = False

    def _temp(self, temp_dir) -> tempfile._TemporaryFileWrapper:
        f = tempfile.TemporaryFile(dir=temp_dir)
        self._files.append(f)
        return f

    def _write_names(self) -> None:
        stdin = self.feeders[0].stdin
        while (name := self._names.get()) is not None:
            try:
                stdin.write(name + b"\0")
                stdin.flush()
            except (BrokenPipeError, ValueError):  # xargs gone (lmplz died): wait() reports why
                break
        try:
            stdin.close()
        except BrokenPipeError:
            pass

    def add(self, files: Iterable[str | os.PathLike]) -> None:
        """Feed these words files (complete, in corpus order after those added before)."""
        for f in files:
            self._names.put(os.fsencode(f))

    def close(self) -> None:
        """No more files: lmplz's input ends after the last one added."""
        if not self.closed:
            self.closed = True
            self._names.put(None)

    def wait(self, while_running: Callable[[], None] | None = None) -> None:
        """Wait for the model (closing the input first); ``while_running()`` runs meanwhile."""
        self.close()
        try:
            if while_running is not None:
                while_running()
            returncode = self.proc.wait()
            self._writer.join()
            for f in self.feeders:
                f.wait()
        finally:
            self.progress.finished.set()
            self.progress.join()
        self.err.seek(0)
        stderr = self.err.read().decode(errors="replace")
        feed_errors = []
        for out in self._files[1:1 + len(self.feeders)]:  # (after lmplz's own)
            out.seek(0)
            feed_errors.append(out.read().decode(errors="replace").strip())
        self._check(returncode, stderr, feed_errors)

    def kill(self) -> None:
        """Stop lmplz and its feeders (when they still run) and free their files: a failed build."""
        if not getattr(self, "closed", True):
            self.close()
        for p in self.processes:
            if p.poll() is None:
                p.kill()
                p.wait()
        if getattr(self, "progress", None) is not None:
            self.progress.finished.set()
        for f in self._files:
            f.close()

    def _check(self, returncode: int, stderr: str, feed_errors: list[str]) -> None:
        order, memory, line_stride, lmplz, feeders = self.order, self.memory, self.line_stride, self.lmplz, self.feeders
        if returncode != 0:
            if "BadDiscountException" in stderr or "discount out of range" in stderr:
                raise PhraseMiningError(
                    f"KenLM cannot estimate an order-{order} model on this corpus (BadDiscountException: too little "
                    f"text, or too repetitive, for order {order}"
                    + (f"; it saw every {line_stride}-th sentence only: raise --lm-sample, or pass --lm-sample 0 to give it "
                       f"all the text" if line_stride > 1 else "")
                    + f"). Use a larger corpus, {'lower --ngram-order, ' if order > 2 else ''}pass --discount-fallback "
                      f"(KenLM then uses fixed discounts), or reuse a dictionary with --phrases FILE."
                )
            tail = "\n".join(stderr.strip().splitlines()[-5:])
            if returncode == -9 or "MallocException" in stderr or "Cannot allocate memory" in stderr:
                raise PhraseMiningError(
                    f"lmplz ran out of memory (-S {memory}{', killed by SIGKILL: the OOM killer?' if returncode == -9 else ''}):"
                    f" run the same command with --resume and a smaller --lmplz-memory (it sorts the rest on disk), or a "
                    f"smaller --lm-sample; the corpus pass is kept. lmplz said: {tail}")
            if "below the minimum block size" in stderr:
                raise PhraseMiningError(f"lmplz -S {memory} is too little for its sort blocks: run the same command with "
                                        f"--resume and a larger --lmplz-memory (e.g. 64M, or auto). lmplz said: {tail}")
            said = f"it said: {tail}" if tail else "it wrote nothing to stderr"
            raise PhraseMiningError(
                f"lmplz failed (exit {returncode}; {said}). Check that {lmplz} is KenLM's lmplz (`{lmplz} --help` "
                f"prints its options; --lmplz or AMBERT_LMPLZ choose it, `bash launchers/setup.sh` builds it), then run "
                f"the same command with --resume: the corpus pass is kept")
        if any(f.returncode == -13 or (f.returncode != 0 and ("signal 13" in e or "Broken pipe" in e))
               for f, e in zip(feeders, feed_errors)):  # SIGPIPE: the reader, lmplz, was gone
            # lmplz exited 0 without reading all of its input (a binary that is not lmplz, e.g. /bin/true)
            raise PhraseMiningError(
                f"{lmplz} exited (status 0) without reading its input: it is not KenLM's lmplz, or a broken one. Point "
                f"--lmplz (or ${LMPLZ_ENV}) at KenLM's lmplz, or run `bash launchers/setup.sh`, which builds it into "
                f"third_party/kenlm/bin")
        for feeder, error in zip(feeders, feed_errors):
            if feeder.returncode != 0:  # lmplz saw a truncated corpus: never mine phrases from that
                raise PhraseMiningError(f"reading the words files for lmplz failed ({feeder.args[0]} exit "
                                        f"{feeder.returncode}): {error}")
        log.info("phrases: lmplz order %d (-S %s) done in %.1fs", order, memory, time.time() - self.started)
        kept = {int(m.group(1)): int(m.group(2)) for m in _LMPLZ_KEPT.finditer(stderr)}
        if order > 2 and kept.get(order) == 0:  # KenLM's step 3 crawls on an empty order (16 s instead of 0.2 on 2 MB)
            log.warning("phrases: lmplz kept no %d-gram (--prune %s: --phrase-min-count %d), so no phrase has %d words; "
                        "--ngram-order %d would give phrases as long as these ones in less time (KenLM is slow on an "
                        "empty order)", order, " ".join(self.prune), self.min_count, order,
                        max([o for o, n in kept.items() if n > 0] + [2]))


# lmplz's "Statistics:" lines: "<order> <kept>/<total> D1=..." (kept after --prune), or "<order> <count> D1=..."
_LMPLZ_KEPT = re.compile(r"^(\d+) (\d+)(?:/\d+)? D1=", re.MULTILINE)  # an order nothing was pruned from: no "/total"

LMPLZ_PROGRESS_SECONDS = 30.0
"""How often a running lmplz is reported in the log (the first line after this long: a small
corpus's lmplz stays quiet)."""

_LMPLZ_STAGE = re.compile(r"=== (\d+)/(\d+) ([^=\n]+?) ===")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def lmplz_progress_line(elapsed: float, stderr_text: str, bytes_read: int | None, total_bytes: int) -> str:
    """One log line about a running lmplz: its current stage (from its stderr) and, while it counts
    (stage 1), how much of the ~total_bytes of word text it has read, the rate and an ETA."""
    stages = _LMPLZ_STAGE.findall(stderr_text)
    line = f"phrases: lmplz running for {_duration(elapsed)}"
    if not stages:
        return line + ", starting"
    k, n, name = stages[-1]
    line += f", stage {k}/{n} ({name.lower()})"
    if k == "1" and bytes_read is not None and total_bytes > 0:
        fraction = min(1.0, bytes_read / total_bytes)
        rate = bytes_read / max(elapsed, 1e-9)
        line += f": {bytes_read / 1e6:,.0f} of ~{total_bytes / 1e6:,.0f} MB of word text read ({100 * fraction:.0f}%), " \
                f"{rate / 1e6:.1f} MB/s"
        if rate > 0 and fraction < 1.0:
            line += f", counting done in ~{_duration((total_bytes - bytes_read) / rate)}"
    return line


class _LmplzProgress(threading.Thread):
    """Logs ``lmplz_progress_line`` every LMPLZ_PROGRESS_SECONDS while lmplz runs: on a multi-GB
    sample it works for minutes. Bytes read come from /proc/PID/io (Linux; omitted where
    unreadable); the stage from lmplz's stderr, read without moving the file's position."""

    def __init__(self, pid: int, stderr_fd: int, total_bytes: int):
        super().__init__(name="lmplz-progress", daemon=True)
        self.pid, self.stderr_fd, self.total_bytes = pid, stderr_fd, total_bytes
        self.started = time.time()
        self.finished = threading.Event()

    def bytes_read(self) -> int | None:
        try:
            with open(f"/proc/{self.pid}/io", encoding="ascii") as f:
                for line in f:
                    if line.startswith("rchar:"):
                        return int(line.split()[1])
        except (OSError, ValueError):
            pass
        return None

    def run(self) -> None:
        while not self.finished.wait(LMPLZ_PROGRESS_SECONDS):
            try:
                text = os.pread(self.stderr_fd, 1 << 20, max(0, os.fstat(self.stderr_fd).st_size - (1 << 20)))
            except OSError:
                return
            log.info("%s", lmplz_progress_line(time.time() - self.started, text.decode(errors="replace"),
                                               self.bytes_read(), self.total_bytes))


class _ByteRange:
    """A read-only file object over bytes [start, end) of a buffer (pyarrow streams it in blocks)."""

    def __init__(self, buffer, start: int, end: int):
        self.buffer, self.pos, self.end, self.closed = buffer, start, end, False

    def read(self, n: int = -1) -> bytes:
        stop = self.end if n is None or n < 0 else min(self.end, self.pos + n)
        out = self.buffer[self.pos:stop]
        self.pos = stop
        return out

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True


def arpa_sections(buffer) -> dict[int, tuple[int, int]]:
    """Byte range of the n-gram lines of each order of an ARPA file (mapped in ``buffer``)."""
    starts: dict[int, int] = {}
    order, pos = 1, 0
    while True:
        marker = b"\n\\%d-grams:\n" % order
        i = buffer.find(marker, pos)
        if i < 0:
            break
        starts[order] = pos = i + len(marker)
        order += 1
    if not starts:
        raise PhraseMiningError("lmplz wrote an ARPA file without n-gram sections (is the disk full?)")
    return {o: (start, buffer.find(b"\n\\", start) + 1) for o, start in starts.items()}


def iter_arpa_section(buffer, start: int, end: int, min_logprob: float | None = None):
    """(log10 probs, n-gram strings) as Arrow arrays, a block at a time, for one ARPA section; with
    ``min_logprob`` only the n-grams at or above it. Parsed by pyarrow's CSV reader (C++): the ARPA
    of a large corpus has hundreds of millions of lines, and memory stays at one block."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pcsv

    if end <= start:
        return
    first = buffer[start:buffer.find(b"\n", start)]
    if not first.strip():  # an empty section
        return
    names = ["logprob", "ngram", "backoff"][: first.count(b"\t") + 1]
    reader = pcsv.open_csv(
        pa.PythonFile(_ByteRange(buffer, start, end), mode="r"),
        read_options=pcsv.ReadOptions(column_names=names, block_size=16 << 20, use_threads=False),
        parse_options=pcsv.ParseOptions(delimiter="\t", quote_char=False, escape_char=False, ignore_empty_lines=True),
        convert_options=pcsv.ConvertOptions(column_types={"logprob": pa.float64(), "ngram": pa.string()},
                                            include_columns=["logprob", "ngram"]),
    )
    for batch in reader:
        logprob, ngram = batch.column(0), batch.column(1)
        if min_logprob is not None:
            keep = pc.greater_equal(logprob, min_logprob)
            logprob, ngram = pc.filter(logprob, keep), pc.filter(ngram, keep)
        yield logprob, ngram


INTERMEDIATE_HEADER = "KenLM intermediate binary file"


def read_intermediate(prefix: str | os.PathLike):
    """KenLM's intermediate model files (``lmplz --intermediate PREFIX``): (vocabulary, one record
    array per order). ``vocabulary[i]`` is word id i; the records of order n hold ``w`` (n word ids,
    in text order), ``prob`` (log10 p(w_n | w_1 .. w_{n-1}), float32) and ``backoff``: exactly the
    numbers lmplz prints into an ARPA file (``lm/common/model_buffer.cc``, ``print.cc``), read with
    numpy instead of parsing hundreds of thousands of text lines. The record arrays are memory-mapped
    (a model of a multi-GB sample does not have to fit in RAM)."""
    import numpy as np

    prefix = str(prefix)
    meta_path = Path(prefix + ".kenlm_intermediate")
    try:
        meta = meta_path.read_text(encoding="utf-8").split("\n")
    except OSError as exc:
        raise PhraseMiningError(f"lmplz wrote no intermediate model ({exc}); is the disk full?") from None
    if len(meta) < 3 or meta[0] != INTERMEDIATE_HEADER or not meta[1].startswith("Counts ") or meta[2] != "Payload pb":
        raise PhraseMiningError(
            f"{meta_path}: not a KenLM intermediate model this reader knows (expected '{INTERMEDIATE_HEADER}', "
            f"'Counts ...', 'Payload pb'; got {meta[:3]}): was lmplz built from another KenLM version? "
            f"Rebuild it with `bash launchers/setup.sh` or pass --lmplz")
    counts = [int(c) for c in meta[1].split()[1:]]
    vocabulary = Path(prefix + ".vocab").read_bytes().decode("utf-8").split("\0")[: counts[0] + 1]
    orders = []
    for n, count in enumerate(counts, start=1):
        dtype = np.dtype([("w", "=u4", (n,)), ("prob", "=f4"), ("backoff", "=f4")])
        size = os.path.getsize(f"{prefix}.{n}")
        if size != count * dtype.itemsize:
            raise PhraseMiningError(f"{prefix}.{n}: {size / dtype.itemsize:g} order-{n} records, the header says "
                                    f"{count} (a truncated file: is the disk full?)")
        orders.append(np.memmap(f"{prefix}.{n}", dtype=dtype, mode="r") if count else np.zeros(0, dtype=dtype))
    return vocabulary, orders


def _arpa_floats(values) -> list[float]:
    """float32 log10 probabilities as the ARPA file would give them: lmplz prints the shortest decimal
    that reads back as the same float32 (double-conversion's ToShortestSingle), and parsing that
    decimal gives a double; numpy's float32 -> str is the same shortest form."""
    import numpy as np

    return np.asarray(values, dtype=np.float32).astype(str).astype(np.float64).tolist()


def select_candidates_intermediate(prefix: str | os.PathLike, config: PhraseMiningConfig
                                   ) -> dict[tuple[str, ...], tuple[float, float]]:
    """``select_candidates`` on lmplz's intermediate files: the same candidates with the same numbers
    (a test runs both on one lmplz run), every rule applied to whole record arrays by word id (this
    runs on the build's serial path between lmplz and the parallel counting)."""
    import numpy as np

    vocabulary, orders = read_intermediate(prefix)
    unigram_ids = orders[0]["w"][:, 0]
    unigram_logprob = np.zeros(len(vocabulary), dtype=np.float64)
    unigram_logprob[unigram_ids] = _arpa_floats(orders[0]["prob"])
    inside, first = _word_classes(vocabulary[i] for i in unigram_ids.tolist())
    index = {w: i for i, w in enumerate(vocabulary)}
    inside_mask = np.zeros(len(vocabulary), dtype=bool)
    first_mask = np.zeros(len(vocabulary), dtype=bool)
    stop_mask = np.zeros(len(vocabulary), dtype=bool)
    inside_mask[[index[w] for w in inside]] = True
    first_mask[[index[w] for w in first]] = True
    stop_mask[[i for i, w in enumerate(vocabulary) if is_stop_word(w)]] = True
    candidates: dict[tuple[str, ...], tuple[float, float]] = {}
    # The sticky n-grams whose every prefix transition is sticky, order by order: their word ids,
    # worst log10 prob and worst lift (as ``_candidates``, joined to the (n-1)-gram prefix by row).
    path_ids = np.zeros((0, 1), dtype=np.uint32)
    path_logprob = path_lift = np.zeros(0)
    for n, records in enumerate(orders[1:], start=2):
        kept_ids, kept_prob = [np.zeros((0, n), dtype=np.uint32)], [np.zeros(0, dtype=np.float32)]
        for begin in range(0, len(records), 1 << 22):  # bounded memory: the kept rows are few
            block = records[begin:begin + (1 << 22)]
            ids = block["w"]
            keep = inside_mask[ids].all(axis=1) & first_mask[ids[:, 0]]
            if config.min_logprob is not None:
                # float32 vs its decimal differ by < 1e-7 relative: a loose test here, the exact one below
                keep &= block["prob"] >= config.min_logprob - 1e-6 * abs(config.min_logprob) - 1e-30
            kept_ids.append(ids[keep])
            kept_prob.append(block["prob"][keep])
        ids = np.concatenate(kept_ids)
        logprob = np.asarray(_arpa_floats(np.concatenate(kept_prob)), dtype=np.float64)
        if config.min_logprob is not None:
            exact = logprob >= config.min_logprob
            ids, logprob = ids[exact], logprob[exact]
        if n == 2:
            previous_logprob, previous_lift = np.zeros(len(ids)), np.full(len(ids), math.inf)
        else:  # the row of each n-gram's prefix among the (n-1)-gram paths (-1: none)
            _, inverse = np.unique(np.concatenate([path_ids, ids[:, :-1]]), axis=0, return_inverse=True)
            inverse = inverse.reshape(-1)
            row = np.full(int(inverse.max(initial=-1)) + 1, -1, dtype=np.int64)
            row[inverse[:len(path_ids)]] = np.arange(len(path_ids))
            prefix = row[inverse[len(path_ids):]]
            found = prefix >= 0
            ids, logprob, prefix = ids[found], logprob[found], prefix[found]
            previous_logprob, previous_lift = path_logprob[prefix], path_lift[prefix]
        last = ids[:, -1]
        stop = stop_mask[last]
        path_ids = ids
        path_logprob = np.minimum(previous_logprob, logprob)
        path_lift = np.where(stop, previous_lift, np.minimum(previous_lift, logprob - unigram_logprob[last]))
        repeated = np.all(ids == ids[:, :1], axis=1)  # one word repeated: hex dumps, tables ("ff ff", "5a 5a 5a")
        chosen = np.flatnonzero(~stop & ~repeated & (path_lift >= config.min_lift))
        for words, worst_logprob, worst_lift in zip(ids[chosen].tolist(), path_logprob[chosen].tolist(),
                                                    path_lift[chosen].tolist()):
            candidates[tuple(map(vocabulary.__getitem__, words))] = (worst_logprob, worst_lift)
    return candidates


# ---------------------------------------------------------------------------------------------
# Mining
# ---------------------------------------------------------------------------------------------
def read_word_sentences(words_file: str | os.PathLike) -> Iterator[list[str]]:
    with open(words_file, encoding="utf-8") as f:
        for line in f:
            words = line.split()
            if words:
                yield words


def select_candidates(arpa_file: str | os.PathLike, config: PhraseMiningConfig) -> dict[tuple[str, ...], tuple[float, float]]:
    """Candidates that pass the stickiness, lift and stop-word rules: words -> (min_logprob, min_lift).

    The word-level rules are applied to whole blocks of the ARPA file at once (Arrow compute): only
    n-grams that could be a candidate or a candidate's prefix -- all words content tokens, the first
    not a stop word, the others not a stop word other than a glue word -- reach Python objects."""
    import mmap

    with open(arpa_file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
        return _select_candidates(buffer, config)


def _select_candidates(buffer, config: PhraseMiningConfig) -> dict[tuple[str, ...], tuple[float, float]]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    sections = arpa_sections(buffer)
    unigram: dict[str, float] = {}
    for logprob, ngram in iter_arpa_section(buffer, *sections[1]):
        unigram.update(zip(ngram.to_pylist(), logprob.to_pylist()))
    inside, first = (pa.array(words, pa.string()) for words in _word_classes(unigram))
    # Kept for the full-path check below: any prefix of a candidate must be sticky too.
    sticky: dict[tuple[str, ...], float] = {}
    for order in sorted(o for o in sections if o > 1):
        for logprob, ngram in iter_arpa_section(buffer, *sections[order], min_logprob=config.min_logprob):
            if len(ngram) == 0:
                continue
            words = pc.split_pattern(ngram, " ")
            outside = ~pc.is_in(pc.list_flatten(words), value_set=inside).to_numpy(zero_copy_only=False)
            offsets = words.offsets.to_numpy()
            keep = np.add.reduceat(outside.astype(np.int32), offsets[:-1]) == 0
            keep &= pc.is_in(pc.list_element(words, 0), value_set=first).to_numpy(zero_copy_only=False)
            rows = pa.array(np.flatnonzero(keep))
            for g, p in zip(pc.take(ngram, rows).to_pylist(), pc.take(logprob, rows).to_pylist()):
                sticky[tuple(g.split(" "))] = p
    return _candidates(unigram, sticky, config)


def _word_classes(unigram: Iterable[str]) -> tuple[list[str], list[str]]:
    """(words allowed inside a candidate, words allowed first): content tokens, no stop word first,
    only glue words among the stop words inside."""
    content = [w for w in unigram if is_content_token(w) and w not in ("<s>", "</s>", "<unk>")]
    return [w for w in content if not is_stop_word(w) or w in GLUE_WORDS], [w for w in content if not is_stop_word(w)]


def _candidates(unigram: dict[str, float], sticky: dict[tuple[str, ...], float], config: PhraseMiningConfig
                ) -> dict[tuple[str, ...], tuple[float, float]]:
    """The candidates among the sticky n-grams (their words already checked): every prefix transition
    sticky, the last word no stop word, every transition into a content word lifted enough."""
    candidates: dict[tuple[str, ...], tuple[float, float]] = {}
    # (worst log10 prob, worst lift) of the n-grams whose every prefix transition is sticky, built
    # shortest first from the (n-1)-gram prefix's entry: one lookup per n-gram.
    paths: dict[tuple[str, ...], tuple[float, float]] = {}
    start = (0.0, math.inf)
    for words in sorted(sticky, key=len):  # stable: the candidates keep the model's order
        previous = start if len(words) == 2 else paths.get(words[:-1])
        if previous is None:  # an unsticky (or pruned) prefix transition
            continue
        logprob = sticky[words]
        last = words[-1]
        if is_stop_word(last):  # a glue word inside a longer phrase ("bank of ..."), never last
            paths[words] = (min(previous[0], logprob), previous[1])
            continue
        path = paths[words] = (min(previous[0], logprob), min(previous[1], logprob - unigram.get(last, 0.0)))
        if path[1] >= config.min_lift and len(set(words)) > 1:  # not one word repeated ("ff ff", "yes yes")
            candidates[words] = path
    return candidates


class NgramIndex:
    """The n-grams to count, indexed for array lookups: built once, then passed to ``count_ngrams``
    for every shard (the build's workers load it once each, not once per shard).

    Exact for any vocabulary: the words of the n-grams get ids; for each length n the n-word
    prefixes of the n-grams (``S_n``) are keyed by (index of their (n-1)-word prefix in ``S_(n-1)``,
    id of their last word), sorted. A text is then matched length by length with ``searchsorted``:
    the position of the n-gram starting at word i in ``S_n`` follows from that of its (n-1)-gram."""

    def __init__(self, ngrams: Iterable[tuple[str, ...]]):
        self.wanted = {tuple(g) for g in ngrams if len(g) >= 1}
        words = sorted({w for g in self.wanted for w in g})
        self.word_id = dict(zip(words, range(len(words))))
        self.vocab = max(1, len(words))
        self.singles = np.array(sorted(self.word_id[g[0]] for g in self.wanted if len(g) == 1), dtype=np.int64)
        self.levels: list[tuple[np.ndarray, np.ndarray, list[tuple[str, ...]]]] = []
        previous = {(w,): i for w, i in self.word_id.items()}
        for n in range(2, max(map(len, self.wanted), default=1) + 1):
            grams = list({g[:n] for g in self.wanted if len(g) >= n})
            keys = np.fromiter((previous[g[:-1]] * self.vocab + self.word_id[g[-1]] for g in grams), dtype=np.int64,
                               count=len(grams))
            order = np.argsort(keys, kind="stable")
            grams = [grams[i] for i in order.tolist()]
            is_wanted = np.fromiter(map(self.wanted.__contains__, grams), dtype=bool, count=len(grams))
            self.levels.append((keys[order], is_wanted, grams))
            previous = dict(zip(grams, range(len(grams))))

    def __len__(self) -> int:
        return len(self.wanted)

    def ids(self, tokens: Iterable) -> np.ndarray:
        """Word id of each token; -1 for anything else (other words, sentence separators)."""
        if not isinstance(tokens, list):
            tokens = list(tokens)
        return np.fromiter(map(self.word_id.get, tokens, itertools.repeat(-1)), dtype=np.int64, count=len(tokens))

    def count(self, ids: np.ndarray) -> Counter:
        """Occurrences of the n-grams (overlapping) in ``ids`` (``ids()`` of a text, -1 between sentences)."""
        counts: Counter = Counter()
        if len(self.singles):
            hits = ids[np.isin(ids, self.singles)]
            for i, c in zip(*np.unique(hits, return_counts=True)):
                counts[(self._word(int(i)),)] = int(c)
        for n, _, index in self._walk(ids):
            _, is_wanted, grams = self.levels[n - 2]
            hits = index[is_wanted[index]]
            if len(hits):
                seen, c = np.unique(hits, return_counts=True)
                for i, k in zip(seen.tolist(), c.tolist()):
                    counts[grams[i]] = k
        return counts

    def longest_match(self, ids: np.ndarray, min_length: int = 2, grams: bool = False) -> tuple[np.ndarray, ...]:
        """For every position of ``ids`` where one of the n-grams (of ``min_length`` words or more)
        starts: (positions, length of the longest such n-gram there), positions increasing; with
        ``grams``, also which n-gram: its index among the level's (``self.levels[length - 2][2]``)."""
        longest = np.zeros(len(ids), dtype=np.int64)
        which = np.zeros(len(ids), dtype=np.int64) if grams else None
        for n, start, index in self._walk(ids):
            if n >= min_length:
                hit = self.levels[n - 2][1][index]
                longest[start[hit]] = n  # n grows: the longest wins
                if which is not None:
                    which[start[hit]] = index[hit]
        positions = np.flatnonzero(longest)
        if which is not None:
            return positions, longest[positions], which[positions]
        return positions, longest[positions]

    def _walk(self, ids: np.ndarray):
        """For n = 2, 3, ...: (n, start positions, level-n key index) of every n-gram of ``ids`` whose
        prefixes are all keys (whether wanted or not), so a longer match only extends a shorter one."""
        start = np.flatnonzero(ids >= 0)  # positions whose (n-1)-gram is in S_(n-1), with its index
        index = ids[start]
        for n, (keys, _, _) in enumerate(self.levels, start=2):
            start_ok = start + n - 1 < len(ids)
            start, index = start[start_ok], index[start_ok]
            last = ids[start + n - 1]
            ok = last >= 0
            start, key = start[ok], index[ok] * self.vocab + last[ok]
            found = np.minimum(np.searchsorted(keys, key), len(keys) - 1)
            ok = keys[found] == key
            start, index = start[ok], found[ok]
            if not len(start):
                return
            yield n, start, index

    def _word(self, i: int) -> str:
        if not hasattr(self, "_words"):
            self._words = sorted(self.word_id, key=self.word_id.__getitem__)
        return self._words[i]


def greedy_choice(positions: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Which of the longest matches (at increasing ``positions``, ``lengths`` words long) greedy
    left-to-right tokenization keeps: a match is dropped when it starts inside the last one kept.
    Matches that overlap no earlier one are all kept at once; the loop only visits the runs of
    overlapping matches (a few percent of them)."""
    n = len(positions)
    if n < 2:
        return np.arange(n)
    touches = np.zeros(n, dtype=bool)  # starts before the end of some earlier match
    touches[1:] = positions[1:] < np.maximum.accumulate(positions + lengths)[:-1]
    if not touches.any():
        return np.arange(n)
    keep = np.ones(n, dtype=bool)
    runs = np.flatnonzero(touches | np.append(touches[1:], False))  # the overlapping runs' matches, in order
    covered = 0  # (a run's first match starts after every earlier match's end: it is always kept)
    for j, i, length in zip(runs.tolist(), positions[runs].tolist(), lengths[runs].tolist()):
        if i >= covered:
            covered = i + length
        else:
            keep[j] = False
    return np.flatnonzero(keep)


def count_ngrams(sentences: Iterable[Sequence[str]], ngrams: Iterable[tuple[str, ...]] | NgramIndex) -> Counter:
    """Occurrences of each of ``ngrams`` (overlapping) in ``sentences``; memory ~ len(ngrams) + a
    block of sentences (``NgramIndex``: array lookups, no Python loop per word)."""
    index = ngrams if isinstance(ngrams, NgramIndex) else NgramIndex(ngrams)
    counts: Counter = Counter()
    block: list = []
    for words in sentences:
        block.extend(words)
        block.append(None)  # a separator: no n-gram crosses it
        if len(block) >= 1 << 20:
            counts.update(index.count(index.ids(block)))
            block = []
    if block:
        counts.update(index.count(index.ids(block)))
    return counts


WORDS_BLOCK_BYTES = 1 << 24


def encoded_words_path(words_file: str | os.PathLike) -> Path:
    """Where ``save_encoded_words`` keeps a words file's encoding (beside it)."""
    return Path(str(words_file) + ".ids.arrays")


def save_encoded_words(words_file: str | os.PathLike, distinct: list[str], tokens: np.ndarray) -> None:
    """Keep ``encode_words_bytes`` of a whole words file beside it (the build's analysis has it in hand),
    so that the fit's counting passes read it instead of splitting and encoding the text again (twice);
    with the words file's size, which ``encoded_word_blocks`` checks."""
    save_arrays(encoded_words_path(words_file), distinct=np.frombuffer(" ".join(distinct).encode("utf-8"), dtype=np.uint8),
                tokens=tokens.astype(np.int32 if len(distinct) < 2**31 else np.int64),
                words_bytes=np.int64(os.path.getsize(words_file)))


def _saved_encoding(words_file: str | os.PathLike) -> tuple[list[str], np.ndarray] | None:
    """``save_encoded_words``' encoding of this words file, or None (none, or not of this file)."""
    path = encoded_words_path(words_file)
    if not path.is_file():
        return None
    z = load_arrays(path)
    if int(z["words_bytes"]) != os.path.getsize(words_file):
        return None
    return z["distinct"].tobytes().decode("utf-8").split(" "), z["tokens"]  # as saved: int32 below 2**31 distinct tokens


def encoded_word_blocks(words_file: str | os.PathLike, block_bytes: int = WORDS_BLOCK_BYTES) -> Iterator[tuple[list[str], np.ndarray]]:
    """The words of a words file (one sentence a line, words separated by one space, as the build
    writes them; words never contain whitespace), a block of whole lines at a time, split and
    dictionary-encoded by Arrow: (distinct tokens, int64 index of each token into them), where a
    "\n" token ends each sentence (and a final "" may follow). One Python string per distinct word,
    not one per word; memory bounded by ``block_bytes``. A words file the build's analysis encoded
    (``save_encoded_words``; a shard is at most 16M characters) comes back as that one block, its
    index as saved (int32: half the memory of an int64 copy)."""
    saved = _saved_encoding(words_file)
    if saved is not None:
        yield saved
        return
    rest = b""
    with open(words_file, "rb") as f:
        while chunk := f.read(block_bytes):
            data = rest + chunk
            cut = data.rfind(b"\n") + 1
            rest = data[cut:]
            if cut:
                yield encode_words_bytes(data[:cut])
    if rest:
        yield encode_words_bytes(rest + b"\n")


def encode_words_bytes(data: bytes) -> tuple[list[str], np.ndarray]:
    """``encoded_word_blocks`` of one block of whole lines (UTF-8 bytes): (distinct tokens in order of
    first occurrence, int64 index of each token); "\n" ends each sentence."""
    import pyarrow.compute as pc

    text = arrow_strings([data.replace(b"\n", b" \n ")])
    words = pc.dictionary_encode(pc.split_pattern(text, " ").flatten())
    return words.dictionary.to_pylist(), arrow_ints(words.indices).astype(np.int64)


def count_ngrams_in_words_file(words_file: str | os.PathLike, index: NgramIndex) -> Counter:
    """``count_ngrams`` over a words file (see ``encoded_word_blocks``)."""
    counts: Counter = Counter()
    for distinct, tokens in encoded_word_blocks(words_file):
        table = np.fromiter(map(index.word_id.get, distinct, itertools.repeat(-1)), dtype=np.int64, count=len(distinct))
        counts.update(index.count(table[tokens]))
    return counts


def _drop_subsumed(counts: dict[tuple[str, ...], int], ratio: float) -> set[tuple[str, ...]]:
    """Phrases almost always seen inside one longer phrase (as its prefix or suffix)."""
    dropped = set()
    for longer, c in counts.items():
        if len(longer) < 3:
            continue
        for shorter in (longer[:-1], longer[1:]):
            cs = counts.get(shorter)
            if cs and c >= ratio * cs:
                dropped.add(shorter)
    return dropped


def mine_phrases(words_file: str | os.PathLike | Sequence[str | os.PathLike], config: PhraseMiningConfig,
                 temp_dir: str | os.PathLike | None = None,
                 count: Callable[[set[tuple[str, ...]]], Counter] | None = None,
                 while_lmplz_runs: Callable[[], None] | None = None, vocab_size: int | None = None,
                 line_stride: int = 1, running: tuple[LmplzRun, Path] | None = None) -> list[Phrase]:
    """Mine the phrase dictionary of a word-tokenized corpus (one sentence a line, words space-separated;
    one file, or several read in order as one text).

    ``count(candidates)`` counts the candidate n-grams over the corpus (default: one pass over the
    words files; the build passes a parallel count over its shards). ``while_lmplz_runs()`` runs
    while lmplz estimates the model (independent work: lmplz leaves part of a second core free).
    ``running``: an ``LmplzRun`` already started on these files (and its ``intermediate`` prefix),
    waited for instead of starting one."""
    config.validate()
    find_lmplz(config.lmplz)  # fail before any expensive work
    files = [words_file] if isinstance(words_file, (str, os.PathLike)) else list(words_file)

    if running is not None:  # (the caller's; its files are the caller's to remove)
        run, model = running
        try:
            run.wait(while_lmplz_runs)
        finally:
            run.kill()
        t0 = time.time()
        candidates = select_candidates_intermediate(model, config)
    else:
        with tempfile.TemporaryDirectory(prefix="ambert-kenlm-", dir=temp_dir) as tmp:
            # KenLM's intermediate binary model, not the ARPA text: the same numbers (a test checks the
            # candidates against the ARPA reader's), without lmplz printing and us parsing 400k lines
            # per 20 MB of text on the build's serial path.
            model = Path(tmp) / "model"
            run_lmplz(files, None, config, tmp, while_lmplz_runs, vocab_size, line_stride, intermediate=model)
            t0 = time.time()
            candidates = select_candidates_intermediate(model, config)
    log.info("phrases: %d candidates from the model in %.2fs; counting them", len(candidates), time.time() - t0)
    t0 = time.time()
    if count is None:
        counts = count_ngrams((words for f in files for words in read_word_sentences(f)), candidates)
    else:
        counts = count(set(candidates))
    counts = {g: c for g, c in counts.items() if c >= config.min_count}
    for g in _drop_subsumed(counts, config.subsume_ratio):
        del counts[g]
    phrases = []
    for words, count in counts.items():
        worst_logprob, worst_lift = candidates[words]
        phrases.append(Phrase(words, count, round(worst_lift * math.log10(count), 4),
                              round(worst_logprob, 4), round(worst_lift, 4)))
    phrases.sort(key=lambda p: (-p.score, p.words))
    if config.max_phrases:
        phrases = phrases[: config.max_phrases]
    log.info("phrases: kept %d phrases in %.1fs", len(phrases), time.time() - t0)
    return phrases


# ---------------------------------------------------------------------------------------------
# The dictionary file
# ---------------------------------------------------------------------------------------------
TSV_HEADER = "# phrase\tcount\tscore\tmin_log10_prob\tmin_log10_lift"


def write_phrases_tsv(path: str | os.PathLike, phrases: Sequence[Phrase]) -> None:
    """One phrase a line, words separated by spaces, best score first."""
    lines = [TSV_HEADER]
    lines += [f"{p.text}\t{p.count}\t{p.score:.4f}\t{p.min_logprob:.4f}\t{p.min_lift:.4f}" for p in phrases]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def read_phrases_tsv(path: str | os.PathLike) -> list[Phrase]:
    """Read a dictionary written by ``write_phrases_tsv`` -- or any file whose first tab-separated
    column is a phrase (words separated by spaces or "_"); other columns are optional."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"phrase dictionary {path} does not exist (--phrases expects a phrases.tsv file)")
    phrases = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        cols = line.split("\t")
        words = tuple(cols[0].replace("_", " ").split())
        try:
            numbers = [float(c) for c in cols[1:5]]
        except ValueError:
            raise ValueError(f"{path}:{lineno}: expected 'phrase<TAB>count<TAB>score...', got {line!r}") from None
        numbers += [0.0] * (4 - len(numbers))
        phrases.append(Phrase(words, int(numbers[0]), numbers[1], numbers[2], numbers[3]))
    return phrases


# ---------------------------------------------------------------------------------------------
# Greedy longest-match tokenization
# ---------------------------------------------------------------------------------------------
class PhraseTokenizer:
    """Greedy left-to-right longest match of multi-word phrases over a list of words.

    A dict from a word to the longest phrase length starting with it makes the common case (a word
    that starts no phrase) one dict lookup; only then are tuples of decreasing length tried.
    """

    def __init__(self, phrases: Iterable[Sequence[str]]):
        self.phrases: frozenset[tuple[str, ...]] = frozenset(tuple(p) for p in phrases if len(p) >= 2)
        longest: dict[str, int] = {}
        for p in self.phrases:
            if len(p) > longest.get(p[0], 0):
                longest[p[0]] = len(p)
        self.longest_from = longest
        self.max_len = max(longest.values(), default=1)
        self._pairs = None  # the word-pair tables of ``flat_matches``, built on first use

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pairs": None, "_index": None}  # rebuilt where used (each worker, in parallel)

    def ngram_index(self) -> NgramIndex:
        """The phrases as an ``NgramIndex`` (array matching over word ids), built on first use."""
        if getattr(self, "_index", None) is None:
            self._index = NgramIndex(self.phrases)
        return self._index

    def _pair_tables(self):
        """Every phrase starts with one of these word pairs: an id for each word that is a phrase's
        first or second word (0 = none); the id base K; the sorted pair keys (first id * K + second
        id); for each key the longest phrase starting with that pair, and whether the pair itself is one."""
        if self._pairs is None:
            import numpy as np

            word_id: dict[str, int] = {}
            for p in sorted(self.phrases):
                for w in p[:2]:
                    word_id.setdefault(w, len(word_id) + 1)
            base = len(word_id) + 1
            pair_longest: dict[int, int] = {}
            pair_is_phrase: set[int] = set()
            for p in self.phrases:
                key = word_id[p[0]] * base + word_id[p[1]]
                pair_longest[key] = max(pair_longest.get(key, 0), len(p))
                if len(p) == 2:
                    pair_is_phrase.add(key)
            keys = sorted(pair_longest)
            self._pairs = (word_id, base, np.asarray(keys, dtype=np.int64),
                           np.asarray([pair_longest[k] for k in keys], dtype=np.int64),
                           np.asarray([k in pair_is_phrase for k in keys], dtype=bool))
        return self._pairs

    def __len__(self) -> int:
        return len(self.phrases)

    def spans(self, words: Sequence[str]) -> list[int]:
        """Number of words in each coarse token, left to right (sums to len(words))."""
        out: list[int] = []
        append = out.append
        longest = self.longest_from.get
        phrases = self.phrases
        n = len(words)
        i = 0
        while i < n:
            m = longest(words[i])
            if m is None:
                append(1)
                i += 1
                continue
            length = min(m, n - i)
            while length > 1 and tuple(words[i:i + length]) not in phrases:
                length -= 1
            append(length)
            i += length
        return out

    def pair_word_ids(self, words: Sequence[str]):
        """For each word, its id among the first / second words of phrases (0: neither), as numpy."""
        import itertools

        import numpy as np

        return np.fromiter(map(self._pair_tables()[0].get, words, itertools.repeat(0)), dtype=np.int64, count=len(words))

    def flat_matches(self, words: Sequence[str], sentence_lengths: Sequence[int],
                     candidates: Sequence[int] | None = None, pair_ids=None) -> tuple[list[int], list[int]]:
        """Greedy longest matches over many sentences at once: (starts, lengths) of every multi-word
        phrase, positions into the flat word list ``words`` (sentences concatenated).

        Same result as ``spans`` sentence by sentence, but the Python loop only visits positions
        where a phrase's first two words occur (found for all words at once with numpy: a word that
        starts some phrase is common, one followed by a word that continues one of them is not).
        ``candidates``: the increasing positions of words that start some phrase, if the caller
        already knows them (``words[i] in self.longest_from``); ``pair_ids``: ``pair_word_ids(words)``
        if the caller has them (the encoder caches them per distinct word); computed otherwise.
        """
        import numpy as np

        longest = self.longest_from
        if not longest or len(words) < 2:
            return [], []
        ids = self.pair_word_ids(words) if pair_ids is None else np.asarray(pair_ids, dtype=np.int64)
        _, base, table, pair_longest, pair_is_phrase = self._pair_tables()
        if candidates is None:
            candidates = np.arange(len(ids) - 1)
        else:
            candidates = np.asarray(candidates, dtype=np.int64)
            candidates = candidates[candidates < len(ids) - 1]
        keys = ids[candidates] * base + ids[candidates + 1]
        slot = np.minimum(np.searchsorted(table, keys), len(table) - 1)
        pair = table[slot] == keys  # the candidate starts a (first, second) word pair of some phrase
        candidates, slot = candidates[pair], slot[pair]
        if len(candidates) == 0:
            return [], []
        lengths = np.asarray(sentence_lengths, dtype=np.int64)
        ends = np.cumsum(lengths)
        # end (exclusive) of the sentence holding each candidate position
        limit = ends[np.searchsorted(ends, candidates, side="right")]
        longest_here = np.minimum(pair_longest[slot], limit - candidates)
        pair_is_phrase = pair_is_phrase[slot]
        phrases = self.phrases
        starts: list[int] = []
        match_lengths: list[int] = []
        covered = 0
        for i, length, two in zip(candidates.tolist(), longest_here.tolist(), pair_is_phrase.tolist()):
            if i < covered or length < 2:  # inside the previous match, or the pair crosses a sentence end
                continue
            while length > 2 and tuple(words[i:i + length]) not in phrases:
                length -= 1
            if length > 2 or two:
                starts.append(i)
                match_lengths.append(length)
                covered = i + length
        return starts, match_lengths

    def tokenize(self, words: Sequence[str], joiner: str = "_") -> list[str]:
        """Coarse tokens: words, and phrases joined with ``joiner``."""
        out, i = [], 0
        for length in self.spans(words):
            out.append(words[i] if length == 1 else joiner.join(words[i:i + length]))
            i += length
        return out
