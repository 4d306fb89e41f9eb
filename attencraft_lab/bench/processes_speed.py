"""Benchmark: training steps per second on 1 and N processes (torchrun / accelerate's collectives), and the draws
per second they add up to. Runs `python -m attencraft_core train` under torchrun on the shipped toy model (or
--model) with the bundled two-square scene and its masks, and reads the training time from each run's log (model
loading and process start-up left out). Prints a table; not a test.

    python -m attencraft_lab.bench.processes_speed                                 # CPU, 1 and 2 processes
    python -m attencraft_lab.bench.processes_speed --processes 1,2,4,8 --device cuda --steps 200   # a GPU node
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ..machine import machine_description
from ..toy.model import toy_model_dir

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def train_seconds(processes: int, model: str, steps: int, device: str, out: Path) -> float:
    """Seconds of the training loop of one run on `processes` processes (from <name>_train.json)."""
    args = ["--model", model, "--image", str(EXAMPLES / "two_squares_64.png"), "--concepts",
            "red_square,blue_square", "--masks", f"{EXAMPLES / 'two_squares_64_mask_red.png'},"
            f"{EXAMPLES / 'two_squares_64_mask_blue.png'}", "--prior-weight", "0", "--steps", str(steps),
            "--checkpoint-every", str(steps), "--device", device, "--out", str(out), "--quiet"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if device == "cpu":  # torchrun's default of one thread per process, made explicit
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                          str(processes), "-m", "attencraft_core", "train", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"{processes} processes failed:\n{run.stderr[-3000:]}")
    return json.loads((out / "attencraft_train.json").read_text())["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(toy_model_dir()))
    ap.add_argument("--processes", default="1,2", help="comma-separated process counts")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (each process takes its own GPU)")
    args = ap.parse_args()
    print(f"machine: {machine_description(torch.device(args.device))}\n")
    print("| processes | steps | training s | steps/s | draws/s (steps/s x processes) |")
    print("| --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as work:
        for n in (int(x) for x in args.processes.split(",")):
            seconds = train_seconds(n, args.model, args.steps, args.device, Path(work) / f"run{n}")
            print(f"| {n} | {args.steps} | {seconds:.1f} | {args.steps / seconds:.2f} | {n * args.steps / seconds:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
