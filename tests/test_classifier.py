"""The classifier library: last-real-token pooling (padding invariance), trainable parts, LoRA export,
save/load, spam data preparation, batching and metrics. Tiny random models only."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from llmcore.common import LLMCoreError
from llmcore.data.spam import ClassificationBatches, balance_classes, encode_texts, label_ids, split_table
from llmcore.eval.metrics import classification_metrics, confusion_matrix
from llmcore.models.classifier import (
    LABELS,
    GPTClassifier,
    classification_loss,
    predict_proba,
    right_pad,
    set_trainable,
)
from llmcore.models.config import ModelConfig
from llmcore.models.gpt import GPT
from llmcore.models.lora import LoRALinear, LoRAParams, merge_lora
from llmcore.models.ops import IGNORE_INDEX
from llmcore.text.bpe import ENDOFTEXT, GPT2_PATTERN
from llmcore.text.tokenizer import Tokenizer
from llmcore.weights.model_dir import load_classifier, save_classifier
from llmcore.weights.weight_file import load_checkpoint, read_metadata

PRESETS = ["gpt2-tiny", "llama3-tiny"]  # learned positions and RoPE
PAD = 256  # the byte tokenizer's end-of-text id, used as padding


def byte_tokenizer() -> Tokenizer:
    return Tokenizer("bpe", "bytes", {ENDOFTEXT: 256}, ranks={bytes([b]): b for b in range(256)}, pattern=GPT2_PATTERN)


def tiny_classifier(preset: str = "gpt2-tiny", seed: int = 0) -> GPTClassifier:
    torch.manual_seed(seed)
    kv = {"n_kv_heads": 2} if preset.startswith("llama") else {}
    cfg = ModelConfig.from_preset(
        preset, n_layers=2, emb_dim=32, n_heads=4, vocab_size=257, context_length=48, hidden_dim=64, **kv
    )
    model = GPTClassifier(GPT(cfg), num_classes=2)
    with torch.no_grad():
        model.head.weight.normal_(std=1.0)  # a random head scores strongly enough for differences to show
    return model.eval()


def random_seqs(lengths: list[int], vocab: int = 256, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


# ---------------------------------------------------------------------------------------------------
# Pooling: padding invariance
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_prediction_does_not_depend_on_padding(preset: str):
    model = tiny_classifier(preset)
    pad = PAD
    short, *longer = random_seqs([5, 40, 31, 47])
    with torch.no_grad():
        alone = model(*right_pad([short], pad)).softmax(-1)[0]
        in_batch = model(*right_pad([longer[0], short, *longer[1:]], pad)).softmax(-1)[1]  # padded to 47
        max_padded = model(*right_pad([short], pad, width=48)).softmax(-1)[0]  # padded to the full context
    for other in (in_batch, max_padded):
        torch.testing.assert_close(other, alone, rtol=0, atol=1e-5)
        assert other.argmax() == alone.argmax()
    # predict_proba batches by length in its own way: still the same numbers
    probs = predict_proba(model, [longer[0], short, *longer[1:]], pad, batch_size=2)
    torch.testing.assert_close(probs[1], alone, rtol=0, atol=1e-5)


def test_last_position_pooling_would_depend_on_padding():
    """The book's pooling (logits at position -1 of the padded batch) scores padding, not the message."""
    model = tiny_classifier()
    pad = PAD
    short = random_seqs([5])[0]
    with torch.no_grad():
        hidden_alone = model.gpt(torch.tensor([short]), return_hidden=True, return_logits=False).hidden
        idx, _ = right_pad([short], pad, width=48)
        hidden_padded = model.gpt(idx, return_hidden=True, return_logits=False).hidden
        book_alone = model.head(hidden_alone[:, -1]).softmax(-1)
        book_padded = model.head(hidden_padded[:, -1]).softmax(-1)
        ours_padded = model(*right_pad([short], pad, width=48)).softmax(-1)
    assert (book_alone - book_padded).abs().max() > 1e-2  # the book's answer moves with the padding
    torch.testing.assert_close(ours_padded, book_alone, rtol=0, atol=1e-5)  # ours is the message alone


def test_empty_row_is_refused():
    model = tiny_classifier()
    idx = torch.zeros(2, 4, dtype=torch.long)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    with pytest.raises(ValueError, match="no real tokens"):
        model(idx, mask)
    with pytest.raises(ValueError, match="row 1: 0 tokens"):
        right_pad([[1], []], 0)


# ---------------------------------------------------------------------------------------------------
# What trains
# ---------------------------------------------------------------------------------------------------


def test_trainable_parts_counts():
    model = tiny_classifier()
    cfg = model.cfg
    head = cfg.emb_dim * 2 + 2
    block = sum(p.numel() for p in model.gpt.blocks[-1].parameters())
    final_norm = sum(p.numel() for p in model.gpt.final_norm.parameters())
    assert set_trainable(model, "head") == head
    assert set_trainable(model, "last_blocks", last_blocks=1) == block + final_norm + head
    assert set_trainable(model, "last_blocks", last_blocks=2) == 2 * block + final_norm + head
    assert set_trainable(model, "all") == model.gpt.num_params() + head  # the tied vocab head is the embedding
    untied = tiny_classifier("llama3-tiny")
    vocab_head = untied.gpt.out_head.weight.numel()
    assert set_trainable(untied, "all") == untied.gpt.num_params() - vocab_head + head  # unused: not trained
    with pytest.raises(LLMCoreError, match=r"last_blocks: expected 1\.\.2"):
        set_trainable(model, "last_blocks", last_blocks=3)
    with pytest.raises(LLMCoreError, match="trainable: expected one of"):
        set_trainable(model, "everything")


@pytest.mark.parametrize("preset", PRESETS)
def test_lora_trains_only_adapters_and_head(preset: str):
    model = tiny_classifier(preset)
    cfg, r = model.cfg, 4
    n = set_trainable(model, "lora", lora=LoRAParams(rank=r, alpha=8))
    C, H, kv = cfg.emb_dim, cfg.hidden_dim, cfg.n_kv_heads * cfg.head_dim
    fc_out = 2 * H if cfg.mlp == "swiglu" else H
    adapters = r * ((C + C + 2 * kv) + (C + C) + (C + fc_out) + (H + C))  # r * (in + out) per adapted linear
    assert n == cfg.n_layers * adapters + C * 2 + 2
    assert all(("lora_" in name) or name.startswith("head.") for name, p in model.named_parameters() if p.requires_grad)

    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = (*right_pad(random_seqs([6, 9, 3]), PAD), torch.tensor([0, 1, 1]))
    classification_loss(model, batch)[0].backward()
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k or k.startswith("head.") for k in changed)
    assert any("lora_B" in k for k in changed) and "head.weight" in changed

    with pytest.raises(LLMCoreError, match="lora.targets: 'mlp.gate' matches no linear layer"):
        set_trainable(tiny_classifier(preset), "lora", lora=LoRAParams(targets=["mlp.gate"]))


@pytest.mark.parametrize("preset", PRESETS)
def test_lora_merges_for_export_and_round_trips(tmp_path, preset: str):
    model = tiny_classifier(preset)
    set_trainable(model, "lora", lora=LoRAParams(rank=4, alpha=8))
    g = torch.Generator().manual_seed(3)
    for m in model.modules():  # trained adapters: B != 0
        if isinstance(m, LoRALinear):
            m.lora_B.data = torch.randn(m.lora_B.shape, generator=g) * 0.2
    seqs = random_seqs([7, 20, 3, 11])
    lora_probs = predict_proba(model, seqs, PAD)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert not any("lora_" in k or ".base." in k for k in model.state_dict())
    torch.testing.assert_close(predict_proba(model, seqs, PAD), lora_probs, rtol=0, atol=1e-5)

    tok = byte_tokenizer()
    save_classifier(tmp_path / "clf", model, tok, LABELS, {"max_length": "20"})
    meta = read_metadata(tmp_path / "clf" / "model.safetensors")
    assert (meta["task"], meta["labels"], meta["pooling"], meta["max_length"]) == (
        "classify",
        '["ham", "spam"]',
        "last_token",
        "20",
    )
    loaded, tok2, labels = load_classifier(tmp_path / "clf")
    assert labels == ["ham", "spam"] and tok2.vocab_size == tok.vocab_size
    torch.testing.assert_close(predict_proba(loaded, seqs, PAD), lora_probs, rtol=0, atol=1e-5)
    with pytest.raises(LLMCoreError, match="unexpected"):  # not a language model any more
        load_checkpoint(tmp_path / "clf" / "model.safetensors")


def test_save_refuses_unmerged_lora_and_load_refuses_a_plain_model(tmp_path):
    model = tiny_classifier()
    set_trainable(model, "lora", lora=LoRAParams(rank=2))
    with pytest.raises(ValueError, match="merge the LoRA layers"):
        save_classifier(tmp_path / "clf", model, byte_tokenizer(), LABELS)
    assert not (tmp_path / "clf").exists()
    from llmcore.weights.model_dir import save_model_dir

    save_model_dir(tmp_path / "lm", tiny_classifier().gpt, byte_tokenizer())
    with pytest.raises(LLMCoreError, match="a causal language model, not a classifier"):
        load_classifier(tmp_path / "lm")
    with pytest.raises(LLMCoreError, match="no such model folder"):
        load_classifier(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------


def spam_frame(n_ham: int = 40, n_spam: int = 10) -> pd.DataFrame:
    rows = [("ham", f"ham message {i}") for i in range(n_ham)] + [("spam", f"spam message {i}") for i in range(n_spam)]
    return pd.DataFrame(rows, columns=["label", "text"])


def test_balance_and_split_are_seeded_and_sized_like_the_book():
    df = spam_frame()
    balanced = balance_classes(df, seed=123)
    assert balanced["label"].value_counts().to_dict() == {"ham": 10, "spam": 10}
    assert set(balanced[balanced.label == "spam"].text) == set(df[df.label == "spam"].text)  # every spam kept
    assert balanced.equals(balance_classes(df, seed=123))
    assert not balanced.equals(balance_classes(df, seed=124))

    # the book's sizes for the real file: 747 + 747 = 1494 rows -> 1045 / 149 / 300
    big = spam_frame(747, 747)
    train, val, test = split_table(big, (0.7, 0.1), seed=123)
    assert (len(train), len(val), len(test)) == (1045, 149, 300)
    assert sorted([*train.text, *val.text, *test.text]) == sorted(big.text)  # a partition
    again = split_table(big, (0.7, 0.1), seed=123)
    assert all(a.equals(b) for a, b in zip((train, val, test), again, strict=True))


def test_encode_truncates_and_labels_map():
    tok = byte_tokenizer()
    assert encode_texts(tok, ["abcdef", "xy"], max_length=4) == [list(b"abcd"), list(b"xy")]
    assert encode_texts(tok, ["<|endoftext|>"], max_length=100) == [list(b"<|endoftext|>")]  # text, not special
    assert label_ids(["spam", "ham", "spam"]) == [1, 0, 1]


def test_batches_cover_epochs_resume_and_shard():
    seqs = random_seqs([3 + i % 7 for i in range(10)])
    labels = [i % 2 for i in range(10)]
    data = ClassificationBatches(seqs, labels, batch_size=3, pad_id=PAD, seed=5)
    assert len(data) == 3  # the ragged tail of 1 is dropped in training
    epoch = [data.next_batch() for _ in range(3)]
    for idx, mask, y in epoch:
        assert idx.shape[0] == 3 and mask.shape == idx.shape and y.shape == (3,)
        assert (mask.sum(1) > 0).all() and mask[:, 0].all()  # right padding: every row starts with real tokens
    state = data.state_dict()
    nxt = [data.next_batch() for _ in range(4)]
    data.load_state_dict(state)
    for a, b in zip(nxt, [data.next_batch() for _ in range(4)], strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))

    val = ClassificationBatches(seqs, labels, batch_size=4, pad_id=PAD, shuffle=False)
    assert len(val) == 3
    ys = torch.cat([val.next_batch()[2] for _ in range(3)]).tolist()
    assert ys == labels  # every example once, in order, tail included

    # two ranks split the global batch: together they hold what one process would
    ranks = [ClassificationBatches(seqs, labels, 2, PAD, shuffle=False, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == 3
    got = [[b.next_batch()[2].tolist() for b in ranks] for _ in range(3)]
    assert got[2][1] == [IGNORE_INDEX]  # rank 1 has nothing left in the tail batch: a stand-in scored by nothing
    assert [y for step in got for part in step for y in part if y != IGNORE_INDEX] == labels
    with pytest.raises(LLMCoreError, match="fewer than one batch"):
        ClassificationBatches(seqs[:2], labels[:2], batch_size=3, pad_id=PAD)


def test_loss_ignores_stand_in_rows():
    model = tiny_classifier()
    idx, mask = right_pad(random_seqs([4, 6]), PAD)
    loss, n = classification_loss(model, (idx, mask, torch.tensor([1, IGNORE_INDEX])))
    expected = torch.nn.functional.cross_entropy(model(idx[:1], mask[:1]), torch.tensor([1]))
    assert int(n) == 1
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss, n = classification_loss(model, (idx[:1], mask[:1], torch.tensor([IGNORE_INDEX])))
    assert int(n) == 0 and loss.item() == 0.0  # weight 0, not NaN


# ---------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------


def test_metrics_by_hand():
    actual = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    predicted = [1, 1, 1, 0, 1, 1, 0, 0, 0, 0]  # tp 3, fn 1, fp 2, tn 4
    assert confusion_matrix(actual, predicted, 2) == [[4, 2], [1, 3]]
    m = classification_metrics(actual, predicted)
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["precision"] == pytest.approx(3 / 5)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    none_flagged = classification_metrics([1, 0], [0, 0])
    assert (none_flagged["precision"], none_flagged["recall"], none_flagged["f1"]) == (0.0, 0.0, 0.0)
    assert classification_metrics([0, 1], [0, 1], positive=0)["f1"] == 1.0
