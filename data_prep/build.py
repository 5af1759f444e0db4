"""Build (or verify) a paired fine/coarse AMBERT dataset.

    python data_prep/build.py --lang zh --output data/demo-zh            # demo: People's Daily 1998-01
    python data_prep/build.py --lang zh --input 'corpus/*.txt.xz' --output data/zh --workers 8
    mpirun -np 4 python data_prep/build.py --lang zh --input corpus/ --output data/zh
    python data_prep/build.py --lang zh ... --resume                     # continue a killed build
    python data_prep/build.py --lang zh --input new/ --output data/zh2 --vocab-from data/zh  # DIR's vocabularies
    python data_prep/build.py --verify data/zh                           # re-read and check everything

The logic lives in data_prep/core.py (engine), data_prep/languages.py (plugin contract),
data_prep/chinese.py / english.py (languages) and data_prep/verify.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import warnings

# megatron-core warns at import that TransformerEngine/Apex are absent: irrelevant to data files.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")

from data_prep import core, inputs
from data_prep.languages import LanguageError, available_languages, get_language, load_all_plugins


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except where the help already says what the default is, or there is none."""

    def _get_help_string(self, action):
        if "(default:" in (action.help or "") or action.default is None:  # no "(default: None)"
            return action.help
        return super()._get_help_string(action)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Build a paired fine/coarse AMBERT dataset, or --verify one.",
        formatter_class=_DefaultsHelpFormatter,
        # A language may re-declare a shared option (same dest); the last declaration wins.
        conflict_handler="resolve",
    )
    p.add_argument("--lang", choices=available_languages(), help="language of the corpus (required to build; not with --verify)")
    p.add_argument("--input", nargs="+", action="extend", metavar="PATH",
                   help="files, globs or folders (text, .jsonl, .parquet, HF save_to_disk; .gz/.xz/.bz2); "
                        "omit to build the built-in demo corpus")
    p.add_argument("--output", help="dataset directory to create")
    p.add_argument("--verify", metavar="DIR", help="check an existing dataset (alignment, decode round trip) and exit")
    p.add_argument("--workers", type=int, default=1, help="processes for segmentation/encoding (and for --verify)")
    p.add_argument("--fine-vocab-size", type=int, help="max fine vocabulary size incl. specials (default: per language)")
    p.add_argument("--coarse-vocab-size", type=int, help="max coarse vocabulary size incl. specials (default: the paper's, zh 21,128 characters + "
                   "72,635 words = 93,763; en 30,522 words + 77,645 phrases = 108,167)")
    p.add_argument("--fine-min-count", type=int, help="minimum corpus count of a fine unit (default: per language)")
    p.add_argument("--coarse-min-count", type=int,
                   help="a coarse unit needs this many occurrences for a coarse id: en, a word/phrase, else coarse "
                        "[UNK]; zh, a word, else it backs off to pieces (default: 2 for both)")
    p.add_argument("--valid-fraction", type=float, default=0.01, help="share of documents in the valid split")
    p.add_argument("--shard-documents", type=int, default=100_000,
                   help="at most this many documents per shard (unit of parallelism/resume; shards are sized by "
                        "--shard-characters, this caps a corpus of very short documents; about this many lines for "
                        "uncompressed text, whose shards are byte ranges sized by the file's mean line length)")
    p.add_argument("--shard-characters", type=int, default=None,
                   help="a shard also closes at this many characters (default: en, corpus bytes / 32; zh, "
                        "~4 shards a worker, corpus bytes / (12 x workers x ranks); between 50k and 16M)")
    p.add_argument("--text-mode", choices=inputs.TEXT_MODES, default="auto",
                   help="text files: one document per blank-line-separated block (paragraph), per line, or auto "
                        "(paragraph if the file's first MB has a blank line, else line); wrapped: blank-line-separated "
                        "blocks of hard-wrapped lines, joined (a line break inside a document otherwise ends a "
                        "sentence); file: each file one document (a folder of articles)")
    p.add_argument("--text-field", default="text", help="JSON field / column holding the text")
    p.add_argument("--encoding-errors", choices=inputs.ENCODING_ERRORS, default="strict",
                   help="invalid UTF-8: stop (strict) or replace with U+FFFD")
    p.add_argument("--max-document-chars", type=int, default=1_000_000,
                   help="longer documents are cut at sentence ends")
    p.add_argument("--skip-language-check", action="store_true", help="accept inputs that do not look like --lang")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output (at commit time)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted build (same command)")
    p.add_argument("--vocab-from", metavar="DIR",
                   help="take the vocabularies, tokenizer files and encoding options of the finished dataset DIR "
                        "instead of fitting new ones (continued pre-training on another corpus, a held-out set): "
                        "the new dataset's ids are DIR's model's ids")
    p.add_argument("--keep-work-dir", action="store_true", help="keep OUTPUT.partial/ (shards, caches) afterwards")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    load_all_plugins()
    for name in available_languages():
        try:
            cls = get_language(name)
        except LanguageError:
            continue
        cls.add_arguments(p.add_argument_group(f"--lang {name}: {cls.description}"))
    return p


def other_language_options(parser: argparse.ArgumentParser, args: argparse.Namespace,
                           explicit: set[str] | None = None) -> list[str]:
    """The options of another language given on the command line (e.g. --segmenter with --lang en):
    a build would ignore them silently. ``explicit`` (``explicit_options``): the dests given on the
    command line, also those given with their default value; without it, the values that differ
    from the defaults."""
    import dataclasses

    shared = {f.name for f in dataclasses.fields(core.BuildConfig)} | set(get_language(args.lang).option_names)
    found = []
    for action in parser._actions:
        owners = [name for name in available_languages() if name != args.lang
                  and action.dest in getattr(get_language(name), "option_names", ())]
        given = action.dest in explicit if explicit is not None else getattr(args, action.dest, None) != action.default
        if owners and action.dest not in shared and given:
            found.append(f"{action.option_strings[0]} is a --lang {owners[0]} option")
    return found


def explicit_options(argv: list[str] | None) -> set[str]:
    """The ``dest`` of every option given on the command line ``argv`` (also one given with its
    default value): the command line parsed again with every default suppressed."""
    quiet = make_parser()
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    return set(vars(quiet.parse_args(argv)))


class _LogFile(logging.FileHandler):
    """The build's log file; once it cannot be written (a full disk), one warning, then console only
    (not logging's traceback for every later line)."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        self._warn(sys.exc_info()[1])

    def _warn(self, exc: BaseException | None) -> None:
        if not self.failed:
            self.failed = True
            print(f"warning: cannot write the build log {self.baseFilename} ({exc}); the console "
                  f"has everything", file=sys.stderr)

    def close(self) -> None:
        """Closing flushes what is buffered: on a full disk that raised out of main(), a traceback
        after the build's own one-line error (and exit status 1 instead of its own)."""
        try:
            super().close()
        except OSError as exc:
            self._warn(exc)


def config_from_args(args: argparse.Namespace, explicit: set[str] | None = None) -> core.BuildConfig:
    """The build's configuration. With --vocab-from, only the options in ``explicit`` (the dests given
    on the command line; default: those that differ from the parser's defaults) are passed on as
    language and fit options: the others are taken from the --vocab-from dataset."""
    lang_cls = get_language(args.lang)
    language_options = lang_cls.options_from_args(args)
    fit = {name: getattr(args, name) for name in core.SHARED_FIT_OPTIONS}
    if args.vocab_from:
        if explicit is None:
            defaults = make_parser()
            explicit = {name for name, value in vars(args).items() if value != defaults.get_default(name)}
        language_options = {k: v for k, v in language_options.items() if k in explicit}
        fit = {name: value if name in explicit else None for name, value in fit.items()}
    return core.BuildConfig(
        language=args.lang,
        output=args.output,
        inputs=args.input,
        workers=args.workers,
        **fit,
        valid_fraction=args.valid_fraction,
        shard_documents=args.shard_documents,
        shard_characters=args.shard_characters,
        text_mode=args.text_mode,
        text_field=args.text_field,
        encoding_errors=args.encoding_errors,
        max_document_chars=args.max_document_chars,
        skip_language_check=args.skip_language_check,
        overwrite=args.overwrite,
        resume=args.resume,
        keep_work_dir=args.keep_work_dir,
        progress=not args.no_progress,
        language_options=language_options,
        vocab_from=args.vocab_from,
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[data_prep %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("data_prep").setLevel(logging.INFO)  # also where basicConfig does nothing (a notebook's root)
    logging.getLogger("megatron").setLevel(logging.WARNING)  # it logs every index it opens
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.verify:
        ignored = sorted(explicit_options(argv) - {"verify", "workers", "no_progress"})
        if ignored:  # a build option next to --verify would do nothing: say so rather than drop it silently
            parser.error(f"--verify DIR checks a finished dataset and takes only --workers and --no-progress; drop "
                         f"{', '.join('--' + name.replace('_', '-') for name in ignored)} (to build, leave out --verify)")
        from data_prep.verify import verify_dataset

        core.warn_oversubscribed(args.workers)  # as a build warns: more workers than CPUs only take turns
        try:
            report = verify_dataset(args.verify, progress=not args.no_progress, workers=args.workers)
        except core.WorkerDied as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(report.summary())
        return 0 if report.ok else 1
    if not args.lang or not args.output:
        parser.error("--lang and --output are required to build (or pass --verify DIR)")
    explicit = explicit_options(argv)
    foreign = other_language_options(parser, args, explicit)
    if foreign:
        parser.error(f"{'; '.join(foreign)}: a --lang {args.lang} build would ignore it. Drop it, or check --lang")
    config = config_from_args(args, explicit if args.vocab_from else None)
    if config.vocab_from:  # DIR and the options, before anything is written (the build checks them again)
        try:
            core.vocab_from_options(config, get_language(config.language))
        except (core.BuildError, LanguageError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    handler, filtered = None, []
    if core.launch_rank() == 0:  # the build's log also goes next to the dataset (appended on --resume)
        early = _Collect()  # the warnings of the checks below, copied into the log once it exists
        logging.getLogger().addHandler(early)
        try:  # before the log file is made: never inside an input folder, nor a refused build's error
            core.preflight(config)  # in the log of the dataset already there
        except (core.BuildError, inputs.InputError, LanguageError, FileExistsError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        finally:
            logging.getLogger().removeHandler(early)
        output = Path(config.output)  # `--output .` resolved to the folder's name (a log ".build.log" went inside it)
        log_file = output.parent / (output.name + ".build.log")
        new_log = not log_file.exists()
        try:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            handler = _LogFile(log_file, encoding="utf-8")
        except OSError as exc:
            print(f"error: cannot write the build log {log_file}: {exc}; choose another --output", file=sys.stderr)
            return 2
        handler.setFormatter(logging.Formatter("[data_prep %(asctime)s] %(message)s", "%Y-%m-%d %H:%M:%S"))
        for record in early.records:  # (e.g. data_prep/_native.c not compiled: said once per process)
            handler.handle(record)
        logging.getLogger().addHandler(handler)
        for console in logging.getLogger().handlers:  # the error is printed already: file only
            if console is not handler:
                console.addFilter(_not_file_only)
                filtered.append(console)
    code = 1
    try:
        code = _build(config, args)
        return code
    finally:  # a second main() in the same process (a notebook, the tests) must not write into this log
        for console in filtered:
            console.removeFilter(_not_file_only)
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
            # refused before any work (the inputs' language, encoding, sizes): no work directory to resume,
            # so no log either; a log next to nothing read as a build that had run
            if code == 2 and new_log and not core.work_dir_for(config.output).exists() and not Path(config.output).exists():
                Path(handler.baseFilename).unlink(missing_ok=True)


class _Collect(logging.Handler):
    """Keeps the warnings logged before the build log exists."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _not_file_only(record: logging.LogRecord) -> bool:
    return not getattr(record, "file_only", False)


def _build(config: core.BuildConfig, args: argparse.Namespace) -> int:
    import signal

    # SIGTERM ends this build like Ctrl-C; an in-process caller (a notebook, the tests) gets its own
    # handler back after it (left installed, it raised BuildInterrupted in the caller and in every
    # process it forked later).
    caller_sigterm = signal.getsignal(signal.SIGTERM)
    core.raise_on_sigterm()
    try:
        return _build_with_handler(config, args)
    finally:
        if caller_sigterm is not None:
            signal.signal(signal.SIGTERM, caller_sigterm)


def _build_with_handler(config: core.BuildConfig, args: argparse.Namespace) -> int:
    core.keep_freed_memory()  # this process builds inline with --workers 1 (see the function)
    try:
        meta = core.build(config)
    except (core.BuildError, inputs.InputError, LanguageError, FileExistsError) as exc:
        if getattr(exc, "shared", False) and core.launch_rank() != 0:
            return 2  # the same message as rank 0's, which prints it
        print(f"error: {exc}", file=sys.stderr)
        logging.getLogger("data_prep.build").log(logging.ERROR, "error: %s", exc, extra={"file_only": True})
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (core.raise_on_sigterm)
        signum = getattr(exc, "signum", 2)
        if core.launch_rank() == 0:
            message = str(exc) or "interrupted"
            print(message, file=sys.stderr)
            logging.getLogger("data_prep.build").log(logging.ERROR, "%s", message, extra={"file_only": True})
        return 128 + signum
    if core.launch_rank() == 0:
        summary = f"{core.summarize(meta)}\nwrote {args.output}"
        print(summary)
        logging.getLogger("data_prep.build").info("%s", summary, extra={"file_only": True})
    return 0


if __name__ == "__main__":
    sys.exit(main())
