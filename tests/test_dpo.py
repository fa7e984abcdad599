"""DPO: the loss against a hand computation, beta -> 0, answer-only log-probs, reference caching, the
preference file's validation, and the fit loop's extra metrics."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from llmcore.common import LLMCoreError
from llmcore.data.datasets import load_preferences, validate_preferences
from llmcore.data.preferences import PreferenceBatches, encode_pairs
from llmcore.models.config import ModelConfig
from llmcore.models.gpt import GPT
from llmcore.text.bpe import ENDOFTEXT, GPT2_PATTERN
from llmcore.text.tokenizer import Tokenizer
from llmcore.training.config import HardwareConfig, TrainConfig
from llmcore.training.dpo import DPOLoss, attach_reference_logps, dpo_loss, sequence_logps
from llmcore.training.loop import fit


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: one thread beats two (and does not fight other jobs); the others get theirs back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def byte_tokenizer() -> Tokenizer:
    return Tokenizer("bpe", "bytes", {ENDOFTEXT: 256}, ranks={bytes([b]): b for b in range(256)}, pattern=GPT2_PATTERN)


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset("gpt2-tiny", vocab_size=257, context_length=256, emb_dim=32, n_layers=2, n_heads=2)
    return GPT(cfg)


def entries(n: int = 24) -> list[dict]:
    return [
        {"instruction": f"Say {i}.", "input": "", "output": "Yes.", "chosen": "Yes.", "rejected": f"No {i}!"}
        for i in range(n)
    ]


def test_loss_matches_a_hand_computation() -> None:
    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    rc, rr = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -3.0])
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # pair 0: (−3 − −3.5) − (−4 − −3) = 0.5 + 1 = 1.5 → logit 0.75; pair 1: (−1) − (1) = −2 → logit −1
    expected = [math.log1p(math.exp(-0.75)), math.log1p(math.exp(1.0))]  # −log σ(z) = log(1 + e^−z)
    assert loss.tolist() == pytest.approx(expected, abs=1e-6)
    assert chosen.tolist() == pytest.approx([0.25, -0.5]) and rejected.tolist() == pytest.approx([-0.5, 0.5])
    same, _, _ = dpo_loss(rc, rr, rc, rr, beta=0.1)  # policy = reference: log 2 whatever beta
    assert same.tolist() == pytest.approx([math.log(2)] * 2)


def test_gradient_vanishes_as_beta_goes_to_zero() -> None:
    pc, pr = torch.tensor([-3.0, -5.0], requires_grad=True), torch.tensor([-4.0, -2.0], requires_grad=True)
    rc, rr = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -3.0])
    norms = []
    for beta in (1.0, 1e-2, 1e-4, 0.0):
        pc.grad = pr.grad = None
        dpo_loss(pc, pr, rc, rr, beta)[0].sum().backward()
        # d loss / d pi_c = −beta σ(−z): at small beta it is −beta/2 per pair, and d/d pi_r the opposite
        if 0 < beta < 1:
            assert pc.grad.tolist() == pytest.approx([-beta / 2] * 2, rel=1e-2)
            assert pr.grad.tolist() == pytest.approx([beta / 2] * 2, rel=1e-2)
        norms.append(float(torch.cat([pc.grad, pr.grad]).norm()))
    assert norms[0] > norms[1] > norms[2] > norms[3] == 0.0


def test_sequence_logps_score_the_answer_only() -> None:
    model, tok = tiny_model().eval(), byte_tokenizer()
    pairs, too_long = encode_pairs(entries(2), tok, "alpaca", max_length=256)
    assert too_long == [] and [p.index for p in pairs] == [0, 1]
    data = PreferenceBatches(pairs, 2, tok.eot_id, shuffle=False)
    batch = data.batch_of([0, 1])
    logps, counts = sequence_logps(model, batch["inputs"], batch["targets"])
    # by hand for the first chosen sequence: log-softmax at each answer position
    ex = pairs[0].chosen
    with torch.no_grad():
        logits = model(torch.tensor([ex.ids[:-1]])).logits[0].log_softmax(-1)
    answer = range(ex.prompt_len - 1, len(ex.ids) - 1)  # target j predicts token j + 1: "Yes." + eot
    assert counts[0] == len(b"Yes.") + 1 and counts[2] == len(b"No 0!") + 1
    assert logps[0].item() == pytest.approx(sum(logits[j, ex.ids[j + 1]].item() for j in answer), abs=1e-4)
    mean, _ = sequence_logps(model, batch["inputs"], batch["targets"], average=True)
    assert mean.tolist() == pytest.approx((logps / counts).tolist(), abs=1e-6)
    # padding after a shorter sequence changes nothing: scored alone it has the same log-prob
    alone = data.batch_of([1])
    assert sequence_logps(model, alone["inputs"], alone["targets"])[0][0].item() == pytest.approx(
        logps[1].item(), abs=1e-4
    )


def test_over_long_pairs_are_dropped_not_cut() -> None:
    long = {**entries(1)[0], "rejected": "No! " * 40}
    pairs, too_long = encode_pairs([*entries(2), long], byte_tokenizer(), "alpaca", max_length=200)
    assert too_long == [2] and len(pairs) == 2


def test_reference_logps_are_computed_once_and_make_the_start_loss_log2(tmp_path) -> None:
    model, tok = tiny_model(), byte_tokenizer()
    pairs, _ = encode_pairs(entries(), tok, "alpaca", max_length=256)
    data = PreferenceBatches(pairs, 4, tok.eot_id, shuffle=False)
    assert torch.isnan(data.ref_logps).all()
    ref = attach_reference_logps(model, data, batch_size=5).clone()
    assert ref.shape == (24, 2) and torch.isfinite(ref).all() and model.training
    loss, n, metrics = DPOLoss(beta=0.1)(model.eval(), data.next_batch())
    assert n == 4 and loss.item() == pytest.approx(math.log(2), abs=1e-5)  # policy = reference
    assert abs(metrics["reward_margin"].item()) < 1e-5


def test_fit_trains_dpo_and_logs_its_metrics(tmp_path) -> None:
    """A few steps on the shared loop: the loss falls below log 2, the chosen answers win on validation."""
    model, tok = tiny_model(), byte_tokenizer()
    pairs, _ = encode_pairs(entries(40), tok, "alpaca", max_length=256)
    train, val = (
        PreferenceBatches(pairs[:32], 8, tok.eot_id, seed=1),
        PreferenceBatches(pairs[32:], 4, tok.eot_id, shuffle=False),
    )
    for d in (train, val):
        attach_reference_logps(model, d)
    cfg = TrainConfig(
        batch_size=8,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=2,
        max_steps=12,
        eval_every=6,
        eval_batches=None,
        checkpoint_every=12,
        log_every=3,
        seed=1,
    )
    result = fit(
        model, train, val, DPOLoss(beta=0.5), cfg, HardwareConfig(device="cpu", threads=1), tmp_path, unit="pairs"
    )
    assert result.val_loss < math.log(2) - 0.05
    assert result.extra["reward_accuracy"] == 1.0 and result.extra["reward_margin"] > 0
    assert result.extra["chosen_reward"] > result.extra["rejected_reward"]


def test_preference_validation_names_the_entry() -> None:
    good = entries(3)
    kept, dropped = validate_preferences(good, "f.json")
    assert kept == good and dropped == []
    cases = [
        ({"chosen": ""}, "f.json: entry 1: key 'chosen' is empty"),
        ({"rejected": 3}, "f.json: entry 1: key 'rejected' must be a string, got int"),
        ({"output": None}, "f.json: entry 1: key 'output' must be a string, got NoneType"),
    ]
    for change, message in cases:
        with pytest.raises(LLMCoreError, match=f"^{message}$"):
            validate_preferences([good[0], {**good[1], **change}, good[2]], "f.json")
    missing = {k: v for k, v in good[1].items() if k != "rejected"}
    with pytest.raises(LLMCoreError, match="^f.json: entry 1: missing key 'rejected'$"):
        validate_preferences([good[0], missing], "f.json")
    same = {**good[2], "rejected": " Yes.\n"}
    kept, dropped = validate_preferences([*good[:2], same], "f.json")  # identical answers: dropped, counted
    assert dropped == [2] and len(kept) == 2
    with pytest.raises(LLMCoreError, match="^f.json: entry 2: 'chosen' and 'rejected' are the same text$"):
        validate_preferences([*good[:2], same], "f.json", identical="error")
    with pytest.raises(LLMCoreError, match="expected a JSON list"):
        validate_preferences({"a": 1}, "f.json")


def test_load_preferences_reports_bad_json(tmp_path) -> None:
    path = tmp_path / "p.json"
    path.write_text('[{"instruction": ', encoding="utf-8")
    with pytest.raises(LLMCoreError, match=r"p.json: invalid JSON at line 1"):
        load_preferences(path)
    path.write_text(json.dumps(entries(2)), encoding="utf-8")
    assert len(load_preferences(path)[0]) == 2


def test_fit_extra_metrics_are_weighted_by_items() -> None:
    """A loss_fn's third element is averaged like the loss: by item count, over micro-batches."""
    from llmcore.training.loop import evaluate
    from llmcore.training.runtime import init_runtime

    class Data:
        def __init__(self):
            self.i = 0

        def next_batch(self):
            self.i += 1
            return torch.tensor(float(self.i))

        def __len__(self):
            return 2

        def state_dict(self):
            return {"i": self.i}

        def load_state_dict(self, s):
            self.i = s["i"]

    def loss_fn(model, x):  # batch 1: 1 item of value 1; batch 2: 3 items of value 2
        n = 1 if x.item() == 1 else 3
        return F.mse_loss(model.weight.sum() * 0 + x, x), n, {"value": x}

    model = torch.nn.Linear(1, 1)
    rt = init_runtime(HardwareConfig(device="cpu"))
    loss, metrics = evaluate(model, Data(), loss_fn, 2, torch.device("cpu"), "fp32", rt)
    assert loss == 0.0 and metrics == {"value": pytest.approx((1 * 1 + 2 * 3) / 4)}


def test_dpo_benchmark_runs_every_variant() -> None:
    from benchmarks.dpo import run

    results = run("llama3-tiny", batch=2, reps=1, context=64, threads=None)
    assert set(results) == {"instruct", "dpo (cached ref)", "dpo (live ref)"} and min(results.values()) > 0
