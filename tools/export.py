#!/usr/bin/env python
"""Export a model, with a LoRA adapter merged in, for the tools people run models with.

  python tools/export.py --model MODEL --lora my-adapter --out my-model.gguf --type q8_0   # llama.cpp, Ollama
  python tools/export.py --model MODEL --lora my-adapter --out my-model                  # Hugging Face folder
  python tools/export.py --model MODEL --lora my-adapter --out my-adapter.gguf --adapter_only

MODEL is a Hugging Face folder, a .gguf file or a Hub repo id (what tools/finetune.py trained on); --lora a
PEFT LoRA adapter folder (tools/finetune.py's <out>/adapter, or one peft saved). An --out that
ends in .gguf gets one GGUF file (llama.cpp: llama-cli -m OUT; Ollama: a Modelfile with
`FROM ./OUT`, then `ollama create NAME -f Modelfile`); any other --out a Hugging Face folder
(transformers: AutoModelForCausalLM.from_pretrained(OUT)). --adapter_only writes the adapter
alone as a llama.cpp LoRA GGUF, for a base exported from the same MODEL without --lora
(llama-cli -m BASE.gguf --lora OUT; Ollama: `ADAPTER ./OUT` under `FROM ./BASE.gguf`).
"""
import argparse, os, sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from minift.errors import ArgumentParser, FileError, MissingFile, UsageError, UserError, run


def parse_args(argv=None):
  ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", required=True, help="HF model folder, .gguf file or Hugging Face Hub repo id (org/name)")
  ap.add_argument("--gguf_file", default=None, help="a GGUF file inside the --model folder or Hub repo")
  ap.add_argument("--lora", default=None, help="PEFT LoRA adapter folder to merge in (none: the model as it is)")
  ap.add_argument("--out", required=True, help="a .gguf file, or a folder for the Hugging Face format")
  ap.add_argument("--type", default=None, help="GGUF weight type: f32, f16 or q8_0 (default f16; vectors stay f32)")
  ap.add_argument("--adapter_only", action="store_true", help="write only the --lora adapter, as a llama.cpp LoRA GGUF")
  args = ap.parse_args(argv)
  from minift.export import GGUF_TYPES
  gguf_out = args.out.lower().endswith(".gguf")
  if args.type is not None and args.type not in GGUF_TYPES: ap.error(f"--type {args.type!r} is not one of {', '.join(GGUF_TYPES)}")
  if args.type is not None and not gguf_out: ap.error(f"--type is for GGUF files; --out {args.out} is a Hugging Face folder (float32)")
  if args.adapter_only and not args.lora: ap.error("--adapter_only needs --lora")
  if args.adapter_only and not gguf_out: ap.error(f"--adapter_only writes a GGUF file: --out must end in .gguf, got {args.out}")
  args.type = args.type or "f16"
  return args


def check_out(out, model, gguf_out):
  """Refuse (UsageError) an --out that would destroy something that is not an export: the input
  model, a folder of other files, a file that is not a GGUF; or one that cannot be written."""
  full = os.path.realpath(out)
  if full == os.path.realpath(model) or os.path.realpath(model).startswith(full + os.sep):
    raise UsageError(f"--out {out} is the --model being exported (or holds it); write somewhere else")
  parent = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(parent): raise UsageError(f"--out {out}: folder {parent} does not exist")
  if not os.access(parent, os.W_OK): raise UsageError(f"--out {out}: cannot write in {parent} (no permission)")   # the export is written next to it, then renamed
  if not os.path.lexists(out): return
  if gguf_out:
    if os.path.isdir(out): raise UsageError(f"--out {out} is a folder, not a .gguf file")
    with open(out, "rb") as f: magic = f.read(4)
    if magic != b"GGUF": raise UsageError(f"--out {out} exists and is not a GGUF file; refusing to replace it")
  else:
    if not os.path.isdir(out): raise UsageError(f"--out {out} exists and is a file; a Hugging Face export is a folder (or end --out in .gguf)")
    files = [f for f in os.listdir(out) if not f.startswith(".")]
    if files and "config.json" not in files:
      raise UsageError(f"--out {out} is a folder of other files (no config.json); refusing to replace it")


def main(argv=None):
  args = parse_args(argv)
  gguf_out = args.out.lower().endswith(".gguf")
  import models
  from minift.lora import load_adapter, merge_lora
  from minift.export import save_hf, save_gguf, save_gguf_adapter
  path = models.resolve(args.model, args.gguf_file)   # a local path, or a Hub repo id's files in the local cache (ModelNotFound)
  if args.lora and not os.path.isdir(args.lora):
    raise (FileError if os.path.exists(args.lora) else MissingFile)(f"--lora {args.lora} is not a folder (expected a PEFT LoRA adapter folder)")
  check_out(args.out, path, gguf_out)
  model, tokenizer = models.load(path)
  if args.lora: load_adapter(model, args.lora)   # one made for another base model is refused, naming --lora (FileError)
  name = os.path.splitext(os.path.basename(os.path.normpath(args.out)))[0]
  what = f"LoRA adapter GGUF ({args.type}) for a base exported from {args.model}" if args.adapter_only else \
         f"GGUF ({args.type})" if gguf_out else "Hugging Face folder (float32)"
  try:   # a configuration or tokenizer the format cannot hold is refused before anything is written
    if args.adapter_only:
      save_gguf_adapter(model, args.out, args.type, name=name)
    elif gguf_out:
      save_gguf(merge_lora(model), args.out, tokenizer, args.type, source=path, name=name)
    else:
      save_hf(merge_lora(model), args.out, tokenizer)
  except ValueError as e:   # (NonFinite too: a merge that overflowed)
    raise UserError(f"cannot write --model {args.model} as {what.split(' (')[0]}: {e}") from None
  print(f"wrote {args.out}: {what}{' with ' + args.lora + ' merged in' if args.lora and not args.adapter_only else ''}")


if __name__ == "__main__":
  run(main)
