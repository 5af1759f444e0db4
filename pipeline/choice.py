"""Multiple-choice reading comprehension (RACE, C3, ...) for AMBERT and the BERT baselines.

An example is a context (a passage; C3's list of dialogue turns is joined with line breaks; none with
``--context-field ''``), a question and two or more options, one of them right. Each option is one
sequence pair, BERT's RACE recipe: ``[CLS] context [SEP] question option [SEP]`` on both
granularities (a question with a blank "_" gets the option in the blank instead), cut at coarse-token
boundaries so that the option survives (``fit_option``): the context loses its end, a long question
what is farthest from the option. The context is encoded once per question.

Head: the sequence head with one output, applied to each option's [CLS] vectors, and a softmax over
the options of a question. For AMBERT the paper's three classifiers (fine, coarse, joint) each score
every option; the loss is the sum of their cross-entropies + lambda x ||p_fine - p_coarse||_2, and
the joint scores predict. Questions may have different numbers of options (C3: 2 to 4); a missing
option gets probability 0.

Labels: the right option as a 0-based index, a letter (RACE: "A".."D") or the option's text (C3).
Files: flat rows (JSON lines / CSV / parquet; HF's race and clue/c3 layouts) or C3's original
nested JSON (``[[context turns, [{question, choice, answer}, ...], id], ...]``). Cloze (ChID): HF's
clue/chid rows become one question per ``#idiom...#`` blank, each candidate filled into it
(``_chid_examples``). Metric: accuracy.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from data_prep.encode import EncodedText, EncodeError, TextEncoder

log = logging.getLogger("finetune")
PROGRESS_SECONDS = 30.0  # encoding logs a progress line this often


class ChoiceDataError(ValueError):
    """A multiple-choice file that cannot be used; the message names the example and the fix."""


@dataclass
class ChoiceExample:
    """One question with its options; ``label`` = the right option's index (None: no gold answer)."""

    id: str
    context: str
    question: str
    options: list[str]
    label: int | None
    where: str
    blank: tuple[int, int] | None = None
    """Cloze (ChID): the characters of ``question`` that each option replaces (None: its first run of "_",
    if any, else the option follows the question)."""


# ---------------------------------------------------------------------------------------------
# Reading the files
# ---------------------------------------------------------------------------------------------
def _text(value, where: str, name: str) -> str:
    """A string column; a list of strings (C3's dialogue turns) is joined with line breaks."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    raise ChoiceDataError(f"{where}: {name!r} holds {str(value)[:60]!r} (of type {type(value).__name__}); give a string "
                          f"(or a list of strings, joined with line breaks)")


def label_index(value, options: Sequence[str], where: str, field: str = "label") -> int | None:
    """The right option's index from a 0-based index (also "2" or 2.0), a letter ("A" = the first option)
    or the option's text; None for a missing gold answer: null, NaN, "" or -1 (hidden test sets)."""
    if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return None
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)  # an int column with nulls, as parquet / pandas store it
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if int(value) == -1:
            return None
        if 0 <= int(value) < len(options):
            return int(value)
    elif isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        matches = [i for i, option in enumerate(options) if option.strip() == text]
        if len(matches) == 1:
            return matches[0]
        if not matches and len(text) == 1 and "A" <= text.upper() <= "Z" and ord(text.upper()) - ord("A") < len(options):
            return ord(text.upper()) - ord("A")
        if not matches and re.fullmatch(r"[0-9]+", text) and int(text) < len(options):
            return int(text)
        if not matches and text == "-1":
            return None
        if len(matches) > 1:
            raise ChoiceDataError(f"{where}: the answer {value!r} is the text of options {matches}; make the options "
                                  f"distinct, or give the answer as an index / a letter")
    raise ChoiceDataError(
        f"{where}: {field!r} is {str(value)[:60]!r}, which names none of its {len(options)} options {str(options)[:120]}; "
        f"give the right option as a 0-based index (0-{len(options) - 1}), a letter (A-{chr(ord('A') + len(options) - 1)}) "
        f"or the option's text")


def _c3_examples(records: list, path: str) -> list[dict]:
    """C3's original layout: ``[[context turns, [{"question", "choice", "answer"}, ...], id], ...]`` -> flat rows."""
    rows = []
    for d, record in enumerate(records):
        if not (isinstance(record, (list, tuple)) and len(record) >= 2 and isinstance(record[1], list)):
            raise ChoiceDataError(f"{path} document {d + 1} is not [context, questions, id] (C3's layout); give "
                                  f"one JSON object per question (JSON lines) or C3's nested JSON")
        document_id = str(record[2]) if len(record) > 2 else str(d)
        for q, question in enumerate(record[1]):
            if not isinstance(question, dict):
                raise ChoiceDataError(f"{path} document {d + 1} question {q + 1} is not an object with question, "
                                      f"choice and answer")
            own = question.get("id")  # CLUE's release numbers its questions (its submissions need the numbers)
            rows.append({"id": str(own) if own is not None else f"{document_id}-{q}", "context": record[0],
                         "question": question.get("question"), "choice": question.get("choice"),
                         "answer": question.get("answer")})
    return rows


def read_choice_file(path: str, context_field: str, question_field: str, choices_field: str, label_field: str,
                     require_labels: bool = True, limit: int = 0, no_context_hint: bool = True) -> list[ChoiceExample]:
    """The examples of a multiple-choice file (see the module doc for the layouts). ``no_context_hint``:
    a missing context column's message also offers ``--context-field ''``."""
    from pipeline import finetuning as ft

    nested = None
    suffix, compression = ft._file_type(path)
    if suffix == ".json":
        try:
            with ft._open_binary(path, compression) as fh:
                head = fh.read(256).decode("utf-8-sig", errors="replace").lstrip()
            if head.startswith("[") and head[1:].lstrip().startswith("["):  # a list of lists: C3's layout
                with ft._open_binary(path, compression) as fh:
                    nested = json.loads(fh.read().decode("utf-8-sig"))
        except UnicodeDecodeError:
            ft.check_utf8(path, compression)  # names the line, the encoding and the iconv command
            raise ChoiceDataError(f"{path} is not UTF-8; convert it") from None
        except (OSError, EOFError, ValueError) as exc:
            raise ChoiceDataError(f"{path} cannot be read as JSON ({exc}); fix the file") from None
        if nested is not None:
            nested = _c3_examples(nested, path)
    if nested is not None:
        rows = nested
        fields = {"context": "context" if context_field else "", "question": "question", "choices": "choice",
                  "label": "answer"}  # C3's own key names
        columns = list(fields.values())
    else:
        table = ft.load_table(path)
        columns = table.column_names
        if {"candidates", "content"} <= set(columns) and choices_field not in columns:
            return _chid_examples(table.select(range(min(limit, len(table)))) if limit else table, path, require_labels)
        fields = {"context": context_field, "question": question_field, "choices": choices_field, "label": label_field}
        rows = None
    for key, name in fields.items():
        if key == "context" and not name:
            continue
        if name not in columns and not (key == "label" and not require_labels):
            extra = " (or --context-field '' for questions without a context)" if key == "context" and no_context_hint else ""
            raise ChoiceDataError(f"{path} has no column {name!r} ({key}_field); its columns are {columns}: rename the "
                                  f"column or pass --{key}-field NAME{extra}")
    if rows is None:
        if limit:
            table = table.select(range(min(limit, len(table))))
        data = {key: (table[name] if name in columns else [None] * len(table)) for key, name in fields.items() if name}
        ids = table["id"] if "id" in columns else table["example_id"] if "example_id" in columns else None
        rows = [{fields[key]: data[key][i] for key in data} | {"id": ids[i] if ids is not None else None}
                for i in range(len(table))]
    elif limit:
        rows = rows[:limit]
    if not rows:
        raise ChoiceDataError(f"{path} has no examples")
    examples = []
    for i, row in enumerate(rows):
        where = ft._where(path, i) if nested is None else f"{path} question {i + 1} ({row['id']})"
        options = row[fields["choices"]]
        if not isinstance(options, (list, tuple)) or not all(isinstance(o, str) for o in options):
            raise ChoiceDataError(f"{where}: {fields['choices']!r} holds {str(options)[:60]!r}; "
                                  f"give a list of options, each a string")
        if len(options) < 2:
            raise ChoiceDataError(f"{where}: {len(options)} option(s); a multiple-choice question needs at least 2")
        question = _text(row[fields["question"]], where, fields["question"])
        context = _text(row[fields["context"]], where, fields["context"]) if fields["context"] else ""
        label = label_index(row.get(fields["label"]), options, where, fields["label"])
        if label is None and require_labels:
            raise ChoiceDataError(f"{where}: no answer ({fields['label']!r} is null or missing); label the question or "
                                  f"remove it (questions without answers, such as a benchmark's hidden test set, are "
                                  f"for `python -m pipeline.predict` with a model saved by --save-models)")
        examples.append(ChoiceExample(str(row["id"]) if row.get("id") is not None else str(i), context, question,
                                      list(options), label, where))
    _unique_ids(examples, path)
    return examples


_IDIOM = re.compile(r"#idiom\d*#")
OTHER_BLANK = "……"
"""What the other blanks of a ChID passage read as while one of them is being filled."""


def _chid_examples(table, path: str, require_labels: bool) -> list[ChoiceExample]:
    """ChID cloze rows (HF's clue/chid: ``candidates``, ``content`` passages with ``#idiomNNNNNN#`` blanks,
    ``answers`` = [{"candidate_id", "text"}] in the order of the blanks; or ``answer`` = {blank: index},
    CLUE's answer file merged) -> one question per blank: the passage with that blank to fill, the other
    blanks read as "……", the row's candidates as options. Ids are the blanks' tags (CLUE's submission keys)."""
    from pipeline import finetuning as ft

    examples = []
    for i in range(len(table)):
        row, where = table[i], ft._where(path, i)
        candidates, contents = row["candidates"], row["content"]
        contents = [contents] if isinstance(contents, str) else contents
        if not (isinstance(candidates, list) and len(candidates) >= 2 and all(isinstance(c, str) for c in candidates)):
            raise ChoiceDataError(f"{where}: 'candidates' holds {str(candidates)[:60]!r}; give a list of 2 or more idioms")
        if not (isinstance(contents, list) and all(isinstance(c, str) for c in contents)):
            raise ChoiceDataError(f"{where}: 'content' holds {str(contents)[:60]!r}; give a passage or a list of passages")
        blanks = [(passage, m) for passage in contents for m in _IDIOM.finditer(passage)]
        if not blanks:
            raise ChoiceDataError(f"{where}: no #idiom...# blank in its content; every ChID passage has one or more")
        answers = row.get("answers") if "answers" in table.column_names else None
        if not answers and "answer" in table.column_names:  # (HF's test rows have answers: [])
            answers = row.get("answer")
        if isinstance(answers, dict) and ("candidate_id" in answers or "text" in answers):  # Arrow's list of structs
            answers = list(answers.get("candidate_id") or answers.get("text") or [])
        elif isinstance(answers, list) and all(isinstance(a, dict) for a in answers):
            answers = [a["candidate_id"] if a.get("candidate_id") is not None else a.get("text") for a in answers]
        elif isinstance(answers, dict):  # {tag: index}
            answers = [answers.get(m.group()) for _, m in blanks]
        if answers is not None and not isinstance(answers, list):
            raise ChoiceDataError(f"{where}: the answers are {str(answers)[:60]!r}; give a list of {{candidate_id, text}} "
                                  f"in the order of the blanks (HF's clue/chid) or {{blank tag: index}} (CLUE's answer file)")
        if answers and len(answers) != len(blanks):
            raise ChoiceDataError(f"{where}: {len(blanks)} blanks but {len(answers)} answers; give one answer per blank, "
                                  f"in their order")
        for b, (passage, m) in enumerate(blanks):
            tag = m.group()
            # this blank kept where it is, the passage's other blanks read as OTHER_BLANK
            before = _IDIOM.sub(OTHER_BLANK, passage[:m.start()])
            text = before + tag + _IDIOM.sub(OTHER_BLANK, passage[m.end():])
            label = label_index(answers[b], candidates, f"{where} blank {tag}", "answers") if answers else None
            if label is None and require_labels:
                raise ChoiceDataError(f"{where}: blank {tag} has no answer; label it or remove the row (unlabelled "
                                      f"rows are for `python -m pipeline.predict`)")
            examples.append(ChoiceExample(tag if tag != "#idiom#" else f"{i}-{b}", "", text, list(candidates), label,
                                          f"{where} blank {tag}", blank=(len(before), len(before) + len(tag))))
    if not examples:
        raise ChoiceDataError(f"{path} has no examples")
    _unique_ids(examples, path)
    return examples


def _unique_ids(examples: list[ChoiceExample], path: str) -> None:
    """Give repeated ids (HF race's example_id and clue/c3's id name the passage, shared by its questions)
    a ``-k`` suffix: the k-th question with that id, so every prediction can be matched to its question."""
    counts: dict[str, int] = {}
    for e in examples:
        counts[e.id] = counts.get(e.id, 0) + 1
    repeated = {k for k, n in counts.items() if n > 1}
    if not repeated:
        return
    taken = set(counts)
    seen: dict[str, int] = {}
    for e in examples:
        if e.id in repeated:
            k = seen.get(e.id, 0)
            while f"{e.id}-{k}" in taken:  # an id of the file itself ("a" twice and "a-0")
                k += 1
            seen[e.id] = k + 1
            taken.add(f"{e.id}-{k}")
            e.id = f"{e.id}-{k}"
    from pipeline import finetuning as ft

    if ft._world()[1] == 0:
        log.info("%s: %d ids are shared by several questions (as a passage's id is in HF's race and clue/c3): each "
                 "of their questions is numbered <id>-0, <id>-1, ... in the predictions", path, len(repeated))


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------
_BLANK = re.compile("_+")


def option_text(question: str, option: str, blank: tuple[int, int] | None = None) -> tuple[str, int, int]:
    """The second segment of an option's sequence and where the option is in it: the option in ``blank``
    (a cloze blank's characters), else in the question's first blank (a run of "_"), else after the question."""
    if blank is not None:
        return question[:blank[0]] + option + question[blank[1]:], blank[0], blank[0] + len(option)
    found = _BLANK.search(question)
    if found:
        start = found.start() + 1
        return f"{question[:found.start()]} {option} {question[found.end():]}", start, start + len(option)
    if not question.strip():
        return option, 0, len(option)
    return f"{question} {option}", len(question) + 1, len(question) + 1 + len(option)


def _head(enc: EncodedText, fine_limit: int, coarse_limit: int) -> EncodedText:
    """The longest start of ``enc`` within both limits, cut at a coarse-token boundary."""
    cum = np.cumsum(enc.align)
    k = min(int(np.searchsorted(cum, max(fine_limit, 0), side="right")), max(coarse_limit, 0), len(enc.coarse))
    return EncodedText(enc.fine[:int(cum[k - 1]) if k else 0], enc.coarse[:k], enc.align[:k])


def _coarse_range(enc: EncodedText, first: int, last: int) -> tuple[int, int]:
    """[c0, c1): the coarse tokens covering fine tokens ``first``..``last``."""
    cum = np.cumsum(enc.align)
    return int(np.searchsorted(cum, first, side="right")), int(np.searchsorted(cum, last, side="right")) + 1


def _around(enc: EncodedText, first: int, last: int, fine_limit: int, coarse_limit: int) -> EncodedText:
    """The coarse tokens covering fine tokens ``first``..``last`` (the option) and as many around them as both
    limits allow: up to half the room before them, the rest after (and before again if the text ends).
    An option over the limits keeps its start."""
    cum = np.concatenate([[0], np.cumsum(enc.align)])
    n = len(enc.coarse)
    a, b = _coarse_range(enc, first, last)
    if fine_limit <= 0 or coarse_limit <= 0:
        c0 = c1 = a
    elif cum[b] - cum[a] > fine_limit or b - a > coarse_limit:
        c0, c1 = a, min(int(np.searchsorted(cum, cum[a] + fine_limit, side="right")) - 1, a + coarse_limit)
    else:
        spare_fine, spare_coarse = fine_limit - int(cum[b] - cum[a]), coarse_limit - (b - a)
        c0 = max(int(np.searchsorted(cum, cum[a] - spare_fine // 2, side="left")), a - spare_coarse // 2, 0)
        c1 = min(int(np.searchsorted(cum, cum[c0] + fine_limit, side="right")) - 1, c0 + coarse_limit, n)
        c0 = max(int(np.searchsorted(cum, cum[c1] - fine_limit, side="left")), c1 - coarse_limit, 0)
    c1 = max(c1, c0)
    return EncodedText(enc.fine[int(cum[c0]):int(cum[c1])], enc.coarse[c0:c1], enc.align[c0:c1])


def fit_option(context: EncodedText | None, second: EncodedText, first: int, last: int, max_fine: int,
               max_coarse: int) -> tuple[EncodedText | None, EncodedText]:
    """Cut (context, question + option) to the budgets so that the option (fine tokens ``first``..``last`` of
    ``second``) survives: the question + option keeps the option and what is around it (``_around``), taking
    at most what leaves the context half the budget, or the option's own size if more; the context keeps
    its start and loses its end."""
    specials = 3 if context is not None else 2
    fine_budget, coarse_budget = max_fine - specials, max_coarse - specials
    if context is None:
        return None, _around(second, first, last, fine_budget, coarse_budget)
    a, b = _coarse_range(second, first, last)
    option_fine = int(second.align[a:b].sum())
    kept = _around(second, first, last,
                   max(fine_budget - min(len(context.fine), fine_budget // 2), min(option_fine, fine_budget)),
                   max(coarse_budget - min(len(context.coarse), coarse_budget // 2), min(b - a, coarse_budget)))
    context = _head(context, fine_budget - len(kept.fine), coarse_budget - len(kept.coarse))
    # room the context's next coarse token did not fit in goes back to the question + option
    return context, _around(second, first, last, fine_budget - len(context.fine), coarse_budget - len(context.coarse))


def _option_tokens(encoder: TextEncoder, text: str, start: int, end: int, max_fine: int, where: str
                   ) -> tuple[EncodedText, int, int, bool]:
    """The question + option's encoding (of a window of it around the option when it is much longer than the
    budget: 6 characters a fine token on each side, more than English words take) and the option's first
    and last fine token; and whether the window cut the text."""
    from pipeline import reading

    margin = 6 * max_fine + 32
    w0, w1 = max(0, start - margin), min(len(text), end + margin)
    if w0 > 0:  # start the window at a blank when there is one near (an English word is not cut)
        blank = text.rfind(" ", max(0, w0 - 32), w0)
        w0 = blank + 1 if blank >= 0 else w0
    if w1 < len(text):
        blank = text.find(" ", w1, w1 + 32)
        w1 = blank if blank >= 0 else w1
    window = text[w0:w1]
    try:
        encoded = reading.encode_context(encoder, window, where)
    except EncodeError:  # rare character sequences the character-level encoding cannot map: the plain encoding
        enc = encoder.encode(window, where)
        before = len(encoder.encode(window[:start - w0]).fine) if window[:start - w0].strip() else 0
        upto = len(encoder.encode(window[:end - w0]).fine) if window[:end - w0].strip() else 0
        first = min(before, len(enc.fine) - 1)
        return enc, first, max(first, min(upto - 1, len(enc.fine) - 1)), (w0, w1) != (0, len(text))
    span = encoded.token_span(start - w0, end - w0)
    if span is None:  # a blank option: the tokens where it would be
        at = min(int(np.searchsorted(encoded.char_start, start - w0)), len(encoded.enc.fine) - 1)
        span = (at, at)
    return encoded.enc, span[0], span[1], (w0, w1) != (0, len(text))


def encode_choice_split(encoder: TextEncoder, examples: list[ChoiceExample], path: str, max_fine: int,
                        max_coarse: int) -> list[dict]:
    """Each example as {"id", "options": [one sequence pair per option], "label": index} (no "label"
    without gold). Long sequences are cut by ``fit_option``."""
    from pipeline import finetuning as ft

    encoded, cut, cut_question, total = [], 0, 0, 0
    started = last_line = time.time()
    for n, example in enumerate(examples):
        try:
            context = encoder.encode(example.context, example.where + " (context)") if example.context.strip() else None
            options = []
            for k, option in enumerate(example.options):
                text, start, end = option_text(example.question, option, example.blank)
                if not text.strip():
                    raise ChoiceDataError(f"{example.where}: option {k} and the question are both empty; give the "
                                          f"question or the option a text")
                # encoded as a whole (around the option when long), each fine token knowing its characters
                second, first, last, windowed = _option_tokens(encoder, text, start, end, max_fine,
                                                               f"{example.where} (question + option {k})")
                kept_context, kept_second = fit_option(context, second, first, last, max_fine, max_coarse)
                segments = [kept_context, kept_second] if context is not None else [kept_second]
                options.append(ft.build_example(segments, max_fine, max_coarse))
                cut_question += windowed or len(kept_second.fine) < len(second.fine)
                cut += (windowed or len(kept_second.fine) < len(second.fine) or
                        (context is not None and len(kept_context.fine) < len(context.fine)))
                total += 1
        except EncodeError as exc:
            raise ChoiceDataError(str(exc)) from None
        item = {"id": example.id, "options": options}
        if example.label is not None:
            item["label"] = example.label
        encoded.append(item)
        if time.time() - last_line >= PROGRESS_SECONDS:
            rate = (n + 1) / (time.time() - started)
            log.info("encoding %s: %d/%d questions (%.0f/s, ETA %.0f s)", path, n + 1, len(examples), rate,
                     (len(examples) - n - 1) / rate)
            last_line = time.time()
    if cut and ft._world()[1] == 0:
        log.warning("WARNING: %d of the %d option sequences of %s are longer than --max-length %d (--max-coarse-length "
                    "%d) and were cut: contexts (if any) lose their ends; in %d of them the question (or cloze passage) loses "
                    "the tokens farthest from the option, which is kept (unless it alone is over the limits); raise the "
                    "limits (up to the model's max_position_embeddings) to keep more", cut, total, path, max_fine,
                    max_coarse, cut_question)
    return encoded


def collate_choices(examples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """One row per option (the ``collate`` contract) + where each row goes: ``choice_example`` (the
    question's index in the batch) and ``choice_position`` (the option's index); ``num_choices``
    per question; ``labels`` when every question has one."""
    from pipeline.finetuning import collate

    rows = [option for e in examples for option in e["options"]]
    batch = collate(rows)
    counts = [len(e["options"]) for e in examples]
    batch["num_choices"] = torch.tensor(counts, dtype=torch.long)
    batch["choice_example"] = torch.repeat_interleave(torch.arange(len(counts)), batch["num_choices"])
    batch["choice_position"] = torch.cat([torch.arange(n) for n in counts])
    if all("label" in e for e in examples):
        batch["labels"] = torch.tensor([e["label"] for e in examples], dtype=torch.long)
    return batch


def to_grid(scores: torch.Tensor, batch: dict) -> torch.Tensor:
    """One score per option row -> [questions, most options] (float32); missing options at the minimum."""
    shape = (len(batch["num_choices"]), int(batch["num_choices"].max()))
    grid = torch.full(shape, torch.finfo(torch.float32).min, dtype=torch.float32, device=scores.device)
    return grid.index_put((batch["choice_example"].to(scores.device), batch["choice_position"].to(scores.device)),
                          scores.reshape(-1).float())


def choice_report(predictions: np.ndarray, labels: np.ndarray) -> dict:
    return {"accuracy": float((predictions == labels).mean()) if len(labels) else 0.0, "examples": int(len(labels))}


__all__ = ["ChoiceDataError", "ChoiceExample", "choice_report", "collate_choices", "encode_choice_split", "label_index",
           "option_text", "read_choice_file", "to_grid"]
