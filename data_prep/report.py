"""Human-readable report of an English build: the phrase list and coarse-tokenized examples.

Written into the dataset directory as ``phrase_report.txt`` (for a terminal) and
``phrase_report.html`` (phrases highlighted). It is for people judging the phrase dictionary:
are the phrases fixed expressions and names ("prime minister", "new york"), or fragments?
"""

from __future__ import annotations

import html
import itertools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from data_prep.format import HTML_REPORT, PHRASE_JOINER, TEXT_REPORT

if TYPE_CHECKING:  # pragma: no cover
    from data_prep.english import EnglishTokenizers
    from data_prep.phrases import Phrase

TOP_PHRASES = 300
EXAMPLES = 40


def sampled_files(num_files: int, max_files: int = 40) -> range:
    """Indices of the (at most ``max_files``, evenly spaced) words files ``sample_sentences`` reads:
    the build keeps these shards' caches until the report is written."""
    return range(0, num_files, max(1, -(-num_files // max_files)))


def sample_sentences(words_files: str | os.PathLike | Sequence[str | os.PathLike], count: int = EXAMPLES,
                     min_words: int = 8, max_files: int = 40, max_lines: int | None = None) -> list[list[str]]:
    """``count`` sentences spread over the corpus (deterministic), each of >= min_words words;
    ``words_files``: one sentence a line, in corpus order (the build's shards). Reads at most
    ``max_lines`` lines (default: 4 x count over the files read, at least 16 a file) of at most
    ``max_files`` evenly spaced files: the report must not be a serial pass over the corpus (reading
    whole shards took the 20 MB build's main process 0.4 s, beside the workers encoding)."""
    files = [words_files] if isinstance(words_files, (str, os.PathLike)) else list(words_files)
    if not files:
        return []
    chosen = [files[i] for i in sampled_files(len(files), max_files)]
    if max_lines is None:
        max_lines = max(16, -(-4 * count // len(chosen)))
    pool: list[list[str]] = []
    for path in chosen:
        with open(path, encoding="utf-8") as f:
            for line in itertools.islice(f, max_lines):
                words = line.split()
                if len(words) >= min_words and any(len(w) > 1 for w in words):
                    pool.append(words)
    # Prefer sentences that show phrases, but keep the choice deterministic.
    return pool[:: max(1, len(pool) // count)][:count]


def _coarse(tokenizers: EnglishTokenizers, words: Sequence[str]) -> list[tuple[str, str]]:
    """(token, kind) with kind in word | phrase | oov."""
    out, i = [], 0
    for length in tokenizers.phrase_tokenizer.spans(words):
        token = PHRASE_JOINER.join(words[i:i + length])
        kind = "phrase" if length > 1 else ("word" if token in tokenizers.coarse_vocab else "oov")
        out.append((token, kind))
        i += length
    return out


def _fine(tokenizers: EnglishTokenizers, words: Sequence[str]) -> list[str]:
    enc = tokenizers.fine_tokenizer.encode(list(words), is_pretokenized=True, add_special_tokens=False)
    return [tokenizers.fine_vocab.token(i) for i in enc.ids]


def choose_examples(tokenizers: EnglishTokenizers,
                    words_files: str | os.PathLike | Sequence[str | os.PathLike]) -> list[list[str]]:
    """The report's example sentences: two thirds show at least one phrase (that is what a reader
    checks), the rest are plain sentences; both spread over the corpus, deterministic."""
    pool = sample_sentences(words_files, count=EXAMPLES * 4)
    with_phrase = [w for w in pool if any(k == "phrase" for _, k in _coarse(tokenizers, w))]
    without = [w for w in pool if w not in with_phrase]
    n_with = min(len(with_phrase), EXAMPLES * 2 // 3)
    examples = with_phrase[:: max(1, len(with_phrase) // max(1, n_with))][:n_with]
    examples += without[:: max(1, len(without) // max(1, EXAMPLES - n_with))][: EXAMPLES - n_with]
    return examples


def write_report(directory: str | os.PathLike, phrases: Sequence[Phrase], tokenizers: EnglishTokenizers,
                 words_files: str | os.PathLike | Sequence[str | os.PathLike] | None, stats: dict,
                 examples: list[list[str]] | None = None) -> None:
    """phrase_report.txt / .html: ``stats``, the top phrases and example sentences (``examples``, or
    chosen from ``words_files``)."""
    directory = Path(directory)
    if examples is None:
        examples = choose_examples(tokenizers, words_files or [])
    summary = {k: v for k, v in stats.items() if k not in ("top_phrases",)}

    text = ["AMBERT English build: phrase dictionary report", "=" * 48, ""]
    text += [f"{k}: {json.dumps(v)}" for k, v in summary.items()]
    mined = stats.get("phrases_mined")
    listed = (f"the {len(phrases)} phrases in the coarse vocabulary" + (f"; phrases.tsv lists all {mined} mined"
              if mined not in (None, len(phrases)) else "; full list in phrases.tsv"))
    text += ["", f"Top {min(TOP_PHRASES, len(phrases))} of {listed} (by score)",
             f"{'phrase':40s} {'count':>8s} {'score':>8s} {'log10 p':>8s} {'lift':>6s}"]
    for p in phrases[:TOP_PHRASES]:
        text.append(f"{p.text:40s} {p.count:8d} {p.score:8.3f} {p.min_logprob:8.3f} {p.min_lift:6.2f}")
    text += ["", "Examples: coarse tokens ([phrase], <out of coarse vocabulary>) and fine tokens", ""]
    for words in examples:
        coarse = " ".join(f"[{t.replace(PHRASE_JOINER, ' ')}]" if k == "phrase" else (f"<{t}>" if k == "oov" else t)
                          for t, k in _coarse(tokenizers, words))
        text += ["coarse: " + coarse, "fine:   " + " ".join(_fine(tokenizers, words)), ""]
    (directory / TEXT_REPORT).write_text("\n".join(text) + "\n", encoding="utf-8")

    esc = html.escape
    rows = "\n".join(
        f"<tr><td>{esc(p.text)}</td><td>{p.count}</td><td>{p.score:.3f}</td><td>{p.min_logprob:.3f}</td>"
        f"<td>{p.min_lift:.2f}</td></tr>" for p in phrases[:TOP_PHRASES])
    sample_html = []
    for words in examples:
        spans = []
        for t, k in _coarse(tokenizers, words):
            label = esc(t.replace(PHRASE_JOINER, " "))
            spans.append(f'<span class="{k}">{label}</span>')
        sample_html.append(f"<li>{' '.join(spans)}<br><small>{esc(' '.join(_fine(tokenizers, words)))}</small></li>")
    stats_html = "".join(f"<tr><th>{esc(k)}</th><td>{esc(json.dumps(v))}</td></tr>" for k, v in summary.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>AMBERT English phrase report</title>
<style>body{{font-family:sans-serif;max-width:70em;margin:auto}} td,th{{padding:2px 8px;text-align:left}}
.phrase{{background:#ffe08a;border-radius:3px;padding:0 2px}} .oov{{background:#f8b4b4}}
li{{margin-bottom:.6em}} small{{color:#666}}</style></head><body>
<h1>AMBERT English build: phrase dictionary</h1>
<table>{stats_html}</table>
<h2>Coarse-tokenized examples</h2><p><span class="phrase">phrase</span> = one coarse token,
<span class="oov">word</span> = outside the coarse vocabulary ([UNK] on the coarse side); grey = fine WordPiece tokens.</p>
<ol>{''.join(sample_html)}</ol>
<h2>Top {min(TOP_PHRASES, len(phrases))} of {esc(listed)}</h2>
<table><tr><th>phrase</th><th>count</th><th>score</th><th>min log10 p</th><th>min lift</th></tr>
{rows}</table></body></html>
"""
    (directory / HTML_REPORT).write_text(page, encoding="utf-8")
