"""From a model directory and options to a ready ChunkedPrefill: export, calibrate, quantize, open sessions.

This is the offline half (gpt-fast's "quantize" step): on a device it runs once ahead
of time and the graphs are kept in `graph_dir`; the timings reported for a prefill
never include it.
"""

from __future__ import annotations

import glob
import tempfile
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np

from edge_node.model import EdgefedError, Transformer

from . import quantize
from .export import (
    EXPORT_FORMAT,
    GraphSpec,
    export_chunk_graphs,
    export_provenance,
    load_specs,
    read_graphs_json,
    weights_digest,
    write_graphs_json,
)
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


__all__ = ["GraphDirError", "PrefillOptions", "build_prefill", "calibration_prompts", "int8_recipe", "open_prefill",
           "open_prefill_dir", "prefill_step", "round_up", "weights_digest"]


class GraphDirError(EdgefedError, ValueError):
    """A graph directory lacks the exported graphs a run asks for, or holds graphs built from other weights
    or with other options than the run's."""


def int8_recipe(opts: PrefillOptions) -> dict:
    """Everything besides the float graphs that the int8 copies are built with (graphs.json records it per mode):
    copies built with other settings are rebuilt or refused, not reused. The calibration text is left out: the
    command line always passes the same corpus spread."""
    recipe = {"mode": opts.int8_mode, "smooth_alpha": quantize.own_smooth(opts.int8_mode),
              "rotate_block": quantize.ROTATE_BLOCK,
              "quantize_outputs": quantize.QUANTIZE_OUTPUTS, "hot_fraction": opts.hot_fraction,
              "calib_tokens": opts.calib_tokens}
    if opts.int8_mode in quantize.PER_TOKEN:
        recipe |= {"rotate_inputs": True, "gptq": quantize.TOKEN_GPTQ}
    if opts.int8_mode in quantize.FUSED:
        two_pass, two_level = quantize.mode_roles(opts.int8_mode)
        recipe |= {"two_pass": list(two_pass), "two_level": list(two_level), "fused_scales": True}
    if opts.int8_mode == "fine":
        recipe |= {"fine": quantize.fine_step("fine")}
    return recipe | ({"block": quantize.BLOCK} if opts.int8_mode == "block" else {})


def _read_dir(root: Path) -> tuple[list[GraphSpec], dict] | None:
    """The graphs root lists and its graphs.json record; None when it has no readable one listing any."""
    try:
        specs, record = load_specs(root), read_graphs_json(root)
    except (FileNotFoundError, ValueError, KeyError, TypeError):  # ValueError: not JSON or not a graph list
        return None
    return (specs, record) if specs else None


def _drop_int8(root: Path, specs: Iterable[GraphSpec], mode: str | None = None) -> None:
    """Remove from root the int8 copies (every mode, or one) of the float graphs `specs`: they are of other
    weights or settings, and a later build must not find them in place of its own. By file name within root,
    never by the path graphs.json recorded (a copied graph directory records the original's paths)."""
    for s in specs:
        for f in root.glob(f"{glob.escape(Path(s.path).stem)}.int8-{mode or ''}*"):
            f.unlink(missing_ok=True)


def float_graphs(model: Transformer, opts: PrefillOptions, root: Path, weights: str | None = None) -> list[GraphSpec]:
    """Reuse the graphs in root when graphs.json records that they were exported from these weights (the model
    directory's weights_digest) with these options; export them again otherwise (always when weights is None:
    graphs of unknown weights are never reused). A new export removes the int8 copies of the graphs it replaces.
    """
    found = _read_dir(root)
    if found is not None:
        specs, record = found
        if (weights is not None and record["provenance"] == export_provenance(weights, opts.chunk, opts.context,
                                                                               opts.groups,
                                                                               fused=opts.fused)
                and all(Path(s.path).is_file() for s in specs)):
            return specs
    old = found[0] if found is not None else []
    specs = export_chunk_graphs(model, root, opts.chunk, opts.context, opts.groups, weights=weights,
                                fused=opts.fused)
    _drop_int8(root, old + specs)
    return specs


def build_prefill(model: Transformer, model_dir: str | Path, opts: PrefillOptions,
                  calibration: Iterable[str] = ()) -> ChunkedPrefill:
    """Export (and quantize) graphs for `model`, open sessions on the options' provider.

    Graphs already in opts.graph_dir are reused only when they were built from the weights in `model_dir` and
    with these options (graphs.json's record); otherwise they are rebuilt in place.
    `calibration`: texts the int8 ranges are calibrated on (random ids when empty).
    """
    if opts.graph_dir is None:
        # Sessions hold their weights in memory once opened, so the graphs need not outlive this call. A fresh
        # directory holds nothing to reuse, so the weights need no digest.
        with tempfile.TemporaryDirectory(prefix="edgefed-prefill-") as tmp:
            return _build(model, model_dir, replace(opts, graph_dir=tmp), calibration, None)
    return _build(model, model_dir, opts, calibration, weights_digest(model_dir))


def _build(model: Transformer, model_dir: str | Path, opts: PrefillOptions, calibration: Iterable[str],
           weights: str | None) -> ChunkedPrefill:
    root = Path(opts.graph_dir)
    specs = float_graphs(model, opts, root, weights)
    if opts.int8:
        recipe = int8_recipe(opts)
        cached, missing = _int8_specs(specs, recipe)
        if missing or read_graphs_json(root)["int8"].get(opts.int8_mode) != recipe:
            _drop_int8(root, specs, opts.int8_mode)  # copies of this mode built with another recipe
            prompts = calibration_prompts(model_dir, calibration, opts.calib_tokens, opts.context,
                                          model.config.vocab_size)
            feeds = record_calibration(model, specs, prompts, opts.threads)
            cached = build_int8(specs, feeds, root, opts.int8_mode, opts.hot_fraction, recipe["smooth_alpha"],
                                recipe["rotate_block"], block=recipe.get("block", quantize.BLOCK),
                                gptq=recipe.get("gptq", quantize.TOKEN_GPTQ), two_pass=recipe.get("two_pass"),
                                two_level=recipe.get("two_level"), fine=recipe.get("fine"))
            record = read_graphs_json(root)
            record["int8"][opts.int8_mode] = recipe
            write_graphs_json(root, record)
        specs = cached
    return open_prefill(model, specs, opts)


def _int8_specs(specs: list[GraphSpec], recipe: dict) -> tuple[list[GraphSpec], list[str]]:
    """The int8 copies of float `specs` (where build_int8 writes them) and the names of those not built yet."""
    paths = [int8_path(s.path, recipe["mode"], recipe["smooth_alpha"], recipe["rotate_block"],
                       block=recipe.get("block", quantize.BLOCK), gptq=recipe.get("gptq", quantize.TOKEN_GPTQ),
                       two_pass=recipe.get("two_pass"), two_level=recipe.get("two_level"), fine=recipe.get("fine"))
             for s in specs]
    missing = [p.name for p in paths if not p.is_file()]
    return [replace(s, path=str(p)) for s, p in zip(specs, paths, strict=True)], missing


def _differences(found: dict | None, want: dict) -> str:
    if not found:
        return "no record of them"
    return ", ".join(f"{k} {found.get(k)!r} (now {v!r})" for k, v in want.items() if found.get(k) != v)


def open_prefill_dir(model: Transformer, opts: PrefillOptions, expected_digest: str | None = None) -> ChunkedPrefill:
    """Open graphs an earlier `edgefed prefill --graph-dir` exported (and quantized); export nothing.

    For runtimes that do not hold the whole checkpoint, such as a tensor-parallel rank 0: `model`
    only needs the config and rotary table (a Transformer without blocks will do).
    expected_digest: weights_digest of the model directory the run's weights come from; GraphDirError when the
    graphs record another. None checks only that the graphs record their provenance, in this edgefed's export
    format, and (with int8) that the int8 copies were built with the run's settings.
    """
    root = Path(opts.graph_dir or "")
    found = _read_dir(root)
    if found is None:
        raise GraphDirError(f"{root}: no exported chunk graphs (graphs.json); export them first with "
                            f"`edgefed prefill --model DIR --graph-dir {root} --chunk N --context T`")
    specs, record = found
    groups = f" --groups {len(specs)}" if len(specs) > 1 else ""
    command = (f"edgefed prefill --model DIR --graph-dir {root} --chunk {specs[0].chunk} "
               f"--context {specs[0].context}{groups}")
    again = f"re-export them with `{command}`"
    prov = record["provenance"]
    if prov is None:
        raise GraphDirError(f"{root}: the chunk graphs there do not record what they were exported from "
                            f"(an older edgefed exported them), so they may be of other weights; {again}")
    if prov.get("format") != EXPORT_FORMAT:
        raise GraphDirError(f"{root}: chunk graphs of export format {prov.get('format')!r}, this edgefed "
                            f"reads format {EXPORT_FORMAT}; {again}")
    if expected_digest is not None and prov.get("weights") != expected_digest:
        raise GraphDirError(f"{root}: the chunk graphs there were exported from other weights (digest "
                            f"{str(prov.get('weights'))[:12]}, the model's is {expected_digest[:12]}); {again}")
    if specs[0].fused and not opts.fused:
        raise GraphDirError(f"{root}: the chunk graphs there attend through ONNX Runtime's GroupQueryAttention, "
                            f"which only the CPU runs, and --strict on {opts.provider} forbids the CPU fall-back; "
                            f"re-export them with `{command} --plain-attention`")
    if opts.int8:
        recipe = int8_recipe(opts)
        rebuild = (f"`edgefed prefill --model DIR --graph-dir {root} --chunk {specs[0].chunk} --context "
                   f"{specs[0].context}{groups} --int8{' --shadow' if opts.shadow else ''}"
                   f"{' --block' if opts.block else ''}{' --token' if opts.token else ''}"
                   f"{' --token2' if opts.token2 else ''}{' --fine' if opts.fine else ''}`")
        specs, missing = _int8_specs(specs, recipe)
        if missing:
            raise GraphDirError(f"{root}: no int8 ({opts.int8_mode}) graphs: {', '.join(missing)}; build them with "
                                f"{rebuild}")
        built = record["int8"].get(opts.int8_mode)
        if built != recipe:
            raise GraphDirError(f"{root}: the int8 ({opts.int8_mode}) graphs there were built with other settings "
                                f"({_differences(built, recipe)}); rebuild them with {rebuild}")
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
