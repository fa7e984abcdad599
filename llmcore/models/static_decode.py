"""Compiled decoding: one token per row over a static-shape KV cache, compiled ahead of time and kept on disk.

A small model spends most of a decode step in Python and op launches, not arithmetic: on llama3-tiny (1M
parameters) an eager ``generate`` step costs 1-2 ms on the 2-core VM, of which each matmul is a few µs. The step here is
written with static shapes only, so it exports as one graph that inductor compiles (C++ on CPU) into a few fused
kernels driven from C++:

    cache   the caller's full-context buffers (B, n_kv_heads, context_length, head_dim) per layer, read through a
            view of a fixed width W (a bucket of the longest row, see :func:`width_for`);
    write   each row's new key/value lands at its own cache index ``slot[b]`` (a tensor, not a Python int);
    attend  over all W keys with a mask ``start[b] <= j <= slot[b]``, so rows of different lengths and left-padded
            rows share one graph; the row's position (RoPE or the learned table) is ``slot - start``;
    out     logits (B, vocab_size) and their argmax (greedy decoding needs no extra op).

The step reuses the model's modules; its weights are inputs of the compiled graph, not constants baked into it, so
in-place weight updates are seen and one graph serves every model of the same shape. It expects an eval-mode model
(no dropout) whose blocks are llmcore's own ``Block`` and ``CausalSelfAttention``. Prefill is eager
(``GPT.forward`` writes the same buffers), except in the serve engine of a narrow model, which compiles a prompt
pass as well (:meth:`StaticDecoder.prompt_step`: right-padded rows of any length, each written from its own cache
index; the engine's ``_compiled_prompts`` says when it pays). One graph per (width, batch 1 | batch >= 2 | prompt
pass, thread count): the batch dimension is dynamic above 1 (and the prompt pass's rows and tokens from 1), so the
serve engine's rows come and go without recompiling.

Compiled once per machine: each graph is exported (``torch.export``) and compiled ahead of time (AOTInductor) into a
package in :func:`cache_dir`, named by everything the compiled code depends on (torch version, CPU instruction set,
this code and the model's, the model's shapes, which linear layers run on oneDNN (:mod:`llmcore.models.packed`),
the batch mode, width and threads). Building one takes ~20 s on 2 cores for llama3-tiny, ~40 s at the 124M shape;
loading it in a later process takes milliseconds (no inductor import), and a step of a wide model runs without
the interpreter lock (:class:`_NativeStep`). Measured on the 2-core VM, 1 thread, 16-token prompts (``python -m
benchmarks.compiled_decode`` has the table): ``generate`` compiled over eager is 2x to 5.5x on llama3-tiny at batch 1
and less on wider models: once the matmuls dominate a step there is little launch overhead left to save, and the
fixed-width attention reads more keys than the eager step (the gpt2-124m shape: about even, both on oneDNN's
products). Hence the ``auto`` policy:

- the serve engine (:class:`llmcore.serve.engine.Engine`) compiles on CPU by default, in a background thread, and
  decodes eagerly until the graph is ready (a server runs long, and no request waits for the compiler; a cached
  graph is ready at once); then it times steps each way per batch size and width, compiled ones first, and keeps
  the faster: after ``EARLY_STEPS`` each when one way is ``CLEAR_MARGIN`` times faster, else after
  ``MEASURE_STEPS`` each;
- ``generate`` (and ``llmcore ask``, which streams through it) uses a graph that is cached on disk from its first
  step, and builds one only once the model's decode steps in this process, past and expected, reach
  ``COMPILE_AFTER_STEPS``; then it chooses by timing as the engine does. One ``ask`` answer (<= 256 steps, ~0.25 s)
  never waits for a build, but runs compiled once a server, a long run or ``ask --compiled-decode always`` built
  the graph for its shape;
- ``always`` (``LLMCORE_COMPILED_DECODE=always``, :func:`set_policy`, ``ask --compiled-decode``,
  ``Engine(compiled_decode=True)``) compiles at once and never times; ``never`` decodes eagerly;
- CUDA and other devices decode eagerly (CUDA graphs are another piece of work: a ``"cuda"`` entry in
  :data:`INDUCTOR_CONFIGS` plugs a device in); anything that cannot be compiled (no C++ compiler, a non-stock block,
  a failed build) decodes eagerly after one log line on the ``llmcore.decode`` logger.

Batch shapes (``--batch-shapes``, per decode step): one graph for batch 1 and one with a dynamic batch >= 2 per width,
not a graph per batch size (a static batch-8 package was 1-3% slower than the dynamic one at 8 rows, and would cost up
to ``max_batch`` builds) nor always ``max_batch`` rows (1 stream would pay for 8: 2.3x the step on llama3-tiny, 3.0x
at 124M).

The packages are native code that this process loads: they are built here, into the user's own cache folder, and
never downloaded. Reference: the static-cache decode recipe of pytorch-labs/gpt-fast (written anew for llmcore's
model), and PyTorch's AOTInductor.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
import time
import weakref
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llmcore.models.gpt import GPT, Block, CausalSelfAttention
from llmcore.models.packed import onednn_layout, onednn_linears

log = logging.getLogger("llmcore.decode")

POLICIES = ("auto", "always", "never")
POLICY_ENV = "LLMCORE_COMPILED_DECODE"
# ``auto`` builds a graph once a model's decode steps in this process (run + about to run) reach this many: a build
# (~20 s on 2 cores) over the saving per step (0.5-1 ms on llama3-tiny, 1 thread); later processes load it for free.
COMPILE_AFTER_STEPS = 20_000
# ``auto`` then times this many steps each way per (rows, width) and keeps the faster (compiled wins on small models,
# not always on bigger ones or full batches: see the module docstring); it decides after EARLY_STEPS each way when
# one way is CLEAR_MARGIN times faster than the other.
MEASURE_STEPS = 8
EARLY_STEPS = 2
CLEAR_MARGIN = 1.5
# Cache widths: the full context when it is short, else powers of two from MIN_WIDTH (attention reads W keys per
# row: at the 124M shape a 1024-wide cache costs +30% per step over a 128-wide one at batch 1, 2x at batch 8).
MIN_WIDTH = 256
# Ahead-of-time compile settings per device type (inductor's, for ``aoti_compile_and_package``); a device type missing
# here decodes eagerly. The step runs from C++ with no Python in between and no guards (decoder_for checks the
# model's structure itself, see _fingerprint). Weights are inputs, not constants: no faster as constants on CPU, and
# they would tie a package to one model and miss in-place weight updates.
INDUCTOR_CONFIGS: dict[str, dict[str, Any]] = {"cpu": {}}
CACHE_ENV = "LLMCORE_DECODE_CACHE"  # the folder of compiled steps (see cache_dir)
# Models with at least this many weights call their compiled steps without the interpreter lock (_load_package): a
# step of theirs takes milliseconds (the 124M shape: ~25 ms on 2 cores), during which a server's event loop runs.
RELEASE_LOCK_WEIGHTS = 1 << 24

_policy: str | None = None  # set_policy() over the environment variable
# One build at a time in a process: torch.export keeps its state in process-wide globals (two exports in flight,
# say the serve engines of two models compiling in the background, failed each other's builds).
_BUILD_LOCK = threading.Lock()


def set_policy(policy: str | None) -> None:
    """``auto`` | ``always`` | ``never`` for this process (None: back to ``$LLMCORE_COMPILED_DECODE``, else auto)."""
    global _policy
    if policy is not None and policy not in POLICIES:
        raise ValueError(f"compiled decode policy must be one of {'|'.join(POLICIES)}, got {policy!r}")
    _policy = policy


def policy() -> str:
    if _policy is not None:
        return _policy
    value = os.environ.get(POLICY_ENV, "auto").strip().lower()
    value = {"1": "always", "true": "always", "on": "always", "0": "never", "false": "never", "off": "never"}.get(
        value, value
    )
    return value if value in POLICIES else "auto"


def _clear(best_eager: float, best_compiled: float) -> bool:
    """Whether one way's best step is ``CLEAR_MARGIN`` times faster than the other's."""
    return max(best_eager, best_compiled) > CLEAR_MARGIN * min(best_eager, best_compiled)


def width_for(need: int, context_length: int) -> int:
    """The cache width a step attends over when rows hold up to ``need`` positions (the new token included)."""
    if context_length <= MIN_WIDTH:
        return context_length
    w = MIN_WIDTH
    while w < need:
        w *= 2
    return min(w, context_length)


def unsupported(model: torch.nn.Module) -> str | None:
    """Why ``model`` cannot use the compiled step (None if it can)."""
    if not isinstance(model, GPT):
        return f"{type(model).__name__} is not llmcore's GPT"
    device = model.tok_emb.weight.device
    if device.type not in INDUCTOR_CONFIGS:
        return f"compiled decode is set up for CPU only (device {device.type})"
    if device.type == "cpu" and not _cxx():
        return "no C++ compiler (inductor builds the CPU kernels with one; $CXX, g++, c++ or clang++)"
    for i, block in enumerate(model.blocks):
        if type(block) is not Block or type(block.attn) is not CausalSelfAttention:
            return f"block {i} is a {type(block).__name__}/{type(block.attn).__name__}, not the stock one"
    return None


@functools.cache
def _cxx() -> str | None:
    """A C++ compiler inductor can use (python:3.11-slim, the Docker image's base, has none)."""
    return next(filter(None, map(shutil.which, (os.environ.get("CXX", ""), "g++", "c++", "clang++"))), None)


def _fingerprint(model: GPT) -> tuple:
    """What the compiled graphs assume of ``model`` beyond its weights' values, which dynamo no longer guards (the
    guard filter above): the same module objects, parameters of the same identity, shape, dtype and device, and the same
    linear layers on oneDNN."""
    return (
        tuple(map(id, model.modules())),
        tuple((id(p), p.shape, p.dtype, p.device) for p in model.parameters()),
        onednn_layout(model),  # which products the graph runs on oneDNN (llmcore.models.packed)
    )


def _decode_step(
    model: GPT, k: list[torch.Tensor], v: list[torch.Tensor], ids: torch.Tensor, slot: torch.Tensor, start: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row: ids (B, 1) at cache index slot (B,), keys from start (B,) on -> logits (B, V), argmax (B,).

    ``k``/``v`` are per-layer (B, n_kv_heads, W, head_dim) cache views; the new keys/values are written into them.
    """
    B, W = ids.shape[0], k[0].shape[2]
    x, rope = model.embed(ids, (slot - start)[:, None])
    keys = torch.arange(W, device=ids.device)
    mask = ((keys >= start[:, None]) & (keys <= slot[:, None]))[:, None, None, :]  # (B, 1, 1, W)
    rows = torch.arange(B, device=ids.device)
    for i, block in enumerate(model.blocks):
        a = block.attn
        q, k_new, v_new = a.heads(block.norm1(x), rope)  # (B, nh | nkv, 1, hs)
        k[i][rows, :, slot] = k_new[:, :, 0]
        v[i][rows, :, slot] = v_new[:, :, 0]
        y = F.scaled_dot_product_attention(q, k[i], v[i], attn_mask=mask, enable_gqa=a.n_kv_heads != a.n_heads)
        x = x + a.proj(y.transpose(1, 2).reshape(B, 1, a.n_heads * a.head_dim))
        x = x + block.mlp(block.norm2(x))
    logits = model.head(model.final_norm(x))[:, -1]
    return logits, logits.argmax(-1)


def _prompt_step(
    model: GPT,
    k: list[torch.Tensor],
    v: list[torch.Tensor],
    ids: torch.Tensor,
    slot: torch.Tensor,
    start: torch.Tensor,
    last: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A prompt pass: ids (B, T), right-padded, written from cache index slot (B,) on, keys from start (B,) on ->
    logits (B, V) and argmax (B,) at each row's last real token ``last`` (B,), an index into T.

    Token t of row b lands at ``slot[b] + t`` and attends to keys ``start[b] .. slot[b] + t`` (the row's earlier
    chunks included); a padding token writes past the row's real length, where the next pass or step overwrites it.
    """
    B, T, W = ids.shape[0], ids.shape[1], k[0].shape[2]
    at = slot[:, None] + torch.arange(T, device=ids.device)  # (B, T) cache index of each token
    x, rope = model.embed(ids, at - start[:, None])
    keys = torch.arange(W, device=ids.device)
    mask = ((keys >= start[:, None, None]) & (keys <= at[:, :, None]))[:, None]  # (B, 1, T, W)
    rows = torch.arange(B, device=ids.device)[:, None]
    for i, block in enumerate(model.blocks):
        a = block.attn
        q, k_new, v_new = a.heads(block.norm1(x), rope)  # (B, nh | nkv, T, hs)
        k[i][rows, :, at] = k_new.transpose(1, 2)  # indexed as (B, T, nkv, hs)
        v[i][rows, :, at] = v_new.transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k[i], v[i], attn_mask=mask, enable_gqa=a.n_kv_heads != a.n_heads)
        x = x + a.proj(y.transpose(1, 2).reshape(B, T, a.n_heads * a.head_dim))
        x = x + block.mlp(block.norm2(x))
    logits = model.head(model.final_norm(x[rows[:, 0], last]))
    return logits, logits.argmax(-1)


class _Step(torch.nn.Module):
    """The decode step (or a prompt pass, given ``last``) as a module over the model: what
    :func:`torch.func.functional_call` swaps weights into."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, k, v, ids, slot, start, last=None):
        if last is None:
            return _decode_step(self.model, k, v, ids, slot, start)
        return _prompt_step(self.model, k, v, ids, slot, start, last)


class _WeightsAsInputs(torch.nn.Module):
    """What is compiled: the step with the model's parameters and buffers as inputs rather than constants, so one
    compiled package serves every model of the same shape (on disk, across processes) and sees in-place weight
    updates (no freezing)."""

    def __init__(self, model: GPT, names: list[str]):
        super().__init__()
        self._step = (_Step(model),)  # in a tuple: not a submodule, so export lifts none of its weights
        self.names = names

    def forward(self, weights: list[torch.Tensor], k, v, ids, slot, start, last=None):
        args = (k, v, ids, slot, start) if last is None else (k, v, ids, slot, start, last)
        return torch.func.functional_call(self._step[0], dict(zip(self.names, weights, strict=True)), args)


def _load_package(path: Path, release_lock: bool = False):
    """A compiled step from its package, as a function of the step's arguments returning (logits, argmax).

    ``release_lock``: the package's library is called through its C entry points (:class:`_NativeStep`), which lets
    go of the interpreter lock while the step runs: torch's loader holds it throughout, so a server's event loop
    could not parse a request or write a token during a step (25 ms at the 124M shape). That call costs ~75 us more
    (its tensors cross by ctypes), a quarter of a llama3-tiny step, hence only for wide models (see
    ``RELEASE_LOCK_WEIGHTS``). Otherwise, or where that fails (a package laid out otherwise by another torch),
    torch's C++ loader (3 ms; ``torch._inductor.aoti_load_package`` wraps the same loader but imports inductor first,
    about 1.5 s, which would cost a short ``ask`` more than compiled decoding saves it). The package's inputs are the
    step's arguments flattened in order."""
    if release_lock:
        try:
            return _NativeStep(path)
        except Exception as e:
            log.info("decode step %s through torch's loader (holds the interpreter lock): %s", path.name, e)
    loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)

    def step(weights, k, v, *rest):
        logits, tokens = loader.run([*weights, *k, *v, *rest])
        return logits, tokens

    return step


class _NativeStep:
    """A package's compiled library called through AOTInductor's C interface with ctypes, which releases the
    interpreter lock for the call. The library is unpacked once next to the package (``<package>.so``, whole or
    absent). Tensors cross as AOTInductor's tensor handles: the step takes ownership of the input handles made for
    it, the caller of the output handles it returns."""

    # prototypes of their own (setting argtypes on ctypes.pythonapi's attributes would change them for everyone)
    _capsule_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
        ("PyCapsule_GetPointer", ctypes.pythonapi)
    )
    _capsule = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p)(
        ("PyCapsule_New", ctypes.pythonapi)
    )

    def __init__(self, package: Path):
        library = package.with_suffix(".so")
        if not library.is_file() or library.stat().st_mtime < package.stat().st_mtime:  # none, or an older build's
            with zipfile.ZipFile(package) as archive:
                (member,) = [n for n in archive.namelist() if n.endswith(".wrapper.so")]
                partial = library.with_name(f".{library.name}.{os.getpid()}-{threading.get_ident()}.partial")
                try:
                    partial.write_bytes(archive.read(member))
                    os.replace(partial, library)
                finally:
                    partial.unlink(missing_ok=True)
        lib = ctypes.CDLL(str(library))
        lib.AOTInductorModelContainerCreateWithDevice.argtypes = [
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.c_size_t,
            ctypes.c_char_p,
            ctypes.c_char_p,
        ]
        handle = ctypes.c_void_p()
        if lib.AOTInductorModelContainerCreateWithDevice(ctypes.byref(handle), 1, b"cpu", None):
            raise RuntimeError(f"{library.name}: the compiled step does not start")
        weakref.finalize(self, lib.AOTInductorModelContainerDelete, handle)
        count = ctypes.c_size_t()
        if lib.AOTInductorModelContainerGetNumOutputs(handle, ctypes.byref(count)) or count.value != 2:
            raise RuntimeError(f"{library.name}: not a decode step (logits, tokens)")
        self._outputs = count.value
        self._run = lib.AOTInductorModelContainerRun
        pointer, size = ctypes.c_void_p, ctypes.c_size_t
        self._run.argtypes = [pointer, pointer, size, pointer, size, pointer, pointer]
        self._handle, self._lib = handle, lib

    def __call__(self, weights, k, v, *rest):
        tensors = [*weights, *k, *v, *rest]
        made = torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors(tensors)  # new handles, taken over by the step
        inputs = (ctypes.c_void_p * len(made))(*[self._capsule_pointer(h, None) for h in made])
        outputs = (ctypes.c_void_p * self._outputs)()
        if self._run(self._handle, inputs, len(made), outputs, self._outputs, None, None):
            raise RuntimeError("the compiled decode step failed")
        logits, tokens = torch._C._aoti.alloc_tensors_by_stealing_from_void_ptrs(
            [self._capsule(outputs[i], None, None) for i in range(self._outputs)]
        )
        return logits, tokens


def cache_dir() -> Path:
    """Where compiled decode steps are kept: ``$LLMCORE_DECODE_CACHE``, else ``$XDG_CACHE_HOME/llmcore/decode``
    (``~/.cache/llmcore/decode``). Each file is a shared library built on this machine for one model shape; delete
    the folder to rebuild them."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmcore" / "decode"


@functools.cache
def _code_digest() -> str:
    """The code a graph is traced from (the model and this step): a graph built from other code is not reused."""
    h = hashlib.sha256()
    for module in (sys.modules[GPT.__module__], sys.modules[onednn_layout.__module__], sys.modules[__name__]):
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()


def _step_weights(model: GPT) -> list[tuple[str, torch.Tensor]]:
    """The tensors a compiled step takes as weights, named, in order: parameters (tied ones once), then buffers."""
    step = _Step(model)
    return [*step.named_parameters(), *step.named_buffers()]


def _lower_onednn_linear() -> None:
    """Teach Inductor to compile ``llmcore::onednn_linear`` (llmcore.models.packed) into a direct call of oneDNN's
    product (the C function AOTInductor has for ``mkldnn._linear_pointwise``). Inductor's own lowering of that op takes
    only frozen weights; left to itself, it would call the operator's Python body, which takes the interpreter lock
    49 times a step at the 124M shape (a server's event loop holds it too)."""
    from torch._inductor import ir, lowering, mkldnn_ir

    op = torch.ops.llmcore.onednn_linear.default
    if op in lowering.lowerings:
        return

    @lowering.register_lowering(op)
    def _(x, weight, bias=None):
        size = x.get_size()
        flat = lowering.view(x, [-1, size[-1]]) if len(size) != 2 else x
        out = ir.TensorBox.create(mkldnn_ir.LinearUnary.create(flat, weight, bias, "none", [], ""))
        return lowering.view(out, [*size[:-1], out.get_size()[-1]]) if len(size) != 2 else out


class StaticDecoder:
    """The compiled decode step of one model (see the module docstring); get it with :func:`decoder_for`.

    ``step`` runs a compiled graph when one is ready for the batch and width and returns None otherwise (the caller
    then runs its eager step); ``compile`` loads one from the on-disk cache or builds it, in the calling thread or
    (``background=True``) in a worker thread on scratch buffers, so a server keeps decoding eagerly meanwhile.
    """

    def __init__(self, model: GPT, inductor_configs: dict[str, Any] | None = None):
        self._model = weakref.ref(model)
        self.name = f"GPT {model.cfg.n_layers}x{model.cfg.emb_dim} ({model.cfg.pos_emb} positions)"
        self.cfg, self.fingerprint = model.cfg, _fingerprint(model)
        self.onednn = onednn_layout(model)  # layers whose products the graph runs on oneDNN
        self.inductor_configs = dict(inductor_configs or {})
        # the tensors the graphs take as weights, in order: parameters (tied ones once), then buffers (RoPE's table)
        named = _step_weights(model)
        self._names = [n for n, _ in named]
        self._weights = [t.detach() for _, t in named]  # views of the same storage: in-place updates are seen
        self.release_lock = sum(t.numel() for t in self._weights) >= RELEASE_LOCK_WEIGHTS  # (see _load_package)
        c = model.cfg  # the strides of a cache view (a full-context buffer's), which the graph's indexing assumes
        self._layout = (c.n_kv_heads * c.context_length * c.head_dim, c.context_length * c.head_dim, c.head_dim, 1)
        self.eager_steps = 0  # decode steps run eagerly on this model (the ``auto`` policy's history)
        self.compiled_steps = 0  # decode steps run compiled
        self.prompt_passes = 0  # prompt passes run compiled
        self.loaded = 0  # graphs found in the on-disk cache (the rest were built)
        # (rows, width, threads) -> [best eager seconds, eager steps timed, best compiled seconds, compiled steps timed]
        self._timing: dict[tuple[int, int, int], list] = {}
        self.failed: str | None = None  # a compile or a compiled call failed: eager from then on
        self._steps: dict[tuple[str, int, int], Any] = {}  # (kind, width, threads) -> the loaded graph
        self._pending: set[tuple[str, int, int]] = set()
        self._lock = threading.Lock()

    # -- state ----------------------------------------------------------------------------------------

    def _key(self, n: int, width: int, prompt: bool = False) -> tuple[str, int, int]:
        """(kind, width, threads): kind is ``row1`` or ``rows`` (a decode step of one row, or of any n >= 2) or
        ``prompt`` (a prompt pass, any rows and tokens)."""
        return "prompt" if prompt else "rows" if n > 1 else "row1", width, torch.get_num_threads()

    def ready(self, n: int, width: int, prompt: bool = False) -> bool:
        return self.failed is None and self._key(n, width, prompt) in self._steps

    def package(self, n: int, width: int, prompt: bool = False) -> Path:
        """The cache file of the graph for ``n`` rows at ``width`` (``prompt``: the prompt pass's) with this
        process's thread count: named by what the compiled code depends on (torch, the CPU's instruction set, this
        code, the model's shapes and dtypes, the compile settings, the kind of graph, the width and the thread count
        its OpenMP loops were built for)."""
        kind, width, threads = self._key(n, width, prompt)
        h = hashlib.sha256()
        parts = (
            torch.__version__,
            torch.backends.cpu.get_cpu_capability(),
            platform.machine(),
            _code_digest(),
            repr(self.cfg),
            sorted(self.inductor_configs.items()),
            [(name, tuple(t.shape), str(t.dtype)) for name, t in zip(self._names, self._weights, strict=True)],
            self.onednn,
            kind,
            width,
            threads,
        )
        h.update(repr(parts).encode())
        return (
            cache_dir()
            / f"decode-{self.cfg.n_layers}x{self.cfg.emb_dim}-{kind}-w{width}-t{threads}-{h.hexdigest()[:16]}.pt2"
        )

    def _releases(self, kind: str) -> bool:
        """Whether a graph of ``kind`` runs without the interpreter lock: a wide model's steps, and every model's
        prompt passes (a millisecond or more each, where the native call's ~75 us are small change, and the
        server's event loop parses the requests arriving beside them)."""
        return self.release_lock or kind == "prompt"

    @property
    def prompt_pays(self) -> bool:
        """Whether the serve engine should run this model's prompts through the compiled pass: narrow models only. A
        wide model's eager pass is arithmetic in kernels that release the interpreter lock themselves, and batches
        multiply on the packed copies the graph does not have (the 124M shape, 2 threads: one 16-token prompt 55 ms
        compiled against 62 eager; eight, 245 against 210). On llama3-tiny a 16-token prompt took 1.0 ms compiled
        against 3.3 eager."""
        return not self.release_lock

    def _fail(self, what: str, e: BaseException) -> None:
        self.failed = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        log.warning("compiled decode of %s failed (%s): %s; decoding eagerly", self.name, what, self.failed)

    # -- compiling ------------------------------------------------------------------------------------

    def cached(self, n: int, width: int, prompt: bool = False) -> bool:
        """Whether the graph for ``n`` rows at ``width`` is ready or waits in the on-disk cache (milliseconds to
        load, where building it takes seconds)."""
        return self.ready(n, width, prompt) or (self.failed is None and self.package(n, width, prompt).is_file())

    def compile(self, n: int, width: int, background: bool = False, prompt: bool = False) -> bool:
        """Load or build the graph for ``n`` rows (1, or any n > 1) at ``width`` (``prompt``: the prompt pass's, for
        any rows); True once it is ready. In the background it returns at once (False until the worker is done; one
        worker at a time, a call while one runs does nothing)."""
        key = self._key(n, width, prompt)
        if self.failed is not None or key in self._steps:
            return self.failed is None
        with self._lock:
            if key in self._pending or (background and self._pending):  # one background compile at a time
                return False
            self._pending.add(key)
        if not background:
            self._compile(key, self.package(n, width, prompt))
            return self.ready(n, width, prompt)
        # Not a daemon: the interpreter waits for a compile in flight at exit (one killed mid-way aborts the process).
        worker = threading.Thread(
            target=self._compile, args=(key, self.package(n, width, prompt)), name=f"compile-decode-{width}"
        )
        worker.start()
        return False

    def _compile(self, key: tuple[str, int, int], path: Path) -> None:
        kind, width, threads = key
        rows = {"row1": "batch 1", "rows": "batch >= 2", "prompt": "prompt passes"}[kind]
        what = f"{rows}, width {width}, {threads} thread{'s' * (threads > 1)}"
        began = time.perf_counter()
        try:
            step, built = self._load(path, kind), False
            if step is None:
                with _BUILD_LOCK:
                    step = self._load(path, kind)  # built meanwhile by another decoder of this shape
                    if step is None:
                        torch.set_num_threads(threads)  # inductor's C++ loops are built for the threads they run at
                        step, built = self._build(key, path), True
        except Exception as e:  # no C++ compiler, an op inductor cannot lower, ...: eager from now on
            self._fail(f"compiling for {what}", e)
        else:
            if step is not None:
                how = "compiled" if built else "loaded"
                log.info("%s the decode step of %s for %s in %.1f s", how, self.name, what, time.perf_counter() - began)
                with self._lock:
                    self._steps[key] = step
                    self.loaded += not built
        with self._lock:
            self._pending.discard(key)

    def _load(self, path: Path, kind: str):
        """The graph of ``kind`` cached at ``path``, or None (none there, or one that does not load: rebuilt over
        it)."""
        if not path.is_file():
            return None
        try:
            return _load_package(path, self._releases(kind))
        except Exception as e:
            log.warning("cached decode step %s does not load (%s); building it anew", path, type(e).__name__)
            return None

    def _build(self, key: tuple[str, int, int], path: Path):
        """Export the step on scratch buffers laid out like the caches it will read (full-context buffers seen
        through width-wide views: the graph's index arithmetic assumes those strides), compile it ahead of time
        into a package under a temporary name, rename it into place and load it."""
        kind, width, _ = key
        model = self._model()
        if model is None:
            return None
        cfg, w = self.cfg, model.tok_emb.weight
        n, tokens = (1, 1) if kind == "row1" else (2, 1) if kind == "rows" else (2, 3)
        shape = (n, cfg.n_kv_heads, cfg.context_length, cfg.head_dim)
        k = [torch.zeros(shape, dtype=w.dtype, device=w.device)[:, :, :width] for _ in range(cfg.n_layers)]
        v = [torch.zeros(shape, dtype=w.dtype, device=w.device)[:, :, :width] for _ in range(cfg.n_layers)]
        ids = torch.zeros(n, tokens, dtype=torch.long, device=w.device)
        slot, start = torch.zeros(n, dtype=torch.long, device=w.device), torch.zeros_like(ids[:, 0])
        args: tuple = (self._weights, k, v, ids, slot, start)
        dynamic = None
        if kind != "row1":
            rows = torch.export.Dim("rows", min=1 if kind == "prompt" else 2, max=1 << 16)
            per_layer = [{0: rows}] * cfg.n_layers
            dynamic = [[None] * len(self._weights), per_layer, per_layer, {0: rows}, {0: rows}, {0: rows}]
        if kind == "prompt":  # any number of tokens a row, up to the width; the last real one's index per row
            args += (torch.full((n,), tokens - 1, dtype=torch.long, device=w.device),)
            dynamic[3] = {0: rows, 1: torch.export.Dim("tokens", min=1, max=width)}
            dynamic.append({0: rows})
        # Traced on a stand-in of the model's structure (weights on the meta device): functional_call swaps the traced
        # module's weights for tracing tensors while export runs, and the model itself may be decoding in another
        # thread meanwhile (the serve engine compiles in the background).
        with torch.device("meta"):
            shadow = GPT(self.cfg).eval()
        onednn_linears(shadow, packed_from=None, names=self.onednn)  # the model's products, traced as such
        shadow_names = [n for n, _ in _step_weights(shadow)]
        if shadow_names != self._names:
            raise ValueError(f"the model's weights {self._names} are not a stock GPT's ({shadow_names})")
        with torch.no_grad():
            program = torch.export.export(
                _WeightsAsInputs(shadow, self._names), args, dynamic_shapes=None if dynamic is None else tuple(dynamic)
            )
        from torch import _inductor as inductor  # (only a build needs it: loading a package does not import it)

        _lower_onednn_linear()
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.stem}.{os.getpid()}-{threading.get_ident()}.partial.pt2")  # (.pt2: aoti asks)
        try:
            inductor.aoti_compile_and_package(
                program, package_path=str(partial), inductor_configs=self.inductor_configs
            )
            os.replace(partial, path)  # whole or absent: a process that reads it never sees half a package
            path.with_suffix(".so").unlink(missing_ok=True)  # a library unpacked from a package built before
        finally:
            partial.unlink(missing_ok=True)
        return _load_package(path, self._releases(kind))

    # -- choosing by measurement ----------------------------------------------------------------------

    def prefer(self, n: int, width: int, policy_override: str | None = None) -> bool:
        """Whether a step of ``n`` rows at ``width`` should run compiled, its graph being ready. ``always``: yes.
        ``auto``: compiled steps first, then eager ones, timed (eager ones possibly before the graph was ready); once
        each way has run ``EARLY_STEPS`` and one is ``CLEAR_MARGIN`` times faster, or each has run ``MEASURE_STEPS``,
        the faster way stays for this process. (On llama3-tiny an eager step costs ~7x a compiled one: eight of them
        timed were ~15% of a 128-token answer.)"""
        if (policy_override or policy()) == "always":
            return True
        best_eager, n_eager, best_compiled, n_compiled = self._timing.get(
            (n, width, torch.get_num_threads()), (float("inf"), 0, float("inf"), 0)
        )
        if n_compiled < EARLY_STEPS or n_eager < EARLY_STEPS:
            return n_compiled < EARLY_STEPS
        if n_compiled >= MEASURE_STEPS and n_eager >= MEASURE_STEPS or _clear(best_eager, best_compiled):
            return best_compiled < best_eager
        return n_compiled < MEASURE_STEPS

    def record(self, n: int, width: int, compiled: bool, seconds: float) -> None:
        """Time one decode step (either way); the ``auto`` policy's evidence."""
        if not compiled:
            self.eager_steps += 1
        key = (n, width, torch.get_num_threads())
        t = self._timing.setdefault(key, [float("inf"), 0, float("inf"), 0])
        decided = self._decided(t)
        i = 2 if compiled else 0
        t[i], t[i + 1] = min(t[i], seconds), t[i + 1] + 1
        if not decided and self._decided(t):
            faster = "compiled" if t[2] < t[0] else "eager"
            log.log(
                logging.INFO if faster == "eager" else logging.DEBUG,
                "%s, %d rows, width %d: compiled step %.0f us, eager %.0f us (%d and %d timed): decoding %s",
                self.name,
                n,
                width,
                t[2] * 1e6,
                t[0] * 1e6,
                t[3],
                t[1],
                faster,
            )

    @staticmethod
    def _decided(t: list) -> bool:
        """Whether timings [best eager, eager steps, best compiled, compiled steps] settle the ``auto`` choice."""
        if t[1] < EARLY_STEPS or t[3] < EARLY_STEPS:
            return False
        return (t[1] >= MEASURE_STEPS and t[3] >= MEASURE_STEPS) or _clear(t[0], t[2])

    # -- running --------------------------------------------------------------------------------------

    @staticmethod
    def views(k: list[torch.Tensor], v: list[torch.Tensor], n: int, width: int) -> tuple[list, list]:
        """What :meth:`step` reads: the first ``n`` rows and ``width`` positions of per-layer cache buffers ``k``/``v``
        ((>= n, n_kv_heads, context_length, head_dim), a ``KVCache``'s or ``BatchedKVCache``'s), as views. Made once
        and reused step after step where the rows and width stay (no slicing of every layer per step)."""
        return [t[:n, :, :width] for t in k], [t[:n, :, :width] for t in v]

    def step(
        self, k: list[torch.Tensor], v: list[torch.Tensor], ids: torch.Tensor, slot: torch.Tensor, start: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Decode one token for each of ``n = len(ids)`` rows, or return None if no graph is ready for (n, width).

        Args:
            k: :meth:`views` of the cache's keys, (n, n_kv_heads, width, head_dim) per layer; width is
                :func:`width_for` the longest row, the new token included.
            v: the values, alike.
            ids: (n, 1) the rows' last tokens.
            slot: (n,) cache index each row writes its new key/value at (its length so far).
            start: (n,) first cache index each row attends to (left padding before it; zeros for a packed cache).

        Returns:
            (logits (n, vocab_size), argmax tokens (n,)); the keys/values are written, ``slot`` is not advanced.
        """
        n, width = ids.shape[0], k[0].shape[2]
        if not self.ready(n, width):
            return None
        if k[0].stride() != self._layout or k[0].dtype != self._weights[0].dtype:
            self._fail(
                "a decode step",
                ValueError(
                    f"cache views of strides {k[0].stride()}, {k[0].dtype}: the graph "
                    f"was built for {self._layout}, {self._weights[0].dtype}"
                ),
            )
            return None
        try:
            out = self._steps[self._key(n, width)](self._weights, k, v, ids, slot, start)
        except Exception as e:
            self._fail(f"a decode step at batch {n}, width {width}", e)
            return None
        self.compiled_steps += 1
        return out

    def prompt_step(
        self,
        k: list[torch.Tensor],
        v: list[torch.Tensor],
        ids: torch.Tensor,
        slot: torch.Tensor,
        start: torch.Tensor,
        last: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A prompt pass over ``n = len(ids)`` rows, or None if its graph is not ready at this width.

        Args:
            k: views of the cache's keys, (n, n_kv_heads, width, head_dim) per layer (the rows the prompts go to);
                width is :func:`width_for` the furthest position written, padding included.
            v: the values, alike.
            ids: (n, T) the prompts' tokens, right-padded to one length.
            slot: (n,) cache index of each row's first token (the length of what it holds already).
            start: (n,) first cache index each row attends to.
            last: (n,) index in T of each row's last real token.

        Returns:
            (logits (n, vocab_size), argmax (n,)) at each row's last real token; the keys/values are written.
        """
        width = k[0].shape[2]
        if not self.ready(len(ids), width, prompt=True):
            return None
        if k[0].stride() != self._layout or k[0].dtype != self._weights[0].dtype:
            self._fail("a prompt pass", ValueError(f"cache views of strides {k[0].stride()}, {k[0].dtype}"))
            return None
        try:
            out = self._steps[self._key(len(ids), width, prompt=True)](self._weights, k, v, ids, slot, start, last)
        except Exception as e:
            self._fail(f"a prompt pass of {tuple(ids.shape)} tokens, width {width}", e)
            return None
        self.prompt_passes += 1
        return out


_decoders: weakref.WeakKeyDictionary[GPT, StaticDecoder] = weakref.WeakKeyDictionary()
_refused: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()


def decoder_for(model: torch.nn.Module, policy_override: str | None = None) -> StaticDecoder | None:
    """The model's compiled decoder, made on first use; None (after one log line per model) where it cannot be used:
    the ``never`` policy (``policy_override``, else the process's), an unsupported model or device, or an earlier
    compile failure."""
    if (policy_override or policy()) == "never":
        return None
    reason = unsupported(model)
    decoder = _decoders.get(model) if reason is None else None
    if decoder is not None and decoder.fingerprint != _fingerprint(model):  # e.g. LoRA merged, or .to(bfloat16)
        log.info("the model behind %s changed (modules or parameters); compiling anew", decoder.name)
        decoder = None
    if reason is None and decoder is None:
        configs = INDUCTOR_CONFIGS[model.tok_emb.weight.device.type]
        decoder = _decoders[model] = StaticDecoder(model, configs)
    if decoder is not None and decoder.failed is not None:
        reason = f"an earlier compile failed ({decoder.failed})"
    if reason is None:
        return decoder
    if _refused.get(model) != reason:
        _refused[model] = reason
        log.info("compiled decode off for %s: %s; decoding eagerly", type(model).__name__, reason)
    return None


def pays(decoder: StaticDecoder, n: int, width: int, steps: int) -> bool:
    """Whether ``generate`` should have a graph for ``steps`` decode steps of ``n`` rows (see the module docstring);
    :meth:`StaticDecoder.prefer` then picks each step's way."""
    if decoder.cached(n, width) or policy() == "always":
        return True
    return decoder.eager_steps + steps >= COMPILE_AFTER_STEPS
