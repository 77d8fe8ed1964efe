"""The catalogue of user errors: every tool, run as a subprocess on bad files, flags and
machines, prints exactly one line `error: ...` that names the culprit (the file or the flag),
exits with status 2 (a flag) or 1 (anything else), and prints no traceback.

The cases of one tool run one after another in one process (test/cli_driver.py runs each as
`python tools/T.py ARGS` would), since a process start costs about a second; the cases that
change the process (a file-size limit, an environment variable read once) run on their own."""
import io, json, os, resource, shutil, subprocess, sys
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")


# ---- the bad inputs

def small_vocab_model(folder):
  """A tiny Llama whose embedding table (10 rows) is smaller than its tokenizer's vocabulary."""
  import torch, transformers
  from tiny_lm import char_tokenizer
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=10, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)).save_pretrained(folder)
  char_tokenizer().save(os.path.join(folder, "tokenizer.json"))
  return str(folder)


def variant(src, dst, change):
  shutil.copytree(src, dst)
  change(str(dst))
  return str(dst)


def write(path, data):
  with open(path, "wb" if isinstance(data, bytes) else "w") as f: f.write(data)
  return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """{name: path} of every bad (and good) input the cases use."""
  from tiny_lm import save_tiny, TEXT
  from safetensors.numpy import load_file, save_file
  t = tmp_path_factory.mktemp("cli")
  f = {"tmp": str(t), "llama": save_tiny("llama", t / "llama"), "text": write(t / "hamlet.txt", TEXT)}
  llama = f["llama"]
  weights = os.path.join(llama, "model.safetensors")
  f["file"] = write(t / "a_file", "x")
  f["short"] = write(t / "short.txt", "hi there")
  f["bad_utf8"] = write(t / "bad-utf8.txt", b"hello \xff\xfe world " * 20)
  # models
  f["corrupt_config"] = variant(llama, t / "corrupt_config", lambda d: write(os.path.join(d, "config.json"), "{ not json"))
  f["bert"] = variant(llama, t / "bert", lambda d: write(os.path.join(d, "config.json"), json.dumps({**json.load(open(os.path.join(d, "config.json"))), "model_type": "bert"})))
  f["no_config"] = variant(llama, t / "no_config", lambda d: os.remove(os.path.join(d, "config.json")))
  f["no_weights"] = variant(llama, t / "no_weights", lambda d: os.remove(os.path.join(d, "model.safetensors")))
  f["truncated"] = variant(llama, t / "truncated", lambda d: os.truncate(os.path.join(d, "model.safetensors"), os.path.getsize(weights) // 2))
  f["corrupt_tokenizer"] = variant(llama, t / "corrupt_tokenizer", lambda d: write(os.path.join(d, "tokenizer.json"), "{\"model\": 3"))
  f["no_tokenizer"] = variant(llama, t / "no_tokenizer", lambda d: os.remove(os.path.join(d, "tokenizer.json")))
  f["corrupt_tokenizer_config"] = variant(llama, t / "corrupt_tokenizer_config", lambda d: write(os.path.join(d, "tokenizer_config.json"), "{"))
  def nan_weight(d):
    tensors = load_file(os.path.join(d, "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = np.nan
    save_file(tensors, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
  f["nan_weight"] = variant(llama, t / "nan_weight", nan_weight)
  f["small_vocab"] = small_vocab_model(t / "smallvocab")
  f["fake_gguf"] = write(t / "fake.gguf", b"this is not a gguf file")
  import gguf
  w = gguf.GGUFWriter(str(t / "trunc.gguf"), "llama")
  w.add_tensor("token_embd.weight", np.zeros((64, 32), np.float32))
  w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
  os.truncate(t / "trunc.gguf", os.path.getsize(t / "trunc.gguf") - 100)
  f["trunc_gguf"] = str(t / "trunc.gguf")
  # data
  f["invalid_jsonl"] = write(t / "invalid.jsonl", '{"text": "fine"}\n{oops\n')
  f["num_prompt"] = write(t / "num_prompt.jsonl", '{"prompt": 5, "completion": "five"}\n')
  f["str_messages"] = write(t / "str_messages.jsonl", '{"messages": "hello there"}\n')
  f["no_role"] = write(t / "no_role.jsonl", '{"text": "a"}\n{"messages": [{"content": "hi"}]}\n')
  f["num_text"] = write(t / "num_text.jsonl", '{"text": ["a", "list"]}\n')
  # adapters: a good one, then broken copies
  import models
  from minift.lora import apply_lora, save_adapter
  model, _ = models.load(llama)
  apply_lora(model, None, r=4, alpha=8)
  good = str(t / "adapter")
  save_adapter(model, good, base_model_path=llama)
  f["adapter_corrupt_config"] = variant(good, t / "adapter_corrupt_config", lambda d: write(os.path.join(d, "adapter_config.json"), "[1, 2"))
  f["adapter_no_targets"] = variant(good, t / "adapter_no_targets", lambda d: write(os.path.join(d, "adapter_config.json"), json.dumps({"peft_type": "LORA", "r": 4})))
  f["adapter_corrupt_weights"] = variant(good, t / "adapter_corrupt_weights", lambda d: write(os.path.join(d, "adapter_model.safetensors"), b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}"))
  def other_model(d):   # the same modules with another hidden size: made for another base model
    p = os.path.join(d, "adapter_model.safetensors")
    save_file({k: np.zeros((4, 48) if "lora_A" in k else (v.shape[0] * 3 // 2, 4), np.float32) for k, v in load_file(p).items()}, p)
  f["adapter_other_model"] = variant(good, t / "adapter_other_model", other_model)
  f["adapter_gpt2"] = variant(good, t / "adapter_gpt2", lambda d: write(os.path.join(d, "adapter_config.json"), json.dumps(
    {**json.load(open(os.path.join(d, "adapter_config.json"))), "target_modules": ["c_attn"]})))
  # a finished run's checkpoint, and copies with a broken state.json or weights
  sys.path.insert(0, TOOLS)
  import finetune
  run = str(t / "run")
  finetune.main(["--model", llama, "--data", f["text"], "--seq_len", "16", "--batch_size", "2", "--max_steps", "1", "--out", run, "--quiet"])
  f["run_corrupt_state"] = variant(run, t / "run_corrupt_state", lambda d: write(os.path.join(d, "checkpoint", "state.json"), '{"step": 1,'))
  f["run_corrupt_weights"] = variant(run, t / "run_corrupt_weights", lambda d: os.truncate(os.path.join(d, "checkpoint", "trainable.safetensors"), 50))
  # MMLU
  row = {"question": "q?", "answer_a": "a", "answer_b": "b", "answer_c": "c", "answer_d": "d", "correct_answer": "A", "topic": "t"}
  f["mmlu_bad_utf8"] = write(t / "mmlu_bad_utf8.jsonl", json.dumps(row).encode() + b"\n\xff\xfe\n")
  f["mmlu_invalid"] = write(t / "mmlu_invalid.jsonl", json.dumps(row) + "\n{broken\n")
  f["mmlu_no_key"] = write(t / "mmlu_no_key.jsonl", json.dumps({k: v for k, v in row.items() if k != "answer_c"}) + "\n")
  f["mmlu_good"] = write(t / "mmlu_good.jsonl", json.dumps(row) + "\n")
  os.makedirs(t / "not_mmlu")
  f["not_mmlu"] = str(t / "not_mmlu")
  os.makedirs(t / "mmlu_csv" / "test")
  f["mmlu_bad_row"] = write(t / "mmlu_csv" / "test" / "one_test.csv", "q,a,b,c,d,A\nq2,a,b,c,E\n")
  os.makedirs(t / "mmlu_csv_utf8" / "test")
  write(t / "mmlu_csv_utf8" / "test" / "two_test.csv", b"q,a,b,c,d,A\n\xff,a,b,c,d,B\n")
  f["mmlu_csv_utf8"] = str(t / "mmlu_csv_utf8")
  f["mmlu_csv"] = str(t / "mmlu_csv")
  os.makedirs(t / "mmlu_csv_ok" / "test")
  write(t / "mmlu_csv_ok" / "test" / "one_test.csv", "q,a,b,c,d,A\nq2,a,b,c,d,C\n")
  f["mmlu_csv_ok"] = str(t / "mmlu_csv_ok")
  return f


# ---- the cases: (id, tool, argv, culprit: text the error line must contain, exit status)

M, D = ["--model", "{llama}"], ["--data", "{text}"]
FT = M + D + ["--out", "{tmp}/ft-out", "--seq_len", "16", "--max_steps", "1", "--quiet"]
RESUME = M + D + ["--seq_len", "16", "--batch_size", "2", "--max_steps", "2", "--quiet", "--resume", "--out"]
PPL, MMLU = M + ["--text", "{text}"], M + ["--data", "{mmlu_good}"]
GEN, FED = M + ["--prompt", "to be"], M + ["--data", "{text}", "--out", "{tmp}/fed-out", "--quiet"]
EXP = M + ["--out", "{tmp}/x.gguf"]
CASES = [
  # finetune: flags
  ("ft-batch-size-0", "finetune", FT + ["--batch_size", "0"], "--batch_size", 2),
  ("ft-batch-size-text", "finetune", FT + ["--batch_size", "four"], "--batch_size", 2),
  ("ft-max-steps-neg", "finetune", FT + ["--max_steps", "-1"], "--max_steps", 2),
  ("ft-epochs-0", "finetune", FT + ["--epochs", "0"], "--epochs", 2),
  ("ft-seq-len-1", "finetune", FT + ["--seq_len", "1"], "--seq_len", 2),
  ("ft-lr-nan", "finetune", FT + ["--lr", "nan"], "--lr", 2),
  ("ft-lr-neg", "finetune", FT + ["--lr", "-1"], "--lr", 2),
  ("ft-rank-0", "finetune", FT + ["--lora_rank", "0"], "--lora_rank", 2),
  ("ft-alpha-inf", "finetune", FT + ["--lora_alpha", "inf"], "--lora_alpha", 2),
  ("ft-dropout", "finetune", FT + ["--lora_dropout", "1.5"], "--lora_dropout", 2),
  ("ft-checkpoint-fraction", "finetune", FT + ["--grad_checkpoint", "2"], "--grad_checkpoint", 2),
  ("ft-momentum", "finetune", FT + ["--momentum", "-0.5"], "--momentum", 2),
  ("ft-val-fraction", "finetune", FT + ["--val_fraction", "1"], "--val_fraction", 2),
  ("ft-warmup-neg", "finetune", FT + ["--warmup_steps", "-3"], "--warmup_steps", 2),
  ("ft-eval-batches-0", "finetune", FT + ["--eval_batches", "0"], "--eval_batches", 2),
  ("ft-seed-neg", "finetune", FT + ["--seed", "-1"], "--seed", 2),
  ("ft-accum", "finetune", FT + ["--batch_size", "4", "--grad_accum_steps", "3"], "--batch_size", 2),
  ("ft-shard-budget-0", "finetune", FT + ["--shard_budget_mb", "0"], "--shard_budget_mb", 2),
  ("ft-pm-interval-0", "finetune", FT + ["--pm_interval", "0"], "--pm_interval", 2),
  ("ft-pm-poll-0", "finetune", FT + ["--pm_poll_s", "0"], "--pm_poll_s", 2),
  ("ft-pm-poll-overflow", "finetune", FT + ["--pm_poll_s", "1e300"], "--pm_poll_s", 2),
  ("ft-pm-hz-overflow", "finetune", FT + ["--pm_fb_low", "1e-310"], "--pm_fb_low", 2),
  ("ft-pm-schedule-overflow", "finetune", FT + ["--pm_schedule", "0-:1e300"], "--pm_schedule", 2),
  ("ft-pm-schedule-bad", "finetune", FT + ["--pm_schedule", "0-9:x"], "--pm_schedule", 2),
  ("ft-unknown-flag", "finetune", FT + ["--batchsize", "2"], "--batchsize", 2),
  ("ft-seq-len-context", "finetune", FT + ["--seq_len", "500"], "--seq_len", 2),
  ("ft-lora-targets", "finetune", FT + ["--lora_targets", "c_attn"], "--lora_targets", 2),
  ("ft-no-batch", "finetune", FT + ["--batch_size", "512"], "--batch_size", 2),
  # finetune: files and machine
  ("ft-model-missing", "finetune", ["--model", "{tmp}/no-such-model"] + FT[2:], "no-such-model", 1),
  ("ft-data-missing", "finetune", M + ["--data", "{tmp}/no-such-data.txt"] + FT[4:], "no-such-data.txt", 1),
  ("ft-out-under-file", "finetune", FT + ["--out", "{file}/sub"], "--out", 1),
  ("ft-config-corrupt", "finetune", ["--model", "{corrupt_config}"] + FT[2:], "corrupt_config/config.json", 1),
  ("ft-config-bert", "finetune", ["--model", "{bert}"] + FT[2:], "bert/config.json", 1),
  ("ft-config-missing", "finetune", ["--model", "{no_config}"] + FT[2:], "config.json", 1),
  ("ft-weights-missing", "finetune", ["--model", "{no_weights}"] + FT[2:], "model.safetensors", 1),
  ("ft-weights-truncated", "finetune", ["--model", "{truncated}"] + FT[2:], "truncated/model.safetensors", 1),
  ("ft-weights-nan", "finetune", ["--model", "{nan_weight}"] + FT[2:], "model.layers.1.mlp.up_proj.weight", 1),
  ("ft-tokenizer-corrupt", "finetune", ["--model", "{corrupt_tokenizer}"] + FT[2:], "corrupt_tokenizer/tokenizer.json", 1),
  ("ft-tokenizer-missing", "finetune", ["--model", "{no_tokenizer}"] + FT[2:], "no_tokenizer", 1),
  ("ft-tokenizer-config-corrupt", "finetune", ["--model", "{corrupt_tokenizer_config}"] + FT[2:], "tokenizer_config.json", 1),
  ("ft-token-ids-beyond-table", "finetune", ["--model", "{small_vocab}"] + FT[2:], "smallvocab", 1),
  ("ft-gguf-fake", "finetune", ["--model", "{fake_gguf}"] + FT[2:], "fake.gguf", 1),
  ("ft-gguf-truncated", "finetune", ["--model", "{trunc_gguf}"] + FT[2:], "trunc.gguf", 1),
  ("ft-data-utf8", "finetune", M + ["--data", "{bad_utf8}"] + FT[4:], "bad-utf8.txt", 1),
  ("ft-data-short", "finetune", M + ["--data", "{short}"] + FT[4:], "short.txt", 1),
  ("ft-jsonl-invalid", "finetune", M + ["--data", "{invalid_jsonl}"] + FT[4:], "invalid.jsonl:2", 1),
  ("ft-jsonl-number-prompt", "finetune", M + ["--data", "{num_prompt}"] + FT[4:], "num_prompt.jsonl:1", 1),
  ("ft-jsonl-string-messages", "finetune", M + ["--data", "{str_messages}"] + FT[4:], "str_messages.jsonl:1", 1),
  ("ft-jsonl-message-no-role", "finetune", M + ["--data", "{no_role}"] + FT[4:], "no_role.jsonl:2", 1),
  ("ft-jsonl-list-text", "finetune", M + ["--data", "{num_text}"] + FT[4:], "num_text.jsonl:1", 1),
  ("ft-resume-none", "finetune", RESUME + ["{tmp}/never-ran"], "--resume", 1),
  ("ft-resume-corrupt-state", "finetune", RESUME + ["{run_corrupt_state}"], "checkpoint/state.json", 1),
  ("ft-resume-corrupt-weights", "finetune", RESUME + ["{run_corrupt_weights}"], "checkpoint/trainable.safetensors", 1),
  # eval_ppl
  ("ppl-max-chars-0", "eval_ppl", PPL + ["--max_chars", "0"], "--max_chars", 2),
  ("ppl-ctx-1", "eval_ppl", PPL + ["--ctx", "1"], "--ctx", 2),
  ("ppl-stride-0", "eval_ppl", PPL + ["--stride", "0"], "--stride", 2),
  ("ppl-stride-above-window", "eval_ppl", PPL + ["--ctx", "16", "--stride", "100"], "--stride", 2),
  ("ppl-batch-0", "eval_ppl", PPL + ["--batch_size", "0"], "--batch_size", 2),
  ("ppl-split", "eval_ppl", M + ["--data_root", "{tmp}", "--split", "dev"], "--split", 2),
  ("ppl-json-no-folder", "eval_ppl", PPL + ["--json", "{tmp}/no-such-folder/r.json"], "--json", 2),
  ("ppl-text-missing", "eval_ppl", M + ["--text", "{tmp}/no-such.txt"], "no-such.txt", 1),
  ("ppl-text-utf8", "eval_ppl", M + ["--text", "{bad_utf8}"], "bad-utf8.txt", 1),
  ("ppl-data-root", "eval_ppl", M + ["--data_root", "{tmp}"], "wiki.test.raw", 1),
  ("ppl-model-missing", "eval_ppl", ["--model", "{tmp}/no-such-model", "--text", "{text}"], "no-such-model", 1),
  ("ppl-tokenizer-corrupt", "eval_ppl", ["--model", "{corrupt_tokenizer}", "--text", "{text}"], "tokenizer.json", 1),
  ("ppl-token-ids-beyond-table", "eval_ppl", ["--model", "{small_vocab}", "--text", "{text}"], "smallvocab", 1),
  ("ppl-lora-missing", "eval_ppl", PPL + ["--lora", "{tmp}/no-such-adapter"], "no-such-adapter", 1),
  ("ppl-lora-corrupt-config", "eval_ppl", PPL + ["--lora", "{adapter_corrupt_config}"], "adapter_corrupt_config/adapter_config.json", 1),
  ("ppl-lora-no-targets", "eval_ppl", PPL + ["--lora", "{adapter_no_targets}"], "adapter_no_targets/adapter_config.json", 1),
  ("ppl-lora-corrupt-weights", "eval_ppl", PPL + ["--lora", "{adapter_corrupt_weights}"], "adapter_model.safetensors", 1),
  ("ppl-lora-other-model", "eval_ppl", PPL + ["--lora", "{adapter_other_model}"], "adapter_other_model", 1),
  ("ppl-lora-other-targets", "eval_ppl", PPL + ["--lora", "{adapter_gpt2}"], "adapter_gpt2", 1),
  ("ppl-json-disk-full", "eval_ppl", PPL + ["--json", "/dev/full"], "/dev/full", 1),
  # eval_mmlu
  ("mmlu-k-neg", "eval_mmlu", MMLU + ["--k", "-1"], "--k", 2),
  ("mmlu-limit-0", "eval_mmlu", MMLU + ["--limit", "0"], "--limit", 2),
  ("mmlu-max-ctx-0", "eval_mmlu", MMLU + ["--max_ctx", "0"], "--max_ctx", 2),
  ("mmlu-batch-0", "eval_mmlu", MMLU + ["--batch_size", "0"], "--batch_size", 2),
  ("mmlu-subjects", "eval_mmlu", MMLU + ["--subjects", "astrology"], "--subjects", 2),
  ("mmlu-k-without-dev", "eval_mmlu", M + ["--data", "{mmlu_csv_ok}", "--k", "3"], "--k", 2),
  ("mmlu-json-no-folder", "eval_mmlu", MMLU + ["--json", "{tmp}/no-such-folder/r.json"], "--json", 2),
  ("mmlu-data-missing", "eval_mmlu", M + ["--data", "{tmp}/no-such.jsonl"], "no-such.jsonl", 1),
  ("mmlu-jsonl-utf8", "eval_mmlu", M + ["--data", "{mmlu_bad_utf8}"], "mmlu_bad_utf8.jsonl", 1),
  ("mmlu-jsonl-invalid", "eval_mmlu", M + ["--data", "{mmlu_invalid}"], "mmlu_invalid.jsonl:2", 1),
  ("mmlu-jsonl-no-key", "eval_mmlu", M + ["--data", "{mmlu_no_key}"], "mmlu_no_key.jsonl:1", 1),
  ("mmlu-not-csv", "eval_mmlu", M + ["--data", "{not_mmlu}"], "not_mmlu", 1),
  ("mmlu-csv-bad-row", "eval_mmlu", M + ["--data", "{mmlu_csv}"], "one_test.csv", 1),
  ("mmlu-csv-utf8", "eval_mmlu", M + ["--data", "{mmlu_csv_utf8}"], "two_test.csv", 1),
  ("mmlu-model-corrupt", "eval_mmlu", ["--model", "{corrupt_config}", "--data", "{mmlu_good}"], "config.json", 1),
  # generate
  ("gen-max-new-neg", "generate", GEN + ["--max_new_tokens", "-1"], "--max_new_tokens", 2),
  ("gen-top-k-0", "generate", GEN + ["--top_k", "0"], "--top_k", 2),
  ("gen-top-p-0", "generate", GEN + ["--top_p", "0"], "--top_p", 2),
  ("gen-temperature-neg", "generate", GEN + ["--temperature", "-1"], "--temperature", 2),
  ("gen-temperature-nan", "generate", GEN + ["--temperature", "nan"], "--temperature", 2),
  ("gen-seed-neg", "generate", GEN + ["--seed", "-5"], "--seed", 2),
  ("gen-prompt-empty", "generate", M + ["--prompt", ""], "--prompt", 2),
  ("gen-prompt-too-long", "generate", M + ["--prompt", "x" * 100], "--prompt", 2),
  ("gen-chat-no-template", "generate", GEN + ["--chat"], "--chat", 2),
  ("gen-model-missing", "generate", ["--model", "{tmp}/no-such-model", "--prompt", "a"], "no-such-model", 1),
  ("gen-tokenizer-corrupt", "generate", ["--model", "{corrupt_tokenizer}", "--prompt", "a"], "tokenizer.json", 1),
  ("gen-token-ids-beyond-table", "generate", ["--model", "{small_vocab}", "--prompt", "to be"], "smallvocab", 1),
  ("gen-lora-corrupt", "generate", GEN + ["--lora", "{adapter_corrupt_config}"], "adapter_config.json", 1),
  # federated
  ("fed-clients-0", "federated", FED + ["--clients", "0"], "--clients", 2),
  ("fed-rounds-0", "federated", FED + ["--rounds", "0"], "--rounds", 2),
  ("fed-timeout-0", "federated", FED + ["--round_timeout", "0"], "--round_timeout", 2),
  ("fed-timeout-inf", "federated", FED + ["--round_timeout", "inf"], "--round_timeout", 2),
  ("fed-lr-nan", "federated", FED + ["--lr", "nan"], "--lr", 2),
  ("fed-val-fraction", "federated", FED + ["--val_fraction", "1"], "--val_fraction", 2),
  ("fed-seed-neg", "federated", FED + ["--seed", "-1"], "--seed", 2),
  ("fed-model-missing", "federated", ["--model", "{tmp}/no-such-model"] + FED[2:], "no-such-model", 1),
  ("fed-model-corrupt", "federated", ["--model", "{corrupt_config}"] + FED[2:], "config.json", 1),
  ("fed-tokenizer-corrupt", "federated", ["--model", "{corrupt_tokenizer}"] + FED[2:], "tokenizer.json", 1),
  ("fed-data-missing", "federated", M + ["--data", "{tmp}/no-such-data.txt", "--out", "{tmp}/fed-out"], "no-such-data.txt", 1),
  ("fed-val-missing", "federated", FED + ["--val_data", "{tmp}/no-such-val.txt"], "no-such-val.txt", 1),
  ("fed-shard-too-short", "federated", FED + ["--clients", "4", "--seq_len", "60", "--batch_size", "16"], "--batch_size", 2),
  ("fed-val-too-short", "federated", FED + ["--val_data", "{short}", "--seq_len", "32"], "short.txt", 1),
  ("fed-write-app-no-val", "federated", M + ["--write_app", "{tmp}/app"], "--val_data", 2),
  # export
  ("export-type", "export", EXP + ["--type", "q4_0"], "--type", 2),
  ("export-type-for-a-folder", "export", M + ["--out", "{tmp}/exported", "--type", "f16"], "--type", 2),
  ("export-adapter-only-no-lora", "export", EXP + ["--adapter_only"], "--adapter_only", 2),
  ("export-unknown-flag", "export", EXP + ["--quant", "q8_0"], "--quant", 2),
  ("export-out-no-folder", "export", M + ["--out", "{tmp}/no-such-folder/x.gguf"], "--out", 2),
  ("export-out-not-gguf", "export", M + ["--out", "{fake_gguf}"], "--out", 2),
  ("export-out-is-the-model", "export", M + ["--out", "{llama}"], "--out", 2),
  ("export-model-missing", "export", ["--model", "{tmp}/no-such-model", "--out", "{tmp}/x.gguf"], "no-such-model", 1),
  ("export-config-corrupt", "export", ["--model", "{corrupt_config}", "--out", "{tmp}/x.gguf"], "corrupt_config/config.json", 1),
  ("export-weights-nan", "export", ["--model", "{nan_weight}", "--out", "{tmp}/x.gguf"], "model.layers.1.mlp.up_proj.weight", 1),
  ("export-lora-missing", "export", EXP + ["--lora", "{tmp}/no-such-adapter"], "no-such-adapter", 1),
  ("export-lora-other-model", "export", EXP + ["--lora", "{adapter_other_model}"], "adapter_other_model", 1),
  # get_assets
  ("assets-none-chosen", "get_assets", [], "--demo", 2),
  ("assets-both", "get_assets", ["--demo", "--test"], "--test", 2),
  # kernel_test and bench
  ("kt-repeat-0", "kernel_test", ["--repeat", "0"], "--repeat", 2),
  ("kt-json-no-folder", "kernel_test", ["--quick", "--json", "{tmp}/no-such-folder/k.json"], "--json", 2),
  ("bench-repeat-0", "bench", ["--repeat", "0"], "--repeat", 2),
  ("bench-task", "bench", ["--task", "everything"], "--task", 2),
  ("bench-json-no-folder", "bench", ["--task", "matmul", "--json", "{tmp}/no-such-folder/b.json"], "--json", 2),
  ("bench-model-missing", "bench", ["--task", "breakdown", "--model", "{tmp}/no-such-model"], "--model", 2),
]

# cases that change their process: each runs alone, as `python tools/T.py ...`
# (id, tool, argv, culprit, status, environment, file-size limit in bytes)
ALONE = [
  ("ft-disk-full", "finetune", FT, "ft-out-full", 1, {}, 4096),
  ("kt-no-device", "kernel_test", ["--quick"], "MINIFT_CL_DEVICE", 2, {"MINIFT_CL_DEVICE": "no-such-device"}, None),
]


def fill(argv, files):
  return [a.format(**files) for a in argv]


@pytest.fixture(scope="module")
def results(files, tmp_path_factory):
  """{case id: {status, stdout, stderr}}: each tool's cases run in one process of cli_driver.py."""
  t = tmp_path_factory.mktemp("driver")
  out = {}
  for tool in dict.fromkeys(c[1] for c in CASES):
    cases = [c for c in CASES if c[1] == tool]
    with open(t / f"{tool}.json", "w") as f: json.dump([[tool, fill(c[2], files)] for c in cases], f)
    env = {k: v for k, v in os.environ.items() if k != "DEBUG"}
    subprocess.run([sys.executable, os.path.join(ROOT, "test", "cli_driver.py"), str(t / f"{tool}.json"), str(t / f"{tool}-out.json")],
                   check=True, env=env, cwd=str(t), timeout=600)
    with open(t / f"{tool}-out.json") as f: out.update({c[0]: r for c, r in zip(cases, json.load(f))})
  return out


def check(result, culprit, status):
  text = result["stdout"] + result["stderr"]
  errors = [line for line in text.splitlines() if line.startswith("error:")]
  assert "Traceback" not in text, text
  assert len(errors) == 1, text
  assert culprit in errors[0], errors[0]
  assert result["status"] == status, (result["status"], errors[0])


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_one_clear_error_line(case, results):
  check(results[case[0]], case[3], case[4])


@pytest.mark.parametrize("case", ALONE, ids=[c[0] for c in ALONE])
def test_one_clear_error_line_alone(case, files, tmp_path):
  name, tool, argv, culprit, status, env, file_limit = case
  files = dict(files, tmp=str(tmp_path))
  argv = fill(argv, files)
  if name == "ft-disk-full": argv += ["--out", str(tmp_path / "ft-out-full")]
  limit = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))) if file_limit else None
  r = subprocess.run([sys.executable, os.path.join(TOOLS, f"{tool}.py"), *argv], capture_output=True, text=True, timeout=600,
                     env={**{k: v for k, v in os.environ.items() if k != "DEBUG"}, **env}, preexec_fn=limit)
  check({"status": r.returncode, "stdout": r.stdout, "stderr": r.stderr}, culprit, status)


def test_debug_shows_the_traceback(files, tmp_path):
  """DEBUG=1: the same user error keeps its traceback (for a bug report)."""
  r = subprocess.run([sys.executable, os.path.join(TOOLS, "eval_ppl.py"), "--model", files["corrupt_config"], "--text", files["text"]],
                     capture_output=True, text=True, timeout=600, env={**os.environ, "DEBUG": "1"})
  assert r.returncode == 1 and "Traceback" in r.stderr and "config.json" in r.stderr.strip().splitlines()[-1]


def test_a_bug_keeps_its_traceback():
  """run() turns only the user's and the machine's errors into one line: anything else is a
  bug, and its traceback is what a bug report needs."""
  code = ("import sys; sys.path.insert(0, %r); from minift.errors import run, UsageError\n"
          "def main(): {}['missing key']\nrun(main)") % ROOT
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                     env={k: v for k, v in os.environ.items() if k != "DEBUG"})
  assert r.returncode == 1 and "Traceback" in r.stderr and "KeyError: 'missing key'" in r.stderr


def test_capped_values_say_so(files, capsys):
  """A value the tool lowers to fit the model (its context) is used, and said in one line."""
  from tools import eval_ppl, eval_mmlu, generate
  from tiny_lm import char_tokenizer
  r = eval_ppl.main(["--model", files["llama"], "--text", files["text"], "--ctx", "1000"])
  assert r["ctx"] == 64 and "note: --ctx 1000 is capped at the model's context of 64 tokens" in capsys.readouterr().err
  prompt = "to be or not to be"   # 18 characters, one token each: 64 - 18 + 1 new tokens fit
  new = generate.main(["--model", files["llama"], "--prompt", prompt, "--max_new_tokens", "100"], out=io.StringIO())
  assert len(new) <= 47 and f"note: --max_new_tokens 100 is capped at 47: the prompt's {len(char_tokenizer().encode(prompt).ids)} tokens" in capsys.readouterr().err
  eval_mmlu.main(["--model", files["llama"], "--data", files["mmlu_good"], "--max_ctx", "1000"])
  assert "note: --max_ctx 1000 is capped at the model's context of 64 tokens" in capsys.readouterr().err
  long_question = dict(json.loads(open(files["mmlu_good"]).read()), question="why? " * 20)
  write(os.path.join(files["tmp"], "mmlu_long.jsonl"), json.dumps(long_question) + "\n")
  eval_mmlu.main(["--model", files["llama"], "--data", os.path.join(files["tmp"], "mmlu_long.jsonl")])
  assert "note: 1 of 1 prompts were longer than 64 tokens" in capsys.readouterr().err
