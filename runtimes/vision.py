"""Vision backends (VisionBackend protocol): pixels (B, 3, S, S) float32 -> image embeddings (B, T, H) float32.

  TorchVision     the SQLLaVA module's vision tower + projector (from a training checkpoint)
  OnnxVision      an exported vision ONNX on onnxruntime: CPU, CUDA or TensorRT execution provider
  TensorRTVision  a serialized TensorRT engine (from `python -m export.trt`) on the TensorRT 10/11 runtime API

Every backend receives pixels from `sqllava_edge.image.preprocess`, so preprocessing is identical across them.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from runtimes.base import VisionKind
from sqllava_edge.errors import BackendUnavailableError

# onnxruntime execution providers, best first, by the short names users pass.
ORT_PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


def _check_pixels(pixel_values: np.ndarray, image_size: int | None) -> np.ndarray:
    pixels = np.ascontiguousarray(pixel_values, dtype=np.float32)
    if pixels.ndim != 4 or pixels.shape[1] != 3 or (image_size is not None and pixels.shape[2:] != (image_size, image_size)):
        want = f"(B, 3, {image_size}, {image_size})" if image_size else "(B, 3, S, S)"
        raise ValueError(f"pixel_values must be {want} (use sqllava_edge.image.preprocess), got {pixels.shape}")
    return pixels


class TorchVision:
    """The PyTorch vision tower + projector of an SQLLaVA model."""

    name = VisionKind.TORCH.value

    def __init__(self, model):
        import torch

        self.model = model.eval()
        self.image_size = model.config.vision.image_size
        dtype = next(model.vision.parameters()).dtype
        self.description = f"torch {torch.__version__} {model.device.type} {str(dtype).removeprefix('torch.')}"

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        import torch

        pixels = _check_pixels(pixel_values, self.image_size)
        with torch.inference_mode():
            out = self.model.encode_images(torch.from_numpy(pixels))  # (B, T, H)
        return out.float().cpu().numpy()

    def close(self) -> None:
        self.model = None


class OnnxVision:
    """An exported vision ONNX (fp32, fp16 or int8) on onnxruntime.

    providers: short names from ORT_PROVIDERS in priority order, e.g. ("cuda", "cpu"). A provider that this
    onnxruntime build lacks is an error naming the package to install, never silently dropped.
    onnxruntime-gpu lists its CUDA provider even where the CUDA / cuDNN libraries are missing, and then quietly runs
    the session on the CPU: the session's own providers are checked after creation. A provider that did not start is
    an error, or with allow_cpu_fallback=True (automatic selection) recorded in `dropped_providers`.
    gpu_mem_limit: bytes the CUDA provider's memory arena may grow to (its `gpu_mem_limit` option); None = unlimited.
    """

    name = VisionKind.ONNXRUNTIME.value

    def __init__(self, onnx_path: str | os.PathLike, providers: tuple[str, ...] = ("cpu",), n_threads: int | None = None,
                 trt_cache_dir: str | os.PathLike | None = None, gpu_mem_limit: int | None = None,
                 allow_cpu_fallback: bool = False):
        ort = _import_onnxruntime()
        path = Path(onnx_path)
        if not path.is_file():
            raise FileNotFoundError(f"vision ONNX {path} does not exist; re-export the bundle (python -m export)")
        if gpu_mem_limit is not None and (not isinstance(gpu_mem_limit, int) or gpu_mem_limit < 1):
            raise ValueError(f"gpu_mem_limit must be a positive number of bytes or None, got {gpu_mem_limit!r}")
        chosen = [_ort_provider(ort, p, trt_cache_dir, gpu_mem_limit) for p in providers]
        options = ort.SessionOptions()
        if n_threads is not None:
            options.intra_op_num_threads = n_threads
        options.log_severity_level = 3  # errors only
        self._session = ort.InferenceSession(str(path), sess_options=options, providers=chosen)
        running = set(self._session.get_providers())
        self.dropped_providers = tuple(p for p in providers if ORT_PROVIDERS[p] not in running)
        if self.dropped_providers and not allow_cpu_fallback:
            self._session = None
            full = ", ".join(ORT_PROVIDERS[p] for p in self.dropped_providers)
            raise BackendUnavailableError(
                f"onnxruntime {ort.__version__} offers {full} but could not start it for {path.name} (it runs "
                f"{', '.join(sorted(running))} instead): the CUDA / cuDNN libraries that this onnxruntime-gpu needs are "
                "missing or of another version (see onnxruntime's CUDA execution provider requirements); install "
                "them, or run on the CPU with device='cpu'")
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(f"{path}: a vision ONNX has one input and one output, found {len(inputs)} and {len(outputs)}")
        self._input, self._output = inputs[0].name, outputs[0].name
        self._input_dtype = np.float16 if inputs[0].type == "tensor(float16)" else np.float32
        batch = inputs[0].shape[0]
        self._fixed_batch = batch if isinstance(batch, int) else None  # a static batch axis: run images one by one
        # (T, H) per image when the graph states them (None where symbolic), for load-time compatibility checks
        self.output_shape = tuple(d if isinstance(d, int) else None for d in outputs[0].shape[1:])
        size = inputs[0].shape[2]
        self.image_size = size if isinstance(size, int) else None
        used = ", ".join(self._session.get_providers())
        self.description = f"onnxruntime {ort.__version__} [{used}], {path.name}"

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        pixels = _check_pixels(pixel_values, self.image_size).astype(self._input_dtype, copy=False)
        if self._fixed_batch is not None and pixels.shape[0] != self._fixed_batch:
            if self._fixed_batch != 1:
                raise ValueError(f"this vision ONNX takes exactly {self._fixed_batch} images per call")
            return np.concatenate([self._run(pixels[i:i + 1]) for i in range(pixels.shape[0])])
        return self._run(pixels)

    def _run(self, pixels: np.ndarray) -> np.ndarray:
        (out,) = self._session.run([self._output], {self._input: pixels})
        return np.asarray(out, dtype=np.float32)  # (B, T, H)

    def close(self) -> None:
        self._session = None


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailableError(
            "the onnxruntime vision backend needs onnxruntime: pip install 'sqllava-edge[cpu]' "
            "(or onnxruntime-gpu via 'sqllava-edge[gpu]'; on Jetson use NVIDIA's onnxruntime-gpu wheel)"
        ) from None
    return onnxruntime


def ort_available_providers() -> list[str]:
    """Short names of the execution providers this onnxruntime build offers ([] without onnxruntime)."""
    try:
        import onnxruntime
    except ImportError:
        return []
    have = set(onnxruntime.get_available_providers())
    return [short for short, full in ORT_PROVIDERS.items() if full in have]


def _ort_provider(ort, short: str, trt_cache_dir, gpu_mem_limit: int | None = None):
    if short not in ORT_PROVIDERS:
        raise ValueError(f"unknown onnxruntime provider {short!r}; valid: {', '.join(ORT_PROVIDERS)}")
    full = ORT_PROVIDERS[short]
    if full not in ort.get_available_providers():
        raise BackendUnavailableError(
            f"onnxruntime {ort.__version__} here has no {full} (it offers {', '.join(ort.get_available_providers())}); "
            "install onnxruntime-gpu (pip install 'sqllava-edge[gpu]', NVIDIA's wheel on Jetson) with a matching CUDA"
            + (" and TensorRT" if short == "tensorrt" else "")
        )
    if short == "tensorrt":
        options = {"trt_fp16_enable": True, "trt_timing_cache_enable": True}
        if trt_cache_dir is not None:
            options.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(trt_cache_dir),
                           trt_timing_cache_path=str(trt_cache_dir))
        return (full, options)
    if short == "cuda" and gpu_mem_limit is not None:
        return (full, {"gpu_mem_limit": int(gpu_mem_limit), "arena_extend_strategy": "kSameAsRequested"})
    return full


# --------------------------------------------------------------------------------------------------------------------
# TensorRT (GPU only; written against the documented TensorRT 10/11 runtime API, edge-deployment.md section 5)
#
# The engine's input and output live in CUDA memory, held either by a CUDA-enabled PyTorch or, without one (the usual
# case on a Jetson or a slim server image), by NVIDIA's cuda-python runtime bindings (cudaMalloc / cudaMemcpyAsync /
# streams, as in TensorRT's own Python samples).

MIN_TENSORRT = 10  # strongly typed networks and the TensorRT 10/11 tensor API; JetPack 6.0's TensorRT 8.6 has neither
NO_CUDA_BUFFERS = (
    "the tensorrt vision backend holds its buffers in CUDA memory through PyTorch built with CUDA or NVIDIA's "
    "cuda-python (pip install 'cuda-python>=12.6,<13', as the runtime-gpu extra pins it: cuda-python 13 needs CUDA 13, "
    "which JetPack 6 does not have); neither is usable here ({why}). Install cuda-python, or use "
    "vision_backend='onnxruntime' on this machine"
)


def cuda_available() -> bool:
    """A CUDA-enabled PyTorch that sees a GPU."""
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def import_cudart():
    """NVIDIA's cuda-python runtime module: `cuda.bindings.runtime` (cuda-python 12.8+ and 13), else the older
    `cuda.cudart` (removed in 13); None without cuda-python."""
    try:
        from cuda.bindings import runtime
        return runtime
    except ImportError:
        pass
    try:
        from cuda import cudart
        return cudart
    except ImportError:
        return None


def cuda_buffers_problem() -> str | None:
    """Why no CUDA memory can be held for TensorRT here (no CUDA torch and no usable cuda-python), or None."""
    if cuda_available():
        return None
    cudart = import_cudart()
    if cudart is None:
        return "torch.cuda.is_available() is False and cuda-python is not installed"
    try:
        err, count = cudart.cudaGetDeviceCount()
    except Exception as exc:  # cuda-python raises when the CUDA driver library itself cannot be loaded
        return f"torch.cuda.is_available() is False and cuda-python cannot reach the CUDA driver ({exc})"
    if err != cudart.cudaError_t.cudaSuccess or count < 1:
        return f"torch.cuda.is_available() is False and cuda-python finds no CUDA device ({err})"
    return None


def check_tensorrt_version(trt) -> None:
    """Raise BackendUnavailableError (one line, saying what to upgrade) if this TensorRT is older than MIN_TENSORRT."""
    version = str(getattr(trt, "__version__", "0"))
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = 0
    if major < MIN_TENSORRT:
        raise BackendUnavailableError(
            f"TensorRT {version} is too old: sqllava-edge needs TensorRT {MIN_TENSORRT} or newer (strongly typed "
            "engines); on Jetson that is JetPack 6.1 or later (TensorRT 10.3; JetPack 6.0 ships TensorRT 8.6), on a "
            "desktop pip install -U tensorrt --extra-index-url https://pypi.nvidia.com")


def _import_tensorrt():
    """The tensorrt module, checked in the order a user fixes things: TensorRT itself, its version (JetPack 6.0's 8.6
    is refused before anything else is asked for), then the CUDA buffers."""
    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailableError(
            "the tensorrt vision backend needs the tensorrt Python package: on Jetson it ships with JetPack 6.1+; on "
            "desktops pip install tensorrt --extra-index-url https://pypi.nvidia.com"
        ) from None
    check_tensorrt_version(tensorrt)
    problem = cuda_buffers_problem()
    if problem is not None:
        raise BackendUnavailableError(NO_CUDA_BUFFERS.format(why=problem))
    return tensorrt


def tensorrt_problem() -> str | None:
    """Why the TensorRT backend cannot run here (the package, its version, CUDA buffers), or None when it can."""
    try:
        _import_tensorrt()
    except BackendUnavailableError as exc:
        return str(exc)
    return None


class TorchCudaBuffers:
    """Engine buffers as CUDA torch tensors, on a stream of their own."""

    def __init__(self, device_index: int = 0):
        import torch

        self._torch = torch
        self._device = torch.device("cuda", device_index)
        self._stream_obj = torch.cuda.Stream(device=self._device)
        self.stream = self._stream_obj.cuda_stream
        self.device_name = torch.cuda.get_device_name(self._device)
        self._tensors: dict[str, object] = {}

    def to_device(self, name: str, array: np.ndarray) -> int:
        with self._torch.cuda.stream(self._stream_obj):  # the copy is ordered before the engine on the same stream
            tensor = self._torch.from_numpy(np.ascontiguousarray(array)).to(self._device, non_blocking=False)
        self._tensors[name] = tensor
        return tensor.data_ptr()

    def empty(self, name: str, shape: tuple[int, ...], dtype) -> int:
        torch_dtype = {np.dtype(np.float32): self._torch.float32, np.dtype(np.float16): self._torch.float16}[np.dtype(dtype)]
        with self._torch.cuda.stream(self._stream_obj):  # allocated for the stream that writes it
            tensor = self._torch.empty(shape, dtype=torch_dtype, device=self._device)
        self._tensors[name] = tensor
        return tensor.data_ptr()

    def to_host(self, name: str) -> np.ndarray:
        self._stream_obj.synchronize()
        return self._tensors[name].cpu().numpy()

    def close(self) -> None:
        self._tensors.clear()


class CudaPythonBuffers:
    """Engine buffers through cuda-python's runtime API (cudaMalloc, cudaMemcpyAsync, a stream): no PyTorch needed.

    Device buffers are kept per tensor name and grown when a larger batch needs it; host arrays stay referenced until
    the stream is synchronised. cudart: the runtime module (import_cudart(); tests pass a fake).
    """

    def __init__(self, device_index: int = 0, cudart=None):
        self._rt = cudart if cudart is not None else import_cudart()
        if self._rt is None:
            raise BackendUnavailableError(NO_CUDA_BUFFERS.format(why="cuda-python is not installed"))
        self._call(self._rt.cudaSetDevice(device_index))
        properties = self._call(self._rt.cudaGetDeviceProperties(device_index))
        name = properties.name
        self.device_name = (name.decode(errors="replace") if isinstance(name, bytes) else str(name)).rstrip("\x00")
        self._stream_obj = self._call(self._rt.cudaStreamCreate())
        self.stream = _native_handle(self._stream_obj)  # the cudaStream_t address TensorRT's execute_async_v3 takes
        self._device: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        self._host: dict[str, np.ndarray] = {}

    def _call(self, result):
        """cuda-python calls return (cudaError_t, *values): raise on an error, else the value(s)."""
        err, *values = result
        if err != self._rt.cudaError_t.cudaSuccess:
            raise RuntimeError(f"CUDA runtime call failed: {err}")
        return values[0] if len(values) == 1 else tuple(values)

    def _buffer(self, name: str, nbytes: int) -> int:
        pointer, size = self._device.get(name, (0, 0))
        if size < nbytes:
            if pointer:
                self._call(self._rt.cudaFree(pointer))
            pointer = int(self._call(self._rt.cudaMalloc(nbytes)))
            self._device[name] = (pointer, nbytes)
        return pointer

    def _copy(self, dst: int, src: int, nbytes: int, kind) -> None:
        self._call(self._rt.cudaMemcpyAsync(dst, src, nbytes, kind, self._stream_obj))

    def to_device(self, name: str, array: np.ndarray) -> int:
        host = np.ascontiguousarray(array)
        pointer = self._buffer(name, host.nbytes)
        self._host[name] = host  # alive until the copy has run
        self._copy(pointer, host.ctypes.data, host.nbytes, self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice)
        return pointer

    def empty(self, name: str, shape: tuple[int, ...], dtype) -> int:
        self._host[name] = np.empty(shape, dtype=dtype)
        return self._buffer(name, self._host[name].nbytes)

    def to_host(self, name: str) -> np.ndarray:
        host = self._host[name]
        self._copy(host.ctypes.data, self._device[name][0], host.nbytes, self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost)
        self._call(self._rt.cudaStreamSynchronize(self._stream_obj))
        return host

    def close(self) -> None:
        for pointer, _ in self._device.values():
            self._rt.cudaFree(pointer)
        self._device.clear()
        if self._stream_obj is not None:
            self._rt.cudaStreamDestroy(self._stream_obj)
            self._stream_obj = None


def _native_handle(obj) -> int:
    """The address behind a cuda-python handle: utils.get_cuda_native_handle (12.9.1+), where int() is deprecated."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        return int(obj)
    return int(get_cuda_native_handle(obj))


def cuda_buffers(device_index: int = 0):
    """Torch CUDA buffers when this torch has CUDA, else cuda-python's."""
    return TorchCudaBuffers(device_index) if cuda_available() else CudaPythonBuffers(device_index)


class TensorRTVision:
    """A serialized TensorRT engine with one input (pixels) and one output (embeddings), run on CUDA.

    The engine is built on this device by `python -m export.trt` (engines are not portable across GPUs or TensorRT
    versions). Buffers: `cuda_buffers()` (CUDA torch, else cuda-python); tests pass trt and buffers fakes.
    """

    name = VisionKind.TENSORRT.value

    def __init__(self, engine_path: str | os.PathLike, device_index: int = 0, *, trt=None, buffers=None):
        path = Path(engine_path)
        if not path.is_file():
            raise FileNotFoundError(f"TensorRT engine {path} does not exist; build it on this device: python -m export.trt BUNDLE")
        self._load(path.read_bytes(), path.name, device_index, trt, buffers)

    @classmethod
    def from_bytes(cls, engine: bytes, label: str = "engine", device_index: int = 0, *, trt=None, buffers=None):
        """The same backend over a serialized engine in memory (export.trt validates before writing it)."""
        self = cls.__new__(cls)
        self._load(engine, label, device_index, trt, buffers)
        return self

    def _load(self, data: bytes, label: str, device_index: int, trt, buffers) -> None:
        trt = trt if trt is not None else _import_tensorrt()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(data)
        if self._engine is None:
            raise BackendUnavailableError(
                f"TensorRT {trt.__version__} could not deserialize {label}: it was built for another GPU or TensorRT "
                "version; rebuild it here with python -m export.trt BUNDLE"
            )
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise BackendUnavailableError(f"TensorRT {trt.__version__} could not create an execution context for "
                                          f"{label} (out of GPU memory?); see the TensorRT log above")
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(f"{label}: expected one input and one output tensor, found {inputs} and {outputs}")
        self._input, self._output = inputs[0], outputs[0]
        self._input_dtype = _numpy_dtype(trt, self._engine.get_tensor_dtype(self._input))
        self._output_dtype = _numpy_dtype(trt, self._engine.get_tensor_dtype(self._output))
        # Profile 0 bounds the batch axis: (min, opt, max) shapes of the input.
        self._max_batch = int(self._engine.get_tensor_profile_shape(self._input, 0)[2][0])
        self.image_size = int(self._engine.get_tensor_shape(self._input)[2])
        self._buffers = buffers if buffers is not None else cuda_buffers(device_index)
        self.description = f"TensorRT {trt.__version__} on {self._buffers.device_name}, {label}"

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        pixels = _check_pixels(pixel_values, self.image_size)
        outs = [self._run(pixels[i:i + self._max_batch]) for i in range(0, pixels.shape[0], self._max_batch)]
        return np.concatenate(outs)

    def _run(self, pixels: np.ndarray) -> np.ndarray:
        x = pixels.astype(self._input_dtype, copy=False)  # (b, 3, S, S)
        self._context.set_input_shape(self._input, tuple(x.shape))
        shape = tuple(self._context.get_tensor_shape(self._output))  # (b, T, H), resolved from the input shape
        self._context.set_tensor_address(self._input, self._buffers.to_device(self._input, x))
        self._context.set_tensor_address(self._output, self._buffers.empty(self._output, shape, self._output_dtype))
        if not self._context.execute_async_v3(self._buffers.stream):
            raise RuntimeError("TensorRT execute_async_v3 failed; see the TensorRT log above")
        return self._buffers.to_host(self._output).astype(np.float32)

    def close(self) -> None:
        buffers = self.__dict__.pop("_buffers", None)
        if buffers is not None:
            buffers.close()
        self._context = None
        self._engine = None
        self._runtime = None


def _numpy_dtype(trt, dtype):
    table = {trt.float32: np.float32, trt.float16: np.float16}
    if dtype not in table:
        raise ValueError(f"TensorRT engine tensor dtype {dtype} is not supported (float32 / float16 only)")
    return table[dtype]
