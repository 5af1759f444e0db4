"""The language-blind build engine: inputs -> deterministic shards -> vocabularies -> paired dataset.

Stages (each resumable, each independent of the number of workers / MPI ranks):

1. check   inputs exist, are readable UTF-8, look like the language; output/work dirs are usable.
           sha256 of every input is taken here (meta.json, and a --resume with changed inputs is
           refused). Nothing expensive has run yet.
2. read    the inputs are streamed once into SHARDS of consecutive documents: a shard closes at
           --shard-documents documents or --shard-characters characters (default: from the corpus
           size), so shard contents depend only on the corpus and the recorded sizes. Each shard is written to
           ``DIR.partial/shards/<k>/docs.txt`` and handed at once to a worker. Uncompressed text (one
           document a line, or blank-line separated) is instead cut into shards of byte ranges ending
           at line breaks (``inputs.plan_ranges``), which each worker reads itself (``range.json``). The worker runs
3. analyze ``Language.analyze_shard``: normalise, split sentences, segment, cache the result,
           return count tables (counts.pkl). Shards finish in any order; that is fine because
4. fit     sums the counts (over shards, and over MPI ranks with a gather) and lets the language
           build its vocabularies ONCE (rank 0) into ``DIR.partial/artifacts``.
5. encode  every shard is encoded from its cache with those vocabularies and written as its own
           small train/valid IndexedDatasets, all six in one part file (``format.write_part``); the
           train/valid split is a pure function of the global document index (``is_valid_document``).
6. merge   rank 0 concatenates the shard datasets IN SHARD ORDER (``format.merge_splits``: the bytes
           megatron-core's builder merge writes, without importing it) into ``DIR.partial-<pid>`` (an
           ``AtomicDirectory``), copies the artifacts, writes meta.json last and renames it to DIR.
           Most of it is done during stage 5: ``format.BinConcatenator`` appends each shard's token
           bytes and index pieces as soon as it and the shards before it are encoded.

Every stage's output is written to a temporary name and renamed, so its presence marks the stage
done (a shard's docs.txt or range.json, counts.pkl, encoded.part; the corpus's read.json and fit.done):
``--resume`` re-runs only what was not finished and the
final bytes are the same as an uninterrupted build. ``DIR.partial/params.json`` records the build
parameters; a resume with different ones is refused.

Parallelism: ``--workers N`` runs stages 3 and 5 on a pool of N processes (the main process
reads, unless the workers read byte ranges). Under ``mpirun -np K`` (detected from OMPI_COMM_WORLD_SIZE / PMI_SIZE; mpi4py is imported
only then) rank r owns the shards k with k % K == r; every rank reads the inputs (reading is
cheap next to segmentation) but analyses/encodes only its own shards; counts are gathered to rank
0, rank 0 fits and merges. The same code runs on an initialised torch.distributed (gloo) group,
which is how the tests drive two ranks. DIR's parent must be on a filesystem all ranks share.
"""

from __future__ import annotations

import errno
import gc
import glob
import json
import logging
import multiprocessing as mp
import os
import pickle
import shutil
import sys
import threading
import time
import warnings
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Any

import numpy as np

from data_prep import format as fmt
from data_prep import inputs as inp
from data_prep.languages import (
    Corpus,
    EncodedShard,
    Language,
    LanguageError,
    PackedCounter,
    get_language,
    sum_count_tables,
    sum_counters,
)

log = logging.getLogger("data_prep")
# megatron-core warns at import that TransformerEngine/Apex are absent: irrelevant for data files.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")

WORK_SUFFIX = ".partial"
PARAMS_FILE = "params.json"
READ_FILE = "read.json"


class BuildError(RuntimeError):
    """The build cannot go on; the message names the problem and the fix. ``shared``: every rank
    raises the same message (rank 0 prints it; the others need not repeat it)."""

    def __init__(self, message: str, shared: bool = False) -> None:
        super().__init__(message)
        self.shared = shared


class BuildInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the build; the message says what is kept and how to go on."""

    def __init__(self, message: str, signum: int = 2) -> None:
        super().__init__(message)
        self.signum = signum


# Errors whose messages already name the problem and the fix (not wrapped as "damaged work directory").
_OUR_ERRORS = (BuildError, inp.InputError, LanguageError, FileExistsError)


def raise_on_sigterm() -> None:
    """SIGTERM (a scheduler's kill, ``kill PID``) ends the build like Ctrl-C: the pool is stopped and
    what is finished is kept for --resume, instead of dying with the workers writing into a closed pipe."""
    import signal

    def handler(signum, frame):
        raise BuildInterrupted("SIGTERM", signum)

    signal.signal(signal.SIGTERM, handler)


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------
@dataclass
class BuildConfig:
    """Everything a build needs; ``build.py`` fills it from the command line."""

    language: str
    """--lang: a registered language plugin (zh, en)."""
    output: str
    """--output: the dataset directory to create."""
    inputs: list[str] | None = None
    """--input: files, globs, folders; None builds the language's built-in demo corpus."""
    workers: int = 1
    """--workers: processes for the analyze/encode stages (1 = in the main process)."""
    fine_vocab_size: int | None = None
    """--fine-vocab-size: maximum fine vocabulary size incl. special tokens (None: language default)."""
    coarse_vocab_size: int | None = None
    """--coarse-vocab-size: maximum coarse vocabulary size incl. special tokens (None: language default)."""
    fine_min_count: int | None = None
    """--fine-min-count: a fine unit seen fewer times stays out of the fine vocabulary."""
    coarse_min_count: int | None = None
    """--coarse-min-count: a coarse unit seen fewer times stays out of the coarse vocabulary."""
    valid_fraction: float = 0.01
    """--valid-fraction: share of documents in the valid split (deterministic, evenly spread)."""
    shard_documents: int = 100_000
    """--shard-documents: at most this many documents per shard (the unit of parallel work and of resume);
    about this many lines for inputs read in byte ranges (``inp.plan_ranges``: by the file's mean line length)."""
    shard_characters: int | None = None
    """--shard-characters: a shard also closes at this many characters (None: corpus bytes / 32, clamped
    to [50k, 16M], so a small corpus still gets enough shards to keep every worker busy)."""
    text_mode: str = "auto"
    """--text-mode: text inputs hold one document per blank-line-separated block, per line, per file
    (``file``), blocks of hard-wrapped lines (``wrapped``), or auto-detect."""
    text_field: str = "text"
    """--text-field: the JSON field / column with the text (jsonl, parquet, HF datasets)."""
    encoding_errors: str = "strict"
    """--encoding-errors: 'strict' stops on invalid UTF-8, 'replace' uses U+FFFD."""
    max_document_chars: int = 1_000_000
    """--max-document-chars: longer documents are cut at sentence ends (memory stays bounded)."""
    skip_language_check: bool = False
    """--skip-language-check: do not refuse inputs that do not look like --lang."""
    overwrite: bool = False
    """--overwrite: replace an existing output (only once the new one is complete)."""
    resume: bool = False
    """--resume: continue an interrupted build from DIR.partial (same parameters required)."""
    keep_work_dir: bool = False
    """--keep-work-dir: keep DIR.partial (shards, caches) after a successful build."""
    progress: bool = True
    """Show tqdm progress bars (off in tests)."""
    language_options: dict = field(default_factory=dict)
    """The language plugin's own options (Language.options_from_args). With ``vocab_from``: only the
    options the user gave explicitly (the others are taken from that dataset)."""
    vocab_from: str | None = None
    """--vocab-from: a finished dataset whose vocabularies (and tokenizer artifacts, encoding options)
    this build takes instead of fitting its own (``vocab_from_options``, ``Language.fit_from``)."""

    def __post_init__(self) -> None:
        if self.output and Path(self.output).name in ("", ".", ".."):  # `--output .`: the folder, by its name
            self.output = str(Path(self.output).resolve())  # (its work and log files go next to it)

    def validate(self) -> None:
        if self.workers < 1:
            raise BuildError(f"--workers must be >= 1, got {self.workers}")
        if not 0.0 < self.valid_fraction < 1.0:
            raise BuildError(f"--valid-fraction must be in (0, 1) so both splits get documents, got {self.valid_fraction}")
        if self.shard_documents < 1:
            raise BuildError(f"--shard-documents must be >= 1, got {self.shard_documents}")
        if self.shard_characters is not None and self.shard_characters < 1:
            raise BuildError(f"--shard-characters must be >= 1, got {self.shard_characters}")
        if self.encoding_errors not in inp.ENCODING_ERRORS:
            raise BuildError(f"--encoding-errors must be one of {inp.ENCODING_ERRORS}")
        if self.max_document_chars < 1000:
            raise BuildError(f"--max-document-chars must be >= 1000, got {self.max_document_chars}")
        for name in ("fine_vocab_size", "coarse_vocab_size"):
            value = getattr(self, name)
            if value is not None and value <= fmt.NUM_SPECIAL:
                raise BuildError(f"--{name.replace('_', '-')} must exceed the {fmt.NUM_SPECIAL} special tokens, got {value}")
        for name in ("fine_min_count", "coarse_min_count"):  # 0 used to mean "the default", silently
            value = getattr(self, name)
            if value is not None and value < 1:
                raise BuildError(f"--{name.replace('_', '-')} must be >= 1, got {value}")

    def language_plugin_options(self, lang_cls: type[Language]) -> dict:
        """The dict a plugin is constructed from: its own options plus the shared ones (defaults filled)."""
        return {
            **self.language_options,
            "fine_vocab_size": _first_given(self.fine_vocab_size, lang_cls.default_fine_vocab_size),
            "coarse_vocab_size": _first_given(self.coarse_vocab_size, lang_cls.default_coarse_vocab_size),
            "fine_min_count": _first_given(self.fine_min_count, lang_cls.default_fine_min_count),
            "coarse_min_count": _first_given(self.coarse_min_count, self.language_options.get("coarse_min_count"),
                                             lang_cls.default_coarse_min_count),
        }


def _first_given(*values):
    """The first value that is not None (an explicit 0 is a value, not "use the default")."""
    return next((v for v in values if v is not None), None)


# Shared options that only shape the fit: --vocab-from refuses them (with the language's fit_options).
SHARED_FIT_OPTIONS = ("fine_vocab_size", "coarse_vocab_size", "fine_min_count", "coarse_min_count")


def read_vocab_source(config: BuildConfig) -> tuple[Path, dict]:
    """--vocab-from DIR: DIR resolved and its meta.json, once DIR is known to be a finished dataset
    this code can read, of --lang's language (BuildError naming the fix otherwise)."""
    source = Path(config.vocab_from)
    try:
        meta = fmt.PairedDataset(source).meta  # meta.json, format version, both vocabularies
    except fmt.FormatError as exc:
        if isinstance(exc, fmt.NotADataset) and source.is_dir():  # (its fix, "--output DIR", would put a dataset
            # into what is likely a corpus folder, which the build refuses)
            raise BuildError(f"--vocab-from {source} is not a dataset (no {fmt.META_FILE}): it takes a finished dataset "
                             f"directory whose vocabularies this build reuses; build one first, e.g. `python "
                             f"data_prep/build.py --lang {config.language} --input ... --output {source.name}-dataset`, "
                             f"then pass --vocab-from {source.name}-dataset") from None
        raise BuildError(f"--vocab-from {source}: {exc} (--vocab-from takes a finished dataset directory, one with "
                         f"{fmt.META_FILE})") from None
    language = meta.get("language") or meta.get("build", {}).get("language")
    if language != config.language:
        raise BuildError(f"--vocab-from {source} is a --lang {language} dataset, but this build is --lang "
                         f"{config.language}: pass --lang {language}, or a --lang {config.language} dataset")
    problems = fmt.token_file_problems(source, meta)
    if problems:  # its ids would not match the vocabularies its model was trained with
        raise BuildError(f"--vocab-from {source}: {problems[0]}")
    resolved = source.resolve()
    if resolved == Path(config.output).resolve():
        raise BuildError(f"--vocab-from {source} is the --output itself: choose another --output")
    return resolved, meta


def vocab_from_options(config: BuildConfig, lang_cls: type[Language]) -> dict:
    """The plugin options of a --vocab-from build, checked before any work: the encoding options are
    those DIR was built with (an explicit different one is refused), options that only shape the
    fit are refused (the fit is DIR's), input-check options are the command line's."""
    import argparse

    source, meta = read_vocab_source(config)
    recorded = dict(meta.get("build", {}).get("language_options", {}))
    # an encoding option DIR's meta does not record (a build through the API) had its default
    defaults = argparse.ArgumentParser(add_help=False)
    lang_cls.add_arguments(defaults.add_argument_group())
    for name in lang_cls.option_names:
        if name not in recorded and name not in lang_cls.fit_options and name not in lang_cls.input_options:
            recorded[name] = defaults.get_default(name)
    problems = [f"--{name.replace('_', '-')}" for name in SHARED_FIT_OPTIONS if getattr(config, name) is not None]
    problems += [f"--{name.replace('_', '-')}" for name in config.language_options
                 if name in lang_cls.fit_options and f"--{name.replace('_', '-')}" not in problems]
    def differs(name: str, value) -> str | None:
        """How an encoding option differs from DIR's; a file option by its content (DIR's copy of it)."""
        if name in lang_cls.file_options and value and recorded.get(name):
            copy = Path(lang_cls.dataset_options({name: recorded[name]}, source)[name])
            if copy.is_file() and Path(value).is_file():  # the same words at another path: the same encoding
                return None if _sha256(Path(value)) == _sha256(copy) else (
                    f"--{name.replace('_', '-')} {value!r} (given) has other content than the file {source} was built "
                    f"with ({copy})")
        if not lang_cls.same_option(name, value, recorded.get(name)):
            return f"--{name.replace('_', '-')} {value!r} (given) vs {recorded.get(name)!r} ({source})"
        return None

    conflicts = [d for name, value in config.language_options.items()
                 if name not in lang_cls.fit_options and name not in lang_cls.input_options
                 and name in lang_cls.option_names and (d := differs(name, value))]
    messages = []
    if problems:
        messages.append(f"{', '.join(problems)} only shape{'s' if len(problems) == 1 else ''} the vocabulary fit, "
                        f"which --vocab-from replaces (the vocabularies are taken from {source}): drop "
                        f"{'it' if len(problems) == 1 else 'them'}, or build without --vocab-from")
    if conflicts:
        messages.append(f"--vocab-from encodes the new text exactly as {source} was encoded, but the command line "
                        f"differs from the options it was built with: {'; '.join(conflicts)}. Drop the option "
                        f"(its value is taken from {source}), or build without --vocab-from")
    if messages:
        raise BuildError(". ".join(messages))
    inputs_only = {name: config.language_options[name] for name in lang_cls.input_options
                   if name in config.language_options}
    recorded = {k: v for k, v in recorded.items() if k not in lang_cls.input_options}
    return lang_cls.dataset_options({**recorded, **inputs_only, "vocab_from": str(source)}, source)


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def work_dir_for(output: str | os.PathLike) -> Path:
    """The stable work directory of a (resumable) build of ``output``."""
    out = Path(output)
    return out.parent / (out.name + WORK_SUFFIX)


# ---------------------------------------------------------------------------------------------
# Communicators: one process, MPI ranks, or a torch.distributed group
# ---------------------------------------------------------------------------------------------
class SingleProcess:
    rank, size = 0, 1

    def barrier(self) -> None:
        pass

    def gather(self, obj: Any) -> list[Any]:
        return [obj]

    def bcast(self, obj: Any) -> Any:
        return obj


class MPIComm:
    def __init__(self) -> None:
        from mpi4py import MPI  # only under mpirun: importing it elsewhere may initialise MPI

        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()

    def barrier(self) -> None:
        # Open MPI's blocking collectives busy-poll: a rank waiting for rank 0 to merge would burn a
        # core that rank 0 needs. A non-blocking barrier polled with sleeps waits quietly.
        request = self.comm.Ibarrier()
        while not request.Test():
            time.sleep(0.01)

    def gather(self, obj: Any) -> list[Any] | None:
        self.barrier()
        return self.comm.gather(obj, root=0)

    def bcast(self, obj: Any) -> Any:
        self.barrier()
        return self.comm.bcast(obj, root=0)


class TorchComm:
    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.size = dist.get_rank(), dist.get_world_size()

    def barrier(self) -> None:
        self.dist.barrier()

    def gather(self, obj: Any) -> list[Any] | None:
        out = [None] * self.size if self.rank == 0 else None
        self.dist.gather_object(obj, out, dst=0)
        return out

    def bcast(self, obj: Any) -> Any:
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]


def launched_under_mpi() -> bool:
    size = os.environ.get("OMPI_COMM_WORLD_SIZE") or os.environ.get("PMI_SIZE")
    return size is not None and int(size) > 1


def launch_rank() -> int:
    """This process's rank as told by the launcher (0 outside MPI / torchrun)."""
    for var in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "RANK"):
        if os.environ.get(var):
            return int(os.environ[var])
    return 0


def detect_communicator():
    """MPI under mpirun, torch.distributed if a group is initialised, else a single process."""
    if launched_under_mpi():
        return MPIComm()
    if "torch" in sys.modules:  # never import torch just to find out
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return TorchComm()
    return SingleProcess()


def _agree(comm, error: str | None) -> str | None:
    """Collective: every rank learns whether any rank failed (so no rank waits forever in a collective)."""
    errors = comm.gather(error)
    summary = None
    if comm.rank == 0:
        bad = [f"rank {r}: {e}" for r, e in enumerate(errors) if e]
        summary = "\n".join(bad) if bad else None
    return comm.bcast(summary)


# Settings each rank may choose for itself: its machine's pool size and whether it shows progress bars.
_PER_RANK_SETTINGS = ("workers", "progress")


def _flag(key: str) -> str:
    return {"language": "--lang", "inputs": "--input", "input_files": "the files --input resolves to"}.get(
        key, "--" + key.replace("_", "-"))


def _describe_difference(key: str, mine: Any, theirs: Any) -> str:
    if key == "input_files" and isinstance(mine, list) and isinstance(theirs, list):
        extra = sorted(set(theirs) - set(mine))
        gone = sorted(set(mine) - set(theirs))
        parts = ([f"sees {len(extra)} file(s) rank 0 does not ({extra[0]}{', ...' if len(extra) > 1 else ''})"] if extra
                 else []) + ([f"does not see {len(gone)} file(s) of rank 0 ({gone[0]}{', ...' if len(gone) > 1 else ''})"]
                             if gone else [])
        return "; ".join(parts) or "lists the same files in another order"
    if key == "language_options" and isinstance(mine, dict) and isinstance(theirs, dict):
        keys = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        return ", ".join(f"--{k.replace('_', '-')} {theirs.get(k)!r} (rank 0: {mine.get(k)!r})" for k in keys)
    return f"{theirs!r} (rank 0: {mine!r})"


def checked_language(config: BuildConfig) -> Language:
    """The build's options checked (``BuildConfig.validate``, the language's own) and its plugin:
    cheap, before any work."""
    config.validate()
    lang_cls = get_language(config.language)
    options = (vocab_from_options(config, lang_cls) if config.vocab_from
               else config.language_plugin_options(lang_cls))
    lang = lang_cls(options)
    lang.check_build_options()
    return lang


def preflight(config: BuildConfig) -> None:
    """What the command line checks before it opens the build's log next to DIR (a refused build must
    not write into the log of the dataset already there, nor leave a log for nothing): the output,
    the options, the input paths."""
    check_output(config)
    out = Path(config.output)
    if out.exists() and not config.overwrite:
        raise _output_exists(out, config.resume)
    if config.inputs:  # a missing path or an empty glob (the build resolves them again, on every rank): named
        inp.resolve_inputs(config.inputs, config.text_mode, config.text_field)  # before the tools (lmplz) it would need
    checked_language(config)


def _agree_on_settings(comm, config: BuildConfig) -> tuple[Language, list[inp.InputSpec]]:
    """Every rank checks its own command line, then all ranks compare settings with rank 0: before any work.

    Each rank reads the inputs and owns the shards k % K == rank, so a rank started with another
    --shard-documents or --input would silently write other shards (documents lost or doubled), and one
    with another --output would wait forever for the rest. The MPI command line must be the same on
    every rank; only --workers (and progress bars) may differ per machine.
    """
    repeated: list[str] = []

    def local():
        lang = checked_language(config)
        try:
            specs = (inp.resolve_inputs(config.inputs, config.text_mode, config.text_field, repeated) if config.inputs
                     else lang.demo_inputs())
        except inp.InputError as exc:
            if comm.size > 1:
                raise inp.InputError(f"{exc} (rank {comm.rank} of {comm.size}: every rank must see the same input "
                                     f"paths, e.g. on a filesystem all machines share)") from None
            raise
        return lang, [inp.resolve_text_mode(s) for s in specs]

    lang, specs = _collective(comm, local)
    if repeated and comm.rank == 0:  # e.g. a folder and a glob inside it: reading a file twice is never meant here
        log.warning("%d input%s named more than once (by --input's files, globs or folders) %s read once: %s%s. To "
                    "give a corpus more weight, copy it under another name", len(repeated),
                    "s" if len(repeated) > 1 else "", "are" if len(repeated) > 1 else "is",
                    ", ".join(repeated[:5]), f" and {len(repeated) - 5} more" if len(repeated) > 5 else "")
    if comm.size == 1:
        return lang, specs
    settings = {k: v for k, v in asdict(config).items() if k not in _PER_RANK_SETTINGS}
    settings["output"] = os.path.abspath(config.output)
    if config.vocab_from:
        settings["vocab_from"] = os.path.abspath(config.vocab_from)
    settings["input_files"] = [os.path.abspath(s.path) for s in specs]
    everyone = comm.gather(settings)
    problem = None
    if comm.rank == 0:
        lines = []
        for rank, theirs in enumerate(everyone):
            for key in settings:
                skip = ((key == "input_files" and theirs["inputs"] != config.inputs)  # named once, as --input
                        or (key == "inputs" and theirs["input_files"] == settings["input_files"])  # same files
                        or (key == "language_options" and theirs["language"] != config.language))
                if theirs.get(key) != settings[key] and not skip:
                    flag = "" if key == "language_options" else _flag(key) + " "  # each option names its flag
                    lines.append(f"rank {rank}: {flag}{_describe_difference(key, settings[key], theirs.get(key))}")
        if lines:
            problem = ("the ranks were started with different build settings:\n  " + "\n  ".join(lines)
                       + "\nEvery rank must run the same command (only --workers may differ per machine): fix the "
                         "mpirun command line or the per-rank script, then run again")
    problem = comm.bcast(problem)
    if problem:
        raise BuildError(problem, shared=True)
    return lang, specs


def _failure_text(exc: BaseException) -> str:
    """A rank's failure as the other ranks are told it; a full disk with what to do about it."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        text += (" (the disk is full: the work directory is kept; free space, then run the same command with "
                 "--resume)")
    return text


def _collective(comm, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on this rank, then agree with all ranks that nobody failed.

    The failing rank re-raises its own exception; the others raise a BuildError naming it.
    """
    if comm.size == 1:
        return fn()
    result, failure = None, None
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - reported to every rank, then re-raised
        failure = exc
    summary = _agree(comm, _failure_text(failure) if failure else None)
    if failure is not None:
        raise failure
    if summary:
        raise BuildError(f"another rank failed:\n{summary}", shared=True)
    return result


# ---------------------------------------------------------------------------------------------
# Small helpers: atomic files, markers
# ---------------------------------------------------------------------------------------------
def _write_atomic(path: Path, data: bytes) -> None:
    """Write-to-temp + rename: a killed process never leaves a half-written file under ``path``.

    No fsync: resume protects against killed processes (the page cache survives them); after a
    machine crash, rebuild with --overwrite.
    """
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
    except BaseException:  # a full disk, a signal: no temporary file is left behind
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _mark(path: Path, info: dict | None = None) -> None:
    _write_atomic(path, json.dumps(info or {}, sort_keys=True).encode())


def _shard_dir(work: Path, k: int) -> Path:
    return work / "shards" / f"{k:06d}"


# A shard's documents: UTF-8, separated by NUL (the reader removes NULs from every document, so
# none contains one). One encode / decode + split per shard: JSON lines cost the main process
# 0.16 s per 20 MB of English, beside the workers, and the workers as much again to parse.
# A shard's files; each is written to a temporary name and renamed, so that its presence marks a
# stage done for the shard: read (its documents), analysed (its count tables; the language's cache
# is in cache/), encoded (its train/valid datasets and statistics in one part file,
# ``format.write_part``). Four files a shard (+ the language's cache): creating a file is what
# parallel filesystems are slow at. A shard read in byte ranges (``inp.plan_ranges``: by the worker
# that analyses it) has a range file instead of its documents (unless the language reads them again):
# its ranges, and what the reading found (documents, empty ones skipped, ...).
SHARD_DOCUMENTS_FILE = "docs.txt"
SHARD_COUNTS_FILE = "counts.pkl"
SHARD_PART_FILE = "encoded.part"
SHARD_RANGE_FILE = "range.json"
WORK_FORMAT = 6  # of DIR.partial (params.json): a --resume of a work dir in another layout is refused


def read_shard_documents(shard_dir: Path) -> list[str]:
    text = (shard_dir / SHARD_DOCUMENTS_FILE).read_bytes().decode("utf-8")
    return text.split("\0") if text else []


def _write_shard_documents(shard_dir: Path, documents: list[str]) -> None:
    shard_dir.mkdir(parents=True, exist_ok=True)
    joined = "\0".join(documents)
    if joined.count("\0") != max(len(documents) - 1, 0):
        raise ValueError("internal: a document with a NUL reached a shard (the reader removes them)")
    _write_atomic(shard_dir / SHARD_DOCUMENTS_FILE, joined.encode("utf-8"))


def is_valid_document(index: np.ndarray | int, num_documents: int, num_valid: int):
    """True for the ``num_valid`` documents (of ``num_documents``) that form the valid split.

    Evenly spread over the corpus (every ~1/fraction-th document), a pure function of the global
    document index: the same for any number of workers/ranks, O(1) memory.
    """
    index = np.asarray(index, dtype=np.int64)
    return (index + 1) * num_valid // num_documents > index * num_valid // num_documents


def num_valid_documents(num_documents: int, fraction: float) -> int:
    if num_documents == 0:
        raise BuildError("the inputs hold no text: every document is empty or whitespace. Check --input (and "
                         "--text-field for JSON lines, parquet and saved datasets)")
    if num_documents < 2:
        raise BuildError(
            f"the corpus has {num_documents} non-empty document(s); a train and a valid split need at least 2. "
            f"Give more text, or --text-mode line if your documents are lines"
        )
    return min(num_documents - 1, max(1, round(num_documents * fraction)))


# ---------------------------------------------------------------------------------------------
# Checking and writing one shard's splits
# ---------------------------------------------------------------------------------------------
def check_encoded_shard(enc: EncodedShard, fine_vocab_size: int, coarse_vocab_size: int, where: str) -> None:
    """The alignment invariant for every sentence of a shard, vectorised (format.check_sentence rules)."""
    n_sent = len(enc.fine_lengths)
    problems = []
    if len(enc.coarse_lengths) != n_sent or int(enc.document_sentences.sum()) != n_sent:
        problems.append("sentence counts of fine/coarse/documents differ")
    elif n_sent:
        if enc.fine_lengths.min() <= 0 or enc.coarse_lengths.min() <= 0:
            problems.append("empty sentence (0 fine or 0 coarse tokens)")
        if int(enc.fine_lengths.sum()) != len(enc.fine) or int(enc.coarse_lengths.sum()) != len(enc.coarse):
            problems.append("sentence lengths do not add up to the token arrays")
        elif len(enc.align) != len(enc.coarse):
            problems.append(f"{len(enc.align)} alignment counts for {len(enc.coarse)} coarse tokens")
        else:
            if len(enc.align) and (enc.align.min() <= 0 or enc.align.max() > np.iinfo(fmt.ALIGN_DTYPE).max):
                problems.append("every coarse token must cover between 1 and 65535 fine tokens")
            starts = np.concatenate([[0], np.cumsum(enc.coarse_lengths)[:-1]])
            # Summed in the alignment's own dtype when no sum can overflow it (np.add.reduceat would
            # otherwise make an int64 copy of the whole stream first).
            exact = (np.issubdtype(enc.align.dtype, np.signedinteger) and len(enc.align) and int(enc.align.min()) >= 0
                     and int(enc.align.max()) * len(enc.align) <= np.iinfo(enc.align.dtype).max)
            covered = (np.add.reduceat(enc.align, starts, dtype=enc.align.dtype if exact else None)
                       if len(enc.align) else np.zeros(0))
            bad = np.nonzero(covered != enc.fine_lengths)[0]
            if len(bad):
                problems.append(f"sentence {bad[0]}: alignment covers {covered[bad[0]]} fine tokens, it has {enc.fine_lengths[bad[0]]}")
        for name, ids, size in (("fine", enc.fine, fine_vocab_size), ("coarse", enc.coarse, coarse_vocab_size)):
            if len(ids) and (ids.min() < 0 or ids.max() >= size):
                problems.append(f"{name} id out of range [0, {size}): min {ids.min()}, max {ids.max()}")
    if problems:
        raise fmt.FormatError(f"{where}: the language plugin produced an invalid encoding: " + "; ".join(problems))


def _selected_tokens(values: np.ndarray, lengths: np.ndarray, sentence_mask: np.ndarray,
                     chunk: int = 1 << 20) -> Iterator[np.ndarray]:
    """The tokens of the selected sentences (``values[np.repeat(sentence_mask, lengths)]``), in
    pieces of about ``chunk`` tokens: each run of consecutive selected sentences is one slice (a
    split's documents are long runs: the valid ones are every ~100th), short runs joined up to
    ``chunk``; no token mask, and no copy of the stream beyond the joins."""
    ends = np.cumsum(lengths, dtype=np.int64)
    edges = np.flatnonzero(np.diff(sentence_mask.astype(np.int8), prepend=np.int8(0), append=np.int8(0)))
    firsts, lasts = edges[0::2], edges[1::2]  # each run: sentences [first, last)
    pending: list[np.ndarray] = []
    size = 0
    for a, b in zip((ends[firsts] - lengths[firsts]).tolist(), ends[lasts - 1].tolist()):
        while a < b:
            take = min(b - a, chunk - size)
            pending.append(values[a:a + take])
            size += take
            a += take
            if size >= chunk:
                yield pending[0] if len(pending) == 1 else np.concatenate(pending)
                pending, size = [], 0
    if pending:
        yield pending[0] if len(pending) == 1 else np.concatenate(pending)


def write_shard_splits(shard_dir: Path, enc: EncodedShard, valid_mask: np.ndarray,
                       fine_vocab_size: int, coarse_vocab_size: int) -> dict:
    """Write the train and valid IndexedDatasets of one encoded shard and its statistics into its part
    file (``SHARD_PART_FILE``, which marks it encoded); return the statistics."""
    sentences_per_doc = enc.document_sentences
    nonempty = sentences_per_doc > 0
    stats: dict[str, Any] = {"splits": {}}
    sections: dict[tuple[str, str], tuple] = {}
    for split, doc_mask in (("train", ~valid_mask & nonempty), ("valid", valid_mask & nonempty)):
        sentence_mask = np.repeat(doc_mask, sentences_per_doc)
        fine_lengths = enc.fine_lengths[sentence_mask]
        coarse_lengths = enc.coarse_lengths[sentence_mask]
        document_indices = np.concatenate([[0], np.cumsum(sentences_per_doc[doc_mask])])
        streams = {
            "fine": (fmt.id_dtype(fine_vocab_size), enc.fine, enc.fine_lengths, fine_lengths),
            "coarse": (fmt.id_dtype(coarse_vocab_size), enc.coarse, enc.coarse_lengths, coarse_lengths),
            "align": (fmt.ALIGN_DTYPE, enc.align, enc.coarse_lengths, coarse_lengths),
        }
        for stream, (dtype, values, all_lengths, lengths) in streams.items():
            sections[(split, stream)] = (dtype, _selected_tokens(values, all_lengths, sentence_mask), lengths,
                                         document_indices)
        stats["splits"][split] = {
            "documents": int(doc_mask.sum()),
            "sentences": int(sentence_mask.sum()),
            "fine_tokens": int(fine_lengths.sum()),
            "coarse_tokens": int(coarse_lengths.sum()),
        }
    stats.update(
        documents=int(nonempty.sum()),
        empty_after_normalization=int((~nonempty).sum()),
        sentences=len(enc.fine_lengths),
        characters=int(enc.characters),
        fine_tokens=len(enc.fine),
        coarse_tokens=len(enc.coarse),
        multi_fine_coarse_tokens=int((enc.align > 1).sum()),
        fine_unk=int((enc.fine == fmt.UNK_ID).sum()),
        coarse_unk=int((enc.coarse == fmt.UNK_ID).sum()),
        extra=dict(enc.extra),
    )
    fmt.write_part(shard_dir / SHARD_PART_FILE, sections, stats)
    return stats


# ---------------------------------------------------------------------------------------------
# Worker side (runs in pool processes, or inline with --workers 1)
# ---------------------------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def detach_pool_worker() -> None:
    """In a pool worker: leave Ctrl-C and SIGTERM (also sent to the whole process group) to the main
    process, which stops the pool (``kill_pool``), and die with the main process however that ends
    (kill -9 included): no worker is left writing results into a closed pipe. Also resets handlers
    the worker inherited by fork (a SIGTERM handler of the program that called us)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def kill_pool(pool) -> None:
    """Stop a ``multiprocessing`` pool of ``detach_pool_worker`` workers at once (an error, Ctrl-C,
    SIGTERM).

    Not ``Pool.terminate()``: it first takes the task queue's read lock, which an idle worker holds
    while it waits for a task, and which a worker killed there (a signal to the whole process group)
    holds forever: the build hung. The workers ignore SIGINT/SIGTERM; here they are killed, the pool
    stops replacing them, and its own clean-up at exit is cancelled."""
    from multiprocessing.pool import TERMINATE

    pool._state = TERMINATE
    pool._worker_handler._state = TERMINATE  # no replacement workers
    pool._terminate.cancel()
    for proc in pool._pool:
        if proc.exitcode is None:
            proc.kill()
    for proc in pool._pool:
        proc.join(timeout=10)


class WorkerDied(BuildError):
    """A pool worker died (the OOM killer, a kill -9): ``multiprocessing.Pool`` replaces it, and the task it
    held never returns, so waiting for its result hung the build forever."""


def pool_pids(pool) -> frozenset[int]:
    return frozenset(p.pid for p in pool._pool)


def check_pool_alive(pool, pids: frozenset[int], fix: str) -> None:
    """Raise WorkerDied if a worker of ``pool`` (started as ``pids``; its workers never exit on their own)
    has died or been replaced. ``fix``: what to do next (a build: --resume)."""
    dead = [p for p in pool._pool if p.exitcode is not None]
    if not dead and pool_pids(pool) == pids:
        return
    import signal

    code = dead[0].exitcode if dead else None
    if code is not None and code > 0:
        how = f"exit code {code}: it failed, e.g. while loading the segmenter or the vocabularies; its error is above"
    else:
        try:
            name = signal.Signals(-code).name if code is not None else None
        except ValueError:  # a real-time signal has no name
            name = f"signal {-code}"
        how = (f"killed by {name}" if name else "gone, replaced by a new one") + \
            "; out of memory? see `dmesg` or the job's memory limit"
    raise WorkerDied(f"a worker process died ({how}), and the task it held is lost. {fix}")


def wait_result(pool, result, pids: frozenset[int], fix: str, poll: float = 0.5):
    """``result.get()`` of a pool's AsyncResult, checking every ``poll`` seconds that no worker died."""
    while not result.ready():
        result.wait(poll)
        if not result.ready():
            check_pool_alive(pool, pids, fix)
    return result.get()


RESUME_AFTER_WORKER_DIED = ("The work finished so far is kept: run the same command with --resume (with fewer "
                            "--workers, or a larger memory limit, if memory ran out)")


def _pool_worker_init(language: str, options: dict, barrier=None) -> None:
    detach_pool_worker()
    keep_freed_memory()
    _worker_init(language, options, warm_up=True)
    _WORKER["barrier"] = barrier


def keep_freed_memory() -> None:
    """glibc malloc: arrays up to 32 MB from the heap, and freed heap memory kept for the next shard
    (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD). By default every large NumPy temporary is a fresh mmap whose
    pages fault in one by one and are returned on free: ~120k page faults and a quarter of the Chinese
    encoding's time in the kernel (22 MB of text); with this, ~16k and the encoding 20-30% faster.
    The process keeps its peak heap (one shard's working set) until it exits: the memory benchmark's
    peaks rise by 3-9% (tests/bench/bench_data_prep_memory.py). A process-wide setting, so only for
    processes the build owns: the pool workers, and the command line's process (data_prep/build.py,
    whose --workers 1 build runs inline), not a program that calls ``build()``. No-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return
    mallopt(ctypes.c_int(-3), ctypes.c_int(32 << 20))  # M_MMAP_THRESHOLD (glibc's maximum on 64-bit)
    mallopt(ctypes.c_int(-1), ctypes.c_int(1 << 30))  # M_TRIM_THRESHOLD


def _worker_init(language: str, options: dict, warm_up: bool = False) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _WORKER.clear()
    _WORKER["lang"] = get_language(language)(options)
    _WORKER["loaded"] = None
    if warm_up:  # a pool worker: overlaps the main process reading the first shard
        try:
            _WORKER["lang"].warm_up()
        except Exception:  # noqa: BLE001 - raised again by the first task, which reports it
            pass


class _NoCyclicGC:
    """Tasks allocate millions of short-lived objects and create no reference cycles: the cyclic
    collector would only rescan the (large, imported) heap again and again. Refcounting frees all."""

    def __enter__(self):
        self.was_enabled = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc):
        if self.was_enabled:
            gc.enable()


def _analyze_task(task: str | tuple[str, list[str]]) -> tuple[str, int]:
    with _NoCyclicGC():
        return _analyze(task)


def _read_range_task(task: tuple) -> tuple[str, int]:
    """Read a shard's byte ranges of the inputs (``inp.plan_ranges``) and analyse its documents: the
    pool workers read the text themselves, the main process none of it. The shard's range file (its
    ranges and what the reading found) is written before its counts, so counts mean the range file is
    there; counts from other ranges (a shard of another plan) are not taken."""
    shard_dir, segments, encoding_errors, max_document_chars, keep_documents = task
    shard = Path(shard_dir)
    size = sum(end - start for _, start, end, _ in segments)
    with _NoCyclicGC():
        if (shard / SHARD_COUNTS_FILE).exists():
            try:
                if _work_json(shard / SHARD_RANGE_FILE)["segments"] == [list(s) for s in segments]:
                    return shard_dir, size
            except (OSError, ValueError, KeyError, TypeError):
                pass
            (shard / SHARD_COUNTS_FILE).unlink()
        counters = inp.ReadCounters()
        documents = [d for batch in inp.iter_range_batches(segments, encoding_errors, max_document_chars, counters)
                     for d in batch]
        shard.mkdir(parents=True, exist_ok=True)
        if keep_documents:  # (rewritten: a copy left beside counts of other ranges is not these documents)
            _write_shard_documents(shard, documents)
        info = {"segments": segments, "documents": len(documents), "empty_documents": counters.empty_documents,
                "nul_bytes_removed": counters.nul_bytes_removed, "long_documents_cut": counters.split_long_documents}
        _write_atomic(shard / SHARD_RANGE_FILE, json.dumps(info).encode())
        return _analyze((shard_dir, documents, size))


def _range_summary(work: Path, num_shards: int) -> dict:
    """The read summary of a build read in byte ranges, from every shard's range file (each rank's
    shards: read once every rank has analysed its own)."""
    infos = []
    for k in range(num_shards):
        path = _shard_dir(work, k) / SHARD_RANGE_FILE
        try:
            infos.append(_work_json(path))
        except OSError:
            raise BuildError(f"internal: {path} is missing after its shard was analysed") from None
    documents = [info["documents"] for info in infos]
    return {"num_documents": sum(documents), "num_shards": num_shards,
            "shard_starts": list(accumulate([0] + documents[:-1])),
            "empty_documents_skipped": sum(info["empty_documents"] for info in infos),
            "nul_bytes_removed": sum(info["nul_bytes_removed"] for info in infos),
            "long_documents_cut": sum(info["long_documents_cut"] for info in infos)}


def _encode_task(args: tuple) -> str:
    with _NoCyclicGC():
        return _encode(args)


def _analyze(task: str | tuple) -> tuple[str, int]:
    """Analyse a shard: ``task`` is its directory, or (its directory, its documents) when the caller
    holds them (--workers 1: the documents just written are not read back), or (its directory, its
    documents, their bytes) when no file of them was written."""
    shard_dir, documents, *known_bytes = (task, None) if isinstance(task, str) else task
    shard = Path(shard_dir)
    if (shard / SHARD_COUNTS_FILE).exists():
        return shard_dir, known_bytes[0] if known_bytes else 0
    if documents is None:
        documents = read_shard_documents(shard)
    cache = shard / "cache"
    if cache.exists():
        shutil.rmtree(cache)  # left by a killed run
    cache.mkdir(parents=True)
    counts = _WORKER["lang"].analyze_shard(documents, cache)
    _WORKER.setdefault("analysed", []).append(shard_dir)  # in the language's counts_so_far() from now on
    tables = {k: v if isinstance(v, PackedCounter) else PackedCounter.pack(v if isinstance(v, Counter) else Counter(v))
              for k, v in counts.items()}
    _write_atomic(shard / SHARD_COUNTS_FILE, pickle.dumps(tables, protocol=4))
    if known_bytes:
        return shard_dir, known_bytes[0]
    # the documents' UTF-8 bytes (the progress bar's unit): the file holds them joined by NUL bytes
    return shard_dir, (shard / SHARD_DOCUMENTS_FILE).stat().st_size - max(len(documents) - 1, 0)


def _encode(args: tuple) -> str:
    shard_dir, artifacts, first_document, expected, num_documents, num_valid, fine_size, coarse_size, drop_cache = args
    shard = Path(shard_dir)
    if (shard / SHARD_PART_FILE).exists():
        return shard_dir
    lang: Language = _WORKER["lang"]
    if _WORKER["loaded"] != artifacts:
        lang.load(Path(artifacts))
        _WORKER["loaded"] = artifacts
    enc = lang.encode_shard(shard / "cache")
    if enc.num_documents != expected:
        raise fmt.FormatError(f"{shard}: the language plugin encoded {enc.num_documents} documents, the shard has {expected}")
    check_encoded_shard(enc, fine_size, coarse_size, str(shard))
    valid = is_valid_document(first_document + np.arange(enc.num_documents), num_documents, num_valid)
    write_shard_splits(shard, enc, valid, fine_size, coarse_size)
    if drop_cache:  # the part is the shard's result from now on (--resume skips the shard)
        shutil.rmtree(shard / "cache", ignore_errors=True)
    return shard_dir


def _run_pass(executor: _Executor, fn: Callable, dirs: list[Path], arg: Any, add: bool, scratch: Path) -> tuple:
    """This rank's part of a corpus pass: ("ok", result) or ("error", message), never an exception (a
    rank that raised would leave the others waiting in the gather)."""
    try:
        scratch.mkdir(parents=True, exist_ok=True)
        return "ok", executor.map_shards(fn, dirs, arg, scratch, add)
    except Exception as exc:  # noqa: BLE001 - reported to rank 0, which raises it for everyone
        log.exception("a corpus pass failed on this rank")
        return "error", _failure_text(exc)


def _corpus_pass(comm, executor: _Executor, fn: Callable, dirs: list[Path], arg: Any, add: bool, scratch: Path):
    """``Corpus.map_shards`` / ``sum_shards`` of the fit (rank 0) over EVERY rank's workers: shard k
    is read by rank k % size (the work directory is shared, as for the merge); rank 0 gets the sum
    (``add``) or the results in shard order."""
    comm.bcast((fn, [str(d) for d in dirs], arg, add))
    results = comm.gather(_run_pass(executor, fn, dirs[0::comm.size], arg, add, scratch))
    failed = [f"rank {r}: {message}" for r, (status, message) in enumerate(results) if status != "ok"]
    if failed:
        raise BuildError("a corpus pass of the fit failed:\n" + "\n".join(failed))
    if add:
        return sum_counters([result for _, result in results])
    ordered: list = [None] * len(dirs)
    for r, (_, result) in enumerate(results):
        ordered[r::comm.size] = result
    return ordered


def _serve_corpus_passes(comm, executor: _Executor, scratch: Path) -> None:
    """Ranks other than 0, during the fit: run each corpus pass rank 0 broadcasts on this rank's
    shards and workers, until rank 0 broadcasts None."""
    try:
        while (request := comm.bcast(None)) is not None:
            fn, dirs, arg, add = request
            comm.gather(_run_pass(executor, fn, [Path(d) for d in dirs[comm.rank::comm.size]], arg, add, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _map_task(task: tuple) -> Any:
    """Shards of ``Corpus.map_shards``: ``fn(cache_dir, arg)`` for each, ``arg`` loaded once per worker;
    with ``add`` the results (Counters) are summed here, so the main process sums one per worker."""
    fn, cache_dirs, arg_path, add = task
    key = ("map_arg", arg_path)
    if key not in _WORKER:
        for k in [k for k in _WORKER if isinstance(k, tuple) and k[0] == "map_arg"]:
            del _WORKER[k]
        with open(arg_path, "rb") as fh:
            _WORKER[key] = pickle.load(fh)
    with _NoCyclicGC():
        results = [fn(Path(d), _WORKER[key]) for d in cache_dirs]
    return sum_counters(results) if add else results


class _Executor:
    """Runs tasks inline (--workers 1) or on a process pool, results in completion order."""

    def __init__(self, workers: int, language: str, options: dict):
        self.pool = None
        if workers > 1:
            # fork: workers start in milliseconds and inherit the imported modules. The pool is made
            # before any input is read, so no reader thread (pyarrow, tqdm) exists at fork time.
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            if method == "fork":
                try:
                    get_language(language)(options).before_fork()
                except Exception:  # noqa: BLE001 - raised again by the workers' first task, which reports it
                    pass
            context = mp.get_context(method)
            self.pool = context.Pool(workers, initializer=_pool_worker_init, initargs=(language, options, context.Barrier(workers)))
            self.pids = pool_pids(self.pool)
        else:
            _worker_init(language, options)
        self.pending: list = []

    def submit(self, fn: Callable, arg: Any) -> None:
        if self.pool is None:
            self.pending.append(("done", fn(arg)))
        else:
            self.pending.append(("async", self.pool.apply_async(fn, (arg,))))

    def ready(self, wait: bool = False) -> Iterator[Any]:
        """Results of finished tasks (all of them, in submission order, when ``wait``)."""
        keep = []
        for kind, item in self.pending:
            if kind == "done":
                yield item
            elif wait or item.ready():
                yield self._get(item)
            else:
                keep.append((kind, item))
        self.pending = keep

    def wait_first(self, timeout: float) -> None:
        """Wait until the oldest pending task is done (at most ``timeout`` seconds)."""
        for kind, item in self.pending:
            if kind == "async":
                item.wait(timeout)
                if not item.ready():
                    check_pool_alive(self.pool, self.pids, RESUME_AFTER_WORKER_DIED)
            return

    def _get(self, result):
        return wait_result(self.pool, result, self.pids, RESUME_AFTER_WORKER_DIED)

    def map(self, fn: Callable, args: list) -> list:
        """[fn(a) for a in args], on the pool's workers when there is one (results in order)."""
        if self.pool is None:
            return [fn(a) for a in args]
        return self._get(self.pool.map_async(fn, args, chunksize=1))

    def map_shards(self, fn: Callable, cache_dirs: list[Path], arg: Any, scratch: Path, add: bool = False):
        """``Corpus.map_shards`` / ``Corpus.sum_shards`` on this executor (inline with one worker)."""
        if self.pool is None:
            with _NoCyclicGC():
                results = [fn(d, arg) for d in cache_dirs]
            return sum_counters(results) if add else results
        self._maps = getattr(self, "_maps", 0) + 1
        arg_path = scratch / f"map_arg_{self._maps}.pkl"
        arg_path.write_bytes(pickle.dumps(arg, protocol=4))
        try:
            if add:  # one task per worker (shards dealt round-robin), each returns its sum
                n = self.pool._processes
                tasks = [(fn, [str(d) for d in cache_dirs[i::n]], str(arg_path), True) for i in range(n)]
                return sum_counters(self._get(self.pool.map_async(_map_task, tasks, chunksize=1)))
            tasks = [(fn, [str(d)], str(arg_path), False) for d in cache_dirs]
            return [r for rs in self._get(self.pool.map_async(_map_task, tasks, chunksize=1)) for r in rs]
        finally:
            arg_path.unlink(missing_ok=True)

    def sum_counts(self, shard_dirs: list[str]) -> dict[str, Counter]:
        """The shards' count tables summed key by key: each worker's sum of the shards it analysed
        (kept by the language as it went, ``_counts_kept_here``), plus the tables of the other shards
        (analysed before a --resume, or by a language that keeps none) read back on the workers,
        dealt round-robin. The sum is the same either way (its key order may differ)."""
        if self.pool is None:
            kept = [_counts_kept_here()]
        else:
            kept = self._get(self.pool.map_async(_counts_kept_here, range(self.pool._processes), chunksize=1))
        tables, done, pids = [], set(), set()
        for pid, analysed, counts in kept:
            if counts is not None and pid not in pids and done.isdisjoint(analysed) and set(analysed) <= set(shard_dirs):
                pids.add(pid)
                done.update(analysed)
                tables.append(counts)
        rest = [d for d in shard_dirs if d not in done]
        if rest and self.pool is None:
            tables.append(_sum_shard_counts(rest))
        elif rest:
            n = self.pool._processes
            tables += self._get(self.pool.map_async(_sum_shard_counts, [rest[i::n] for i in range(n)], chunksize=1))
        return _sum_count_tables(tables)

    def close(self, join: bool = True) -> None:
        """No more tasks: the workers exit once idle. ``join`` waits for that (``Pool.join``: the
        workers' exit, and up to 0.1 s of the pool's handler thread polling): the build leaves it
        until after its merge."""
        if self.pool is not None:
            self.pool.close()
            if join:
                self.pool.join()
                self.pool = None

    def terminate(self) -> None:
        """Stop the pool at once (an error, Ctrl-C, SIGTERM): ``kill_pool``."""
        pool, self.pool = self.pool, None
        if pool is not None:
            kill_pool(pool)


def _progress(enabled: bool, **kwargs):
    """A tqdm bar (rate, ETA) on stderr; in a log file (not a terminal) one line every 15 s."""
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(disable=not enabled, dynamic_ncols=interactive, mininterval=0.5 if interactive else 15.0,
                file=sys.stderr, **kwargs)


# ---------------------------------------------------------------------------------------------
# The build
# ---------------------------------------------------------------------------------------------
def _package_versions(lang: Language) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("numpy", "megatron-core", "pyarrow", "datasets", "ambert-pipeline"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    out.update(lang.package_versions())
    return out


def _scan_or_error(spec: inp.InputSpec) -> tuple[inp.InputScan | None, Exception | None]:
    """``scan_input`` on a pool worker: its InputError returned, so the first input's is raised."""
    try:
        return inp.scan_input(spec), None
    except inp.InputError as exc:
        return None, exc


def _digest_on_worker(spec: inp.InputSpec) -> tuple[str, int]:
    return inp.stored_digest(spec)


def _stored_size(spec: inp.InputSpec) -> int:
    try:
        return sum(f.stat().st_size for f in inp._data_files(spec))
    except OSError:
        return 0


def _map_inputs(fn: Callable, specs: list[inp.InputSpec], executor: _Executor | None) -> list:
    """[fn(spec) for spec in specs], on the executor's workers when there are several inputs (the
    largest first, so that the last to finish is a small one); results in the inputs' order."""
    if executor is None or executor.pool is None or len(specs) < 2:
        return [fn(spec) for spec in specs]
    order = sorted(range(len(specs)), key=lambda i: -_stored_size(specs[i]))
    results = executor.map(fn, [specs[i] for i in order])
    out: list = [None] * len(specs)
    for i, result in zip(order, results):
        out[i] = result
    return out


def _check_inputs(config: BuildConfig, lang: Language, specs: list[inp.InputSpec],
                  executor: _Executor | None = None) -> tuple[list[dict], list[str]]:
    """Stage 1: everything cheap that can fail, before any expensive work.

    First the head of every input (format, text field, language: seconds), then one pass over the
    bytes of every input (sha256, NUL bytes, UTF-8 validity: ~1 GB/s; on the pool's workers, an input
    each, when there are several: the workers are idle until the analysis).
    """
    pooled: list[str] = []  # the samples, pooled up to one sample's size: many small files are judged together
    pooled_chars = 0
    for spec in specs:
        try:
            sample = inp.sample_text(spec, encoding_errors=config.encoding_errors)  # raises on a missing field
        except UnicodeDecodeError:
            continue  # the byte scan below reports it with the offset and the fix
        problem = inp.mostly_undecodable(spec) if config.encoding_errors == "replace" else None
        if problem:  # another encoding read with --encoding-errors replace: said as such, not blamed on --lang
            raise inp.InputError(problem)
        if not config.skip_language_check and sample:
            problem = lang.check_sample(sample, spec.path)
            if problem:
                raise LanguageError(problem.rstrip(". ") + ", or pass --skip-language-check if this is intended")
            if pooled_chars < inp.SAMPLE_CHARS:
                pooled.append(sample[: inp.SAMPLE_CHARS - pooled_chars])
                pooled_chars += len(pooled[-1])
    if len(pooled) > 1:  # each file may be too short to judge alone (a folder of small files)
        problem = lang.check_sample("\n".join(pooled), f"the start of the {len(pooled)} inputs taken together")
        if problem:
            raise LanguageError(problem.rstrip(". ") + ", or pass --skip-language-check if this is intended")
    warnings: list[str] = []
    records = []
    for spec, (scan, error) in zip(specs, _map_inputs(_scan_or_error, specs, executor)):
        if error is not None:
            raise error
        warnings += inp.check_scan(scan, config.encoding_errors)
        record = {"path": spec.path, "kind": spec.kind, "sha256": scan.sha256, "bytes": scan.bytes,
                  "content_bytes": scan.content_bytes}
        if spec.kind == "text":
            record["text_mode"] = spec.text_mode
        if inp.reads_in_ranges(spec):  # (how its shards are cut: ``inp.plan_ranges``)
            record.update(characters=scan.characters, lines=scan.lines)
        records.append(record)
    if all(r["bytes"] == 0 for r in records):
        raise inp.InputError("every input is empty: " + ", ".join(r["path"] for r in records))
    return records, warnings


def _remove_dead_partials(out: Path) -> None:
    """Remove ``DIR.partial-<pid>`` merge directories left by killed builds (their pid is gone)."""
    for stale in out.parent.glob(out.name + ".partial-*"):
        try:
            pid = int(stale.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


def check_output(config: BuildConfig) -> None:
    """--output must not be a file, an input, a folder holding an input, or inside an input folder;
    --overwrite replaces only an empty folder or a data_prep dataset holding nothing else (``fmt.not_replaceable``)."""
    out = Path(config.output)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--output {out} is an existing file, not a dataset directory; choose another --output")
    target = out.resolve()
    matched = []  # the paths given, and the files and folders a glob matches (a folder is read like one given)
    for pattern in config.inputs or []:
        if Path(pattern).exists():
            matched.append(pattern)
        elif glob.has_magic(pattern):  # missing paths are reported with the inputs
            matched += sorted(glob.glob(pattern, recursive=True))
    for pattern in matched:
        path = Path(pattern).resolve()
        if path == target or target in path.parents:
            raise inp.InputError(f"--output {out} is, or contains, the input {pattern}: the build would replace it. "
                                 f"Choose an --output outside the inputs")
        if path.is_dir() and path in target.parents:
            raise inp.InputError(f"--output {out} is inside the input folder {pattern}: the dataset and its build log "
                                 f"would be read as input by the next build from that folder. Choose an --output "
                                 f"outside it")
    why = fmt.not_replaceable(out) if config.overwrite else None
    if why:
        raise FileExistsError(f"--output {out} exists and {why}: --overwrite only replaces an empty folder or a "
                              f"dataset built by data_prep that holds nothing else. Choose another --output, or move "
                              f"what you want to keep out of {out} (or remove {out} yourself)")


FINE_OOV_WARNING = 0.05
COARSE_OOV_WARNING = 0.10


def _oov_warnings(stats: dict, fine_size: int, coarse_size: int, vocab_from: str | None = None,
                  coarse_cap: int | None = None) -> list[str]:
    """Warnings (logged, and in meta.json) for a dataset whose vocabularies do not fit its text: a build
    with 100% fine [UNK] (a sentencepiece .vocab given as --fine-tokenizer) ended with exit 0 and none.
    The advice fits the build: under --vocab-from the size options are refused, and a larger
    --coarse-vocab-size changes nothing when the vocabulary stayed below it."""
    out = []
    fine, coarse = stats.get("fine_oov_rate") or 0.0, stats.get("coarse_oov_rate") or 0.0
    refit = (f"the vocabularies of --vocab-from {vocab_from} do not fit this text (another language, domain or "
             f"casing?): build without --vocab-from to fit new ones" if vocab_from else None)
    if fine > FINE_OOV_WARNING:
        out.append(f"{100 * fine:.1f}% of the fine tokens are [UNK] (fine vocabulary: {fine_size:,} entries): "
                   + (refit or "it does not fit this text (a --fine-tokenizer for other text, or casing? "
                                "--fine-vocab-size too small?)"))
    if coarse > COARSE_OOV_WARNING:
        if refit:
            advice = refit
        elif coarse_cap is not None and coarse_size < coarse_cap:
            advice = (f"it stayed below --coarse-vocab-size {coarse_cap:,}, so only a lower --coarse-min-count (or more "
                      f"text) adds entries")
        else:
            advice = "raise --coarse-vocab-size or lower --coarse-min-count"
        out.append(f"{100 * coarse:.1f}% of the coarse tokens are [UNK] (coarse vocabulary: {coarse_size:,} entries): "
                   f"{advice}")
    for w in out:
        log.warning(w)
    return out


def _output_exists(out: Path, resume: bool) -> FileExistsError:
    if resume and (out / fmt.META_FILE).is_file():  # e.g. a requeued job whose build had finished
        work = work_dir_for(out)
        holder = fmt.running_build(out)  # this build's own lock, or another build (its work: not to be removed)
        left = ""
        if work.is_dir() and (not holder or holder.startswith(f"pid {os.getpid()} ")):
            if not _work_encoded_every_shard(work):  # only an --overwrite build of DIR can leave one beside DIR
                return FileExistsError(
                    f"output directory {out} already exists and is complete (it has {fmt.META_FILE}); {work} beside it "
                    f"is an --overwrite build of it that was interrupted ({work_progress(work)}): continue it with "
                    f"--overwrite --resume (it replaces {out} once it is complete), or keep {out} as it is and remove "
                    f"the unfinished one, `rm -rf {work}`")
            left = f" ({work} is left from a build killed just after it renamed {out} into place: remove it, `rm -rf {work}`)"
        return FileExistsError(
            f"output directory {out} already exists and is complete (it has {fmt.META_FILE}): there is nothing to "
            f"--resume{left}. Use it as it is, pass --overwrite without --resume to build it again, or choose another "
            f"--output"
        )
    return FileExistsError(
        f"output directory {out} already exists; pass --overwrite to replace it (only once the new build "
        f"is complete) or choose another --output"
    )


def _resume_difference(key: str, then: Any, now: Any) -> str:
    """One changed build parameter of a refused --resume: the option, then and now."""
    if key == "language_options" and isinstance(then, dict) and isinstance(now, dict):
        return "; ".join(f"--{k.replace('_', '-')} {then.get(k)!r} then, {now.get(k)!r} now"
                         for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k))
    if key == "option_files" and then is None:
        return (f"the content of {', '.join('--' + k.replace('_', '-') for k in sorted(now or {}))} was not recorded "
                f"then: the work of an older data_prep, which --overwrite without --resume replaces")
    if key == "option_files" and isinstance(then, dict) and isinstance(now, dict):
        return "; ".join(f"the file of --{k.replace('_', '-')} has other content (sha256 {str(then.get(k))[:12]} "
                         f"then, {str(now.get(k))[:12]} now)" for k in sorted(set(then) | set(now))
                         if then.get(k) != now.get(k))
    if key == "inputs" and isinstance(then, list) and isinstance(now, list):
        def listed(records: list) -> str:
            paths = [str(r.get("path")) if isinstance(r, dict) else str(r) for r in records]
            return ", ".join(paths[:3]) + (f", ... ({len(paths)} files)" if len(paths) > 3 else "")

        return f"--input {listed(then)} then, {listed(now)} now"
    return f"{_flag(key)} {then!r} then, {now!r} now"


def _prepare_work_dir(config: BuildConfig, params: dict) -> Path:
    out = Path(config.output)
    work = work_dir_for(out)
    shutil.rmtree(_trash_of(work), ignore_errors=True)  # what a build killed while removing its work left
    if out.exists() and not config.overwrite:
        raise _output_exists(out, config.resume)
    if work.exists():
        if config.resume:
            try:
                recorded = json.loads((work / PARAMS_FILE).read_text())
                if not isinstance(recorded, dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError) as exc:
                raise BuildError(
                    f"cannot resume: {work / PARAMS_FILE} (the interrupted build's parameters) is missing or damaged "
                    f"({type(exc).__name__}), so what it started cannot be checked; pass --overwrite without --resume "
                    f"to start over") from None
            if config.shard_characters is None and "shard_characters" in recorded:
                # the default size follows the workers; the shards already cut keep theirs
                params["shard_characters"] = recorded["shard_characters"]
            if recorded != params:
                diff = sorted(k for k in set(params) | set(recorded or {}) if (recorded or {}).get(k) != params.get(k))
                if "inputs" in diff and config.shard_characters is None and "shard_characters" in diff:
                    diff.remove("shard_characters")  # computed from the inputs' size: not an option the user gave
                if recorded is not None and recorded.get("work_format") != WORK_FORMAT:
                    raise BuildError(
                        f"cannot resume: {work} was started by another version of data_prep (work files in format "
                        f"{recorded.get('work_format', 1)}, this version writes {WORK_FORMAT}); pass --overwrite "
                        f"without --resume to start over"
                    )
                if (diff == ["inputs"] and recorded is not None
                        and [r["path"] for r in recorded["inputs"]] != [r["path"] for r in params["inputs"]]
                        and [(os.path.abspath(r["path"]), r["sha256"]) for r in recorded["inputs"]]
                        == [(os.path.abspath(r["path"]), r["sha256"]) for r in params["inputs"]]):
                    raise BuildError(
                        f"cannot resume: the inputs are the same files, but spelled differently than when the "
                        f"interrupted build started ({', '.join(r['path'] for r in recorded['inputs'][:3])}"
                        f"{', ...' if len(recorded['inputs']) > 3 else ''}): rerun with that spelling of --input "
                        f"(the dataset records it)"
                    )
                if diff == ["inputs"] and recorded is not None and [r["path"] for r in recorded["inputs"]] == [
                        r["path"] for r in params["inputs"]]:
                    changed = [r["path"] for r, o in zip(params["inputs"], recorded["inputs"]) if r["sha256"] != o["sha256"]]
                    if not changed:  # the same content, recorded otherwise (e.g. content_bytes, by an older data_prep)
                        raise BuildError(
                            f"cannot resume: {work} was started by another version of data_prep, which recorded the "
                            f"(unchanged) inputs differently; pass --overwrite without --resume to start over")
                    raise BuildError(
                        f"cannot resume: input(s) changed since the interrupted build started ({', '.join(changed[:3])}"
                        f"{', ...' if len(changed) > 3 else ''}: other content); pass --overwrite without --resume to "
                        f"start over on the new content"
                    )
                raise BuildError(
                    f"cannot resume: {work} was started with other build parameters "
                    f"({'; '.join(_resume_difference(k, recorded.get(k), params.get(k)) for k in diff) or 'unknown'}); "
                    f"rerun with the original command, or pass --overwrite without --resume to start over"
                )
            log.info("resuming the interrupted build in %s: %s", work, work_progress(work))
            _remove_dead_partials(out)
            return work
        if not config.overwrite:
            raise BuildError(
                f"{work} holds an unfinished build of {out} (interrupted?). Pass --resume to continue it, or "
                f"--overwrite to discard it and start over"
            )
        shutil.rmtree(work)
    work.mkdir(parents=True)
    _write_atomic(work / PARAMS_FILE, json.dumps(params, indent=2, sort_keys=True).encode())
    return work


def _size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _human(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def no_space_message(config, exc: OSError) -> str:
    """A full disk (or quota) while building: where, what is kept for --resume, how much is needed."""
    work = work_dir_for(config.output)
    what = "the disk quota is exceeded" if exc.errno == errno.EDQUOT else "no space left on the device"
    try:
        free = f"{_human(shutil.disk_usage(work if work.is_dir() else work.parent).free)} free there now"
    except OSError:
        free = "free space unknown"
    kept = (f"{work} holds what the build has done so far ({_human(_size(work))}): {work_progress(work)}"
            if work.is_dir() else "nothing was kept")
    return (f"{what} while writing {exc.filename or 'a file of the build'} ({free}). {kept}. Free space, or "
            f"move {work.name} to a larger filesystem together with --output (the work directory sits next to it), "
            f"then run the same command with --resume. A build needs about 5x its input's size in the work "
            f"directory while it runs (the shards' text, segmentation caches and datasets) and about 2x more for "
            f"the dataset at the end")


def _work_encoded_every_shard(work: Path) -> bool:
    """The build in ``work`` read its corpus, fitted and encoded every shard (what is left of one
    killed after it renamed its dataset into place)."""
    try:
        total = json.loads((work / READ_FILE).read_text())["num_shards"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return (work / "fit.done").exists() and sum((d / SHARD_PART_FILE).exists() for d in work.glob("shards/*/")) == total


def work_progress(work: Path) -> str:
    """What an unfinished build in ``work`` has done (for --resume and interruption messages)."""
    shards = sorted(work.glob("shards/*/"))
    if not shards:
        return "nothing finished yet"

    def count(marker: str) -> int:
        return sum((d / marker).exists() for d in shards)

    try:
        total = json.loads((work / READ_FILE).read_text())["num_shards"]
        read = True
    except (OSError, ValueError, KeyError, TypeError):
        total, read = None, False
    of = f" of {total}" if total is not None else ""
    written = sum((d / SHARD_DOCUMENTS_FILE).exists() or (d / SHARD_COUNTS_FILE).exists() for d in shards)
    parts = [f"corpus read into {total} shards" if read else f"{written} shard(s) written",
             f"{count(SHARD_COUNTS_FILE)}{of} analysed"]
    if (work / "fit.done").exists():
        parts += ["vocabularies fitted", f"{count(SHARD_PART_FILE)}{of} encoded"]
    return ", ".join(parts) + " (kept; --resume reuses them)"


def _option_file_digests(lang: Language, options: dict) -> dict[str, str]:
    """sha256 of the files options name whose content shapes the output (``Language.file_options``)."""
    return {name: _sha256(Path(options[name])) for name in lang.file_options
            if options.get(name) and Path(options[name]).is_file()}


def _check_shared_work_dir(comm, work: Path, params: dict, digests: list[tuple[str, int]] | None = None,
                           option_files: dict[str, str] | None = None) -> None:
    """Every rank must see the work directory rank 0 just prepared (shards are exchanged through it),
    and read the same bytes at every input path as rank 0 (``digests``: this rank's (sha256, size)),
    and in every file an option names (``option_files``: this rank's, e.g. its --user-dict)."""
    import socket

    for name, sha in sorted((option_files or {}).items()):
        if sha != params.get("option_files", {}).get(name):
            raise BuildError(
                f"rank {comm.rank} (host {socket.gethostname()}) reads other content in its --{name.replace('_', '-')} "
                f"file than rank 0 (sha256 {sha[:12]}... against {str(params.get('option_files', {}).get(name))[:12]}...): "
                f"every rank must read the same file (a stale node-local copy?); put it on a filesystem all ranks "
                f"share, or make the copies identical"
            )

    for record, (sha, size) in zip(params.get("inputs", []), digests or []):
        if sha != record["sha256"]:
            raise BuildError(
                f"rank {comm.rank} (host {socket.gethostname()}) reads other content at {record['path']} than rank 0 "
                f"({size:,} bytes, sha256 {sha[:12]}... against {record['bytes']:,} bytes, {record['sha256'][:12]}...): "
                f"every rank must read the same files (a stale node-local copy?); put the inputs on a filesystem "
                f"all ranks share, or make the copies identical"
            )
    path = work / PARAMS_FILE
    try:
        seen = json.loads(path.read_text())
    except (OSError, ValueError):
        seen = None
    if seen != params:
        what = (f"does not see {path} that rank 0 wrote" if seen is None else
                f"sees another {path} than the one rank 0 wrote (another build's work directory, on a disk of its own?)")
        raise BuildError(
            f"rank {comm.rank} (host {socket.gethostname()}) {what}: the parent folder of --output must be on a "
            f"filesystem every rank shares (NFS, Lustre, ...), at the same path"
        )


class _AnalysisProgress:
    """Counts finished shard analyses (the progress bar advances by each shard's bytes); with a
    language whose fit runs in this process, tells it each shard in corpus order as soon as it and
    every one before it are analysed (``Language.on_shard_analysed``)."""

    def __init__(self, bar, lang=None):
        self.bar = bar
        self.merged = 0
        self.lang = lang
        self.analysed: set[int] = set()
        self.next_shard = 0  # every shard before it has been told

    def __call__(self, result: tuple[str, int]) -> None:
        self.merged += 1
        self.bar.update(result[1])
        if self.lang is not None:
            self.analysed.add(int(Path(result[0]).name))
            while self.next_shard in self.analysed:
                self.analysed.remove(self.next_shard)
                self.lang.on_shard_analysed(self.next_shard, Path(result[0]).parent / f"{self.next_shard:06d}" / "cache")
                self.next_shard += 1


def _sum_count_tables(parts: list[dict[str, PackedCounter | Counter]]) -> dict[str, PackedCounter | Counter]:
    """Count tables ({name: table}) summed name by name (names and keys in first-seen order); packed
    tables stay packed (``languages.PackedCounter``) until the fit."""
    tables: dict[str, list] = {}
    for part in parts:
        for key, table in part.items():
            tables.setdefault(key, []).append(table)
    return {key: sum_count_tables(counters) for key, counters in tables.items()}


def _work_json(path: Path):
    """A JSON file of the work directory; a damaged one raises ValueError naming it (a resume's
    "missing or damaged" message then says which file)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None


def _sum_shard_counts(shard_dirs: list[str]) -> dict[str, PackedCounter | Counter]:
    """The count tables (counts.pkl) of these shards, summed key by key (a worker task)."""
    parts = []
    with _NoCyclicGC():
        for shard_dir in shard_dirs:
            path = Path(shard_dir) / SHARD_COUNTS_FILE
            with open(path, "rb") as fh:
                try:
                    parts.append(pickle.load(fh))
                except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError) as exc:
                    raise ValueError(f"{path} is damaged ({type(exc).__name__}: {exc})") from None
        return _sum_count_tables(parts)


def _counts_kept_here(_=None) -> tuple[int, list[str], dict | None]:
    """(this process's pid, the shards it analysed, their count tables summed): what the language
    kept while it analysed them (``Language.counts_so_far``), or ([], None) if it kept nothing. A
    pool task: each worker takes one (``_WORKER["barrier"]``: it waits until every worker has one)."""
    barrier = _WORKER.get("barrier")
    if barrier is not None:
        try:
            barrier.wait(timeout=60)
        except threading.BrokenBarrierError:  # a worker that never came: its shards are read back instead
            pass
    kept = _WORKER["lang"].counts_so_far() if "lang" in _WORKER else None
    analysed = list(_WORKER.get("analysed", ()))
    if kept is None or not analysed:
        return os.getpid(), [], None
    return os.getpid(), analysed, kept


def auto_shard_characters(records: list[dict], lang_cls: type[Language] | None = None, workers: int = 1) -> int:
    """Default shard size in characters: the language's choice for the corpus's bytes and the workers
    in all (``Language.shard_characters_for``: bytes / 32, ~32 shards of English, so N workers share
    the work evenly; Chinese ~4 shards a worker), at least 50k, at most 16M characters (resume
    granularity, worker memory) for a corpus beyond 512 MB (English) or 192 MB a worker (Chinese). Not
    more shards: each costs fixed work (file creations, per-shard tables of distinct words: ~40 ms an
    English shard here), and 64 made the English build 1.15x slower on 20 MB."""
    total = sum(r.get("content_bytes") or r["bytes"] for r in records)
    wanted = lang_cls.shard_characters_for(total, workers) if lang_cls is not None else total // 32
    return int(min(16_000_000, max(50_000, wanted)))


def _read_into_shards(config, comm, specs, work: Path, executor: _Executor, on_analyzed, read_done: bool,
                      params: dict) -> dict:
    """Stage 2 (+ 3 in the background): stream the corpus into shards, analyse each as it is written;
    or, for inputs read in byte ranges, have the workers read and analyse the shards (the summary,
    ``{"num_shards", "ranges": True}``, is completed by ``_range_summary`` once every rank is done)."""
    if read_done:  # a resumed build: every rank had written its shards before
        summary = _work_json(work / READ_FILE)
        mine = [k for k in range(summary["num_shards"]) if k % comm.size == comm.rank]
        unwritten = [k for k in mine if not (_shard_dir(work, k) / SHARD_DOCUMENTS_FILE).exists()
                     and not (_shard_dir(work, k) / SHARD_COUNTS_FILE).exists()]  # (analysed in hand: no copy)
        if not unwritten:
            for k in mine:
                executor.submit(_analyze_task, str(_shard_dir(work, k)))
            return summary
        # (a work directory from a version that marked the read before every rank had finished)
        log.info("rank %d: %d shard(s) were never written; reading the inputs again", comm.rank, len(unwritten))
    if params.get("reading") == "ranges":  # (shards with their counts for the same ranges are not read again)
        plan = inp.plan_ranges(params["inputs"], params["shard_characters"], config.shard_documents)
        keep = get_language(config.language).reads_documents_again
        for k in range(comm.rank, len(plan), comm.size):
            executor.submit(_read_range_task, (str(_shard_dir(work, k)), plan[k], config.encoding_errors,
                                               config.max_document_chars, keep))
            for result in executor.ready():
                on_analyzed(result)
        return {"num_shards": len(plan), "ranges": True}
    counters = inp.ReadCounters()
    documents: list[str] = []
    num_documents = 0
    characters = 0
    text_bytes = 0.0  # of the shard's documents (the progress bar's unit), when the reader knows them
    max_characters = params["shard_characters"]
    shard_starts: list[int] = []  # global index of each shard's first document
    # Inline (--workers 1) the documents in hand are analysed; pool workers read the shard's file. A
    # language that never reads them again gets no file inline (if the reader tells the bytes read).
    in_hand = executor.pool is None and not get_language(config.language).reads_documents_again

    def flush() -> None:
        nonlocal documents, characters, text_bytes
        k = len(shard_starts)
        shard_starts.append(num_documents - len(documents))
        if k % comm.size == comm.rank:
            shard = _shard_dir(work, k)
            if in_hand and counters.text_bytes is not None:
                executor.submit(_analyze_task, (str(shard), documents, round(text_bytes)))
            else:
                if not (shard / SHARD_DOCUMENTS_FILE).exists():
                    _write_shard_documents(shard, documents)
                executor.submit(_analyze_task, str(shard) if executor.pool is not None else (str(shard), documents))
        documents = []
        characters = 0
        text_bytes = 0.0
        # Collect finished analyses once per shard, not per document: with tens of thousands of
        # documents, polling every pending task each time cost the main process ~0.4 s of CPU that
        # the busy workers needed.
        for result in executor.ready():
            on_analyzed(result)

    read_bytes = 0
    for batch in inp.iter_document_batches(specs, config.encoding_errors, config.max_document_chars, counters):
        # A shard ends with the document that brings it to --shard-documents or to its characters.
        ends = list(accumulate(map(len, batch)))  # characters of batch[:i + 1]
        # the batch's bytes (blank lines skipped before it included), shared out by characters
        per_character = ((counters.text_bytes or 0) - read_bytes) / max(ends[-1], 1)
        read_bytes = counters.text_bytes or 0
        start = 0
        while start < len(batch):
            before = ends[start - 1] if start else 0
            end = min(bisect_left(ends, max_characters - characters + before, lo=start) + 1,
                      start + config.shard_documents - len(documents), len(batch))
            documents += batch[start:end]
            num_documents += end - start
            characters += ends[end - 1] - before
            text_bytes += (ends[end - 1] - before) * per_character
            start = end
            if len(documents) == config.shard_documents or characters >= max_characters:
                flush()
    if documents:
        flush()
    summary = {"num_documents": num_documents, "num_shards": len(shard_starts), "shard_starts": shard_starts,
               "empty_documents_skipped": counters.empty_documents, "nul_bytes_removed": counters.nul_bytes_removed,
               "long_documents_cut": counters.split_long_documents}
    return summary  # marked as read (READ_FILE) once every rank has written and analysed its shards


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: what a SLURM / cgroup allocation leaves it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def warn_oversubscribed(workers: int, rank: int = 0) -> str | None:
    """A warning (logged, and returned) when --workers exceeds the CPUs this process may use: the
    workers would take turns on them, slower than --workers = the CPU count (more memory, no gain)."""
    cpus = usable_cpus()
    if workers <= cpus:
        return None
    where = f" (rank {rank})" if rank else ""
    message = (f"--workers {workers} is more than the {cpus} CPU(s) this process may use{where}: the workers take "
               f"turns on them (no faster, more memory); --workers {cpus} is the most that helps here")
    log.warning(message)
    return message


def build(config: BuildConfig, comm=None) -> dict:
    """Build the dataset described by ``config``; returns its meta.json content (on every rank)."""
    started = time.time()
    comm = comm or detect_communicator()
    # ---- 1. checks: every rank's own settings, the same on all ranks; then the inputs (rank 0) --
    lang, specs = _agree_on_settings(comm, config)
    warn_oversubscribed(config.workers, comm.rank)
    lock = _BuildLock(config.output) if comm.rank == 0 else None
    resuming = config.resume and work_dir_for(config.output).is_dir()
    try:
        # (--output checked first: the lock file must never land in an input folder)
        _collective(comm, lambda: (check_output(config), lock.acquire()) if lock else None)
        return _build_stages(config, comm, lang, specs, started)
    except _OUR_ERRORS:
        raise
    except (OSError, ValueError, EOFError, KeyError, IndexError, pickle.UnpicklingError) as exc:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise BuildError(no_space_message(config, exc)) from None
        if not resuming:
            raise
        raise BuildError(
            f"resuming the interrupted build in {work_dir_for(config.output)} failed ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:300]}): a file of that build is missing or damaged (removed by hand, or "
            f"a machine crash). Pass --overwrite without --resume to start over"
        ) from None
    finally:
        if lock is not None:
            lock.release()


class _BuildLock:
    """Rank 0 holds an exclusive lock on ``.DIR.build-lock`` (next to DIR) for the whole build: a second
    build of the same output (a resubmitted job while the first still runs, with or without --resume)
    would delete or rewrite the files the first one is writing. The file stays (removing a lock file is
    racy); the lock goes with the process however it ends."""

    def __init__(self, output: str | os.PathLike) -> None:
        self.path = fmt.build_lock_path(output)
        self.fd: int | None = None

    def acquire(self) -> None:
        import fcntl
        import socket

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise BuildError(f"another build of {self.path.parent / self.path.name[1:-len('.build-lock')]} is "
                             f"running ({holder}; lock {self.path}): wait for it to finish or stop it, then run "
                             f"again (with --resume to continue its work)") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _build_stages(config: BuildConfig, comm, lang: Language, specs: list[inp.InputSpec], started: float) -> dict:
    options = dict(lang.options)  # with the plugin's defaults filled in: recorded, and what workers get

    run_info = {"resumed": False}

    def check():
        out = Path(config.output)
        check_output(config)
        if out.exists() and not config.overwrite:  # the cheapest check first
            raise _output_exists(out, config.resume)
        records, warnings = _check_inputs(config, lang, specs, executor)
        for w in warnings:
            log.warning(w)
        params = {
            "language": config.language,
            # --resume may change the options that only change how the build runs (``run_options``)
            "language_options": {k: v for k, v in options.items() if k not in lang.run_options},
            "inputs": records,
            "text_mode": config.text_mode,
            "text_field": config.text_field,
            "encoding_errors": config.encoding_errors,
            "max_document_chars": config.max_document_chars,
            "shard_documents": config.shard_documents,
            "shard_characters": config.shard_characters or auto_shard_characters(records, type(lang),
                                                                                   comm.size * config.workers),
            # uncompressed text (line, paragraph, wrapped): the workers read their shards' byte ranges
            "reading": "ranges" if all(inp.reads_in_ranges(s) for s in specs) else "stream",
            "valid_fraction": config.valid_fraction,
            "format_version": fmt.FORMAT_VERSION,
            "work_format": WORK_FORMAT,
        }
        if config.vocab_from:  # only then: the parameters (and --resume) of other builds are unchanged
            params["vocab_from"] = options["vocab_from"]
        option_files = _option_file_digests(lang, options)
        if option_files:  # only then, as for vocab_from
            params["option_files"] = option_files
        run_info["resumed"] = bool(config.resume) and work_dir_for(out).is_dir()  # work of an earlier run kept
        work = _prepare_work_dir(config, params)
        return params, warnings, (work / READ_FILE).exists()

    stage_seconds: dict[str, float] = {}
    executor = None
    concatenator: fmt.BinConcatenator | None = None  # rank 0, from the encode stage on
    try:
        # The pool first (no input has been read yet, so no reader thread exists at fork time): its
        # workers load what they need (a segmenter's dictionary, ~0.3 s) while rank 0 checks the inputs.
        executor = _Executor(config.workers, config.language, options)
        # Rank 0 checks the inputs (and takes their sha256) while the other ranks take the sha256 of
        # what they see at the same paths: a stale node-local copy must not slip in its documents.
        mine = _collective(comm, check if comm.rank == 0 else (lambda: _map_inputs(_digest_on_worker, specs, executor)))
        params, warnings, read_done = comm.bcast(mine if comm.rank == 0 else None)
        work = work_dir_for(config.output)
        if comm.size > 1:
            _collective(comm, lambda: _check_shared_work_dir(
                comm, work, params, None if comm.rank == 0 else mine,
                None if comm.rank == 0 else _option_file_digests(lang, options)))

        # ---- 2+3. read into shards, analyse --------------------------------------------------
        def read_and_analyze():
            # The bar counts the documents' text bytes: the files' sizes are its total where they are
            # close to it (text, JSON lines); unknown for parquet / HF datasets and for tagged text
            # (the demo's "word/TAG" file is about twice its text).
            sizes = [r.get("content_bytes") if r.get("kind") != "tagged" else None for r in params["inputs"]]
            total = sum(sizes) if None not in sizes else None
            with _progress(config.progress and comm.rank == 0, desc="analyze", unit="B", unit_scale=True,
                           total=total) as bar:
                progress = _AnalysisProgress(bar, lang if streaming else None)
                summary = _read_into_shards(config, comm, specs, work, executor, progress, read_done, params)
                for result in executor.ready(wait=True):
                    progress(result)
                if bar.total and bar.n < bar.total:  # JSON syntax, stripped spaces: the text was smaller
                    bar.total = bar.n
                    bar.refresh()
            mine = [k for k in range(summary["num_shards"]) if k % comm.size == comm.rank]
            if progress.merged != len(mine):
                raise BuildError(f"internal: {progress.merged} shards analysed, {len(mine)} expected")
            if streaming:
                if progress.next_shard != summary["num_shards"]:
                    raise BuildError(f"internal: {progress.next_shard} of {summary['num_shards']} shards streamed")
                lang.on_analysis_end(summary["num_shards"])
            # Summed on the workers, each over its share of the shards: while they analysed, every
            # core was busy, and the main process would only have taken CPU from them.
            return summary, executor.sum_counts([str(_shard_dir(work, k)) for k in mine])

        # A one-rank build whose fit is still to do lets its language work on the analysed shards
        # while the rest are analysed (English: KenLM's lmplz reads their words), on the cores its
        # workers leave free: on cores the workers keep busy it would only slow them down (2 workers
        # on 2 cores, BBC News x16: 3-5% slower, 1.5 CPU-s more).
        streaming = (comm.size == 1 and not config.vocab_from and not (work / "fit.done").exists()
                     and usable_cpus() > config.workers)
        if streaming:
            sizes = [r.get("content_bytes") for r in params["inputs"]]
            lang.on_analysis_start(work / "scratch-streamed", None if None in sizes else sum(sizes))
        stage_seconds["check"] = round(time.time() - started, 2)
        summary, my_counts = _collective(comm, read_and_analyze)
        if summary.get("ranges"):  # every rank has analysed its shards: their range files are all there
            summary = _collective(comm, lambda: _range_summary(work, summary["num_shards"]))
        if comm.rank == 0 and not read_done:
            # Only now: a rank killed while writing its shards must not leave a work directory whose
            # --resume believes every shard exists.
            _mark(work / READ_FILE, summary)
        stage_seconds["read_analyze"] = round(time.time() - started - sum(stage_seconds.values()), 2)
        all_counts = comm.gather(my_counts)
        del my_counts

        # ---- 4. fit (rank 0) -----------------------------------------------------------------
        artifacts = work / "artifacts"

        # decided once, by rank 0, for every rank: the ranks that help with the fit's corpus passes
        # must all agree on whether there is a fit
        fit_needed = comm.bcast(not (work / "fit.done").exists() if comm.rank == 0 else None)

        def fit():
            if not fit_needed:
                return
            if comm.rank != 0:
                _serve_corpus_passes(comm, executor, work / f"scratch-rank{comm.rank}")
                return
            try:
                fit_on_rank0()
            finally:
                if comm.size > 1:
                    comm.bcast(None)  # the other ranks stop serving corpus passes (also when the fit failed)

        def fit_on_rank0():
            counts = {k: v.unpack() if isinstance(v, PackedCounter) and not lang.fit_takes_packed else v
                      for k, v in _sum_count_tables(all_counts).items()}
            tmp = work / "artifacts.tmp"
            scratch = work / "scratch"
            for d in (tmp, scratch):
                shutil.rmtree(d, ignore_errors=True)
                d.mkdir()

            def mapper(fn, dirs, arg, add=False):
                if comm.size == 1:
                    return executor.map_shards(fn, dirs, arg, scratch, add)
                return _corpus_pass(comm, executor, fn, dirs, arg, add, scratch)

            corpus = Corpus([_shard_dir(work, k) for k in range(summary["num_shards"])], read_shard_documents, scratch,
                            mapper=mapper)
            t0 = time.time()
            with _NoCyclicGC():  # as in the worker tasks: millions of short-lived objects, no cycles
                if config.vocab_from:  # the vocabularies of a finished dataset instead of a fit
                    source = Path(options["vocab_from"])
                    fit_stats = lang.fit_from(source, counts, corpus, tmp) or {}
                else:
                    fit_stats = lang.fit(counts, corpus, tmp) or {}
            for name in (fmt.FINE_VOCAB_FILE, fmt.COARSE_VOCAB_FILE):
                if not (tmp / name).is_file():
                    raise BuildError(f"language plugin {config.language!r} did not write {name} in "
                                     f"{'fit_from' if config.vocab_from else 'fit'}()")
            if config.vocab_from:
                digests = {name: _sha256(tmp / name) for name in (fmt.FINE_VOCAB_FILE, fmt.COARSE_VOCAB_FILE)}
                for name, digest in digests.items():
                    if digest != _sha256(source / name):  # the model's embedding tables depend on these bytes
                        raise BuildError(f"{name} differs from {source / name} after fit_from() of language plugin "
                                         f"{config.language!r} (was {source} changed during the build?)")
                fit_stats = {**fit_stats, "vocab_from": str(source), "vocab_sha256": digests}
            shutil.rmtree(artifacts, ignore_errors=True)
            tmp.rename(artifacts)
            shutil.rmtree(scratch, ignore_errors=True)
            log.info("vocabularies built in %.1fs", time.time() - t0)
            _mark(work / "fit.done", fit_stats)

        try:
            _collective(comm, fit)
        except LanguageError as exc:
            if exc.final and comm.rank == 0:  # no --resume can get past it: leave nothing behind
                shutil.rmtree(work, ignore_errors=True)
            raise
        stage_seconds["fit"] = round(time.time() - started - sum(stage_seconds.values()), 2)
        all_counts = None  # free the gathered tables
        fit_stats = _work_json(work / "fit.done")
        # (sizes only: every worker loads and checks the vocabularies before it encodes a shard)
        fine_size = fmt.Vocab.size_of(artifacts / fmt.FINE_VOCAB_FILE)
        coarse_size = fmt.Vocab.size_of(artifacts / fmt.COARSE_VOCAB_FILE)

        # ---- 5. encode ---------------------------------------------------------------------------
        num_documents = summary["num_documents"]
        try:
            num_valid = num_valid_documents(num_documents, config.valid_fraction)
        except BuildError:  # no --resume can change that: leave nothing behind
            comm.barrier()
            if comm.rank == 0:
                shutil.rmtree(work, ignore_errors=True)
            raise

        def encoded(k: int) -> bool:
            return (_shard_dir(work, k) / SHARD_PART_FILE).exists()

        def encode():
            nonlocal concatenator
            mine = [k for k in range(summary["num_shards"]) if k % comm.size == comm.rank]
            with _progress(config.progress and comm.rank == 0, desc="encode", unit="shard", total=len(mine)) as bar:
                for k in mine:
                    starts = summary["shard_starts"]
                    task = (str(_shard_dir(work, k)), str(artifacts), starts[k],  # its documents' range
                            (starts[k + 1] if k + 1 < len(starts) else num_documents) - starts[k], num_documents,
                            num_valid, fine_size, coarse_size,
                            not config.keep_work_dir and not lang.cache_needed_after_encode(k, summary["num_shards"]))
                    executor.submit(_encode_task, task)
                    bar.update(len(list(executor.ready())))
                if comm.rank == 0:
                    # Rank 0 concatenates the shards' token bytes (.bin) and index pieces in order as they
                    # are encoded, by any rank: the bulk of the merge overlaps the encoding. Redone from
                    # scratch on resume. Made once the tasks are out (its 24 new files: ~25 ms here).
                    staging = work / "merged"
                    shutil.rmtree(staging, ignore_errors=True)
                    concatenator = fmt.BinConcatenator(staging, [_shard_dir(work, k) / SHARD_PART_FILE
                                                                 for k in range(summary["num_shards"])],
                                                       vocab_sizes=(fine_size, coarse_size))
                    concatenator.append_ready(encoded)
                    # the workers encode meanwhile (inline with --workers 1: after them)
                    corpus = Corpus([_shard_dir(work, k) for k in range(summary["num_shards"])], read_shard_documents,
                                    work / "scratch")
                    with _NoCyclicGC():
                        lang.prepare_finish(artifacts, corpus)
                while executor.pending:
                    executor.wait_first(timeout=0.5)
                    bar.update(len(list(executor.ready())))
                    if concatenator is not None:
                        concatenator.append_ready(encoded)
            executor.close(join=False)  # joined after the merge

        _collective(comm, encode)
        stage_seconds["encode"] = round(time.time() - started - sum(stage_seconds.values()), 2)
    except BaseException as exc:
        lang.abort_background()
        if executor is not None:
            executor.terminate()
        if concatenator is not None:
            concatenator.close()
        if isinstance(exc, KeyboardInterrupt):
            raise _interrupted(exc, config) from None
        raise

    # ---- 6. merge (rank 0) -------------------------------------------------------------------
    def merge():
        if comm.rank != 0:
            return None
        if concatenator is not None:
            concatenator.append_ready(encoded)  # the shards other ranks finished last
            concatenator.close()
        return _merge(config, lang, params, work, summary, fit_stats, fine_size, coarse_size, warnings, started, comm,
                      stage_seconds, concatenator, resumed=run_info["resumed"])

    try:
        meta = _collective(comm, merge)
    except BaseException as exc:
        executor.terminate()
        if isinstance(exc, KeyboardInterrupt):
            raise _interrupted(exc, config) from None
        raise
    executor.close()  # the workers, told to exit after the encoding, have exited meanwhile
    return comm.bcast(meta)


def _interrupted(exc: KeyboardInterrupt, config: BuildConfig) -> BuildInterrupted:
    import signal

    signum = getattr(exc, "signum", signal.SIGINT)
    work = work_dir_for(config.output)
    if not work.is_dir():
        return BuildInterrupted(f"interrupted ({signal.Signals(signum).name}) before any work was kept", signum)
    return BuildInterrupted(
        f"interrupted ({signal.Signals(signum).name}): {work_progress(work)}. Run the same command with --resume "
        f"to continue from there", signum)


def _merge(config, lang, params, work, summary, fit_stats, fine_size, coarse_size, warnings, started, comm,
           stage_seconds, concatenator: fmt.BinConcatenator | None = None, resumed: bool = False) -> dict:
    shards = [_shard_dir(work, k) for k in range(summary["num_shards"])]
    totals: Counter = Counter()
    extra: Counter = Counter()
    parts = [str(shard / SHARD_PART_FILE) for shard in shards]
    indexed = concatenator is not None and concatenator.complete and concatenator.indexed
    for k, part in enumerate(parts):
        try:
            stats = concatenator.extras[k] if indexed else fmt.read_part(part)[1]
        except fmt.FormatError as exc:
            raise BuildError(f"{exc}. Pass --overwrite without --resume to start over") from None
        for key in ("documents", "empty_after_normalization", "sentences", "characters", "fine_tokens",
                    "coarse_tokens", "multi_fine_coarse_tokens", "fine_unk", "coarse_unk"):
            totals[key] += stats[key]
        extra.update(stats["extra"])
    with (atomic := fmt.AtomicDirectory(config.output, overwrite=config.overwrite)) as out:
        splits = {}
        bin_written = concatenator is not None and concatenator.complete
        if bin_written:  # the token bytes were concatenated during the encoding: move them in
            for split in fmt.SPLITS:
                for stream in fmt.STREAMS:
                    shutil.move(fmt.prefix(concatenator.directory, split, stream) + ".bin", fmt.prefix(out, split, stream) + ".bin")
        for split in _progress(config.progress, desc="merge", unit="split", iterable=fmt.SPLITS):
            try:
                if indexed:  # the indexes too (``fmt.BinConcatenator.write_split``)
                    splits[split] = concatenator.write_split(out, split)
                else:
                    splits[split] = fmt.merge_splits(out, split, parts, fine_size, coarse_size, bin_written)
            except fmt.FormatError as exc:  # nothing is written to DIR; the damaged shard must be redone
                raise BuildError(f"{exc}. Pass --overwrite without --resume to start over") from None
            # The clear error the format needs (a 0-document split makes megatron's samplers spin forever).
            if splits[split]["documents"] == 0:
                raise BuildError(
                    f"the {split} split got 0 documents (corpus: {totals['documents']} documents); "
                    f"adjust --valid-fraction or give more text"
                )
        for f in sorted((work / "artifacts").iterdir()):
            if f.is_file():  # directories are the plugin's build-time caches, not part of the dataset
                shutil.copy2(f, out / f.name)
        elapsed = time.time() - started
        # MB/s of text read: decompressed sizes where known (a .xz input is ~4x smaller on disk)
        input_bytes = sum(r.get("content_bytes") or r["bytes"] for r in params["inputs"])
        fine, coarse = totals["fine_tokens"], totals["coarse_tokens"]
        stats = {
            "documents": totals["documents"],
            "sentences": totals["sentences"],
            "characters": totals["characters"],
            "fine_tokens": fine,
            "coarse_tokens": coarse,
            "coarse_fine_ratio": round(coarse / fine, 4) if fine else None,
            "multi_fine_coarse_fraction": round(totals["multi_fine_coarse_tokens"] / coarse, 4) if coarse else None,
            "fine_oov_rate": round(totals["fine_unk"] / fine, 6) if fine else None,
            "coarse_oov_rate": round(totals["coarse_unk"] / coarse, 6) if coarse else None,
            "empty_documents_skipped": summary["empty_documents_skipped"] + totals["empty_after_normalization"],
            "nul_bytes_removed": summary["nul_bytes_removed"],
            "long_documents_cut": summary["long_documents_cut"],
            **{k: v for k, v in fit_stats.items()},
            **{k: int(v) for k, v in sorted(extra.items())},
            # A resumed build's run did only the work left: its time says nothing of the whole input's.
            "throughput": {
                "seconds": round(elapsed, 2),
                "input_mb_per_s": None if resumed else round(input_bytes / 1e6 / elapsed, 3),
                "chars_per_s": None if resumed else round(totals["characters"] / elapsed),
                **({"resumed": True} if resumed else {}),
            },
        }
        warnings = warnings + _oov_warnings(stats, fine_size, coarse_size, config.vocab_from,
                                            lang.options.get("coarse_vocab_size"))
        scratch = work / "scratch"
        scratch.mkdir(exist_ok=True)
        corpus = Corpus(shards, read_shard_documents, scratch)
        with _NoCyclicGC():
            finished = lang.finish(out, stats, corpus) or {}
        for key, value in finished.items():
            stats.setdefault(key, value)
        meta = {
            "language": config.language,
            "fine_vocab_size": fine_size,
            "coarse_vocab_size": coarse_size,
            # (the shard sizes shape how the build ran, not what it wrote: in "run")
            "build": {k: v for k, v in params.items() if k not in ("inputs", "shard_documents", "shard_characters", "reading")},
            "inputs": params["inputs"],
            "versions": _package_versions(lang),
            "splits": splits,
            "stats": stats,
            "warnings": warnings,
            # what the ids mean: --verify holds the files to these (an edit would change every decode)
            "files_sha256": {name: _sha256(out / name) for name in sorted(fmt.TOKEN_FILES) if (out / name).is_file()},
            # run-dependent (not part of the reproducible output): a resumed run's throughput
            # covers only the work it did itself
            "run": {"workers": config.workers, "ranks": comm.size, "resumed": resumed,
                    "shard_documents": params["shard_documents"], "shard_characters": params["shard_characters"],
                    "reading": params["reading"],
                    "stage_seconds": {**stage_seconds,
                                      "merge": round(time.time() - started - sum(stage_seconds.values()), 2)}},
        }
        fmt.write_meta(out, meta)
        atomic.commit()
    if not config.keep_work_dir:
        remove_work_dir(work)
    return {"format_version": fmt.FORMAT_VERSION, **meta}


def _trash_of(work: Path) -> Path:
    return work.with_name(f".{work.name}.removing")


def remove_work_dir(work: Path) -> None:
    """Remove a finished build's work directory: renamed aside first (one step), then deleted. Deleted
    in place, a kill during the deletion (seconds on a shared filesystem) left DIR.partial half-removed
    beside the complete DIR, which a --resume then took for an interrupted --overwrite build."""
    trash = _trash_of(work)
    shutil.rmtree(trash, ignore_errors=True)
    try:
        work.rename(trash)
    except OSError:  # (renamed by nothing else; a filesystem that refuses: deleted where it is)
        trash = work
    shutil.rmtree(trash, ignore_errors=True)


def summarize(meta: dict) -> str:
    """Human-readable statistics of a build (printed by build.py)."""
    s = meta["stats"]
    lines = [
        f"dataset: language={meta['language']} fine_vocab={meta['fine_vocab_size']} coarse_vocab={meta['coarse_vocab_size']}",
        f"  documents {s['documents']:,}  sentences {s['sentences']:,}  characters {s['characters']:,}",
        f"  fine tokens {s['fine_tokens']:,}  coarse tokens {s['coarse_tokens']:,}  coarse/fine {s['coarse_fine_ratio']}",
        f"  coarse tokens covering >1 fine token: {100 * (s['multi_fine_coarse_fraction'] or 0):.1f}%",
        f"  OOV ([UNK]) rate: fine {100 * (s['fine_oov_rate'] or 0):.3f}%  coarse {100 * (s['coarse_oov_rate'] or 0):.3f}%",
        "  splits: " + ", ".join(f"{k} {v['documents']:,} docs / {v['sentences']:,} sentences" for k, v in meta["splits"].items()),
        f"  throughput: {s['throughput']['input_mb_per_s']} MB/s of input, {s['throughput']['chars_per_s']:,} chars/s "
        f"({s['throughput']['seconds']}s, workers={meta['run']['workers']}, ranks={meta['run']['ranks']})"
        if s["throughput"].get("input_mb_per_s") is not None else
        f"  throughput: not measured (a resumed build: this run, {s['throughput']['seconds']}s, did only the work "
        f"left; workers={meta['run']['workers']}, ranks={meta['run']['ranks']})",
    ]
    if s.get("vocab_from"):
        lines.insert(5, f"  vocabularies from {s['vocab_from']} (the OOV rates: how well they cover this text)")
    skipped = {k: s[k] for k in ("empty_documents_skipped", "nul_bytes_removed", "long_documents_cut") if s.get(k)}
    if skipped:
        lines.append("  repaired/skipped: " + ", ".join(f"{k}={v}" for k, v in skipped.items()))
    return "\n".join(lines)


def config_to_dict(config: BuildConfig) -> dict:
    return asdict(config)
