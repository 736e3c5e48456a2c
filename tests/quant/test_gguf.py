"""`edgefed import-gguf`: a GGUF written the way llama.cpp's converter writes one imports back to the checkpoint it
came from (logits within 1e-4 for F32, the dequantized weights for Q8_0/Q4_1), with the tokenizer transformers
builds; and the real SmolLM2-135M-Instruct (`make real-model`) generates transformers' greedy tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from edge_node.model import Tokenizer as EdgefedTokenizer
from edge_node.model import generate, load_model
from edgefed.cli import main
from quant.gguf import llama3_rope, unpermute_rows
from tests.checkpoints import make_checkpoint

VOCAB = 320  # 256 byte symbols + 3 special tokens + merges + a user-defined token + llama.cpp's [PAD] fillers
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2: make_checkpoint's bos 1 and eos 2
TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXTS = ["def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1)", "In 2024, 1,234,567 people paid $3.50.",
         "  two leading spaces\n\n\tand a tab", "naïve café 日本語 🚀", "<|im_start|>user\nhi<think><|im_end|>\n",
         "I've been 'told' he's there", "x = 12345; y = 0.001"]
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
# llama.cpp tensor names (gguf.TENSOR_NAMES for MODEL_ARCH.LLAMA)
GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
          "lm_head.weight": "output.weight"}
BLOCK = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
Q = gguf.GGMLQuantizationType
FILE_TYPES = {Q.F32: gguf.LlamaFileType.ALL_F32, Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
              Q.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1}


# --- a GGUF as llama.cpp's convert_hf_to_gguf.py (LlamaModel) writes one -------------------------------------------

def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: the two rotary halves of each head interleaved row by row."""
    if n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    if hf in GLOBAL:
        return GLOBAL[hf]
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{BLOCK[module]}.{kind}"


def train_tokenizer(pre: str) -> Tokenizer:
    """A tiny byte-level BPE (digits split first for pre "smollm", as SmolLM's tokenizer does) with a user-defined
    added token, trained on some stdlib sources."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if pre == "smollm" else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = Path(json.__file__).parent
    tok.train_from_iterator([p.read_text(encoding="utf-8") for p in sorted(corpus.glob("*.py"))], trainer)
    tok.add_tokens([AddedToken("<think>", special=False, normalized=False)])
    return tok


def gguf_vocab(tok: Tokenizer, size: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens, token types and merges as the converter's get_vocab_base writes them: ids without a token become
    [PAD{i}] (UNUSED), added tokens keep their text (CONTROL when special, else USER_DEFINED)."""
    reverse = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    added = tok.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL if i not in added else
                         gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    merges = [" ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    return tokens, types, merges


def write_gguf(ckpt: Path, path: Path, qtype=Q.F32, tok: Tokenizer | None = None, pre: str = "smollm",
               add_bos: bool = False, arch: str = "llama", odd_types: dict | None = None) -> Path:
    """`ckpt` as llama.cpp's converter writes it (tensors in `qtype`); `odd_types` stores the named tensors in
    another ggml type (zeros), for the errors an unreadable type must raise."""
    cfg = json.loads((ckpt / "config.json").read_text())
    rope = cfg["rope_parameters"]
    heads, kv_heads, head_dim = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    w = gguf.GGUFWriter(path, arch)
    w.add_type("model")
    w.add_name("tiny")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_file_type(FILE_TYPES[qtype])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(head_dim)
    if tok is not None:
        tokens, types, merges = gguf_vocab(tok, cfg["vocab_size"])
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_add_bos_token(add_bos)
        w.add_chat_template(TEMPLATE)
    for name, t in load_file(ckpt / "model.safetensors").items():
        data = t.float().numpy()
        if name.endswith("q_proj.weight"):
            data = llama_cpp_permute(data, heads, heads)
        elif name.endswith("k_proj.weight"):
            data = llama_cpp_permute(data, heads, kv_heads)
        if gguf_name(name) in (odd_types or {}):
            odd = odd_types[gguf_name(name)]
            block, size = gguf.GGML_QUANT_SIZES[odd]
            w.add_tensor(gguf_name(name), np.zeros((data.shape[0], data.shape[1] // block * size), np.uint8),
                         raw_dtype=odd)
        elif data.ndim == 2 and qtype != Q.F32:  # llama.cpp keeps 1-D tensors (norms) in F32
            w.add_tensor(gguf_name(name), gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(name), data)
    if rope.get("rope_type") == "llama3":  # LlamaModel.generate_extra_tensors
        w.add_tensor("rope_freqs.weight", llama3_factors(rope, head_dim))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llama3_factors(rope: dict, dim: int) -> np.ndarray:
    """The per-frequency factors llama.cpp's converter stores as rope_freqs.weight for llama3 rope scaling."""
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high, old = (rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"],
                              rope["original_max_position_embeddings"])
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * np.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def import_gguf(path: Path, out: Path, *extra: str) -> Path:
    assert main(["import-gguf", str(path), "--out", str(out), *extra]) == 0
    return out


def ids(n: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def edgefed_logits(model_dir: Path, x: torch.Tensor) -> torch.Tensor:
    model = load_model(model_dir)
    return model(x, model.new_cache())


# --- fixtures ----------------------------------------------------------------------------------------------------

VARIANTS = {  # name: (checkpoint overrides, ggml type, tokenizer pre, add_bos)
    "f32": (dict(), Q.F32, "smollm", False),
    "q8_0-tied": (dict(tie=True), Q.Q8_0, "gpt2", True),
    "q4_1": (dict(), Q.Q4_1, "smollm", False),
    "f32-llama3-rope": (dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0), Q.F32, "smollm", False),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def imported(request, tmp_path_factory):
    overrides, qtype, pre, add_bos = VARIANTS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    ref = make_checkpoint(root / "hf", vocab_size=VOCAB, **overrides)
    tok = train_tokenizer(pre)
    path = write_gguf(root / "hf", root / "model.gguf", qtype, tok, pre, add_bos)
    return request.param, qtype, ref, import_gguf(path, root / "out"), tok, add_bos, root


def test_unpermute_rows_undoes_llama_cpps_permutation_for_query_and_grouped_key_heads():
    w = torch.randn(8 * 16, 24)
    assert torch.equal(unpermute_rows(torch.from_numpy(llama_cpp_permute(w.numpy(), 8, 8)), 8), w)
    k = torch.randn(2 * 16, 24)
    assert torch.equal(unpermute_rows(torch.from_numpy(llama_cpp_permute(k.numpy(), 8, 2)), 2), k)
    assert not torch.equal(torch.from_numpy(llama_cpp_permute(k.numpy(), 8, 2)), k)


@pytest.mark.parametrize("rope", [
    {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
     "rope_theta": 500000.0},  # Llama 3.2
    {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
     "rope_theta": 500000.0},  # Llama 3.1
], ids=["llama-3.2", "llama-3.1"])
def test_llama3_rope_scaling_is_recovered_from_llama_cpps_rope_freqs(rope):
    got = llama3_rope(llama3_factors(rope, 64), rope["rope_theta"], 64, "m.gguf")
    assert got == {"rope_type": "llama3", **{k: v for k, v in rope.items() if k != "rope_theta"}}


def test_the_imported_model_computes_what_the_original_checkpoint_computes(imported):
    name, qtype, ref, out, *_ = imported
    x = ids()
    with torch.no_grad():
        expected = ref(x).logits
    got = edgefed_logits(out, x)
    err = (got - expected).abs().max().item()
    if qtype == Q.F32:
        assert err < 1e-4, name
        greedy = ref.generate(x, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert generate(load_model(out), x[0].tolist(), 16).token_ids == greedy[0, x.shape[1]:].tolist()
    else:  # the quantization error (measured: cosine >= 0.9998 for Q8_0, >= 0.96 for Q4_1 on tiny random models)
        centred = [t - t.mean(-1, keepdim=True) for t in (got, expected)]
        cosine = torch.nn.functional.cosine_similarity(*centred, dim=-1).min().item()
        agree = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
        assert cosine > (0.999 if qtype == Q.Q8_0 else 0.9) and agree > (0.95 if qtype == Q.Q8_0 else 0.6), \
            (name, err, cosine, agree)


def test_the_imported_weights_are_the_checkpoints_as_the_gguf_stores_them(imported):
    name, qtype, ref, out, *_ = imported
    tensors = load_file(out / "model.safetensors")
    for hf, w in ref.state_dict().items():
        if hf not in tensors:
            assert hf == "lm_head.weight" and ref.config.tie_word_embeddings
            continue
        w = w.float().numpy()
        if w.ndim == 2 and qtype != Q.F32:  # quantized without the permutation: it moves whole rows, blocks stay whole
            w = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)
        assert np.array_equal(tensors[hf].numpy(), w), (name, hf)


def test_transformers_loads_the_imported_directory_and_computes_edgefeds_logits(imported):
    import transformers as tf

    name, qtype, ref, out, *_ = imported
    model = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.architectures == ["LlamaForCausalLM"]
    assert model.config.tie_word_embeddings == ref.config.tie_word_embeddings
    x = ids(seed=2)
    with torch.no_grad():
        got = model(x).logits
    assert (got - edgefed_logits(out, x)).abs().max().item() < 1e-4, name
    if qtype == Q.F32:
        with torch.no_grad():
            assert (got - ref(x).logits).abs().max().item() < 1e-4, name


def test_config_carries_the_ggufs_hyperparameters(imported):
    name, qtype, ref, out, *_ = imported
    config = json.loads((out / "config.json").read_text())
    want = ref.config.to_dict()
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings", "bos_token_id"):
        assert config[key] == want[key], (name, key)
    assert config["rms_norm_eps"] == want["rms_norm_eps"] and config["eos_token_id"] == 2
    assert config["rope_parameters"] == want["rope_parameters"], name
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}
    if ref.config.tie_word_embeddings:
        assert "lm_head.weight" not in load_file(out / "model.safetensors")


def test_the_tokenizer_round_trips_and_equals_transformers_tokenizers(imported):
    import transformers as tf

    name, qtype, ref, out, tok, add_bos, root = imported
    ours = EdgefedTokenizer.from_dir(out)
    theirs = tf.AutoTokenizer.from_pretrained(out)
    from_gguf = tf.AutoTokenizer.from_pretrained(root, gguf_file="model.gguf")  # transformers' own GGUF loader
    for text in TEXTS:
        want = ([1] if add_bos else []) + tok.encode(text).ids
        got = ours.encode(text)
        assert got == want == theirs(text)["input_ids"] == from_gguf(text)["input_ids"], (name, text)
        shown = ("<|im_start|>" if add_bos else "") + text
        assert ours.decode(got, skip_special_tokens=False) == theirs.decode(got) == shown, (name, text)
    assert ours.encode("<think>", add_special_tokens=False) == [300]  # the user-defined token stays whole
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    text = ours.apply_chat_template(messages)
    assert text == theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ours.encode(text, add_special_tokens=False) == theirs(text, add_special_tokens=False)["input_ids"]
    assert (out / "chat_template.jinja").read_text() == TEMPLATE
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert (cfg["bos_token"], cfg["eos_token"], cfg["add_bos_token"]) == ("<|im_start|>", "<|im_end|>", add_bos)


def test_the_import_needs_no_transformers(tmp_path):
    make_checkpoint(tmp_path / "hf", vocab_size=VOCAB)
    path = write_gguf(tmp_path / "hf", tmp_path / "m.gguf", Q.Q8_0, train_tokenizer("smollm"))
    code = ("import sys; sys.modules['transformers'] = None; from edgefed.cli import main; "  # importing it fails
            f"sys.exit(main(['import-gguf', {str(path)!r}, '--out', {str(tmp_path / 'out')!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_bfloat16_output_holds_bfloat16_weights_of_the_same_model(tmp_path):
    ref = make_checkpoint(tmp_path / "hf", vocab_size=VOCAB)
    out = import_gguf(write_gguf(tmp_path / "hf", tmp_path / "m.gguf"), tmp_path / "out", "--dtype", "bfloat16")
    tensors = load_file(out / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with torch.no_grad():
        expected = ref(ids()).logits
    assert (edgefed_logits(out, ids()) - expected).abs().max().item() < 0.1


# --- errors: named, exit 2, no traceback -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small")
    make_checkpoint(root / "hf", vocab_size=VOCAB)
    return write_gguf(root / "hf", root / "model.gguf", Q.F32, train_tokenizer("gpt2"), "gpt2")


def fails(capsys, *args: str) -> str:
    code = main(["import-gguf", *args])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    return err


def test_a_non_llama_architecture_is_named_with_the_supported_ones(tmp_path, capsys):
    make_checkpoint(tmp_path / "hf", vocab_size=VOCAB)
    path = write_gguf(tmp_path / "hf", tmp_path / "q.gguf", arch="qwen2")
    err = fails(capsys, str(path), "--out", str(tmp_path / "out"))
    assert "architecture 'qwen2' is not supported" in err and "supported: llama" in err
    assert not (tmp_path / "out").exists()


def test_truncated_and_non_gguf_files_are_named(small_gguf, tmp_path, capsys):
    data = small_gguf.read_bytes()
    for cut in (len(data) // 2, 200, 3):
        (tmp_path / "t.gguf").write_bytes(data[:cut])
        err = fails(capsys, str(tmp_path / "t.gguf"), "--out", str(tmp_path / "out"))
        assert "t.gguf: truncated or corrupt GGUF file" in err, (cut, err)
    (tmp_path / "x.gguf").write_text("hello, not a model\n")
    assert "not a GGUF file" in fails(capsys, str(tmp_path / "x.gguf"), "--out", str(tmp_path / "out"))
    assert "file not found" in fails(capsys, str(tmp_path / "absent.gguf"), "--out", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_quantization_type_gguf_cannot_dequantize_is_named(tmp_path, capsys):
    make_checkpoint(tmp_path / "hf", vocab_size=VOCAB)
    # Q8_1 (llama.cpp's activation type): gguf-py has no dequantizer for it
    path = write_gguf(tmp_path / "hf", tmp_path / "m.gguf", odd_types={"blk.1.ffn_up.weight": Q.Q8_1})
    err = fails(capsys, str(path), "--out", str(tmp_path / "out"))
    assert "tensor 'blk.1.ffn_up.weight' is stored as Q8_1, which the gguf package cannot dequantize" in err
    assert not (tmp_path / "out").exists()


def test_out_must_be_an_empty_directory_unless_forced(small_gguf, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "model-00002-of-00002.safetensors").write_text("stale shard")
    assert "exists and is not empty" in fails(capsys, str(small_gguf), "--out", str(out))
    assert "is a file" in fails(capsys, str(small_gguf), "--out", str(small_gguf))
    import_gguf(small_gguf, out, "--force")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["notes.txt", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
         "tokenizer_config.json", "chat_template.jinja"])  # the stale shard is gone, the user's file stays
    load_model(out)


# --- the real model (`make real-model`) --------------------------------------------------------------------------

REAL = Path(os.environ.get("EDGEFED_CACHE") or Path.home() / ".cache" / "edgefed") / "models" / "SmolLM2-135M-Instruct"
PROMPTS = ["What is the capital of France?", "Write a short poem about the sea.",
           "Explain in a few sentences how a bicycle works."]


@pytest.fixture(scope="module")
def real_model() -> Path:
    if not (REAL / "config.json").is_file():
        pytest.skip(f"{REAL} not found: `make real-model` downloads and imports SmolLM2-135M-Instruct there")
    return REAL


@pytest.mark.slow
def test_the_real_model_generates_transformers_greedy_tokens_and_knows_paris(real_model, capsys):
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(real_model)
    model = tf.AutoModelForCausalLM.from_pretrained(real_model).eval()
    for prompt in PROMPTS:
        t0 = time.perf_counter()
        assert main(["generate", "--model", str(real_model), "--chat", "--prompt", prompt, "--greedy",
                     "--max-new-tokens", "64", "--json"]) == 0
        got = json.loads(capsys.readouterr().out)
        seconds = time.perf_counter() - t0
        x = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                    return_tensors="pt", return_dict=True)
        with torch.no_grad():
            want = model.generate(**x, max_new_tokens=64, do_sample=False)[0, x["input_ids"].shape[1]:].tolist()
        assert got["token_ids"] == want, prompt
        with capsys.disabled():
            print(f"\n[{prompt!r}: {len(want)} tokens, stop {got['stop_reason']}, {seconds:.1f} s, "
                  f"{got['tpot_ms']:.1f} ms/token] {got['text']!r}")
        if "France" in prompt:
            assert "Paris" in got["text"]


@pytest.mark.slow
def test_the_real_model_matches_transformers_for_64_tokens_past_eos(real_model):
    """All three chat prompts for a full 64 greedy tokens, neither engine stopping at EOS."""
    import transformers as tf

    from edge_node.model import SamplingConfig, generate, load_model

    tok = tf.AutoTokenizer.from_pretrained(real_model)
    model = tf.AutoModelForCausalLM.from_pretrained(real_model).eval()
    ours = load_model(real_model, pack=True)
    for prompt in PROMPTS:
        x = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                    return_tensors="pt", return_dict=True)
        with torch.no_grad():  # eos_token_id=-1: transformers never stops early
            want = model.generate(**x, max_new_tokens=64, do_sample=False, eos_token_id=-1,
                                  pad_token_id=0)[0, x["input_ids"].shape[1]:].tolist()
        got = generate(ours, x["input_ids"][0].tolist(), 64, SamplingConfig(), eos_ids=()).token_ids
        assert len(want) == 64 and got == want, prompt
