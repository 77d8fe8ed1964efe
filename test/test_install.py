"""The newcomer's path: README.md's first section gives two commands (the demo, the tests); CI runs
the second verbatim; the first works in a fresh virtual environment on a clean copy of the
repository, so a dependency missing from setup.cfg fails here. tools/get_assets.py installs the
packages that need --no-deps."""
import json, os, re, shutil, subprocess, sys
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))


def readme_commands():
  """The commands in the bash blocks of README.md's first section."""
  with open(os.path.join(ROOT, "README.md")) as f: text = f.read()
  title, section = text.split("\n## ")[1].split("\n", 1)
  assert title == "Two commands", f"README.md's first section is {title!r}"
  blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
  return [line.strip() for block in blocks for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_readme_gives_two_commands_and_ci_runs_the_second():
  demo, tests = readme_commands()   # exactly two
  assert demo.endswith("python tools/finetune.py") and "get_assets.py --demo" in demo
  assert tests.endswith("python -m pytest test -q") and "get_assets.py --test" in tests
  with open(os.path.join(ROOT, ".ci/run")) as f: lines = [l.strip() for l in f]
  assert tests in lines and lines.index(tests) > max(i for i, l in enumerate(lines) if "apt-get install" in l)


def test_get_assets_installs_what_is_missing_with_the_right_flags(tmp_path, capsys):
  import get_assets
  log = tmp_path / "pip.log"
  fake_pip = (sys.executable, "-c", f"import sys; open({str(log)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')")
  assets = [("data-pkg", "no_such_module_a", True, "data"), ("plain-pkg", "no_such_module_b", False, "weights"),
            ("json-pkg", "json", True, "here already")]
  from minift.errors import UserError
  with pytest.raises(UserError, match="installed, but still not importable: data-pkg, plain-pkg"):   # the fake pip installs nothing
    get_assets.install(assets, pip=fake_pip)
  assert log.read_text().splitlines() == ["--no-deps data-pkg", "plain-pkg"]   # json is importable: not asked for
  assert "json-pkg: here already (installed already)" in capsys.readouterr().out
  log.unlink()
  assert get_assets.install(assets[2:], pip=fake_pip) == [] and not log.exists()


def clean_copy(dest):
  """The repository's files as a fresh clone has them (with uncommitted changes), no caches or builds."""
  try:
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    files = [f for f in listed.decode().split("\0") if f and os.path.isfile(os.path.join(ROOT, f))]
  except (OSError, subprocess.CalledProcessError):   # not a git checkout
    files = [os.path.relpath(os.path.join(d, f), ROOT) for d, dirs, fs in os.walk(ROOT) for f in fs
             if not re.search(r"(^|/)(\.git|\.venv|__pycache__|build|dist|[^/]*\.egg-info|\.pytest_cache|\.hypothesis)(/|$)", os.path.relpath(d, ROOT))]
  for f in files:
    os.makedirs(os.path.dirname(os.path.join(dest, f)), exist_ok=True)
    shutil.copy2(os.path.join(ROOT, f), os.path.join(dest, f))
  return str(dest)


@pytest.mark.slow
def test_demo_command_in_a_fresh_virtual_environment(tmp_path):
  demo = readme_commands()[0]
  repo, venv, out = clean_copy(tmp_path / "repo"), tmp_path / "venv", tmp_path / "demo-out"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)   # no system site packages
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "MINIFT_DEVICE")}
  env["PYTHONNOUSERSITE"] = "1"   # nothing from ~/.local either
  # the README's command as a user runs it in the activated environment; 2 short steps and a checkpoint after each
  command = f". {venv}/bin/activate && {demo} --max_steps 2 --save_interval 1 --seq_len 32 --batch_size 1 --eval_batches 2 --quiet --out {out}"
  r = subprocess.run(["bash", "-c", command], cwd=repo, env=env, capture_output=True, text=True, timeout=1500)
  assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
  assert "this was the demo" in r.stdout
  for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "checkpoint/state.json"):
    assert (out / name).is_file(), name
  with open(out / "summary.json") as f: assert json.load(f)["steps"] == 2
  # it ran on what the environment installed: minift from the copy, and none of the test extra
  probe = "import importlib.util as u, minift; print(minift.__file__); print([m for m in ('torch', 'transformers', 'pyopencl') if u.find_spec(m)])"
  r = subprocess.run([str(venv / "bin" / "python"), "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  where, extras = r.stdout.splitlines()
  assert where.startswith(repo + os.sep) and extras == "[]"
