#!/usr/bin/env python3
"""Fixtures for the C++ model runtime tests (tests/cpu/test_model*.cpp), written with the
`gguf` package's writer and dequantisers and the numpy forward of scripts/capture_qk.py:

    model_fixtures.py OUTDIR [--seed S]

OUTDIR/quant.gguf   one tensor per type, "x.<TYPE>" (random blocks, finite scales), with
                    "ref.<TYPE>" = gguf.quants.dequantize of it (F32); metadata of every value
                    type under "test.*" (the C++ test checks them)
OUTDIR/tiny.gguf    a random Llama-architecture model (3 layers, 6 q / 2 kv heads, d 16,
                    mixed quantisations, tied embeddings)
OUTDIR/tiny_tok.gguf the same random model with a byte-level BPE tokenizer (256 bytes, merges
                    learnt from data/haystack/, an EOS piece; 301 pieces) and a 4096-token context:
                    scripts/prepare_eval.py can build evaluation sets for it
OUTDIR/tiny_ref.gguf  the spec's outputs on it (F32 tensors): "tokens" [N], per layer
                    "q.L" [Hq,N,d], "k.L", "v.L" [Hkv,N,d] (post-RoPE), "logits" [N, vocab];
                    metadata ref.ppl (float64), ref.generated (int32 array: greedy tokens
                    after the first ref.prompt_len tokens)
OUTDIR/tiny_gemma.gguf  a random Gemma-3 model (4 layers: sliding, global, sliding, global as a
                    per-layer pattern list; window 11 < N; 6 q / 2 kv heads, d 16; an attention
                    scale that is not 1/sqrt(d); final logit soft-capping; mixed quantisations)
OUTDIR/tiny_gemma_ref.gguf  the spec's outputs on it, laid out as tiny_ref.gguf
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

SOURCE_DIR = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(SOURCE_DIR / "scripts"))

import gguf  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402

QUANT_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K]

TINY = dict(n_layers=3, n_embd=96, n_head=6, n_head_kv=2, head_dim=16, n_ff=160, vocab=301,
            n_ctx=128, rope_theta=10000.0, rms_eps=1e-5, n_tokens=41, prompt_len=29, max_new=6)


def _finite_f16(rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
    return rng.uniform(lo, hi, size=n).astype(np.float16).view(np.uint8).reshape(n, 2)


def random_blocks(rng: np.random.Generator, qtype: Q, rows: int, cols: int) -> np.ndarray:
    """Raw bytes [rows, row_bytes] of random blocks whose f16 scales are finite."""
    if qtype == Q.F32:
        return rng.standard_normal((rows, cols)).astype(np.float32).view(np.uint8)
    if qtype == Q.F16:
        return rng.standard_normal((rows, cols)).astype(np.float16).view(np.uint8)
    if qtype == Q.BF16:
        return gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), Q.BF16)
    bsize, tsize = gguf.GGML_QUANT_SIZES[qtype]
    nb = rows * cols // bsize
    raw = rng.integers(0, 256, size=(nb, tsize), dtype=np.uint8)
    # f16 fields: (offset, low, high) per type
    f16_fields = {
        Q.Q8_0: [(0, -0.05, 0.05)], Q.Q4_0: [(0, -0.1, 0.1)], Q.Q4_1: [(0, 0.0, 0.1), (2, -1, 1)],
        Q.Q5_0: [(0, -0.1, 0.1)], Q.Q5_1: [(0, 0.0, 0.1), (2, -1, 1)],
        Q.Q4_K: [(0, 0.0, 0.01), (2, 0.0, 0.01)], Q.Q5_K: [(0, 0.0, 0.01), (2, 0.0, 0.01)],
        Q.Q6_K: [(208, -0.01, 0.01)],
    }[qtype]
    for off, lo, hi in f16_fields:
        raw[:, off:off + 2] = _finite_f16(rng, nb, lo, hi)
    return raw.reshape(rows, -1)


def write_quant(out: Path, rng: np.random.Generator) -> None:
    w = gguf.GGUFWriter(str(out / "quant.gguf"), "test")
    w.add_uint8("test.u8", 200)
    w.add_int8("test.i8", -100)
    w.add_uint16("test.u16", 60000)
    w.add_int16("test.i16", -30000)
    w.add_uint32("test.u32", 4000000000)
    w.add_int32("test.i32", -2000000000)
    w.add_float32("test.f32", 1.5)
    w.add_uint64("test.u64", 2**63 + 5)
    w.add_int64("test.i64", -(2**62))
    w.add_float64("test.f64", -2.25)
    w.add_bool("test.bool", True)
    w.add_string("test.string", "héllo")
    w.add_array("test.ints", [1, -2, 3])
    w.add_array("test.strings", ["a", "", "xyz"])
    w.add_array("test.nested", [[1, 2], [3]])
    for qt in QUANT_TYPES:
        bsize, _ = gguf.GGML_QUANT_SIZES[qt]
        cols = 2 * max(bsize, 32)
        raw = random_blocks(rng, qt, 3, cols)
        w.add_tensor(f"x.{qt.name}", raw, raw_dtype=qt)
        ref = gguf.quants.dequantize(raw, qt).astype(np.float32).reshape(3, cols)
        w.add_tensor(f"ref.{qt.name}", ref)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the alphabet of byte-level BPE pieces)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiny_tokenizer(vocab: int) -> tuple[list[str], list[str], list[int]]:
    """(pieces, merges, token types) of a byte-level BPE of `vocab` pieces: the 256 bytes, merges
    learnt greedily (most frequent pair, ties by the pair) on the bundled haystack text with the
    "smollm" pre-tokenizer (digits split), and one EOS control piece last."""
    from collections import Counter

    from tokenizers import pre_tokenizers
    b2u = bytes_to_unicode()
    pieces = [b2u[b] for b in range(256)]
    pre = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    text = "\n\n".join(f.read_text(encoding="utf-8") for f in sorted((SOURCE_DIR / "data" / "haystack").glob("*.txt")))
    words = Counter(w for w, _ in pre.pre_tokenize_str(text))
    seqs = {w: list(w) for w in words}
    merges: list[str] = []
    while len(pieces) < vocab - 1:
        pairs: Counter = Counter()
        for w, n in words.items():
            s = seqs[w]
            for a, b in zip(s, s[1:]):
                pairs[(a, b)] += n
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append(f"{a} {b}")
        pieces.append(a + b)
        for w, s in seqs.items():
            i, t = 0, []
            while i < len(s):
                if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                    t.append(a + b)
                    i += 2
                else:
                    t.append(s[i])
                    i += 1
            seqs[w] = t
    pieces.append("<|endoftext|>")
    return pieces, merges, [1] * (len(pieces) - 1) + [3]


def tensor_adder(w):
    """add(name, array, quant type): a float32 array written to the GGUF writer w as F32, F16 or
    quantised."""
    def add(name: str, a: np.ndarray, qt: Q) -> None:
        a = a.astype(np.float32)
        if qt == Q.F32:
            w.add_tensor(name, a)
        elif qt == Q.F16:
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qt), raw_dtype=qt)
    return add


def write_tiny(out: Path, rng: np.random.Generator, name: str = "tiny.gguf", tokenizer: bool = False,
               n_ctx: int | None = None) -> None:
    c = TINY
    E, Hq, Hkv, D, F, V = c["n_embd"], c["n_head"], c["n_head_kv"], c["head_dim"], c["n_ff"], c["vocab"]
    w = gguf.GGUFWriter(str(out / name), "llama")
    w.add_name("tiny-random-llama")
    w.add_block_count(c["n_layers"])
    w.add_context_length(n_ctx or c["n_ctx"])
    w.add_embedding_length(E)
    w.add_feed_forward_length(F)
    w.add_head_count(Hq)
    w.add_head_count_kv(Hkv)
    w.add_rope_dimension_count(D)
    w.add_rope_freq_base(c["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_eps"])
    if tokenizer:
        pieces, merges, types = tiny_tokenizer(V)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("smollm")
        w.add_token_list(pieces)
        w.add_token_merges(merges)
        w.add_token_types(types)
        w.add_eos_token_id(len(pieces) - 1)

    add = tensor_adder(w)

    s = 1.0 / np.sqrt(E)
    add("token_embd.weight", 0.3 * rng.standard_normal((V, E)), Q.Q8_0)
    add("output_norm.weight", 1 + 0.1 * rng.standard_normal(E), Q.F32)
    for i in range(c["n_layers"]):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", 1 + 0.1 * rng.standard_normal(E), Q.F32)
        add(p + "ffn_norm.weight", 1 + 0.1 * rng.standard_normal(E), Q.F32)
        add(p + "attn_q.weight", 3 * s * rng.standard_normal((Hq * D, E)), Q.Q4_1)
        add(p + "attn_k.weight", 3 * s * rng.standard_normal((Hkv * D, E)), Q.Q4_0)
        add(p + "attn_v.weight", s * rng.standard_normal((Hkv * D, E)), Q.Q8_0)
        add(p + "attn_output.weight", s * rng.standard_normal((E, Hq * D)), Q.F16)
        add(p + "ffn_gate.weight", s * rng.standard_normal((F, E)), Q.Q4_1)
        add(p + "ffn_up.weight", s * rng.standard_normal((F, E)), Q.BF16)
        add(p + "ffn_down.weight", rng.standard_normal((E, F)) / np.sqrt(F), Q.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


GEMMA = dict(n_layers=4, n_embd=96, n_head=6, n_head_kv=2, head_dim=16, n_ff=160, vocab=301,
             n_ctx=128, rope_theta=1e6, rope_theta_swa=1e4, rms_eps=1e-6, window=11,
             sliding=[True, False, True, False], attn_scale=0.2, softcap=5.0,
             n_tokens=53, prompt_len=37, max_new=6)


def write_tiny_gemma(out: Path, rng: np.random.Generator) -> None:
    c = GEMMA
    E, Hq, Hkv, D, F, V = c["n_embd"], c["n_head"], c["n_head_kv"], c["head_dim"], c["n_ff"], c["vocab"]
    w = gguf.GGUFWriter(str(out / "tiny_gemma.gguf"), "gemma3")
    w.add_name("tiny-random-gemma3")
    w.add_block_count(c["n_layers"])
    w.add_context_length(c["n_ctx"])
    w.add_embedding_length(E)
    w.add_feed_forward_length(F)
    w.add_head_count(Hq)
    w.add_head_count_kv(Hkv)
    w.add_key_length(D)
    w.add_value_length(D)
    w.add_rope_freq_base(c["rope_theta"])
    w.add_rope_freq_base_swa(c["rope_theta_swa"])
    w.add_layer_norm_rms_eps(c["rms_eps"])
    w.add_sliding_window(c["window"])
    w.add_sliding_window_pattern(c["sliding"])
    w.add_attention_scale(c["attn_scale"])
    w.add_final_logit_softcapping(c["softcap"])

    add = tensor_adder(w)

    def norm_w(n: int) -> np.ndarray:  # the file holds Gemma's 1 + w
        return 1 + 0.2 * rng.standard_normal(n)

    s = 1.0 / np.sqrt(E)
    add("token_embd.weight", 0.2 * rng.standard_normal((V, E)), Q.Q8_0)
    add("output_norm.weight", norm_w(E), Q.F32)
    for i in range(c["n_layers"]):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", norm_w(E), Q.F32)
        add(p + "ffn_norm.weight", norm_w(E), Q.F32)
        add(p + "attn_q_norm.weight", norm_w(D), Q.F32)
        add(p + "attn_k_norm.weight", norm_w(D), Q.F32)
        add(p + "post_attention_norm.weight", norm_w(E), Q.F32)
        add(p + "post_ffw_norm.weight", norm_w(E), Q.F32)
        add(p + "attn_q.weight", s * rng.standard_normal((Hq * D, E)), Q.Q5_0)
        add(p + "attn_k.weight", s * rng.standard_normal((Hkv * D, E)), Q.Q5_1)
        add(p + "attn_v.weight", s * rng.standard_normal((Hkv * D, E)), Q.Q8_0)
        add(p + "attn_output.weight", s * rng.standard_normal((E, Hq * D)), Q.BF16)
        add(p + "ffn_gate.weight", 2 * s * rng.standard_normal((F, E)), Q.Q5_0)
        add(p + "ffn_up.weight", s * rng.standard_normal((F, E)), Q.Q8_0)
        add(p + "ffn_down.weight", rng.standard_normal((E, F)) / np.sqrt(F), Q.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_reference(out: Path, rng: np.random.Generator, c: dict = TINY, name: str = "tiny") -> None:
    import capture_qk as cq

    model = cq.GGUFModel(out / f"{name}.gguf")
    ids = rng.integers(0, c["vocab"], size=c["n_tokens"]).astype(np.int64)
    got: dict[int, tuple] = {}

    def on_layer(i, q, k, v):
        got[i] = (q.copy(), k.copy(), v.copy())

    logits = cq.forward(model, ids, range(c["n_layers"]), on_layer, logits="all", chunk=16)
    ppl = cq.perplexity(model, ids)
    gen = cq.generate(model, ids[:c["prompt_len"]], c["max_new"], set())

    w = gguf.GGUFWriter(str(out / f"{name}_ref.gguf"), "reference")
    w.add_float64("ref.ppl", float(ppl))
    w.add_uint32("ref.prompt_len", c["prompt_len"])
    w.add_array("ref.generated", [int(t) for t in gen])
    w.add_tensor("tokens", ids.astype(np.float32))
    for i, (q, k, v) in sorted(got.items()):
        w.add_tensor(f"q.{i}", q.astype(np.float32))
        w.add_tensor(f"k.{i}", k.astype(np.float32))
        w.add_tensor(f"v.{i}", v.astype(np.float32))
    w.add_tensor("logits", np.asarray(logits, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--seed", type=int, default=1234)
    a = ap.parse_args(argv)
    a.outdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(a.seed)
    write_quant(a.outdir, rng)
    state = rng.bit_generator.state
    write_tiny(a.outdir, rng)
    rng.bit_generator.state = state  # the same weights, with a tokenizer
    write_tiny(a.outdir, rng, "tiny_tok.gguf", tokenizer=True, n_ctx=4096)
    import prepare_eval  # an evaluation set for it (tests/cpu/test_model_eval.cpp)
    if prepare_eval.main(["--gguf", str(a.outdir / "tiny_tok.gguf"), "--out", str(a.outdir / "tiny_eval.json"),
                          "--niah-lengths", "384", "--depths", "0.3,0.7", "--ppl-length", "400", "--ppl-count", "1",
                          "--last", "48", "-q"]):
        return 1
    write_reference(a.outdir, rng)
    write_tiny_gemma(a.outdir, rng)
    write_reference(a.outdir, rng, GEMMA, "tiny_gemma")
    print(a.outdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
