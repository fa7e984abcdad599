"""llmcore.data.instruct: split, template, collate (hand-built batches), loss, batching, responses and streaming.

Generation is tested on a scripted model (a real ``GPT`` whose logits force a given continuation), so the
tests check what happens to the text, through the real KV-cache decoding loop, without training anything.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmcore.common import LLMCoreError
from llmcore.data.instruct import Example, InstructionBatches, collate, encode_entries, eval_batches, split_entries
from llmcore.eval.instruct import evaluate_loss
from llmcore.models.config import ModelConfig
from llmcore.models.generate import SamplingConfig
from llmcore.models.gpt import GPT, ModelOutput
from llmcore.models.ops import IGNORE_INDEX
from llmcore.models.responses import generate_responses, stream_response
from llmcore.text.bpe import ENDOFTEXT, GPT2_PATTERN
from llmcore.text.prompts import check_template, extract_response, format_alpaca, format_prompt
from llmcore.text.tokenizer import Tokenizer

X = IGNORE_INDEX
EOT = 9  # the end-of-text id of the hand-built batches below
PAD = 9  # the book pads with the end-of-text id


def byte_tokenizer() -> Tokenizer:
    """256 single-byte tokens + <|endoftext|> (id 256): every multi-byte character spans several tokens."""
    return Tokenizer("bpe", "bytes", {ENDOFTEXT: 256}, ranks={bytes([b]): b for b in range(256)}, pattern=GPT2_PATTERN)


def entries(n: int) -> list[dict]:
    return [{"instruction": f"Say {i}.", "input": "" if i % 2 else f"n={i}", "output": f"{i}."} for i in range(n)]


# --- split and template ------------------------------------------------------------------------------


def test_split_book_proportions_seeded_and_disjoint() -> None:
    data = entries(1100)
    train, val, test = split_entries(data, 0.85, 0.10, seed=123)
    assert (len(train), len(val), len(test)) == (935, 55, 110)
    keys = [e["instruction"] for e in train + val + test]
    assert sorted(keys) == sorted(e["instruction"] for e in data)  # a partition: nothing lost or repeated
    assert split_entries(data, 0.85, 0.10, seed=123) == (train, val, test)
    other = split_entries(data, 0.85, 0.10, seed=124)
    assert other[2] != test
    assert train[:5] != data[:5]  # shuffled, not the file's order


@pytest.mark.parametrize("fractions", [(0.9, 0.1), (0.0, 0.1), (0.8, 0.25), (1.2, 0.1)])
def test_split_rejects_bad_fractions(fractions) -> None:
    with pytest.raises(LLMCoreError, match="train_fraction"):
        split_entries(entries(100), *fractions, seed=0)


def test_split_rejects_an_empty_part() -> None:
    with pytest.raises(LLMCoreError, match="empty split"):
        split_entries(entries(5), 0.85, 0.10, seed=0)


def test_templates() -> None:
    assert format_prompt("alpaca", "Add.", "1+1") == format_alpaca("Add.", "1+1")
    assert format_prompt("alpaca", "Add.").endswith("### Instruction:\nAdd.\n\n### Response:\n")
    custom = check_template("Q: {instruction} {input}\nA: ")
    assert format_prompt(custom, "Add.", "1+1") == "Q: Add. 1+1\nA: "
    with pytest.raises(LLMCoreError, match=r"instruct.template: unknown placeholder \{output\}"):
        check_template("{instruction} {output}")
    with pytest.raises(LLMCoreError, match=r"needs an \{instruction\}"):
        check_template("Q: {input}")
    with pytest.raises(LLMCoreError, match="not a valid format string"):
        check_template("Q: {instruction")


def test_encode_entries_prompt_output_eot() -> None:
    tok = byte_tokenizer()
    entry = {"instruction": "Echo.", "input": "", "output": "a<|endoftext|>b"}
    (ex,) = encode_entries([entry], tok, "alpaca")
    prompt = format_alpaca("Echo.")
    assert ex.prompt_len == len(prompt.encode())
    assert ex.ids == list((prompt + "a<|endoftext|>b").encode()) + [tok.eot_id]
    assert ex.ids.count(tok.eot_id) == 1  # a literal <|endoftext|> in the data is text, not the stop token


# --- collate on hand-built batches ---------------------------------------------------------------------


def test_collate_pads_shifts_and_ignores_padding_targets() -> None:
    batch = [Example([1, 2, 3, 4, EOT], 2), Example([5, 6, EOT], 1), Example([7, EOT], 1)]
    inputs, targets = collate(batch, pad_id=PAD)
    assert inputs.tolist() == [
        [1, 2, 3, 4],
        [5, 6, PAD, PAD],
        [7, PAD, PAD, PAD],
    ]
    # the first end-of-text stays a target (the model learns to stop); the padding after it is ignored
    assert targets.tolist() == [
        [2, 3, 4, EOT],
        [6, EOT, X, X],
        [EOT, X, X, X],
    ]
    assert inputs.dtype == targets.dtype == torch.long


def test_collate_every_pad_target_ignored_except_first_eot() -> None:
    batch = [Example([3, 1, 4, 1, 5, 8, 2, 6, EOT], 3)] + [Example([2] * n + [EOT], 1) for n in range(1, 8)]
    _, targets = collate(batch, pad_id=PAD)
    for row, e in zip(targets.tolist(), batch, strict=True):
        assert row.count(EOT) == 1  # exactly one end-of-text target per row ...
        first = row.index(EOT)
        assert first == len(e.ids) - 2  # ... at the end of the sequence ...
        assert all(t == X for t in row[first + 1 :])  # ... and nothing but ignored padding after it
        assert X not in row[:first]


def test_collate_pad_id_is_never_a_target() -> None:
    # with a pad id distinct from the end-of-text id, padding still never leaks into the targets
    inputs, targets = collate([Example([1, 2, EOT], 1), Example([1, EOT], 1)], pad_id=0)
    assert inputs.tolist() == [[1, 2], [1, 0]]
    assert targets.tolist() == [[2, EOT], [EOT, X]]


def test_collate_masks_prompt_targets() -> None:
    # prompt [1, 2, 3] + response [4, 5] + eot: only the response and its end-of-text are scored
    batch = [Example([1, 2, 3, 4, 5, EOT], 3), Example([6, 7, 8, EOT], 2)]
    inputs, targets = collate(batch, pad_id=PAD, mask_prompt=True)
    assert inputs.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, PAD, PAD]]
    assert targets.tolist() == [
        [X, X, 4, 5, EOT],
        [X, 8, EOT, X, X],
    ]
    unmasked = collate(batch, pad_id=PAD)[1]
    assert unmasked.tolist() == [[2, 3, 4, 5, EOT], [7, 8, EOT, X, X]]


def test_collate_truncates_to_max_length() -> None:
    batch = [Example([1, 2, 3, 4, 5, 6, EOT], 2), Example([7, 8, EOT], 1)]
    inputs, targets = collate(batch, pad_id=PAD, max_length=4)
    assert inputs.tolist() == [[1, 2, 3, 4], [7, 8, PAD, PAD]]
    assert targets.tolist() == [[2, 3, 4, 5], [8, EOT, X, X]]
    # a batch shorter than max_length is left as it is
    assert collate(batch, pad_id=PAD, max_length=100)[0].shape == (2, 6)
    # truncation inside a masked prompt leaves a row with nothing to score
    _, masked = collate([Example([1, 2, 3, 4, 5, EOT], 4)], pad_id=PAD, mask_prompt=True, max_length=2)
    assert masked.tolist() == [[X, X]]


def test_collate_rejects_empty_and_too_short() -> None:
    with pytest.raises(ValueError, match="empty batch"):
        collate([], pad_id=PAD)
    with pytest.raises(ValueError, match="two tokens"):
        collate([Example([EOT], 0)], pad_id=PAD)


# --- loss and batches ---------------------------------------------------------------------------------


def test_batches_cover_each_epoch_reshuffle_and_resume() -> None:
    examples = [Example([i, i + 1, EOT], 1) for i in range(10)]
    data = InstructionBatches(examples, batch_size=3, pad_id=PAD, seed=1)
    assert len(data) == 3
    epoch0 = [data.next_batch()[0][:, 0].tolist() for _ in range(3)]
    firsts = [x for b in epoch0 for x in b]
    assert len(set(firsts)) == 9  # 9 distinct examples, the ragged 10th dropped
    state = data.state_dict()
    epoch1 = [data.next_batch()[0][:, 0].tolist() for _ in range(3)]
    assert epoch1 != epoch0  # reshuffled
    resumed = InstructionBatches(examples, batch_size=3, pad_id=PAD, seed=1)
    resumed.load_state_dict(state)
    assert [resumed.next_batch()[0][:, 0].tolist() for _ in range(3)] == epoch1
    other_seed = InstructionBatches(examples, batch_size=3, pad_id=PAD, seed=2)
    assert [other_seed.next_batch()[0][:, 0].tolist() for _ in range(3)] != epoch0


def test_batches_in_order_and_split_over_ranks() -> None:
    examples = [Example([i, i + 1, EOT], 1) for i in range(10)]
    ordered = InstructionBatches(examples, batch_size=4, pad_id=PAD, shuffle=False)
    assert len(ordered) == 3  # every example once: the last batch is short
    assert [ordered.next_batch()[0][:, 0].tolist() for _ in range(4)] == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9],
        [0, 1, 2, 3],
    ]
    # two ranks together draw exactly what one process with the global batch draws
    whole = InstructionBatches(examples, batch_size=4, pad_id=PAD, seed=3)
    ranks = [InstructionBatches(examples, batch_size=2, pad_id=PAD, seed=3, rank=r, world_size=2) for r in (0, 1)]
    assert len(whole) == len(ranks[0]) == 2
    for _ in range(5):
        assert whole.next_batch()[0][:, 0].tolist() == [x for r in ranks for x in r.next_batch()[0][:, 0].tolist()]
    # evaluation over two ranks: a short last batch leaves rank 1 a stand-in row that scores nothing
    val = [
        InstructionBatches(examples[:9], batch_size=3, pad_id=PAD, shuffle=False, rank=r, world_size=2) for r in (0, 1)
    ]
    assert len(val[0]) == 2
    last = [(v.next_batch(), v.next_batch())[1] for v in val]
    assert last[0][0][:, 0].tolist() == [6, 7, 8] and (last[1][1] == X).all()
    with pytest.raises(LLMCoreError, match="fewer than one batch"):
        InstructionBatches(examples, batch_size=6, pad_id=PAD, world_size=2)


def test_group_by_length_pads_less() -> None:
    torch.manual_seed(0)
    examples = [Example([1] * int(n) + [EOT], 1) for n in torch.randint(2, 60, (64,))]

    def padding(group: bool) -> int:
        data = InstructionBatches(examples, batch_size=4, pad_id=0, seed=0, group_by_length=group)
        return sum(int((data.next_batch()[0] == 0).sum()) for _ in range(len(data)))

    assert padding(True) < padding(False) / 3


def test_evaluate_loss_is_token_weighted() -> None:
    torch.manual_seed(0)
    model = GPT(
        ModelConfig.from_preset("gpt2-tiny", vocab_size=16, context_length=16, emb_dim=16, n_layers=1, n_heads=2)
    )
    examples = [Example([1, 2, 3, 4, 5, 6, 7, EOT], 1), Example([3, EOT], 1)]
    per_batch = evaluate_loss(model, eval_batches(examples, 1, PAD))
    together = evaluate_loss(model, eval_batches(examples, 2, PAD))
    assert per_batch == pytest.approx(together, rel=1e-5)  # batching does not change the mean
    # = cross-entropy over the 8 real targets, padding excluded
    logits = torch.cat([model(torch.tensor([e.ids[:-1]])).logits[0] for e in examples])
    expected = F.cross_entropy(logits, torch.tensor([t for e in examples for t in e.ids[1:]]))
    assert per_batch == pytest.approx(expected.item(), rel=1e-5)
    assert model.training  # restored
    with pytest.raises(LLMCoreError, match="no target tokens"):
        evaluate_loss(model, eval_batches([Example([1, 2, 3, EOT], 3)], 1, PAD, mask_prompt=True, max_length=1))


# --- responses --------------------------------------------------------------------------------------


class ScriptedModel(GPT):
    """A GPT whose next token is dictated: row ``b`` emits ``scripts[b][k]`` at its ``k``-th generated step
    (end-of-text after the script). Goes through the real generation loop, KV cache and all."""

    def __init__(self, vocab_size: int, scripts: list[list[int]], eot: int):
        super().__init__(
            ModelConfig.from_preset(
                "gpt2-tiny", vocab_size=vocab_size, context_length=512, emb_dim=8, n_layers=1, n_heads=1
            )
        )
        self.scripts, self.eot, self.step, self.calls = scripts, eot, 0, 0

    def forward(self, idx, *, attention_mask=None, cache=None, **kwargs) -> ModelOutput:
        B, T = idx.shape
        if cache is None or cache.pos == 0:
            self.step = 0  # a new prompt (prefill)
        if cache is not None:
            cache.pos += T
        logits = torch.full((B, T, self.cfg.vocab_size), -1e9)
        for b in range(B):
            script = self.scripts[b % len(self.scripts)]
            logits[b, -1, script[self.step] if self.step < len(script) else self.eot] = 0.0
        self.step += 1
        self.calls += 1
        return ModelOutput(logits=logits)


def scripted(tok: Tokenizer, *texts: str) -> ScriptedModel:
    return ScriptedModel(tok.vocab_size, [tok.encode(t, allow_special=False) for t in texts], tok.eot_id)


GREEDY = SamplingConfig(max_new_tokens=200, temperature=0.0)


def test_response_is_only_the_answer_cut_at_a_new_section() -> None:
    tok = byte_tokenizer()
    continuation = "Paris is the capital.\n\n### Instruction:\nName another city.\n\n### Response:\nLyon"
    model = scripted(tok, continuation)
    prompt = format_alpaca("What is the capital of France?")
    (answer,) = generate_responses(model, tok, [prompt], GREEDY, stop_at_section=False)
    assert answer == "Paris is the capital."  # no prompt, no new section, no surrounding whitespace
    full_run = model.calls
    assert full_run == len(continuation.encode()) + 1  # ran to the end-of-text token

    (early,) = generate_responses(model, tok, [prompt], GREEDY, stop_at_section=True)
    assert early == answer
    assert model.calls - full_run == len("Paris is the capital.\n\n###")  # stopped at the marker


def test_responses_stop_at_eot_per_row_and_keep_order() -> None:
    tok = byte_tokenizer()
    # rows of a batch finish at different steps: at end-of-text, at a section, or at max_new_tokens
    model = scripted(tok, " Blue. ", "Red.\n### Input:\nx", "Green " * 50)
    prompts = [format_alpaca(f"Color {i}?") for i in range(3)]
    cfg = SamplingConfig(max_new_tokens=30, temperature=0.0)
    out = generate_responses(model, tok, prompts, cfg, batch_size=3)
    assert out == ["Blue.", "Red.", ("Green " * 5).strip()]
    # the same answers one prompt at a time (batched decoding changes nothing)
    singles = [
        generate_responses(scripted(tok, t), tok, [p], cfg)[0]
        for t, p in zip([" Blue. ", "Red.\n### Input:\nx", "Green " * 50], prompts, strict=True)
    ]
    assert singles == out


def test_responses_batched_by_length_come_back_in_order() -> None:
    tok = byte_tokenizer()

    class EchoLength(ScriptedModel):
        """Answers with the number of real tokens in its prompt, so an answer shows which prompt it got."""

        def forward(self, idx, *, attention_mask=None, cache=None, **kwargs):
            if cache is None or cache.pos == 0:
                n = attention_mask.sum(-1).tolist() if attention_mask is not None else [idx.shape[1]] * len(idx)
                self.scripts = [tok.encode(str(k)) for k in n]
            return super().forward(idx, attention_mask=attention_mask, cache=cache)

    model = EchoLength(tok.vocab_size, [[0]], tok.eot_id)
    prompts = ["a" * 30, "b" * 5, "c" * 17, "d" * 2, "e" * 11]
    assert generate_responses(model, tok, prompts, GREEDY, batch_size=2) == ["30", "5", "17", "2", "11"]


def test_stream_pieces_join_to_the_extracted_response() -> None:
    tok = byte_tokenizer()
    texts = [
        "  Café crème, naïve façade.\n\n### Instruction:\nmore",  # multi-byte chars split over byte tokens
        "Line one.\nLine two ## not a section\n#hash\n",
        "  ",
        "### Response: nothing",
        "Done.\n\n##",
        "日本語のテキスト  \n",
    ]
    for text in texts:
        model = scripted(tok, text)
        pieces = list(stream_response(model, tok, format_alpaca("Q?"), GREEDY))
        assert "".join(pieces) == extract_response(text), text
        assert all(pieces) and "\ufffd" not in "".join(pieces)  # never half a character


def test_stream_shows_text_before_the_end() -> None:
    tok = byte_tokenizer()
    model = scripted(tok, "Hello world, this is streamed.")
    seen_at_step = []
    for piece in stream_response(model, tok, "x", GREEDY):
        seen_at_step.append((model.calls, piece))
    assert len(seen_at_step) > 3  # pieces come as tokens arrive, not all at the end
    assert "".join(p for _, p in seen_at_step) == "Hello world, this is streamed."
