"""Re-read a built dataset and check every document: ``python data_prep/build.py --verify DIR``.

Checks (any failure is a defect; the command exits non-zero):
- the directory is a complete dataset (format.PairedDataset opens it: meta, vocabularies, splits);
- meta.json vocab sizes and per-split document/sentence/token counts match the files;
- every split has at least one document;
- per sentence: 1 <= align, sum(align) == len(fine), len(align) == len(coarse), ids < vocab size;
- per coarse token: its string equals the concatenation of the fine tokens it covers, modulo the
  "##" continuation and "_" phrase conventions (skipped when either side has a special token);
- per sentence: detokenize(fine) == detokenize(coarse) (skipped when either contains [UNK]).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from data_prep import format as fmt

MAX_REPORTED = 20


@dataclass
class VerifyReport:
    directory: str
    ok: bool = True
    defects: list[str] = field(default_factory=list)
    num_defects: int = 0
    counts: dict = field(default_factory=dict)
    seconds: float = 0.0

    def defect(self, message: str) -> None:
        self.ok = False
        self.num_defects += 1
        if len(self.defects) < MAX_REPORTED:
            self.defects.append(message)

    def summary(self) -> str:
        lines = [f"verify {self.directory}: {'OK' if self.ok else 'FAILED'} ({self.seconds:.1f}s)"]
        for split, c in self.counts.items():
            lines.append(
                f"  {split}: {c['documents']:,} documents, {c['sentences']:,} sentences, {c['fine_tokens']:,} fine / "
                f"{c['coarse_tokens']:,} coarse tokens; coarse tokens checked against their fine tokens: "
                f"{c['coarse_checked']:,}; sentences decoded identically: {c['decoded_equal']:,} "
                f"(skipped with [UNK]: {c['decode_skipped']:,})"
            )
        if not self.ok:
            lines.append(f"  {self.num_defects} defect(s); first {len(self.defects)}:")
            lines += [f"    - {d}" for d in self.defects]
        return "\n".join(lines)


def _strip(token: str) -> str:
    return token[2:] if token.startswith(fmt.CONTINUATION) and len(token) > 2 else token


def verify_dataset(directory: str, progress: bool = True) -> VerifyReport:
    started = time.time()
    report = VerifyReport(str(directory))
    try:
        ds = fmt.PairedDataset(directory)
    except (fmt.FormatError, OSError, ValueError) as exc:
        report.defect(str(exc))
        return report
    language = ds.language
    fine_tokens = ds.fine_vocab.tokens
    coarse_tokens = ds.coarse_vocab.tokens
    nf, nc = len(fine_tokens), len(coarse_tokens)
    special = set(range(fmt.NUM_SPECIAL))
    for split in fmt.SPLITS:
        try:
            data = ds.split(split)
        except fmt.FormatError as exc:
            report.defect(str(exc))
            continue
        counts = {"documents": len(data), "sentences": data.num_sentences, "fine_tokens": 0, "coarse_tokens": 0,
                  "coarse_checked": 0, "decoded_equal": 0, "decode_skipped": 0}
        report.counts[split] = counts
        if len(data) == 0:
            report.defect(f"{split}: 0 documents (every split needs at least one)")
        recorded = ds.meta.get("splits", {}).get(split)
        from tqdm import tqdm

        for d in tqdm(range(len(data)), desc=f"verify {split}", disable=not progress, mininterval=0.5):
            try:
                doc = data.document(d)
            except (ValueError, OSError, IndexError) as exc:  # damaged files that still opened
                report.defect(f"{split} document {d}: cannot be read ({exc}); rebuild the dataset")
                break
            counts["fine_tokens"] += len(doc.fine)
            counts["coarse_tokens"] += len(doc.coarse)
            if len(doc.fine) and (doc.fine.max() >= nf or doc.coarse.max() >= nc):
                report.defect(f"{split} document {d}: id beyond the vocabulary")
                continue
            for s in range(doc.num_sentences):
                f0, f1 = int(doc.fine_offsets[s]), int(doc.fine_offsets[s + 1])
                c0, c1 = int(doc.coarse_offsets[s]), int(doc.coarse_offsets[s + 1])
                fine = doc.fine[f0:f1].tolist()
                coarse = doc.coarse[c0:c1].tolist()
                align = doc.align[c0:c1]
                where = f"{split} document {d} sentence {s}"
                if not fine or not coarse:
                    report.defect(f"{where}: empty sentence")
                    continue
                if align.min() < 1 or int(align.sum()) != len(fine):
                    report.defect(f"{where}: alignment covers {int(align.sum())} fine tokens, the sentence has {len(fine)}")
                    continue
                fine_str = [fine_tokens[i] for i in fine]
                coarse_str = [coarse_tokens[i] for i in coarse]
                pos = 0
                for k, n in enumerate(align.tolist()):
                    span = fine[pos:pos + n]
                    if coarse[k] not in special and not any(i in special for i in span):
                        pieces = fine_str[pos:pos + n]
                        joined = pieces[0] + "".join(_strip(p) for p in pieces[1:])
                        expected = coarse_str[k]
                        if language == "en" and len(expected) > 1:
                            expected = expected.replace(fmt.PHRASE_JOINER, "")
                            joined = joined.replace(fmt.PHRASE_JOINER, "")
                        if joined != expected:
                            report.defect(f"{where}: coarse token {coarse_str[k]!r} covers fine tokens {pieces}")
                        counts["coarse_checked"] += 1
                    pos += n
                if fmt.UNK_ID in fine or fmt.UNK_ID in coarse:
                    counts["decode_skipped"] += 1
                    continue
                a, b = fmt.detokenize(fine_str, language), fmt.detokenize(coarse_str, language)
                if a != b:
                    report.defect(f"{where}: fine decodes to {a[:80]!r}, coarse to {b[:80]!r}")
                else:
                    counts["decoded_equal"] += 1
        if recorded is not None:
            for key in ("documents", "sentences", "fine_tokens", "coarse_tokens"):
                if key in recorded and recorded[key] != counts[key]:
                    report.defect(f"{split}: meta.json says {key}={recorded[key]}, the files have {counts[key]}")
    for name, size in (("fine", nf), ("coarse", nc)):
        if ds.meta.get(f"{name}_vocab_size") != size:
            report.defect(f"meta.json {name}_vocab_size={ds.meta.get(f'{name}_vocab_size')}, the vocabulary has {size}")
    report.seconds = time.time() - started
    return report
