"""--model by Hugging Face Hub repo id, in every tool that takes a model, offline: a Hugging Face
cache laid out as huggingface_hub writes it (models--org--name/refs/main, snapshots/<commit>/ whose
files are symlinks into blobs/, or plain files where a file system has no symlinks), built here
from tiny models. The tools run in their own processes, as huggingface_hub reads HF_HUB_CACHE and
HF_HUB_OFFLINE when it is imported. Each run by Hub id is checked against the same tool run on the
local files."""
import hashlib, http.server, json, os, shutil, subprocess, sys, threading
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))
pytest.importorskip("huggingface_hub")
pytest.importorskip("transformers")
pytest.importorskip("gguf")

import models
from tiny_lm import save_tiny, save_tiny_gguf, TEXT

COMMIT = "0123456789abcdef0123456789abcdef01234567"
FOLDER_REPO, GGUF_REPO = "tiny-org/tiny-llama", "tiny-org/tiny-llama-GGUF"


def add_to_cache(cache, repo_id, files, symlinks=True):
  """A repo in cache as huggingface_hub lays it out: each file's bytes in blobs/<hash>,
  refs/main holding the commit, snapshots/<commit>/<name> a relative symlink to its blob."""
  repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
  os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
  with open(os.path.join(repo, "refs", "main"), "w") as f: f.write(COMMIT)   # no newline, as huggingface_hub writes it
  for name, source in files.items():
    with open(source, "rb") as f: data = f.read()
    blob = os.path.join(repo, "blobs", hashlib.sha256(data).hexdigest())
    os.makedirs(os.path.dirname(blob), exist_ok=True)
    with open(blob, "wb") as f: f.write(data)
    target = os.path.join(repo, "snapshots", COMMIT, name)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if symlinks: os.symlink(os.path.relpath(blob, os.path.dirname(target)), target)
    else: shutil.copyfile(blob, target)
  return os.path.join(repo, "snapshots", COMMIT)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
  """HF_HOME with a tiny Llama HF folder repo (symlinked blobs) and a repo of two GGUFs (plain
  files), the local files they were made from, a text, and the environment of an offline run."""
  root = tmp_path_factory.mktemp("hub")
  folder = save_tiny("llama", root / "local-llama")
  ggufs = {name: save_tiny_gguf(root / name, seed)[0] for name, seed in (("tiny-a.f32.gguf", 1), ("tiny-b.f32.gguf", 2))}
  home = root / "hf"
  cache = str(home / "hub")
  snapshot = add_to_cache(cache, FOLDER_REPO, {n: os.path.join(folder, n) for n in sorted(os.listdir(folder))})
  add_to_cache(cache, GGUF_REPO, ggufs, symlinks=False)
  text = root / "hamlet.txt"
  text.write_text(TEXT)
  env = dict(os.environ, HF_HOME=str(home), HF_HUB_CACHE=cache, HF_HUB_OFFLINE="1", MINIFT_DEVICE="numpy")
  return dict(folder=folder, ggufs=ggufs, cache=cache, snapshot=snapshot, text=str(text), env=env)


def run_tool(tool, args, env, check=True):
  r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", tool), *args], env=env, cwd=ROOT,
                     capture_output=True, text=True, timeout=600)
  if check: assert r.returncode == 0, f"{tool} {args}: exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
  return r


def test_finetune_by_hub_id_trains_the_same_adapter(hub, tmp_path):
  from safetensors.numpy import load_file
  import finetune
  common = ["--data", hub["text"], "--seq_len", "32", "--batch_size", "2", "--save_interval", "1", "--quiet", "--pm_source", "off"]
  finetune.main(["--model", hub["folder"], "--out", str(tmp_path / "local"), "--max_steps", "2", *common])
  r = run_tool("finetune.py", ["--model", FOLDER_REPO, "--out", str(tmp_path / "hub"), "--max_steps", "2", *common], hub["env"])
  assert f"model {FOLDER_REPO}:" in r.stdout
  local, by_id = (load_file(str(tmp_path / k / "adapter/adapter_model.safetensors")) for k in ("local", "hub"))
  assert local.keys() == by_id.keys() and len(local) == 2 * 7 * 2   # A and B of 7 projections in 2 layers
  for k in local: np.testing.assert_array_equal(local[k], by_id[k], err_msg=k)
  with open(tmp_path / "hub/adapter/adapter_config.json") as f:
    assert json.load(f)["base_model_name_or_path"] == FOLDER_REPO   # as peft writes it: the id loads the base anywhere
  # --resume finds the same model by the same id
  r = run_tool("finetune.py", ["--model", FOLDER_REPO, "--out", str(tmp_path / "hub"), "--max_steps", "3", *common, "--resume"], hub["env"])
  assert "resumed from" in r.stdout and "at step 2" in r.stdout


def test_generate_and_eval_mmlu_by_hub_id(hub, tmp_path):
  import io
  import generate, eval_mmlu
  buf = io.StringIO()
  generate.main(["--model", hub["folder"], "--prompt", "To be", "--max_new_tokens", "8"], out=buf)
  r = run_tool("generate.py", ["--model", FOLDER_REPO, "--prompt", "To be", "--max_new_tokens", "8"], hub["env"])
  assert r.stdout == buf.getvalue() and len(r.stdout.strip()) > 0
  rows = [{"question": f"question {i}?", "answer_a": "a", "answer_b": "b", "answer_c": "c", "answer_d": "d", "correct_answer": c, "topic": "t"}
          for i, c in enumerate("ABCDAB")]
  data = tmp_path / "mmlu.jsonl"
  data.write_text("\n".join(json.dumps(row) for row in rows))
  eval_mmlu.main(["--model", hub["folder"], "--data", str(data), "--json", str(tmp_path / "local.json")])
  run_tool("eval_mmlu.py", ["--model", FOLDER_REPO, "--data", str(data), "--json", str(tmp_path / "hub.json")], hub["env"])
  local, by_id = (json.load(open(tmp_path / f"{k}.json")) for k in ("local", "hub"))
  assert by_id["model"] == FOLDER_REPO and by_id["n"] == 6 and by_id["subjects"] == local["subjects"]


def test_gguf_file_in_a_hub_repo(hub, tmp_path):
  import eval_ppl
  ctx = ["--text", hub["text"], "--ctx", "32", "--max_chars", "600"]
  ppl = {name: eval_ppl.main(["--model", path, *ctx])["ppl"] for name, path in hub["ggufs"].items()}
  assert ppl["tiny-a.f32.gguf"] != ppl["tiny-b.f32.gguf"]
  for name in hub["ggufs"]:
    run_tool("eval_ppl.py", ["--model", GGUF_REPO, "--gguf_file", name, *ctx, "--json", str(tmp_path / "r.json")], hub["env"])
    with open(tmp_path / "r.json") as f: assert json.load(f)["ppl"] == ppl[name]   # the file named, not the other one
  # without --gguf_file: which of the two is meant is the user's choice, not a guess
  r = run_tool("eval_ppl.py", ["--model", GGUF_REPO, *ctx], hub["env"], check=False)
  assert r.returncode == 1 and "Traceback" not in r.stderr
  assert f"error: --model {GGUF_REPO} has no config.json (not an HF model folder); its GGUF files: tiny-a.f32.gguf, tiny-b.f32.gguf: " \
         "pick one with --gguf_file NAME" in r.stderr
  r = run_tool("eval_ppl.py", ["--model", GGUF_REPO, "--gguf_file", "tiny-c.gguf", *ctx], hub["env"], check=False)
  assert r.returncode == 1 and f"error: --model {GGUF_REPO} --gguf_file tiny-c.gguf: not a local path, and not in the Hugging Face cache" in r.stderr


def test_federated_app_gets_the_cached_snapshot(hub, tmp_path):
  run_tool("federated.py", ["--write_app", str(tmp_path / "app"), "--model", GGUF_REPO, "--gguf_file", "tiny-b.f32.gguf",
                            "--val_data", hub["text"], "--out", str(tmp_path / "out")], hub["env"])
  with open(tmp_path / "app/pyproject.toml") as f: model = [l for l in f if l.startswith("model = ")][0]
  assert json.loads(model.split(" = ", 1)[1]) == os.path.join(hub["cache"], "models--tiny-org--tiny-llama-GGUF", "snapshots", COMMIT, "tiny-b.f32.gguf")


def test_missing_hub_id_is_a_clear_error(hub):
  r = run_tool("generate.py", ["--model", "tiny-org/no-such-model", "--prompt", "x"], hub["env"], check=False)
  assert r.returncode == 1 and "Traceback" not in r.stderr
  assert r.stderr.strip() == f"error: --model tiny-org/no-such-model: not a local path, and not in the Hugging Face cache ({hub['cache']}) " \
                             "while HF_HUB_OFFLINE=1 forbids downloading it"
  r = run_tool("finetune.py", ["--model", "tiny-org/no-such-model", "--data", hub["text"], "--pm_source", "off"], hub["env"], check=False)
  assert r.returncode == 1 and "error: --model tiny-org/no-such-model: not a local path, and not in the Hugging Face cache" in r.stderr


class CountingHub(http.server.BaseHTTPRequestHandler):
  """A stand-in Hub on loopback that counts the requests it gets and answers each as the Hub answers
  for a missing repo, or for a missing file of GGUF_REPO."""
  requests = []

  def do_GET(self):
    CountingHub.requests.append(self.path)
    self.send_response(404); self.send_header("Content-Length", "0")
    self.send_header("X-Error-Code", "EntryNotFound" if GGUF_REPO in self.path else "RepoNotFound"); self.end_headers()

  do_HEAD = do_GET

  def log_message(self, *args): pass


def test_online_reads_the_cache_first_and_asks_the_hub_otherwise(hub):
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CountingHub)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    env = dict(hub["env"], HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}", NO_PROXY="127.0.0.1,localhost")
    del env["HF_HUB_OFFLINE"]
    code = ("import models\nprint(models.resolve(%r))\nprint(models.resolve(%r, %r))\n"
            "for args in [('tiny-org/no-such-model',), (%r, 'tiny-c.gguf')]:\n"
            "  try: models.resolve(*args)\n  except models.ModelNotFound as e: print(e)\n") % (FOLDER_REPO, GGUF_REPO, "tiny-a.f32.gguf", GGUF_REPO)
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[:2] == [hub["snapshot"], os.path.join(hub["cache"], "models--tiny-org--tiny-llama-GGUF", "snapshots", COMMIT, "tiny-a.f32.gguf")]
    assert lines[2:] == ["--model tiny-org/no-such-model: not a local path, and the Hugging Face Hub has no such repo "
                         "(or it is private or gated: log in with `hf auth login` or set HF_TOKEN)",
                         f"--model {GGUF_REPO} --gguf_file tiny-c.gguf: not a local path, and the repo has no file tiny-c.gguf"]
    # what the cache holds was read without asking the Hub about it; what it lacks was asked for
    assert not [p for p in CountingHub.requests if f"{FOLDER_REPO}/" in p or "tiny-a.f32.gguf" in p], CountingHub.requests
    assert [p for p in CountingHub.requests if "no-such-model" in p] and [p for p in CountingHub.requests if "tiny-c.gguf" in p]
  finally:
    server.shutdown()


def test_without_huggingface_hub(monkeypatch, hub):
  monkeypatch.setitem(sys.modules, "huggingface_hub", None)   # as if not installed
  with pytest.raises(models.ModelNotFound, match=r"not a local path; a Hugging Face Hub repo id needs huggingface_hub: pip install 'minift\[hub\]'"):
    models.resolve(FOLDER_REPO)
  assert models.resolve(hub["folder"]) == hub["folder"]   # local paths never need it


def test_a_local_path_is_always_local(tmp_path, monkeypatch, hub):
  monkeypatch.setitem(sys.modules, "huggingface_hub", None)
  monkeypatch.chdir(tmp_path)
  shutil.copytree(hub["folder"], tmp_path / FOLDER_REPO)   # a folder spelled like a Hub id
  assert models.resolve(FOLDER_REPO) == FOLDER_REPO and not models.is_hub_id(FOLDER_REPO)
  model, _ = models.load(FOLDER_REPO)
  assert model.config.num_hidden_layers == 2
  # --gguf_file inside a local folder, as inside a repo
  os.makedirs("ggufs")
  for name, path in hub["ggufs"].items(): shutil.copyfile(path, os.path.join("ggufs", name))
  assert models.resolve("ggufs", "tiny-b.f32.gguf") == os.path.join("ggufs", "tiny-b.f32.gguf")
  for args, message in ((("ggufs",), "--model ggufs has no config.json (not an HF model folder); its GGUF files: tiny-a.f32.gguf, tiny-b.f32.gguf"),
                        (("ggufs", "c.gguf"), "--gguf_file c.gguf: no such file in ggufs; its GGUF files: tiny-a.f32.gguf"),
                        (("ggufs/tiny-a.f32.gguf", "x.gguf"), "--gguf_file picks a file inside a folder or Hub repo, but --model ggufs/tiny-a.f32.gguf is a file"),
                        (("no/such/folder",), "model path no/such/folder does not exist (a Hugging Face Hub id is written org/name")):
    with pytest.raises(models.ModelNotFound) as e: models.resolve(*args)
    assert message in str(e.value)


def test_export_by_hub_id(hub, tmp_path):
  """tools/export.py finds a model by Hub id (a folder repo, a GGUF in a repo) and writes what it
  writes from the local files, byte for byte."""
  import export
  for out, local, by_id, files in (("model", [hub["folder"]], [FOLDER_REPO], ["config.json", "model.safetensors", "tokenizer.json"]),
                                   ("model.gguf", [hub["ggufs"]["tiny-b.f32.gguf"], "--type", "f32"],
                                    [GGUF_REPO, "--gguf_file", "tiny-b.f32.gguf", "--type", "f32"], [""])):
    for where in ("local", "by_id"): (tmp_path / where).mkdir(exist_ok=True)
    export.main(["--model", *local, "--out", str(tmp_path / "local" / out)])
    run_tool("export.py", ["--model", *by_id, "--out", str(tmp_path / "by_id" / out)], hub["env"])
    for f in files:
      assert (tmp_path / "local" / out / f).read_bytes() == (tmp_path / "by_id" / out / f).read_bytes(), (out, f)
