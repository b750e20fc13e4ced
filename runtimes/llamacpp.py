"""The llama.cpp LLM backend: a GGUF model driven through llama-cpp-python's ctypes layer (`llama_cpp.llama_*`).

Image embeddings enter as rows of a `llama_batch` whose `embd` buffer is filled directly (edge-deployment.md
section 2); token ids use a token batch. One llama.cpp context holds up to `n_seq_max` sequences in a unified KV
cache, so `fork` is a cheap `llama_memory_seq_cp` of a shared prefix.

TRAP (section 2): one `llama_decode` call with more rows than `n_batch` aborts the whole process instead of returning
an error, so every prefill here is split into chunks of at most `n_batch` rows.

    with LlamaCppLLM("bundle/llm/model.q4_k_m.gguf", n_ctx=2048) as llm:
        logits = llm.prefill(0, tokens=prompt_ids)           # (V,) float32, last position
        logits = llm.prefill(0, embeds=image_rows)           # (n, H) rows, e.g. 576 image tokens
        out = llm.decode({0: next_token})                    # {0: (V,) logits}
"""
from __future__ import annotations

import ctypes
import os
import sys
import threading
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from runtimes.base import Counters
from sqllava_edge.errors import BackendUnavailableError, PromptTooLongError

INSTALL_HINT = "pip install llama-cpp-python (or pip install 'sqllava-edge[cpu]')"
KV_TYPES = {"f32": 0, "f16": 1}  # ggml_type ids of the KV cache element types llama.cpp accepts for both K and V
_DECODE_ERRORS = {1: "no free KV cache slot (the context is full: release sequences or raise n_ctx)",
                  2: "aborted", -1: "invalid batch"}

_log_state: dict[str, object] = {}  # the ctypes log callback must stay referenced while llama.cpp may call it
_backend_ready = threading.Lock()


def import_llama_cpp():
    """Import llama_cpp or raise BackendUnavailableError saying how to install it."""
    try:
        import llama_cpp
    except (ImportError, OSError) as exc:  # OSError: the package is there but its shared library does not load
        raise BackendUnavailableError(f"the llama.cpp backend needs llama-cpp-python ({exc}); install it: {INSTALL_HINT}") from None
    if not hasattr(llama_cpp, "llama_memory_seq_cp"):
        raise BackendUnavailableError(
            f"llama-cpp-python {llama_cpp.__version__} is too old (no llama_memory_* API); upgrade: "
            "pip install -U 'llama-cpp-python>=0.3.16'")
    return llama_cpp


def set_llama_logging(verbose: bool = False) -> None:
    """Route llama.cpp's (and ggml's) log lines to stderr when verbose, else drop them. Process-wide in llama.cpp."""
    llama_cpp = import_llama_cpp()
    key = "verbose" if verbose else "silent"
    if _log_state.get("mode") == key:
        return

    def write(level: int, text: bytes, user_data) -> None:
        if verbose and text:
            sys.stderr.write(text.decode("utf-8", errors="replace"))

    callback = llama_cpp.llama_log_callback(write)
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    _log_state.update(mode=key, callback=callback)


def cpu_has_amx() -> bool:
    """True if /proc/cpuinfo lists Intel AMX (Linux x86 only; False elsewhere)."""
    from runtimes.device_facts import cpu_flags, read_cpuinfo

    return "amx_int8" in cpu_flags(read_cpuinfo())


class _LlamaHandles:
    """Owns the native model, context and the two reusable batches; close() frees them exactly once."""

    def __init__(self, llama_cpp, path: Path, n_ctx: int, n_batch: int, n_seq_max: int, n_threads: int,
                 n_gpu_layers: int, kv_type: str, extra_buffers: bool, flash_attn: bool | None,
                 n_threads_batch: int, n_ubatch: int, main_gpu: int):
        self.lib = llama_cpp
        self.model = self.ctx = self.token_batch = self.embd_batch = None
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = n_gpu_layers
        # One GPU, the one the memory plan checked: llama.cpp's default splits the layers over every visible GPU.
        # (A CPU-only build has no GPU devices and ignores both.)
        model_params.split_mode = llama_cpp.LLAMA_SPLIT_MODE_NONE
        model_params.main_gpu = main_gpu
        model_params.use_extra_bufts = extra_buffers
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params)
        if not self.model:
            raise ValueError(f"llama.cpp could not load {path}: not a valid GGUF for this llama.cpp build "
                             "(re-export it with python -m export.gguf, or run with verbose=True to see why)")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = n_ctx, n_batch, n_ubatch, n_seq_max
        params.n_threads, params.n_threads_batch = n_threads, n_threads_batch
        params.type_k = params.type_v = KV_TYPES[kv_type]
        if flash_attn is not None:
            params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.kv_unified = True  # one KV buffer for all sequences: n_ctx is shared, and seq_cp shares prefix cells
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            self.close()
            raise MemoryError(f"llama.cpp could not create a context with n_ctx={n_ctx} for {path}; lower n_ctx")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_embd = llama_cpp.llama_model_n_embd(self.model)
        self.token_batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self.embd_batch = llama_cpp.llama_batch_init(n_batch, self.n_embd, 1)

    def close(self) -> None:
        lib = self.lib
        for name, free in (("token_batch", lib.llama_batch_free), ("embd_batch", lib.llama_batch_free),
                           ("ctx", lib.llama_free), ("model", lib.llama_model_free)):
            handle = getattr(self, name)
            if handle is not None:
                setattr(self, name, None)
                free(handle)


class LlamaCppLLM:
    """LLMBackend over a GGUF file. Sequences are ids 0..n_seq_max-1 sharing one context of n_ctx positions.

    kv_type: KV cache element type ("f16" halves its memory; "f32" for exact comparisons with PyTorch).
    flash_attn: None lets llama.cpp decide (it enables it on CPU, where it computes attention in f16: logits move by
    ~1e-3); False + kv_type "f32" gives PyTorch's f32 logits to ~1e-6.
    extra_buffers: llama.cpp's CPU weight-repacking buffer types (AMX, AArch64 repack). Default: on, except on CPUs
    with Intel AMX, where llama.cpp 0.3.36's AMX matmul kernels were seen to kill the process with SIGILL
    (`tilezero` in ggml_backend_amx_mul_mat, on a VM whose kernel grants AMX); pass True to force them.
    n_threads: threads for a single-token step (decode); n_threads_batch: threads for a batch of more tokens (prefill,
    a batched decode of several sequences); None = n_threads. llama.cpp picks by the batch's token count.
    n_ubatch: rows llama.cpp computes per graph run inside one call of up to n_batch rows (its micro-batch); None =
    n_batch. On a CPU a smaller micro-batch can prefill faster (its activations stay in cache); runtimes.tune measures.
    main_gpu: the CUDA device (CUDA's numbering, after CUDA_VISIBLE_DEVICES) that holds every offloaded layer; the
    model is never split over several GPUs (split_mode NONE), so it lands where the memory plan looked.
    verbose: route llama.cpp's log lines to stderr (process-wide), else they are dropped.
    """

    name = "llama.cpp"

    def __init__(self, gguf_path: str | os.PathLike, n_ctx: int = 2048, n_threads: int | None = None,
                 n_gpu_layers: int = 0, n_batch: int = 512, n_seq_max: int = 4, *, kv_type: str = "f16",
                 flash_attn: bool | None = None, extra_buffers: bool | None = None, verbose: bool = False,
                 n_threads_batch: int | None = None, n_ubatch: int | None = None, main_gpu: int = 0):
        self._lock = threading.RLock()  # one llama.cpp context must not be driven by two threads at once
        path = Path(gguf_path)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist; export one with: python -m export.gguf CHECKPOINT --out DIR")
        n_ubatch = n_batch if n_ubatch is None else n_ubatch
        for label, value in (("n_ctx", n_ctx), ("n_batch", n_batch), ("n_ubatch", n_ubatch), ("n_seq_max", n_seq_max)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be a positive integer, got {value!r}")
        if n_ubatch > n_batch:
            raise ValueError(f"n_ubatch ({n_ubatch}) must not exceed n_batch ({n_batch}): it splits one call's batch")
        if n_seq_max > n_batch:
            raise ValueError(f"n_seq_max ({n_seq_max}) must not exceed n_batch ({n_batch}): decode batches one row per sequence")
        if not isinstance(main_gpu, int) or main_gpu < 0:
            raise ValueError(f"main_gpu must be a CUDA device index >= 0, got {main_gpu!r}")
        if kv_type not in KV_TYPES:
            raise ValueError(f"unknown kv_type {kv_type!r}; valid: {', '.join(KV_TYPES)}")
        llama_cpp = import_llama_cpp()
        set_llama_logging(verbose)
        with _backend_ready:
            llama_cpp.llama_backend_init()
        self.n_threads = n_threads or max(1, os.cpu_count() or 1)
        self.n_threads_batch = n_threads_batch or self.n_threads
        if extra_buffers is None:
            extra_buffers = not cpu_has_amx()
        self.extra_buffers = extra_buffers
        self._h = _LlamaHandles(llama_cpp, path, n_ctx, n_batch, n_seq_max, self.n_threads, n_gpu_layers, kv_type,
                                extra_buffers, flash_attn, self.n_threads_batch, n_ubatch, main_gpu)
        self.n_ctx, self.n_batch, self.n_ubatch, self.n_seq_max = n_ctx, n_batch, n_ubatch, n_seq_max
        self.n_embd = self._h.n_embd
        self.vocab_size = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self._h.model))
        self.counters = Counters()
        self.description = (f"llama.cpp (llama-cpp-python {llama_cpp.__version__}) {path.name}, n_ctx {n_ctx}, "
                            f"n_batch {n_batch} (micro-batch {n_ubatch}), {self.n_threads} threads ({self.n_threads_batch} for batches), "
                            f"weight repacking {'on' if extra_buffers else 'off'}, {n_gpu_layers} GPU layers"
                            f"{f' on GPU {main_gpu}' if n_gpu_layers else ''}, "
                            f"KV {kv_type}, flash attention {'auto' if flash_attn is None else 'on' if flash_attn else 'off'}")
        self._lengths: dict[int, int] = {}

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            handles = self.__dict__.pop("_h", None)
            if handles is not None:
                handles.close()

    def __enter__(self) -> "LlamaCppLLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown may have torn down llama_cpp already
            pass

    def set_threads(self, n_threads: int, n_threads_batch: int) -> None:
        """Threads for single-token steps and for batches, from the next llama_decode on."""
        for label, value in (("n_threads", n_threads), ("n_threads_batch", n_threads_batch)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be a positive integer, got {value!r}")
        with self._lock:
            h = self._handles()
            h.lib.llama_set_n_threads(h.ctx, n_threads, n_threads_batch)
            self.n_threads, self.n_threads_batch = n_threads, n_threads_batch

    # -- sequences ---------------------------------------------------------------------------------------------

    def length(self, seq: int) -> int:
        return self._lengths.get(seq, 0)

    def fork(self, src: int, dst: int) -> None:
        self._check_seq(src)
        self._check_seq(dst)
        if src == dst:
            return
        with self._lock:
            lib, mem = self._handles().lib, self._h.memory
            lib.llama_memory_seq_rm(mem, dst, -1, -1)
            lib.llama_memory_seq_cp(mem, src, dst, -1, -1)
            self._lengths[dst] = self.length(src)

    def truncate(self, seq: int, length: int) -> None:
        self._check_seq(seq)
        if length < 0:
            raise ValueError(f"cannot truncate sequence {seq} to a negative length ({length})")
        if length >= self.length(seq):
            return
        with self._lock:
            lib = self._handles().lib
            if not lib.llama_memory_seq_rm(self._h.memory, seq, length, -1):
                raise RuntimeError(f"llama.cpp could not truncate sequence {seq} to {length} positions")
            self._lengths[seq] = length

    def release(self, seq: int) -> None:
        self._check_seq(seq)
        with self._lock:
            self._handles().lib.llama_memory_seq_rm(self._h.memory, seq, -1, -1)
            self._lengths.pop(seq, None)

    # -- compute -----------------------------------------------------------------------------------------------

    def prefill(self, seq: int, tokens: Sequence[int] | None = None, embeds: np.ndarray | None = None,
                all_logits: bool = False) -> np.ndarray:
        """Append tokens or embedding rows to `seq`; logits (V,) of the last row, or (n, V) with all_logits."""
        self._check_seq(seq)
        if (tokens is None) == (embeds is None):
            raise ValueError("prefill takes exactly one of tokens= or embeds=")
        rows = self._check_tokens(tokens) if tokens is not None else self._check_embeds(embeds)
        n = len(rows)
        with self._lock:
            start = self.length(seq)
            if start + n > self.n_ctx:
                raise PromptTooLongError(f"sequence {seq} would hold {start + n} positions ({start} already + {n} new) "
                                         f"but the context has n_ctx={self.n_ctx}; shorten the prompt or load with a "
                                         "larger n_ctx")
            out = []
            try:
                for lo in range(0, n, self.n_batch):  # chunks of <= n_batch rows: never trip the n_batch abort
                    chunk = rows[lo:lo + self.n_batch]
                    want = range(len(chunk)) if all_logits else [len(chunk) - 1] if lo + len(chunk) == n else []
                    out += self._run_chunk(seq, start + lo, chunk, want, embeds is not None)
                    self._lengths[seq] = start + lo + len(chunk)
            except BaseException:  # all or nothing: drop whatever this call put into the KV cache
                if "_h" in self.__dict__:
                    self._h.lib.llama_memory_seq_rm(self._h.memory, seq, start, -1)
                self._lengths[seq] = start
                raise
            if embeds is not None:
                self.counters.prefill_embeds += n
            else:
                self.counters.prefill_tokens += n
        return np.stack(out) if all_logits else out[-1]

    def decode(self, tokens: Mapping[int, int]) -> dict[int, np.ndarray]:
        """One batched step: token tokens[seq] appended to every listed sequence; {seq: logits (V,)}."""
        if not tokens:
            raise ValueError("decode needs at least one {sequence: token} pair")
        for seq, token in tokens.items():
            self._check_seq(seq)
            self._check_tokens([token])
            if self.length(seq) + 1 > self.n_ctx:
                raise PromptTooLongError(f"sequence {seq} is full (n_ctx={self.n_ctx}); load with a larger n_ctx")
        with self._lock:
            h = self._handles()
            batch = h.token_batch
            for i, (seq, token) in enumerate(tokens.items()):
                self._set_row(batch, i, seq, self.length(seq), True)
                batch.token[i] = int(token)
            batch.n_tokens = len(tokens)
            self._decode(batch)
            out = {seq: self._logits(i) for i, seq in enumerate(tokens)}
            for seq in tokens:
                self._lengths[seq] = self.length(seq) + 1
            self.counters.decode_steps += 1
            self.counters.decode_tokens += len(tokens)
        return out

    # -- internals ---------------------------------------------------------------------------------------------

    def _run_chunk(self, seq: int, pos0: int, chunk, want, is_embd: bool) -> list[np.ndarray]:
        h = self._handles()
        batch = h.embd_batch if is_embd else h.token_batch
        n = len(chunk)
        assert n <= self.n_batch  # a larger batch would abort the process (GGML_ASSERT), not raise
        wanted = set(want)
        for i in range(n):
            self._set_row(batch, i, seq, pos0 + i, i in wanted)
        if is_embd:
            block = np.ascontiguousarray(chunk, dtype=np.float32)  # (n, H)
            ctypes.memmove(batch.embd, block.ctypes.data, block.nbytes)
        else:
            for i, token in enumerate(chunk):
                batch.token[i] = token
        batch.n_tokens = n
        self._decode(batch)
        return [self._logits(i) for i in want]

    @staticmethod
    def _set_row(batch, i: int, seq: int, pos: int, logits: bool) -> None:
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = 1 if logits else 0

    def _decode(self, batch) -> None:
        rc = self._h.lib.llama_decode(self._h.ctx, batch)
        if rc == 1:
            raise PromptTooLongError(f"llama.cpp has no free KV cache slot: the n_ctx={self.n_ctx} positions are shared "
                                     "by all sequences; release finished sequences or load with a larger n_ctx")
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}: {_DECODE_ERRORS.get(rc, 'unknown error')}")

    def _logits(self, i: int) -> np.ndarray:
        ptr = self._h.lib.llama_get_logits_ith(self._h.ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.vocab_size,)).copy()  # float32 (V,), copied out of llama.cpp

    def _handles(self) -> _LlamaHandles:
        try:
            return self._h
        except AttributeError:
            raise RuntimeError("this LlamaCppLLM was closed; create a new one") from None

    def _check_seq(self, seq: int) -> None:
        if not isinstance(seq, (int, np.integer)) or not 0 <= seq < self.n_seq_max:
            raise ValueError(f"sequence id {seq!r} is outside 0..{self.n_seq_max - 1}; raise n_seq_max to use more sequences")

    def _check_tokens(self, tokens: Sequence[int]) -> list[int]:
        ids = [int(t) for t in tokens]
        if not ids:
            raise ValueError("prefill needs at least one token")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary 0..{self.vocab_size - 1} "
                             "(image placeholders must be replaced by embedding rows, not passed as tokens)")
        return ids

    def _check_embeds(self, embeds: np.ndarray) -> np.ndarray:
        rows = np.asarray(embeds, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.n_embd or rows.shape[0] == 0:
            raise ValueError(f"embeds must have shape (n >= 1, {self.n_embd}), got {tuple(rows.shape)}")
        if not np.isfinite(rows).all():
            raise ValueError("embeds contain NaN or infinite values")
        return rows
