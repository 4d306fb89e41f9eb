"""Concept sampling policies, the JSD attention loss, SSIM and the masked loss."""

import math
from collections import Counter

import pytest
import torch

from attencraft_core import AttenCraftError
from attencraft_core.losses import attention_loss, js_divergence, masked_diffusion_loss, ssim
from attencraft_core.sampling import ConceptSampler

DRAWS = 6000


def frequencies(sampler, key=lambda s: tuple(sorted(s))):
    counts = Counter(key(sampler.sample()) for _ in range(DRAWS))
    return {k: v / DRAWS for k, v in counts.items()}


def within(p_hat, p):
    return abs(p_hat - p) < 4 * math.sqrt(p * (1 - p) / DRAWS) + 1e-9  # 4 sigma


def test_uniform_policy_is_a_third_each_for_two_concepts():
    freq = frequencies(ConceptSampler(2, "uniform", seed=1))
    for subset in [(0,), (1,), (0, 1)]:
        assert within(freq[subset], 1 / 3), (subset, freq)


def test_adaptive_policy_matches_inverse_scores_and_fixed_all_share():
    sampler = ConceptSampler(3, "adaptive", seed=2)
    sampler.set_scores(torch.tensor([0.2, 0.4, 0.8]))
    inverse = torch.tensor([5.0, 2.5, 1.25])
    expected = (2 / 3) * inverse / inverse.sum()
    freq = frequencies(sampler)
    for i in range(3):
        assert within(freq[(i,)], float(expected[i]))
    assert within(freq[(0, 1, 2)], 1 / 3)
    assert sampler.ratios()["all"] == pytest.approx(1 / 3, abs=1e-3)


def test_adaptive_weights_follow_the_scores():
    sampler = ConceptSampler(2, "adaptive")
    sampler.set_scores(torch.tensor([0.5, 0.5]))
    assert sampler.single_weights()[0] == pytest.approx(sampler.single_weights()[1])
    sampler.set_scores(torch.tensor([0.2, 0.6]))  # the model attends less to concept 0: show it more
    w = sampler.single_weights()
    assert w[0] > w[1] and w[0] == pytest.approx(3 * w[1])
    sampler.set_scores(torch.tensor([0.6, 0.2]))
    assert sampler.single_weights()[1] > sampler.single_weights()[0]


def test_union_policy_size_then_subset_uniform():
    sampler = ConceptSampler(3, "union", seed=3)
    draws = [sampler.sample() for _ in range(DRAWS)]
    sizes = Counter(len(d) for d in draws)
    for size in (1, 2, 3):
        assert within(sizes[size] / DRAWS, 1 / 3)
    pairs = Counter(tuple(sorted(d)) for d in draws if len(d) == 2)
    total = sum(pairs.values())
    for pair in [(0, 1), (0, 2), (1, 2)]:
        assert abs(pairs[pair] / total - 1 / 3) < 4 * math.sqrt((2 / 9) / total)


def test_all_concepts_prompt_order_is_shuffled_and_seeded():
    a, b = ConceptSampler(2, "uniform", seed=5), ConceptSampler(2, "uniform", seed=5)
    seq_a, seq_b = [a.sample() for _ in range(200)], [b.sample() for _ in range(200)]
    assert seq_a == seq_b
    assert [0, 1] in seq_a and [1, 0] in seq_a


def test_sampler_state_round_trip():
    a = ConceptSampler(3, "adaptive", seed=7)
    a.set_scores(torch.tensor([0.3, 0.5, 0.9]))
    [a.sample() for _ in range(5)]
    b = ConceptSampler(3, "adaptive", seed=0)
    b.load_state(a.state())
    assert [a.sample() for _ in range(50)] == [b.sample() for _ in range(50)]


def test_unknown_policy():
    with pytest.raises(AttenCraftError, match="Unknown sampling policy 'random'"):
        ConceptSampler(2, "random")


def test_jsd_is_zero_for_equal_inputs_and_symmetric():
    p = torch.rand(4, 100).softmax(-1)
    q = torch.rand(4, 100).softmax(-1)
    assert float(js_divergence(p, p)) == pytest.approx(0.0, abs=1e-7)
    assert float(js_divergence(p, q)) == pytest.approx(float(js_divergence(q, p)), rel=1e-6)
    assert float(js_divergence(p, q)) > 0
    disjoint = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert float(js_divergence(*disjoint)) == pytest.approx(math.log(2), rel=1e-5)


def test_attention_loss_is_lower_when_attention_matches_the_mask():
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, :4] = True
    masks[1, 4:] = True
    matching = masks.float().flatten(1).T  # [64, 2]: token k looks at mask k
    cross = torch.cat([matching, torch.zeros(64, 3)], 1)
    swapped = cross[:, [1, 0, 2, 3, 4]]
    good = attention_loss(cross, [0, 1], (8, 8), masks)
    bad = attention_loss(swapped, [0, 1], (8, 8), masks)
    assert float(good) < float(bad)


def test_attention_loss_gradient_reaches_the_attention():
    cross = torch.rand(16, 5, requires_grad=True)
    masks = torch.rand(2, 8, 8) > 0.5
    attention_loss(cross, [0, 3], (4, 4), masks).backward()
    assert cross.grad[:, [0, 3]].abs().sum() > 0 and cross.grad[:, [1, 2, 4]].abs().sum() == 0


def test_ssim_identity_and_difference():
    a = torch.zeros(16, 16)
    a[4:10, 4:10] = 1
    b = torch.zeros(16, 16)
    b[8:14, 8:14] = 1
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-6)
    assert ssim(a, b) < 0.8


def test_masked_loss_ignores_pixels_outside_the_mask():
    pred, target = torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8)
    target[..., 4:, :] = 1.0  # error only in the bottom half
    top = torch.zeros(1, 1, 8, 8)
    top[..., :4, :] = 1
    assert float(masked_diffusion_loss(pred, target, top)) == 0.0
    assert float(masked_diffusion_loss(pred, target, 1 - top)) == pytest.approx(0.5)
    assert float(masked_diffusion_loss(pred, target, top, unmasked_term=True)) == pytest.approx(0.25)
    assert float(masked_diffusion_loss(pred, target, None)) == pytest.approx(0.5)


def test_ssim_matches_scikit_image():
    """The refresh gate uses the reference code's SSIM: scikit-image's structural_similarity, data range 1."""
    from skimage.metrics import structural_similarity

    gen = torch.Generator().manual_seed(0)
    for size in (16, 32, 13):
        a = torch.zeros(size, size, dtype=torch.bool)
        a[2:9, 3:11] = True
        b = torch.roll(a, shifts=(1, 2), dims=(0, 1))
        noisy = torch.rand(size, size, generator=gen) > 0.7
        for x, y in ((a, b), (a, noisy), (a, a), (a.float() * 0.5, b.float())):
            expected = structural_similarity(x.float().numpy(), y.float().numpy(), data_range=1.0)
            assert ssim(x, y) == pytest.approx(expected, abs=1e-5), (size, expected)

