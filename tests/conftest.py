"""Shared fixtures: tiny SD-style models built from configs; no network, no model hub."""

import os
from types import SimpleNamespace

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from attencraft_core.api import Trainer, TrainOptions, parse_concepts  # noqa: E402
from attencraft_lab.tiny_models import build_tiny_components, save_components  # noqa: E402
from helpers import class_image, quadrant_blobs, scene_image, two_object_array  # noqa: E402


@pytest.fixture
def tiny():
    """A fresh random tiny component set (the core may add tokens to it)."""
    return build_tiny_components(seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny component set saved as a diffusers folder."""
    return save_components(build_tiny_components(seed=0), tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture
def scene_png(tmp_path):
    path = tmp_path / "scene.png"
    Image.fromarray(two_object_array()).save(path)
    return path


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)


@pytest.fixture
def planted_attention(monkeypatch):
    """Make the tiny UNet's recorded attention meaningful: the token at prompt position first + 2k (concept k
    in "a photo of <c0> and <c1> ...": first = 4 after CLIP's start token, 3 in T5) attends to quadrant blob k,
    the first token to the background, and self-attention links pixels of the same region. Random tiny models
    have random attention otherwise.

    Call it with N; it returns the blobs at 16x16 (the tiny model's self-attention side for 32x32 latents).
    """
    def plant(n: int, store_cls=None, first: int = 4):
        from attencraft_core.attention import AttentionStore

        AttentionStore = store_cls or AttentionStore  # noqa: N806 (the pack's copy when testing nodes/)
        original = AttentionStore.add

        def add(self, kind, probs, heads):
            queries, keys = probs.shape[1], probs.shape[2]
            side = int(round(queries ** 0.5))
            blobs = quadrant_blobs(side, n).flatten(1)
            background = 1 - blobs.amax(0)
            if kind == "cross":
                planted = torch.full((queries, keys), 0.01)
                planted[:, 0] += background
                for k in range(n):
                    planted[:, first + 2 * k] += blobs[k]
            else:
                regions = torch.cat([background[None], blobs])
                planted = regions.T @ regions + 0.01
            planted = planted / planted.sum(-1, keepdim=True)
            # keep the autograd link to the real probabilities (zero-weighted) so gradients still flow
            planted = planted.to(probs) + 0 * probs
            original(self, kind, planted, heads)

        monkeypatch.setattr(AttentionStore, "add", add)
        return quadrant_blobs(16, n).bool()

    return plant


@pytest.fixture(scope="session")
def trained_pair(tmp_path_factory):
    """One training run shared by the tests that only need a trained concept set: 2 concepts ("cat, dog") with
    the user's masks, LoRA rank 4, alpha 6, 4 steps, on the tiny model. `comps` are the trained components,
    `result` the TrainResult, `out` its folder. Read them; never change them."""
    comps = build_tiny_components(seed=0)
    out = tmp_path_factory.mktemp("trained_pair")
    opts = TrainOptions(steps=4, checkpoint_every=2, refresh_every=0, rank=4, alpha=6.0)
    trainer = Trainer(comps, scene_image(), parse_concepts("cat, dog"), out, opts,
                      user_masks=list(quadrant_blobs(64, 2)), class_images=[class_image()], log=lambda line: None)
    return SimpleNamespace(comps=comps, result=trainer.run("pair"), out=out, token_ids=trainer.token_ids)
