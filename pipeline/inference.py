"""Load an exported AMBERT model and turn texts into fine and coarse vectors: no DeepSpeed, one process.

    from pipeline.inference import AmbertEncoder
    encoder = AmbertEncoder.load("exported/ambert-zh")          # weights + config + tokenizers
    out = encoder.encode(["今天天气很好。", "股市大涨"])
    out.fine_vectors[i]    # [fine tokens of text i (with [CLS]/[SEP]), H]
    out.coarse_vectors[i]  # [coarse tokens of text i, H]
    out.fine_cls, out.coarse_cls   # [B, H] the two [CLS] vectors

    python -m pipeline.inference exported/ambert-zh "北京大学的学生"   # both tokenizations, [CLS] norms
    python -m pipeline.inference exported/ambert-zh "..." --json      # one JSON line per text, with the vectors

An exported directory (``python -m pipeline.convert export`` or ``save_exported`` here) holds:

    model.safetensors   consolidated fp32 weights of AmbertForPreTraining at TP=1 (padded vocab rows kept)
    config.json         the ModelConfig fields
    meta.json, fine_vocab.txt, coarse_vocab.txt [, fine_tokenizer.json, phrases.tsv]
                        the pre-training dataset's tokenizer artifacts (data_prep/encode.py reads them);
                        without them, training.json's dataset_path is used

Texts are tokenized by ``data_prep.encode.TextEncoder`` from those artifacts: exactly the tokenizers
the model was pre-trained with.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("inference")
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CHECKPOINT_MARKER = "COMPLETE"  # pipeline.checkpoint.COMPLETE (not imported: that module pulls in torch.distributed)


def _kept(directory: Path) -> str | None:
    if (directory / CHECKPOINT_MARKER).is_file():
        return (f"training checkpoint {directory} (it has a {CHECKPOINT_MARKER} marker; checkpoint retention deletes "
                f"such directories with everything in them)")
    if (directory / CONFIG_FILE).is_file() and (directory / WEIGHTS_FILE).is_file():
        return (f"model directory {directory} (an export or a saved fine-tuned model: it has {CONFIG_FILE} and "
                f"{WEIGHTS_FILE}; its files are the model's, loaded, copied and replaced as one)")
    from data_prep.format import META_FILE

    if (directory / META_FILE).is_file():
        try:
            meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = None
        if isinstance(meta, dict) and "format_version" in meta and "language" in meta:
            return (f"pre-training dataset {directory} (data_prep's {META_FILE}; a rebuild replaces the directory and "
                    f"refuses one holding files it does not write)")
    return None


def kept_directory(path: str | os.PathLike) -> str | None:
    """What ``path`` or the nearest of its parent directories is when outputs (predictions, fine-tuning
    results, a training run) must not be written into it: a training checkpoint, a model export or saved
    fine-tuned model, a data_prep dataset. None: they may."""
    path = Path(path).absolute().resolve()
    for directory in (path, *path.parents):
        what = _kept(directory) if directory.is_dir() else None
        if what:
            return what
    return None


class ExportError(ValueError):
    """An exported model directory is missing a file or does not match its vocabularies."""


def ensure_single_process() -> None:
    """A 1-rank gloo group + megatron TP=1 state, unless a process group already exists.

    Our layers are megatron-core tensor-parallel layers: they need a (trivial) TP group even in
    one process. No DeepSpeed is involved."""
    import torch.distributed as dist

    from pipeline import parallel

    if not dist.is_initialized():
        from pipeline.model.layers import megatron_config  # noqa: F401  (imports megatron early, clearer errors)

        store = dist.HashStore()
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        parallel.initialize_parallel(tensor_parallel_size=1, seed=1234)


def tokenizer_dir_of(directory: str | os.PathLike) -> Path:
    """Where the tokenizer files of an exported model are: next to the weights, or (an export
    without them) the pre-training dataset recorded in its training.json."""
    directory = Path(directory)
    if (directory / "meta.json").is_file():
        return directory
    training = directory / "training.json"
    if training.is_file():
        dataset = json.loads(training.read_text(encoding="utf-8")).get("dataset_path")
        if dataset and (Path(dataset) / "meta.json").is_file():
            return Path(dataset)
        raise ExportError(f"{directory} has no tokenizer files and its pre-training dataset {dataset} is gone: copy "
                          f"meta.json, fine_vocab.txt, coarse_vocab.txt (and fine_tokenizer.json, phrases.tsv) of that "
                          f"dataset into {directory}")
    raise ExportError(f"{directory} has no tokenizer files (meta.json, fine_vocab.txt, coarse_vocab.txt): copy them "
                      f"from the pre-training dataset into it")


def read_model_config(directory: str | os.PathLike):
    from pipeline.model import ModelConfig

    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ExportError(f"{directory} has no {CONFIG_FILE}: export a checkpoint first with "
                          f"`python -m pipeline.convert export CHECKPOINT {directory}`")
    again = f"restore it, or export again: `python -m pipeline.convert export CHECKPOINT {directory}`"
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportError(f"{path} is not valid JSON ({exc}): the model's config file is damaged; {again}") from None
    if isinstance(values, dict):
        values = values.get("model_config", values)
    if not isinstance(values, dict):
        raise ExportError(f"{path} holds a JSON {type(values).__name__}, not the model config object an export "
                          f"writes; {again}")
    try:
        config = ModelConfig.from_dict(values)
        config.validate()
    except (TypeError, ValueError) as exc:
        raise ExportError(f"{path} is not a valid model config ({exc}); {again}") from None
    return config


def load_state_dict(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise ExportError(f"{directory} has no {WEIGHTS_FILE}; export a checkpoint with `python -m pipeline.convert export`")
    from safetensors import SafetensorError

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:  # cut short, overwritten, unreadable
        raise ExportError(f"{path} cannot be read ({type(exc).__name__}: {' '.join(str(exc).split())[:300]}): the "
                          f"weights file is damaged or incomplete (an interrupted copy or export?); export again: "
                          f"`python -m pipeline.convert export CHECKPOINT {directory}`") from None


def check_vocabularies(model_config, fine_vocab_size: int, coarse_vocab_size: int, where: str) -> None:
    """The model's embedding tables must have been built for these vocabularies."""
    if (model_config.fine_vocab_size, model_config.coarse_vocab_size) != (fine_vocab_size, coarse_vocab_size):
        raise ExportError(
            f"{where}: the model was trained with vocabularies of {model_config.fine_vocab_size} fine / "
            f"{model_config.coarse_vocab_size} coarse entries, the tokenizer files have {fine_vocab_size} / "
            f"{coarse_vocab_size}: the ids would mean other tokens. Use the pre-training dataset's tokenizer "
            f"files (the export copies them next to the weights)"
        )


def build_backbone(model_config, state_dict: dict[str, torch.Tensor] | None = None):
    """AmbertForPreTraining at TP=1 in this process, with ``state_dict`` loaded strictly."""
    ensure_single_process()
    from pipeline.model import build_model

    model = build_model(model_config)
    if state_dict is not None:
        # The MLM head's weight is tied to the word embedding: same tensor under two names.
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        tied = {f"heads.{g}.weight" for g in model_config.granularities}
        missing = [k for k in missing if k not in tied and not k.endswith("._extra_state")]
        if missing or unexpected:
            raise ExportError(f"weights do not match the model config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def save_exported(model: torch.nn.Module, tokenizer_dir: str | os.PathLike, output: str | os.PathLike,
                  extra: dict | None = None) -> Path:
    """Write ``model`` (an AmbertForPreTraining at TP=1) + its config + tokenizer files to ``output``."""
    from safetensors.torch import save_file

    from data_prep.encode import copy_tokenizer_files

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    # Tied tensors share storage; safetensors refuses shared storage, so each gets its own copy.
    state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()
             if isinstance(v, torch.Tensor)}  # megatron layers add an empty `_extra_state` entry
    save_file(state, str(output / WEIGHTS_FILE))
    from pipeline.convert import shareable

    shareable(output / WEIGHTS_FILE)  # safetensors writes 0600
    # The same layout as `python -m pipeline.convert export`: config.json is the ModelConfig itself.
    (output / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=1), encoding="utf-8")
    if extra:
        (output / "training.json").write_text(json.dumps(extra, indent=1), encoding="utf-8")
    copy_tokenizer_files(tokenizer_dir, output)
    return output


@dataclass
class EncodedBatch:
    """Vectors of a batch of texts (padding removed per text)."""

    fine_vectors: list[torch.Tensor]
    """Per text: [fine tokens incl. [CLS]/[SEP], H] (empty list for bert-coarse)."""
    coarse_vectors: list[torch.Tensor]
    """Per text: [coarse tokens incl. [CLS]/[SEP], H] (empty list for bert-fine)."""
    fine_ids: list[torch.Tensor]
    coarse_ids: list[torch.Tensor]

    @property
    def fine_cls(self) -> torch.Tensor:
        return torch.stack([v[0] for v in self.fine_vectors])

    @property
    def coarse_cls(self) -> torch.Tensor:
        return torch.stack([v[0] for v in self.coarse_vectors])


class AmbertEncoder:
    """An exported model + its tokenizers: ``encode(texts)`` -> fine and coarse contextual vectors."""

    def __init__(self, model, text_encoder, max_length: int | None = None):
        self.model = model.eval()
        self.text_encoder = text_encoder
        self.max_length = min(max_length or model.config.max_position_embeddings, model.config.max_position_embeddings)

    @classmethod
    def load(cls, directory: str | os.PathLike, max_length: int | None = None, dataset: str = "",
             flag: str = "directory", device: str | torch.device | None = None) -> AmbertEncoder:
        """``directory``: an exported model, or a training checkpoint (step_XXXXXXXX, TP=1). ``flag``
        names it in error messages. ``device``: where the model runs ("cuda", "cuda:1"; default the CPU);
        ``encode`` returns its vectors there."""
        from data_prep.encode import TextEncoder
        from pipeline.finetuning import resolve_pretrained

        pretrained = resolve_pretrained(str(directory), dataset, flag=flag, same_dataset=True)
        text_encoder = TextEncoder(pretrained.tokenizer_dir)
        check_vocabularies(pretrained.model_config, len(text_encoder.fine_vocab), len(text_encoder.coarse_vocab),
                           str(directory))
        model = build_backbone(pretrained.model_config, pretrained.state_dict)
        if device is not None:
            model.to(device)
        return cls(model, text_encoder, max_length)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], text_pairs: Sequence[str] | None = None) -> EncodedBatch:
        from pipeline.finetuning import collate, encode_example, model_device, to_device

        if isinstance(texts, str) or (text_pairs is not None and isinstance(text_pairs, str)):
            raise TypeError("encode() takes a list of texts (and of text_pairs): wrap a single text in a list")
        if not texts:
            raise ValueError("encode() got no texts: give a list of at least one text")
        if text_pairs is not None and len(text_pairs) != len(texts):
            raise ValueError(f"encode() got {len(texts)} texts but {len(text_pairs)} text_pairs: give one pair per "
                             f"text (the i-th pair goes with the i-th text)")
        examples = [
            encode_example(self.text_encoder, t, text_pairs[i] if text_pairs else None, self.max_length,
                           self.max_length, where=f"texts[{i}]")
            for i, t in enumerate(texts)
        ]
        cut = [(i, int(e["cut_fine"])) for i, e in enumerate(examples) if e["cut_fine"] > 0]
        if cut:  # the model sees only its max_position_embeddings tokens: say so rather than cut silently
            log.warning("%d of %d text(s) are longer than the %d tokens this encoder takes and were cut (texts[%d] "
                        "lost %d fine tokens%s)", len(cut), len(texts), self.max_length, cut[0][0], cut[0][1],
                        ", ..." if len(cut) > 1 else "")
        batch = to_device(collate(examples), model_device(self.model))  # where the model is (a GPU if moved there)
        hidden = self.model.encode(batch)
        out = EncodedBatch([], [], [], [])
        for g in self.model.config.granularities:
            lengths = batch[f"{g}_attention_mask"].sum(1).tolist()
            getattr(out, f"{g}_vectors").extend(hidden[f"{g}_hidden"][i, :n] for i, n in enumerate(lengths))
            getattr(out, f"{g}_ids").extend(batch[f"{g}_ids"][i, :n] for i, n in enumerate(lengths))
        return out


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.inference MODEL TEXT...``: both tokenizations of each text and its [CLS] vectors."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        description="Encode texts with an exported model (or a TP=1 training checkpoint): print each text's fine and "
                    "coarse tokens and the norms of its [CLS] vectors (--json: the vectors). In Python: AmbertEncoder.")
    parser.add_argument("model", help="exported model dir (python -m pipeline.convert export) or a checkpoint step_* dir")
    parser.add_argument("texts", nargs="+", help="texts to encode")
    parser.add_argument("--dataset", default="", help="tokenizers (a dataset dir) if the model does not carry them")
    parser.add_argument("--json", action="store_true", help="one JSON object per text, with the [CLS] vectors")
    args = parser.parse_args(argv)
    try:
        encoder = AmbertEncoder.load(args.model, dataset=args.dataset, flag="MODEL")
        out = encoder.encode(args.texts)
    except (ValueError, OSError) as exc:  # FinetuneError / ExportError / FormatError / EncodeError are ValueErrors
        print(f"error: {exc}", file=sys.stderr)
        return 2
    vocabs = {"fine": encoder.text_encoder.fine_vocab, "coarse": encoder.text_encoder.coarse_vocab}
    for i, text in enumerate(args.texts):
        record: dict = {"text": text}
        for g in encoder.model.config.granularities:
            record[f"{g}_tokens"] = [vocabs[g].token(int(t)) for t in getattr(out, f"{g}_ids")[i]]
            cls_vector = getattr(out, f"{g}_vectors")[i][0]
            record[f"{g}_cls" if args.json else f"{g}_cls_norm"] = (
                cls_vector.tolist() if args.json else round(float(cls_vector.norm()), 4))
        if args.json:
            print(json.dumps(record, ensure_ascii=False))
        else:
            print(text)
            for key, value in record.items():
                if key != "text":
                    print(f"  {key}: {' '.join(value) if isinstance(value, list) else value}")
    return 0



__all__ = ["AmbertEncoder", "tokenizer_dir_of", "EncodedBatch", "ExportError", "build_backbone", "check_vocabularies",
           "ensure_single_process", "load_state_dict", "read_model_config", "save_exported"]


if __name__ == "__main__":
    raise SystemExit(main())
