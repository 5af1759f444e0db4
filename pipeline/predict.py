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
- span: ``{"id": ..., "answer": ...}`` ("" = no answer, only for models trained with unanswerable questions).

When the input has the gold column, the metrics (as fine-tuning reports them: accuracy and macro-F1,
per input token for token tasks; exact match and F1 for span tasks) are printed and written to
``<output>.metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.encode import EncodeError, TextEncoder  # noqa: E402
from data_prep.format import FormatError  # noqa: E402
from pipeline import finetuning as ft  # noqa: E402
from pipeline.inference import ExportError  # noqa: E402
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
        task_file = self.directory / ft.TASK_FILE
        if not task_file.is_file():
            raise PredictError(f"{self.directory} has no {ft.TASK_FILE}: it is not a fine-tuned model; give a directory "
                               f"saved by `python -m pipeline.finetune ... --save-models` (OUTPUT/{ft.MODELS_DIR}/seed<k>)")
        try:
            self.task = json.loads(task_file.read_text(encoding="utf-8"))
            self.task["task"]
        except (ValueError, KeyError, TypeError) as exc:
            raise PredictError(f"{task_file} is damaged ({exc}); save the model again (fine-tune with --save-models)") from None
        pretrained = ft.resolve_pretrained(str(self.directory), flag="model", allow_random=False)
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
        self.model.eval()
        limit = pretrained.model_config.max_position_embeddings
        self.max_fine = min(self.task["max_length"], limit)
        self.max_coarse = min(self.task["max_coarse_length"] or self.task["max_length"], limit)

    # ---- the three tasks ------------------------------------------------------------------------
    @torch.no_grad()
    def predict_sequence(self, texts: list, pairs: list | None, batch_size: int) -> list[dict]:
        examples = [ft.encode_example(self.encoder, t, pairs[i] if pairs else None, self.max_fine, self.max_coarse,
                                      f"example {i + 1}") for i, t in enumerate(texts)]
        out = []
        for start in range(0, len(examples), batch_size):
            probabilities = self.model(ft.collate(examples[start:start + batch_size]))["logits"].float().softmax(-1)
            for row in probabilities.numpy():
                out.append({"label": self.labels.names[int(row.argmax())],
                            "probabilities": {name: round(float(p), 6) for name, p in zip(self.labels.names, row)}})
        return out

    @torch.no_grad()
    def predict_token(self, token_lists: list, batch_size: int) -> list[dict]:
        encoded = []
        for i, units in enumerate(token_lists):
            enc, owner = self.encoder.encode_units(units, f"example {i + 1}")
            example = ft.build_example([enc], self.max_fine, self.max_coarse)
            encoded.append((example, owner[:int(example["kept_fine"][0])], len(units)))
        out = []
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start:start + batch_size]
            logits = self.model(ft.collate([e for e, _, _ in chunk]))["logits"]
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
        split = reading.encode_span_split(self.encoder, examples, path, self.max_fine, self.max_coarse,
                                          self.task["max_query_length"], self.task["doc_stride"], training=False)
        texts, _ = reading.predict_answers(self.model, split, batch_size, self.task["max_answer_length"],
                                           self.task["allow_null"])
        return [{"id": e.id, "answer": t} for e, t in zip(split.examples, texts)], split


def run(args: argparse.Namespace) -> dict | None:
    model = FineTuned(args.model)
    task = model.task
    fields = {name: getattr(args, name) or task[name] for name in
              ("text_field", "text_pair_field", "label_field", "tokens_field", "tags_field", "question_field",
               "context_field", "answers_field")}
    kind = task["task"]
    metrics = None
    if kind == "span":
        from pipeline import reading

        predictions, split = model.predict_span(args.input, fields, args.batch_size)
        golds = [[text for text, _ in e.answers] for e in split.examples]
        if any(golds):
            metrics = reading.span_report([p["answer"] for p in predictions], golds, split.language)
    else:
        table = ft.load_table(args.input)
        if len(table) == 0:
            raise PredictError(f"{args.input} has no examples")
        if kind == "sequence":
            texts = ft._column(table, fields["text_field"], args.input, "text_field")
            pairs = table[fields["text_pair_field"]] if fields["text_pair_field"] in table.column_names else None
            predictions = model.predict_sequence(texts, pairs, args.batch_size)
            if fields["label_field"] in table.column_names:
                gold = model.labels.ids(table[fields["label_field"]], args.input)
                predicted = model.labels.ids([p["label"] for p in predictions], args.input)
                metrics = ft.classification_report(np.asarray(predicted), np.asarray(gold), model.labels.names)
        else:
            token_lists = ft._column(table, fields["tokens_field"], args.input, "tokens_field")
            predictions = model.predict_token(token_lists, args.batch_size)
            if fields["tags_field"] in table.column_names:
                pairs = [(p, g) for record, tags in zip(predictions, table[fields["tags_field"]])
                         for p, g in zip(record["tags"], tags) if p is not None]
                gold = model.labels.ids([g for _, g in pairs], args.input)
                predicted = model.labels.ids([p for p, _ in pairs], args.input)
                metrics = ft.classification_report(np.asarray(predicted), np.asarray(gold), model.labels.names)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    ft.write_atomically(output, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions))
    log.info("%d predictions -> %s", len(predictions), output)
    if metrics is not None:
        shown = {k: round(v, 4) for k, v in metrics.items() if k in ("accuracy", "macro_f1", "exact_match", "f1")}
        log.info("metrics against the gold column of %s: %s", args.input, shown)
        ft.write_atomically(output.with_name(output.name + ".metrics.json"), json.dumps(metrics, indent=1))
    return metrics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a fine-tuned model directory (pipeline.finetune --save-models: OUTPUT/models/seed<k>)")
    parser.add_argument("--input", required=True, help="examples to predict (.jsonl/.json/.csv/.tsv/.parquet, also compressed)")
    parser.add_argument("--output", required=True, help="JSON-lines file of predictions, one per input example")
    parser.add_argument("--batch-size", type=int, default=64)
    for name in ("text_field", "text_pair_field", "label_field", "tokens_field", "tags_field", "question_field",
                 "context_field", "answers_field"):
        parser.add_argument("--" + name.replace("_", "-"), default="", help="column name (default: the one fine-tuning used)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if not Path(args.input).is_file():
        parser.error(f"--input {args.input} does not exist")
    if Path(args.output).is_dir():
        parser.error(f"--output {args.output} is a directory; give a file name")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    try:
        run(args)
    except (PredictError, ft.FinetuneError, SpanDataError, ExportError, FormatError, EncodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
