"""data.blend: several datasets with data.path's vocabularies, mixed by weight (BlendedSamples)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from pipeline import data as D
from pipeline.config import ConfigError, load_config, validate
from tests.test_data_loader import write_synthetic_dataset
from tests.test_pretrain import BASE, assert_ok, launch


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("blend")
    return (write_synthetic_dataset(root / "a", num_docs=40, seed=1),
            write_synthetic_dataset(root / "b", num_docs=90, seed=2),
            write_synthetic_dataset(root / "other_vocab", num_docs=20, fine_vocab=80, seed=3))


def _same(x: D.MaskedSample, y: D.MaskedSample) -> bool:
    return all(np.array_equal(getattr(x, f), getattr(y, f)) for f in ("fine_ids", "fine_labels", "coarse_ids", "coarse_labels"))


def test_blend_gives_each_dataset_its_share_and_its_own_sample_order(datasets):
    a, b, _ = datasets
    masking = D.MaskingConfig()
    blended = D.PretrainingData.open(str(a), 32, masking, seed=5, blend=[(str(b), 1.0)], weight=3.0)
    alone_a = D.PretrainingData.open(str(a), 32, masking, seed=5)
    alone_b = D.PretrainingData.open(str(b), 32, masking, seed=5 + D.BLEND_SEED_STRIDE)
    train = blended.train
    assert isinstance(train, D.BlendedSamples) and len(train) == len(alone_a.train) + len(alone_b.train)
    assert list(train.counts) == [7500, 2500] and train.seed == 5

    # Every global position maps to a dataset's own next position: each dataset's positions, in global
    # order, are 0, 1, 2, ... (it is read as a run on it alone would read it, through several epochs).
    positions = [train.part_of_position(g) for g in range(3 * D.BlendedSamples.BLOCK + 123)]
    for part in (0, 1):
        own = [o for p, o in positions if p == part]
        assert own == list(range(len(own)))
    shares = np.bincount([p for p, _ in positions]) / len(positions)
    assert shares == pytest.approx([0.75, 0.25], abs=1e-3)
    # Spread through the block: any 8 consecutive positions hold 5-7 of dataset a's.
    window = np.convolve(np.array([p == 0 for p, _ in positions], dtype=int), np.ones(8, dtype=int), "valid")
    assert 5 <= window.min() and window.max() <= 7

    # The samples (ids, masks) are the lone datasets' at those positions; their epochs roll over.
    for g in (0, 1, 2, 3, 50, 4 * len(alone_b.train) + 7, D.BlendedSamples.BLOCK + 11):
        part, own = train.part_of_position(g)
        assert _same(train[g], (alone_a.train, alone_b.train)[part][own]), g
    # data.path's valid split only; one coarse length for every dataset (the longest packing's)
    assert blended.valid is not None and len(blended.valid) == len(alone_a.valid)
    assert all(p.coarse_length == blended.coarse_length for p in train.parts)


@pytest.mark.parametrize("override, message", [
    ("data.blend=[{path: x}]", "data.blend[0]={'path': 'x'}: expected {path: DIR, weight: W}"),
    ("data.blend=[{path: x, weight: 0}]", "data.blend[0].weight=0: must be a number > 0"),
    ("data.blend=[{path: x, weight: many}]", "data.blend[0].weight='many': must be a number > 0"),
    ("data.blend=[{path: x, weight: 1e-5}]", "data.blend[0].weight=1e-05: below 1/10000 of the weights' total"),
    ("data.blend=[{path: x, weight: 1}, {path: ./x/, weight: 2}]", "data.blend[1].path=./x/: "),
    ("data.blend=[{path: data/demo-zh, weight: 1}]", "is already in the blend (data.path or an earlier entry)"),
])
def test_bad_blend_entries_name_the_entry_and_the_fix(override, message):
    with pytest.raises(ConfigError) as info:
        validate(load_config(None, [override]), 2, paths=False)
    assert message in str(info.value)


def test_a_dataset_with_other_vocabularies_or_no_dataset_is_refused(datasets, tmp_path):
    from data_prep.format import PairedDataset
    from pipeline import pretrain

    a, b, other = datasets
    config = load_config(None, [f"data.path={a}", f"data.blend=[{{path: {b}, weight: 1}}, {{path: {other}, weight: 1}}]"])
    with pytest.raises(ConfigError) as info:
        pretrain.check_blend(config, PairedDataset(a))
    text = str(info.value)
    assert f"data.blend[1].path={other}: its fine vocabulary differs from data.path={a}'s" in text
    assert f"--output NEW_DIR --vocab-from {a}`, and point data.blend[1].path at NEW_DIR" in text
    # a dataset of the other language: named as such (rebuilding English text as --lang zh was the advice)
    import json
    import shutil

    english = tmp_path / "english"
    shutil.copytree(other, english)
    meta = json.loads((english / "meta.json").read_text(encoding="utf-8"))
    (english / "meta.json").write_text(json.dumps({**meta, "language": "en"}), encoding="utf-8")
    language = PairedDataset(a).meta.get("language")
    config = load_config(None, [f"data.path={a}", f"data.blend=[{{path: {english}, weight: 1}}]"])
    with pytest.raises(ConfigError, match=rf"data.blend\[0\].path=.*english is a --lang en dataset and data.path=.* a "
                                          rf"--lang {language} one: a blend mixes datasets of one language"):
        pretrain.check_blend(config, PairedDataset(a))
    config = load_config(None, [f"data.path={a}", f"data.blend=[{{path: {b}, weight: 1}}, {{path: {b}/../b, weight: 1}}]"])
    with pytest.raises(ConfigError, match=r"data.blend\[1\].path=.*/b/../b is the same dataset as data.blend\[0\].path"):
        pretrain.check_blend(config, PairedDataset(a))
    config = load_config(None, [f"data.path={a}", f"data.blend=[{{path: {tmp_path / 'none'}, weight: 1}}]"])
    with pytest.raises(ConfigError, match=r"data.blend\[0\].path=.*none: .* is not a dataset \(no meta.json\)"):
        pretrain.check_blend(config, PairedDataset(a))


def test_blended_run_trains_records_the_blend_and_a_changed_blend_is_warned_about_on_resume(datasets, tmp_path, caplog):
    from pipeline import pretrain
    from pipeline.checkpoint import complete_checkpoints, read_marker
    from pipeline.metrics import read_metrics

    a, b, _ = datasets
    out = tmp_path / "run"
    overrides = [*BASE, f"data.path={a}", f"output_dir={out}", "schedule.train_steps=3", "schedule.warmup_steps=1",
                 "data.num_workers=0", "data.weight=2"]
    code, output = launch([*overrides, f"data.blend=[{{path: {b}, weight: 1}}]"], launcher="torchrun")
    assert_ok(code, output)
    assert f"data: a blend, shares of the train samples: 0.6667 {a} (" in output and f"0.3333 {b} (" in output
    metrics = read_metrics(out)
    assert sorted(metrics) == [1, 2, 3] and all(np.isfinite(m["loss"]) for m in metrics.values())
    marker = read_marker(complete_checkpoints(out / "checkpoints")[-1][1])
    assert [(e["path"], e["weight"]) for e in marker["data_blend"]] == [(str(a), 2.0), (str(b), 1.0)]

    config = load_config(pretrain.DEFAULT_RECIPE, [*overrides, f"data.blend=[{{path: {b}, weight: 3}}]",
                                                   "checkpointing.resume=auto", "schedule.train_steps=6"])
    with caplog.at_level(logging.WARNING, logger="pretrain"):
        pretrain._startup_checks(config, rank=0, world_size=2)
    warned = [r.getMessage() for r in caplog.records if "other data settings" in r.getMessage()]
    assert len(warned) == 1 and f"data.blend [['{b}', 0.333333]] -> [['{b}', 0.6]]" in warned[0], warned
    assert "data.weight 0.666667 -> 0.4" in warned[0], warned
    caplog.clear()
    config.data.blend[0]["weight"], config.data.weight = 10, 20  # the same shares: nothing to warn about
    with caplog.at_level(logging.WARNING, logger="pretrain"):
        pretrain._startup_checks(config, rank=0, world_size=2)
    assert not [r for r in caplog.records if "other data settings" in r.getMessage()]
