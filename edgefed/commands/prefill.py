"""`edgefed prefill`: time a prompt's prefill on torch or ONNX Runtime and check it against float torch."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgefed.args import CHUNKS, PROVIDERS, calibration_texts, emit, parse_ids, positive_int


def add_parser(sub) -> None:
    p = sub.add_parser("prefill", help="chunked prompt prefill on ONNX Runtime (NPU execution providers) or torch")
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--backend", choices=["torch", "ort"], default="ort")
    p.add_argument("--provider", choices=PROVIDERS, default="cpu", help="ONNX Runtime execution provider")
    p.add_argument("--strict", action="store_true", help="fail instead of falling back to the CPU")
    p.add_argument("--chunk", type=int, choices=CHUNKS, default=128, help="tokens per static chunk graph")
    p.add_argument("--context", type=positive_int, help="tokens the graphs hold, a multiple of the chunk "
                   "(past slots = context - chunk; default: the prompt, rounded up)")
    p.add_argument("--groups", type=positive_int, default=1, help="layer-block subgraphs per chunk")
    p.add_argument("--out-of-order", action="store_true", help="schedule subgraphs over accelerator + CPU queues")
    p.add_argument("--int8", action="store_true", help="W8A8 QDQ linear layers, calibrated on the stdlib corpus")
    p.add_argument("--shadow", action="store_true", help="with --int8: shadow outlier execution in float")
    p.add_argument("--block", action="store_true", help="with --int8: block-wise int8 weights and dynamic int8 "
                   "activations (ONNX Runtime MatMulNBits, CPU EP): holds >= 99%% top-1 agreement on real models")
    p.add_argument("--token", action="store_true", help="with --int8: per-token int8 activations on Hadamard-"
                   "rotated linear inputs and GPTQ-rounded int8 weights (standard ONNX u8 x s8 GEMM): minmax's "
                   "speed, ~98%% top-1 agreement on SmolLM2-135M (--block holds 99%% but runs at float speed)")
    p.add_argument("--token2", action="store_true", help="with --int8: --token plus two-pass activations for the "
                   "o projection and two-level weights for down, column scales fused into the GEMM (ONNX Runtime's "
                   "MatMulIntegerToFloat): ~98.4%% top-1 agreement on SmolLM2-135M at ~0.85x --token's speed")
    p.add_argument("--fine", action="store_true", help="with --int8: every linear's input quantized twice, the "
                   "second pass on an 11x finer grid as more input channels of the same GEMM, and down's weights' "
                   "rounding residual too: >= 99%% top-1 agreement on SmolLM2-135M at ~0.8x --token2's speed")
    p.add_argument("--graph-dir", help="keep exported graphs here and reuse them")
    p.add_argument("--plain-attention", action="store_true", help="attention as standard ONNX ops (MatMul, "
                   "Softmax, a mask over every past slot) instead of ONNX Runtime's GroupQueryAttention, which reads "
                   "only the written slots: for a provider that must run every node (--strict)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (tokenized with the model's tokenizer.json)")
    src.add_argument("--prompt-file", help="file whose text is the prompt")
    src.add_argument("--prompt-ids", type=parse_ids, help="prompt token ids, e.g. 1,2,3")
    p.add_argument("--threads", type=positive_int, help="intra-op threads for torch and ONNX Runtime")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(run=run)


def prompt_ids(args: argparse.Namespace) -> list[int]:
    if args.prompt_ids is not None:
        return args.prompt_ids
    from edge_node.model import Tokenizer

    text = args.prompt if args.prompt is not None else _read(Path(args.prompt_file))
    return Tokenizer.from_dir(args.model).encode(text)


def run(args: argparse.Namespace) -> int:
    import torch

    from edge_node.memory import own_peak_rss_mb
    from edge_node.model.decode import check_prompt
    from npu_backends.measure import measure_prefill
    from npu_backends.options import PrefillOptions, round_up
    from quant.checkpoint import load_any

    recipes = [f for f in ("shadow", "block", "token", "token2", "fine") if getattr(args, f)]
    if recipes and not args.int8:
        raise ValueError(f"--{recipes[0]} needs --int8")
    if len(recipes) > 1:
        raise ValueError(f"{' and '.join('--' + r for r in recipes)} are different int8 recipes: choose one")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_any(args.model, torch.float32)  # a float or an edgefed-quantized directory
    prompt = prompt_ids(args)
    check_prompt(prompt, model.config.max_position_embeddings, model.config.vocab_size)  # before any export
    _check_graph_args(args, model.config, len(prompt))
    opts = None
    if args.backend == "ort":
        opts = PrefillOptions(args.chunk, args.context or round_up(len(prompt), args.chunk), args.groups,
                              args.provider, args.strict, args.int8, args.shadow, args.out_of_order,
                              args.threads, args.graph_dir, block=args.block, token=args.token,
                              token2=args.token2, fine=args.fine, fused_attention=not args.plain_attention)
    out = measure_prefill(model, args.model, prompt, opts, calibration_texts() if args.int8 else ())
    out["peak_rss_mb"] = round(own_peak_rss_mb(), 1)
    emit(out, args.json, text_key="")
    if not args.json:
        print(f"{out['prefill_tokens_per_s']} tokens/s on {out['provider']}", file=sys.stderr)
    return 0


def _check_graph_args(args: argparse.Namespace, cfg, prompt_len: int) -> None:
    """Context and groups within what the model and chunk allow, named before anything is exported."""
    from edge_node.model.errors import UsageError

    if args.context is not None:
        if args.context % args.chunk:
            raise UsageError(f"--context {args.context} must be a multiple of --chunk {args.chunk}")
        if args.context > cfg.max_position_embeddings:
            raise UsageError(f"--context {args.context} exceeds the model's max_position_embeddings "
                             f"({cfg.max_position_embeddings})")
        if args.context < prompt_len:
            raise UsageError(f"--context {args.context} is shorter than the {prompt_len}-token prompt")
    if args.groups > cfg.num_layers:
        raise UsageError(f"--groups {args.groups} exceeds the model's {cfg.num_layers} layers")


def _read(path: Path) -> str:
    from edge_node.model.errors import UsageError

    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--prompt-file {path}: cannot read it as UTF-8 text "
                         f"({getattr(e, 'strerror', None) or e})") from None
