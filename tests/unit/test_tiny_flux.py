"""The tiny Flux-shaped pipeline (groundwork of the Flux family): Flux.1's component types, offline loading."""

import torch
from diffusers import FluxPipeline

from attencraft_lab.tiny_flux import build_t5_word_tokenizer, build_tiny_flux_pipeline


def test_t5_word_tokenizer_keeps_each_world_word_whole_and_ends_with_eos():
    tokenizer = build_t5_word_tokenizer(["red", "ball"])
    ids = tokenizer("a red ball").input_ids
    assert tokenizer.convert_ids_to_tokens(ids)[-3:] == ["▁red", "▁ball", "</s>"]
    padded = tokenizer("red ball", padding="max_length", max_length=8).input_ids
    assert len(padded) == 8 and padded[-1] == tokenizer.pad_token_id == 0


def test_tiny_flux_folder_loads_offline_as_a_flux_pipeline_and_draws(tmp_path):
    build_tiny_flux_pipeline(seed=0).save_pretrained(tmp_path)
    pipe = FluxPipeline.from_pretrained(tmp_path, local_files_only=True)
    assert type(pipe.transformer).__name__ == "FluxTransformer2DModel" and pipe.transformer.config.guidance_embeds
    pipe.set_progress_bar_config(disable=True)

    def draw():
        return pipe("a photo of cat", height=32, width=32, num_inference_steps=2, guidance_scale=3.5,
                    max_sequence_length=32, generator=torch.Generator().manual_seed(1), output_type="np").images

    first, again = draw(), draw()
    assert first.shape == (1, 32, 32, 3) and (first == again).all()
