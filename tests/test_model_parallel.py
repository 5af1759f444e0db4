"""Tensor-parallel parity: TP=2 vs TP=1 from the same seed, every variant, BERT-style and modern options.

One launch of 2 gloo ranks runs every case (each spawn costs seconds): in each case both ranks
first build the TP=1 reference (as two data-parallel replicas), then re-initialise megatron-core
at TP=2 and build the sharded model, and compare loss, logits, every gradient (shards gathered
back to full tensors) and the loss after 5 AdamW steps.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_distributed

VARIANT_NAMES = ("ambert", "ambert-combo", "ambert-hybrid", "bert-fine", "bert-coarse")
OPTION_SETS = ("tiny", "tiny-modern")
STEPS = 5


def _train(model, batch, steps):
    """Loss, gathered logits and full gradients at step 0; losses of the next ``steps`` AdamW steps."""
    import torch.distributed as dist

    from pipeline import parallel

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    out = model(batch, return_logits=True)
    out["loss"].backward()
    logits = {}
    for key in [k for k in out if k.endswith("_logits")]:
        pieces = [torch.empty_like(out[key]) for _ in range(parallel.tensor_parallel_size())]
        dist.all_gather(pieces, out[key].contiguous(), group=parallel.tensor_parallel_group())
        logits[key] = torch.cat(pieces, dim=-1)
    grads = {name: parallel.full_tensor(p.grad, like=p) for name, p in model.named_parameters()}
    first = {k: float(v) for k, v in out.items() if k.endswith(("loss", "accuracy"))}
    losses = []
    for _ in range(steps):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = model(batch)["loss"]
        loss.backward()
        losses.append(float(loss))
    return first, logits, grads, losses


def _parity_cases(cases):
    from pipeline import parallel
    from pipeline.model import build_model, model_recipe
    from pipeline.model.synthetic import synthetic_batch

    report = []
    for recipe, variant in cases:
        config = model_recipe(recipe, variant=variant, hidden_dropout=0.0, attention_dropout=0.0,
                              sentence_order_head=(variant == "ambert"),
                              **({"local_window": 0} if variant == "ambert-hybrid" else {}))
        batch = synthetic_batch(config.fine_vocab_size, config.coarse_vocab_size, batch_size=3,
                                fine_len=24, coarse_len=17, seed=7, sentence_order=True)
        results = {}
        for tp in (1, 2):
            parallel.initialize_parallel(tensor_parallel_size=tp, seed=1234)
            model = build_model(config)
            weights = {name: parallel.full_tensor(p) for name, p in model.named_parameters()}
            results[tp] = (weights,) + _train(model, batch, STEPS)
        (w1, first1, logits1, grads1, losses1), (w2, first2, logits2, grads2, losses2) = results[1], results[2]
        case = f"{recipe}/{variant}"
        assert w1.keys() == w2.keys(), case
        for name in w1:
            assert torch.equal(w1[name], w2[name]), f"{case}: initial weight {name} differs between TP=1 and TP=2"
        for key in first1:
            assert first2[key] == pytest.approx(first1[key], rel=1e-5, abs=1e-6), (case, key, first1[key], first2[key])
        assert logits1.keys() == logits2.keys() and logits1, case
        for key in logits1:
            torch.testing.assert_close(logits2[key], logits1[key], rtol=1e-4, atol=1e-4, msg=f"{case}: {key}")
        for name in grads1:
            torch.testing.assert_close(grads2[name], grads1[name], rtol=1e-4, atol=1e-5, msg=f"{case}: grad {name}")
        for step, (a, b) in enumerate(zip(losses1, losses2), start=1):
            assert b == pytest.approx(a, rel=1e-5), f"{case}: step {step} loss TP1 {a} vs TP2 {b}"
        assert losses1[-1] < first1["loss"], f"{case}: 5 AdamW steps did not reduce the loss"
        report.append((case, first1["loss"], first2["loss"], losses1[-1], losses2[-1]))
    return report


CASES = [(recipe, variant) for recipe in OPTION_SETS for variant in VARIANT_NAMES]


def _all_checks(cases):
    return _parity_cases(cases), _argmax_and_loss_under_vocab_parallelism(), _rng_streams_and_dropout_under_tp()


@pytest.fixture(scope="module")
def tp_results():
    # ONE launch of 2 ranks for every check in this file (each spawn costs seconds on a loaded box).
    return run_distributed(_all_checks, world_size=2, args=(CASES,), timeout=500)


@pytest.mark.timeout(520)
def test_tensor_parallel_parity_all_variants(tp_results):
    reports = [parity for parity, _, _ in tp_results]
    assert reports[0] == reports[1]  # both ranks computed (and agree on) the same numbers
    assert [r[0] for r in reports[0]] == [f"{r}/{v}" for r, v in CASES]


def _argmax_and_loss_under_vocab_parallelism():
    """The cross-rank argmax picks the TP=1 argmax, including ties that straddle the shards."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from pipeline import parallel
    from pipeline.model.heads import vocab_parallel_argmax

    parallel.initialize_parallel(tensor_parallel_size=2, seed=1)
    rank = parallel.tensor_parallel_rank()
    generator = torch.Generator().manual_seed(3)
    full = torch.randn(6, 10, generator=generator)
    full[0, 2] = full[0, 7] = 50.0  # tie across shards: argmax must say 2
    full[1, 6] = full[1, 8] = 50.0  # tie inside shard 1: 6
    full[2, 4] = 60.0               # maximum at the last column of shard 0
    local = full[:, rank * 5:(rank + 1) * 5].clone()
    predicted = vocab_parallel_argmax(local, rank * 5)
    target = torch.tensor([2, 6, 4, 9, 0, 5])
    loss = vocab_parallel_cross_entropy(local.clone(), target)
    reference = torch.nn.functional.cross_entropy(full, target, reduction="none")
    return predicted.tolist(), full.argmax(-1).tolist(), (loss - reference).abs().max().item()


def _rng_streams_and_dropout_under_tp():
    """Per-TP-rank stream differs across TP ranks, the default stream does not; with dropout on, a
    TP=2 model still gives the same loss on both ranks (replicated activations see one mask)."""
    from pipeline import parallel
    from pipeline.model import build_model, model_recipe
    from pipeline.model.synthetic import synthetic_batch

    parallel.initialize_parallel(tensor_parallel_size=2, seed=5)
    default = torch.rand(3).tolist()
    with parallel.rng_tracker().fork():
        tp_stream = torch.rand(3).tolist()
    after_fork = torch.rand(3).tolist()  # the fork must not disturb the default stream
    parallel.set_seed(5)
    torch.rand(3)
    resumed_default = torch.rand(3).tolist()
    losses = []
    for recipe in ("tiny", "tiny-modern"):
        config = model_recipe(recipe, hidden_dropout=0.2, attention_dropout=0.2)
        model = build_model(config).train()
        batch = synthetic_batch(config.fine_vocab_size, config.coarse_vocab_size, seed=3)
        out = model(batch)
        out["loss"].backward()
        losses.append((float(out["loss"]), float(model(batch)["loss"])))
    return default, tp_stream, after_fork == resumed_default, losses


@pytest.mark.timeout(520)
def test_vocab_parallel_argmax_matches_full_argmax(tp_results):
    for _, (predicted, expected, loss_error), _ in tp_results:
        assert predicted == expected
        assert predicted[:3] == [2, 6, 4]
        assert loss_error < 1e-5


@pytest.mark.timeout(520)
def test_dropout_streams_under_tensor_parallelism(tp_results):
    (_, _, (default0, tp0, ok0, losses0)), (_, _, (default1, tp1, ok1, losses1)) = tp_results
    assert default0 == default1
    assert tp0 != tp1
    assert ok0 and ok1
    assert losses0 == losses1  # both TP ranks, same loss with dropout on
    for first, second in losses0:
        assert first != second  # dropout is active: two forwards differ
