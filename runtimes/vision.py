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


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


MIN_TENSORRT = 10  # strongly typed networks and the TensorRT 10/11 tensor API; JetPack 6.0's TensorRT 8.6 has neither


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
    if not cuda_available():
        raise BackendUnavailableError(
            "the tensorrt vision backend needs an NVIDIA GPU with CUDA, and PyTorch built with CUDA to hold the "
            "engine's buffers; none is usable here (torch.cuda.is_available() is False). Use vision_backend="
            "'onnxruntime' on this machine"
        )
    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailableError(
            "the tensorrt vision backend needs the tensorrt Python package: on Jetson it ships with JetPack 6.1+; on "
            "desktops pip install tensorrt --extra-index-url https://pypi.nvidia.com"
        ) from None
    check_tensorrt_version(tensorrt)
    return tensorrt


def tensorrt_problem() -> str | None:
    """Why the TensorRT backend cannot run here (the package, its version, CUDA buffers), or None when it can."""
    try:
        _import_tensorrt()
    except BackendUnavailableError as exc:
        return str(exc)
    return None


class TensorRTVision:
    """A serialized TensorRT engine with one input (pixels) and one output (embeddings), run on CUDA.

    Buffers are torch CUDA tensors; the engine is built on this device by `python -m export.trt` (engines are not
    portable across GPUs or TensorRT versions).
    """

    name = VisionKind.TENSORRT.value

    def __init__(self, engine_path: str | os.PathLike, device_index: int = 0):
        trt = _import_tensorrt()
        import torch

        path = Path(engine_path)
        if not path.is_file():
            raise FileNotFoundError(f"TensorRT engine {path} does not exist; build it on this device: python -m export.trt BUNDLE")
        self._device = torch.device("cuda", device_index)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self._engine is None:
            raise BackendUnavailableError(
                f"TensorRT {trt.__version__} could not deserialize {path}: it was built for another GPU or TensorRT "
                "version; rebuild it here with python -m export.trt BUNDLE"
            )
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise BackendUnavailableError(f"TensorRT {trt.__version__} could not create an execution context for {path} "
                                          "(out of GPU memory?); see the TensorRT log above")
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(f"{path}: expected one input and one output tensor, found {inputs} and {outputs}")
        self._input, self._output = inputs[0], outputs[0]
        self._input_dtype = _torch_dtype(trt, self._engine.get_tensor_dtype(self._input))
        self._output_dtype = _torch_dtype(trt, self._engine.get_tensor_dtype(self._output))
        # Profile 0 bounds the batch axis: (min, opt, max) shapes of the input.
        self._max_batch = int(self._engine.get_tensor_profile_shape(self._input, 0)[2][0])
        self.image_size = int(self._engine.get_tensor_shape(self._input)[2])
        self._stream = torch.cuda.Stream(device=self._device)
        self.description = f"TensorRT {trt.__version__} on {torch.cuda.get_device_name(self._device)}, {path.name}"

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        pixels = _check_pixels(pixel_values, self.image_size)
        outs = [self._run(pixels[i:i + self._max_batch]) for i in range(0, pixels.shape[0], self._max_batch)]
        return np.concatenate(outs)

    def _run(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(pixels).to(self._device, self._input_dtype).contiguous()  # (b, 3, S, S)
        self._context.set_input_shape(self._input, tuple(x.shape))
        shape = tuple(self._context.get_tensor_shape(self._output))  # (b, T, H), resolved from the input shape
        y = torch.empty(shape, dtype=self._output_dtype, device=self._device)
        self._context.set_tensor_address(self._input, x.data_ptr())
        self._context.set_tensor_address(self._output, y.data_ptr())
        self._stream.wait_stream(torch.cuda.current_stream(self._device))  # x was written on the current stream
        if not self._context.execute_async_v3(self._stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed; see the TensorRT log above")
        self._stream.synchronize()
        return y.float().cpu().numpy()

    def close(self) -> None:
        self._context = None
        self._engine = None
        self._runtime = None


def _torch_dtype(trt, dtype):
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16}
    if dtype not in table:
        raise ValueError(f"TensorRT engine tensor dtype {dtype} is not supported (float32 / float16 only)")
    return table[dtype]
