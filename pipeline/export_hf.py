"""Export the FINE branch of an AMBERT model as a Hugging Face ``BertForMaskedLM`` directory.

    python -m pipeline.export_hf exported/ambert-zh hf/ambert-zh-fine      # from an exported model dir
    python -m pipeline.export_hf runs/demo/checkpoints/step_00000200 hf/demo-fine   # or a checkpoint
    # then, anywhere:  transformers.BertForMaskedLM.from_pretrained("hf/ambert-zh-fine")
    #                  transformers.AutoTokenizer.from_pretrained("hf/ambert-zh-fine")

What goes in: the fine word embeddings, the position / segment embeddings and the encoder the fine
tokens go through (the shared one for ``ambert``; the fine one for ``ambert-combo``), and the fine
MLM head (transform + tied decoder + bias). Padded vocabulary rows are cut off. The tokenizer is a
WordPiece ``vocab.txt`` = our fine_vocab.txt (same ids; "##" marks continuations in both), with
``do_lower_case`` as in the pre-training build, accents kept and NFKC first, as data_prep. Note the HF
tokenizer is an approximation of our fine tokenizer (BERT's basic tokenization + greedy WordPiece);
ids produced by data_prep stay the reference, and the logits for the same ids are identical
(tests/test_export.py). Load it with ``AutoTokenizer`` (``tokenizer.json`` as written);
``BertTokenizerFast`` rebuilds BERT's normalizer under transformers 5, without NFKC.

Only BERT-compatible encoders can be expressed as BertForMaskedLM: post-LN, LayerNorm with biases,
GELU, learned absolute positions, multi-head attention (no GQA), no local attention. Anything else
is refused with the option that prevents it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from data_prep import format as fmt
from pipeline.convert import check_export_output, commit_output, scratch_directory, shareable


class HFExportError(ValueError):
    """The model cannot be written as a BertForMaskedLM; the message names the option."""


def check_bert_compatible(config) -> None:
    problems = []
    if config.variant == "bert-coarse":
        problems.append("variant bert-coarse has no fine branch")
    if config.variant == "ambert-hybrid":
        problems.append("variant ambert-hybrid (its fine tokens attend to coarse tokens: the fine branch alone is not the model)")
    if config.pre_norm:
        problems.append("pre_norm=True (BERT is post-LN)")
    if config.norm != "layernorm":
        problems.append(f"norm={config.norm} (BERT uses LayerNorm)")
    if config.activation != "gelu":
        problems.append(f"activation={config.activation} (BERT uses GELU)")
    if config.position != "learned":
        problems.append(f"position={config.position} (BERT uses learned absolute positions)")
    if not config.bias:
        problems.append("bias=False (BERT has biases)")
    if config.query_groups != config.num_attention_heads:
        problems.append(f"num_query_groups={config.num_query_groups} (BERT has no grouped-query attention)")
    if not all(config.is_global_layer(i) for i in range(config.num_layers)):
        problems.append(f"local_window={config.local_window} with global_every={config.global_every} "
                        f"(sliding-window layers; BERT attends globally)")
    if problems:
        raise HFExportError(
            "this model cannot be exported as a Hugging Face BertForMaskedLM: " + "; ".join(problems)
            + ". Keep it in our own format, which takes any options and which pipeline.finetune / pipeline.inference "
              "load (`python -m pipeline.convert export` for a checkpoint; an export already is in it)")


def bert_state_dict(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Our parameter names/layouts -> BertForMaskedLM's."""
    check_bert_compatible(config)
    stream = "fine" if config.variant == "ambert-combo" else "shared"
    vocab = config.fine_vocab_size
    H, heads, d = config.hidden_size, config.num_attention_heads, config.head_dim
    emb = f"embeddings.{stream}."
    out = {
        "bert.embeddings.word_embeddings.weight": state["word_embeddings.fine.weight"][:vocab],
        "bert.embeddings.position_embeddings.weight": state[emb + "positions"],
        "bert.embeddings.LayerNorm.weight": state[emb + "norm.weight"],
        "bert.embeddings.LayerNorm.bias": state[emb + "norm.bias"],
    }
    token_types = state.get(emb + "token_types")
    if token_types is None:  # no segment embeddings: one all-zero row does the same in BERT
        token_types = torch.zeros(1, H)
    out["bert.embeddings.token_type_embeddings.weight"] = token_types
    for i in range(config.num_layers):
        ours, theirs = f"encoders.{stream}.layers.{i}.", f"bert.encoder.layer.{i}."
        # Fused QKV is laid out head by head ([q_h ; k_h ; v_h] per head when there is no GQA).
        qkv_w = state[ours + "attention.qkv.weight"].view(heads, 3, d, H)
        qkv_b = state[ours + "attention.qkv.bias"].view(heads, 3, d)
        for j, name in enumerate(("query", "key", "value")):
            out[theirs + f"attention.self.{name}.weight"] = qkv_w[:, j].reshape(heads * d, H)
            out[theirs + f"attention.self.{name}.bias"] = qkv_b[:, j].reshape(heads * d)
        pairs = {
            "attention.output.weight": "attention.output.dense.weight",
            "attention.output.bias": "attention.output.dense.bias",
            "attention_norm.weight": "attention.output.LayerNorm.weight",
            "attention_norm.bias": "attention.output.LayerNorm.bias",
            "mlp.fc1.weight": "intermediate.dense.weight",
            "mlp.fc1.bias": "intermediate.dense.bias",
            "mlp.fc2.weight": "output.dense.weight",
            "mlp.fc2.bias": "output.dense.bias",
            "mlp_norm.weight": "output.LayerNorm.weight",
            "mlp_norm.bias": "output.LayerNorm.bias",
        }
        for a, b in pairs.items():
            out[theirs + b] = state[ours + a]
    out.update({
        "cls.predictions.transform.dense.weight": state["heads.fine.dense.weight"],
        "cls.predictions.transform.dense.bias": state["heads.fine.dense.bias"],
        "cls.predictions.transform.LayerNorm.weight": state["heads.fine.norm.weight"],
        "cls.predictions.transform.LayerNorm.bias": state["heads.fine.norm.bias"],
        "cls.predictions.bias": state["heads.fine.bias"][:vocab],
        "cls.predictions.decoder.weight": state["word_embeddings.fine.weight"][:vocab],
        "cls.predictions.decoder.bias": state["heads.fine.bias"][:vocab],
    })
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def bert_config(config):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=config.fine_vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads, intermediate_size=config.ffn_size, hidden_act="gelu",
        hidden_dropout_prob=config.hidden_dropout, attention_probs_dropout_prob=config.attention_dropout,
        max_position_embeddings=config.max_position_embeddings, type_vocab_size=max(config.type_vocab_size, 1),
        initializer_range=config.init_std, layer_norm_eps=config.layer_norm_eps, pad_token_id=fmt.PAD_ID,
        tie_word_embeddings=True, architectures=["BertForMaskedLM"],
    )


def export_hf(state: dict[str, torch.Tensor], config, tokenizer_dir: str | Path, output: str | Path) -> Path:
    """Write a BertForMaskedLM directory (weights, config, WordPiece tokenizer) to ``output``."""
    from transformers import BertForMaskedLM

    tensors = bert_state_dict(state, config)
    model = BertForMaskedLM(bert_config(config))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    if missing or unexpected:
        raise HFExportError(f"internal: BertForMaskedLM keys do not match (missing {missing}, unexpected {unexpected})")
    final = Path(output)
    check_export_output(final, ("config.json", "vocab.txt"), "a Hugging Face model")
    meta_file = Path(tokenizer_dir) / fmt.META_FILE  # read before anything is written
    try:
        meta = fmt.read_json_object(meta_file)
    except (OSError, ValueError) as exc:
        raise HFExportError(f"{meta_file} cannot be read ({' '.join(str(exc).split())[:200]}): it is one of the "
                            f"tokenizer files the export copies from the pre-training dataset; copy the dataset's "
                            f"meta.json there again (or export again from the checkpoint)") from None
    vocab = fmt.Vocab.load(Path(tokenizer_dir) / fmt.FINE_VOCAB_FILE)
    output = scratch_directory(final, "partial")  # written aside (a new name), renamed when complete
    try:
        _write_hf(model, meta, vocab, config, output)
        shareable(*(p for p in output.iterdir() if p.is_file()))  # model.safetensors is written 0600
        return commit_output(output, final, "a Hugging Face model")
    except BaseException:
        shutil.rmtree(output, ignore_errors=True)  # nothing half-written is left behind
        raise


def _write_hf(model, meta: dict, vocab, config, output: Path) -> None:
    from transformers import BertTokenizerFast

    model.save_pretrained(str(output))
    options = meta.get("build", {}).get("language_options", {})
    lowercase = not options.get("cased", False)  # zh: NFKC keeps case; en: lower-cased unless --cased
    if meta.get("language") == "zh":
        lowercase = False
    vocab.save(output / "vocab.txt")  # the classic WordPiece file, for older loaders and other tools
    # strip_accents=False: BERT strips accents whenever it lower-cases, data_prep never does ("naïve" and
    # "café" are their own entries of fine_vocab.txt; stripped they would become other ids or [UNK])
    try:  # transformers >= 5 takes the vocabulary itself; 4.x a vocab_file path
        tokenizer = BertTokenizerFast(vocab=dict(vocab.index), do_lower_case=lowercase, strip_accents=False,
                                      tokenize_chinese_chars=True,
                                      model_max_length=config.max_position_embeddings)
    except TypeError:
        tokenizer = BertTokenizerFast(vocab_file=str(output / "vocab.txt"), do_lower_case=lowercase,
                                      strip_accents=False, tokenize_chinese_chars=True, model_max_length=config.max_position_embeddings)
    if len(tokenizer) != len(vocab):
        raise HFExportError(f"internal: the HF tokenizer has {len(tokenizer)} entries, fine_vocab.txt {len(vocab)}")
    # data_prep applies NFKC first (full-width "，" "１２" "（" are "," "12" "(" in fine_vocab.txt): without it
    # BERT's normalizer leaves them as [UNK], most lines of Chinese news. A BertTokenizerFast rebuilds its
    # normalizer from its flags when loaded (transformers 5), so the directory names the generic fast class,
    # which loads tokenizer.json as written (with segment ids, as BERT's).
    from tokenizers import normalizers

    tokenizer.backend_tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), tokenizer.backend_tokenizer.normalizer])
    tokenizer.save_pretrained(str(output))
    tokenizer_config = json.loads((output / "tokenizer_config.json").read_text(encoding="utf-8"))
    tokenizer_config.update(tokenizer_class="PreTrainedTokenizerFast",
                            model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    (output / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    from pipeline.finetuning import resolve_pretrained

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="exported model dir (python -m pipeline.convert export) or a training "
                                      "checkpoint dir (step_XXXXXXXX with COMPLETE, saved at TP=1)")
    parser.add_argument("output", help="directory for the Hugging Face BertForMaskedLM")
    parser.add_argument("--dataset", default="", help="pre-training dataset dir (default: the one the model records)")
    args = parser.parse_args(argv)
    try:
        if (Path(args.model) / "COMPLETE").is_file():  # a training checkpoint: retention deletes what is inside
            from pipeline.convert import _refuse_inside

            _refuse_inside(Path(args.model), Path(args.output), "output")
        check_export_output(Path(args.output), ("config.json", "vocab.txt"), "a Hugging Face model")
        pretrained = resolve_pretrained(args.model, args.dataset, flag="MODEL", allow_random=False,
                                        same_dataset=True)
        check_bert_compatible(pretrained.model_config)  # before any file is written
        path = export_hf(pretrained.state_dict, pretrained.model_config, pretrained.tokenizer_dir, args.output)
    except (HFExportError, ValueError) as exc:  # FinetuneError and ConvertError are ValueErrors
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
