"""`edgefed import-gguf`: a GGUF file (llama.cpp's format) to a Hugging Face model directory."""

from __future__ import annotations

import argparse
import sys

from edgefed.args import emit


def add_parser(sub) -> None:
    p = sub.add_parser("import-gguf", help="convert a Llama GGUF file into a Hugging Face model directory "
                                           "(dequantized safetensors, config, tokenizer, chat template)")
    p.add_argument("file", help="the .gguf file")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="dtype of the dequantized weights (default: float32)")
    p.add_argument("--force", action="store_true", help="replace the model files in a non-empty --out directory")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from quant.gguf import import_gguf

    result = import_gguf(args.file, args.out, args.dtype, args.force)
    for note in result["notes"]:
        print(f"edgefed import-gguf: note: {note}", file=sys.stderr)
    if args.json:
        emit(result, True)
        return 0
    types = ", ".join(f"{n} {t}" for t, n in sorted(result["gguf_types"].items()))
    print(f"imported {result['tensors']} tensors ({types}) as {result['dtype']} "
          f"({result['bytes'] / 2**20:.1f} MiB) into {result['out']} in {result['seconds']} s", file=sys.stderr)
    if not result["tokenizer"]:
        print("edgefed import-gguf: note: the file has no tokenizer metadata: no tokenizer.json written "
              "(use --prompt-ids)", file=sys.stderr)
    return 0
