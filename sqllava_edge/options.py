"""Command-line options shared by the front doors that load a model (`sqllava-edge ask/chat/...` and `serve`)."""
from __future__ import annotations

DEFAULT_N_CTX_HELP = "context length in positions (default: 2048)"


def add_backend_arguments(group, n_ctx_help: str = DEFAULT_N_CTX_HELP) -> None:
    """--device, --vision-backend, --llm-backend, precisions, --n-ctx, --threads, --gpu-layers."""
    group.add_argument("--device", choices=("cpu", "cuda", "jetson"), help="device (default: detected)")
    group.add_argument("--vision-backend", choices=("torch", "onnxruntime", "tensorrt"), help="default: automatic")
    group.add_argument("--llm-backend", choices=("torch", "llama.cpp"), help="default: automatic")
    group.add_argument("--vision-precision", help="vision ONNX precision: fp32, fp16, int8 (default: automatic)")
    group.add_argument("--llm-precision", help="GGUF precision: f32, f16, q8_0, q4_k_m, ... (default: automatic)")
    group.add_argument("--n-ctx", type=int, help=n_ctx_help)
    group.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    group.add_argument("--gpu-layers", type=int, help="llama.cpp layers offloaded to the GPU (-1 = all)")
    group.add_argument("--prefer", choices=("latency", "throughput", "memory"), default="latency",
                       help="what measured selection optimises on a CPU (default latency; see sqllava-edge tune)")
    group.add_argument("--max-quality-loss", metavar="KL|off",
                       help="quality floor of the automatic choice: max mean KL vs fp32 (nats) an artifact may have "
                            "recorded at export (default 0.05, with top-1 >= 97%%); 'off' = none")
    group.add_argument("--no-tune", action="store_true",
                       help="skip measured selection: the rule-based choice (also $SQLLAVA_EDGE_TUNE=0)")


def load_options(args) -> dict:
    """Assistant.load keyword arguments from the parsed backend options."""
    return dict(device=args.device, vision_backend=args.vision_backend, llm_backend=args.llm_backend,
                n_ctx=args.n_ctx, n_threads=args.threads, gpu_layers=args.gpu_layers,
                vision_precision=args.vision_precision, llm_precision=args.llm_precision, prefer=args.prefer,
                tune=False if args.no_tune else None, max_quality_loss=args.max_quality_loss)
