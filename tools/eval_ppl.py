#!/usr/bin/env python3
"""Perplexity of a model on a text file or on WikiText-2 (raw).

  python tools/eval_ppl.py --model SmolLM2-135M-Instruct.Q4_1.gguf --text hamlet_gut.txt --max_chars 16000

The text is tokenized without special tokens and cut into non-overlapping windows of --ctx
tokens (or windows --stride tokens apart, scoring only tokens not scored before). When the
tokenizer adds BOS, each window is BOS + ctx - 1 text tokens and every text token is scored;
otherwise a window is ctx text tokens and its first token is context only (the protocol of
DESIGN.md section 4: SmolLM2 44.19, Gemma 3 270M 52.63 on the first 16,000 characters of
Hamlet at --ctx 512). PPL = exp(mean NLL). The last line is `ppl=<value> tokens=<n>`.
"""
import argparse, json, math, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minift.runtime.device import BACKENDS   # noqa: E402
from tqdm import tqdm
from minift.data import read_text as read_utf8
from minift.errors import ArgumentParser, MissingFile, UsageError, check_output, integer, run, writing
from minift import quant
from models import load, resolve
from models.evaluate import perplexity_windows, windows_nll


def read_text(args):
  if args.text:
    source = args.text
  else:
    source = os.path.join(args.data_root, f"wiki.{args.split}.raw")
    if not os.path.exists(source): raise MissingFile(f"{source} not found (expected the WikiText-2 raw layout: wiki.train.raw, wiki.valid.raw, wiki.test.raw)")
  text = read_utf8(source, hint=None)
  if args.max_chars: text = text[:args.max_chars]
  if not text.strip(): raise UsageError(f"{source} has no text to evaluate (empty{' after --max_chars' if args.max_chars else ''})")
  return text, source


def main(argv=None):
  ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", required=True, help="an HF model folder, a .gguf file, or a Hugging Face Hub repo id (org/name)")
  ap.add_argument("--gguf_file", default=None, help="a GGUF file inside the --model folder or Hub repo")
  src = ap.add_mutually_exclusive_group(required=True)
  src.add_argument("--text", help="a UTF-8 text file")
  src.add_argument("--data_root", help="a folder with wiki.{train,valid,test}.raw (WikiText-2 raw)")
  ap.add_argument("--split", default="test", choices=["train", "valid", "test"])
  ap.add_argument("--max_chars", type=integer(1), default=None, help="use only the first N characters")
  ap.add_argument("--ctx", type=integer(2), default=512, help="tokens per window, BOS included, at least 2; capped at the model's context (default 512)")
  ap.add_argument("--stride", type=integer(1), default=None, help="sliding windows this many tokens apart (default: non-overlapping)")
  ap.add_argument("--lora", default=None, help="a PEFT LoRA adapter folder, merged into the weights")
  ap.add_argument("--batch_size", type=integer(1), default=1, help="windows per forward pass")
  quant.add_flags(ap)
  ap.add_argument("--device", choices=list(BACKENDS), default=None, help="backend (default: MINIFT_DEVICE or numpy)")
  ap.add_argument("--json", default=None, help="also write the results to this JSON file")
  args = ap.parse_args(argv)
  if args.json: check_output(args.json, "--json")
  if args.device: os.environ["MINIFT_DEVICE"] = args.device

  text, source = read_text(args)
  t0 = time.time()
  model, tok = load(path := resolve(args.model, args.gguf_file), dtype=quant.base_dtype_of(args.base_dtype, args.quantize, path))
  if args.lora:
    from minift.lora import load_adapter, merge_lora
    merge_lora(load_adapter(model, args.lora))
  load_s = time.time() - t0
  ids = tok.encode(text, add_special_tokens=False)
  bos = tok.bos_token_id if tok.adds_bos else None
  ctx = min(args.ctx, model.max_context)
  if ctx < args.ctx: print(f"note: --ctx {args.ctx} is capped at the model's context of {ctx} tokens", file=sys.stderr)
  span = ctx - (bos is not None)   # text tokens per window
  if ctx < 2 + (bos is not None): raise UsageError(f"--ctx {args.ctx}: a window of {ctx} tokens scores no token{' after BOS' if bos is not None else ''}")
  if args.stride is not None and args.stride > span:
    raise UsageError(f"--stride {args.stride} must be at most {span}, the text tokens of a window of --ctx {ctx}")
  windows = perplexity_windows(ids, ctx, bos, args.stride)
  t1 = time.time()
  with tqdm(total=len(windows), desc="ppl", unit="window", file=sys.stderr) as bar:
    def progress(n, nll, count):
      bar.update(n)
      bar.set_postfix(ppl=f"{math.exp(nll / count):.3f}")
    nll, count = windows_nll(model, windows, args.batch_size, progress)
  ppl = math.exp(nll / count)
  result = {"model": args.model, "text": source, "chars": len(text), "ctx": ctx, "stride": args.stride, "bos": bos is not None,
            "lora": args.lora, "tokens": count, "nll": nll / count, "ppl": ppl, "load_s": round(load_s, 2),
            "eval_s": round(time.time() - t1, 2), "tokens_per_s": round(sum(len(x) for x, _ in windows) / (time.time() - t1), 1)}
  if args.json:
    with writing(args.json), open(args.json, "w") as f: json.dump(result, f, indent=2)
  print(f"ppl={ppl:.4f} tokens={count}")
  return result


if __name__ == "__main__":
  run(main)
