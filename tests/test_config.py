"""Config: YAML + overrides, type checks, and every validation rule naming its field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import config as C

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_recipe_and_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  recipe: tiny\n  hidden_dropout: 0.0\nschedule:\n  train_steps: 7\noptimizer:\n  lr: 1e-4\n")
    cfg = C.load_config(recipe, ["schedule.warmup_steps=2", "model.num_layers=3", "optimizer.betas=[0.9, 0.95]"])
    assert cfg.schedule.train_steps == 7 and cfg.schedule.warmup_steps == 2
    assert cfg.optimizer.lr == 1e-4 and cfg.optimizer.betas == [0.9, 0.95]
    assert cfg.model.overrides == {"hidden_dropout": 0.0, "num_layers": 3}
    # the saved YAML loads back to the same config
    saved = tmp_path / "config.yaml"
    saved.write_text(cfg.to_yaml())
    assert C.load_saved_config(saved) == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("schedule.train_step=5", "unknown field.*train_step.*schedule"),
        ("schedule.train_steps=abc", "schedule.train_steps: expected an integer"),
        ("logging.tensorboard=3", "logging.tensorboard: expected true or false"),
        ("nonsense", "not key=value"),
    ],
)
def test_bad_overrides_name_the_field(override, message):
    with pytest.raises(C.ConfigError, match=message):
        C.load_config(None, [override])


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (["parallelism.tensor_parallel=3"], 4, "parallelism.tensor_parallel=3 does not divide the world size 4"),
        (["parallelism.global_batch_size=10", "parallelism.micro_batch_size=4"], 2, "parallelism.global_batch_size=10 != micro_batch_size 4"),
        (["data.mask_rate=1.5"], 2, r"data\.mask_rate=1\.5: must be in \(0, 1\)"),
        (["schedule.warmup_steps=500"], 2, r"schedule\.warmup_steps=500: must be in \[0, schedule\.train_steps\]"),
        (["schedule.style=cosine"], 2, r"schedule\.style='cosine': expected linear or wsd"),
        (["parallelism.precision=fp8"], 2, r"parallelism\.precision='fp8': expected fp32, bf16 or fp16"),
        (["parallelism.deepspeed_config=ds_configs/nope.json"], 2, "parallelism.deepspeed_config=ds_configs/nope.json: no such file"),
        (["checkpointing.resume=/no/such/ckpt"], 2, r"checkpointing\.resume=/no/such/ckpt: no such checkpoint directory \(use 'auto'"),
        # evaluation: -1 ran with the valid split never opened, then failed at step 1 with a traceback;
        # 0 batches logged a NaN valid loss
        (["data.valid_every=-1"], 2, "data.valid_every=-1: must be >= 0"),
        (["data.valid_batches=0"], 2, "data.valid_batches=0: must be >= 1"),
        (["optimizer.weight_decay=-0.01"], 2, "optimizer.weight_decay=-0.01: must be a finite number >= 0"),
        (["optimizer.eps=-1e-6"], 2, "optimizer.eps=-1e-06: must be a finite number >= 0"),
        # infinite values were taken; a negative probability was "= 0.30000000000000004: must be in [0, 1]"
        (["optimizer.eps=.inf"], 2, "optimizer.eps=inf: must be a finite number >= 0"),
        (["optimizer.grad_clip=.inf"], 2, "optimizer.grad_clip=inf: must be a finite number >= 0"),
        (["data.random_token_prob=-0.5"], 2, r"data\.random_token_prob=-0\.5: must be in \[0, 1\]"),
        (["data.mask_token_prob=0.9", "data.random_token_prob=0.2"], 2,
         r"data\.mask_token_prob \+ data\.random_token_prob = 1\.1: must be at most 1"),
        (["logging.peak_flops=-1"], 2, "logging.peak_flops=-1.0: must be >= 0"),
    ],
)
def test_validation_names_the_field(overrides, world, message):
    cfg = C.load_config(None, overrides)
    with pytest.raises(C.ConfigError, match=message):
        C.validate(cfg, world_size=world)


def test_model_dependent_checks():
    meta = {"fine_vocab_size": 400, "coarse_vocab_size": 900}
    cfg = C.load_config(None, ["model.recipe=tiny"])
    model = C.build_model_config(cfg, meta)
    assert (model.fine_vocab_size, model.coarse_vocab_size) == (400, 900)  # taken from the dataset
    C.validate(cfg, 2, meta, model)
    with pytest.raises(C.ConfigError, match="model.fine_vocab_size=300 is smaller than the dataset's fine_vocab_size=400"):
        C.build_model_config(C.load_config(None, ["model.fine_vocab_size=300"]), meta)
    cfg = C.load_config(None, ["parallelism.tensor_parallel=8"])  # tiny has 4 heads
    with pytest.raises(C.ConfigError, match="parallelism.tensor_parallel=8 does not divide model.num_attention_heads=4"):
        C.validate(cfg, 8, meta, C.build_model_config(cfg, meta))
    cfg = C.load_config(None, ["data.seq_length=100"])  # tiny: 64 positions
    with pytest.raises(C.ConfigError, match="data.seq_length=100 exceeds the model's limit model.max_position_embeddings=64"):
        C.validate(cfg, 2, meta, C.build_model_config(cfg, meta))
    cfg = C.load_config(None, ["model.sentence_order_head=true"])  # no labels in the data: never trained
    with pytest.raises(C.ConfigError, match="model.sentence_order_head=true: pre-training samples carry no NSP"):
        C.validate(cfg, 2, meta, C.build_model_config(cfg, meta))
    with pytest.raises(C.ConfigError, match="model.hidden_sise: not a ModelConfig field"):
        C.build_model_config(C.load_config(None, ["model.hidden_sise=3"]), meta)
    with pytest.raises(C.ConfigError, match="model.recipe='giant'"):
        C.build_model_config(C.load_config(None, ["model.recipe=giant"]), meta)


def test_deepspeed_config_merge_and_conflict(tmp_path):
    cfg = C.load_config(None, ["parallelism.micro_batch_size=4", "parallelism.gradient_accumulation_steps=2", "parallelism.precision=bf16"])
    ds = C.deepspeed_config(cfg, world_size=4)
    assert ds["train_batch_size"] == 32 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"] and ds["zero_optimization"]["stage"] == 3
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 1}}))
    with pytest.raises(C.ConfigError, match="train_micro_batch_size_per_gpu=16 but the run config gives 4"):
        C.deepspeed_config(cfg, world_size=4, override_path=str(bad))
    # precision: a JSON enabling bf16 in an fp32 run trained in fp32 without a word
    bad.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}}))
    fp32 = C.load_config(None, ["parallelism.precision=fp32"])
    with pytest.raises(C.ConfigError, match=r"enables bf16 but the run config has parallelism.precision=fp32; set "
                                            r"parallelism.precision=bf16"):
        C.deepspeed_config(fp32, world_size=4, override_path=str(bad))
    assert C.deepspeed_config(cfg, world_size=4, override_path=str(bad))["bf16"]["enabled"]  # the same: taken
    bad.write_text(json.dumps({"fp16": {"enabled": "auto", "loss_scale": 0}, "bf16": {"enabled": False}}))
    assert not C.deepspeed_config(fp32, world_size=4, override_path=str(bad))["fp16"]["enabled"]


def test_optimizer_offload_needs_deepspeed_adamw():
    """ds_configs/zero3_offload.json with the default optimizer.name=adamw: DeepSpeed raised its
    ZeRORuntimeException only inside deepspeed.initialize, after every rank had built the model."""
    offload = str(ROOT / "ds_configs" / "zero3_offload.json")
    cfg = C.load_config(None, [f"parallelism.deepspeed_config={offload}"])
    with pytest.raises(C.ConfigError, match=r"offloads the optimizer .*device=cpu.* optimizer.name=deepspeed_adamw "
                                            r"\(not adamw\).*zero_force_ds_cpu_optimizer"):
        C.deepspeed_config(cfg, world_size=2)
    cfg = C.load_config(None, [f"parallelism.deepspeed_config={offload}", "optimizer.name=deepspeed_adamw"])
    ds = C.deepspeed_config(cfg, world_size=2)
    assert ds["optimizer"]["type"] == "AdamW" and ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_shipped_recipes_and_ds_configs_load():
    recipes = sorted((ROOT / "pipeline" / "recipes").glob("*.yaml"))
    assert recipes, "no recipes shipped"
    for recipe in recipes:
        cfg = C.load_config(recipe)
        C.build_model_config(cfg, {"fine_vocab_size": 21128, "coarse_vocab_size": 72635})
    for path in sorted((ROOT / "ds_configs").glob("*.json")):
        ds = json.loads(path.read_text())
        assert "zero_optimization" in ds, path


def test_model_overrides_get_the_model_fields_types():
    meta = {"fine_vocab_size": 400, "coarse_vocab_size": 900}
    for override, message in (("model.pre_norm=maybe", "model.pre_norm: expected true or false, got 'maybe'"),
                              ("model.num_layers=true", "model.num_layers: expected an integer, got True"),
                              ("model.hidden_size=abc", "model.hidden_size: expected an integer, got 'abc'"),
                              ("model.num_query_groups=abc", "model.num_query_groups: expected an integer or null, got 'abc'"),
                              ("model.hidden_dropout=abc", "model.hidden_dropout: expected a number, got 'abc'")):
        with pytest.raises(C.ConfigError, match=message):
            C.build_model_config(C.load_config(None, [override]), meta)
    model = C.build_model_config(C.load_config(None, ["model.num_query_groups=null", "model.hidden_dropout=0",
                                                      "model.pre_norm=true"]), meta)
    assert model.num_query_groups is None and model.hidden_dropout == 0.0 and type(model.hidden_dropout) is float
    assert model.pre_norm is True


def test_broken_files_and_values_are_config_errors(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("schedule:\n  train_steps: [1\n", encoding="utf-8")
    with pytest.raises(C.ConfigError, match=rf"--config {recipe}: not valid YAML \(.*line 2.*\); fix the file"):
        C.load_config(recipe)
    with pytest.raises(C.ConfigError, match=r"override 'schedule.train_steps=\[': the value '\[' is not valid YAML"):
        C.load_config(None, ["schedule.train_steps=["])
    for content, message in (("{not json", "not valid JSON"), ("[1, 2]", "holds a JSON list, not a DeepSpeed config"),
                             (json.dumps({"zero_optimization": {"stage": 7}}), r"zero_optimization.stage=7; expected 0, 1, 2 or 3")):
        path = tmp_path / "ds.json"
        path.write_text(content, encoding="utf-8")
        with pytest.raises(C.ConfigError, match=rf"parallelism.deepspeed_config={path}: {message}"):
            C.deepspeed_config(C.load_config(None, [f"parallelism.deepspeed_config={path}"]), world_size=2)
    afile = tmp_path / "afile"
    afile.write_text("x", encoding="utf-8")
    for overrides, message in ((["seed=-1"], r"seed=-1: must be >= 0"),
                               (["optimizer.lr=.inf"], r"optimizer.lr=inf: must be a finite number > 0"),
                               (["output_dir="], "output_dir is empty"),
                               ([f"output_dir={afile}"], rf"output_dir={afile} is an existing file"),
                               ([f"checkpointing.dir={afile}"], rf"checkpointing.dir={afile} is an existing file"),
                               # the advice is a value that works (it said gradient_accumulation_steps=1 before)
                               (["parallelism.global_batch_size=10", "parallelism.micro_batch_size=4"],
                                r"set parallelism.micro_batch_size=1 and parallelism.gradient_accumulation_steps=5"),
                               (["parallelism.global_batch_size=11", "parallelism.micro_batch_size=4"],
                                r"must be a positive multiple of the data-parallel size 2 \(e.g. 10 or 12\)"),
                               (["parallelism.global_batch_size=24", "parallelism.micro_batch_size=4"],
                                "set parallelism.gradient_accumulation_steps=3"),
                               # the bert-base recipe's 256 on more ranks than 256 / micro_batch_size 32
                               (["parallelism.global_batch_size=12", "parallelism.micro_batch_size=8"],
                                r"set parallelism.micro_batch_size=6 and parallelism.gradient_accumulation_steps=1 "
                                r"\(6 samples per data-parallel rank\)"),
                               (["parallelism.global_batch_size=14", "parallelism.micro_batch_size=4"],
                                r"set parallelism.micro_batch_size=1 and parallelism.gradient_accumulation_steps=7")):
        with pytest.raises(C.ConfigError, match=message):
            C.validate(C.load_config(None, overrides), world_size=2)
    assert afile.read_text(encoding="utf-8") == "x"


def test_mistakes_deepspeed_would_find_late_or_never(tmp_path):
    """Caught while validating, before the data and the model are set up: a checkpoint directory
    that cannot be made (it failed at the first save, after training), fp16 on CPU (inside
    deepspeed.initialize), a misspelled key inside zero_optimization (a pydantic traceback from
    zero.Init), a misspelled top-level key (silently ignored: the run trained without ZeRO), a
    negative FFN size (a traceback when the model was built)."""
    afile = tmp_path / "afile"
    afile.write_text("x", encoding="utf-8")
    for overrides, message in (
        ([f"checkpointing.dir={afile}/ck"], rf"checkpointing.dir={afile}/ck: {afile} is a file, so the directory cannot be made"),
        ([f"output_dir={afile}/run/deeper"], rf"output_dir={afile}/run/deeper: {afile} is a file"),
        (["parallelism.precision=fp16"], "parallelism.precision=fp16: DeepSpeed has no fp16 on CPU; use fp32"),
    ):
        with pytest.raises(C.ConfigError, match=message):
            C.validate(C.load_config(None, overrides), world_size=2)
    assert afile.read_text(encoding="utf-8") == "x"
    for content, message in (
        ({"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_sise": 5}},
         r"zero_optimization.stage3_prefetch_bucket_sise: Extra inputs are not permitted; did you mean "
         r"'stage3_prefetch_bucket_size'\?"),
        ({"zero_optimisation": {"stage": 3}},
         r"unknown key 'zero_optimisation' \(DeepSpeed would ignore it silently\); did you mean 'zero_optimization'\?"),
        ({"zero_optimization": {"stage": 2}, "gradient_clipping_": 1.0}, r"unknown key 'gradient_clipping_' .*; did you mean 'gradient_clipping'\?"),
    ):
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(content), encoding="utf-8")
        with pytest.raises(C.ConfigError, match=rf"parallelism.deepspeed_config={path}: {message}"):
            C.deepspeed_config(C.load_config(None, [f"parallelism.deepspeed_config={path}"]), world_size=2)
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "overlap_comm": True}, "my_note": "x"}), encoding="utf-8")
    C.deepspeed_config(C.load_config(None, [f"parallelism.deepspeed_config={path}"]), world_size=2)  # no near miss: kept
    with pytest.raises(C.ConfigError, match=r"model: ModelConfig.ffn_hidden_size: must be >= 1, got -1"):
        cfg = C.load_config(None, ["model.ffn_hidden_size=-1"])
        meta = {"fine_vocab_size": 64, "coarse_vocab_size": 96, "language": "zh"}
        C.validate(cfg, 2, meta, C.build_model_config(cfg, meta))


def test_a_run_is_not_written_into_a_dataset_an_export_or_a_checkpoint(tmp_path):
    """output_dir inside a data_prep dataset or an export was accepted: the dataset could no longer be
    rebuilt (it held files data_prep did not write), and exporting into the run's own folder deleted the
    whole run. Paths that point at a file of a dataset, or init_from a file, were called missing."""
    from pipeline.pretrain import check_dataset_dir

    dataset = tmp_path / "zh"
    dataset.mkdir()
    (dataset / "meta.json").write_text(json.dumps({"format_version": 3, "language": "zh"}), encoding="utf-8")
    export = tmp_path / "export"
    export.mkdir()
    for name in ("config.json", "model.safetensors"):
        (export / name).write_text("{}", encoding="utf-8")
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000002"
    checkpoint.mkdir(parents=True)
    (checkpoint / "COMPLETE").write_text("{}", encoding="utf-8")
    for where, what in ((dataset, f"pre-training dataset {dataset}"), (dataset / "run", f"pre-training dataset {dataset}"),
                        (export, f"model directory {export}"), (checkpoint / "x", f"training checkpoint {checkpoint}")):
        with pytest.raises(C.ConfigError, match=rf"output_dir={where} is \(inside\) {what} .*a training run does not "
                                                rf"belong there; give another directory"):
            C.validate_paths(C.load_config(None, [f"output_dir={where}"]))
    C.validate_paths(C.load_config(None, [f"output_dir={tmp_path / 'run'}"]))  # the run's own folder: fine
    with pytest.raises(C.ConfigError, match=rf"data.path={dataset / 'meta.json'} is a file of the dataset {dataset}: "
                                            rf"point data.path at that directory"):
        check_dataset_dir(C.load_config(None, [f"data.path={dataset / 'meta.json'}"]))
    with pytest.raises(C.ConfigError, match=r"checkpointing.init_from=.*config.json: a file, not a directory"):
        C.validate_paths(C.load_config(None, [f"checkpointing.init_from={export / 'config.json'}"]))
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(
        ["zh", "meta.json", "export", "config.json", "model.safetensors", "run", "checkpoints", "step_00000002", "COMPLETE"])


def test_a_deepspeed_json_given_as_the_recipe_says_which_flag_takes_it():
    """It listed the JSON's keys as unknown recipe fields."""
    with pytest.raises(C.ConfigError, match=r"--config ds_configs/zero1_cpu.json is a DeepSpeed JSON config, not a recipe: "
                                            r"give it as --deepspeed_config ds_configs/zero1_cpu.json"):
        C.load_config("ds_configs/zero1_cpu.json")


@pytest.mark.parametrize("recipe", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "pipeline" / "recipes").glob("*.yaml")))
def test_print_config_is_documented_yaml_that_reads_back_as_the_same_config(recipe, tmp_path, capsys):
    """`pretrain.py --print-config`: every field under its docstring; the output, given back as --config,
    is the same config (the recipe's model fields, routed into model.overrides, included)."""
    import dataclasses
    import typing

    from pipeline import pretrain
    from pipeline.config import PretrainConfig, field_docs

    overrides = ["schedule.train_steps=100000", "data.blend=[{path: /data/wiki, weight: 0.25}]", "model.hidden_dropout=0.0"]
    assert pretrain.main(["--print-config", "--config", recipe, *overrides]) == 0
    text = capsys.readouterr().out
    saved = tmp_path / "printed.yaml"
    saved.write_text(text, encoding="utf-8")
    assert C.load_config(saved).to_dict() == C.load_config(recipe, overrides).to_dict()
    assert pretrain.main(["--print-config", "--config", str(saved)]) == 0
    assert capsys.readouterr().out == text

    docs = field_docs()
    hints = typing.get_type_hints(PretrainConfig)
    sections = [hints[f.name] for f in dataclasses.fields(PretrainConfig) if dataclasses.is_dataclass(hints[f.name])]
    assert len(sections) == 7
    for section in [PretrainConfig, *sections]:
        types = typing.get_type_hints(section)
        missing = [f.name for f in dataclasses.fields(section)
                   if not dataclasses.is_dataclass(types[f.name]) and f.name not in docs[section.__name__]]
        assert not missing, f"{section.__name__} fields without a docstring: {missing}"
    comments = [line for line in text.splitlines() if line.lstrip().startswith("# ")]
    prose = " ".join(c.strip().removeprefix("# ") for c in comments)
    assert "  # peak learning rate" in comments and "the model they give" in prose and "hidden_dropout=0.0" in prose


def test_print_config_refuses_a_wrong_config_like_training_would():
    from pipeline import pretrain

    with pytest.raises(C.ConfigError, match=r"schedule.warmup_steps=10000: must be in \[0, schedule.train_steps\]"):
        pretrain.main(["--print-config", "--config", "pipeline/recipes/bert-base.yaml", "schedule.train_steps=7"])
    with pytest.raises(C.ConfigError, match=r"logging.profile_ranks='first': expected global ranks"):
        pretrain.main(["--print-config", "logging.profile_ranks=first"])
    assert pretrain.main(["--print-config", "logging.profile_ranks=0,64"]) == 0  # ranks of a job of any size


def test_yaml_base_60_numbers_stay_strings(tmp_path):
    """YAML 1.1 reads 10:12 as 612 (base 60): logging.profile_steps=10:12 traced step 612. The config's
    loader keeps it the string it looks like, so the error names what the user wrote; other numbers
    (1_000, 0x10, 1.5e-4, .5) are read as before."""
    from pipeline.config import ConfigError, load_config

    assert load_config(None, ["logging.profile_steps=10:12"]).logging.profile_steps == "10:12"
    with pytest.raises(ConfigError, match=r"profile_steps='10:12': expected a step or a range"):
        C.parse_profile_steps(load_config(None, ["logging.profile_steps=10:12"]).logging.profile_steps)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("logging:\n  profile_steps: 1:30\n", encoding="utf-8")
    assert load_config(cfg).logging.profile_steps == "1:30"
    config = load_config(None, ["schedule.train_steps=1_000", "schedule.warmup_steps=0x10", "optimizer.lr=1.5e-4",
                                "optimizer.weight_decay=.5", "logging.profile_steps=10-12"])
    assert (config.schedule.train_steps, config.schedule.warmup_steps) == (1000, 16)
    assert (config.optimizer.lr, config.optimizer.weight_decay, config.logging.profile_steps) == (1.5e-4, 0.5, "10-12")
