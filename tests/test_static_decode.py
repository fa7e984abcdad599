"""Compiled decoding (llmcore.models.static_decode): the same tokens as eager decoding, greedy and seeded sampling,
batch 1 and rows of different lengths, in ``generate`` and in the serve engine; one log line where it falls back;
the packages kept on disk and loaded by later processes and other models of the same shape.

Building a graph costs seconds, so the models are tiny, module-scoped and reused: four graphs in all (two families x
batch 1 and batch >= 2, the engine's model and the later process loading the llama ones), about a minute on 2 cores,
in the suite's own cache folder (conftest.py).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import queue
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from llmcore.models import packed, static_decode
from llmcore.models.config import ModelConfig
from llmcore.models.generate import SamplingConfig, generate
from llmcore.models.gpt import GPT, BatchedKVCache, Block
from llmcore.serve.engine import Engine, Finished, Request
from llmcore.text.tokenizer import Tokenizer

pytestmark = pytest.mark.timeout(300)

CTX = 64
CONFIGS = {
    # Llama parts plus every switch the step must honour: GQA, QK-norm, qkv bias, a padded vocabulary
    "llama": dict(
        preset="llama3-tiny", n_heads=4, n_kv_heads=2, hidden_dim=64, qk_norm=True, qkv_bias=True, pad_vocab_multiple=64
    ),
    "gpt2": dict(preset="gpt2-tiny", n_heads=2),  # learned positions, LayerNorm, GELU, tied head
}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train("the quick brown fox jumps over the lazy dog, again and again. " * 30, vocab_size=280)


@pytest.fixture(scope="module")
def models(tok) -> dict[str, GPT]:
    out = {}
    for name, c in CONFIGS.items():
        torch.manual_seed(0)
        overrides = {k: v for k, v in c.items() if k != "preset"}
        cfg = ModelConfig.from_preset(
            c["preset"], **overrides, vocab_size=tok.vocab_size, context_length=CTX, emb_dim=32, n_layers=2
        )
        out[name] = GPT(cfg).eval()
    return out


@pytest.fixture
def policy():
    """Set the process's compiled-decode policy for one test (conftest's default is ``never``)."""
    yield static_decode.set_policy
    static_decode.set_policy(None)


def prompts_of(n: int) -> list[list[int]]:
    torch.manual_seed(1)
    return [torch.randint(0, 250, (length,)).tolist() for length in (5, 2, 9, 14)[:n]]


def eager_and_compiled(model: GPT, prompts, cfg: SamplingConfig, policy) -> tuple[list, list]:
    policy("never")
    eager = generate(model, prompts, cfg)
    policy("always")
    before = static_decode.decoder_for(model).compiled_steps
    compiled = generate(model, prompts, cfg)
    assert static_decode.decoder_for(model).compiled_steps > before  # it did run compiled
    return eager, compiled


@pytest.mark.parametrize("rows", [1, 3], ids=["batch1", "ragged-batch"])
@pytest.mark.parametrize("family", list(CONFIGS))
def test_compiled_greedy_decoding_gives_the_eager_tokens(models, family, rows, policy) -> None:
    eager, compiled = eager_and_compiled(models[family], prompts_of(rows), SamplingConfig(24), policy)
    assert compiled == eager


@pytest.mark.parametrize("family", list(CONFIGS))
def test_compiled_seeded_sampling_gives_the_eager_tokens(models, family, policy) -> None:
    cfg = SamplingConfig(24, temperature=0.9, top_k=40, top_p=0.95, seed=7)
    eager, compiled = eager_and_compiled(models[family], prompts_of(3), cfg, policy)
    assert compiled == eager


def test_the_step_reads_the_current_weights(models, policy) -> None:
    """No freezing: an in-place weight update (a training step) is seen by the next compiled step."""
    model = models["llama"]
    w = model.blocks[0].mlp.proj.weight
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w.mul_(-3.0)
        eager, compiled = eager_and_compiled(model, prompts_of(1), SamplingConfig(16), policy)
        assert compiled == eager
    finally:
        with torch.no_grad():
            w.copy_(saved)


@pytest.mark.skipif(not packed.available(), reason="this torch has no oneDNN")
def test_a_model_on_onednn_compiles_its_products_into_the_graph(models, policy, monkeypatch) -> None:
    """Linear layers on oneDNN (llmcore.models.packed, which ``generate`` and the engine set up for wide layers) are
    traced as such: the compiled step calls oneDNN's product from C++ (no Python, no interpreter lock), decodes the
    eager tokens, and is a package of its own."""
    model = copy.deepcopy(models["llama"])
    plain = static_decode.decoder_for(model, "always")
    assert packed.onednn_linears(model, packed_from=None, min_elements=0) > 0
    decoder = static_decode.decoder_for(model, "always")
    assert decoder is not plain and decoder.package(1, CTX) != plain.package(1, CTX)  # a new decoder, a new graph
    assert decoder.onednn == packed.onednn_layout(model)
    eager, compiled = eager_and_compiled(model, prompts_of(1), SamplingConfig(16), policy)
    assert compiled == eager
    calls = []
    real = packed._product  # what the eager layers and the operator's Python body call
    monkeypatch.setattr(packed, "_product", lambda *a: calls.append(a[0].shape) or real(*a))
    before = decoder.compiled_steps
    generate(model, prompts_of(1), SamplingConfig(3))
    assert decoder.compiled_steps == before + 2 and len(calls) == len(decoder.onednn)  # the (eager) prefill's only


@pytest.mark.parametrize("family", list(CONFIGS))
def test_the_compiled_prompt_pass_writes_and_predicts_what_the_eager_one_does(models, family) -> None:
    """Right-padded rows of different lengths, then a second chunk after one row's first: the compiled pass writes
    the keys/values the eager forward writes at each row's real positions and gives its logits at the last one."""
    model = models[family]
    decoder = static_decode.StaticDecoder(model)
    assert decoder.compile(3, CTX, prompt=True), decoder.failed
    cfg = model.cfg
    eager, compiled = (BatchedKVCache(cfg, 3, CTX, "cpu", torch.float32) for _ in range(2))
    torch.manual_seed(3)
    lengths = [11, 4, 7]
    ids = torch.randint(0, 250, (3, max(lengths)))
    last = torch.tensor(lengths) - 1
    zeros = torch.zeros(3, dtype=torch.long)
    with torch.no_grad():
        hidden = model(ids, cache=eager.rows(0, 3), return_logits=False, return_hidden=True).hidden
        expected = model.head(hidden[torch.arange(3), last])
        logits, tokens = decoder.prompt_step(compiled.k, compiled.v, ids, zeros, zeros, last)
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
        assert tokens.tolist() == expected.argmax(-1).tolist()
        for layer in range(cfg.n_layers):
            for row, n in enumerate(lengths):
                torch.testing.assert_close(compiled.k[layer][row, :, :n], eager.k[layer][row, :, :n])
                torch.testing.assert_close(compiled.v[layer][row, :, :n], eager.v[layer][row, :, :n])
        more = torch.randint(0, 250, (1, 5))  # row 1 goes on from its 4 real tokens
        rows = eager.rows(1, 2)
        rows.lengths.fill_(lengths[1])
        expected = model(more, cache=rows, logits_to_keep=1).logits[:, -1]
        views = [t[1:2] for t in compiled.k], [t[1:2] for t in compiled.v]
        logits, _ = decoder.prompt_step(*views, more, torch.tensor([lengths[1]]), zeros[:1], torch.tensor([4]))
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
        for n, length in ((1, 1), (2, CTX)):  # the graph's shapes are dynamic: one token, the whole width
            fresh, reference = (BatchedKVCache(cfg, n, CTX, "cpu", torch.float32) for _ in range(2))
            ids = torch.randint(0, 250, (n, length))
            expected = model(ids, cache=reference, logits_to_keep=1).logits[:, -1]
            last = torch.full((n,), length - 1)
            logits, _ = decoder.prompt_step(fresh.k, fresh.v, ids, zeros[:n], zeros[:n], last)
            torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert decoder.prompt_passes == 4 and decoder.failed is None
    # a pass is long enough for the native call's cost: it runs without the interpreter lock, even on a narrow model
    assert not decoder.release_lock and isinstance(
        decoder._steps[decoder._key(1, CTX, prompt=True)], static_decode._NativeStep
    )


def run_jobs(engine: Engine, jobs) -> list[str]:
    sinks = [queue.Queue() for _ in jobs]
    for (ids, cfg), sink in zip(jobs, sinks, strict=True):
        engine.submit(Request(ids, cfg, sink.put))
    texts = []
    for sink in sinks:
        pieces = []
        while not isinstance(event := sink.get(timeout=60), Finished):
            pieces.append(event)
        texts.append("".join(pieces))
    return texts


def test_engine_compiles_in_the_background_and_decodes_on_its_own_cache(models, tok, policy) -> None:
    """The engine decodes eagerly while its graphs compile in a background thread, then compiled, its prompts too:
    rows of different lengths join, leave and move (copy_row), and each request gets what it gets alone from eager
    ``generate``."""
    model = GPT(models["llama"].cfg).eval()  # a model of its own: a decoder of its own, compiled by the engine
    model.load_state_dict(models["llama"].state_dict())
    engine = Engine(model, tok, max_batch=3, compiled_decode=True)
    decoder = engine._decoder
    torch.manual_seed(2)
    lengths, budgets = torch.randint(2, 20, (6,)).tolist(), torch.randint(3, 30, (6,)).tolist()
    jobs = [
        (torch.randint(0, 250, (n,)).tolist(), SamplingConfig(m, temperature=0.8 * (i % 2), seed=i))
        for i, (n, m) in enumerate(zip(lengths, budgets, strict=True))
    ]
    policy("never")
    expected = [tok.decode(generate(model, [ids], cfg)[0]) for ids, cfg in jobs]
    try:
        rounds = 0
        # eager rounds until the graphs are ready (which batch size comes first is the scheduler's business; the
        # prompt pass's after a decode step's)
        graphs = lambda: decoder.ready(1, CTX) and decoder.ready(2, CTX) and decoder.ready(1, CTX, prompt=True)  # noqa: E731
        while (decoder.compiled_steps < 20 or not graphs()) and rounds < 600:
            assert run_jobs(engine, jobs) == expected
            rounds += 1
        assert graphs() and engine.max_live > 1
        passes = decoder.prompt_passes
        assert run_jobs(engine, jobs) == expected
        assert decoder.prompt_passes > passes
    finally:
        engine.stop()
    policy("auto")  # the default of a server: both ways timed per batch size, the faster kept; the same tokens
    decoder._timing.clear()
    engine = Engine(model, tok, max_batch=3)
    try:
        for _ in range(3):
            assert run_jobs(engine, jobs) == expected
    finally:
        engine.stop()
    timed = [(t[1], t[3]) for t in decoder._timing.values()]  # (eager, compiled) steps timed per batch size
    assert any(eager >= static_decode.EARLY_STEPS and compiled > 0 for eager, compiled in timed), timed


def test_auto_times_both_ways_and_keeps_the_faster(models, policy, monkeypatch) -> None:
    """``auto`` with a graph ready: the first steps run eagerly and the next compiled, timed, within one call (the
    cache handed between the two ways), then the faster way stays; the tokens are the eager ones throughout."""
    model = models["llama"]
    prompts, cfg = prompts_of(3), SamplingConfig(30)
    policy("never")
    eager = generate(model, prompts, cfg)
    policy("auto")
    decoder = static_decode.decoder_for(model)
    assert decoder.ready(3, CTX)  # (compiled by the tests above)
    decoder._timing.clear()
    before = decoder.compiled_steps
    assert generate(model, prompts, cfg) == eager
    best_eager, n_eager, best_compiled, n_compiled = decoder._timing[3, CTX, torch.get_num_threads()]
    assert n_eager >= static_decode.EARLY_STEPS and n_compiled == decoder.compiled_steps - before > 0
    # both ways timed until one was clearly faster or each ran MEASURE_STEPS; then the faster one ran to the end
    clear = static_decode._clear(best_eager, best_compiled)
    assert clear or min(n_eager, n_compiled) >= static_decode.MEASURE_STEPS, decoder._timing
    assert decoder.prefer(3, CTX) == (best_compiled < best_eager)
    key = 3, CTX, torch.get_num_threads()
    decoder._timing[key] = [1.0, 8, 2.0, 8]  # a model where compiled is slower
    assert not decoder.prefer(3, CTX) and decoder.prefer(3, CTX, "always")
    # the order: compiled steps first, then eager ones; after two each a clear winner stays, a close race goes on
    for timing, compiled_next in [
        ([float("inf"), 0, float("inf"), 0], True),
        ([float("inf"), 0, 1.0, 2], False),
        ([3.0, 2, 1.0, 2], True),  # 3x: decided
        ([1.0, 2, 3.0, 2], False),  # eager 3x faster: decided
        ([1.2, 2, 1.0, 2], True),  # close: compiled until MEASURE_STEPS, then eager
        ([1.2, 2, 1.0, static_decode.MEASURE_STEPS], False),
        ([1.2, static_decode.MEASURE_STEPS, 1.0, static_decode.MEASURE_STEPS], True),
    ]:
        decoder._timing[key] = timing
        assert decoder.prefer(3, CTX) == compiled_next, timing


def test_auto_compiles_once_the_decode_steps_pay_for_it(models, tmp_path, monkeypatch) -> None:
    decoder = static_decode.decoder_for(models["gpt2"], "auto")
    assert decoder.compile(1, CTX)  # (compiled by the tests above already)
    assert decoder.ready(1, CTX) and static_decode.pays(decoder, 1, CTX, 1)  # compiled already: free
    assert static_decode.pays(static_decode.StaticDecoder(models["gpt2"]), 1, CTX, 1)  # on disk: milliseconds away
    monkeypatch.setenv(static_decode.CACHE_ENV, str(tmp_path))  # a machine that never built this shape
    fresh = static_decode.StaticDecoder(models["gpt2"])
    assert not static_decode.pays(fresh, 1, CTX, 256)  # one `ask` answer: eager
    fresh.eager_steps = static_decode.COMPILE_AFTER_STEPS - 100
    assert static_decode.pays(fresh, 1, CTX, 100)  # a process that keeps decoding: compile


def test_a_model_of_the_same_shape_loads_the_step_from_disk(models, policy, monkeypatch) -> None:
    """The weights are the step's inputs: another model of the same shape (another checkpoint, or the same one in a
    later process) loads the package built for the first, in milliseconds, and decodes its own tokens with it. A
    wide model's step is called without the interpreter lock (a small one's through torch's loader, which is quicker
    to call); here the threshold is lowered so the tiny model takes the wide models' way."""
    assert not static_decode.StaticDecoder(models["llama"]).release_lock
    monkeypatch.setattr(static_decode, "RELEASE_LOCK_WEIGHTS", 0)
    torch.manual_seed(5)
    other = GPT(models["llama"].cfg).eval()  # the same shape, other weights
    policy("never")
    eager = generate(other, prompts_of(1), SamplingConfig(24))
    decoder = static_decode.decoder_for(other, "always")
    assert decoder.package(1, CTX).is_file() and decoder.cached(1, CTX)  # (built by the tests above)
    assert decoder.compile(1, CTX) and decoder.loaded == 1
    # called through the library's C interface, which lets go of the interpreter lock while a step runs
    assert isinstance(decoder._steps[decoder._key(1, CTX)], static_decode._NativeStep)
    assert decoder.package(1, CTX).with_suffix(".so").is_file()  # (unpacked once, next to the package)
    policy("always")
    assert generate(other, prompts_of(1), SamplingConfig(24)) == eager
    assert decoder.compiled_steps > 0


def test_a_package_the_native_call_cannot_open_runs_through_torchs_loader(models, policy, monkeypatch, caplog):
    """The C-interface call depends on the package's layout, which is torch's; another layout falls back to torch's
    own loader (which holds the interpreter lock), with a log line, and decodes the same tokens."""
    model = copy.deepcopy(models["llama"])
    policy("never")
    eager = generate(model, prompts_of(1), SamplingConfig(16))

    def refuse(path):
        raise KeyError("no .wrapper.so member")

    monkeypatch.setattr(static_decode, "_NativeStep", refuse)
    monkeypatch.setattr(static_decode, "RELEASE_LOCK_WEIGHTS", 0)
    decoder = static_decode.decoder_for(model, "always")
    with caplog.at_level(logging.INFO, logger="llmcore.decode"):
        assert decoder.compile(1, CTX)  # (built by the tests above: loaded from disk)
    assert "through torch's loader" in caplog.text
    policy("always")
    assert generate(model, prompts_of(1), SamplingConfig(16)) == eager and decoder.compiled_steps > 0


def test_the_library_is_unpacked_again_from_a_newer_package(tmp_path) -> None:
    """The step's library is unpacked next to its package once, and again when the package is newer (built anew)."""
    package = tmp_path / "decode-2x32-row1-w64-t1-0.pt2"

    def write(library: bytes) -> None:
        with zipfile.ZipFile(package, "w") as archive:
            archive.writestr("p/data/aotinductor/model/abc.wrapper.so", library)

    write(b"first build")
    with pytest.raises(OSError):  # (not a real library: ctypes refuses it, after it was unpacked)
        static_decode._NativeStep(package)
    assert package.with_suffix(".so").read_bytes() == b"first build"
    os.utime(package.with_suffix(".so"), (1, 1))  # unpacked long before the package below was built
    write(b"second build")
    with pytest.raises(OSError):
        static_decode._NativeStep(package)
    assert package.with_suffix(".so").read_bytes() == b"second build"
    assert sorted(p.name for p in tmp_path.iterdir()) == [package.name, package.with_suffix(".so").name]


def test_a_later_process_loads_the_step_and_decodes_the_same_tokens(models, tok, policy, tmp_path) -> None:
    """Compile once per machine: a new interpreter finds the package this one built, loads it without building and
    decodes what this process decodes eagerly."""
    model = models["llama"]
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    policy("never")
    eager = generate(model, prompts_of(1), SamplingConfig(24))
    script = f"""
import json, torch
from llmcore.models import packed, static_decode
from llmcore.models.config import ModelConfig
from llmcore.models.generate import SamplingConfig, generate
from llmcore.models.gpt import GPT
torch.set_num_threads({torch.get_num_threads()})
model = GPT(ModelConfig(**{model.cfg.__dict__!r})).eval()
model.load_state_dict(torch.load({str(tmp_path / "weights.pt")!r}, weights_only=True))
tokens = generate(model, {prompts_of(1)!r}, SamplingConfig(24))
decoder = static_decode.decoder_for(model)
print(json.dumps({{"tokens": tokens, "loaded": decoder.loaded, "compiled_steps": decoder.compiled_steps}}))
"""
    env = {**os.environ, static_decode.POLICY_ENV: "auto"}  # the default: a cached step pays at once
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["loaded"] == 1 and out["compiled_steps"] > 0 and out["tokens"] == eager


def test_packages_are_named_by_what_they_were_built_for(models, tmp_path, monkeypatch) -> None:
    decoder = static_decode.StaticDecoder(models["llama"])
    names = {decoder.package(1, CTX), decoder.package(3, CTX), decoder.package(1, 32)}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)  # OpenMP loops are built for a thread count
        names.add(decoder.package(1, CTX))
    finally:
        torch.set_num_threads(threads)
    names.add(static_decode.StaticDecoder(models["gpt2"]).package(1, CTX))
    assert len(names) == 5 and decoder.package(2, CTX) == decoder.package(3, CTX)  # any batch >= 2: one graph
    monkeypatch.setenv(static_decode.CACHE_ENV, str(tmp_path))
    assert decoder.package(1, CTX).parent == tmp_path


def test_a_package_that_does_not_load_is_built_anew(models, tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setenv(static_decode.CACHE_ENV, str(tmp_path))
    decoder = static_decode.StaticDecoder(models["llama"])
    decoder.package(1, CTX).write_bytes(b"not a package")  # cut short by a full disk, say
    built = []
    monkeypatch.setattr(decoder, "_build", lambda key, path: built.append(path) or (lambda *args: None))
    with caplog.at_level(logging.WARNING, logger="llmcore.decode"):
        assert decoder.compile(1, CTX)
    assert built == [decoder.package(1, CTX)] and "does not load" in caplog.text and decoder.loaded == 0


def test_a_build_leaves_the_package_whole_or_absent(models, tmp_path, monkeypatch) -> None:
    """The package is written under a temporary name and renamed: a build that fails leaves nothing behind."""
    monkeypatch.setenv(static_decode.CACHE_ENV, str(tmp_path))
    model = GPT(models["gpt2"].cfg).eval()
    decoder = static_decode.StaticDecoder(model)

    def fail_midway(program, package_path, **kwargs):
        Path(package_path).write_bytes(b"half a package")
        raise RuntimeError("killed")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", fail_midway)
    assert not decoder.compile(1, CTX) and decoder.failed == "RuntimeError: killed"
    assert list(tmp_path.iterdir()) == []


def test_a_changed_model_gets_a_new_decoder(models, caplog) -> None:
    """The graphs skip dynamo's guards on the model's modules; the decoder checks the structure itself instead."""
    from llmcore.models.lora import apply_lora

    model = GPT(models["gpt2"].cfg).eval()
    first = static_decode.decoder_for(model, "auto")
    assert static_decode.decoder_for(model, "auto") is first
    apply_lora(model, rank=2, alpha=4)
    with caplog.at_level(logging.INFO, logger="llmcore.decode"):
        second = static_decode.decoder_for(model, "auto")
    assert second is not first and "changed (modules or parameters); compiling anew" in caplog.text


def test_width_buckets() -> None:
    assert static_decode.width_for(10, 128) == 128  # short contexts: one width
    assert [static_decode.width_for(n, 1024) for n in (1, 256, 257, 600, 1024)] == [256, 256, 512, 1024, 1024]


def test_fallbacks_decode_eagerly_with_one_log_line(models, policy, caplog, monkeypatch, tmp_path) -> None:
    policy("always")
    odd = GPT(models["gpt2"].cfg).eval()
    odd.blocks[0].__class__ = type("MyBlock", (Block,), {})
    prompts, cfg = prompts_of(1), SamplingConfig(4)
    with caplog.at_level(logging.INFO, logger="llmcore.decode"):
        generate(odd, prompts, cfg)
        generate(odd, prompts, cfg)  # logged once per model
    lines = [r.getMessage() for r in caplog.records if r.name == "llmcore.decode"]
    assert lines == [
        "compiled decode off for GPT: block 0 is a MyBlock/CausalSelfAttention, not the stock one; decoding eagerly"
    ]

    caplog.clear()  # no C++ compiler on the PATH (the Docker image): off from the start
    monkeypatch.setattr(static_decode, "_cxx", lambda: None)
    with caplog.at_level(logging.INFO, logger="llmcore.decode"):
        generate(GPT(models["gpt2"].cfg).eval(), prompts, cfg)
    assert "no C++ compiler" in caplog.text
    monkeypatch.undo()

    caplog.clear()  # a compile that fails anyway (an op inductor cannot lower, say): a warning, then eager tokens
    broken = GPT(models["gpt2"].cfg).eval()
    monkeypatch.setenv(static_decode.CACHE_ENV, str(tmp_path))  # nothing cached: it builds

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\ndetails")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", no_compiler)
    with caplog.at_level(logging.INFO, logger="llmcore.decode"):
        tokens = generate(broken, prompts, cfg)
    policy("never")
    assert tokens == generate(broken, prompts, cfg)
    lines = [r.getMessage() for r in caplog.records if r.name == "llmcore.decode"]
    assert len(lines) == 1 and "failed" in lines[0], lines
    assert lines[0].endswith("RuntimeError: no C++ compiler found; decoding eagerly")  # one line of the error


def test_a_build_leaves_the_model_alone_while_it_decodes(models, tmp_path, monkeypatch) -> None:
    """The serve engine builds in a background thread while the model decodes eagerly: tracing must not swap the
    model's own weights for tracing tensors (it traces a stand-in on the meta device)."""
    monkeypatch.setenv(static_decode.CACHE_ENV, str(tmp_path))
    model = GPT(models["gpt2"].cfg).eval()
    weights = {name: p for name, p in model.named_parameters()}
    seen = []
    real_export = torch.export.export

    def export_and_look(*args, **kwargs):
        def look(*a, **k):
            seen.append({name: p for name, p in model.named_parameters()} == weights)
            return real_trace(*a, **k)

        real_trace = torch.nn.Linear.forward
        monkeypatch.setattr(torch.nn.Linear, "forward", look)
        try:
            return real_export(*args, **kwargs)
        finally:
            monkeypatch.setattr(torch.nn.Linear, "forward", real_trace)

    monkeypatch.setattr(torch.export, "export", export_and_look)
    decoder = static_decode.StaticDecoder(model)
    assert decoder.compile(1, CTX), decoder.failed
    assert seen and all(seen)  # during the trace, the model kept its own parameters
    assert all(p is weights[name] for name, p in model.named_parameters())


def test_builds_of_two_models_run_one_after_the_other(models, tmp_path, monkeypatch) -> None:
    """torch.export keeps process-wide state: two serve engines compiling in the background at once failed each
    other's exports. Builds take turns; a decoder that waited loads what the other built for its shape."""
    import threading
    import time

    monkeypatch.setenv(static_decode.CACHE_ENV, str(tmp_path))
    in_flight, most, built = [0], [0], []
    real_build = static_decode.StaticDecoder._build

    def build(self, key, path):
        in_flight[0] += 1
        most[0] = max(most[0], in_flight[0])
        time.sleep(0.3)  # long enough for the other worker to reach the build
        in_flight[0] -= 1
        built.append(self.name)
        return real_build(self, key, path)

    monkeypatch.setattr(static_decode.StaticDecoder, "_build", build)
    # two of the same shape (one package between them) and another; the decoders hold their models weakly
    kept = [GPT(models[family].cfg).eval() for family in ("gpt2", "gpt2", "llama")]
    decoders = [static_decode.StaticDecoder(m) for m in kept]
    for d in decoders:
        assert not d.compile(1, CTX, background=True)
    for worker in [t for t in threading.enumerate() if t.name.startswith("compile-decode")]:
        worker.join(timeout=240)
    assert [d.failed for d in decoders] == [None] * 3 and all(d.ready(1, CTX) for d in decoders)
    assert most[0] == 1 and len(built) == 2  # one build per shape, never two at once
