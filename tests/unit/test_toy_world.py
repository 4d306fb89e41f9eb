"""The toy world: exact rendering and masks, the held-out split, captions, and the judge's accuracy."""

import random

import numpy as np

from attencraft_lab.toy.evaluate import context_object, evaluation_prompts, judge_generations, judge_joint_image
from attencraft_lab.toy.judge import analyse
from attencraft_lab.toy.world import (BACKGROUNDS, COLOURS, HELD_OUT_PAIRS, SHAPES, SceneObject, allowed,
                                       random_scene, render, shape_mask, training_caption)


def test_square_pixels_are_exact():
    mask = shape_mask("square", 32, 32, 20)
    assert mask.sum() == 21 * 21  # PIL polygons include both edges: 22..42 inclusive
    assert mask[22:43, 22:43].all() and not mask[:22].any() and not mask[43:].any()


def test_ring_has_a_hole_and_every_shape_has_pixels():
    ring = shape_mask("ring", 32, 32, 24)
    assert not ring[32, 32] and ring[32, 22]
    for shape in SHAPES:
        assert 60 < shape_mask(shape, 32, 32, 20).sum() < 21 * 21 + 1


def test_masks_are_exactly_the_object_pixels():
    rng = random.Random(3)
    for _ in range(30):
        scene = random_scene(rng)
        image = np.asarray(scene.image)
        background = np.all(image == BACKGROUNDS[scene.background], axis=-1)
        assert np.array_equal(~background, scene.masks.any(0))
        assert scene.masks.sum(0).max() == 1  # objects never overlap
        for obj, mask in zip(scene.objects, scene.masks):
            if obj.pattern == "solid":
                assert np.all(image[mask] == COLOURS[obj.colour])


def test_pretraining_never_shows_held_out_appearances():
    rng = random.Random(4)
    for _ in range(200):
        for obj in random_scene(rng).objects:
            assert obj.pattern != "dotted" and (obj.shape, obj.colour) not in HELD_OUT_PAIRS
    novel = [o for _ in range(50) for o in random_scene(rng, held_out=True).objects]
    assert all(not allowed(o.shape, o.colour, o.pattern, held_out=False) for o in novel)


def test_captions():
    scene = render("grey", [SceneObject("star", "red", "dotted", 20, 20, 18),
                            SceneObject("heart", "blue", "solid", 44, 44, 18)])
    assert scene.caption == "a photo of a red dotted star and a blue heart"
    rng = random.Random(0)
    dropped = {training_caption(scene, rng) for _ in range(200)}
    assert scene.caption in dropped and "a photo of a red dotted shape and a blue heart" in dropped
    assert "a photo of red dotted star and blue heart" in dropped  # the form of AttenCraft's prompts


def test_judge_accuracy_on_rendered_scenes():
    rng = random.Random(11)
    hits = {"shape": 0, "colour": 0, "pattern": 0}
    total = found = 0
    for i in range(120):
        scene = random_scene(rng, held_out=i % 3 == 0)
        detections = analyse(scene.image)
        found += len(detections) == len(scene.objects)
        for obj, mask in zip(scene.objects, scene.masks):
            best = max(detections, key=lambda d: (d.mask & mask).sum())
            total += 1
            for key in hits:
                hits[key] += getattr(best, key) == getattr(obj, key)
    assert found == 120
    for key, count in hits.items():
        assert count / total >= 0.95, f"{key} accuracy {count / total:.3f}"


def test_judge_on_an_empty_image():
    assert analyse(np.full((64, 64, 3), 18, np.uint8)) == []


def test_context_object_is_a_known_appearance_the_judge_tells_apart_from_the_concepts():
    rng = random.Random(12)
    for _ in range(40):
        scene = random_scene(rng, count=rng.choice([2, 3]), held_out=True)
        ctx = context_object(scene.objects)
        assert allowed(ctx.shape, ctx.colour, ctx.pattern, held_out=False)
        assert all(o.shape != ctx.shape and o.colour != ctx.colour for o in scene.objects)
    crowded = [SceneObject(shape, colour, "solid", 32, 32, 10)  # rules out the first five candidates
               for shape, colour in (("circle", "yellow"), ("star", "blue"), ("square", "pink"))]
    ctx = context_object(crowded)
    assert allowed(ctx.shape, ctx.colour, ctx.pattern, held_out=False)
    target = SceneObject("star", "cyan", "dotted", 18, 20, 18)
    ctx = context_object([target])
    placed = SceneObject(ctx.shape, ctx.colour, ctx.pattern, 44, 44, 18)
    assert judge_joint_image(render("grey", [target, placed]).image, [target, ctx])
    assert not judge_joint_image(render("grey", [target]).image, [target, ctx])


def test_judged_generations_count_fidelity_leakage_joint_and_context_per_image():
    a, b = SceneObject("star", "cyan", "dotted", 18, 20, 18), SceneObject("heart", "green", "solid", 44, 42, 18)
    ctx = context_object([a, b])
    placed = SceneObject(ctx.shape, ctx.colour, ctx.pattern, 44, 16, 16)

    def image(*objects):
        return render("grey", list(objects)).image if objects else np.full((64, 64, 3), 18, np.uint8)

    prompts = evaluation_prompts(["<c0>", "<c1>"], ctx)
    assert prompts == ["a photo of <c0>", "a photo of <c1>", "a photo of <c0> and <c1>",
                       f"a photo of <c0> and a {ctx.words()}", f"a photo of <c1> and a {ctx.words()}"]
    generated = dict(zip(prompts, [
        [image(a), image(a, b), image(b), image()],  # shows a: 2 of 4; shows b's shape or colour: 2 of 4
        [image(b), image(b)],
        [image(a, b), image(a)],
        [image(a, placed), image(placed)],
        [image(b, placed)],
    ]))
    judged = judge_generations([a, b], ["<c0>", "<c1>"], generated, ctx)
    assert judged == {"fidelity": [0.5, 1.0], "leakage": [0.5, 0.0], "joint": 0.5, "context": [0.5, 1.0]}
    without_context = judge_generations([a, b], ["<c0>", "<c1>"], {p: generated[p] for p in prompts[:3]})
    assert without_context["context"] == [] and without_context["fidelity"] == [0.5, 1.0]
