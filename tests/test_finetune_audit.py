"""Fine-tuning / export audit: metrics, option checks and tokenizer parity found wrong by a user's eye."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.test_finetune import make_sentiment_files, make_tiny_zh_dataset


@pytest.fixture(scope="module")
def zh_dataset(tmp_path_factory) -> Path:
    return make_tiny_zh_dataset(tmp_path_factory.mktemp("zh") / "dataset")


def test_macro_f1_counts_a_class_that_is_predicted_but_absent_from_the_gold_labels():
    from pipeline.finetuning import classification_report

    gold = np.array([0, 0, 0, 0, 1, 1])
    predicted = np.array([0, 0, 2, 2, 1, 1])  # class 2 never occurs in gold: two false positives
    report = classification_report(predicted, gold, ["a", "b", "c"])
    f1_a = 2 * 1.0 * 0.5 / (1.0 + 0.5)
    # scikit-learn's f1_score(gold, predicted, average="macro") = (2/3 + 1 + 0) / 3
    assert report["macro_f1"] == pytest.approx((f1_a + 1.0 + 0.0) / 3)
    assert report["accuracy"] == pytest.approx(4 / 6)
    # a class neither in gold nor predicted still does not count
    assert classification_report(np.array([0, 1]), np.array([0, 1]), ["a", "b", "c"])["macro_f1"] == 1.0


@pytest.mark.parametrize("value", [1, 3, -5])
def test_a_coarse_length_too_short_for_any_token_is_refused(tmp_path, value):
    from pipeline.finetuning import FinetuneConfig, FinetuneError

    files = make_sentiment_files(tmp_path, sizes=(4, 4, 4))
    config = FinetuneConfig(model="random:tiny", train=str(files["train"]), dev=str(files["dev"]),
                            output=str(tmp_path / "out"), max_coarse_length=value)
    with pytest.raises(FinetuneError, match=r"--max-coarse-length: must leave room .*\(>= 4\), or be 0"):
        config.validate()
    FinetuneConfig(**{**config.__dict__, "max_coarse_length": 4}).validate()
    FinetuneConfig(**{**config.__dict__, "max_coarse_length": 0}).validate()


@pytest.mark.parametrize("paired", ["train", "dev"])
def test_text_pairs_in_one_split_only_are_refused(tmp_path, zh_dataset, paired):
    from pipeline.finetuning import FinetuneConfig, FinetuneError, run

    files = make_sentiment_files(tmp_path, sizes=(12, 6, 6))
    rows = [json.loads(line) for line in files[paired].read_text(encoding="utf-8").splitlines()]
    files[paired].write_text("".join(json.dumps({**r, "text_pair": "今天很好。"}, ensure_ascii=False) + "\n" for r in rows),
                             encoding="utf-8")
    config = FinetuneConfig(model="random:tiny", dataset=str(zh_dataset), train=str(files["train"]),
                            dev=str(files["dev"]), test=str(files["test"]), output=str(tmp_path / "out"), seeds=[1],
                            epochs=1.0, batch_size=4, max_length=32, tensorboard=False)
    with pytest.raises(FinetuneError, match=r"has text pairs \(column 'text_pair'\) but .* has none"):
        run(config)
    assert not (tmp_path / "out" / "results.json").exists()
