"""int8 against float on real text: top-1 agreement, logit error over every prompt position, and where the
error enters (relative error of the residual stream before every RMSNorm, layer by layer)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper

from edge_node.model import Transformer

from .export import GraphSpec
from .prefill import ChunkedPrefill
from .providers import make_session


@dataclass(frozen=True)
class Agreement:
    positions: int
    top1: float  # share of positions whose argmax matches the reference
    mean_abs_err: float  # mean over positions of mean |logit difference|
    max_abs_err: float

    def recovered_by(self, better: Agreement) -> float:
        """Share of this variant's mean logit error that `better` removes (1.0 = all of it)."""
        return 1.0 - better.mean_abs_err / self.mean_abs_err if self.mean_abs_err else 0.0


class Tally:
    """Top-1 agreement and logit errors, accumulated over (rows, vocab) blocks of reference and test logits."""

    def __init__(self):
        self.same = self.total = 0
        self.err_sum = self.err_max = 0.0

    def add(self, ref: np.ndarray, got: np.ndarray) -> None:
        """ref, got (rows, vocab)."""
        diff = np.abs(ref - got)
        self.same += int((ref.argmax(-1) == got.argmax(-1)).sum())
        self.total += ref.shape[0]
        self.err_sum += float(diff.mean(-1).sum())
        self.err_max = max(self.err_max, float(diff.max()))

    def result(self) -> Agreement:
        return Agreement(self.total, self.same / max(self.total, 1), self.err_sum / max(self.total, 1), self.err_max)


def agreement(reference: ChunkedPrefill, test: ChunkedPrefill, prompts: Sequence[Sequence[int]]) -> Agreement:
    """Compare two prefills row by row (use graphs exported with all_logits=True to see every position)."""
    tally = Tally()
    for p in prompts:
        tally.add(np.concatenate(reference.run(p).rows), np.concatenate(test.run(p).rows))  # (positions, vocab)
    return tally.result()


# --- every position from the ordinary (last-row) graphs, and the error layer by layer --------------------

def residual_points(path: str | Path) -> list[str]:
    """The residual stream at every RMSNorm of a chunk graph, in order: the input of each Pow node (the
    exporter writes RMSNorm out as x.pow(2)...): before layer i's attention, before its MLP, ..., and in the
    last group before the final norm (every row: taken before the Gather of the `last_index` row)."""
    g = onnx.load(str(path), load_external_data=False).graph
    producer = {o: n for n in g.node for o in n.output}
    points = []
    for n in g.node:
        if n.op_type == "Pow":
            x = n.input[0]
            row = producer.get(x)
            if row is not None and row.op_type == "Gather" and row.input[1] == "last_index":
                x = row.input[0]  # (1, N, hidden) before the one row is picked
            points.append(x)
    return points


def probe_copy(spec: GraphSpec) -> GraphSpec:
    """A copy of the graph (beside it, sharing its weights file) that also outputs every residual point."""
    path = Path(spec.path)
    m = onnx.load(str(path), load_external_data=False)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(helper.make_empty_tensor_value_info(x) for x in residual_points(path) if x not in have)
    probe = path.with_name(path.stem + ".probe.onnx")
    onnx.save_model(m, str(probe))
    return dataclasses.replace(spec, path=str(probe))


class _Capture:
    """A session that returns the graph's own outputs and keeps the probe outputs after them."""

    def __init__(self, sess, own: int):
        self.sess, self.own, self.extra = sess, own, []

    def run(self, outputs, feeds):
        outs = self.sess.run(outputs, feeds)
        self.extra.append(outs[self.own:])
        return outs[: self.own]

    def get_providers(self):
        return self.sess.get_providers()

    def get_inputs(self):
        return self.sess.get_inputs()


class ProbedPrefill:
    """Chunked prefill that also returns the residual stream at every RMSNorm for every position."""

    def __init__(self, model: Transformer, specs: Sequence[GraphSpec], threads: int | None = None):
        self.model = model
        probes = [probe_copy(s) for s in specs]
        own = [len(onnx.load(s.path, load_external_data=False).graph.output) for s in specs]
        try:
            self.captures = [_Capture(make_session(p.path, "cpu", threads=threads), k)
                             for p, k in zip(probes, own, strict=True)]
        finally:
            for p in probes:
                Path(p.path).unlink(missing_ok=True)  # the session holds the graph
        self.prefill = ChunkedPrefill(model, specs, sessions=self.captures)

    def run(self, prompt: Sequence[int]) -> list[np.ndarray]:
        """Every residual point, each (positions, hidden), in graph order over the layer groups."""
        for c in self.captures:
            c.extra = []
        self.prefill.run(prompt)
        points = []
        for c in self.captures:  # per group: chunks x points -> points of (positions, hidden)
            for k in range(len(c.extra[0])):
                rows = np.concatenate([chunk[k][0] for chunk in c.extra])  # (chunks * N, hidden)
                points.append(rows[: len(prompt)])
        return points


@dataclass(frozen=True)
class Evaluation:
    agreement: Agreement
    # mean over positions of |h_test - h_ref| / |h_ref| at each residual point: [0] the embeddings, then per
    # layer i [2i + 1] after its attention and [2i + 2] after its MLP (the last one feeds the final norm)
    relative_error: list[float]

    def per_layer(self) -> list[dict]:
        e = self.relative_error
        return [{"layer": i, "after_attention": e[2 * i + 1], "after_mlp": e[2 * i + 2]}
                for i in range((len(e) - 1) // 2)]


def evaluate(model: Transformer, reference: Sequence[GraphSpec], test: Sequence[GraphSpec],
             prompts: Sequence[Sequence[int]], threads: int | None = None, rows: int = 128) -> Evaluation:
    """Top-1 agreement over every position and the error layer by layer, from ordinary (last-row) graphs.

    Every position's logits come from the final residual point through the model's own float head,
    `rows` positions at a time (the head stays float in every int8 variant, so this is the graph's head
    applied to all rows; a 49k or 65k vocabulary then never needs a (positions, vocab) graph output).
    """
    ref_run, test_run = ProbedPrefill(model, reference, threads), ProbedPrefill(model, test, threads)
    tally, err_sum, count = Tally(), None, 0
    for p in prompts:
        ref, got = ref_run.run(p), test_run.run(p)
        rel = np.array([_relative(a, b).sum() for a, b in zip(ref, got, strict=True)])
        err_sum = rel if err_sum is None else err_sum + rel
        count += len(p)
        for r0 in range(0, len(p), rows):
            tally.add(_logits(model, ref[-1][r0 : r0 + rows]), _logits(model, got[-1][r0 : r0 + rows]))
    return Evaluation(tally.result(), (err_sum / max(count, 1)).tolist())


def _relative(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Per position |got - ref| / |ref| (positions,)."""
    return np.linalg.norm(got - ref, axis=-1) / np.maximum(np.linalg.norm(ref, axis=-1), 1e-30)


def _logits(model: Transformer, h: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model.logits(torch.from_numpy(h)[None].to(model.dtype))[0].float().numpy()  # (rows, vocab)
