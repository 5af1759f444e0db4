"""Fine-tuning AMBERT (and the BERT baselines) on sequence and token classification, span extraction and
multiple choice.

Sequence classification follows the paper: three classifiers, on the fine [CLS] vector, on the coarse
[CLS] vector and on their concatenation; the loss is the sum of their cross-entropies plus
``agreement_weight`` (lambda) x ||softmax(fine logits) - softmax(coarse logits)||_2 (mean over the
batch), and predictions come from the concatenation head. Single-granularity baselines (bert-fine,
bert-coarse) have one head on their [CLS]. Token classification (tagging: NER, word segmentation as
BIES) classifies each FINE token from its vector concatenated with the vector of the coarse token
covering it (``fine_to_coarse``). Span extraction (reading comprehension, SQuAD / CMRC 2018) puts
start and end logits on the same per-token vectors (``pipeline/reading.py``). Multiple choice (RACE, C3)
scores each option's [CLS] context [SEP] question option [SEP] with the sequence heads (one output
each) and takes the softmax over a question's options: the same three-classifier loss
(``pipeline/choice.py``).

Inputs are local JSON lines / CSV / parquet files read with HF datasets (columns: text [, text_pair],
label for sequence tasks; tokens, tags (one tag per token) for token tasks; question, context,
answers for span tasks, or SQuAD's nested JSON; context, question, choices, label for multiple choice,
or C3's nested JSON), tokenized with
``data_prep.encode.TextEncoder``: exactly the tokenizers of the pre-training dataset.

The loop (``run``): resolve the pre-trained weights and tokenizers -> check vocabularies -> load and
encode train/dev/test (labels from train; unseen dev/test labels are an error) -> for each seed:
fresh copy of the backbone + new heads -> train with AdamW + linear warm-up/decay, evaluating on dev
every ``eval_every`` steps, early stopping after ``patience`` evaluations without improvement ->
restore the best dev state -> evaluate ONCE on test -> results.json (per seed + mean/std).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data_prep.encode import EncodedText, EncodeError, TextEncoder
from data_prep.format import CLS_ID, PAD_ID, SEP_ID
from pipeline.batch import IGNORE_INDEX, Batch

log = logging.getLogger("finetune")
TASKS = ("sequence", "token", "span", "choice")
METRICS = {"sequence": ("accuracy", "macro_f1"), "token": ("accuracy", "macro_f1"), "span": ("exact_match", "f1"),
           "choice": ("accuracy",)}
"""Each task's metrics: the first is the default --metric, both are logged and reported."""
RESULTS_FILE = "results.json"
PARTIAL_RESULTS_FILE = "results.partial.json"  # the finished seeds of a run stopped by Ctrl-C
MODELS_DIR = "models"  # OUTPUT/models/seed<k>: each seed's fine-tuned model (--save-models)
TASK_FILE = "task.json"  # in a saved fine-tuned model: the task, labels and encoding settings
HEADS_FILE = "heads.safetensors"  # in a saved fine-tuned model: the task heads (the backbone is model.safetensors)


class FinetuneError(ValueError):
    """Bad fine-tuning input (data, labels, model/tokenizer mismatch); the message names the fix."""


class FinetuneInterrupted(KeyboardInterrupt):
    """Ctrl-C during a seed: the message says what was kept and what to run."""


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------
@dataclass
class FinetuneConfig:
    """One fine-tuning run (several seeds). Every field is a ``--flag`` of pipeline/finetune.py."""

    model: str = ""
    """Exported model dir (model.safetensors + config.json), a training checkpoint dir (step_XXXXXXXX
    with COMPLETE), or random:RECIPE[:VARIANT] (no pre-training; needs --dataset)."""
    dataset: str = ""
    """Pre-training dataset dir whose tokenizers to use (default: the export's own copy, or the
    dataset recorded in the checkpoint)."""
    train: str = ""
    """Training file (.jsonl/.json/.csv/.tsv/.parquet)."""
    dev: str = ""
    """Dev file: model selection and early stopping."""
    test: str = ""
    """Test file: evaluated once, with the best dev state, at the end (optional)."""
    output: str = "runs/finetune"
    """Directory for results.json (and the log)."""
    overwrite: bool = False
    """Replace the results.json an earlier run left in --output (refused without this flag)."""
    task: str = "sequence"
    """sequence (one label per text [pair]) | token (one tag per input token) | span (answer span in a
    context: reading comprehension) | choice (the right one of a question's options: RACE, C3)."""
    text_field: str = "text"
    """Column with the text (sequence tasks)."""
    text_pair_field: str = "text_pair"
    """Column with the second text of a pair (used when present)."""
    label_field: str = "label"
    """Column with the label (sequence tasks); the right option for choice tasks: a 0-based index, a letter
    (A = the first option) or the option's text."""
    tokens_field: str = "tokens"
    """Column with the list of input tokens (token tasks)."""
    tags_field: str = "tags"
    """Column with one tag per input token (token tasks)."""
    question_field: str = "question"
    """Column with the question (span and choice tasks)."""
    context_field: str = "context"
    """Column with the context the answer is in (span and choice tasks; for choice a list of strings is joined
    with line breaks, and '' means questions without a context)."""
    answers_field: str = "answers"
    """Column with the answers: {"text": [...], "answer_start": [...]} or [{"text", "answer_start"}]; empty =
    unanswerable (span tasks; a SQuAD-format .json needs no column names)."""
    choices_field: str = "choices"
    """Column with each question's list of options (choice tasks; RACE: options, C3: choice)."""
    max_query_length: int = 64
    """Longest question in fine tokens; longer ones are cut (span tasks)."""
    doc_stride: int = 128
    """Fine tokens between the starts of a long context's overlapping windows (span tasks)."""
    max_answer_length: int = 30
    """Longest predicted answer in fine tokens (span tasks)."""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """One fine-tuning run per seed (fresh heads, same pre-trained weights)."""
    epochs: float = 3.0
    """Passes over the training set (upper bound: early stopping may end sooner)."""
    batch_size: int = 32
    """Examples per optimizer step (choice tasks: questions, each with all its options)."""
    lr: float = 5e-5
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.01
    """AdamW weight decay (not on biases and norms)."""
    warmup_ratio: float = 0.1
    """Share of the steps with a linear warm-up, then linear decay to 0."""
    max_length: int = 128
    """Longest fine sequence incl. [CLS]/[SEP] (capped by the model's max_position_embeddings)."""
    max_coarse_length: int = 0
    """Longest coarse sequence; 0 = max_length."""
    agreement_weight: float = 1.0
    """lambda of the agreement term ||y_fine - y_coarse||_2 (AMBERT sequence tasks)."""
    classifier_dropout: float = 0.1
    """Dropout on the vectors fed to the classifiers."""
    eval_every: int = 0
    """Evaluate on dev every N steps; 0 = once per epoch."""
    patience: int = 3
    """Stop after this many dev evaluations without improvement; 0 = never stop early."""
    metric: str = ""
    """Dev metric for model selection: accuracy | macro_f1 (sequence, token), exact_match | f1 (span),
    accuracy (choice); empty = the task's first."""
    max_train_examples: int = 0
    """Use only the first N training examples (0 = all): quick runs."""
    eval_batch_size: int = 64
    """Examples per evaluation batch."""
    threads: int = 0
    """torch threads (0 = torch's default)."""
    save_models: bool = False
    """Save each seed's fine-tuned model (its best dev state) to OUTPUT/models/seed<k>/: the backbone as an
    export (usable as --model and by pipeline.inference), the task heads and task.json, for
    `python -m pipeline.predict`."""
    tensorboard: bool = True
    """Write TensorBoard event files to OUTPUT/tensorboard/<date-time>-seed<k> (train loss and learning
    rate per step, dev loss and metrics per evaluation: accuracy / macro-F1, or exact match / F1 for
    span tasks); --no-tensorboard turns it off."""
    deepspeed: bool = False
    """Data-parallel fine-tuning with a DeepSpeed engine, one process per rank, started by a launcher
    (deepspeed / torchrun / mpirun); --batch-size is the global batch, split over the ranks."""
    deepspeed_config: str = ""
    """DeepSpeed JSON for --deepspeed (ZeRO stage, precision); default ZeRO-1 fp32. Batch keys are set here."""

    @property
    def selection_metric(self) -> str:
        """The dev metric that picks the best state (--metric, or the task's default)."""
        return self.metric or METRICS[self.task][0]

    def validate(self) -> None:
        def fail(name: str, problem: str) -> None:
            raise FinetuneError(f"--{name.replace('_', '-')}: {problem}")

        if not self.model:
            fail("model", "required: an exported model dir, a checkpoint dir, or random:RECIPE")
        for name in ("train", "dev"):
            if not getattr(self, name):
                fail(name, "required (a .jsonl/.csv/.parquet file)")
        for name in ("train", "dev", "test"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                fail(name, f"{path} is a directory, not a data file" if Path(path).is_dir() else f"{path} does not exist")
        if self.task not in TASKS:
            fail("task", f"unknown task {self.task!r}; use one of {TASKS}")
        if self.metric and self.metric not in METRICS[self.task]:
            fail("metric", f"use {' or '.join(METRICS[self.task])} for --task {self.task}")
        if not self.seeds:
            fail("seeds", "give at least one seed")
        repeated = sorted({s for s in self.seeds if self.seeds.count(s) > 1})
        if repeated:  # the same run twice: its mean and std over seeds would count it twice
            fail("seeds", f"seed {', '.join(map(str, repeated))} given more than once; give distinct seeds, e.g. "
                          f"--seeds 1 2 3")
        for name in ("batch_size", "max_length", "eval_batch_size", "max_query_length", "doc_stride", "max_answer_length"):
            if getattr(self, name) < 1:
                fail(name, "must be >= 1")
        if self.max_length < 4:
            fail("max_length", "must leave room for [CLS], [SEP] and tokens (>= 4)")
        if self.max_coarse_length != 0 and self.max_coarse_length < 4:  # a smaller one empties every example
            fail("max_coarse_length", "must leave room for [CLS], [SEP] and tokens (>= 4), or be 0 (= --max-length)")
        if self.epochs <= 0 or self.lr <= 0:
            fail("epochs" if self.epochs <= 0 else "lr", "must be > 0")
        if not 0 <= self.warmup_ratio < 1:
            fail("warmup_ratio", "must be in [0, 1)")
        if self.agreement_weight < 0:
            fail("agreement_weight", "must be >= 0")
        if self.weight_decay < 0:
            fail("weight_decay", "must be >= 0 (a negative decay pushes weights away from 0)")
        if any(seed < 0 for seed in self.seeds):
            fail("seeds", f"{[s for s in self.seeds if s < 0]}: seeds must be >= 0 (NumPy refuses negative seeds)")
        if not 0 <= self.classifier_dropout < 1:
            fail("classifier_dropout", "must be in [0, 1)")
        for name in ("patience", "max_train_examples", "eval_every", "threads"):
            if getattr(self, name) < 0:
                fail(name, "must be >= 0 (0 = off / all / the default)")
        if self.output and Path(self.output).exists() and not Path(self.output).is_dir():
            fail("output", f"{self.output} is an existing file; give a directory")
        if self.output:  # it is created at the end: its nearest existing ancestor must be a writable directory
            ancestor = Path(self.output).absolute()
            while not ancestor.exists() and ancestor != ancestor.parent:
                ancestor = ancestor.parent
            if not ancestor.is_dir():
                fail("output", f"{self.output} cannot be created: {ancestor} is a file, not a directory; give an "
                               f"--output whose parent folders are directories")
            if not os.access(ancestor, os.W_OK | os.X_OK):
                created = "" if ancestor == Path(self.output).absolute() else f"{self.output} cannot be created: "
                fail("output", f"{created}{ancestor} is not writable by this user; give an --output in a directory "
                               f"you can write to")
        from pipeline.inference import kept_directory

        inside = kept_directory(self.output)
        if inside:
            fail("output", f"{self.output} is (inside) {inside}: fine-tuning results and models do not belong there; "
                           f"give an --output outside it")
        results = Path(self.output) / RESULTS_FILE
        if results.is_file() and not self.overwrite:
            fail("output", f"{results} already holds the results of an earlier run; choose another --output, "
                           f"or pass --overwrite to replace them")
        if self.task == "span" and self.max_query_length + 4 > self.max_length:
            fail("max_query_length", f"{self.max_query_length} leaves no room for the context in --max-length "
                                     f"{self.max_length}; lower it or raise --max-length")
        if self.deepspeed:
            world = int(os.environ.get("WORLD_SIZE", os.environ.get("OMPI_COMM_WORLD_SIZE", "1")))
            if self.batch_size % world:
                fail("batch_size", f"{self.batch_size} is not divisible by the {world} ranks; use a multiple of {world}")
            if self.deepspeed_config and not Path(self.deepspeed_config).is_file():
                fail("deepspeed_config", f"{self.deepspeed_config} does not exist")
            if self.deepspeed_config:
                try:
                    zero = json.loads(Path(self.deepspeed_config).read_text(encoding="utf-8")).get("zero_optimization") or {}
                except (OSError, ValueError, AttributeError) as exc:
                    fail("deepspeed_config", f"{self.deepspeed_config} is not a DeepSpeed JSON object ({exc})")
                offload = zero.get("offload_optimizer") or {} if isinstance(zero, dict) else {}
                if isinstance(offload, dict) and str(offload.get("device", "none")).lower() in ("cpu", "nvme"):
                    # DeepSpeed runs ZeRO-Offload only with its own CPU Adam; fine-tuning passes its own AdamW
                    # (decay groups): deepspeed.initialize refused it after the model was loaded
                    fail("deepspeed_config", f"{self.deepspeed_config} offloads the optimizer "
                                             f"(offload_optimizer.device={offload.get('device')}), which fine-tuning "
                                             f"does not support: give a config without offload (ds_configs/zero1.json "
                                             f"or zero2.json; the default is ZeRO-1)")


# ---------------------------------------------------------------------------------------------
# Examples: [CLS] A [SEP] (B [SEP]) on both granularities, truncated at coarse boundaries
# ---------------------------------------------------------------------------------------------
def _truncate(segments: list[EncodedText], fine_budget: int, coarse_budget: int) -> list[int]:
    """How many coarse tokens of each segment to keep so both budgets hold (longest segment shrinks
    first, as BERT's longest-first truncation). Cutting at coarse tokens keeps the alignment exact."""
    cums = [np.concatenate([[0], np.cumsum(s.align)]) for s in segments]
    if len(segments) == 1:
        k = int(np.searchsorted(cums[0], fine_budget, side="right")) - 1
        return [min(k, coarse_budget, len(segments[0].coarse))]
    keep = [len(s.coarse) for s in segments]
    while sum(int(c[k]) for c, k in zip(cums, keep)) > fine_budget or sum(keep) > coarse_budget:
        longest = max(range(len(segments)), key=lambda i: (int(cums[i][keep[i]]), keep[i]))
        keep[longest] -= 1
    return keep


def build_example(segments: list[EncodedText], max_fine: int, max_coarse: int) -> dict[str, np.ndarray]:
    """Add the special tokens to 1 or 2 encoded segments: ids, segment ids and fine_to_coarse."""
    specials = len(segments) + 1
    keep = _truncate(segments, max_fine - specials, max_coarse - specials)
    fine, coarse, f_types, c_types, f2c = [CLS_ID], [CLS_ID], [0], [0], [0]
    kept_fine = []
    for s, (seg, k) in enumerate(zip(segments, keep)):
        n_fine = int(seg.align[:k].sum())
        base = len(coarse)
        fine += seg.fine[:n_fine].tolist() + [SEP_ID]
        coarse += seg.coarse[:k].tolist() + [SEP_ID]
        f2c += (base + np.repeat(np.arange(k), seg.align[:k])).tolist() + [base + k]
        f_types += [s] * (n_fine + 1)
        c_types += [s] * (k + 1)
        kept_fine.append(n_fine)
    return {
        "fine_ids": np.asarray(fine, np.int64), "coarse_ids": np.asarray(coarse, np.int64),
        "fine_token_types": np.asarray(f_types, np.int64), "coarse_token_types": np.asarray(c_types, np.int64),
        "fine_to_coarse": np.asarray(f2c, np.int64), "kept_fine": np.asarray(kept_fine, np.int64),
    }


def encode_example(encoder: TextEncoder, text: str, text_pair: str | None, max_fine: int, max_coarse: int,
                   where: str = "example") -> dict[str, np.ndarray]:
    segments = [encoder.encode(text, where)]
    if text_pair is not None:
        segments.append(encoder.encode(text_pair, where + " (text_pair)"))
    example = build_example(segments, max_fine, max_coarse)
    example["cut_fine"] = sum(len(s.fine) for s in segments) - int(example["kept_fine"].sum())  # past the limit
    return example


def encode_token_example(encoder: TextEncoder, tokens: Sequence[str], tag_ids: Sequence[int], max_fine: int,
                         max_coarse: int, where: str = "example") -> dict[str, np.ndarray]:
    """A tagging example: the tag of each fine token is the tag of the input token it belongs to."""
    if len(tokens) != len(tag_ids):
        raise FinetuneError(f"{where}: {len(tokens)} tokens but {len(tag_ids)} tags; give one tag per token")
    enc, owner = encoder.encode_units(tokens, where)
    example = build_example([enc], max_fine, max_coarse)
    n = int(example["kept_fine"][0])
    labels = np.full(len(example["fine_ids"]), IGNORE_INDEX, dtype=np.int64)
    labels[1:1 + n] = np.asarray(tag_ids, dtype=np.int64)[owner[:n]]
    example["token_labels"] = labels
    example["cut_fine"] = len(enc.fine) - n  # tagged tokens past the length limit: neither trained on nor scored
    return example


def collate(examples: Sequence[dict]) -> Batch:
    """Pad a list of examples into the pipeline/batch.py contract (+ labels / token_labels)."""
    if "options" in examples[0]:  # multiple choice: a row per option
        from pipeline.choice import collate_choices

        return collate_choices(examples)
    batch: Batch = {}
    for g in ("fine", "coarse"):
        length = max(len(e[f"{g}_ids"]) for e in examples)
        ids = torch.full((len(examples), length), PAD_ID, dtype=torch.long)
        types = torch.zeros((len(examples), length), dtype=torch.long)
        mask = torch.zeros((len(examples), length), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e[f"{g}_ids"])
            ids[i, :n] = torch.from_numpy(e[f"{g}_ids"])
            types[i, :n] = torch.from_numpy(e[f"{g}_token_types"])
            mask[i, :n] = 1
        batch[f"{g}_ids"], batch[f"{g}_token_types"], batch[f"{g}_attention_mask"] = ids, types, mask
    fine_length = batch["fine_ids"].shape[1]
    f2c = torch.full((len(examples), fine_length), -1, dtype=torch.long)
    for i, e in enumerate(examples):
        f2c[i, :len(e["fine_to_coarse"])] = torch.from_numpy(e["fine_to_coarse"])
    batch["fine_to_coarse"] = f2c
    if "label" in examples[0]:
        batch["labels"] = torch.tensor([e["label"] for e in examples], dtype=torch.long)
    if "start_position" in examples[0]:
        from pipeline.reading import collate_positions

        batch.update(collate_positions(examples))
    if "token_labels" in examples[0]:
        labels = torch.full((len(examples), fine_length), IGNORE_INDEX, dtype=torch.long)
        for i, e in enumerate(examples):
            labels[i, :len(e["token_labels"])] = torch.from_numpy(e["token_labels"])
        batch["token_labels"] = labels
    return batch


# ---------------------------------------------------------------------------------------------
# Heads and losses
# ---------------------------------------------------------------------------------------------
def three_classifier_loss(fine_logits: torch.Tensor, coarse_logits: torch.Tensor, joint_logits: torch.Tensor,
                          labels: torch.Tensor, agreement_weight: float) -> dict[str, torch.Tensor]:
    """The paper's fine-tuning loss: CE(fine) + CE(coarse) + CE(joint) + lambda * mean_b ||p_fine - p_coarse||_2."""
    ce = {name: F.cross_entropy(logits.float(), labels)
          for name, logits in (("fine", fine_logits), ("coarse", coarse_logits), ("joint", joint_logits))}
    difference = fine_logits.float().softmax(-1) - coarse_logits.float().softmax(-1)
    agreement = difference.norm(p=2, dim=-1).mean()
    loss = ce["fine"] + ce["coarse"] + ce["joint"] + agreement_weight * agreement
    return {"loss": loss, "fine_ce": ce["fine"], "coarse_ce": ce["coarse"], "joint_ce": ce["joint"],
            "agreement": agreement}


def _linear(inputs: int, outputs: int, std: float) -> nn.Linear:
    layer = nn.Linear(inputs, outputs)
    nn.init.normal_(layer.weight, std=std)
    nn.init.zeros_(layer.bias)
    return layer


class AmbertForClassification(nn.Module):
    """A pre-trained AmbertForPreTraining (its ``encode``) + classification heads.

    ``task="sequence"``: heads ``fine``, ``coarse`` and ``joint`` (AMBERT variants) or one head named
    after the granularity (BERT baselines); ``logits`` = the joint (resp. the only) head.
    ``task="token"``: one head over [fine vector ; vector of the covering coarse token] per fine token
    (bert-fine: the fine vector; bert-coarse: the covering coarse vector). ``task="span"``: the same
    per-token vectors, a head with two outputs: start and end logits (``num_labels`` is ignored).
    ``task="choice"``: the sequence heads with one output, a score per option; ``logits`` etc. are
    [questions, options] (``num_labels`` is ignored)."""

    def __init__(self, backbone: nn.Module, num_labels: int, task: str = "sequence", dropout: float = 0.1,
                 agreement_weight: float = 1.0):
        super().__init__()
        if task not in TASKS:
            raise FinetuneError(f"unknown task {task!r}; use one of {TASKS}")
        self.backbone = backbone
        self.task = task
        self.num_labels = num_labels
        self.agreement_weight = agreement_weight
        config = backbone.config
        self.granularities = config.granularities
        hidden, std = config.hidden_size, config.init_std
        self.dropout = nn.Dropout(dropout)
        if task == "choice":
            num_labels = 1
        if task in ("token", "span"):
            self.heads = nn.ModuleDict({task: _linear(len(self.granularities) * hidden, num_labels if task == "token" else 2, std)})
        elif len(self.granularities) == 2:
            self.heads = nn.ModuleDict({"fine": _linear(hidden, num_labels, std), "coarse": _linear(hidden, num_labels, std),
                                        "joint": _linear(2 * hidden, num_labels, std)})
        else:
            self.heads = nn.ModuleDict({self.granularities[0]: _linear(hidden, num_labels, std)})

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        hidden = self.backbone.encode(batch)
        if self.task == "token":
            return self._token_forward(batch, hidden)
        if self.task == "span":
            return self._span_forward(batch, hidden)
        cls = {g: self.dropout(hidden[f"{g}_hidden"][:, 0]) for g in self.granularities}
        out: dict[str, torch.Tensor] = {}
        labels = batch.get("labels")
        shape = (lambda scores: scores) if self.task == "sequence" else self._per_question(batch)
        if len(self.granularities) == 2:
            out["fine_logits"] = shape(self.heads["fine"](cls["fine"]))
            out["coarse_logits"] = shape(self.heads["coarse"](cls["coarse"]))
            out["logits"] = shape(self.heads["joint"](torch.cat([cls["fine"], cls["coarse"]], dim=-1)))
            if labels is not None:
                out.update(three_classifier_loss(out["fine_logits"], out["coarse_logits"], out["logits"], labels,
                                                 self.agreement_weight))
        else:
            g = self.granularities[0]
            out["logits"] = shape(self.heads[g](cls[g]))
            if labels is not None:
                out["loss"] = F.cross_entropy(out["logits"].float(), labels)
        return out

    @staticmethod
    def _per_question(batch: Batch):
        """Choice tasks: a score per option row -> [questions, options], missing options at the minimum."""
        from pipeline.choice import to_grid

        return lambda scores: to_grid(scores, batch)

    def _token_features(self, batch: Batch, hidden: dict) -> torch.Tensor:
        """[fine vector ; vector of the covering coarse token] per fine token (dropout applied)."""
        parts = []
        if "fine" in self.granularities:
            parts.append(hidden["fine_hidden"])
        if "coarse" in self.granularities:
            coarse = hidden["coarse_hidden"]
            index = batch["fine_to_coarse"].clamp(min=0)  # -1 at padding: any row, its label is ignored
            parts.append(torch.gather(coarse, 1, index.unsqueeze(-1).expand(-1, -1, coarse.shape[-1])))
        return self.dropout(torch.cat(parts, dim=-1))

    def _token_forward(self, batch: Batch, hidden: dict) -> dict[str, torch.Tensor]:
        logits = self.heads["token"](self._token_features(batch, hidden))
        out = {"logits": logits}
        if "token_labels" in batch:
            out["loss"] = F.cross_entropy(logits.float().reshape(-1, self.num_labels), batch["token_labels"].reshape(-1),
                                          ignore_index=IGNORE_INDEX)
        return out

    def _span_forward(self, batch: Batch, hidden: dict) -> dict[str, torch.Tensor]:
        """Start / end logits per fine token (padding at the dtype's minimum); loss = mean of the two
        cross-entropies over the sequence (BERT's SQuAD loss)."""
        logits = self.heads["span"](self._token_features(batch, hidden)).float()
        padding = batch["fine_attention_mask"] == 0
        start, end = (x.squeeze(-1).masked_fill(padding, torch.finfo(torch.float32).min) for x in logits.split(1, dim=-1))
        out = {"start_logits": start, "end_logits": end}
        if "start_positions" in batch:
            out["loss"] = (F.cross_entropy(start, batch["start_positions"]) + F.cross_entropy(end, batch["end_positions"])) / 2
        return out


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------
def classification_report(predictions: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> dict:
    """accuracy, macro-F1 and per-class precision / recall / F1 / support.

    Macro-F1 averages over the classes that occur in the gold labels OR the predictions (as
    scikit-learn's ``f1_score(average="macro")``): a class predicted but absent from the gold set
    counts with F1 0, so predicting it is penalised instead of ignored."""
    k = len(names)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    tp = np.diag(confusion).astype(np.float64)
    predicted, support = confusion.sum(0), confusion.sum(1)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=(precision + recall) > 0)
    present = (support > 0) | (predicted > 0)
    return {
        "accuracy": float(tp.sum() / max(len(labels), 1)),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "examples": int(len(labels)),
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                             "support": int(support[i])} for i, name in enumerate(names)},
    }


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
_COMPRESSED = (".gz", ".xz", ".bz2")  # text files only (HF datasets decompresses them by their suffix)


def _file_type(path: str) -> tuple[str, str | None]:
    """(".jsonl" | ".json" | ".csv" | ".tsv" | ".parquet", compression suffix or None) of a data file."""
    name = Path(path)
    compression = name.suffix.lower() if name.suffix.lower() in _COMPRESSED else None
    suffix = Path(name.stem).suffix.lower() if compression else name.suffix.lower()
    if suffix not in _BUILDERS or (compression and suffix == ".parquet"):
        raise FinetuneError(f"{path}: unknown file type {name.suffix.lower()!r}; use one of {sorted(_BUILDERS)}, the "
                            f"text ones also compressed ({', '.join(_COMPRESSED)}, e.g. train.jsonl.xz)")
    return suffix, compression


def _open_binary(path: str, compression: str | None):
    import bz2
    import gzip
    import lzma

    return {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}.get(compression, open)(path, "rb")


def check_utf8(path: str, compression: str | None) -> None:
    """FinetuneError naming the line, the byte, the encoding the bytes look like and the iconv command
    when ``path`` is not UTF-8 (HF datasets read a GB18030 JSON-lines file without complaint and failed on
    its first string, deep in pyarrow, with a bare UnicodeDecodeError)."""
    import codecs

    from data_prep.inputs import guess_encoding, guess_encoding_of_head

    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset, line, utf8_before = 0, 1, False
    try:
        with _open_binary(path, compression) as fh:
            while chunk := fh.read(1 << 20):
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as exc:
                    start = max(exc.start, 0)
                    # valid multi-byte UTF-8 before: a damaged UTF-8 file, not another encoding
                    looks = guess_encoding(chunk[start:start + (1 << 16)]) if not utf8_before and chunk[:start].isascii() else None
                    line += chunk.count(b"\n", 0, start)
                    offset += start
                    break
                line += chunk.count(b"\n")
                offset += len(chunk)
                utf8_before = utf8_before or not chunk.isascii()
            else:
                try:
                    decoder.decode(b"", final=True)
                    return
                except UnicodeDecodeError:
                    looks = None
        if looks is None:  # valid UTF-8 before the error: damaged UTF-8, or another encoding that starts like it
            with _open_binary(path, compression) as fh:
                looks = guess_encoding_of_head(fh.read(1 << 20))
    except (OSError, EOFError):
        return  # the reader names a damaged file
    suffix = _file_type(path)[0]
    name = Path(path)
    stem = name.name[:len(name.name) - len(compression or "") - len(suffix)]
    target = name.with_name(f"{stem}.utf8{suffix}")
    source = f"{path} " if compression is None else ""
    unpack = {".gz": "gzip", ".xz": "xz", ".bz2": "bzip2"}.get(compression or "")
    pipe = f"{unpack} -dc {path} | " if unpack else ""
    encoding = looks.upper() if looks and looks != "latin-1" else "ENCODING"
    command = f"`{pipe}iconv -f {encoding} -t UTF-8 {source}> {target}`"
    hint = (f"it reads as {encoding}: convert it with {command}" if encoding != "ENCODING" else
            f"find its encoding (`file -i {path}`) and convert it with {command}")
    raise FinetuneError(f"{path} is not UTF-8 (line {line}, byte {offset:,}): {hint}, then give the converted file")


def load_table(path: str) -> datasets.Dataset:  # noqa: F821
    """A local file as an HF Dataset (offline)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    suffix, compression = _file_type(path)
    kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
    datasets.disable_progress_bars()
    try:
        with _open_binary(path, compression) as fh:
            start = fh.read(1 << 16)
    except (OSError, EOFError) as exc:  # a damaged or truncated compressed file
        raise FinetuneError(f"{path} cannot be read ({type(exc).__name__}: {exc}); fix or replace the file") from None
    if not start.strip():
        raise FinetuneError(f"{path} is empty: no examples")
    check_utf8(path, compression)
    try:
        return datasets.load_dataset(_BUILDERS[suffix], data_files={"data": str(path)}, split="data", **kwargs)
    except Exception as exc:  # noqa: BLE001 - datasets wraps the parser's error several levels deep
        cause = exc
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        where = _first_bad_json_line(path, compression) if suffix == ".jsonl" else None
        raise FinetuneError(f"{path} cannot be read as {suffix[1:]} ({where or f'{type(cause).__name__}: {cause}'}); "
                            f"fix the file (one JSON object a line for .jsonl; a header row for .csv/.tsv)") from None


def _first_bad_json_line(path: str, compression: str | None) -> str | None:
    """Where a JSON-lines file stops parsing, as an editor counts lines (HF datasets names a byte
    offset within a block, or a 0-based row)."""
    try:
        with _open_binary(path, compression) as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as exc:
                    return f"line {number} is not JSON: {exc}"
                if not isinstance(record, dict):
                    return f"line {number} holds a JSON {type(record).__name__}, not an object"
    except (OSError, EOFError):
        return None
    return None


def _where(path: str, i: int) -> str:
    """Example ``i`` (0-based) of a data file as a user finds it: data rows of a table are counted
    from 1 after the header; JSON lines from 1 over the records (blank lines are skipped)."""
    unit = "row" if _file_type(path)[0] in (".csv", ".tsv") else "record"
    return f"{path} {unit} {i + 1}"


def _column(table, name: str, path: str, what: str) -> list:
    if name not in table.column_names:
        raise FinetuneError(f"{path} has no column {name!r} ({what}); its columns are {table.column_names}: "
                            f"rename the column or pass --{what.replace('_', '-')} NAME")
    return table[name]


def label_name(value) -> str:
    """A label as the model names it: a whole float is its integer (a column of 0/1 is read as 1.0 from
    one file and as 1 from another: they were two classes, and a dev set's "1" unknown to training's "1.0")."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _is_number(name: str) -> bool:
    try:
        float(name)
        return True
    except ValueError:
        return False


class LabelSet:
    """Label names of the training set; ids are their sorted order (numbers numerically)."""

    def __init__(self, values: Sequence, path: str | None = None):
        distinct = set(values)
        if any(v is None for v in distinct):
            first = next(i for i, v in enumerate(values) if v is None)
            where = _where(path, first) if path else f"the training set's example {first + 1}"
            raise FinetuneError(f"{where} has no label (null; {sum(v is None for v in values)} such examples): drop "
                                f"or label them")
        path = path or "the training set"
        self.names = list(dict.fromkeys(label_name(v) for v in sorted(distinct, key=lambda v: (isinstance(v, str), v))))
        self.index = {name: i for i, name in enumerate(self.names)}
        numbers = [n for n in self.names if _is_number(n)]
        if numbers and len(numbers) < len(self.names):  # "pos"/"neg" and 1/0 in one column: four classes
            log.warning("WARNING: the labels of %s mix numbers (%s) and names (%s): each is a class of its own (%d "
                        "classes); if a number and a name mean the same class, write them the same way", path,
                        ", ".join(numbers[:5]), ", ".join([n for n in self.names if not _is_number(n)][:5]), len(self))

    @classmethod
    def from_names(cls, names: Sequence[str]) -> LabelSet:
        """The label set of a saved model: ``names`` in their saved (id) order."""
        labels = cls.__new__(cls)
        labels.names = list(names)
        labels.index = {name: i for i, name in enumerate(labels.names)}
        for name, i in list(labels.index.items()):  # a model saved before label_name: "1.0" is also "1"
            if name.endswith(".0") and name[:-2].lstrip("-").isdigit():
                labels.index.setdefault(name[:-2], i)
        return labels

    def __len__(self) -> int:
        return len(self.names)

    def ids(self, values: Sequence, path: str) -> list[int]:
        unseen = sorted({label_name(v) for v in values} - set(self.index))
        if unseen:
            raise FinetuneError(
                f"{path} has label(s) {unseen[:10]} that never occur in the training set (known: {self.names[:20]}); "
                f"a classifier cannot predict a class it never saw: fix the labels or add training examples")
        return [self.index[label_name(v)] for v in values]


LANGUAGE_CHECK_EXAMPLES = 200
"""How many training texts the language check looks at (cheap: the check is a pass of two regexes)."""


def warn_if_other_language(encoder: TextEncoder, texts: Sequence, path: str, model: str = "") -> str | None:
    """Log a WARNING when the first training texts do not look like the language of the model's tokenizers
    (data_prep's own check, the one its build applies to every input): English text given to a Chinese
    model is tokenized letter by letter, and silently trains on nonsense. Never an error (a task may mix
    languages on purpose) and never raises; returns the warning, or None."""
    try:
        shown = [t for t in texts[:LANGUAGE_CHECK_EXAMPLES] if isinstance(t, str)]
        sample = "\n".join(shown)[:256_000]
        if not sample.strip():
            return None
        problem = encoder.plugin.check_sample(sample, path)
        if not problem:
            return None
        from data_prep.english import cjk_fraction

        name = (getattr(encoder.plugin, "description", "") or "").split(":")[0] or encoder.language
        letters = sum(map(str.isalpha, sample))
        found = (f"{cjk_fraction(sample):.0%} of the letters in its first {len(shown)} texts are Chinese characters"
                 if letters else f"its first {len(shown)} texts contain no letters")
        model_part = f"model {model}" if model else "the model"
        message = (f"WARNING: {path} does not look like {name}, the language of {model_part} (the meta.json of its "
                   f"tokenizers, in {encoder.directory}, says language={encoder.language!r}): {found}. Its tokenizers "
                   f"would split such text badly (a Chinese model tokenizes English letter by letter); check that this "
                   f"is the right file, or use a model pre-trained on the language of the task")
    except Exception as exc:  # noqa: BLE001 - a warning only: it must never stop a run
        log.debug("language check of %s skipped: %s", path, exc)
        return None
    if _world()[1] == 0:  # once per job, not once per rank
        log.warning("%s", message)
    return message


def encode_split(config: FinetuneConfig, encoder: TextEncoder, path: str, labels: LabelSet | None,
                 max_fine: int, max_coarse: int, limit: int = 0) -> tuple[list[dict], LabelSet]:
    """Read one file and encode every example (labels from ``labels``, or a new LabelSet for train)."""
    table = load_table(path)
    if limit:
        table = table.select(range(min(limit, len(table))))
    if len(table) == 0:
        raise FinetuneError(f"{path} has no examples")
    examples: list[dict] = []
    started = time.time()
    if config.task == "sequence":
        texts = _column(table, config.text_field, path, "text_field")
        pairs = table[config.text_pair_field] if config.text_pair_field in table.column_names else None
        raw = _column(table, config.label_field, path, "label_field")
        if labels is None:  # the training file: is it in the model's language?
            head = texts[:LANGUAGE_CHECK_EXAMPLES]
            if pairs:
                head = [f"{t}\n{p}" if isinstance(p, str) else t for t, p in zip(head, pairs)]
            warn_if_other_language(encoder, head, path, config.model)
        for i, value in enumerate(raw):
            if isinstance(value, (list, tuple, dict)):
                raise FinetuneError(f"{_where(path, i)}: {config.label_field!r} holds a {type(value).__name__} "
                                    f"({str(value)[:60]}), not one label; give each example one label (a string or "
                                    f"a number), or use --task token for one tag per token")
        labels = labels or LabelSet(raw, path)
        ids = labels.ids(raw, path)
        for i, text in enumerate(texts):
            where = _where(path, i)
            example = encode_example(encoder, text, pairs[i] if pairs else None, max_fine, max_coarse, where)
            example["label"] = ids[i]
            examples.append(example)
    else:
        tokens = _column(table, config.tokens_field, path, "tokens_field")
        raw = _column(table, config.tags_field, path, "tags_field")
        for i, (units, tags) in enumerate(zip(tokens, raw)):
            for name, value in ((config.tokens_field, units), (config.tags_field, tags)):
                if not isinstance(value, (list, tuple)):
                    raise FinetuneError(f"{_where(path, i)}: {name!r} holds {type(value).__name__}, not a list; give "
                                        f"a list of tokens and a list of as many tags")
            # (a null tag is named by LabelSet, with the other unlabelled examples)
            for name, value, kinds in ((config.tokens_field, units, str), (config.tags_field, tags, (str, int, float, type(None)))):
                wrong = [v for v in value if not isinstance(v, kinds)][:1]
                if wrong:
                    raise FinetuneError(f"{_where(path, i)}: {name!r} holds {str(wrong[0])[:60]} (of type "
                                        f"{type(wrong[0]).__name__}); give {'each token as a string' if kinds is str else 'one tag (a string) per token'}")
        if labels is None:  # the training file: is it in the model's language?
            warn_if_other_language(encoder, [" ".join(map(str, units)) for units in tokens[:LANGUAGE_CHECK_EXAMPLES]],
                                   path, config.model)
        labels = labels or LabelSet([t for tags in raw for t in tags], path)
        for i, (units, tags) in enumerate(zip(tokens, raw)):
            where = _where(path, i)
            examples.append(encode_token_example(encoder, units, labels.ids(tags, path), max_fine, max_coarse, where))
        cut = [e["cut_fine"] for e in examples if e["cut_fine"]]
        if cut and _world()[1] == 0:
            total = sum(e["cut_fine"] + int(e["kept_fine"].sum()) for e in examples)
            log.warning("WARNING: %d of %d examples of %s are longer than --max-length %d (--max-coarse-length %d): "
                        "%d of the file's %d fine tokens (%.1f%%), at their ends, are cut off: neither trained on nor scored; raise "
                        "the limits (up to the model's max_position_embeddings) to tag every token", len(cut),
                        len(examples), path, max_fine, max_coarse, sum(cut), total, 100 * sum(cut) / total)
    log.info("encoded %d examples of %s in %.1f s", len(examples), path, time.time() - started)
    return examples, labels


def encode_span_split(config: FinetuneConfig, encoder: TextEncoder, path: str, max_fine: int, max_coarse: int,
                      training: bool, limit: int = 0):
    """Read and encode one reading-comprehension file (``pipeline.reading``): a SpanSplit."""
    from pipeline import reading

    try:
        examples = reading.read_span_file(path, config.question_field, config.context_field, config.answers_field, limit)
        if training:  # is it in the model's language?
            warn_if_other_language(encoder, [e.context for e in examples[:LANGUAGE_CHECK_EXAMPLES]], path, config.model)
        return reading.encode_span_split(encoder, examples, path, max_fine, max_coarse, config.max_query_length,
                                         config.doc_stride, training)
    except reading.SpanDataError as exc:
        raise FinetuneError(str(exc)) from None


def encode_choice_split(config: FinetuneConfig, encoder: TextEncoder, path: str, max_fine: int, max_coarse: int,
                        training: bool, limit: int = 0) -> list[dict]:
    """Read and encode one multiple-choice file (``pipeline.choice``)."""
    from pipeline import choice

    try:
        examples = choice.read_choice_file(path, config.context_field, config.question_field, config.choices_field,
                                           config.label_field, limit=limit)
        if training:  # is it in the model's language?
            warn_if_other_language(encoder, [f"{e.context}\n{e.question}\n{' '.join(e.options)}"
                                             for e in examples[:LANGUAGE_CHECK_EXAMPLES]], path, config.model)
        encoded = choice.encode_choice_split(encoder, examples, path, max_fine, max_coarse)
    except choice.ChoiceDataError as exc:
        raise FinetuneError(str(exc)) from None
    log.info("encoded %d questions (%d options) of %s", len(encoded), sum(len(e["options"]) for e in encoded), path)
    return encoded


def check_same_inputs(config: FinetuneConfig, train: list[dict], others: list[tuple[str, list[dict] | None]]) -> None:
    """Dev and test must give the model what training gave it: single texts, or text pairs. A model
    trained on pairs and selected / scored on single texts (or the reverse) gives meaningless numbers."""
    def has_pairs(examples: list[dict]) -> bool:
        return any(len(e["kept_fine"]) == 2 for e in examples)

    trained_on_pairs = has_pairs(train)
    for path, examples in others:
        if examples is not None and has_pairs(examples) != trained_on_pairs:
            with_pairs, without = (config.train, path) if trained_on_pairs else (path, config.train)
            raise FinetuneError(f"{with_pairs} has text pairs (column {config.text_pair_field!r}) but {without} has "
                                f"none: the model would be evaluated on other inputs than it was trained on; give "
                                f"every split the {config.text_pair_field!r} column (or none of them)")


# ---------------------------------------------------------------------------------------------
# Pre-trained weights
# ---------------------------------------------------------------------------------------------
@dataclass
class Pretrained:
    model_config: object
    state_dict: dict | None
    tokenizer_dir: Path
    source: str


def _pass_as(flag: str, value: str) -> str:
    """How to give ``value`` for ``flag`` in a message: ``--model OUT``, or ``OUT as MODEL`` (positional)."""
    return f"{flag} {value}" if flag.startswith("-") else f"{value} as {flag}"


def _checkpoint_state_dict(path: Path, flag: str = "--model") -> dict[str, torch.Tensor]:
    """fp32 weights of a DeepSpeed checkpoint saved at TP=1 (any ZeRO stage / DP size)."""
    import re

    # ZeRO-1/2 write mp_rank_XX_model_states.pt, ZeRO-3 zero_pp_rank_D_mp_rank_XX_model_states.pt.
    ranks = {m.group(1) for f in path.glob("*mp_rank_*_model_states.pt")
             if (m := re.search(r"mp_rank_(\d+)_model_states", f.name))}
    if len(ranks) > 1:
        raise FinetuneError(f"{path} was saved with tensor parallelism ({len(ranks)} TP ranks): export it with "
                            f"`python -m pipeline.convert export {path} OUT` (merges the TP shards) and pass {_pass_as(flag, 'OUT')}")
    if not ranks:
        raise FinetuneError(f"{path} has no *mp_rank_00_model_states.pt: not a DeepSpeed checkpoint")
    import contextlib
    import pickle
    import sys

    try:  # DeepSpeed prints its progress on stdout, which is the results' (inference --json: one JSON per line)
        with contextlib.redirect_stdout(sys.stderr):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    except (OSError, RuntimeError, EOFError, KeyError, ValueError, AssertionError, IndexError,
            pickle.UnpicklingError) as exc:  # a file deleted, truncated or overwritten after the save was committed
        first = " ".join(str(exc).split()).split(". ")[0][:200]  # torch's advice after the first sentence is long
        raise FinetuneError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {first}): one of its files is "
                            f"missing or damaged"
                            f"{_damaged_files(path)}. {_older_checkpoint(path, flag)}") from None
    return {k: v.float() for k, v in state.items()}


def _damaged_files(path: Path) -> str:
    """`` (cut short or corrupt: NAME, ...)`` for the checkpoint's .pt files that are not complete zip
    archives (torch.save's format): reads only the end of each file."""
    import zipfile

    damaged = []
    for f in sorted(path.glob("*.pt")):
        try:
            if not zipfile.is_zipfile(f):
                damaged.append(f.name)
        except OSError:
            damaged.append(f.name)
    return f" (cut short or corrupt: {', '.join(damaged)})" if damaged else ""


def _older_checkpoint(path: Path, flag: str) -> str:
    """What to pass instead of the damaged checkpoint ``path``: the newest older complete one of its folder."""
    from pipeline.checkpoint import complete_checkpoints

    older = [p for _, p in complete_checkpoints(path.parent) if p.name < path.name]
    if not older:
        return (f"No older complete checkpoint is left in {path.parent}: restore the files, or use another model "
                f"(an export made before the damage)")
    return f"Restore the files, or use the newest older complete checkpoint: pass {_pass_as(flag, str(older[-1]))}"


def _check_tokenizer_dir(dataset: str, flag: str = "--dataset") -> None:
    """``dataset`` must hold a dataset's (or an export's) tokenizer files; checked before any loading."""
    from data_prep.format import COARSE_VOCAB_FILE, FINE_VOCAB_FILE, META_FILE

    path = Path(dataset)
    if not path.is_dir():
        raise FinetuneError(f"{flag} {dataset} {'does not exist' if not path.exists() else 'is a file'}: give a "
                            f"pre-training dataset directory (data_prep/build.py) or an exported model")
    missing = [name for name in (META_FILE, FINE_VOCAB_FILE, COARSE_VOCAB_FILE) if not (path / name).is_file()]
    if missing:
        raise FinetuneError(f"{flag} {dataset} is not a pre-training dataset: it has no {', '.join(missing)}. Give a "
                            f"directory built by `python data_prep/build.py` (or an exported model, which carries them)")


def _check_random_model(model: str, flag: str = "--model") -> None:
    """``random:RECIPE[:VARIANT]`` must name a known recipe and variant (checked before any process group
    or tokenizer is set up)."""
    from pipeline.model import RECIPES, VARIANTS

    _, recipe, *variant = model.split(":")
    usage = "give random:RECIPE or random:RECIPE:VARIANT"
    if recipe not in RECIPES:
        raise FinetuneError(f"{flag} {model}: unknown model recipe {recipe!r}; known recipes: "
                            f"{', '.join(sorted(RECIPES))} ({usage})")
    if len(variant) > 1:
        raise FinetuneError(f"{flag} {model}: too many ':' parts; {usage}")
    if variant and variant[0] not in VARIANTS:
        raise FinetuneError(f"{flag} {model}: unknown variant {variant[0]!r}; known variants: "
                            f"{', '.join(VARIANTS)} ({usage})")


def _random_model_config(model: str, flag: str, recipe: str, overrides: dict):
    from pipeline.model import model_recipe

    try:
        config = model_recipe(recipe, **overrides)
        config.validate()
    except (TypeError, ValueError) as exc:
        raise FinetuneError(f"{flag} {model}: {exc}") from None
    return config


def _refuse_hugging_face_export(path: Path, flag: str) -> None:
    """A ``pipeline.export_hf`` output (BertForMaskedLM: the fine branch only) given where an AMBERT
    model is expected was told to get tokenizer files, then that its config.json is invalid."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # read_model_config names a damaged file
    if isinstance(config, dict) and (config.get("model_type") == "bert" or "BertForMaskedLM" in config.get("architectures", [])):
        raise FinetuneError(
            f"{flag} {path} is a Hugging Face BertForMaskedLM (written by `python -m pipeline.export_hf`): the fine "
            f"branch alone, for transformers. Give the AMBERT model it was made from: the export of "
            f"`python -m pipeline.convert export` or the training checkpoint (step_*)"
        )


def resolve_pretrained(model: str, dataset: str = "", flag: str = "--model", allow_random: bool = True,
                       same_dataset: bool = False) -> Pretrained:
    """Model config, weights and tokenizer directory of ``model`` (export, checkpoint or random:RECIPE).

    ``flag`` names the argument in messages; ``allow_random``: whether random:RECIPE is accepted;
    ``same_dataset`` (fine-tuning, inference, exports): without ``dataset``, refuse tokenizer files from a
    dataset that changed since the model was trained (``checkpointing.init_from`` leaves it off: it compares
    the vocabularies with its run's dataset, which may be that one rebuilt with --vocab-from)."""
    from pipeline.inference import (
        CONFIG_FILE,
        WEIGHTS_FILE,
        ExportError,
        load_state_dict,
        read_model_config,
        tokenizer_dir_of,
    )

    random_model = model.startswith("random:") and allow_random
    if random_model:
        _check_random_model(model, flag)  # the recipe and variant, before anything is read
    if dataset:
        _check_tokenizer_dir(dataset)
    if random_model:
        if not dataset:
            raise FinetuneError("--model random:RECIPE needs --dataset (the tokenizers and vocabulary sizes)")
        _, recipe, *variant = model.split(":")
        encoder_meta = TextEncoder(dataset)
        overrides = {"fine_vocab_size": len(encoder_meta.fine_vocab), "coarse_vocab_size": len(encoder_meta.coarse_vocab)}
        if variant:
            overrides["variant"] = variant[0]
        return Pretrained(_random_model_config(model, flag, recipe, overrides), None, Path(dataset), model)
    path = Path(model)
    if (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file():
        _refuse_hugging_face_export(path, flag)
        try:
            own = tokenizer_dir_of(path)
        except ExportError as exc:
            if not dataset:  # the tools that take --dataset; checkpointing.init_from uses the run's own
                raise FinetuneError(f"{exc}{'; or pass --dataset' if flag.startswith('-') else ''}") from None
            own = None
        if dataset and own is not None:
            _check_same_vocabularies(own, Path(dataset), path)
        if same_dataset and not dataset and own is not None and (path / "training.json").is_file():  # from a checkpoint
            try:
                changed = dataset_changed_since(json.loads((path / "training.json").read_text(encoding="utf-8")), own)
            except (ValueError, AttributeError):  # a damaged training.json: it only serves this check
                changed = None
            if changed and own == path:
                raise FinetuneError(f"the tokenizer files in {path} are not those of the dataset the model was trained "
                                    f"on: their dataset {changed.replace('the checkpoint', 'training.json')} (`convert "
                                    f"export` warned: it copied them from a dataset rebuilt after training). Copy "
                                    f"the original dataset's meta.json, vocabularies and tokenizer files into {path}")
            if changed:  # an export without tokenizer files: those of the dataset its training.json names
                raise FinetuneError(f"model {path} has no tokenizer files of its own, and the dataset it was trained on, "
                                    f"{own}, {changed.replace('the checkpoint', 'training.json')}: its tokenizer files "
                                    f"may give the ids other meanings. Pass --dataset with the dataset the model was "
                                    f"trained on (a copy of it); --dataset {own} uses the current files all the same")
        try:  # a config.json or model.safetensors damaged after the export: the file and the fix, no traceback
            return Pretrained(read_model_config(path), load_state_dict(path), Path(dataset) if dataset else own,
                              str(path))
        except ExportError as exc:
            raise FinetuneError(str(exc)) from None
    if (path / "COMPLETE").is_file():
        from pipeline.checkpoint import CheckpointError, read_marker
        from pipeline.model import ModelConfig

        try:
            marker = read_marker(path)
        except CheckpointError as exc:  # a damaged COMPLETE marker
            raise FinetuneError(str(exc)) from None
        if marker.get("universal"):  # its weights are in DeepSpeed's universal layout, not ZeRO shards
            raise FinetuneError(f"{path} is a universal checkpoint (`pipeline.convert universal`, for a run that continues "
                                f"at another layout): export it first, `python -m pipeline.convert export {path} OUT`, "
                                f"and pass {_pass_as(flag, 'OUT')}")
        try:
            model_config = ModelConfig.from_dict(marker["model_config"])
            model_config.validate()
        except (KeyError, TypeError, ValueError) as exc:
            raise FinetuneError(f"{path / 'COMPLETE'} records no usable model config ({type(exc).__name__}: {exc}): "
                                f"the checkpoint's marker was damaged. {_older_checkpoint(path, flag)}") from None
        tokenizer_dir = Path(dataset or marker.get("dataset_path", ""))
        if not dataset:
            if not (tokenizer_dir / "meta.json").is_file():
                raise FinetuneError(f"checkpoint {path} was trained on {tokenizer_dir}, which is not there: "
                                    f"pass --dataset with that dataset (its tokenizers)")
            changed = dataset_changed_since(marker, tokenizer_dir) if same_dataset else None
            if changed:
                raise FinetuneError(f"checkpoint {path} was trained on {tokenizer_dir}, which {changed}: its tokenizer "
                                    f"files may give the ids other meanings (a vocabulary rebuilt on other text keeps "
                                    f"its size). Pass --dataset with the dataset the model was trained on (a copy "
                                    f"of it); --dataset {tokenizer_dir} uses the current files all the same")
        else:
            original = Path(marker.get("dataset_path", ""))
            if (original / "meta.json").is_file():
                _check_same_vocabularies(original, tokenizer_dir, path)
            else:  # moved or deleted: the vocabularies' fingerprints its marker records (same sizes are not enough)
                _check_recorded_vocabularies(marker, tokenizer_dir, path)
        return Pretrained(model_config, _checkpoint_state_dict(path, flag), tokenizer_dir, str(path))
    from pipeline.checkpoint import why_not_a_checkpoint

    accepted = f"an exported model ({CONFIG_FILE} + {WEIGHTS_FILE})"
    accepted += (", a complete training checkpoint (step_NNNNNNNN) or random:RECIPE" if allow_random
                 else " or a complete training checkpoint (step_NNNNNNNN)")
    raise FinetuneError(f"{flag}: {why_not_a_checkpoint(path)}. Give {accepted}")


def dataset_changed_since(marker: dict, dataset: Path) -> str | None:
    """How the dataset at ``dataset`` differs from the one a checkpoint's ``marker`` was trained on (its
    fingerprint: vocabularies + split checksums), or None when it is the same or cannot be compared."""
    from data_prep.format import FormatError, PairedDataset

    recorded = marker.get("dataset_fingerprint")
    try:
        now = PairedDataset(dataset).fingerprint if recorded else None
    except (FormatError, OSError, ValueError):  # unreadable: the tokenizer loading that follows names it
        return None
    if now is None or now == recorded:
        return None
    return f"has been rebuilt or replaced since (dataset fingerprint {now}, the checkpoint records {recorded})"


def _check_same_vocabularies(original: Path, given: Path, checkpoint: Path) -> None:
    """Refuse tokenizers whose vocabularies differ from those the model was pre-trained with."""
    from data_prep.format import COARSE_VOCAB_FILE, FINE_VOCAB_FILE, Vocab

    for name in (FINE_VOCAB_FILE, COARSE_VOCAB_FILE):
        if Vocab.load(original / name).fingerprint() != Vocab.load(given / name).fingerprint():
            raise FinetuneError(
                f"--dataset {given}: its {name} differs from the one model {checkpoint} was pre-trained with "
                f"({original / name}): token ids would mean other tokens. Pass --dataset {original} (or omit --dataset)")


def _check_recorded_vocabularies(marker: dict, given: Path, checkpoint: Path) -> None:
    """Refuse tokenizers whose vocabularies differ from the fingerprints a checkpoint's marker records
    (``vocab_fingerprints``; markers written before them are not checked)."""
    from data_prep.format import COARSE_VOCAB_FILE, FINE_VOCAB_FILE, Vocab

    recorded = marker.get("vocab_fingerprints")
    if not isinstance(recorded, dict):
        return
    for side, name in (("fine", FINE_VOCAB_FILE), ("coarse", COARSE_VOCAB_FILE)):
        here = Vocab.load(given / name).fingerprint()
        if recorded.get(side) is not None and recorded[side] != here:
            raise FinetuneError(
                f"--dataset {given}: its {name} (fingerprint {here}) is not the one model {checkpoint} was pre-trained "
                f"with (fingerprint {recorded[side]}, in the dataset {marker.get('dataset_path')}, which is no longer "
                f"there): token ids would mean other tokens, even with vocabularies of the same size. Pass --dataset "
                f"with that dataset (a copy of it), or export the model while it is there (`python -m pipeline.convert "
                f"export`: the export keeps its tokenizer files)")


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def default_device() -> torch.device:
    """This process's GPU (its LOCAL_RANK's) when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters are (ZeRO-3's partitioned ones included); the CPU for a model without any."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def to_device(batch: Batch, device: torch.device | None) -> Batch:
    if device is None or device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _batches(examples: list[dict], batch_size: int, shuffle: bool, rng: random.Random | None = None,
             world: int = 1, rank: int = 0, device: torch.device | None = None):
    """Batches of ``batch_size`` examples (on ``device``); with ``world`` > 1 this rank's rows of each global batch."""
    order = list(range(len(examples)))
    if shuffle:
        rng.shuffle(order)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        if world > 1:
            if len(rows) < world:
                break
            rows = rows[rank::world]
        yield to_device(collate([examples[i] for i in rows]), device)


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _deepspeed_config(config: FinetuneConfig, world: int) -> dict:
    ds = {"zero_optimization": {"stage": 1}, "steps_per_print": 10**9}
    if config.deepspeed_config:
        ds = json.loads(Path(config.deepspeed_config).read_text(encoding="utf-8"))
    ds.update(train_batch_size=config.batch_size, train_micro_batch_size_per_gpu=config.batch_size // world,
              gradient_accumulation_steps=1, gradient_clipping=1.0)
    ds.pop("optimizer", None)  # ours (AdamW with decay groups) is passed as a client optimizer
    ds.pop("scheduler", None)
    return ds


def setup_deepspeed(seed: int) -> None:
    """Process group from the launcher's environment (or MPI), megatron TP=1 state."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    from pipeline import parallel

    parallel.init_distributed()  # (warns first about a stale lock of DeepSpeed's CPU-op build)
    try:
        parallel.agree_on_startup()  # a rank that failed its checks before this point stops every rank
    except parallel.PeerStartupError as exc:
        raise FinetuneError(str(exc)) from None
    parallel.initialize_parallel(tensor_parallel_size=1, seed=seed)


def _flag_value(name: str, value, with_flag: bool = True) -> str:
    """``--seeds 1 2``, ``--lr 0.001``, ``--deepspeed`` / ``--no-deepspeed`` (without the flag: ``1 2``)."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value) if value != "" else "''"
    return f"{flag} {shown}" if with_flag else shown


def check_same_settings(config: FinetuneConfig) -> None:
    """Collective, on every rank after the process group exists: every rank's settings must equal
    rank 0's (a rank started with another --seed or --lr would silently train differently). On any
    difference every rank raises the same FinetuneError naming each flag and rank."""
    from pipeline import parallel

    differences = parallel.settings_differing_from_rank0(asdict(config))
    if differences:
        listed = "; ".join(f"rank {rank}: {_flag_value(name, mine)} (rank 0: {_flag_value(name, ours, False)})"
                           for name, rank, mine, ours in differences)
        raise FinetuneError(f"the ranks were started with different settings: {listed}; every rank must run the "
                            f"same command")


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: an interrupted write (kill,
    full disk) leaves ``path`` as it was (absent, or the previous complete file), never half-written."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            temporary.unlink()
        except OSError:
            pass
        raise


@torch.no_grad()
def predict(model: AmbertForClassification, examples: list[dict], batch_size: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(predictions, gold labels, mean loss) over ``examples`` (token tasks: over labelled fine tokens)."""
    was_training = model.training
    model.eval()
    predictions, gold, losses, weights = [], [], [], []
    for batch in _batches(examples, batch_size, shuffle=False, device=model_device(model)):
        out = model(batch)
        if model.task == "token":
            keep = batch["token_labels"] != IGNORE_INDEX
            predictions.append(out["logits"].argmax(-1)[keep].cpu().numpy())
            gold.append(batch["token_labels"][keep].cpu().numpy())
        else:
            predictions.append(out["logits"].argmax(-1).cpu().numpy())
            gold.append(batch["labels"].cpu().numpy())
        if len(gold[-1]):  # a batch's loss is its mean: weighted by its size, the short last batch weighs less
            losses.append(float(out["loss"]))
            weights.append(len(gold[-1]))
    model.train(was_training)
    loss = float(np.average(losses, weights=weights)) if weights else float("nan")
    return np.concatenate(predictions), np.concatenate(gold), loss


def _optimizer(model: nn.Module, config: FinetuneConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    seen = set()
    for name, param in model.named_parameters():
        if id(param) in seen or not param.requires_grad:
            continue  # tied weights appear twice
        seen.add(id(param))
        (no_decay if param.dim() < 2 or "norm" in name else decay).append(param)
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)


def _tensorboard(config: FinetuneConfig, seed: int):
    """A TensorBoard writer for this seed's curves in OUTPUT/tensorboard/<date-time>-seed<k> (rank 0), or None."""
    if not config.tensorboard or not config.output:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter

        # one folder per run and seed: an earlier run's curves (kept, as its results.json is until the new
        # one is complete) show as another run in TensorBoard instead of mixing with these
        return SummaryWriter(str(Path(config.output) / "tensorboard" / f"{time.strftime('%Y%m%d-%H%M%S')}-seed{seed}"))
    except Exception as exc:  # noqa: BLE001 - logging must never stop training
        log.warning("TensorBoard disabled: %s", exc)
        return None


PROGRESS_SECONDS = 30.0  # fine-tuning logs a train-loss line this often between dev evaluations


def _gathered(model: torch.nn.Module, modifier_rank: int | None):
    """ZeRO-3's full parameters for the duration of the block (a no-op for any other model)."""
    import contextlib

    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def weights_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the model's weights. Under ZeRO-3 the parameters are empty placeholders outside a
    gather: ``model.state_dict()`` held shape-(0,) tensors, and restoring it changed nothing (the model
    kept its last step's weights while results.json named the best step's)."""
    with _gathered(model, modifier_rank=None):
        return {k: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                for k, v in model.state_dict().items()}  # (megatron's _extra_state entries are None)


def restore_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a ``weights_snapshot`` back (under ZeRO-3: into the gathered parameters, re-partitioned
    from rank 0's copy on the way out; every rank holds the same snapshot)."""
    with _gathered(model, modifier_rank=0):
        model.load_state_dict(state)


def train_seed(config: FinetuneConfig, pretrained: Pretrained, labels: LabelSet, train: list[dict], dev: list[dict],
               test: list[dict] | None, seed: int, seeds_after: int = 0) -> dict:
    """Fine-tune from the pre-trained weights with one seed; returns curves and dev/test reports.
    ``seeds_after``: how many seeds run after this one (for the ETA of the whole run)."""
    from pipeline import parallel
    from pipeline.inference import build_backbone, ensure_single_process

    # The parallel state first: its first set-up seeds the generators (1234), which would otherwise
    # re-seed the first seed's run after set_seed below (results depended on the order of --seeds).
    ensure_single_process()
    parallel.set_seed(seed)
    backbone = build_backbone(pretrained.model_config, pretrained.state_dict)
    model = AmbertForClassification(backbone, len(labels) if labels is not None else 2, config.task,
                                    config.classifier_dropout, config.agreement_weight)
    if not config.deepspeed:  # (DeepSpeed places the model on its rank's device itself)
        model.to(default_device())
    metric_names = METRICS[config.task]
    span = config.task == "span"
    allow_null = bool(span and train.has_unanswerable)  # SQuAD 2.0 style: "no answer" can be predicted

    def evaluate(split) -> tuple[dict, float, dict | None]:
        """(report, mean loss, each question's prediction by id: the answer text for span tasks, the option's
        index for choice tasks; None for the others) on a dev / test split."""
        if span:
            from pipeline import reading

            report, loss, texts = reading.evaluate(model, split, config.eval_batch_size, config.max_answer_length,
                                                   allow_null, split.language)
            return report, loss, {e.id: t for e, t in zip(split.examples, texts)}
        predictions, gold, loss = predict(model, split, config.eval_batch_size)
        if config.task == "choice":
            from pipeline.choice import choice_report

            return choice_report(predictions, gold), loss, {e["id"]: int(p) for e, p in zip(split, predictions)}
        return classification_report(predictions, gold, labels.names), loss, None

    if span:
        train = train.features  # the windows are the training examples
    model.train()
    optimizer = _optimizer(model, config)
    world, rank = _world()
    # Under DeepSpeed every rank walks the same shuffled global batches and takes its rows of each;
    # a last global batch too small to give every rank a row is dropped.
    usable = len(train) - (len(train) % config.batch_size if len(train) % config.batch_size < world else 0)
    steps_per_epoch = max(1, math.ceil(usable / config.batch_size))
    total_steps = max(1, int(round(config.epochs * steps_per_epoch)))
    warmup = int(config.warmup_ratio * total_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / max(warmup, 1) if s < warmup else max(0.0, (total_steps - s) / max(total_steps - warmup, 1)))
    engine = None
    if config.deepspeed:
        import deepspeed

        engine, optimizer, _, schedule = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                                              config=_deepspeed_config(config, world))
    eval_every = config.eval_every or steps_per_epoch
    board = _tensorboard(config, seed) if rank == 0 else None
    rng = random.Random(seed)
    curve, dev_curve = [], []
    best, best_state, best_step, stale = -1.0, None, 0, 0
    step, started = 0, time.time()
    last_line, since_line = started, []  # a progress line every PROGRESS_SECONDS between evaluations

    def eta() -> str:
        rate = step / max(time.time() - started, 1e-9)
        left = (total_steps - step) / rate
        more = f", {left + seeds_after * total_steps / rate:.0f} s with the {seeds_after} seed(s) after it" if seeds_after else ""
        return f"{rate:.2f} steps/s, ETA {left:.0f} s{more}"

    stop = False
    while step < total_steps and not stop:
        for batch in _batches(train, config.batch_size, shuffle=True, rng=rng, world=world, rank=rank,
                              device=model_device(model)):
            if engine is not None:
                out = engine(batch)
                engine.backward(out["loss"])
                engine.step()  # clipping, optimizer, schedule and zero_grad, as configured
                loss = out["loss"].detach().clone()
                torch.distributed.all_reduce(loss)
                loss = float(loss) / world
            else:
                out = model(batch)
                optimizer.zero_grad(set_to_none=True)
                out["loss"].backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                loss = float(out["loss"].detach())
            step += 1
            curve.append([step, loss])
            since_line.append(loss)
            if rank == 0 and time.time() - last_line >= PROGRESS_SECONDS and step % eval_every and step < total_steps:
                log.info("seed %d step %d/%d train loss %.4f (mean of the last %d steps; %s)", seed, step, total_steps,
                         sum(since_line) / len(since_line), len(since_line), eta())
                last_line, since_line = time.time(), []
            if board is not None:
                board.add_scalar("train/loss", loss, step)
                board.add_scalar("train/lr", engine.get_lr()[0] if engine is not None else optimizer.param_groups[0]["lr"], step)
            if step % eval_every == 0 or step == total_steps:
                report, dev_loss, _ = evaluate(dev)
                score = report[config.selection_metric]
                dev_curve.append([step, dev_loss] + [report[name] for name in metric_names])
                if board is not None:
                    for name, value in [("loss", dev_loss)] + [(name, report[name]) for name in metric_names]:
                        board.add_scalar(f"dev/{name}", value, step)
                    board.flush()
                log.info("seed %d step %d/%d loss %.4f dev loss %.4f %s (%s)", seed, step, total_steps, curve[-1][1],
                         dev_loss, " ".join(f"{_METRIC_NAMES[name]} {report[name]:.4f}" for name in metric_names), eta())
                last_line, since_line = time.time(), []
                if score > best:
                    best, best_step, stale = score, step, 0
                    best_state = weights_snapshot(model)
                else:
                    stale += 1
                    if config.patience and stale >= config.patience:
                        log.info("seed %d: early stop at step %d (best dev %s %.4f at step %d)", seed, step,
                                 config.selection_metric, best, best_step)
                        stop = True
                        break
            if step >= total_steps:
                break
    if board is not None:
        board.close()
    restore_weights(model, best_state)
    report, _, by_id = evaluate(dev)
    result = {"seed": seed, "steps": step, "best_step": best_step, "train_seconds": time.time() - started,
              "dev": report, "train_curve": curve, "dev_curve_columns": ["step", "loss", *metric_names],
              "dev_curve": dev_curve}
    if by_id is not None:  # span / choice tasks: each question's predicted answer (for an official evaluation script)
        result["dev_predictions"] = by_id
    if test is not None:  # touched once, with the state chosen on dev
        result["test"], _, by_id = evaluate(test)
        if by_id is not None:
            result["test_predictions"] = by_id
    if config.save_models:
        import contextlib

        gathered = contextlib.nullcontext()
        if engine is not None:  # ZeRO-3 partitions the parameters: every rank gathers them, rank 0 writes
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
        with gathered:
            if rank == 0:
                pairs = config.task == "sequence" and any(len(e["kept_fine"]) == 2 for e in train)
                result["saved_model"] = str(save_finetuned(
                    model, config, labels, pretrained, Path(config.output) / MODELS_DIR / f"seed{seed}", allow_null,
                    {"dev": result["dev"], "test": result.get("test"), "seed": seed, "best_step": best_step}, pairs))
                log.info("seed %d: fine-tuned model saved to %s", seed, result["saved_model"])
    result["model"] = model
    return result


_METRIC_NAMES = {"accuracy": "acc", "macro_f1": "macro-F1", "exact_match": "EM", "f1": "F1"}


def save_finetuned(model: AmbertForClassification, config: FinetuneConfig, labels: LabelSet | None,
                   pretrained: Pretrained, directory: Path, allow_null: bool = False, scores: dict | None = None,
                   pairs: bool = False) -> Path:
    """Write a fine-tuned model to ``directory``: the backbone as an export (model.safetensors, config.json,
    tokenizer files), the heads (heads.safetensors) and task.json. Written to ``<directory>.partial``,
    then renamed: an interrupted save leaves no half-written model (an older one stays until then)."""
    import shutil

    from safetensors.torch import save_file

    from pipeline.convert import shareable
    from pipeline.inference import save_exported

    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        save_exported(model.backbone, pretrained.tokenizer_dir, partial)
        save_file({k: v.detach().cpu().clone().contiguous() for k, v in model.heads.state_dict().items()},
                  str(partial / HEADS_FILE))
        shareable(partial / HEADS_FILE)
        source = pretrained.source
        if not source.startswith("random:") and Path(source).exists():
            source = str(Path(source).resolve())
        task = {"task": config.task, "labels": labels.names if labels is not None else [],
                "variant": pretrained.model_config.variant, "fine_tuned_from": source, "pairs": pairs,
                "allow_null": allow_null, "scores": _jsonable(scores or {}),
                **{name: getattr(config, name) for name in (
                    "max_length", "max_coarse_length", "text_field", "text_pair_field", "label_field", "tokens_field",
                    "tags_field", "question_field", "context_field", "answers_field", "choices_field", "max_query_length",
                    "doc_stride", "max_answer_length", "classifier_dropout", "agreement_weight")}}
        (partial / TASK_FILE).write_text(json.dumps(task, indent=1, ensure_ascii=False), encoding="utf-8")
        if directory.exists():  # a model an earlier run (--overwrite) saved here
            shutil.rmtree(directory)
        os.replace(partial, directory)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return directory


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


def _summary(results: list[dict], split: str, task: str = "sequence") -> dict:
    out = {}
    for metric in METRICS[task]:
        values = [r[split][metric] for r in results if split in r]
        if values:
            out[metric] = {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                           "values": values}
    return out


def run(config: FinetuneConfig) -> dict:
    """Fine-tune with every seed; writes ``output/results.json`` and returns the same dict."""
    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    pretrained = resolve_pretrained(config.model, config.dataset, same_dataset=True)
    if config.deepspeed:  # after the cheap checks above, before any model is built
        setup_deepspeed(config.seeds[0])
        check_same_settings(config)
    encoder = TextEncoder(pretrained.tokenizer_dir)
    from pipeline.inference import ExportError, check_vocabularies

    try:
        check_vocabularies(pretrained.model_config, len(encoder.fine_vocab), len(encoder.coarse_vocab), config.model)
    except ExportError as exc:
        raise FinetuneError(f"{exc} (tokenizers from {pretrained.tokenizer_dir})") from None
    limit = pretrained.model_config.max_position_embeddings
    max_fine = min(config.max_length, limit)
    max_coarse = min(config.max_coarse_length or config.max_length, limit)
    if max(config.max_length, config.max_coarse_length) > limit and _world()[1] == 0:
        log.warning("WARNING: --max-length %d%s is more than the model's max_position_embeddings %d: sequences are cut "
                    "at %d tokens", config.max_length, f" / --max-coarse-length {config.max_coarse_length}"
                    if config.max_coarse_length else "", limit, limit)
    try:
        if config.task == "span":
            labels = None
            train = encode_span_split(config, encoder, config.train, max_fine, max_coarse, True, config.max_train_examples)
            dev = encode_span_split(config, encoder, config.dev, max_fine, max_coarse, False)
            test = encode_span_split(config, encoder, config.test, max_fine, max_coarse, False) if config.test else None
            for path, split in ((config.dev, dev), (config.test, test)):
                if split is not None and split.has_unanswerable and not train.has_unanswerable and _world()[1] == 0:
                    log.warning("WARNING: %s has unanswerable questions but %s has none: the model never learns to "
                                "answer \"no answer\", so those questions are scored as wrong; add unanswerable "
                                "questions to the training set (SQuAD 2.0 style) or leave them out", path, config.train)
        elif config.task == "choice":
            labels = None
            train = encode_choice_split(config, encoder, config.train, max_fine, max_coarse, True, config.max_train_examples)
            dev = encode_choice_split(config, encoder, config.dev, max_fine, max_coarse, False)
            test = encode_choice_split(config, encoder, config.test, max_fine, max_coarse, False) if config.test else None
        else:
            train, labels = encode_split(config, encoder, config.train, None, max_fine, max_coarse, config.max_train_examples)
            dev, _ = encode_split(config, encoder, config.dev, labels, max_fine, max_coarse)
            test = encode_split(config, encoder, config.test, labels, max_fine, max_coarse)[0] if config.test else None
    except EncodeError as exc:
        raise FinetuneError(str(exc)) from None
    if labels is not None and len(labels) < 2:
        raise FinetuneError(f"{config.train} has a single label {labels.names}: nothing to classify")
    if config.task == "sequence":
        check_same_inputs(config, train, [(config.dev, dev), (config.test, test)])
    log.info("%s task, %s, %d train / %d dev / %s test examples, model %s (%s)", config.task,
             f"{len(labels)} labels" if labels is not None else f"metrics {' and '.join(METRICS[config.task])}",
             len(train), len(dev), len(test) if test is not None else "no", pretrained.source,
             pretrained.model_config.variant)
    models = Path(config.output) / MODELS_DIR
    if models.is_dir() and _world()[1] == 0:
        stale = sorted(d.name for d in models.iterdir() if d.is_dir() and
                       not (config.save_models and d.name in {f"seed{s}" for s in config.seeds}))
        if stale:
            log.warning("WARNING: %s holds fine-tuned models of an earlier run (%s) that this run does not replace; "
                        "move or delete them so they are not taken for this run's", models, ", ".join(stale))
    results = []
    output = Path(config.output)

    def summarize() -> dict:
        return {"config": asdict(config), "variant": pretrained.model_config.variant,
                "labels": labels.names if labels is not None else [], "dev": _summary(results, "dev", config.task),
                "test": _summary(results, "test", config.task), "seeds": results}

    for k, seed in enumerate(config.seeds):
        try:
            result = train_seed(config, pretrained, labels, train, dev, test, seed, seeds_after=len(config.seeds) - k - 1)
        except KeyboardInterrupt:  # Ctrl-C: the seeds that finished are kept (their scores were lost)
            kept = ""
            if results and _world()[1] == 0:
                output.mkdir(parents=True, exist_ok=True)
                write_atomically(output / PARTIAL_RESULTS_FILE, json.dumps(summarize(), indent=1))
                kept = (f"; the {len(results)} seed(s) that finished ({', '.join(str(r['seed']) for r in results)}) "
                        f"are in {output / PARTIAL_RESULTS_FILE}")
            raise FinetuneInterrupted(f"fine-tuning interrupted during seed {seed}{kept}; run the same command "
                                      f"again to run every seed (results.json is written once all have finished)") from None
        result.pop("model")
        results.append(result)
    summary = summarize()
    if _world()[1] == 0:
        output.mkdir(parents=True, exist_ok=True)
        write_atomically(output / RESULTS_FILE, json.dumps(summary, indent=1))
        (output / PARTIAL_RESULTS_FILE).unlink(missing_ok=True)  # an interrupted run's: superseded
    log.info("results: dev %s test %s -> %s", {k: round(v["mean"], 4) for k, v in summary["dev"].items()},
             {k: round(v["mean"], 4) for k, v in summary["test"].items()}, output / RESULTS_FILE)
    return summary


__all__ = ["AmbertForClassification", "FinetuneConfig", "FinetuneError", "LabelSet", "build_example",
           "check_same_settings", "classification_report", "collate", "encode_example", "encode_token_example",
           "predict", "resolve_pretrained", "run", "three_classifier_loss", "train_seed", "write_atomically"]
