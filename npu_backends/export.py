"""Static-shape chunk graphs exported from edgefed's own model (so every loadable checkpoint exports).

A prompt runs through the graph N tokens at a time. Every input has a fixed shape, as
NPU compilers (QNN HTP, OpenVINO NPU, CoreML) require:

    input_ids (1, N) int64          first layer group only (else hidden (1, N, hidden) float)
    cos, sin (N, D) float           RoPE rows for the chunk's positions, computed on the host
    mask (1, 1, N, C + N) float     additive; keys are C past slots then the chunk's own N
    past_k_{i}, past_v_{i} (1, Hkv, C, D) per layer i of the group (T slots in fused graphs); absent when C = 0
    seqlens_k (1,) int32, total_sequence_length () int32   fused graphs: pos0 + N - 1 and pos0 + N
    last_index (1,) int64           last layer group only: the row whose logits are wanted

The graphs hold a context of T tokens (the longest prompt they take, a multiple of N)
and have C = T - N past slots: the last chunk starts at position T - N at most, so more
past slots would only ever be masked, yet every chunk would pay attention over them.

Outputs: hidden (1, N, hidden) or, for the last group, logits (1, 1, vocab); and
present_k_{i}, present_v_{i} (1, Hkv, N, D), the chunk's own K/V, which the host writes
into its cache (in fused graphs (1, Hkv, T, D): the past buffer with those rows written at pos0, which
the host binds to its own cache so that they are written in place). Layer groups [a, b) give the
per-block subgraphs the scheduler runs.
Attention stays float, so quantization leaves it alone. In fused graphs (the default when there are past
slots) every layer runs ONNX Runtime's GroupQueryAttention, which reads only the pos0 written past slots (a
sliding window as its local_window_size) and needs no mask inputs; a chunk attending through a mask pays for
all C slots, written or not (~35 ms of a 128-token SmolLM2 chunk at C = 384). fused=False exports standard
ONNX ops only, for an accelerator that must take every node. GroupQueryAttention is a CPU (and CUDA) contrib
op: an NPU EP leaves it to the CPU, where mllm-NPU keeps attention too.

graphs.json, beside the graphs, lists them and records what they were built from (their
provenance): a digest of the checkpoint's files (weights_digest) and the export options.
A graph directory is reused only while that record matches the model and options at hand.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from edge_node.model import Transformer, layout
from edge_node.model.errors import UsageError
from edge_node.model.formats import weights_digest  # noqa: F401  (re-exported for callers of export)
from edge_node.model.model import visible
from edge_node.model.rope import apply_rotary

CHUNK_SIZES = (32, 64, 128, 256)
OPSET = 17
# Version of the exported graphs and graphs.json: bump it whenever a change here (inputs, outputs, the math of a
# layer) makes graphs exported earlier wrong for this code, so that they are rebuilt rather than reused.
EXPORT_FORMAT = 4
GRAPHS_JSON = "graphs.json"


@dataclass(frozen=True)
class GraphSpec:
    """One exported subgraph: layers [start, end) at chunk N, for prompts up to `context` tokens."""

    path: str
    start: int
    end: int
    chunk: int
    context: int  # T: tokens the graphs hold
    past: int  # C = T - N past K/V slots per layer
    first: bool
    last: bool
    windows: tuple[int | None, ...]  # the distinct attention windows
    all_logits: bool = False  # last group: logits for every row (1, N, vocab), for evaluation
    # every layer runs ONNX Runtime's GroupQueryAttention over the written past slots only (its window as the op's
    # local_window_size; no mask inputs: seqlens_k and total_sequence_length instead). False: every layer attends
    # through an additive mask.
    fused: bool = False

    @property
    def past_slots(self) -> int:
        """Past K/V slots every layer reads. A fused graph takes the host's whole T-slot cache: the op reads
        only the written slots, so more cost nothing, and the host binds its buffer as it is instead of copying
        its first C slots out of it."""
        return self.context if self.fused else self.past

    @property
    def mask_windows(self) -> tuple[int | None, ...]:
        """The windows that take an additive mask input, one each (none in a fused graph)."""
        return () if self.fused else self.windows


def _mask_name(window: int | None) -> str:
    return "mask" if window is None else f"mask_w{window}"


class _FusedAttention(torch.autograd.Function):
    """Causal attention of a chunk over the written past slots and its own rows, exported as ONNX Runtime's
    com.microsoft GroupQueryAttention (contrib op of the CPU and CUDA EPs).

    The op reads the past only up to its written length (seqlens_k) instead of every slot under a mask, and
    fuses the scale, softmax and both products: a chunk no longer pays for the slots it cannot see. Inputs:
    q (1, N, H*D) and k, v (1, N, Hkv*D) after RoPE, past K/V (1, Hkv, slots, D) with slots [0, pos0) written,
    seqlens_k (1,) int32 = pos0 + N - 1, total_sequence_length () int32 = pos0 + N. Outputs: the attention
    (1, N, H*D) and the present K/V, the past buffer with the chunk's rows written at [pos0, pos0 + N). When the
    host binds a layer's past and present to one buffer (prefill.py), the op writes those rows in place and
    copies nothing else. An accelerator EP leaves the node to the CPU, as mllm-NPU keeps attention there;
    export with fused=False for the masked standard ops instead.
    """

    @staticmethod
    def forward(ctx, q, k, v, past_k, past_v, seqlens_k, total, heads: int, kv_heads: int, window: int | None):
        n, d = q.shape[1], past_k.shape[-1]
        pos0 = int(total) - n
        mask = torch.where(visible_slots(pos0, n, past_k.shape[2], window), 0.0, -1e9)  # (N, slots+N)
        k, v = (t.view(1, n, kv_heads, d).transpose(1, 2) for t in (k, v))
        y = _grouped_attention(q.view(1, n, heads, d).transpose(1, 2), torch.cat([past_k, k], dim=2),
                               torch.cat([past_v, v], dim=2), mask[None, None])
        present_k, present_v = past_k.clone(), past_v.clone()
        present_k[:, :, pos0:pos0 + n], present_v[:, :, pos0:pos0 + n] = k, v
        return y, present_k, present_v

    @staticmethod
    def symbolic(g, q, k, v, past_k, past_v, seqlens_k, total, heads, kv_heads, window):
        # local_window_size w: a query at q sees keys k with q - k < w, the model's `visible` (checked against it)
        local = {} if window is None else {"local_window_size_i": window}
        out, present_k, present_v = g.op("com.microsoft::GroupQueryAttention", q, k, v, past_k, past_v, seqlens_k,
                                         total, num_heads_i=heads, kv_num_heads_i=kv_heads, outputs=3, **local)
        # the exporter's own shape inference goes on through these; ONNX's does not (_with_fused_shapes)
        out.setType(q.type())
        present_k.setType(past_k.type())
        present_v.setType(past_v.type())
        return out, present_k, present_v


def visible_slots(pos0: int, n: int, past: int, window: int | None) -> torch.Tensor:
    """(N, past+N) bool over `past` slots (slot j holds position j, written only if j < pos0) then the chunk's
    own N positions: what query pos0 + i sees, by the model's one causal rule (`visible`)."""
    q = torch.arange(pos0, pos0 + n)[:, None]  # (N, 1) query positions
    keys = torch.cat([torch.arange(past), torch.arange(pos0, pos0 + n)])[None, :]  # (1, past+N) their positions
    written = torch.cat([torch.arange(past) < pos0, torch.ones(n, dtype=torch.bool)])[None, :]
    return visible(q, keys, window) & written


def _grouped_attention(q, keys, values, mask):
    """q (1, H, N, D) over keys/values (1, Hkv, C+N, D) with additive mask (1, 1, N, C+N) -> (1, N, H*D)."""
    _, hq, n, d = q.shape
    hkv = keys.shape[1]
    g = hq // hkv
    # Group queries by their KV head instead of repeating K/V: (1, Hkv, g*N, D).
    qg = q.reshape(1, hkv, g * n, d)
    scores = torch.matmul(qg, keys.transpose(-1, -2)) * (1.0 / math.sqrt(d))  # (1, Hkv, g*N, C+N)
    scores = scores.view(1, hkv, g, n, -1) + mask.unsqueeze(1)  # mask (1, 1, 1, N, C+N)
    probs = torch.softmax(scores, dim=-1).view(1, hkv, g * n, -1)
    y = torch.matmul(probs, values).view(1, hq, n, d)  # (1, H, N, D)
    return y.transpose(1, 2).reshape(1, n, hq * d)  # (1, N, H*D)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # Written out: the legacy exporter has no aten::rms_norm at opset 17.
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _plain(t: torch.Tensor | None) -> nn.Parameter | None:
    return None if t is None else nn.Parameter(t, requires_grad=False)


class _Layer(nn.Module):
    """One block's weights in plain (out, in) layout: the runtime may hold them oneDNN-packed."""

    def __init__(self, block, cfg):
        super().__init__()
        att, mlp = block.attn, block.mlp
        self.ln1, self.ln2 = _plain(block.ln1.weight), _plain(block.ln2.weight)
        self.wqkv, self.bqkv = _plain(att.wqkv.weight), _plain(att.wqkv.bias)
        self.wo, self.bo = _plain(att.wo.weight), _plain(att.wo.bias)
        # gate and up as two MatMuls: the up output then feeds the down input's Mul directly, so
        # smoothing (smooth.py) can move down's input scale into up's weight; no Slice copies either.
        spec = layout.BY_NAME["w13"]
        gate_up = layout.unfuse(cfg, spec, mlp.w13.weight)  # (2*inter, hidden) -> 2 x (inter, hidden)
        gate_up_b = layout.unfuse(cfg, spec, mlp.w13.bias) if mlp.w13.bias is not None else (None, None)
        self.w1, self.w3 = (_plain(w.contiguous()) for w in gate_up)
        self.b1, self.b3 = (_plain(b) for b in gate_up_b)
        self.w2, self.b2 = _plain(mlp.w2.weight), _plain(mlp.w2.bias)
        self.heads, self.kv_heads, self.head_dim = att.heads, att.kv_heads, att.head_dim
        self.window = block.window

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.w1, self.b1), F.linear(x, self.w3, self.b3)
        return F.linear(F.silu(gate) * up, self.w2, self.b2)

    def attention(self, x, cos, sin, mask, past_k, past_v, fused=None):
        """fused: (seqlens_k, total_sequence_length) to attend through _FusedAttention instead of a mask."""
        n, d, hq, hkv = x.shape[1], self.head_dim, self.heads, self.kv_heads
        q, k, v = F.linear(x, self.wqkv, self.bqkv).split([hq * d, hkv * d, hkv * d], dim=-1)
        if fused is not None:
            # RoPE in the (1, N, heads, D) layout the op takes: no transposes around it.
            q = apply_rotary(q.view(1, n, hq, d), cos[:, None], sin[:, None]).reshape(1, n, hq * d)
            k = apply_rotary(k.view(1, n, hkv, d), cos[:, None], sin[:, None]).reshape(1, n, hkv * d)
            y, present_k, present_v = _FusedAttention.apply(q, k, v, past_k, past_v, *fused, hq, hkv, self.window)
            return F.linear(y, self.wo, self.bo), present_k, present_v  # presents: the whole (1, Hkv, T, D)
        q = q.view(1, n, hq, d).transpose(1, 2)  # (1, H, N, D)
        k = k.view(1, n, hkv, d).transpose(1, 2)  # (1, Hkv, N, D)
        v = v.view(1, n, hkv, d).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        keys = k if past_k is None else torch.cat([past_k, k], dim=2)  # (1, Hkv, C+N, D)
        values = v if past_v is None else torch.cat([past_v, v], dim=2)
        return F.linear(_grouped_attention(q, keys, values, mask), self.wo, self.bo), k, v


class ChunkGraph(nn.Module):
    """Layers [start, end) of a Transformer as a static-shape chunk step."""

    def __init__(self, model: Transformer, spec: GraphSpec):
        super().__init__()
        cfg = model.config
        start, end = spec.start, spec.end
        self.all_logits, self.mask_windows = spec.all_logits, spec.mask_windows
        self.fused = spec.fused  # every layer through _FusedAttention
        self.first, self.last = start == 0, end == cfg.num_layers
        self.eps = cfg.rms_norm_eps
        self.layers = nn.ModuleList(_Layer(model.blocks[str(i)], cfg) for i in range(start, end))
        self.embed = _plain(model.embed) if self.first else None
        self.norm = _plain(model.norm.weight) if self.last else None
        self.head = _plain(model.lm_head) if self.last else None  # (vocab, hidden)

    def forward(self, x, cos, sin, *rest):
        masks = dict(zip(self.mask_windows, rest[: len(self.mask_windows)], strict=True))
        rest = rest[len(self.mask_windows):]
        fused = rest[:2] if self.fused else None  # (seqlens_k, total_sequence_length)
        rest = rest[2:] if self.fused else rest
        has_index = self.last and not self.all_logits
        last_index = rest[-1] if has_index else None
        past = rest[:-1] if has_index else rest
        if not past:  # C = 0: a one-chunk context has no past inputs
            past = (None,) * (2 * len(self.layers))
        h = self.embed[x] if self.first else x  # (1, N) -> (1, N, hidden)
        presents = []
        for j, layer in enumerate(self.layers):
            a, k, v = layer.attention(_rms(h, layer.ln1, self.eps), cos, sin, masks.get(layer.window),
                                      past[2 * j], past[2 * j + 1], fused)
            h = h + a
            h = h + layer.mlp(_rms(h, layer.ln2, self.eps))
            presents += [k, v]
        if not self.last:
            return (h, *presents)
        row = h if self.all_logits else h.index_select(1, last_index)  # (1, N or 1, hidden)
        return (F.linear(_rms(row, self.norm, self.eps), self.head), *presents)


def input_names(spec: GraphSpec, layers: range) -> list[str]:
    names = ["input_ids" if spec.first else "hidden_in", "cos", "sin"]
    names += [_mask_name(w) for w in spec.mask_windows]
    names += ["seqlens_k", "total_sequence_length"] if spec.fused else []
    for i in layers if spec.past else ():
        names += [f"past_k_{i}", f"past_v_{i}"]
    return names + (["last_index"] if spec.last and not spec.all_logits else [])


def output_names(spec: GraphSpec, layers: range) -> list[str]:
    names = ["logits" if spec.last else "hidden"]
    for i in layers:
        names += [f"present_k_{i}", f"present_v_{i}"]
    return names


def example_inputs(model: Transformer, spec: GraphSpec) -> tuple[torch.Tensor, ...]:
    cfg = model.config
    n, c, d = spec.chunk, spec.past, cfg.head_dim
    x = torch.zeros(1, n, dtype=torch.long) if spec.first else torch.zeros(1, n, cfg.hidden_size)
    cos, sin = model.rotary.at(0, n)
    masks = [torch.zeros(1, 1, n, c + n) for _ in spec.mask_windows]
    if spec.fused:  # as for the context's last chunk: every past slot written
        masks += [torch.tensor([c + n - 1], dtype=torch.int32), torch.tensor(c + n, dtype=torch.int32)]
    past = [torch.zeros(1, cfg.num_key_value_heads, spec.past_slots, d)
            for _ in range(2 * (spec.end - spec.start) if c else 0)]
    tail = [torch.tensor([n - 1])] if spec.last and not spec.all_logits else []
    return (x, cos.float(), sin.float(), *masks, *past, *tail)


def check_static(path: str | Path) -> None:
    """Every graph input and output has a fully known shape (no symbolic or unknown dimensions)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    for vi in list(graph.input) + list(graph.output):
        if not vi.type.tensor_type.HasField("shape"):
            raise ValueError(f"{path}: {vi.name} has an unknown rank")
        dims = vi.type.tensor_type.shape.dim
        bad = [d for d in dims if not d.HasField("dim_value")]
        if bad:
            raise ValueError(f"{path}: {vi.name} has a dynamic dimension ({[str(d).strip() for d in dims]})")


def _with_fused_shapes(m: onnx.ModelProto, chunk: int, head_dim: int) -> onnx.ModelProto:
    """ONNX shape inference knows no com.microsoft op, so the exporter leaves every tensor after a
    GroupQueryAttention with symbolic dims. Its output is (1, N, heads * D), its query's shape, and its presents
    have their past's: state that, and infer the rest again (graph outputs included) so that the graph's shapes
    stay static."""
    g = m.graph
    fused = [n for n in g.node if n.op_type == "GroupQueryAttention"]
    if not fused:
        return m
    keep = [vi for vi in g.value_info if all(d.HasField("dim_value") for d in vi.type.tensor_type.shape.dim)]
    del g.value_info[:]
    g.value_info.extend(keep)
    inputs = {vi.name: vi for vi in g.input}
    known = {}
    for n in fused:
        heads = next(a.i for a in n.attribute if a.name == "num_heads")
        known[n.output[0]] = onnx.helper.make_tensor_value_info(n.output[0], onnx.TensorProto.FLOAT,
                                                                [1, chunk, heads * head_dim]).type
        for present, past in zip(n.output[1:], n.input[3:5], strict=True):  # presents: their past's shape
            known[present] = inputs[past].type
    for o in g.output:
        if o.name in known:  # a present straight out of the op
            o.type.CopyFrom(known.pop(o.name))
        else:
            o.type.tensor_type.ClearField("shape")
    for name, t in known.items():
        g.value_info.append(onnx.ValueInfoProto(name=name, type=t))
    return onnx.shape_inference.infer_shapes(m)


def export_group(model: Transformer, spec: GraphSpec) -> None:
    layers = range(spec.start, spec.end)
    module = ChunkGraph(model, spec).eval()
    # Over 2 GB the exporter writes one file per tensor; export into a scratch folder, then
    # gather the weights into one .data file beside the graph (Qwen2-0.5B with its embedding is 2.5 GB).
    with tempfile.TemporaryDirectory(dir=Path(spec.path).parent) as tmp:
        raw = str(Path(tmp) / "graph.onnx")
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, example_inputs(model, spec), raw, dynamo=False, opset_version=OPSET,
                              input_names=input_names(spec, layers), output_names=output_names(spec, layers),
                              do_constant_folding=True,
                              custom_opsets={"com.microsoft": 1} if spec.fused else None)
        graph = _with_fused_shapes(onnx.load(raw), spec.chunk, model.config.head_dim)
        onnx.save_model(graph, spec.path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=Path(spec.path).name + ".data", size_threshold=1024)
    check_static(spec.path)


def split_layers(num_layers: int, groups: int) -> list[tuple[int, int]]:
    """[start, end) ranges of near-equal size covering [0, num_layers)."""
    groups = max(1, min(groups, num_layers))
    bounds = [round(i * num_layers / groups) for i in range(groups + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


def export_provenance(weights: str | None, chunk: int, context: int, groups: int, all_logits: bool = False,
                      fused: bool = True) -> dict:
    """What graphs exported with these arguments are built from, as graphs.json records it.

    weights: weights_digest of the model's directory, None when unknown (such graphs are never reused for a
    model whose digest is known). groups is the count asked for (split_layers may make fewer).
    """
    return {"format": EXPORT_FORMAT, "weights": weights,
            "export": {"chunk": chunk, "context": context, "groups": groups, "all_logits": all_logits,
                       "fused_attention": fused}}


def export_chunk_graphs(model: Transformer, out_dir: str | Path, chunk: int, context: int,
                        groups: int = 1, all_logits: bool = False, weights: str | None = None,
                        fused: bool = True) -> list[GraphSpec]:
    """Export the model as `groups` layer-block subgraphs at chunk size `chunk`, for prompts up to `context` tokens.

    all_logits: the last group returns every row's logits (for evaluation) instead of one row's.
    fused: every layer attends through ONNX Runtime's GroupQueryAttention (when there are past slots);
    False keeps standard ONNX ops only (MatMul, Softmax and an additive mask), for EPs that must take every node.
    weights: the model directory's weights_digest, recorded in graphs.json (None: unknown).
    """
    if chunk not in CHUNK_SIZES:
        raise UsageError(f"chunk {chunk} is not one of the supported sizes {CHUNK_SIZES}")
    if model.embed is None or model.lm_head is None or model.layer_ids != list(range(model.config.num_layers)):
        raise UsageError("export needs the whole model (embeddings, every layer, head)")
    if context % chunk or context < chunk:
        raise UsageError(f"context {context} must be a positive multiple of the chunk {chunk}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The graphs are rewritten in place: drop the record first, so an export cut short leaves a directory that
    # reads as "no graphs" rather than one whose record describes files it no longer holds.
    (out / GRAPHS_JSON).unlink(missing_ok=True)
    cfg = model.config
    windows = tuple(sorted({cfg.window_for_layer(i) for i in range(cfg.num_layers)}, key=lambda w: w or 0))
    specs = []
    for a, b in split_layers(cfg.num_layers, groups):
        tag = "_all" if all_logits else ""
        # The name carries the past slots: graphs (and their int8 copies) of other layouts never match it.
        spec = GraphSpec(str(out / f"chunk{chunk}_ctx{context}_past{context - chunk}_L{a}-{b}{tag}.onnx"), a, b,
                         chunk, context, context - chunk, a == 0, b == cfg.num_layers, windows, all_logits,
                         fused and context > chunk)
        export_group(model, spec)
        specs.append(spec)
    write_graphs_json(out, {"provenance": export_provenance(weights, chunk, context, groups, all_logits, fused),
                            "graphs": [asdict(s) for s in specs], "int8": {}})
    return specs


def read_graphs_json(out_dir: str | Path) -> dict:
    """graphs.json as {"provenance": dict | None, "graphs": [GraphSpec fields], "int8": {mode: recipe}}.

    A bare list (the layout before provenance was recorded) reads with provenance None.
    Raises FileNotFoundError, or ValueError when the file is not such a record.
    """
    raw = json.loads((Path(out_dir) / GRAPHS_JSON).read_text())
    if isinstance(raw, list):
        return {"provenance": None, "graphs": raw, "int8": {}}
    if not isinstance(raw, dict) or not isinstance(raw.get("graphs"), list):
        raise ValueError(f"{Path(out_dir) / GRAPHS_JSON}: not a graph list")
    provenance = raw.get("provenance")
    return {"provenance": provenance if isinstance(provenance, dict) else None, "graphs": raw["graphs"],
            "int8": raw.get("int8") if isinstance(raw.get("int8"), dict) else {}}


def write_graphs_json(out_dir: str | Path, record: dict) -> None:
    """Replace graphs.json atomically (readers see the old record or the new one, never a partial file)."""
    path = Path(out_dir) / GRAPHS_JSON
    tmp = path.with_name(f".{GRAPHS_JSON}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


def load_specs(out_dir: str | Path) -> list[GraphSpec]:
    return [GraphSpec(**{**r, "windows": tuple(r["windows"])}) for r in read_graphs_json(out_dir)["graphs"]]


def load_provenance(out_dir: str | Path) -> dict | None:
    """The provenance graphs.json records (None for graphs exported before it was recorded)."""
    return read_graphs_json(out_dir)["provenance"]
