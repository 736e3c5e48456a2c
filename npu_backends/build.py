"""From a model directory and options to a ready ChunkedPrefill: export, calibrate, quantize, open sessions.

This is the offline half (gpt-fast's "quantize" step): on a device it runs once ahead
of time and the graphs are kept in `graph_dir`; the timings reported for a prefill
never include it.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from edge_node.model import Transformer

from .export import GraphSpec, export_chunk_graphs, load_specs
from .prefill import ChunkedPrefill
from .providers import make_session
from .quantize import build_int8, int8_path, record_calibration
from .schedule import OutOfOrder, alternate


@dataclass(frozen=True)
class PrefillOptions:
    chunk: int = 128
    context: int = 1024  # tokens the graphs hold, so the longest prompt; past slots = context - chunk
    groups: int = 1  # layer-block subgraphs
    provider: str = "cpu"
    strict: bool = False
    int8: bool = False
    shadow: bool = False  # with int8: tight clip + float shadow of the hot channels
    out_of_order: bool = False  # schedule cells over the accelerator and CPU queues
    threads: int | None = None
    graph_dir: str | None = None  # keep / reuse exported graphs here
    calib_tokens: int = 1024
    hot_fraction: float = 1 / 64

    @property
    def int8_mode(self) -> str | None:
        return None if not self.int8 else ("shadow" if self.shadow else "minmax")


def round_up(n: int, chunk: int) -> int:
    return max(chunk, -(-n // chunk) * chunk)


def calibration_prompts(model_dir: str | Path, tokens: int, length: int, vocab: int) -> list[list[int]]:
    """Prompts of `length` tokens: the stdlib corpus' train split if the model has a tokenizer, else random ids."""
    tok_path = Path(model_dir) / "tokenizer.json"
    ids: list[int] = []
    if tok_path.is_file():
        from edge_node.model import Tokenizer
        from emulation.corpus import corpus_files

        tok = Tokenizer.from_dir(model_dir)
        for path in corpus_files("train")[::50]:  # a spread of packages, not one
            ids += tok.encode(path.read_text(encoding="utf-8"), add_special_tokens=False)
            if len(ids) >= tokens:
                break
    if len(ids) < tokens:
        ids = np.random.RandomState(0).randint(0, vocab, tokens).tolist()
    ids = ids[:tokens]
    return [ids[i : i + length] for i in range(0, len(ids), length)]


def float_graphs(model: Transformer, opts: PrefillOptions, root: Path) -> list[GraphSpec]:
    """Reuse graphs in root when they match chunk, context and groups; export otherwise."""
    try:
        specs = load_specs(root)
        if (specs[0].chunk, specs[0].context, len(specs)) == (opts.chunk, opts.context, opts.groups):
            return specs
    except (FileNotFoundError, KeyError, IndexError, TypeError):  # TypeError: graphs.json of an older layout
        pass
    return export_chunk_graphs(model, root, opts.chunk, opts.context, opts.groups)


def build_prefill(model: Transformer, model_dir: str | Path, opts: PrefillOptions) -> ChunkedPrefill:
    """Export (and quantize) graphs for `model`, open sessions on the options' provider."""
    if opts.graph_dir is None:
        # Sessions hold their weights in memory once opened, so the graphs need not outlive this call.
        with tempfile.TemporaryDirectory(prefix="edgefed-prefill-") as tmp:
            return build_prefill(model, model_dir, replace(opts, graph_dir=tmp))
    root = Path(opts.graph_dir)
    specs = float_graphs(model, opts, root)
    if opts.int8:
        cached, missing = _int8_specs(specs, opts.int8_mode)
        if missing:
            prompts = calibration_prompts(model_dir, opts.calib_tokens, opts.context, model.config.vocab_size)
            feeds = record_calibration(model, specs, prompts, opts.threads)
            cached = build_int8(specs, feeds, root, opts.int8_mode, opts.hot_fraction)
        specs = cached
    return open_prefill(model, specs, opts)


def _int8_specs(specs: list[GraphSpec], mode: str) -> tuple[list[GraphSpec], list[str]]:
    """The int8 copies of float `specs` (where build_int8 writes them) and the names of those not built yet."""
    paths = [int8_path(s.path, mode) for s in specs]
    missing = [p.name for p in paths if not p.is_file()]
    return [replace(s, path=str(p)) for s, p in zip(specs, paths, strict=True)], missing


def open_prefill_dir(model: Transformer, opts: PrefillOptions) -> ChunkedPrefill:
    """Open graphs an earlier `edgefed prefill --graph-dir` exported (and quantized); export nothing.

    For runtimes that do not hold the whole checkpoint, such as a tensor-parallel rank 0: `model`
    only needs the config and rotary table (a Transformer without blocks will do).
    """
    root = Path(opts.graph_dir or "")
    try:
        specs = load_specs(root)
    except (FileNotFoundError, KeyError, TypeError):
        raise ValueError(f"{root}: no exported chunk graphs (graphs.json); export them first with "
                         f"`edgefed prefill --model DIR --graph-dir {root} --chunk N --context T`") from None
    if opts.int8:
        specs, missing = _int8_specs(specs, opts.int8_mode)
        if missing:
            raise ValueError(f"{root}: no int8 ({opts.int8_mode}) graphs: {', '.join(missing)}; build them with "
                             f"`edgefed prefill --model DIR --graph-dir {root} --int8"
                             f"{' --shadow' if opts.shadow else ''}`")
    return open_prefill(model, specs, replace(opts, chunk=specs[0].chunk, context=specs[0].context))


def open_prefill(model: Transformer, specs: list[GraphSpec], opts: PrefillOptions) -> ChunkedPrefill:
    """Sessions per layer group: accelerator-queue groups on the provider, CPU-queue groups on the CPU EP."""
    placement = alternate(len(specs)) if opts.out_of_order else {g: "accel" for g in range(len(specs))}
    sessions = [make_session(s.path, opts.provider if placement[g] == "accel" else "cpu", opts.strict, opts.threads)
                for g, s in enumerate(specs)]
    prefill = ChunkedPrefill(model, specs, sessions=sessions)
    prefill.scheduler = OutOfOrder(placement) if opts.out_of_order else None
    return prefill


def add_prefill_args(p) -> None:
    """Flags for `edgefed generate` (and any runtime command) to prefill on ONNX Runtime."""
    from .providers import PROFILES

    p.add_argument("--prefill", choices=["torch", "ort"], default="torch", help="who prefills the prompt")
    p.add_argument("--chunk", type=int, choices=(32, 64, 128, 256), default=128, help="with --prefill ort")
    p.add_argument("--provider", choices=list(PROFILES), default="cpu", help="with --prefill ort")
    p.add_argument("--strict", action="store_true", help="with --prefill ort: no CPU fall-back")
    p.add_argument("--int8", action="store_true", help="with --prefill ort: W8A8 linear layers")
    p.add_argument("--shadow", action="store_true", help="with --int8: shadow outlier execution")
    p.add_argument("--graph-dir", help="with --prefill ort: keep and reuse exported graphs")


def prefill_step_from_args(model: Transformer, model_dir: str | Path, args, prompt_len: int, on_prefill=None):
    """None for --prefill torch; else a decode_loop `step` whose first call prefills on ONNX Runtime.

    `on_prefill(PrefillResult)` is called once the prompt is prefilled (provider used, timings).
    """
    from .prefill import ort_prefill_step

    if getattr(args, "prefill", "torch") != "ort":
        return None
    opts = options_from_args(args, round_up(prompt_len, args.chunk))
    return ort_prefill_step(model, build_prefill(model, model_dir, opts), on_prefill)


def options_from_args(args, context: int) -> PrefillOptions:
    """PrefillOptions from the add_prefill_args flags, for graphs holding `context` tokens."""
    if args.shadow and not args.int8:
        raise ValueError("--shadow needs --int8")
    return PrefillOptions(args.chunk, context, provider=args.provider, strict=args.strict, int8=args.int8,
                          shadow=args.shadow, threads=getattr(args, "threads", None), graph_dir=args.graph_dir)
