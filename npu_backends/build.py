"""From a model directory and options to a ready ChunkedPrefill: export, calibrate, quantize, open sessions.

This is the offline half (gpt-fast's "quantize" step): on a device it runs once ahead
of time and the graphs are kept in `graph_dir`; the timings reported for a prefill
never include it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np

from edge_node.model import EdgefedError, Transformer

from .export import GraphSpec, export_chunk_graphs, load_specs
from .options import PrefillOptions, round_up
from .prefill import ChunkedPrefill
from .providers import make_session
from .quantize import build_int8, int8_path, record_calibration
from .schedule import OutOfOrder, alternate


def calibration_prompts(model_dir: str | Path, texts: Iterable[str], tokens: int, length: int,
                        vocab: int) -> list[list[int]]:
    """Prompts of `length` tokens from `texts` (consumed lazily until `tokens` are in), tokenized with the
    model's tokenizer; random ids when the model has no tokenizer or the texts run short.

    The caller chooses the text (the command line passes a spread of the stdlib corpus): the runtime
    never reads a corpus of its own.
    """
    tok_path = Path(model_dir) / "tokenizer.json"
    ids: list[int] = []
    if tok_path.is_file():
        from edge_node.model import Tokenizer

        tok = Tokenizer.from_dir(model_dir)
        for text in texts:
            ids += tok.encode(text, add_special_tokens=False)
            if len(ids) >= tokens:
                break
    if len(ids) < tokens:
        ids = np.random.RandomState(0).randint(0, vocab, tokens).tolist()
    ids = ids[:tokens]
    return [ids[i : i + length] for i in range(0, len(ids), length)]


__all__ = ["GraphDirError", "PrefillOptions", "build_prefill", "calibration_prompts", "open_prefill",
           "open_prefill_dir", "prefill_step", "round_up"]


class GraphDirError(EdgefedError, ValueError):
    """A graph directory lacks the exported graphs a run asks for."""


def float_graphs(model: Transformer, opts: PrefillOptions, root: Path) -> list[GraphSpec]:
    """Reuse graphs in root when they match chunk, context and groups; export otherwise."""
    try:
        specs = load_specs(root)
        if (specs[0].chunk, specs[0].context, len(specs)) == (opts.chunk, opts.context, opts.groups):
            return specs
    except (FileNotFoundError, KeyError, IndexError, TypeError):  # TypeError: graphs.json of an older layout
        pass
    return export_chunk_graphs(model, root, opts.chunk, opts.context, opts.groups)


def build_prefill(model: Transformer, model_dir: str | Path, opts: PrefillOptions,
                  calibration: Iterable[str] = ()) -> ChunkedPrefill:
    """Export (and quantize) graphs for `model`, open sessions on the options' provider.

    `calibration`: texts the int8 ranges are calibrated on (random ids when empty).
    """
    if opts.graph_dir is None:
        # Sessions hold their weights in memory once opened, so the graphs need not outlive this call.
        with tempfile.TemporaryDirectory(prefix="edgefed-prefill-") as tmp:
            return build_prefill(model, model_dir, replace(opts, graph_dir=tmp), calibration)
    root = Path(opts.graph_dir)
    specs = float_graphs(model, opts, root)
    if opts.int8:
        cached, missing = _int8_specs(specs, opts.int8_mode)
        if missing:
            prompts = calibration_prompts(model_dir, calibration, opts.calib_tokens, opts.context,
                                          model.config.vocab_size)
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
        raise GraphDirError(f"{root}: no exported chunk graphs (graphs.json); export them first with "
                         f"`edgefed prefill --model DIR --graph-dir {root} --chunk N --context T`") from None
    if opts.int8:
        specs, missing = _int8_specs(specs, opts.int8_mode)
        if missing:
            raise GraphDirError(f"{root}: no int8 ({opts.int8_mode}) graphs: {', '.join(missing)}; build them with "
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


def prefill_step(model: Transformer, model_dir: str | Path, opts: PrefillOptions, calibration: Iterable[str] = (),
                 on_prefill=None):
    """A decode_loop `step` whose first call prefills on ONNX Runtime (graphs built or reused per `opts`).

    `on_prefill(PrefillResult)` is called once the prompt is prefilled (provider used, timings).
    """
    from .prefill import ort_prefill_step

    return ort_prefill_step(model, build_prefill(model, model_dir, opts, calibration), on_prefill)
