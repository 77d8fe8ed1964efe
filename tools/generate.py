#!/usr/bin/env python3
"""Generate text from a prompt, streaming it as it is produced.

  python tools/generate.py --model SmolLM2-135M-Instruct.Q4_1.gguf --prompt "What is the capital of France?" --chat

Greedy by default; --temperature > 0 samples (with optional --top_k / --top_p, --seed for
repeatability). --chat wraps the prompt as a user message with the model's chat template.
"""
import argparse, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minift.errors import ArgumentParser, UsageError, integer, number, run
from minift.runtime.device import BACKENDS
from minift import quant


def main(argv=None, out=sys.stdout):
  ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", required=True, help="an HF model folder, a .gguf file, or a Hugging Face Hub repo id (org/name)")
  ap.add_argument("--gguf_file", default=None, help="a GGUF file inside the --model folder or Hub repo")
  ap.add_argument("--prompt", required=True)
  ap.add_argument("--max_new_tokens", type=integer(1), default=64, help="at most this many new tokens; fewer where the context ends (default 64)")
  ap.add_argument("--temperature", type=number(0), default=0.0, help="0 (default) is greedy")
  ap.add_argument("--top_k", type=integer(1), default=None)
  ap.add_argument("--top_p", type=number(0, 1, low_open=True), default=None, help="in (0, 1]")
  ap.add_argument("--seed", type=integer(0), default=None)
  ap.add_argument("--chat", action="store_true", help="format the prompt with the tokenizer's chat template")
  ap.add_argument("--lora", default=None, help="a PEFT LoRA adapter folder, merged into the weights")
  quant.add_flags(ap)
  ap.add_argument("--device", choices=list(BACKENDS), default=None, help="backend (default: MINIFT_DEVICE or numpy)")
  args = ap.parse_args(argv)
  if args.device: os.environ["MINIFT_DEVICE"] = args.device

  from models import load, resolve
  from models.generation import generate
  model, tok = load(path := resolve(args.model, args.gguf_file), dtype=quant.base_dtype_of(args.base_dtype, args.quantize, path))
  if args.lora:
    from minift.lora import load_adapter, merge_lora
    merge_lora(load_adapter(model, args.lora))
  if args.chat and not tok.chat_template: raise UsageError(f"--chat: the tokenizer of {args.model} has no chat template")
  text = tok.apply_chat_template([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
  # a chat template writes its own BOS; a plain prompt gets one if the tokenizer adds it
  ids = tok.encode(text, add_special_tokens=not (args.chat and tok.bos_token and text.startswith(tok.bos_token)))
  if not ids: raise UsageError("--prompt: the prompt makes no tokens")
  if len(ids) > model.max_context: raise UsageError(f"--prompt: the prompt has {len(ids)} tokens, more than the model's context of {model.max_context}")
  room = model.max_context - len(ids) + 1   # the last new token is never fed back, so it needs no slot
  if args.max_new_tokens > room:
    print(f"note: --max_new_tokens {args.max_new_tokens} is capped at {room}: the prompt's {len(ids)} tokens leave that much "
          f"of the model's context of {model.max_context}", file=sys.stderr)
  new, shown, t0 = [], "", time.time()
  for t in generate(model, ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed, tok.eos_token_ids):
    new.append(t)
    text_now = tok.decode(new)
    if not text_now.endswith("\ufffd"):        # hold back a partly decoded multi-byte character
      out.write(text_now[len(shown):]); out.flush()
      shown = text_now
  out.write(tok.decode(new)[len(shown):] + "\n")
  out.flush()
  sys.stderr.write(f"[{len(new)} tokens, {len(new) / max(time.time() - t0, 1e-9):.2f} tokens/s]\n")
  return new


if __name__ == "__main__":
  run(main)
