#!/usr/bin/env python3
"""Evaluation set for `proxyattn-eval sweep`, tokenised with the model's own tokenizer (the GGUF
vocabulary, as scripts/capture_qk.py and scripts/model_tokens.py read it).

    prepare_eval.py --gguf M.gguf --out set.json [--niah-lengths 2048,4096] [--depths 0.1,0.5,0.9]
                    [--niah-count 1] [--ppl-length 4096] [--ppl-count 2] [--last 512] [--seed 0] [--chat]

NIAH cases are capture_qk.py's RULER-style single-needle prompts (build_niah: the same haystack,
needle and question; one case per length x depth x count, needle seed = --seed + case index).
Perplexity documents are the bundled haystack texts (data/haystack/, the same sentences) read
from a different first file each, cut to --ppl-length tokens; the sweep scores the last --last.

The file (JSON, schema "proxyattn-eval-set" version 1):
  schema, schema_version, creator, created_utc
  model       {file, architecture, name, vocab_size, context_length, tokenizer, vocab_fnv1a64}:
              the identity the C++ side checks against the GGUF it is given (file name,
              general.architecture, general.name, vocabulary size, tokenizer.ggml.model/pre, and
              FNV-1a 64 of the vocabulary's pieces joined by "\\n"): a set never runs on another model
  stop_ids    token ids that end a greedy answer (the tokenizer's EOS/EOT/<|im_end|>)
  niah        {chat, cases: [{id, length, depth, seed, needle_position, needle, key, answer,
              answer_ids, max_new, tokens}]}: answer_ids are the needle's own tokens that spell the
              number (a greedy answer is correct when it contains them); max_new tokens are generated
  ppl         {documents: [{id, length, score_last, first_file, repeats_at, tokens}]}: score the
              last score_last predicted tokens; repeats_at is the token index where the haystack
              starts over (null when the document holds no repeated text)
Errors (bad flags, unsupported model, lengths over the context) are one line and exit 2; the file
is written whole (temporary name, then rename) or not at all.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import capture_qk as cq  # noqa: E402

PROG = "prepare_eval.py"
SCHEMA = "proxyattn-eval-set"
SCHEMA_VERSION = 1


class PrepareError(Exception):
    pass


def fnv1a64(pieces) -> str:
    """FNV-1a 64 of the pieces joined by newlines (UTF-8): the C++ side computes the same."""
    h = 0xCBF29CE484222325
    first = True
    for p in pieces:
        for b in (b"" if first else b"\n") + str(p).encode("utf-8"):
            h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
        first = False
    return f"{h:016x}"


def model_identity(model: cq.GGUFModel) -> dict:
    tokens = model.field("tokenizer.ggml.tokens") or []
    return {
        "file": model.path.name,
        "architecture": model.cfg.arch,
        "name": str(model.field("general.name", "") or ""),
        "vocab_size": int(model.cfg.vocab_size),
        "context_length": int(model.cfg.n_ctx),
        "tokenizer": f"{model.field('tokenizer.ggml.model', '')}/{model.field('tokenizer.ggml.pre', 'default')}",
        "vocab_fnv1a64": fnv1a64(tokens),
    }


def answer_span(tok, needle_ids: list[int], value: str) -> list[int]:
    """The shortest run of the needle's tokens whose text contains the number (with a tokenizer
    that splits digits, the digits themselves)."""
    best = None
    for i in range(len(needle_ids)):
        for j in range(i + 1, len(needle_ids) + 1):
            if best is not None and j - i >= len(best):
                break
            if value in tok.decode(needle_ids[i:j]):
                best = needle_ids[i:j]
                break
    if best is None:
        raise PrepareError(f"the needle's tokens do not spell its number {value}")
    return best


def niah_cases(tok, lengths, depths, count, seed, chat, max_new_extra, max_new):
    cases = []
    for length in lengths:
        for depth in depths:
            for c in range(count):
                s = seed + len(cases)
                p = cq.build_niah(tok, length, depth, s, None, chat)
                needle_ids = tok.encode(" " + p.needle_text)
                # build_niah puts exactly these tokens at needle_position
                assert p.ids[p.needle_position:p.needle_position + len(needle_ids)] == needle_ids
                ans = answer_span(tok, needle_ids, p.extra["value"])
                cases.append({
                    "id": f"niah-L{length}-d{depth:g}-s{s}", "length": length, "depth": depth, "seed": s,
                    "needle_position": p.needle_position, "needle": p.needle_text, "key": p.extra["key"],
                    "answer": p.extra["value"], "answer_ids": [int(t) for t in ans],
                    "max_new": max_new if max_new else len(ans) + max_new_extra,
                    "tokens": [int(t) for t in p.ids],
                })
    return cases


def ppl_documents(tok, length, count, last):
    files = cq.default_haystack_files()
    if not files:
        raise PrepareError(f"no haystack text found under {cq.DATA_DIR / 'haystack'}")
    docs = []
    for d in range(count):
        # each document starts at another file, so two documents share as little text as the
        # corpus allows
        first = (d * len(files)) // count
        order = files[first:] + files[:first]
        sents = cq.haystack_sentences(order)
        text = "".join(("" if i == 0 else ("\n\n" if para else " ")) + s for i, (s, para) in enumerate(sents))
        once = tok.encode(text, bos=True)
        ids = list(once)
        repeats_at = None
        while len(ids) < length:  # the corpus is shorter than the document: it starts over
            repeats_at = len(once) if repeats_at is None else repeats_at
            ids.extend(tok.encode("\n\n" + text))
        docs.append({"id": f"doc{d}-L{length}", "length": length, "score_last": last,
                     "first_file": order[0].name, "repeats_at": repeats_at, "tokens": [int(t) for t in ids[:length]]})
    return docs


def parse_list(text: str, kind, flag: str) -> list:
    try:
        vals = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PrepareError(f"{flag} {text!r}: not a list of {kind.__name__} values") from None
    if not vals:
        raise PrepareError(f"{flag}: empty list")
    return vals


def build(a: argparse.Namespace) -> dict:
    lengths = parse_list(a.niah_lengths, int, "--niah-lengths") if a.niah_count else []
    depths = parse_list(a.depths, float, "--depths") if a.niah_count else []
    if a.niah_count < 0 or a.ppl_count < 0:
        raise PrepareError("--niah-count and --ppl-count must be >= 0")
    if a.niah_count == 0 and a.ppl_count == 0:
        raise PrepareError("nothing to prepare (--niah-count and --ppl-count are both 0)")
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise PrepareError(f"--depths {a.depths}: each depth must be in [0, 1]")
    if a.max_new < 0:
        raise PrepareError("--max-new must be >= 0")
    if a.ppl_count and not 1 <= a.last < a.ppl_length:
        raise PrepareError(f"--last {a.last}: must be in [1, --ppl-length - 1 = {a.ppl_length - 1}]")
    model = cq.GGUFModel(a.gguf)
    tok = cq.GGUFTokenizer(model)
    ident = model_identity(model)
    n_ctx = ident["context_length"]
    for length in lengths:
        if length < 1:
            raise PrepareError(f"--niah-lengths: {length} must be positive")
    if a.ppl_count and a.ppl_length > n_ctx:
        raise PrepareError(f"--ppl-length {a.ppl_length}: over the model's context length {n_ctx}")
    cases = niah_cases(tok, lengths, depths, a.niah_count, a.seed, a.chat, 4, a.max_new)
    for c in cases:
        if c["length"] + c["max_new"] > n_ctx:
            raise PrepareError(f"--niah-lengths {c['length']}: with {c['max_new']} answer tokens over the "
                               f"model's context length {n_ctx}")
    docs = ppl_documents(tok, a.ppl_length, a.ppl_count, a.last) if a.ppl_count else []
    return {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "creator": f"proxyattn {PROG} {cq.VERSION}",
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": ident, "stop_ids": sorted(int(i) for i in tok.stop_ids),
        "niah": {"chat": bool(a.chat), "cases": cases},
        "ppl": {"documents": docs},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="the evaluation set (JSON)")
    ap.add_argument("--niah-lengths", default="2048,4096", help="NIAH prompt lengths in tokens (2048,4096)")
    ap.add_argument("--depths", default="0.1,0.5,0.9", help="needle depths, 0 (start) .. 1 (end) (0.1,0.5,0.9)")
    ap.add_argument("--niah-count", type=int, default=1, help="NIAH cases per length x depth (1; 0: none)")
    ap.add_argument("--max-new", type=int, default=0,
                    help="tokens generated per NIAH answer (0: the answer's tokens + 4)")
    ap.add_argument("--chat", action="store_true", help="NIAH prompts in the model's chat template")
    ap.add_argument("--ppl-length", type=int, default=4096, help="perplexity document length in tokens (4096)")
    ap.add_argument("--ppl-count", type=int, default=2, help="perplexity documents (2; 0: none)")
    ap.add_argument("--last", type=int, default=512, help="score the last K predicted tokens of each document (512)")
    ap.add_argument("--seed", type=int, default=0, help="needle seed of the first case (0)")
    ap.add_argument("-q", "--quiet", action="store_true")
    a = ap.parse_args(argv)
    try:
        doc = build(a)
        if a.out.is_dir():
            raise PrepareError(f"--out {a.out}: is a directory")
        tmp = a.out.with_name(f".{a.out.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
            tmp.replace(a.out)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise PrepareError(f"--out {a.out}: {e.strerror}") from None
    except (cq.CaptureError, PrepareError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if not a.quiet:
        n = len(doc["niah"]["cases"])
        print(f"{PROG}: {n} NIAH cases, {len(doc['ppl']['documents'])} perplexity documents -> {a.out}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
