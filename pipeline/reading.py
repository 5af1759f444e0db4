"""Span extraction (reading comprehension, SQuAD / CMRC 2018 style) for AMBERT and the BERT baselines.

An example is a question, a context and the question's answers in the context (text + character
offset; none for an unanswerable question, SQuAD 2.0 style). The context is encoded once, with the
pre-training dataset's tokenizers, as units whose character offsets are known (Chinese: each
character; English: each word of data_prep's word pattern, i.e. letter/digit runs and single
punctuation marks), so every fine token maps back to a span of the original context and a predicted
answer is a substring of it. A context longer than the sequence budget is cut into overlapping
windows at coarse-token boundaries (so a coarse token never loses part of its fine tokens), the
next window starting ``doc_stride`` fine tokens after the previous one; each window is
``[CLS] question [SEP] window [SEP]`` on both granularities.

Head (the paper's span / token head): start and end logits per FINE token from [its vector ; the
vector of the coarse token covering it] (bert-fine: the fine vector; bert-coarse: the covering coarse
vector). Target: the first and last fine token of the (first) answer in a window that holds it
whole, [CLS] in a window that does not (BERT's recipe). Prediction: over all windows of an example,
the span start <= end of at most ``max_answer_length`` fine tokens with the highest start + end
logit; when the training set has unanswerable questions, no answer ("") if the [CLS] score is higher.

Metrics: exact match and F1, for English as SQuAD's official script (v2.0's, which equals v1.1's on
answerable questions: lower-case, punctuation and articles removed, F1 over word tokens), for
Chinese as CMRC 2018's (its punctuation list removed, F1 over CJK characters and the NLTK word
tokens of the text between them, from the longest common substring), each the best over the gold
answers, averaged over the questions.
"""

from __future__ import annotations

import collections
import json
import logging
import re
import string
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from data_prep.encode import EncodedText, EncodeError, TextEncoder

log = logging.getLogger("finetune")
PROGRESS_SECONDS = 30.0  # encoding logs a progress line this often


class SpanDataError(ValueError):
    """A reading-comprehension file that cannot be used; the message names the example and the fix."""


# ---------------------------------------------------------------------------------------------
# Reading the files: flat rows (HF squad / cmrc2018 columns) or SQuAD's nested JSON
# ---------------------------------------------------------------------------------------------
@dataclass
class SpanExample:
    """One question. ``answers``: (text, character offset in ``context``) pairs; empty = unanswerable."""

    id: str
    question: str
    context: str
    answers: list[tuple[str, int]]
    where: str
    has_gold: bool = True  # False: a file to predict had no answers for it (not: an unanswerable question)


def _nested_squad(path: str, opener) -> list[dict] | None:
    """The records of a SQuAD-format JSON file (``{"data": [{"paragraphs": [{"context", "qas"}]}]}``),
    flattened; None when the file is not in that format."""
    try:
        with opener() as fh:
            head = fh.read(4096).lstrip()
            if not head.startswith(b"{"):
                return None
            document = json.loads(head + fh.read())
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        return None
    rows = []
    for a, article in enumerate(document["data"]):
        for p, paragraph in enumerate(article.get("paragraphs", []) if isinstance(article, dict) else []):
            if not isinstance(paragraph, dict):
                raise SpanDataError(f"{path}: data[{a}].paragraphs[{p}] is not an object with 'context' and 'qas'")
            for q, qa in enumerate(paragraph.get("qas", [])):
                if not isinstance(qa, dict):
                    raise SpanDataError(f"{path}: data[{a}].paragraphs[{p}].qas[{q}] is not an object")
                rows.append({"id": qa.get("id"), "question": qa.get("question"), "context": paragraph.get("context"),
                             "answers": [] if qa.get("is_impossible") else qa.get("answers", []),
                             "_where": f"{path} data[{a}].paragraphs[{p}].qas[{q}]"})
    if not rows:
        raise SpanDataError(f"{path} is a SQuAD-format file without questions (no data[].paragraphs[].qas[])")
    return rows


def _answers(value, where: str, field_name: str, blanks: list[str] | None = None) -> list[tuple[str, int]]:
    """HF's ``{"text": [...], "answer_start": [...]}`` or SQuAD's ``[{"text", "answer_start"}, ...]``
    (blank answer texts are left out; ``where`` is appended to ``blanks`` for each)."""
    if value is None:
        return []
    if isinstance(value, dict):
        texts, starts = value.get("text", []), value.get("answer_start", [])
        if isinstance(texts, str):
            texts, starts = [texts], [starts]
        if not isinstance(texts, (list, tuple)) or not isinstance(starts, (list, tuple)) or len(texts) != len(starts):
            raise SpanDataError(f"{where}: {field_name!r} must hold as many 'text' as 'answer_start' entries "
                                f"(HF datasets' squad format), got {str(value)[:80]}")
        pairs = list(zip(texts, starts))
    elif isinstance(value, (list, tuple)):
        pairs = []
        for a in value:
            if not isinstance(a, dict):
                raise SpanDataError(f"{where}: {field_name!r} holds {str(a)[:60]}; give each answer as "
                                    f'{{"text": ..., "answer_start": ...}}')
            pairs.append((a.get("text"), a.get("answer_start")))
    else:
        raise SpanDataError(f"{where}: {field_name!r} holds {type(value).__name__} ({str(value)[:60]}); give "
                            f'{{"text": [...], "answer_start": [...]}} or a list of {{"text", "answer_start"}}')
    out = []
    for text, start in pairs:
        if not isinstance(text, str) or isinstance(start, bool) or not isinstance(start, (int, float)) or start != int(start):
            raise SpanDataError(f"{where}: answer ({str(text)[:40]!r}, {start!r}) must be a text and an integer "
                                f"character offset")
        if text.strip():
            out.append((text, int(start)))
        elif blanks is not None:
            blanks.append(where)
    return out


def read_span_file(path: str, question_field: str = "question", context_field: str = "context",
                   answers_field: str = "answers", limit: int = 0, require_answers: bool = True) -> list[SpanExample]:
    """Every question of a file, checked: non-empty question and context strings, answers well formed
    (``require_answers=False``: a file without the answers column is questions to predict)."""
    from pipeline.finetuning import FinetuneError, _column, _file_type, _open_binary, _where, load_table

    suffix, compression = _file_type(path)
    rows = _nested_squad(path, lambda: _open_binary(path, compression)) if suffix == ".json" else None
    if rows is None:
        table = load_table(path)
        if limit:
            table = table.select(range(min(limit, len(table))))
        columns = [_column(table, name, path, what) for name, what in
                   ((question_field, "question_field"), (context_field, "context_field"))]
        if require_answers or answers_field in table.column_names:
            columns.append(_column(table, answers_field, path, "answers_field"))
        else:
            columns.append([None] * len(table))
        ids = table["id"] if "id" in table.column_names else [None] * len(table)
        rows = [{"id": ids[i], "question": q, "context": c, "answers": a, "_where": _where(path, i)}
                for i, (q, c, a) in enumerate(zip(*columns))]
    elif limit:
        rows = rows[:limit]
    if not rows:
        raise FinetuneError(f"{path} has no examples")
    examples = []
    blanks: list[str] = []
    for i, row in enumerate(rows):
        where = row["_where"]
        for name, key in ((question_field, "question"), (context_field, "context")):
            value = row[key]
            if not isinstance(value, str) or not value.strip():
                raise SpanDataError(f"{where}: {name!r} is {'empty' if isinstance(value, str) else repr(value)[:40]}; "
                                    f"give every example a question and a context text")
        answers = _answers(row["answers"], where, answers_field, blanks)
        examples.append(SpanExample(str(row["id"]) if row["id"] is not None else str(i), row["question"],
                                    row["context"], answers, where, row["answers"] is not None))
    if blanks:
        log.warning("WARNING: %s: %d blank answer texts left out, e.g. %s (a question with only blank answers "
                    "is unanswerable)", path, len(blanks), blanks[0])
    return examples


def locate_answer(context: str, text: str, start: int) -> int | None:
    """The character offset of ``text`` in ``context``: ``start`` if it is there, else the nearest
    occurrence (some released sets, CMRC 2018 among them, have a few offsets off by some
    characters), else None."""
    if context[start:start + len(text)] == text:
        return start
    found = [m.start() for m in re.finditer(re.escape(text), context)]
    return min(found, key=lambda s: abs(s - start)) if found else None


# ---------------------------------------------------------------------------------------------
# Encoding: units with character offsets -> fine tokens -> windows
# ---------------------------------------------------------------------------------------------
def _characters(context: str) -> list[str]:
    """A context's characters, each with the combining marks that NFKC composes with it ("e" + U+0301,
    "ｶ" + "ﾞ"): normalised one by one they would give other characters than the whole text."""
    from data_prep.normalize import nfkc

    chars = list(context)
    if "".join(map(nfkc, chars)) == nfkc(context):
        return chars
    units: list[str] = []
    for ch in chars:
        if units and nfkc(units[-1] + ch) != nfkc(units[-1]) + nfkc(ch):
            units[-1] += ch
        else:
            units.append(ch)
    return units


def context_units(context: str, language: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(units, start offsets, end offsets) of a context: characters (zh; with their combining marks)
    or data_prep's words (en)."""
    if language == "zh":
        units = _characters(context)
        ends = np.cumsum([len(u) for u in units], dtype=np.int64)
        return units, ends - np.array([len(u) for u in units], dtype=np.int64), ends
    if language == "en":
        from data_prep.english import normalize, word_spans, words_of

        spans: list[tuple[int, int]] = []
        for start, end in word_spans(context):
            # words touching each other that are ONE word once normalised (a separate combining accent:
            # "cafe" + U+0301, "Blair" + U+0301 + "s"): one unit, or they would be words the build never sees
            if spans and spans[-1][1] == start and len(words_of(normalize(context[spans[-1][0]:end], False))) == 1:
                spans[-1] = (spans[-1][0], end)
            else:
                spans.append((start, end))
        starts = np.array([s for s, _ in spans], dtype=np.int64)
        ends = np.array([e for _, e in spans], dtype=np.int64)
        return [context[s:e] for s, e in spans], starts, ends
    raise EncodeError(f"span extraction is implemented for zh and en; {language!r} needs a context_units rule")


@dataclass
class EncodedContext:
    """A context's fine/coarse encoding and, for each fine token, the character span it covers."""

    enc: EncodedText
    char_start: np.ndarray
    char_end: np.ndarray

    def token_span(self, start: int, end: int) -> tuple[int, int] | None:
        """First and last fine token of the characters [start, end), or None if no token covers them."""
        first = int(np.searchsorted(self.char_end, start, side="right"))
        last = int(np.searchsorted(self.char_start, end, side="left")) - 1
        return (first, last) if first <= last else None


def encode_context(encoder: TextEncoder, context: str, where: str) -> EncodedContext:
    units, starts, _ = context_units(context, encoder.language)
    enc, first, last, offsets = encoder.encode_unit_spans(units, where, text=context)
    return EncodedContext(enc, starts[first] + offsets[:, 0], starts[last] + offsets[:, 1])


def _question(encoder: TextEncoder, question: str, max_query: int, where: str) -> tuple[EncodedText, bool]:
    """The question's encoding, cut at a coarse boundary to ``max_query`` fine tokens; and whether it was cut."""
    enc = encoder.encode(question, where + " (question)")
    cum = np.concatenate([[0], np.cumsum(enc.align)])
    keep = max(1, int(np.searchsorted(cum, max_query, side="right")) - 1)
    n_fine = int(cum[keep])
    return EncodedText(enc.fine[:n_fine], enc.coarse[:keep], enc.align[:keep]), keep < len(enc.coarse)


def windows(align: np.ndarray, fine_budget: int, coarse_budget: int, stride: int) -> list[tuple[int, int]]:
    """[c0, c1) coarse ranges covering every coarse token; each within both budgets, the next one starting
    at the first coarse token ``stride`` fine tokens (or more) after the previous start, and always
    overlapping or touching it (a window never skips a token)."""
    cum = np.concatenate([[0], np.cumsum(align)])
    n = len(align)
    out = []
    c0 = 0
    while True:
        c1 = min(int(np.searchsorted(cum, cum[c0] + fine_budget, side="right")) - 1, c0 + coarse_budget, n)
        if c1 <= c0:
            raise EncodeError(f"a coarse token covers {int(align[c0])} fine tokens, more than the {fine_budget} a "
                              f"window has room for: raise --max-length or lower --max-query-length")
        out.append((c0, c1))
        if c1 >= n:
            return out
        c0 = max(c0 + 1, min(int(np.searchsorted(cum, cum[c0] + stride, side="left")), c1))


@dataclass
class SpanSplit:
    """A file's questions, their encoded contexts, and the window features the model sees."""

    path: str
    examples: list[SpanExample]
    contexts: list[EncodedContext]
    features: list[dict] = field(default_factory=list)
    has_unanswerable: bool = False
    language: str = ""

    def __len__(self) -> int:
        return len(self.examples)


def encode_span_split(encoder: TextEncoder, examples: list[SpanExample], path: str, max_fine: int, max_coarse: int,
                      max_query: int, stride: int, training: bool) -> SpanSplit:
    """Encode every question and context, and cut the windows (training: the unusable answers dropped)."""
    from pipeline.finetuning import build_example

    started = time.time()
    split = SpanSplit(path, [], [], language=encoder.language)
    contexts: dict[str, EncodedContext] = {}  # SQuAD's questions share their paragraph's context
    unlocated: list[str] = []
    uncovered: list[str] = []
    moved: list[str] = []  # answers whose answer_start was off: found nearby
    no_window: list[str] = []  # training answers no window holds whole (longer than the windows' overlap)
    cut_questions: list[str] = []
    strides: set[int] = set()
    last_line = started
    for done, example in enumerate(examples):
        if done and time.time() - last_line >= PROGRESS_SECONDS:  # a SQuAD-size file takes a few minutes
            rate = done / (time.time() - started)
            log.info("encoding %s: %d/%d questions (%.0f/s, ETA %.0f s)", path, done, len(examples), rate,
                     (len(examples) - done) / rate)
            last_line = time.time()
        answers = []
        for text, start in example.answers:
            found = locate_answer(example.context, text, start)
            if found is None:
                unlocated.append(f"{example.where} ({text[:30]!r})")
            else:
                answers.append((text, found))
                if found != start:
                    moved.append(f"{example.where} ({text[:30]!r} at {start} -> {found})")
        if training and example.answers and not answers:
            continue  # its answer is nowhere in its context: nothing to learn from
        context = contexts.get(example.context)
        if context is None:
            context = contexts[example.context] = encode_context(encoder, example.context, example.where + " (context)")
        target = None
        if answers:
            text, start = answers[0]
            target = context.token_span(start, start + len(text))
            if target is None:
                uncovered.append(f"{example.where} ({text[:30]!r})")
                if training:
                    continue
        question, cut = _question(encoder, example.question, max_query, example.where)
        if cut:
            cut_questions.append(example.where)
        fine_budget = max_fine - len(question.fine) - 3
        coarse_budget = max_coarse - len(question.coarse) - 3
        if min(fine_budget, coarse_budget) < 1:
            raise SpanDataError(f"{example.where}: the question leaves no room for the context in --max-length "
                                f"{max_fine} / --max-coarse-length {max_coarse}; lower --max-query-length or raise them")
        index = len(split.examples)
        cum = np.concatenate([[0], np.cumsum(context.enc.align)])
        # A stride of half the window at most: windows overlap, so an answer cut by one window's end is
        # whole in the next (BERT's 128 of a 384-token sequence; --max-length 128 leaves ~60 tokens).
        step = max(1, min(stride, fine_budget // 2))
        strides.add(step)
        try:
            ranges = windows(context.enc.align, fine_budget, coarse_budget, step)
        except EncodeError as exc:
            raise SpanDataError(f"{example.where}: {exc}") from None
        held = False
        for c0, c1 in ranges:
            f0, f1 = int(cum[c0]), int(cum[c1])
            window = EncodedText(context.enc.fine[f0:f1], context.enc.coarse[c0:c1], context.enc.align[c0:c1])
            feature = build_example([question, window], max_fine, max_coarse)
            # int32 (collate widens them): a SQuAD-size training set holds ~100k windows of up to 512 tokens
            feature = {k: v.astype(np.int32) for k, v in feature.items()}
            assert feature["kept_fine"].tolist() == [len(question.fine), f1 - f0], "a window was truncated"
            offset = len(question.fine) + 2  # [CLS] question [SEP]
            feature.update(example_index=index, context_offset=offset, window_start=f0, window_tokens=f1 - f0)
            start_position = end_position = 0  # [CLS]: no answer in this window (or none at all)
            if target is not None and f0 <= target[0] and target[1] < f1:
                start_position, end_position = offset + target[0] - f0, offset + target[1] - f0
            feature["start_position"], feature["end_position"] = start_position, end_position
            split.features.append(feature)
            held = held or start_position > 0
        if target is not None and not held:
            no_window.append(f"{example.where} ({answers[0][0][:30]!r})")
        # dev / test keep every gold text for the metrics, found in the context or not
        kept = answers if training else example.answers
        split.examples.append(SpanExample(example.id, example.question, example.context, kept, example.where,
                                          example.has_gold))
        split.contexts.append(context)
        split.has_unanswerable |= not example.answers
    dropped = len(examples) - len(split.examples)
    for problems, what, consequence in (
            (unlocated, "answer texts not found in their context", "; those training questions are skipped" if training else ""),
            (uncovered, "answers no fine token covers (blank or dropped by normalisation)",
             "; those training questions are skipped" if training else ""),
            (moved, "answers whose answer_start is off, moved to the nearest occurrence of their text", ""),
            (no_window, "answers that no window holds whole (longer than the windows' overlap)",
             "; every window of those questions is trained towards no answer: raise --max-length or lower --doc-stride"
             if training else ": they cannot be predicted whole"),
            (cut_questions, f"questions longer than --max-query-length {max_query} fine tokens, cut to it", "")):
        if problems:
            log.warning("WARNING: %s: %d %s, e.g. %s%s", path, len(problems), what, problems[0], consequence)
    if strides and max(strides) < stride:
        log.info("%s: --doc-stride %d is more than half of a window (%d context tokens at most here): windows start "
                 "%s fine tokens apart, so that they overlap", path, stride, 2 * max(strides) + 1,
                 "-".join(map(str, sorted({min(strides), max(strides)}))))
    if not split.examples:
        raise SpanDataError(f"{path}: no usable question (every answer is missing from its context); check the "
                            f"'answer_start' offsets and texts")
    if training and not any(e.answers for e in split.examples):
        raise SpanDataError(f"{path}: no training question has an answer (all {len(split.examples)} are unanswerable, "
                            f"or their answers column is empty): a model cannot learn where answers are; check "
                            f"--answers-field")
    ids = collections.Counter(e.id for e in split.examples)
    repeated = [i for i, n in ids.items() if n > 1]
    if repeated:
        log.warning("WARNING: %s: %d question ids occur more than once (e.g. %r): the predictions, keyed by id, keep "
                    "the last of each; give every question its own id", path, len(repeated), repeated[0])
    log.info("encoded %d questions (%d windows%s) of %s in %.1f s", len(split.examples), len(split.features),
             f", {dropped} skipped" if dropped else "", path, time.time() - started)
    return split


def collate_positions(examples: Sequence[dict]) -> dict[str, torch.Tensor]:
    return {"start_positions": torch.tensor([e["start_position"] for e in examples], dtype=torch.long),
            "end_positions": torch.tensor([e["end_position"] for e in examples], dtype=torch.long)}


# ---------------------------------------------------------------------------------------------
# Prediction
# ---------------------------------------------------------------------------------------------
def best_span(start_logits: np.ndarray, end_logits: np.ndarray, max_answer: int) -> tuple[float, int, int]:
    """(score, start, end) maximising start + end logit over start <= end < start + max_answer."""
    n = len(start_logits)
    scores = start_logits[:, None].astype(np.float64) + end_logits[None, :]
    i, j = np.indices((n, n))
    scores[(j < i) | (j - i >= max_answer)] = -np.inf
    flat = int(np.argmax(scores))
    return float(scores.flat[flat]), flat // n, flat % n


@torch.no_grad()
def predict_answers(model, split: SpanSplit, batch_size: int, max_answer: int, allow_null: bool
                    ) -> tuple[list[str], float]:
    """The predicted answer text of every question of ``split`` and the mean loss over its windows."""
    from pipeline.finetuning import _batches, model_device

    was_training = model.training
    model.eval()
    best: list[tuple[float, int, int] | None] = [None] * len(split.examples)
    null = [np.inf] * len(split.examples)
    losses, weights = [], []
    position = 0
    for batch in _batches(split.features, batch_size, shuffle=False, device=model_device(model)):
        out = model(batch)
        starts, ends = out["start_logits"].float().cpu().numpy(), out["end_logits"].float().cpu().numpy()
        for row in range(len(starts)):
            feature = split.features[position + row]
            k, offset, n = feature["example_index"], feature["context_offset"], feature["window_tokens"]
            score, s, e = best_span(starts[row, offset:offset + n], ends[row, offset:offset + n], max_answer)
            if best[k] is None or score > best[k][0]:
                best[k] = (score, feature["window_start"] + s, feature["window_start"] + e)
            null[k] = min(null[k], float(starts[row, 0] + ends[row, 0]))
        position += len(starts)
        losses.append(float(out["loss"]))
        weights.append(len(starts))
    model.train(was_training)
    texts = []
    for k, (example, context) in enumerate(zip(split.examples, split.contexts)):
        score, s, e = best[k]
        if allow_null and null[k] > score:
            texts.append("")
        else:
            texts.append(example.context[int(context.char_start[s]):int(context.char_end[e])].strip())
    return texts, float(np.average(losses, weights=weights))


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------
def _squad_normalize(text: str) -> str:
    """SQuAD's official normalisation: lower-case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _SQUAD_PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


_SQUAD_PUNCTUATION = set(string.punctuation)


def squad_scores(prediction: str, gold: str) -> tuple[float, float]:
    """(exact match, F1) of one prediction against one gold answer, as SQuAD v2.0's official script."""
    pred, ref = _squad_normalize(prediction).split(), _squad_normalize(gold).split()
    exact = float(pred == ref)
    if not pred or not ref:
        return exact, exact
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return exact, 0.0
    precision, recall = common / len(pred), common / len(ref)
    return exact, 2 * precision * recall / (precision + recall)


# CMRC 2018's official list, as its script has it: "……" is one two-character entry there, which never
# equals a character, so a lone "…" is kept (and counted) as the official figures do.
_CMRC_PUNCTUATION = ['-', ':', '_', '*', '^', '/', '\\', '~', '`', '+', '=', '，', '。', '：', '？', '！', '“', '”', '；',
                     '’', '《', '》', '……', '·', '、', '「', '」', '（', '）', '－', '～', '『', '』']
_CJK_BASIC = re.compile("[\u4e00-\u9fa5]")


def _english_words(text: str) -> list[str]:
    """NLTK's word tokenizer (the official script's ``nltk.word_tokenize`` minus its sentence splitter,
    whose punkt model is a separate download; an answer is rarely two sentences)."""
    from nltk.tokenize import NLTKWordTokenizer

    return NLTKWordTokenizer().tokenize(text)


def _cmrc_tokens(text: str) -> list[str]:
    """CMRC 2018's ``mixed_segmentation(text, rm_punc=True)``: lower-cased and stripped, its punctuation
    list removed, each CJK character one token, the runs between them split by NLTK's word tokenizer."""
    tokens, run = [], ""
    for ch in text.lower().strip():
        if ch in _CMRC_PUNCTUATION:
            continue
        if _CJK_BASIC.match(ch):
            if run:
                tokens += _english_words(run)
                run = ""
            tokens.append(ch)
        else:
            run += ch
    if run:
        tokens += _english_words(run)
    return tokens


def _longest_common_substring(a: list[str], b: list[str]) -> int:
    best = 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            if x == y:
                current[j] = previous[j - 1] + 1
                best = max(best, current[j])
        previous = current
    return best


def cmrc_scores(prediction: str, gold: str) -> tuple[float, float]:
    """(exact match, F1) of one prediction against one gold answer, as CMRC 2018's official script:
    EM on the lower-cased, stripped texts without its punctuation list (inner blanks kept), F1 from the
    longest common substring of ``_cmrc_tokens``."""
    def strip(text: str) -> str:
        return "".join(ch for ch in text.lower().strip() if ch not in _CMRC_PUNCTUATION)

    exact = float(strip(prediction) == strip(gold))
    pred, ref = _cmrc_tokens(prediction), _cmrc_tokens(gold)
    common = _longest_common_substring(ref, pred)
    if common == 0:
        return exact, 0.0
    precision, recall = common / len(pred), common / len(ref)
    return exact, 2 * precision * recall / (precision + recall)


def span_report(predictions: Sequence[str], golds: Sequence[Sequence[str]], language: str) -> dict:
    """exact_match and f1 (0-1, each the best over a question's gold answers, averaged over the questions;
    an unanswerable question's gold is "")."""
    score = cmrc_scores if language == "zh" else squad_scores
    exact, f1 = [], []
    for prediction, answers in zip(predictions, golds):
        if language != "zh":  # SQuAD 2.0's script: gold answers that normalise to nothing do not count
            answers = [a for a in answers if _squad_normalize(a)]
        pairs = [score(prediction, gold) for gold in (answers or [""])]
        exact.append(max(p[0] for p in pairs))
        f1.append(max(p[1] for p in pairs))
    report = {"exact_match": float(np.mean(exact)) if exact else 0.0, "f1": float(np.mean(f1)) if f1 else 0.0,
              "examples": len(exact)}
    unanswerable = sum(1 for answers in golds if not answers)
    if unanswerable:
        report["unanswerable"] = unanswerable
    return report


def evaluate(model, split: SpanSplit, batch_size: int, max_answer: int, allow_null: bool, language: str
             ) -> tuple[dict, float, list[str]]:
    """(report, mean loss, predicted texts) of ``model`` on ``split``."""
    texts, loss = predict_answers(model, split, batch_size, max_answer, allow_null)
    report = span_report(texts, [[text for text, _ in e.answers] for e in split.examples], language)
    return report, loss, texts
