"""The DiT toy's trainer (issue #22): seeded, resumable, and its export loads as a FluxPipeline offline."""

import torch
from diffusers import FluxPipeline

from attencraft_lab.toy.train import object_word_positions
from attencraft_lab.toy.train_dit import t5_word_groups, train


def test_t5_word_groups_follow_the_caption_words_without_a_background_token():
    caption = "a photo of a red star and a blue striped ring"
    assert object_word_positions(caption) == [[5, 6], [9, 10, 11]]  # CLIP: after the start token
    assert t5_word_groups(caption) == [None, [4, 5], [8, 9, 10]]


def test_dit_training_resumes_exactly_and_exports_a_flux_pipeline(tmp_path):
    straight = train(tmp_path / "a", minutes=60, batch=2, seed=0, export=None, max_steps=2)
    train(tmp_path / "b", minutes=60, batch=2, seed=0, export=None, max_steps=1)
    resumed = train(tmp_path / "b", minutes=60, batch=2, seed=0, export=tmp_path / "export", max_steps=2)
    assert resumed["step"] == 2 and resumed["losses"] == straight["losses"]
    assert straight["attention_losses"] and all(x >= 0 for x in straight["attention_losses"])
    pipe = FluxPipeline.from_pretrained(tmp_path / "export", local_files_only=True, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of a red star", height=64, width=64, num_inference_steps=2, guidance_scale=1.0,
                 max_sequence_length=32, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 64, 64, 3)
