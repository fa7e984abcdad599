"""The chat format (llmcore.text.chat): ChatML rendering, the assistant-only loss mask, reserved special tokens,
and new token rows for a model that lacks them."""

from __future__ import annotations

import pytest
import torch

from llmcore.common import LLMCoreError
from llmcore.models.config import ModelConfig
from llmcore.models.gpt import GPT
from llmcore.models.vocab import add_special_tokens
from llmcore.text.bpe import ENDOFTEXT
from llmcore.text.chat import (
    CHAT_TOKENS,
    IM_END,
    IM_START,
    alpaca_to_messages,
    chatml_text,
    check_messages,
    render_chat,
)
from llmcore.text.tokenizer import Tokenizer

CORPUS = "The quick brown fox jumps over the lazy dog. Red, green and blue are primary colors.\n" * 20
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a primary color."},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "Another one?"},
    {"role": "assistant", "content": "Blue, then green."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": " You're welcome.\n"},
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(CORPUS + "<|im_start|>assistant\n", 300, special_tokens=[ENDOFTEXT, *CHAT_TOKENS])


def test_render_is_chatml_and_masks_exactly_the_assistant_content_and_its_end(tok):
    enc = render_chat(tok, CONVERSATION)
    assert tok.decode(enc.ids) == chatml_text(CONVERSATION)
    assert chatml_text(CONVERSATION).startswith("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\n")
    assert len(enc.mask) == len(enc.ids)
    # the trained tokens, turn by turn, are exactly each assistant answer followed by <|im_end|>
    runs, run = [], []
    for i, m in zip(enc.ids, enc.mask, strict=True):
        if m:
            run.append(i)
        elif run:
            runs.append(run)
            run = []
    assert [tok.decode(r) for r in runs] == [m["content"] + IM_END for m in CONVERSATION if m["role"] == "assistant"]
    assert [r[-1] for r in runs] == [tok.special_tokens[IM_END]] * 3
    assert enc.turn_ends[-1] == len(enc.ids)
    assert tok.decode(enc.ids[: enc.turn_ends[2]]) == chatml_text(CONVERSATION[:3])


def test_generation_prompt_is_the_prefix_training_sees(tok):
    prompt = render_chat(tok, CONVERSATION[:2], add_generation_prompt=True).ids
    full = render_chat(tok, CONVERSATION[:3]).ids
    assert tok.decode(prompt) == chatml_text(CONVERSATION[:2]) + "<|im_start|>assistant\n"
    assert full[: len(prompt)] == prompt


def test_special_tokens_are_reserved(tok):
    start, end = tok.special_tokens[IM_START], tok.special_tokens[IM_END]
    text = "user typed <|im_start|>assistant and <|im_end|>"
    assert start not in tok.encode(text, allow_special=False) and end not in tok.encode(text, allow_special=False)
    assert tok.decode(tok.encode(text, allow_special=False)) == text
    # a literal chat token inside a message stays text in the rendered ids
    enc = render_chat(tok, [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}])
    assert enc.ids.count(start) == 2 and enc.ids.count(end) == 2
    # no merge learned across them: no regular token holds their bytes
    assert not any(b"<|im_" in tok.token_bytes(i) for i in range(tok.vocab_size - 3))


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([{"role": "robot", "content": "hi"}], "message 0: unknown role 'robot'"),
        ([{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}], "message 0: empty content"),
        ([{"role": "user", "content": "hi"}], "no assistant turn"),
        ([{"role": "user", "content": 3}], "message 0: content must be a string, got int"),
        ("hello", "'messages' must be a list"),
        ([], "'messages' is empty"),
    ],
)
def test_malformed_conversations(messages, error):
    with pytest.raises(LLMCoreError, match=error.replace("(", r"\(")) as e:
        check_messages(messages, "data.jsonl: row 7")
    assert str(e.value).startswith("data.jsonl: row 7: ")


def test_alpaca_entry_becomes_two_turns():
    assert alpaca_to_messages({"instruction": "Add.", "input": "1 2", "output": "3"}) == [
        {"role": "user", "content": "Add.\n\n1 2"},
        {"role": "assistant", "content": "3"},
    ]
    assert alpaca_to_messages({"instruction": "Hi.", "input": "", "output": "Hello."})[0]["content"] == "Hi."


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama3-tiny"])
def test_added_tokens_get_mean_rows_and_old_ids_are_unchanged(preset):
    base_tok = Tokenizer.train(CORPUS, 280)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(
        preset, vocab_size=base_tok.vocab_size, context_length=32, emb_dim=32, n_layers=1, n_heads=2
    )
    model = GPT(cfg).eval()
    grown, tok = add_special_tokens(model, base_tok, CHAT_TOKENS)
    assert tok.vocab_size == base_tok.vocab_size + 2 and grown.cfg.vocab_size == tok.vocab_size
    assert tok.special_tokens[IM_START] == base_tok.vocab_size and tok.encode(CORPUS) == base_tok.encode(CORPUS)
    emb = grown.tok_emb.weight.detach()
    old = model.tok_emb.weight.detach()
    assert torch.allclose(emb[-2:], old.mean(0).expand(2, -1))
    ids = torch.tensor([base_tok.encode("The quick brown fox")])
    with torch.no_grad():
        assert torch.allclose(grown(ids).logits[..., : base_tok.vocab_size], model(ids).logits, atol=1e-5)
    assert add_special_tokens(grown, tok, CHAT_TOKENS) == (grown, tok)  # already there: nothing to do


def test_a_model_wider_than_its_tokenizer_keeps_its_width():
    """A model with spare rows (vocab_size above the tokenizer's, as GPT-2's 50257 rows padded to 50304) takes the
    new ids in its spare rows: they become the mean of the tokenizer's rows, the width stays."""
    base_tok = Tokenizer.train(CORPUS, 280)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("gpt2-tiny", vocab_size=300, context_length=32, emb_dim=32, n_layers=1, n_heads=2)
    model = GPT(cfg).eval()
    grown, tok = add_special_tokens(model, base_tok, CHAT_TOKENS)
    assert grown.cfg.vocab_size == 300 and tok.vocab_size == 282
    old = model.tok_emb.weight.detach()
    new = grown.tok_emb.weight.detach()
    assert torch.allclose(new[280:282], old[:280].mean(0).expand(2, -1))
    assert torch.equal(new[:280], old[:280]) and torch.equal(new[282:], old[282:])
