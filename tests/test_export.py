"""Export: consolidated weights that load without DeepSpeed; the fine branch as a HF BertForMaskedLM."""

from __future__ import annotations

import pytest
import torch

from data_prep.encode import TextEncoder
from pipeline.batch import IGNORE_INDEX
from tests.test_finetune import make_tiny_zh_dataset

TEXTS = ["北京大学很差。", "我们喜欢这个手机，价格满意！"]


@pytest.fixture(scope="module")
def zh_dataset(tmp_path_factory):
    return make_tiny_zh_dataset(tmp_path_factory.mktemp("zh") / "dataset")


def _model(zh_dataset, recipe="tiny", **overrides):
    from pipeline.inference import build_backbone
    from pipeline.model import model_recipe

    encoder = TextEncoder(zh_dataset)
    config = model_recipe(recipe, fine_vocab_size=len(encoder.fine_vocab), coarse_vocab_size=len(encoder.coarse_vocab),
                          hidden_dropout=0.0, attention_dropout=0.0, **overrides)
    torch.manual_seed(7)
    model = build_backbone(config).eval()
    with torch.no_grad():  # non-zero biases / norm parameters, so a mis-mapped one shows in the logits
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.05 * torch.randn_like(p))
    return model


def test_exported_model_loads_without_deepspeed_and_encodes_the_same(tmp_path, zh_dataset):
    from pipeline.finetuning import collate, encode_example
    from pipeline.inference import AmbertEncoder, save_exported

    model = _model(zh_dataset)
    export = save_exported(model, zh_dataset, tmp_path / "export")
    assert {p.name for p in export.iterdir()} >= {"model.safetensors", "config.json", "meta.json",
                                                  "fine_vocab.txt", "coarse_vocab.txt"}
    loaded = AmbertEncoder.load(export)
    out = loaded.encode(TEXTS)
    encoder = TextEncoder(zh_dataset)
    batch = collate([encode_example(encoder, t, None, 64, 64) for t in TEXTS])
    with torch.no_grad():
        reference = model.encode(batch)
    for i in range(len(TEXTS)):
        n_fine = int(batch["fine_attention_mask"][i].sum())
        n_coarse = int(batch["coarse_attention_mask"][i].sum())
        assert out.fine_vectors[i].shape == (n_fine, model.config.hidden_size)
        torch.testing.assert_close(out.fine_vectors[i], reference["fine_hidden"][i, :n_fine], rtol=0, atol=1e-6)
        torch.testing.assert_close(out.coarse_vectors[i], reference["coarse_hidden"][i, :n_coarse], rtol=0, atol=1e-6)
    assert out.fine_cls.shape == out.coarse_cls.shape == (2, model.config.hidden_size)
    placed = AmbertEncoder.load(export, device="cpu").encode(TEXTS)  # (a GPU here would be "cuda")
    assert placed.fine_cls.device.type == "cpu" and torch.equal(placed.fine_cls, out.fine_cls)


def test_texts_longer_than_the_encoder_takes_are_cut_with_a_warning(tmp_path, zh_dataset, caplog):
    """Texts past the model's positions were cut without a word (the CLI printed the whole text above
    the shortened tokens)."""
    import logging

    from pipeline.inference import AmbertEncoder, save_exported

    export = save_exported(_model(zh_dataset), zh_dataset, tmp_path / "export")
    encoder = AmbertEncoder.load(export, max_length=16)
    with caplog.at_level(logging.WARNING, logger="inference"):
        out = encoder.encode([TEXTS[0][:4], TEXTS[0] * 3])
    assert "1 of 2 text(s) are longer than the 16 tokens this encoder takes and were cut (texts[1] lost " in caplog.text
    assert len(out.fine_ids[1]) == 16 and len(out.fine_ids[0]) < 16
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="inference"):
        encoder.encode([TEXTS[0][:4]])
    assert "longer than" not in caplog.text


@pytest.mark.parametrize("variant", ["ambert", "ambert-combo", "bert-fine"])
def test_fine_branch_round_trips_through_transformers_with_identical_logits(tmp_path, zh_dataset, variant):
    from transformers import BertForMaskedLM, BertTokenizerFast

    from pipeline.export_hf import export_hf
    from pipeline.finetuning import collate, encode_example

    model = _model(zh_dataset, variant=variant)
    out_dir = export_hf(model.state_dict(), model.config, zh_dataset, tmp_path / "hf")
    hf = BertForMaskedLM.from_pretrained(out_dir).eval()
    tokenizer = BertTokenizerFast.from_pretrained(out_dir)

    encoder = TextEncoder(zh_dataset)
    batch = collate([encode_example(encoder, TEXTS[0], TEXTS[1], 64, 64), encode_example(encoder, TEXTS[0], None, 64, 64)])
    # Our MLM head runs only at labelled positions: label EVERY real fine token to get dense logits.
    labels = batch["fine_ids"].masked_fill(batch["fine_attention_mask"] == 0, IGNORE_INDEX)
    batch["fine_labels"] = labels
    batch["coarse_labels"] = torch.full_like(batch["coarse_ids"], IGNORE_INDEX)
    batch["coarse_labels"][:, 1] = batch["coarse_ids"][:, 1]
    with torch.no_grad():
        ours = model(batch, return_logits=True)["fine_logits"][:, : model.config.fine_vocab_size]
        theirs = hf(input_ids=batch["fine_ids"], attention_mask=batch["fine_attention_mask"],
                    token_type_ids=batch["fine_token_types"]).logits
    theirs = theirs[labels != IGNORE_INDEX]
    assert ours.shape == theirs.shape and ours.shape[0] == int(batch["fine_attention_mask"].sum())
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    assert ours.std() > 0.1  # not trivially equal

    # The WordPiece tokenizer built from fine_vocab.txt gives our ids for Chinese text.
    assert tokenizer(TEXTS[0])["input_ids"] == batch["fine_ids"][1][: int(batch["fine_attention_mask"][1].sum())].tolist()
    if variant == "ambert":  # given back where an AMBERT model is expected: named as what it is
        from pipeline.checkpoint import CheckpointError, load_init_weights
        from pipeline.finetuning import FinetuneError, resolve_pretrained

        with pytest.raises(FinetuneError, match=rf"--model {out_dir} is a Hugging Face BertForMaskedLM .*export_hf.*"
                                                rf"Give the AMBERT model it was made from"):
            resolve_pretrained(str(out_dir), str(zh_dataset))
        with pytest.raises(CheckpointError, match=r"checkpointing.init_from .* is a Hugging Face BertForMaskedLM"):
            load_init_weights(str(out_dir), None, {})


def test_non_bert_options_are_refused_with_the_option_named(tmp_path, zh_dataset):
    from pipeline.export_hf import HFExportError, export_hf

    model = _model(zh_dataset, recipe="tiny-modern")
    with pytest.raises(HFExportError, match=r"pre_norm=True.*norm=rmsnorm.*activation=geglu.*position=rope.*bias=False"
                                            r".*num_query_groups=2.*local_window=8"):
        export_hf(model.state_dict(), model.config, zh_dataset, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    # a window that no layer uses (global_every=1: every layer global) is not a reason to refuse
    from pipeline.export_hf import check_bert_compatible
    from pipeline.model import model_recipe

    check_bert_compatible(model_recipe("tiny", local_window=8, global_every=1))


def test_inference_command_prints_both_tokenizations_and_the_cls_vectors(tmp_path, zh_dataset, capsys):
    import json

    from pipeline.inference import AmbertEncoder, main, save_exported

    export = save_exported(_model(zh_dataset), zh_dataset, tmp_path / "export")
    assert main([str(export), TEXTS[0]]) == 0
    printed = capsys.readouterr().out
    assert "fine_tokens: [CLS] 北 京 大 学 很 差 。 [SEP]" in printed
    assert "coarse_tokens: [CLS] " in printed and "fine_cls_norm: " in printed
    assert main([str(export), *TEXTS, "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    reference = AmbertEncoder.load(export).encode(TEXTS)
    assert [r["text"] for r in records] == TEXTS
    for i, record in enumerate(records):
        torch.testing.assert_close(torch.tensor(record["coarse_cls"]), reference.coarse_cls[i], rtol=0, atol=1e-6)
    assert main([str(tmp_path / "nope"), "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_tools_do_not_print_megatrons_import_warnings():
    """`python -m pipeline.inference` (and finetune, convert, export_hf) once printed four UserWarnings
    of megatron-core ("Transformer Engine and Apex are not installed") before their own output."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = "import pipeline.inference, pipeline.finetuning, pipeline.convert, pipeline.export_hf, pipeline.model"
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Transformer Engine and Apex are not installed" not in result.stderr, result.stderr


def universal_checkpoint(root, dataset, step: int = 2):
    """A complete checkpoint as `pipeline.convert universal` writes it (marker + zero/<param>/fp32.pt),
    with one tiny tensor: enough for `pipeline.convert export` to run end to end in a moment."""
    import json

    source = root / "checkpoints" / f"step_{step:08d}"
    (source / "zero" / "weight").mkdir(parents=True)
    torch.save({"param": torch.full((2, 3), float(step))}, source / "zero" / "weight" / "fp32.pt")
    marker = {"step": step, "universal": True, "model_config": {"hidden_size": 3}, "dataset_path": str(dataset)}
    (source / "COMPLETE").write_text(json.dumps(marker), encoding="utf-8")
    return source


def test_an_export_that_fills_the_disk_says_so_and_removes_what_it_wrote(tmp_path, zh_dataset, monkeypatch, capsys):
    """`pipeline.convert export` / `universal` on a full disk (safetensors and torch.save report it as a
    bare I/O or "unexpected pos" error): one line that says so, the half-written output removed; a
    failure with space left is raised as it is."""
    import shutil
    from collections import namedtuple

    import safetensors.torch

    from pipeline import convert

    source = universal_checkpoint(tmp_path / "run", zh_dataset)
    out = tmp_path / "export"

    def fills_the_disk(state, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"x" * 1000)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2688 vs 2580")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(safetensors.torch, "save_file", fills_the_disk)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 40, 1 << 40, 0))
    assert convert.main(["export", str(source), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: export of {source} to {out} failed: the disk is full (0.0 MB free "
                          f"of 1099.51 GB there; RuntimeError: [enforce fail")
    assert "free space, or give another OUTPUT, then run the same command again" in err
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # nothing half-written left next to OUTPUT
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 40, 1 << 30, 1 << 39))
    with pytest.raises(RuntimeError, match="unexpected pos"):
        convert.main(["export", str(source), str(out)])
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_a_missing_vocabulary_names_what_to_rebuild(tmp_path, zh_dataset):
    """A vocabulary missing from an export said "rebuild the dataset"; an export is exported again."""
    import shutil

    from data_prep.format import FormatError, Vocab
    from pipeline.inference import save_exported

    export = save_exported(_model(zh_dataset), zh_dataset, tmp_path / "export")
    (export / "fine_vocab.txt").unlink()
    with pytest.raises(FormatError, match=r"fine_vocab.txt is missing: restore it, or rebuild the export "
                                          r"\(`python -m pipeline.convert export CHECKPOINT .*export`\)"):
        Vocab.load(export / "fine_vocab.txt")
    dataset = tmp_path / "dataset"
    shutil.copytree(zh_dataset, dataset)
    (dataset / "coarse_vocab.txt").unlink()
    with pytest.raises(FormatError, match=r"coarse_vocab.txt is missing: restore it, or rebuild the dataset$"):
        Vocab.load(dataset / "coarse_vocab.txt")
