#!/usr/bin/env python3
"""Token ids for the C++ model runtime (proxyattn-eval), with the model's own tokenizer
(the GGUF vocabulary, as scripts/capture_qk.py reads it).

    model_tokens.py --gguf M.gguf --text FILE [--chat] [--no-bos] --out ids.txt
    model_tokens.py --gguf M.gguf --niah --length 8192 [--depth 0.5] [--seed 0] --out ids.txt

Writes the ids as text, one per line; prints the count on stderr.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import capture_qk as cq  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="model_tokens.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path, required=True)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", type=Path, help="UTF-8 text to tokenise")
    src.add_argument("--niah", action="store_true", help="the NIAH prompt capture_qk.py builds")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--depth", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chat", action="store_true", help="wrap the text in the model's ChatML template")
    ap.add_argument("--no-bos", action="store_true")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    try:
        model = cq.GGUFModel(a.gguf)
        tok = cq.GGUFTokenizer(model)
        if a.niah:
            ids = cq.build_niah(tok, a.length, a.depth, a.seed, None, a.chat).ids
        else:
            text = cq._read_prompt(a.text, "--text")
            if a.chat:
                pre, post = tok.chat("")
                text = pre + text + post
            ids = tok.encode(text, bos=not a.no_bos)
    except cq.CaptureError as e:
        print(f"model_tokens.py: error: {e}", file=sys.stderr)
        return 2
    tmp = a.out.with_name(f".{a.out.name}.tmp")
    tmp.write_text("".join(f"{int(i)}\n" for i in ids))
    tmp.replace(a.out)
    print(f"model_tokens.py: {len(ids)} tokens -> {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
