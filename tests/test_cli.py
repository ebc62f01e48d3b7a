"""train.py / eval.py end to end in subprocesses (tiny config, temp workdir), and a two-process
jax.distributed run on localhost that must match the one-process run."""

import json
import os
import socket
import subprocess
import sys

import chex
import conftest
import jax
import pytest
import train_helpers

REPO = train_helpers.REPO
TINY = os.path.join(REPO, "configs", "tiny.py")
pytestmark = pytest.mark.slow


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  env["XLA_FLAGS"] = conftest.TEST_XLA_FLAGS  # one CPU device per process
  return env


def _run(args, timeout=300):
  proc = subprocess.run(
    [sys.executable, *args], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout
  )
  assert proc.returncode == 0, f"{args}\n{proc.stderr[-5000:]}"
  return proc


@pytest.fixture(scope="session")
def one_process(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("one_process"))
  proc = _run(["train.py", f"--config={TINY}", f"--workdir={workdir}"])
  with open(os.path.join(workdir, "train_summary.json")) as f:
    return workdir, json.load(f), proc


def test_train_then_eval_end_to_end(one_process):
  workdir, summary, train_proc = one_process
  log = train_proc.stderr
  assert summary["step"] == 8 and summary["num_params"] > 0
  assert "token_acc" in log and "seq_acc" in log  # accuracies are printed as training goes
  assert "orbax" not in log and "checkpoint_manager" not in log  # library INFO is quiet
  assert os.path.isfile(os.path.join(workdir, "train_config.json"))
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
  lines = train_proc.stdout.strip().splitlines()
  assert len(lines) == 3 and lines[0].startswith("trained: recurrence N=5 R=2")
  assert f"{summary['test_sequence_accuracy']:.4f}" in lines[1]
  assert lines[2] == f"summary: {os.path.join(workdir, 'train_summary.json')}"
  # No --config: the run's own; the test split at the selected step is the summary's.
  proc = _run(
    [
      "eval.py",
      f"--workdir={workdir}",
      "--split=test",
      "--plot_attention",
      "--num_attention_examples=2",
      f"--step={summary['selected_step']}",
    ]
  )
  path = os.path.join(workdir, f"eval_test_L48_step{summary['selected_step']}.json")
  with open(path) as f:
    result = json.load(f)
  assert result["loss"] == pytest.approx(summary["test_loss"], rel=1e-6)
  assert result["sequence_accuracy"] == summary["test_sequence_accuracy"]
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 3 and lines[2] == f"eval file: {path}"
  assert "ea (rational) attention, 1 layers x 16 wide" in lines[0]
  assert f"sequence {result['sequence_accuracy']:.4f}" in lines[1]
  assert len(result["per_position_accuracy"]) == result["seq_len"]
  assert [os.path.basename(p) for p in result["attention_plots"]] == [
    "example_0.png",
    "example_1.png",
  ]
  for p in result["attention_plots"]:
    with open(p, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # The training command's own config and flags are accepted by eval.py.
  _run(["eval.py", f"--config={TINY}", f"--workdir={workdir}", "--config.train.num_steps=99"])
  with open(os.path.join(workdir, "eval_history.jsonl")) as f:
    last = [json.loads(line) for line in f][-1]
  with open(os.path.join(workdir, "eval_validation_L48.json")) as f:
    assert json.load(f)["loss"] == pytest.approx(last["loss"], rel=1e-5)


@pytest.mark.parametrize(
  "args, message",
  [
    (
      ["train.py", f"--config={TINY}", "--config.train.learning_rate=-1"],
      "error: config.train.learning_rate=-1.0: must be > 0",
    ),
    (
      ["eval.py", f"--config={TINY}", "--config.model.attention=dpa"],
      "error: the config differs from the run in",
    ),
  ],
)
def test_project_errors_are_one_line_and_exit_nonzero(one_process, tmp_path, args, message):
  workdir = one_process[0] if args[0] == "eval.py" else str(tmp_path / "never")
  proc = subprocess.run(
    [sys.executable, *args, f"--workdir={workdir}"],
    cwd=REPO,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and errors[0].startswith(message), proc.stderr[-2000:]
  assert args[0] == "eval.py" or not os.path.exists(workdir)


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(one_process, tmp_path):
  ref_dir, ref, _ = one_process
  workdir = str(tmp_path / "two_process")
  port = _free_port()
  args = [
    sys.executable,
    "train.py",
    f"--config={TINY}",
    f"--workdir={workdir}",
    f"--coordinator_address=localhost:{port}",
    "--num_processes=2",
  ]
  procs = [
    subprocess.Popen(
      args + [f"--process_id={i}"],
      cwd=REPO,
      env=_env(),
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  errs = [p.communicate(timeout=300)[1] for p in procs]
  for p, err in zip(procs, errs):
    assert p.returncode == 0, err[-5000:]
  assert "process 1 of 2 joined" in errs[1] and "2 global devices" in errs[1]
  with open(os.path.join(workdir, "train_summary.json")) as f:
    two = json.load(f)
  assert two["step"] == ref["step"]
  for key in ("loss", "eval_loss", "token_accuracy", "sequence_accuracy", "validation_loss"):
    assert two[key] == pytest.approx(ref[key], rel=1e-5), key
  # Parameters written by two processes restore onto this one device and match.
  config = train_helpers.load_config("tiny")
  a, b = _restore(ref_dir, config), _restore(workdir, config)
  chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-6)


def _restore(workdir, config):
  from ea_jax import train_lib

  _, _, state = train_lib.restore(workdir, config=config)
  return jax.device_get(state.params)
