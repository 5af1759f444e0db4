"""Single-process model tests (TP=1 on a 1-rank gloo group): heads, variants, options, bad configs,
parameter counts. Multi-rank parity lives in test_model_parallel.py, ZeRO-3 in test_model_zero3.py."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.batch import IGNORE_INDEX
from pipeline.model import VARIANTS, build_model, count_parameters, flops_per_sample, model_recipe
from pipeline.model.config import ModelConfig
from pipeline.model.synthetic import synthetic_batch
from tests.distributed import one_rank_group

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def single_rank_group():
    """A 1-rank gloo group so megatron-core layers have a TP group (TP=1)."""
    yield from one_rank_group()


def _config(recipe="tiny", **overrides) -> ModelConfig:
    if overrides.get("variant") == "ambert-hybrid":
        overrides.setdefault("local_window", 0)  # no sliding windows over [fine ; coarse] (ModelConfig.validate)
    overrides.setdefault("hidden_dropout", 0.0)
    overrides.setdefault("attention_dropout", 0.0)
    return model_recipe(recipe, **overrides)


def _batch(config: ModelConfig, seed=0, **kwargs):
    kwargs.setdefault("batch_size", 3)
    kwargs.setdefault("fine_len", 20)
    kwargs.setdefault("coarse_len", 13)
    return synthetic_batch(config.fine_vocab_size, config.coarse_vocab_size, seed=seed, **kwargs)


def _seeded_model(config: ModelConfig, seed=1234):
    torch.manual_seed(seed)
    return build_model(config)


# ----------------------------------------------------------------------------------------------
# Heads
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", ["tiny", "tiny-modern"])
def test_masked_only_head_equals_dense_computation(recipe):
    config = _config(recipe)
    model = _seeded_model(config)
    batch = _batch(config)
    out = model(batch)
    hidden = model.encode(batch)
    for g in ("fine", "coarse"):
        head = model.heads[g]
        flat = hidden[f"{g}_hidden"].reshape(-1, config.hidden_size)
        dense_logits = head.logits(flat)  # every position, then select: the expensive way
        labels = batch[f"{g}_labels"].reshape(-1)
        dense_loss = F.cross_entropy(dense_logits, labels, ignore_index=IGNORE_INDEX)
        assert float(out[f"{g}_loss"]) == pytest.approx(float(dense_loss), rel=1e-5)
        keep = labels != IGNORE_INDEX
        accuracy = (dense_logits[keep].argmax(-1) == labels[keep]).float().mean()
        assert float(out[f"{g}_accuracy"]) == pytest.approx(float(accuracy))
        assert float(out[f"{g}_masked"]) == keep.sum().item()
    assert float(out["loss"]) == pytest.approx(float(out["fine_loss"] + out["coarse_loss"]), rel=1e-6)


def test_padded_vocabulary_rows_are_never_predicted():
    config = _config(fine_vocab_size=130, coarse_vocab_size=250, vocab_multiple=128)
    model = _seeded_model(config)
    assert model.word_embeddings["fine"].weight.shape[0] == 256
    with torch.no_grad():  # make the padding rows maximally attractive: they must still lose
        model.heads["fine"].bias[130:] = 1e4
    logits = model.heads["fine"].logits(torch.randn(5, config.hidden_size))
    assert torch.isinf(logits[:, 130:]).all() and logits[:, :130].isfinite().all()
    assert (logits.argmax(-1) < 130).all()


def test_accuracy_counts_correct_predictions():
    """Labels set to the model's own predictions at a known share of the masked positions (the
    logits do not depend on the labels): the reported accuracy is that share, exactly."""
    config = _config()
    model = _seeded_model(config).eval()
    batch = _batch(config)
    with torch.no_grad():
        out = model(batch, return_logits=True)
    for g, vocab in (("fine", config.fine_vocab_size), ("coarse", config.coarse_vocab_size)):
        labels = batch[f"{g}_labels"].clone()
        masked = labels != IGNORE_INDEX
        predicted = out[f"{g}_logits"].argmax(-1)  # the masked positions', in order
        n, right = int(masked.sum()), int(masked.sum()) // 3
        assert n >= 6 and (predicted < vocab).all()
        wanted = torch.where(torch.arange(n) < right, predicted, (predicted + 1) % vocab)
        labels[masked] = wanted
        with torch.no_grad():
            again = model({**batch, f"{g}_labels": labels})
        assert float(again[f"{g}_accuracy"]) == pytest.approx(right / n, abs=1e-6), (g, right, n)


def test_sentence_order_head_adds_its_loss():
    config = _config(sentence_order_head=True)
    model = _seeded_model(config)
    batch = _batch(config, sentence_order=True)
    out = model(batch)
    assert "sentence_order_loss" in out
    total = out["fine_loss"] + out["coarse_loss"] + out["sentence_order_loss"]
    assert float(out["loss"]) == pytest.approx(float(total), rel=1e-6)
    assert "sentence_order_loss" not in _seeded_model(_config())(batch)  # off by default


# ----------------------------------------------------------------------------------------------
# Variants and encoder options
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", ["tiny", "tiny-modern"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_trains_and_counts_its_parameters(recipe, variant):
    config = _config(recipe, variant=variant)
    model = _seeded_model(config)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(config)
    batch = _batch(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(4):
        out = model(batch)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(out["loss"]))
    assert losses[-1] < losses[0]
    expected = {"fine": config.uses_fine, "coarse": config.uses_coarse}
    for g, used in expected.items():
        assert (f"{g}_loss" in out) == used and (f"{g}_accuracy" in out) == used
    hidden = model.encode(batch)
    for g in config.granularities:
        assert hidden[f"{g}_hidden"].shape == (*batch[f"{g}_ids"].shape, config.hidden_size)


def test_ambert_granularities_do_not_attend_to_each_other_but_hybrid_does():
    for variant, crosses in (("ambert", False), ("ambert-combo", False), ("ambert-hybrid", True)):
        config = _config(variant=variant)
        model = _seeded_model(config).eval()
        batch = _batch(config)
        changed = dict(batch)
        changed["coarse_ids"] = batch["coarse_ids"].flip(1)
        with torch.no_grad():
            fine_a = model.encode(batch)["fine_hidden"]
            fine_b = model.encode(changed)["fine_hidden"]
        real = batch["fine_attention_mask"].bool()
        differs = not torch.allclose(fine_a[real], fine_b[real], atol=1e-6)
        assert differs == crosses, variant


@pytest.mark.parametrize("recipe", ["tiny", "tiny-modern"])
def test_padding_and_unpadding_do_not_change_real_outputs(recipe):
    config = _config(recipe)
    model = _seeded_model(config).eval()
    batch = _batch(config)
    padded = {k: (F.pad(v, (0, 6), value=IGNORE_INDEX if k.endswith("labels") else 0) if v.dim() == 2 else v)
              for k, v in batch.items()}
    with torch.no_grad():
        reference = model(batch)
        extra_padding = model(padded)
        model.config.unpad = False
        dense = model(batch)
        model.config.unpad = True
    for out in (extra_padding, dense):
        for key in ("fine_loss", "coarse_loss"):
            assert float(out[key]) == pytest.approx(float(reference[key]), rel=1e-5), key


def test_stacked_shared_encoder_equals_separate_calls():
    """ambert stacks fine and coarse into one encoder call; the result equals one call per side."""
    config = _config("tiny-modern")
    model = _seeded_model(config).eval()
    batch = _batch(config)
    with torch.no_grad():
        stacked = model.encode(batch)
        for g in ("fine", "coarse"):
            ids = batch[f"{g}_ids"]
            positions = torch.arange(ids.shape[1]).expand_as(ids)
            words = model.word_embeddings[g](ids)
            alone = model._run("shared", words, batch[f"{g}_attention_mask"], positions, batch[f"{g}_token_types"])
            real = batch[f"{g}_attention_mask"].bool()
            torch.testing.assert_close(stacked[f"{g}_hidden"][real], alone[real], rtol=1e-5, atol=1e-5)


def test_sliding_window_layers_only_see_their_window():
    from pipeline.model.layers import TokenLayout

    config = _config("tiny-modern", num_layers=2, global_every=2, local_window=4)
    model = _seeded_model(config).eval()
    local = model.encoders["shared"].layers[1].attention
    glob = model.encoders["shared"].layers[0].attention
    assert not local.is_global and glob.is_global
    length = 16
    x = torch.randn(1, length, config.hidden_size)
    mask = torch.ones(1, length, dtype=torch.long)
    positions = torch.arange(length)[None]
    layout = TokenLayout.build(config, mask, positions)
    far, near = x.clone(), x.clone()
    far[0, 12] += 1.0   # 12 - 5 = 7 > window/2 = 2
    near[0, 6] += 1.0   # 6 - 5 = 1 <= 2
    with torch.no_grad():
        base = local(x[0], layout)[5]
        assert torch.allclose(local(far[0], layout)[5], base)
        assert not torch.allclose(local(near[0], layout)[5], base)
        assert not torch.allclose(glob(far[0], layout)[5], glob(x[0], layout)[5])


def test_activation_checkpointing_gives_the_same_gradients():
    """Also with dropout: recomputation must replay the default AND the per-TP-rank dropout streams."""
    from pipeline import parallel

    config = _config("tiny-modern", hidden_dropout=0.1, attention_dropout=0.2)
    batch = _batch(config)
    grads = []
    for checkpointing in (False, True):
        config.activation_checkpointing = checkpointing
        model = _seeded_model(config).train()
        parallel.set_seed(99)
        model(batch)["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)


def test_same_seed_same_weights_and_dropout_is_active_in_training():
    config = _config(hidden_dropout=0.1, attention_dropout=0.1)
    a, b = _seeded_model(config, seed=5), _seeded_model(config, seed=5)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name
    batch = _batch(config)
    torch.manual_seed(0)
    train_1, train_2 = float(a(batch)["loss"]), float(a(batch)["loss"])
    assert train_1 != train_2
    a.eval()
    assert float(a(batch)["loss"]) == float(a(batch)["loss"])


@pytest.mark.parametrize("recipe", ["tiny", "tiny-modern"])
def test_bf16_parameters_train(recipe):
    """The DeepSpeed bf16 path: parameters cast to bf16, loss reported in fp32."""
    config = _config(recipe)
    model = _seeded_model(config).to(torch.bfloat16)
    out = model(_batch(config))
    out["loss"].backward()
    assert out["loss"].dtype == torch.float32 and out["loss"].isfinite()
    # The same function as in fp32, to bf16's precision (a wrong bf16 path would still be finite);
    # without dropout, whose masks differ between the two models.
    with torch.no_grad():
        bf16 = float(model.eval()(_batch(config))["loss"])
        reference = float(_seeded_model(config).eval()(_batch(config))["loss"])
    assert abs(bf16 - reference) < 0.02 * reference, (bf16, reference)
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------
def test_initialize_parallel_rejects_a_tp_size_that_does_not_divide_the_world():
    from pipeline import parallel

    with pytest.raises(ValueError, match="tensor_parallel_size=2 does not divide the world size 1"):
        parallel.initialize_parallel(tensor_parallel_size=2)
    parallel.initialize_parallel(tensor_parallel_size=1, seed=1234)


@pytest.mark.parametrize(
    "overrides, tp, field",
    [
        (dict(num_attention_heads=4), 3, "num_attention_heads"),
        (dict(hidden_size=66, num_attention_heads=4), 1, "hidden_size"),
        (dict(num_query_groups=3), 1, "num_query_groups"),
        (dict(num_attention_heads=4, num_query_groups=1), 2, "num_query_groups"),
        (dict(fine_vocab_size=5), 1, "fine_vocab_size"),
        (dict(coarse_vocab_size=3), 1, "coarse_vocab_size"),
        (dict(local_window=128, max_position_embeddings=64), 1, "local_window"),
        (dict(variant="ambert-xl"), 1, "variant"),
        (dict(norm="batchnorm"), 1, "norm"),
        (dict(activation="relu"), 1, "activation"),
        (dict(position="alibi"), 1, "position"),
        (dict(vocab_multiple=3), 2, "vocab_multiple"),
        (dict(ffn_hidden_size=127), 2, "ffn_hidden_size"),
        (dict(hidden_dropout=1.5), 1, "hidden_dropout"),
        (dict(layer_norm_eps=-1.0), 1, "layer_norm_eps"),  # a NaN loss from step 1, with no error
        (dict(position="rope", rope_theta=0.0), 1, "rope_theta"),
        # sliding windows over [fine ; coarse] would join coarse token k with unrelated fine text
        (dict(variant="ambert-hybrid", local_window=8, global_every=2), 1, "local_window"),
        (dict(variant="ambert-hybrid", local_window=8, global_every=1), 1, "local_window"),  # every layer global, still refused
    ],
)
def test_invalid_config_names_the_field(overrides, tp, field):
    config = model_recipe("tiny", **overrides)
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}: ") as info:
        config.validate(tensor_parallel_size=tp)
    message = str(info.value)  # names the bad value and the fix
    assert str(overrides[field]) in message and any(fix in message for fix in ("use ", "choose ", "set ")), message


def test_invalid_config_fails_at_construction_and_unknown_recipe_or_field():
    with pytest.raises(ValueError, match=r"ModelConfig\.hidden_size"):
        build_model(model_recipe("tiny", hidden_size=65))
    with pytest.raises(ValueError, match="known recipes"):
        model_recipe("bert-huge")
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        model_recipe("tiny", hiden_size=64)


def test_too_long_sequence_is_rejected_with_the_limit():
    config = _config(max_position_embeddings=16)
    model = _seeded_model(config)
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        model(_batch(config, fine_len=20, coarse_len=10))


# ----------------------------------------------------------------------------------------------
# Parameter counts (paper) and FLOPs
# ----------------------------------------------------------------------------------------------
def test_data_prep_defaults_are_the_vocabulary_sizes_the_counts_assume():
    """A default build gives the model the paper's vocabularies: the zh coarse default was 72,635 in
    all, characters included, ~51.5k words (a 159M model, not the paper's 176M)."""
    from data_prep.chinese import Chinese
    from data_prep.english import English, EnglishConfig

    sizes = (Chinese.default_fine_vocab_size, Chinese.default_coarse_vocab_size)
    assert sizes == (21_128, 21_128 + 72_635) == (ModelConfig().fine_vocab_size, ModelConfig().coarse_vocab_size)
    assert (English.default_fine_vocab_size, English.default_coarse_vocab_size) == (30_522, 30_522 + 77_645)
    assert EnglishConfig().coarse_vocab_size == English.default_coarse_vocab_size
    assert (EnglishConfig().fine_vocab_size, EnglishConfig().coarse_vocab_size) == (30_522, 30_522 + 77_645)


@pytest.mark.parametrize(
    "language, fine, coarse, paper",
    [
        # The paper's coarse vocabularies include the fine units: zh 21,128 + 72,635 words,
        # en 30,522 words + 77,645 phrases. Reading "coarse = 77,645 phrases only" gives 170M, not 194M.
        ("zh", 21_128, 21_128 + 72_635, 176e6),
        ("en", 30_522, 30_522 + 77_645, 194e6),
    ],
)
@pytest.mark.parametrize("sentence_order_head", [False, True])
def test_parameter_count_matches_the_paper(language, fine, coarse, paper, sentence_order_head):
    config = model_recipe("bert-base", fine_vocab_size=fine, coarse_vocab_size=coarse, vocab_multiple=1,
                          sentence_order_head=sentence_order_head)
    assert abs(count_parameters(config) - paper) / paper < 0.01, count_parameters(config)


def test_parameter_count_equals_built_model_for_bert_base():
    config = model_recipe("bert-base", fine_vocab_size=1000, coarse_vocab_size=2000, num_layers=2)
    assert sum(p.numel() for p in build_model(config).parameters()) == count_parameters(config)


def test_flops_follow_the_6n_rule_and_scale_with_variants():
    config = model_recipe("bert-base", fine_vocab_size=21_128, coarse_vocab_size=93_763)
    per_layer = 12 * config.hidden_size**2 * 2  # QKV+out (4 H^2) and MLP (8 H^2), 2 FLOPs per MAC
    fine = flops_per_sample(config, 128, 0, 0, 0)
    expected = 3 * 128 * config.num_layers * (per_layer + 4 * 128 * config.hidden_size)
    assert fine == pytest.approx(expected, rel=1e-9)
    ambert = flops_per_sample(config, 128, 90, 20, 14)
    assert ambert > flops_per_sample(config, 128, 90, 0, 0) > fine
    hybrid = flops_per_sample(model_recipe("bert-base", variant="ambert-hybrid"), 128, 90, 0, 0)
    assert hybrid > flops_per_sample(config, 128, 90, 0, 0)  # attention over 218 tokens
    only_fine = flops_per_sample(model_recipe("bert-base", variant="bert-fine"), 128, 90, 20, 14)
    assert only_fine < ambert
    modern = model_recipe("modern-base")
    assert flops_per_sample(modern, 1024, 0, 0, 0) < flops_per_sample(
        model_recipe("modern-base", local_window=0), 1024, 0, 0, 0)


def test_a_batch_without_predictions_on_one_side_gives_zero_loss_there():
    config = _config()
    model = _seeded_model(config)
    batch = _batch(config)
    batch["coarse_labels"] = torch.full_like(batch["coarse_labels"], IGNORE_INDEX)
    out = model(batch)
    out["loss"].backward()
    assert float(out["coarse_loss"]) == 0.0 and float(out["coarse_masked"]) == 0.0
    assert float(out["loss"]) == pytest.approx(float(out["fine_loss"]))
    assert model.heads["coarse"].dense.weight.grad is not None


def test_grouped_query_attention_fallback_for_older_torch_matches(monkeypatch):
    from pipeline.model import layers

    config = _config("tiny-modern")
    assert config.query_groups < config.num_attention_heads
    model = _seeded_model(config).eval()
    batch = _batch(config)
    with torch.no_grad():
        native = model(batch)["loss"]
        monkeypatch.setattr(layers, "_SDPA_HAS_GQA", False)
        repeated = model(batch)["loss"]
    assert float(repeated) == pytest.approx(float(native), rel=1e-6)


def test_megatron_is_imported_without_compiling_its_unused_kernels():
    """Importing ``pipeline`` makes megatron-core's import skip torch.compile (TorchDynamo and Inductor,
    ~2 s of every process's start) for kernels this project never calls; torch.compile itself is left
    as it was, and the CLI entry points freeze the heap at exit (the last collections took ~2 s)."""
    code = textwrap.dedent("""
        import atexit, gc, sys
        import torch
        compile_ = torch.compile
        import pipeline
        from megatron.core import jit, parallel_state  # noqa: F401
        from megatron.core.fusions import fused_bias_geglu
        import deepspeed.runtime.zero.muon.original_muon as muon
        import pipeline.model.ambert  # noqa: F401  (the model's modules: nothing of theirs compiled either)
        assert torch.compile is compile_, "torch.compile was not restored"
        assert jit.jit_fuser is pipeline._no_compile
        assert type(fused_bias_geglu.bias_geglu).__name__ == "function", type(fused_bias_geglu.bias_geglu)
        assert type(muon.zeropower_via_newtonschulz5).__name__ == "function", type(muon.zeropower_via_newtonschulz5)
        assert "torch._inductor.compile_fx" not in sys.modules
        assert not any(isinstance(f, pipeline._ImportWithoutTorchCompile) for f in sys.meta_path)  # removed once done
        pipeline.skip_final_garbage_collection()
        atexit._run_exitfuncs()
        assert gc.get_freeze_count() > 100_000, gc.get_freeze_count()
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
