"""Hostile and nonsense input: each case ends in one clear error (exit status 2, the setting named), never a
traceback and never a silently wrong result. A table: command-line arguments, expected message."""

import pytest

from attencraft_core.cli import main

TRAIN = [
    (["--lr", "nan"], "lr must be a finite number"),
    (["--lr=-1e-4"], "lr must be > 0"),
    (["--embedding-lr", "inf"], "embedding_lr must be a finite number"),
    (["--weight-decay", "-0.1"], "weight_decay must be >= 0"),
    (["--attention-weight", "-1"], "attention_weight must be >= 0"),
    (["--prior-weight", "nan"], "prior_weight must be a finite number"),
    (["--alpha", "0"], "alpha must be > 0"),
    (["--checkpoint-every", "0"], "checkpoint_every must be >= 1"),
    (["--class-steps", "0"], "class_steps must be >= 1"),
    (["--steps", "0"], "steps must be >= 1"),
    (["--rank", "100000"], "rank must be >= 1 and <= 1024"),
    (["--rank", "0"], "rank must be >= 1 and <= 1024"),
    (["--seed", str(2 ** 64)], "seed must be >= 0"),
    (["--seed", "-1"], "seed must be >= 0"),
    (["--mask-seed", str(2 ** 63)], "Mask setting seed must be >= 0"),
    (["--resolution", "100"], "resolution must be a multiple of 8"),
    (["--resolution", "-64"], "resolution must be >= 8"),
    (["--ssim-min", "2"], "ssim_min must be >= -1 and <= 1"),
    (["--threshold", "nan"], "threshold must be a finite number"),
    (["--phase1-lr", "0", "--two-phase"], "phase1_lr must be > 0"),
]

GENERATE = [
    (["--steps", "0"], "Sampling steps must be >= 1"),
    (["--count", "0"], "Image count must be >= 1"),
    (["--cfg", "nan"], "Guidance scale (cfg) must be a finite number"),
    (["--cfg", "-1"], "Guidance scale (cfg) must be >= 0"),
    (["--strength", "nan"], "LoRA strength must be a finite number"),
    (["--seed", str(2 ** 63)], "Seed must be >= 0"),
    (["--seed", str(2 ** 63 - 1), "--count", "2"], "Last seed (seed + count - 1) must be >= 0"),
    (["--resolution", "60"], "Resolution must be a multiple of 8"),
]

DEMO = [
    (["--steps", "0"], "Training steps must be >= 1"),
    (["--images", "0"], "Images per prompt must be >= 1"),
    (["--images", "-1"], "Images per prompt must be >= 1"),
    (["--seed", "-5"], "Seed must be >= 0"),
]


def check_refused(argv, expected, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in err and err.startswith("error: ") and "Traceback" not in err, err


@pytest.mark.parametrize("extra,expected", TRAIN, ids=[" ".join(a) for a, _ in TRAIN])
def test_train_refuses_nonsense_numbers(extra, expected, tiny_model_dir, scene_png, tmp_path, capsys):
    out = tmp_path / "run"
    check_refused(["train", "--model", str(tiny_model_dir), "--image", str(scene_png), "--concepts", "cat,dog",
                   "--out", str(out), *extra], expected, capsys)
    assert not out.exists() or not any(out.iterdir()), "a refused run wrote files"


@pytest.mark.parametrize("extra,expected", GENERATE, ids=[" ".join(a) for a, _ in GENERATE])
def test_generate_refuses_nonsense_numbers(extra, expected, tmp_path, capsys):
    # refused before the model or the concept set is read: neither needs to exist
    check_refused(["generate", "--model", str(tmp_path / "no_model"), "--concepts", str(tmp_path / "none.safetensors"),
                   "--prompt", "a photo of <c0>", "--out", str(tmp_path / "x.png"), *extra], expected, capsys)
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("extra,expected", DEMO, ids=[" ".join(a) for a, _ in DEMO])
def test_demo_refuses_nonsense_numbers(extra, expected, tmp_path, capsys):
    check_refused(["demo", "--out", str(tmp_path / "demo"), *extra], expected, capsys)
    assert not (tmp_path / "demo").exists()
