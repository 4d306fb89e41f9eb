"""Training on two processes (torchrun, gloo on the CPU, accelerate's collectives) on the tiny SD model with the
user's masks: the run finishes and writes its files once, its weights equal one process computing both ranks'
draws, and a checkpoint of two processes resumes exactly on two and is refused on one."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attencraft_core.api import ConceptSet, TrainOptions, Trainer, load_components, load_image, parse_concepts
from attencraft_core.distributed import Processes
from attencraft_core.images import load_mask

ROOT = Path(__file__).resolve().parents[2]
MASKS = [ROOT / "examples" / "two_squares_64_mask_red.png", ROOT / "examples" / "two_squares_64_mask_blue.png"]
IMAGE = ROOT / "examples" / "two_squares_64.png"
SETTINGS = {"steps": 4, "rank": 2, "prior_weight": 0.0, "checkpoint_every": 2}


def train_args(model, out, *extra):
    return ["train", "--model", str(model), "--image", str(IMAGE), "--concepts", "red_square,blue_square",
            "--masks", ",".join(map(str, MASKS)), "--out", str(out), "--steps", "4", "--rank", "2",
            "--prior-weight", "0", "--checkpoint-every", "2", *extra]


def torchrun(processes: int, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(processes), "-m", "attencraft_core", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def two_process_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("two") / "run"
    run = torchrun(2, *train_args(tiny_model_dir, out))
    assert run.returncode == 0, run.stderr[-3000:]
    return out, run


def lora_of(path):
    return ConceptSet.load(path).lora


def test_two_processes_write_each_file_once_and_report_once(two_process_run):
    out, run = two_process_run
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["attencraft.safetensors", "attencraft_c0.safetensors", "attencraft_c1.safetensors",
                            "attencraft_files.json", "attencraft_lora_kohya.safetensors", "attencraft_loss.png",
                            "attencraft_mask_0_red_square.png", "attencraft_mask_1_blue_square.png",
                            "attencraft_train.json"]), names  # no lock, no checkpoint, no temporary left
    both = run.stdout + run.stderr
    assert both.count("final loss") == 1 and both.count("2 processes: each step averages 2 draws") == 1, both
    assert both.count("loading tiny_model0:   0%") == 1 and "Loading weights" not in both, both  # one set of bars


def test_two_processes_equal_one_process_computing_both_ranks_draws(two_process_run, tiny_model_dir, tmp_path):
    out, _ = two_process_run
    comps = load_components(tiny_model_dir)
    trainer = Trainer(comps, load_image(IMAGE)[0], parse_concepts("red_square,blue_square"), tmp_path,
                      TrainOptions(**SETTINGS), user_masks=[load_mask(m) for m in MASKS], log=lambda line: None,
                      processes=Processes.simulated(2))
    one = trainer.run().concept_set
    two = ConceptSet.load(out / "attencraft.safetensors")
    for key, value in one.lora.items():  # gloo sums two gradients, one process adds them up: rounding only
        torch.testing.assert_close(two.lora[key], value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(two.embeddings, one.embeddings, rtol=1e-5, atol=1e-6)
    plain = Trainer(load_components(tiny_model_dir), load_image(IMAGE)[0], parse_concepts("red_square,blue_square"),
                    tmp_path / "plain", TrainOptions(**SETTINGS), user_masks=[load_mask(m) for m in MASKS],
                    log=lambda line: None).run().concept_set
    assert any(not torch.allclose(plain.lora[k], one.lora[k]) for k in one.lora)  # the second rank's draws count


def test_a_two_process_checkpoint_resumes_exactly_on_two_and_is_refused_on_one(two_process_run, tiny_model_dir,
                                                                               tmp_path):
    straight, _ = two_process_run
    out = tmp_path / "run"
    first = torchrun(2, *train_args(tiny_model_dir, out, "--steps", "2", "--keep-checkpoint"))
    assert first.returncode == 0, first.stderr[-3000:]
    one = torchrun(1, *train_args(tiny_model_dir, out, "--resume"))
    assert one.returncode != 0 and "error: " in one.stderr, one.stderr
    assert "written by a run on 2 process(es) and this run has 1: resume it with 2 processes" in one.stderr, one.stderr
    resumed = torchrun(2, *train_args(tiny_model_dir, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = lora_of(straight / "attencraft.safetensors"), lora_of(out / "attencraft.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def process_with(environ: dict[str, str]) -> int | None:
    """The pid of a process whose environment holds every item of `environ` (Linux /proc)."""
    wanted = {f"{k}={v}".encode() for k, v in environ.items()}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if wanted <= set((entry / "environ").read_bytes().split(b"\0")):
                    return int(entry.name)
            except OSError:
                continue
    return None


def test_killing_one_process_stops_the_run_with_the_last_checkpoint_intact(tiny_model_dir, tmp_path):
    import signal
    import time
    import uuid

    from attencraft_core.checkpoint import load_checkpoint

    out, mark = tmp_path / "run", uuid.uuid4().hex
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ATTENCRAFT_TEST_MARK": mark}
    args = train_args(tiny_model_dir, out, "--steps", "100000", "--checkpoint-every", "1")
    run = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "-m", "attencraft_core", *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.safetensors").is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        victim = process_with({"ATTENCRAFT_TEST_MARK": mark, "RANK": "1"})
        assert victim is not None and (out / "checkpoint.safetensors").is_file()
        os.kill(victim, signal.SIGKILL)
        _, err = run.communicate(timeout=120)  # the launcher stops the other process too
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode != 0, err[-2000:]
    assert process_with({"ATTENCRAFT_TEST_MARK": mark}) is None  # no process of the run is left
    tensors, info = load_checkpoint(out / "checkpoint.safetensors")
    assert info["step"] >= 1 and info["processes"] == 2 and "generator.1" in tensors
