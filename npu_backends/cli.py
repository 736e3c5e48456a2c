"""`edgefed prefill`: time a prompt's prefill on torch or ONNX Runtime and check it against float torch."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .export import CHUNK_SIZES
from .providers import PROFILES, used_provider


def add_parser(sub) -> None:
    from edge_node.cli import parse_ids

    p = sub.add_parser("prefill", help="chunked prompt prefill on ONNX Runtime (NPU execution providers) or torch")
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--backend", choices=["torch", "ort"], default="ort")
    p.add_argument("--provider", choices=list(PROFILES), default="cpu", help="ONNX Runtime execution provider")
    p.add_argument("--strict", action="store_true", help="fail instead of falling back to the CPU")
    p.add_argument("--chunk", type=int, choices=CHUNK_SIZES, default=128, help="tokens per static chunk graph")
    p.add_argument("--context", type=int, help="tokens the graphs hold, a multiple of the chunk "
                   "(past slots = context - chunk; default: the prompt, rounded up)")
    p.add_argument("--groups", type=int, default=1, help="layer-block subgraphs per chunk")
    p.add_argument("--out-of-order", action="store_true", help="schedule subgraphs over accelerator + CPU queues")
    p.add_argument("--int8", action="store_true", help="W8A8 QDQ linear layers, calibrated on the stdlib corpus")
    p.add_argument("--shadow", action="store_true", help="with --int8: shadow outlier execution in float")
    p.add_argument("--graph-dir", help="keep exported graphs here and reuse them")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (tokenized with the model's tokenizer.json)")
    src.add_argument("--prompt-file", help="file whose text is the prompt")
    src.add_argument("--prompt-ids", type=parse_ids, help="prompt token ids, e.g. 1,2,3")
    p.add_argument("--threads", type=int, help="intra-op threads for torch and ONNX Runtime")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(run=run)


def prompt_ids(args: argparse.Namespace) -> list[int]:
    if args.prompt_ids is not None:
        return args.prompt_ids
    from edge_node.model import Tokenizer

    text = args.prompt if args.prompt is not None else Path(args.prompt_file).read_text(encoding="utf-8")
    return Tokenizer.from_dir(args.model).encode(text)


def torch_prefill(model, prompt: list[int]) -> tuple[np.ndarray, float]:
    """Float torch full-prompt prefill: last-token logits and seconds."""
    with torch.inference_mode():
        t0 = time.perf_counter()
        logits = model(torch.tensor([prompt]), model.new_cache(), 0, last_only=True)[0, -1]
        return logits.float().numpy(), time.perf_counter() - t0


def run(args: argparse.Namespace) -> int:
    from edge_node.cli import emit
    from edge_node.memory import own_peak_rss_mb as peak_rss_mb
    from edge_node.model import load_model
    from edge_node.model.generate import check_prompt

    from .build import PrefillOptions, build_prefill, round_up

    if args.shadow and not args.int8:
        raise ValueError("--shadow needs --int8")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, torch.float32)
    prompt = prompt_ids(args)
    check_prompt(prompt, model.config.max_position_embeddings, model.config.vocab_size)  # before any export
    torch_prefill(model, prompt)  # warm-up
    ref, torch_s = torch_prefill(model, prompt)
    out = {"backend": args.backend, "prompt_tokens": len(prompt)}
    if args.backend == "torch":
        logits, seconds, provider, setup = ref, torch_s, "torch (CPU)", 0.0
    else:
        opts = PrefillOptions(args.chunk, args.context or round_up(len(prompt), args.chunk), args.groups,
                              args.provider, args.strict, args.int8, args.shadow, args.out_of_order,
                              args.threads, args.graph_dir)
        t0 = time.perf_counter()
        prefill = build_prefill(model, args.model, opts)
        setup = time.perf_counter() - t0
        prefill.run(prompt)  # warm-up: first runs pay for ORT's allocations
        result = prefill.run(prompt)
        logits, seconds, provider = result.logits, result.seconds, result.provider
        out |= {"chunk": args.chunk, "context": opts.context, "chunks": result.chunks, "int8": opts.int8_mode,
                "providers": [used_provider(s) for s in prefill.sessions], "out_of_order": args.out_of_order}
    t0 = time.perf_counter()
    first = int(np.argmax(logits))  # greedy first token: TTFT = prefill + sampling
    ttft = seconds + (time.perf_counter() - t0)
    out |= {"provider": provider, "prefill_tokens_per_s": round(len(prompt) / seconds, 1),
            "ttft_ms": round(ttft * 1e3, 3), "setup_s": round(setup, 2),
            "max_abs_logit_error": float(np.abs(logits - ref).max()), "top1_agree": first == int(np.argmax(ref)),
            "first_token": first, "torch_prefill_tokens_per_s": round(len(prompt) / torch_s, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1)}
    emit(out, args.json, text_key="")
    if not args.json:
        print(f"{out['prefill_tokens_per_s']} tokens/s on {provider}", file=sys.stderr)
    return 0
