"""Mask initialization arithmetic on constructed attention maps with known blobs."""

import pytest
import torch

from attencraft_core import AttenCraftError
from attencraft_core import mask_math

H = W = 16


def blob(y0, y1, x0, x1):
    m = torch.zeros(H, W)
    m[y0:y1, x0:x1] = 1
    return m


BLOBS = [blob(1, 6, 1, 6), blob(9, 15, 9, 15), blob(1, 6, 9, 15), blob(9, 15, 1, 6)]


def constructed_attention(n, token_order=None, noise=0.05, seed=0):
    """Cross-attention [H*W, tokens] where token 1 + k attends to blob order[k]; self-attention of blobs."""
    g = torch.Generator().manual_seed(seed)
    order = token_order or list(range(n))
    blobs = BLOBS[:n]
    background = 1 - torch.stack(blobs).amax(0)
    cross = torch.rand(H * W, 8, generator=g) * noise
    cross[:, 0] += background.flatten()
    for k, b in enumerate(order):
        cross[:, 1 + k] += blobs[b].flatten()
    cross = cross / cross.sum(1, keepdim=True)
    regions = torch.stack([background] + blobs).flatten(1)  # [n+1, HW]
    same = regions.T @ regions  # 1 where two pixels are in the same region
    self_attn = same / same.sum(1, keepdim=True)
    return cross, self_attn, blobs, background


def run_rule(cross, self_attn, n, tau=0.1, cross_hw=(H, W)):
    attention = mask_math.token_maps(cross, list(range(n + 1)), cross_hw, (H, W))
    maps = mask_math.propagate(mask_math.affinity(self_attn, 4), attention)
    labels = mask_math.margin_labels(maps, tau)
    assignment = mask_math.assign_regions(labels, attention[1:], [f"c{i}" for i in range(n)])
    masks = torch.stack([labels == r for r in assignment.region_of_concept])
    return masks, labels, attention


@pytest.mark.parametrize("n", [2, 3, 4])
def test_blobs_background_and_assignment_are_recovered(n):
    cross, self_attn, blobs, background = constructed_attention(n)
    masks, labels, attention = run_rule(cross, self_attn, n)
    for k in range(n):
        assert torch.equal(masks[k], blobs[k].bool()), f"concept {k} mask differs from its blob"
    assert torch.equal(labels == 0, background.bool())
    scores = mask_math.attention_scores(attention[1:], masks)
    assert scores.shape == (n,) and bool((scores > 0.5).all())


def test_assignment_follows_the_tokens_not_the_region_order():
    # token 1 attends to blob 2, token 2 to blob 0, token 3 to blob 1
    order = [2, 0, 1]
    cross, self_attn, blobs, _ = constructed_attention(3, token_order=order)
    masks, _, _ = run_rule(cross, self_attn, 3)
    for k, b in enumerate(order):
        assert torch.equal(masks[k], blobs[b].bool())


def test_low_resolution_cross_attention_is_upsampled():
    cross, self_attn, blobs, _ = constructed_attention(2)
    low = cross.T.reshape(8, 1, H, W)
    low = torch.nn.functional.avg_pool2d(low, 2).reshape(8, -1).T  # 8x8 cross-attention
    masks, _, _ = run_rule(low, self_attn, 2, cross_hw=(8, 8))
    for k in range(2):
        iou = (masks[k] & blobs[k].bool()).sum() / (masks[k] | blobs[k].bool()).sum()
        assert iou > 0.8


def test_two_tokens_on_one_object_is_an_ambiguity_error():
    cross, self_attn, _, _ = constructed_attention(2)
    cross[:, 2] = cross[:, 1]  # both tokens look at the first blob only
    with pytest.raises(AttenCraftError, match="c1|Ambiguous") as err:
        run_rule(cross, self_attn, 2)
    assert "seed" in str(err.value) and "threshold" in str(err.value)


def test_ambiguous_region_ownership_is_reported():
    labels = torch.zeros(H, W, dtype=torch.long)
    labels[:4] = 1
    labels[-4:] = 2
    token_attention = torch.zeros(2, H, W)
    token_attention[0] = 1.0  # token 0 dominates both regions
    with pytest.raises(AttenCraftError, match="Ambiguous masks: a attends most to the regions of a and b"):
        mask_math.assign_regions(labels, token_attention, ["a", "b"])


def test_margin_rule_leaves_close_pixels_unassigned():
    maps = torch.tensor([[[0.5, 0.9]], [[0.55, 0.1]]])  # [2, 1, 2]
    assert mask_math.margin_labels(maps, 0.1).tolist() == [[-1, 0]]


def test_minmax_and_affinity_power():
    x = torch.tensor([[2.0, 4.0], [6.0, 10.0]])
    assert torch.allclose(mask_math.minmax(x), torch.tensor([[0.0, 0.25], [0.5, 1.0]]))
    assert torch.equal(mask_math.minmax(torch.ones(3)), torch.zeros(3))
    a = torch.rand(5, 5)
    expected = mask_math.minmax(torch.linalg.matrix_power(mask_math.minmax(a), 4))
    assert torch.allclose(mask_math.affinity(a, 4), expected)
