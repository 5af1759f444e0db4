r"""Predict with a fine-tuned model saved by ``pipeline.finetune --save-models``.

    python -m pipeline.predict runs/ft/models/seed1 --input new.jsonl --output predictions.jsonl

The model directory holds the fine-tuned backbone (an export: model.safetensors, config.json, the
pre-training tokenizer files), the task heads (heads.safetensors) and task.json (task, labels, the
encoding settings of the fine-tuning run). The input has the columns the fine-tuning files had (the
names are in task.json; ``--*-field`` overrides them); the gold column (label / tags / answers) is
optional. One JSON line per input example is written (atomically) to ``--output``:

- sequence: ``{"label": ..., "probabilities": {label: p, ...}}`` (from the joint head for AMBERT);
- token: ``{"tags": [...]}``, one tag per input token (the tag of its first fine token; null for a
  token with no fine token left: blank, or cut by the length limit);
- span: ``{"id": ..., "answer": ...}`` ("" = no answer, only for models trained with unanswerable questions);
- choice: ``{"id": ..., "answer": index, "option": its text, "probabilities": [p per option]}``.

When the input has the gold column, the metrics (accuracy and macro-F1; for token tasks per input token,
where fine-tuning scores every fine token: the same when each input token is one fine token; exact match
and F1 for span tasks; accuracy for choice tasks) are logged and written to ``<output>.metrics.json`` (rows whose gold is null or
missing are left out of them, with a warning). Numeric labels are written as strings ("10"). A gold label (or
tag) the model was not fine-tuned on does not stop the run: every row is predicted, and such rows (tokens)
are counted wrong in the metrics (a class of their own in macro-F1, F1 0; ``unknown_gold`` in the metrics
file counts them), with one warning naming how many and which labels; likewise, for a span model trained
without unanswerable questions, the unanswerable gold questions are counted (and warned about): it can never
answer "".

An existing ``--output`` is replaced only when it is an earlier prediction file of this tool (every line, up
to the first 1000, one of the records above) or with ``--overwrite``; an ``--output`` inside a model export,
training checkpoint or data_prep dataset directory is refused (``--overwrite`` does not apply). Both checks
run before the model is loaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.encode import EncodeError, TextEncoder  # noqa: E402
from data_prep.format import FormatError  # noqa: E402
from pipeline import finetuning as ft  # noqa: E402
from pipeline.choice import ChoiceDataError  # noqa: E402
from pipeline.inference import CONFIG_FILE, WEIGHTS_FILE, ExportError, kept_directory  # noqa: E402
from pipeline.reading import SpanDataError  # noqa: E402

log = logging.getLogger("predict")


class PredictError(ValueError):
    """A model directory or input that cannot be used; the message names the fix."""


class FineTuned:
    """A saved fine-tuned model: ``AmbertForClassification`` + its tokenizers + task.json."""

    def __init__(self, directory: str | Path):
        from safetensors.torch import load_file

        from pipeline.inference import build_backbone, check_vocabularies

        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise PredictError(f"model directory {self.directory} does not exist; give a directory saved by "
                               f"`python -m pipeline.finetune ... --save-models` (OUTPUT/{ft.MODELS_DIR}/seed<k>)")
        task_file = self.directory / ft.TASK_FILE
        if not task_file.is_file():
            raise PredictError(f"{self.directory} has no {ft.TASK_FILE}: it is not a fine-tuned model; give a directory "
                               f"saved by `python -m pipeline.finetune ... --save-models` (OUTPUT/{ft.MODELS_DIR}/seed<k>)")
        try:
            self.task = json.loads(task_file.read_text(encoding="utf-8"))
            problem = _task_problem(self.task)
        except (OSError, ValueError) as exc:
            problem = str(exc)
        if problem:
            raise PredictError(f"{task_file} is damaged ({problem}); save the model again (fine-tune with --save-models)")
        missing = [name for name in (WEIGHTS_FILE, CONFIG_FILE, ft.HEADS_FILE) if not (self.directory / name).is_file()]
        if missing:
            raise PredictError(f"{self.directory} has no {' / '.join(missing)}: the fine-tuned model is incomplete; save "
                               f"it again (fine-tune with --save-models)")
        try:
            pretrained = ft.resolve_pretrained(str(self.directory), flag="model", allow_random=False)
        except (ft.FinetuneError, ExportError) as exc:
            raise PredictError(f"{exc} (for a fine-tuned model: save it again, fine-tuning with --save-models)") from None
        self.encoder = TextEncoder(pretrained.tokenizer_dir)
        check_vocabularies(pretrained.model_config, len(self.encoder.fine_vocab), len(self.encoder.coarse_vocab),
                           str(self.directory))
        self.labels = ft.LabelSet.from_names(self.task["labels"]) if self.task["labels"] else None
        self.model = ft.AmbertForClassification(build_backbone(pretrained.model_config, pretrained.state_dict),
                                                len(self.labels) if self.labels else 2, self.task["task"])
        try:
            heads = load_file(str(self.directory / ft.HEADS_FILE))
            self.model.heads.load_state_dict(heads)
        except Exception as exc:  # noqa: BLE001 - safetensors' own error type, torch's size mismatches, OSError
            raise PredictError(f"{self.directory / ft.HEADS_FILE} cannot be loaded ({' '.join(str(exc).split())[:200]}); "
                               f"save the model again (fine-tune with --save-models)") from None
        self.device = ft.default_device()  # a GPU when there is one
        self.model.to(self.device).eval()
        limit = pretrained.model_config.max_position_embeddings
        self.max_fine = min(self.task["max_length"], limit)
        self.max_coarse = min(self.task["max_coarse_length"] or self.task["max_length"], limit)

    def _forward(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """The model's outputs for a batch of encoded examples, back on the CPU."""
        return {k: v.cpu() for k, v in self.model(ft.to_device(ft.collate(examples), self.device)).items()}

    # ---- the tasks ------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_sequence(self, texts: list, pairs: list | None, batch_size: int, path: str = "input") -> list[dict]:
        examples = [ft.encode_example(self.encoder, t, pairs[i] if pairs else None, self.max_fine, self.max_coarse,
                                      ft._where(path, i)) for i, t in enumerate(texts)]
        out = []
        for start in _progress(range(0, len(examples), batch_size), len(examples), batch_size, path):
            probabilities = self._forward(examples[start:start + batch_size])["logits"].float().softmax(-1)
            for row in probabilities.numpy():
                out.append({"label": self.labels.names[int(row.argmax())],
                            "probabilities": {name: round(float(p), 6) for name, p in zip(self.labels.names, row)}})
        return out

    @torch.no_grad()
    def predict_token(self, token_lists: list, batch_size: int, path: str = "input") -> list[dict]:
        encoded = []
        cut = 0
        for i, units in enumerate(token_lists):
            enc, owner = self.encoder.encode_units(units, ft._where(path, i))
            example = ft.build_example([enc], self.max_fine, self.max_coarse)
            kept = int(example["kept_fine"][0])
            cut += len(set(owner[kept:].tolist()) - set(owner[:kept].tolist()))
            encoded.append((example, owner[:kept], len(units)))
        if cut:
            log.warning("WARNING: %d input tokens of %s are past the model's length limit (max_length %d of "
                        "task.json): their tags are null", cut, path, self.max_fine)
        out = []
        for start in _progress(range(0, len(encoded), batch_size), len(encoded), batch_size, path):
            chunk = encoded[start:start + batch_size]
            logits = self._forward([e for e, _, _ in chunk])["logits"]
            for row, (_, owner, n_units) in zip(logits.argmax(-1).numpy(), chunk):
                tags: list = [None] * n_units
                for position in range(len(owner) - 1, -1, -1):  # backwards: each unit ends with its FIRST token's tag
                    tags[int(owner[position])] = self.labels.names[int(row[1 + position])]
                out.append({"tags": tags})
        return out

    def predict_span(self, path: str, fields: dict, batch_size: int) -> tuple[list[dict], object]:
        from pipeline import reading

        examples = reading.read_span_file(path, fields["question_field"], fields["context_field"],
                                          fields["answers_field"], require_answers=False)
        ft.warn_if_other_language(self.encoder, [e.context for e in examples[:ft.LANGUAGE_CHECK_EXAMPLES]], path,
                                  str(self.directory))
        split = reading.encode_span_split(self.encoder, examples, path, self.max_fine, self.max_coarse,
                                          self.task["max_query_length"], self.task["doc_stride"], training=False)
        texts, _ = reading.predict_answers(self.model, split, batch_size, self.task["max_answer_length"],
                                           self.task["allow_null"])
        return [{"id": e.id, "answer": t} for e, t in zip(split.examples, texts)], split

    @torch.no_grad()
    def predict_choice(self, path: str, fields: dict, batch_size: int) -> tuple[list[dict], list]:
        from pipeline import choice

        examples = choice.read_choice_file(path, fields["context_field"], fields["question_field"],
                                           fields["choices_field"], fields["label_field"], require_labels=False,
                                           no_context_hint=False)  # the model was fine-tuned with a context
        ft.warn_if_other_language(self.encoder, [f"{e.context}\n{e.question}" for e in examples[:ft.LANGUAGE_CHECK_EXAMPLES]],
                                  path, str(self.directory))
        encoded = choice.encode_choice_split(self.encoder, examples, path, self.max_fine, self.max_coarse)
        for item in encoded:
            item.pop("label", None)  # the gold answer is scored by the caller, never given to the model
        out = []
        for start in _progress(range(0, len(encoded), batch_size), len(encoded), batch_size, path):
            probabilities = self._forward(encoded[start:start + batch_size])["logits"].softmax(-1)
            for row, example in zip(probabilities.numpy(), examples[start:start + batch_size]):
                row = row[:len(example.options)]
                best = int(row.argmax())
                out.append({"id": example.id, "answer": best, "option": example.options[best],
                            "probabilities": [round(float(p), 6) for p in row]})
        return out, examples


def _task_problem(task) -> str | None:
    """What is wrong with a task.json's content, or None."""
    if not isinstance(task, dict):
        return "not a JSON object"
    kinds = {"task": str, "labels": list, "max_length": int, "max_coarse_length": int}
    if task.get("task") == "span":
        kinds.update(max_query_length=int, doc_stride=int, max_answer_length=int, allow_null=bool)
    for key, kind in kinds.items():
        if not isinstance(task.get(key), kind):
            return f"{key!r} is {'missing' if key not in task else repr(task[key])[:40]}"
    if task["task"] not in ft.TASKS:
        return f"unknown task {task['task']!r}"
    if task["task"] in ("sequence", "token") and len(task["labels"]) < 2:
        return f"{len(task['labels'])} labels"
    return None


def _progress(steps, total: int, batch_size: int, path: str):
    """``steps`` (batch starts), logging a progress line with the rate and ETA every 30 s."""
    started = last = time.time()
    for start in steps:
        if start and time.time() - last >= ft.PROGRESS_SECONDS:
            rate = start / (time.time() - started)
            log.info("predicting %s: %d/%d examples (%.0f/s, ETA %.0f s)", path, start, total, rate, (total - start) / rate)
            last = time.time()
        yield start


def _token_rows(token_lists: list, path: str, field: str) -> None:
    for i, units in enumerate(token_lists):
        if not isinstance(units, (list, tuple)) or not all(isinstance(u, str) for u in units):
            wrong = units if not isinstance(units, (list, tuple)) else next(u for u in units if not isinstance(u, str))
            raise PredictError(f"{ft._where(path, i)}: {field!r} holds {str(wrong)[:40]!r} (of type "
                               f"{type(wrong).__name__}); give a list of tokens, each a string")


def _gold(values: list, path: str, what: str) -> list[int]:
    """Indices of the rows with a gold value; warns when some rows have none."""
    rows = [i for i, v in enumerate(values) if v is not None]
    if rows and len(rows) < len(values):
        log.warning("WARNING: %d of the %d rows of %s have no %s (null or missing): the metrics are over the other %d",
                    len(values) - len(rows), len(values), path, what, len(rows))
    return rows


def _report_with_unknown_gold(labels: ft.LabelSet, predicted: list[str], gold: list, path: str, what: str) -> dict:
    """``ft.classification_report`` of the ``predicted`` label names against the ``gold`` values, where gold
    values the model was not fine-tuned on are allowed (fine-tuning refuses them: a classifier cannot learn a
    class it never saw; for predicting, they are the data's, and every row is predicted all the same).

    Such rows are COUNTED WRONG, not left out: the model cannot predict their label, so leaving them out would
    score it only on the rows it can get right and inflate the accuracy of the file it was given. Each unknown
    label is a class of its own, never predicted (recall and F1 0, counted in macro-F1): what scikit-learn
    gives on the label strings. ``unknown_gold`` in the report counts them; one warning names them."""
    gold = [ft.label_name(g) for g in gold]  # as LabelSet.ids: numeric labels are their strings ("10", 1.0 -> "1")
    unknown = sorted({g for g in gold if g not in labels.index})
    names = list(labels.names) + unknown
    index = {name: i for i, name in enumerate(names)}
    report = ft.classification_report(np.asarray([index[p] for p in predicted], dtype=np.int64),
                                       np.asarray([index[g] for g in gold], dtype=np.int64), names)
    if unknown:
        count = sum(g not in labels.index for g in gold)
        report["unknown_gold"] = count
        log.warning("WARNING: %d of the %d scored %s of %s have a gold label the model was not fine-tuned on (%s%s; the "
                    "model's: %s): they are predicted like the others, and counted wrong in the metrics",
                    count, len(gold), what, path, unknown[:10], f" and {len(unknown) - 10} more" if len(unknown) > 10 else "",
                    labels.names[:20])
    return report


# ---- --output: what may be replaced -------------------------------------------------------------
PREDICTION_LINES_CHECKED = 1000
"""How many lines of an existing --output are checked to be prediction records before it may be replaced."""
_LONGEST_LINE = 1 << 24  # bytes; a longer "line" (e.g. a binary file without line breaks) is no prediction record


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_prediction_record(record) -> bool:
    """Whether a parsed JSON line has exactly the shape of a record this tool writes (the module docstring)."""
    if not isinstance(record, dict):
        return False
    keys = set(record)
    if keys == {"label", "probabilities"}:  # sequence
        probabilities = record["probabilities"]
        return (isinstance(record["label"], str) and isinstance(probabilities, dict) and record["label"] in probabilities
                and all(_number(p) for p in probabilities.values()))
    if keys == {"tags"}:  # token
        return isinstance(record["tags"], list) and all(t is None or isinstance(t, str) for t in record["tags"])
    if keys == {"id", "answer"}:  # span
        return isinstance(record["answer"], str) and isinstance(record["id"], (str, int)) and not isinstance(record["id"], bool)
    if keys == {"id", "answer", "option", "probabilities"}:  # choice
        answer, probabilities = record["answer"], record["probabilities"]
        return (isinstance(answer, int) and not isinstance(answer, bool) and isinstance(record["option"], str)
                and isinstance(probabilities, list) and 0 <= answer < len(probabilities)
                and all(_number(p) for p in probabilities))
    return False


def _is_prediction_file(path: Path) -> bool:
    """Whether ``path`` is a prediction file this tool wrote: JSON lines whose first PREDICTION_LINES_CHECKED
    lines (all of them in a shorter file; at least one) are prediction records of one shape. A data file
    (it has input columns: text, tokens, question, ...), a model's weights, an empty file are not."""
    shapes = set()
    try:
        with open(path, "rb") as f:
            for _ in range(PREDICTION_LINES_CHECKED):
                line = f.readline(_LONGEST_LINE)
                if not line:
                    break
                if not line.lstrip().startswith(b"{"):
                    return False
                record = json.loads(line)
                if not _is_prediction_record(record):
                    return False
                shapes.add(frozenset(record))
    except (OSError, ValueError):  # unreadable; not UTF-8 / not JSON (UnicodeDecodeError, JSONDecodeError)
        return False
    return len(shapes) == 1


def _is_metrics_file(path: Path) -> bool:
    """Whether ``path`` is a ``<output>.metrics.json`` this tool wrote (a JSON object with "examples" and a score)."""
    try:
        if path.stat().st_size > _LONGEST_LINE:
            return False
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(metrics, dict) and _number(metrics.get("examples"))
            and any(_number(metrics.get(k)) for k in ("accuracy", "exact_match")))


def output_problem(output: str | Path, overwrite: bool = False) -> str | None:
    """Why predictions must not be written to ``output`` (None: they may); checked before the model is loaded,
    and again just before writing. Refused: a path inside a model export, training checkpoint or data_prep
    dataset directory (always); an existing file that is not an earlier prediction file of this tool, or a
    ``<output>.metrics.json`` that is not its metrics (unless ``overwrite``)."""
    path = Path(output)
    what = kept_directory(path.absolute().parent)
    if what:
        return (f"--output {output} is inside {what}: predictions do not belong there; give a path outside it "
                f"(--overwrite does not apply)")
    if overwrite:
        return None
    if path.exists():
        if not path.is_file():
            return f"--output {output} exists and is not a regular file; give a new path"
        if not _is_prediction_file(path):
            return (f"--output {output} already exists and is not a prediction file of pipeline.predict (its lines are "
                    f"not prediction records): writing would replace it; give a new path, or pass --overwrite to "
                    f"replace it")
    metrics = path.with_name(path.name + ".metrics.json")
    if metrics.exists() and not _is_metrics_file(metrics):
        return (f"{metrics}, where the metrics of --output {output} go, already exists and is not a metrics file of "
                f"pipeline.predict: writing would replace (or remove) it; give a new --output path, or pass "
                f"--overwrite to replace it")
    return None


def run(args: argparse.Namespace) -> dict | None:
    model = FineTuned(args.model)
    task = model.task
    fields = {name: getattr(args, name) or task.get(name) or name.removesuffix("_field") for name in
              ("text_field", "text_pair_field", "label_field", "tokens_field", "tags_field", "question_field",
               "context_field", "answers_field", "choices_field")}
    if not args.context_field and "context_field" in task:  # "" in task.json: fine-tuned without a context
        fields["context_field"] = task["context_field"]
    kind = task["task"]
    metrics = None
    if kind == "span":
        from pipeline import reading

        predictions, split = model.predict_span(args.input, fields, args.batch_size)
        rows = _gold([e.answers if e.has_gold else None for e in split.examples], args.input, "answers")
        unanswerable = [split.examples[i].id for i in rows if not split.examples[i].answers]
        if unanswerable and not task["allow_null"]:
            # the span form of a gold label the model never saw: it was fine-tuned without unanswerable questions,
            # so it always answers; as in the other tasks, they are predicted and counted (wrong), not left out
            log.warning("WARNING: %d of the %d scored questions of %s are unanswerable (no gold answer; ids %s%s) but "
                        "the model was fine-tuned without unanswerable questions and always answers: they are predicted "
                        "like the others, and counted wrong in the metrics", len(unanswerable), len(rows), args.input,
                        unanswerable[:5], " ..." if len(unanswerable) > 5 else "")
        if rows:
            metrics = reading.span_report([predictions[i]["answer"] for i in rows],
                                          [[text for text, _ in split.examples[i].answers] for i in rows], split.language)
    elif kind == "choice":
        from pipeline.choice import choice_report

        predictions, examples = model.predict_choice(args.input, fields, args.batch_size)
        if all(e.label is None for e in examples):
            log.info("%s has no gold answers (for rows: column %r, --label-field; for ChID rows: answers): no metrics",
                     args.input, fields["label_field"])
        rows = _gold([e.label for e in examples], args.input, fields["label_field"])
        # no unknown-gold case here: a gold answer is an index into the question's own options (checked when
        # read), and the model scores each option alone, whatever their number
        if rows:
            metrics = choice_report(np.asarray([predictions[i]["answer"] for i in rows]),
                                    np.asarray([examples[i].label for i in rows]))
    else:
        table = ft.load_table(args.input)
        if len(table) == 0:
            raise PredictError(f"{args.input} has no examples")
        if kind == "sequence":
            texts = ft._column(table, fields["text_field"], args.input, "text_field")
            has_pairs = fields["text_pair_field"] in table.column_names
            if has_pairs != bool(task.get("pairs", False)):
                raise PredictError(
                    f"{args.input} {'has' if has_pairs else 'has no'} column {fields['text_pair_field']!r} but the model "
                    f"was fine-tuned on {'text pairs' if task.get('pairs') else 'single texts'}: give the input "
                    f"{'that column' if task.get('pairs') else 'without it (or rename it)'}")
            pairs = table[fields["text_pair_field"]] if has_pairs else None
            ft.warn_if_other_language(model.encoder, texts[:ft.LANGUAGE_CHECK_EXAMPLES], args.input, args.model)
            predictions = model.predict_sequence(texts, pairs, args.batch_size, args.input)
            if fields["label_field"] in table.column_names:
                gold = table[fields["label_field"]]
                rows = _gold(gold, args.input, fields["label_field"])
                if rows:
                    metrics = _report_with_unknown_gold(model.labels, [predictions[i]["label"] for i in rows],
                                                        [gold[i] for i in rows], args.input, "rows")
        else:
            token_lists = ft._column(table, fields["tokens_field"], args.input, "tokens_field")
            _token_rows(token_lists, args.input, fields["tokens_field"])
            ft.warn_if_other_language(model.encoder, [" ".join(u) for u in token_lists[:ft.LANGUAGE_CHECK_EXAMPLES]],
                                      args.input, args.model)
            gold = table[fields["tags_field"]] if fields["tags_field"] in table.column_names else None
            if gold is not None:
                for i, (units, tags) in enumerate(zip(token_lists, gold)):
                    if tags is not None and (not isinstance(tags, (list, tuple)) or len(tags) != len(units)):
                        raise PredictError(f"{ft._where(args.input, i)}: {len(units)} tokens but "
                                           f"{len(tags) if isinstance(tags, (list, tuple)) else repr(tags)[:30]} tags; "
                                           f"give one tag per token")
            predictions = model.predict_token(token_lists, args.batch_size, args.input)
            if gold is not None:
                rows = _gold(gold, args.input, fields["tags_field"])
                pairs = [(p, g) for i in rows for p, g in zip(predictions[i]["tags"], gold[i]) if p is not None]
                if pairs:
                    metrics = _report_with_unknown_gold(model.labels, [p for p, _ in pairs], [g for _, g in pairs],
                                                        args.input, "tokens")
    output = Path(args.output)
    metrics_file = output.with_name(output.name + ".metrics.json")
    problem = output_problem(output, getattr(args, "overwrite", False))  # again: a file may have appeared meanwhile
    if problem:
        raise PredictError(f"{problem} (nothing was written)")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        # the earlier metrics go first: an interruption between the two writes leaves new predictions without
        # metrics, never next to an earlier run's; each file is replaced atomically (never half-written)
        metrics_file.unlink(missing_ok=True)
        ft.write_atomically(output, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions))
        if metrics is not None:
            ft.write_atomically(metrics_file, json.dumps(metrics, indent=1))
    except OSError as exc:
        raise PredictError(f"cannot write --output {output} ({exc.strerror or exc}); give a path in a writable "
                           f"directory") from None
    log.info("%d predictions -> %s", len(predictions), output)
    if metrics is not None:
        shown = {k: round(v, 4) for k, v in metrics.items() if k in ("accuracy", "macro_f1", "exact_match", "f1")}
        if metrics.get("unknown_gold"):
            shown["unknown_gold (counted wrong)"] = metrics["unknown_gold"]
        log.info("metrics against the gold column of %s: %s -> %s", args.input, shown, metrics_file)
    return metrics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a fine-tuned model directory (pipeline.finetune --save-models: OUTPUT/models/seed<k>)")
    parser.add_argument("--input", required=True, help="examples to predict (.jsonl/.json/.csv/.tsv/.parquet, also compressed)")
    parser.add_argument("--output", required=True, help="JSON-lines file of predictions, one per input example")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --output (and its .metrics.json) even when it is not an earlier "
                             "prediction file (those are replaced without it); never the input, never inside a model, "
                             "checkpoint or dataset directory")
    parser.add_argument("--batch-size", type=int, default=64, help="examples per forward pass (default: 64)")
    for name in ("text_field", "text_pair_field", "label_field", "tokens_field", "tags_field", "question_field",
                 "context_field", "answers_field", "choices_field"):
        parser.add_argument("--" + name.replace("_", "-"), default="", help="column name (default: the one fine-tuning used)")
    args = parser.parse_args(argv)
    # the values argparse cannot check: one error line (main), not the usage block of parser.error
    if args.batch_size < 1:
        raise PredictError("--batch-size must be >= 1")
    if not Path(args.input).is_file():
        raise PredictError(f"--input {args.input} does not exist")
    if Path(args.output).is_dir():
        raise PredictError(f"--output {args.output} is a directory; give a file name")
    if Path(args.output).resolve() in (Path(args.input).resolve(), Path(args.input + ".metrics.json").resolve()):
        raise PredictError(f"--output {args.output} would overwrite the input (or its metrics); give another file name")
    ancestor = Path(args.output).absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise PredictError(f"--output {args.output} cannot be written: {ancestor} is {'not a directory' if not ancestor.is_dir() else 'not writable'}")
    problem = output_problem(args.output, args.overwrite)  # before any work: the model is loaded after this
    if problem:
        raise PredictError(problem)
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # megatron-core's start-up notes (Megatron-FSDP, ...)
    try:
        args = parse_args(argv)
        run(args)
    except (PredictError, ft.FinetuneError, SpanDataError, ChoiceDataError, ExportError, FormatError, EncodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
