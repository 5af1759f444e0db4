r"""Fine-tune an AMBERT / BERT-baseline model on sequence or token classification, span extraction or
multiple choice.

    python -m pipeline.finetune --model exported/ambert-zh --train train.jsonl --dev dev.jsonl \
        --test test.jsonl --output runs/ft-zh --seeds 1 2 3 --epochs 3 --lr 5e-5
    python -m pipeline.finetune --model runs/demo/checkpoints/step_00000200 ...   # a training checkpoint
    python -m pipeline.finetune --model random:tiny:bert-fine --dataset data/demo-zh ...  # no pre-training
    python -m pipeline.finetune --task token --tokens-field tokens --tags-field tags ...   # tagging
    python -m pipeline.finetune --task span --train squad_train.json --dev squad_dev.json --max-length 384 ...
    python -m pipeline.finetune --task choice --context-field article --choices-field options \
        --label-field answer --max-length 512 ...                                          # RACE's columns
    deepspeed --num_gpus 2 pipeline/finetune.py --deepspeed ...   # data parallel (or torchrun / mpirun)

Every flag is a field of ``pipeline.finetuning.FinetuneConfig`` (documented there); results go to
OUTPUT/results.json (accuracy, macro-F1, per-class report per seed -- exact match, F1 and each question's
predicted answer for span tasks, accuracy for choice tasks -- mean and std over seeds, loss curves), written atomically; an OUTPUT that already holds results.json is refused unless --overwrite.
Under a launcher every rank must get the same flags (checked before any work). The logic lives in
pipeline/finetuning.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import sys
import typing
from pathlib import Path

if __package__ in (None, ""):  # `deepspeed pipeline/finetune.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.encode import EncodeError  # noqa: E402
from data_prep.format import FormatError  # noqa: E402
from pipeline.finetuning import FinetuneConfig, FinetuneError, FinetuneInterrupted, run  # noqa: E402
from pipeline.inference import ExportError  # noqa: E402
from pipeline.run_lock import LockHeld, RunLock  # noqa: E402

RUN_LOCK = ".finetune.lock"  # in --output: held by a live run's rank 0 (pipeline/run_lock.py)


def parse_args(argv: list[str] | None = None) -> FinetuneConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(FinetuneConfig)
    docs = _field_docs()
    for f in dataclasses.fields(FinetuneConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = hints[f.name]
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=f"{docs.get(f.name, '')} (default: {'on' if default else 'off'})")
        elif kind == list[int]:
            parser.add_argument(flag, type=int, nargs="+", default=default,
                                help=f"{docs.get(f.name, '')} (default: {' '.join(map(str, default))})")
        else:
            parser.add_argument(flag, type=kind, default=default, help=f"{docs.get(f.name, '')} (default: {default})")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    values = vars(parser.parse_args(argv))
    values.pop("local_rank")
    return FinetuneConfig(**values)


def _field_docs() -> dict[str, str]:
    """The one-line docstring under each config field (for --help)."""
    import ast
    import inspect

    import pipeline.finetuning as module

    tree = ast.parse(inspect.getsource(module))
    docs: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "FinetuneConfig":
            body = node.body
            for a, b in zip(body, body[1:]):
                if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                    docs[a.target.id] = " ".join(str(b.value.value).split()).replace("%", "%%")
    return docs


def _remove_if_only(directory: Path, names: set[str]) -> None:
    """Remove ``directory`` when it holds nothing but ``names`` (what a refused run wrote there)."""
    try:
        if {p.name for p in directory.iterdir()} <= names:
            shutil.rmtree(directory)
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    rank = int(os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # megatron-core's start-up notes (Megatron-FSDP, ...)
    config = None
    handler = None
    created = False  # --output made by this run: removed again if the run is refused before any result
    run_lock = RunLock(RUN_LOCK)
    try:
        config = parse_args(argv)
        config.validate()  # bad flags (or an --output holding results.json) leave no trace behind
        if rank == 0 and config.output:  # the log also goes to OUTPUT/finetune.log (appended)
            if Path(config.output).exists() and not Path(config.output).is_dir():
                raise FinetuneError(f"--output {config.output} is an existing file; give a directory")
            created = not Path(config.output).exists()
            try:  # before anything is written there: a run still going in --output refuses this one
                run_lock.acquire(config.output)
            except LockHeld as held:
                raise FinetuneError(
                    f"--output {config.output} is in use by a fine-tuning run that is still running ({held.holder}; "
                    f"lock {held.path}): a second run there would mix its models, log and results.json with it. "
                    f"Wait for it to finish or stop it, or give this run another --output") from None
            handler = logging.FileHandler(Path(config.output) / "finetune.log", encoding="utf-8")
            handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s", "%Y-%m-%d %H:%M:%S"))
            logging.getLogger().addHandler(handler)
        run(config)
    # ExportError: weights that do not fit their config; FormatError / EncodeError: the tokenizer files
    # (meta.json, vocabularies) of the model or --dataset are damaged or were edited
    except (FinetuneError, ExportError, FormatError, EncodeError) as exc:
        if config is not None and config.deepspeed:
            # Under a launcher, a rank that stops before the process group exists would leave its
            # peers waiting for it there until the collective timeout: it tells them first.
            import torch.distributed as dist

            if not dist.is_initialized():
                from pipeline import parallel

                world = int(os.environ.get("WORLD_SIZE", os.environ.get("OMPI_COMM_WORLD_SIZE", "1")))
                parallel.startup_failed(exc, world)
        print(f"error: {exc}", file=sys.stderr)
        if handler is not None:  # the log file keeps why the run stopped (the console got it above)
            handler.handle(logging.makeLogRecord({"name": "finetune", "levelno": logging.ERROR, "levelname": "ERROR",
                                                  "msg": "error: %s", "args": (exc,)}))
        if created and handler is not None:  # refused (a typo'd --model, a bad column): no folder left for nothing
            logging.getLogger().removeHandler(handler)
            handler.close()
            handler = None
            run_lock.release()
            _remove_if_only(Path(config.output), {"finetune.log", RUN_LOCK})
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C: one line (and the log keeps it), not a 40-line traceback
        message = str(exc) if isinstance(exc, FinetuneInterrupted) else "fine-tuning interrupted"
        print(f"\ninterrupted: {message}", file=sys.stderr)
        if handler is not None:
            handler.handle(logging.makeLogRecord({"name": "finetune", "levelno": logging.WARNING, "levelname": "WARNING",
                                                  "msg": "interrupted: %s", "args": (message,)}))
        return 130
    finally:
        run_lock.release()  # the process exit would too; an in-process caller may start another run
    return 0


if __name__ == "__main__":
    from pipeline import skip_final_garbage_collection

    skip_final_garbage_collection()
    sys.exit(main())
