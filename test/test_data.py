"""Data pipeline and learning-rate schedules."""
import json, os, re
import numpy as np
import pytest
import torch
from minift.data import load_splits, tokenize, tokenize_cached, pack, PackedData, IGNORE, DataError
from minift.tokenizer import TextTokenizer
from minift.trainer import lr_at
from tiny_lm import char_tokenizer

# a chat template in characters the test tokenizer knows
CHAT = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}")


@pytest.fixture
def tok():
  return TextTokenizer(char_tokenizer(), bos_token_id=1, eos_token_ids=(2,), chat_template=CHAT, bos_token="<s>", eos_token="</s>")


def test_prompt_completion_loss_only_on_completion(tok, tmp_path):
  p = tmp_path / "d.jsonl"
  p.write_text(json.dumps({"prompt": "Q: hi", "completion": " A: yo"}) + "\n")
  ids, mask = tokenize(load_splits(str(p))["train"], tok)
  assert tok.decode(ids[mask == 1]) == " A: yo</s>" and tok.decode(ids[mask == 0]) == "Q: hi"
  assert ids[-1] == 2 and mask[-1] == 1   # EOS after the document, trained like its last token


def test_chat_loss_only_on_assistant_turns(tok, tmp_path):
  p = tmp_path / "c.jsonl"
  msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
          {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"}]
  p.write_text(json.dumps({"messages": msgs}) + "\n")
  ids, mask = tokenize(load_splits(str(p))["train"], tok)
  text = tok.apply_chat_template(msgs, add_generation_prompt=False)
  assert tok.decode(ids[:-1]) == text and ids[-1] == 2
  trained = tok.decode(ids[:-1][mask[:-1] == 1])
  assert trained == "hello\nciao\n"   # the assistant text and its end marker, nothing of the user


def test_packing_targets_are_shifted_and_masked():
  ids = np.arange(10, dtype=np.int32)
  mask = np.array([0, 0, 1, 1, 1, 1, 1, 1, 0, 1], np.uint8)
  x, y = pack(ids, mask, 4)
  np.testing.assert_array_equal(x, [[0, 1, 2, 3], [5, 6, 7, 8]])
  np.testing.assert_array_equal(y, [[IGNORE, 2, 3, 4], [6, 7, IGNORE, 9]])


def test_wikitext_layout_folder_and_errors(tok, tmp_path):
  (tmp_path / "wiki.train.raw").write_text(" = Title = \n some text here \n" * 20)
  (tmp_path / "wiki.valid.raw").write_text(" other words \n" * 20)
  splits = load_splits(str(tmp_path))
  assert splits["valid"] is not None and "Title" in splits["train"][0]["text"]
  d = PackedData(str(tmp_path), tok, 16)
  assert len(d.val_x) > 0 and tok.decode(d.val_x[0]).strip().startswith("other")
  folder = tmp_path / "notes"; folder.mkdir()
  (folder / "a.txt").write_text("first note. " * 10); (folder / "b.md").write_text("second note. " * 10)
  assert [e["text"][:5] for e in load_splits(str(folder))["train"]] == ["first", "secon"]
  with pytest.raises(DataError, match="no such file"): load_splits(str(tmp_path / "missing"))
  bad = tmp_path / "bad.jsonl"; bad.write_text('{"text": "ok"}\n{"oops": 1}\n')
  with pytest.raises(DataError, match=r"bad.jsonl:2: expected an object"): load_splits(str(bad))
  with pytest.raises(DataError, match="make no training block"): PackedData(str(folder / "a.txt"), tok, 1000)


def test_tokens_are_cached_and_order_is_seeded(tok, tmp_path, monkeypatch):
  src = tmp_path / "t.txt"; src.write_text("some words to learn from. " * 40)
  cache = tmp_path / "cache"
  a = tokenize_cached(load_splits(str(src))["train"], tok, str(cache))
  assert len(os.listdir(cache)) == 1
  import minift.data
  monkeypatch.setattr(minift.data, "tokenize", lambda *a: (_ for _ in ()).throw(AssertionError("tokenized twice")))
  b = tokenize_cached(load_splits(str(src))["train"], tok, str(cache))
  np.testing.assert_array_equal(a[0], b[0])
  d1, d2 = PackedData(str(src), tok, 8, seed=5, cache_dir=str(cache)), PackedData(str(src), tok, 8, seed=5, cache_dir=str(cache))
  np.testing.assert_array_equal(d1.epoch_order(0), d2.epoch_order(0))
  assert not np.array_equal(d1.epoch_order(0), d1.epoch_order(1))
  resumed = list(d1.batches(2, epoch=0, start=3))
  full = list(d1.batches(2, epoch=0))
  assert resumed[0][0] == full[3][0] and np.array_equal(resumed[0][1], full[3][1])


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_schedules_match_transformers(schedule):
  import transformers
  opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.3)
  make = {"linear": transformers.get_linear_schedule_with_warmup, "cosine": transformers.get_cosine_schedule_with_warmup,
          "constant": transformers.get_constant_schedule_with_warmup}[schedule]
  sched = make(opt, 5, 40) if schedule != "constant" else make(opt, 5)
  for step in range(40):
    assert lr_at(step, 0.3, 5, 40, schedule) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-12)
    opt.step(); sched.step()


def test_folder_walk_reads_each_file_once_and_never_the_run_output(tmp_path, monkeypatch):
  """Symbolic links are followed, but a link loop or a second link to one file does not repeat
  it, and a run's --out inside the data folder (its metrics.jsonl) is never read as data."""
  import minift.data
  data = tmp_path / "notes"; (data / "sub").mkdir(parents=True)
  (data / "a.txt").write_text("first note. " * 10)
  (data / "sub" / "b.md").write_text("second note. " * 10)
  os.symlink("..", data / "sub" / "loop")                 # a loop back to the data folder
  os.symlink(data / "a.txt", data / "sub" / "again.txt")  # the same file under a second name
  outside = tmp_path / "elsewhere"; outside.mkdir(); (outside / "c.txt").write_text("third note. " * 10)
  os.symlink(outside, data / "linked")                     # a linked folder is read
  out = data / "run-out"; out.mkdir()
  (out / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')   # would be a bad example if read
  reads = []
  real_read = minift.data.read_text
  monkeypatch.setattr(minift.data, "read_text", lambda path, *a, **k: reads.append(os.path.realpath(path)) or real_read(path, *a, **k))
  texts = [e["text"][:5] for e in load_splits(str(data), exclude=[str(out)])["train"]]
  assert sorted(texts) == ["first", "secon", "third"] and len(reads) == len(set(reads)) == 3
  with pytest.raises(DataError, match=r"metrics.jsonl:1: expected an object"): load_splits(str(data))   # what --out would have done


@pytest.mark.parametrize("line, message", [
  ('{"prompt": 5, "completion": "five"}', '"prompt" must be a string, got int'),
  ('{"prompt": "five", "completion": null}', '"completion" must be a string, got NoneType'),
  ('{"text": ["a", "list"]}', '"text" must be a string, got list'),
  ('{"messages": "hello there"}', '"messages" must be a list of {"role", "content"} objects, got str'),
  ('{"messages": [{"role": "user", "content": 3}]}', 'message 0 must be an object with a string "role" and a string "content"'),
  ('{"messages": [{"content": "hi"}]}', 'message 0 must be an object with a string "role"'),
  ('{"messages": ["hi"]}', 'message 0 must be an object'),
  ('["text"]', 'expected an object with "text"'),
])
def test_jsonl_fields_of_the_wrong_type_name_file_and_line(tmp_path, line, message):
  p = tmp_path / "chat.jsonl"
  p.write_text('{"text": "a fine first line"}\n' + line + "\n")
  with pytest.raises(DataError, match=re.escape(f"chat.jsonl:2: {message}")): load_splits(str(p))
