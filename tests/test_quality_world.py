"""The synthetic world and its analyser (bench/quality): renders are deterministic, the analyser reads held-out
renders back (>= 95% per attribute, and through the shipped base model's autoencoder too), and the measures
respond to what they measure."""

from __future__ import annotations

import numpy as np
import pytest

from bench.quality import measures, world
from bench.quality.analyse import analyse

ATTRIBUTES = ("background", "colour", "shape", "size", "position")


def test_renders_and_captions_are_seeded():
    a_images, a_captions, _ = world.sample_world(20, seed=5)
    b_images, b_captions, _ = world.sample_world(20, seed=5)
    c_images, _, _ = world.sample_world(20, seed=6)
    assert np.array_equal(a_images, b_images) and a_captions == b_captions
    assert not np.array_equal(a_images, c_images)
    assert a_images.shape == (20, 64, 64, 3) and a_images.dtype == np.uint8


def test_captions_use_only_the_vocabulary_and_never_name_the_subject():
    _, captions, scenes = world.sample_world(300, seed=1)
    vocabulary = {"a", "on", "background", "in", "the", *world.SHAPES, *world.COLOURS, *world.SIZES,
                  *(w for p in world.POSITIONS for w in p.split())}
    assert {w for c in captions for w in c.split()} <= vocabulary
    assert all(s.shape in c for s, c in zip(scenes, captions, strict=True))
    assert world.SUBJECT_WORD not in vocabulary
    assert len(set(captions)) > 100  # attributes are mentioned independently
    two_coloured = [c for s, c in zip(scenes, captions, strict=True) if s.colour2]
    assert 0.15 < len(two_coloured) / len(scenes) < 0.35  # a quarter of the shapes have two colours...
    for text in two_coloured:  # ...and no caption names their colours (the words before the shape)
        before_shape = text.split(" on a ")[0].split(" in the ")[0].split()[:-1]
        assert not set(before_shape) & set(world.COLOURS), text


def _same(reading, scene, attribute: str) -> bool:
    if attribute == "colour":  # a two-coloured shape: its two colours, in either order
        return {reading.colour, reading.colour2} == {scene.colour, scene.colour2} - {""} | (
            set() if scene.colour2 else {""})
    return getattr(reading, attribute) == getattr(scene, attribute)


def test_the_analyser_reads_held_out_renders():
    _, _, scenes = world.sample_world(400, seed=2024)  # not a seed the base model was trained on
    readings = [analyse(world.render(s)) for s in scenes]
    for attribute in ATTRIBUTES:
        accuracy = np.mean([_same(r, s, attribute) for r, s in zip(readings, scenes, strict=True)])
        assert accuracy >= 0.95, (attribute, accuracy)
    assert [r.subject for r in readings] == [{s.colour, s.colour2} == {"magenta", "cyan"} for s in scenes]


def test_the_analyser_recognises_the_subject_in_any_pose_place_and_background():
    rng = np.random.default_rng(7)
    views = [world.subject_scene(rng, size=size) for size in ("large", "small") for _ in range(40)]
    readings = [analyse(world.render(v)) for v in views]
    assert np.mean([r.subject for r in readings]) >= 0.95
    assert np.mean([r.background == v.background and r.position == v.position
                    for r, v in zip(readings, views, strict=True)]) >= 0.95
    assert all(analyse(i).subject for i in world.subject_images())


def test_an_empty_image_has_no_object():
    blank = np.full((64, 64, 3), world.COLOURS["green"], dtype=np.uint8)
    reading = analyse(blank)
    assert reading.background == "green" and not reading.found and not reading.subject


def test_measures_respond_to_what_they_measure():
    rng = np.random.default_rng(0)
    subject = [world.render(world.subject_scene(rng)) for _ in range(8)]
    stars = [world.render(world.random_scene(rng, shape="star")) for _ in range(8)]
    copies = [subject[0]] * 8

    def samples(subject_images, class_images):
        return {**{p.text: subject_images for p in measures.SUBJECT_PROMPTS}, measures.CLASS_PROMPT.text:
                class_images}

    learned = measures.measure(samples(subject, stars))
    drifted = measures.measure(samples(subject, subject))
    untrained = measures.measure(samples(stars, stars))
    overfit = measures.measure(samples(copies, stars))
    assert learned["subject_fidelity"] == 1.0 and untrained["subject_fidelity"] == 0.0
    assert learned["prior_drift"] == 0.0 and drifted["prior_drift"] == 1.0
    assert overfit["diversity"] == 0.0 < learned["diversity"]


def test_prompt_fidelity_counts_the_requests_that_hold():
    prompt = measures.Prompt("a zwx star on a green background in the top left", background="green",
                             position="top left")
    green = world.render(world.Scene("star", "magenta", "green", "top left", "large", colour2="cyan"))
    red = world.render(world.Scene("star", "magenta", "red", "center", "large", colour2="cyan"))
    assert measures.prompt_hits(prompt, [analyse(green), analyse(red)]) == [True, True, False, False]


@pytest.mark.parametrize("bad", [np.zeros((32, 32, 3), np.uint8), np.zeros((64, 64), np.uint8)])
def test_the_analyser_refuses_other_image_sizes(bad):
    with pytest.raises(ValueError, match="64x64 RGB"):
        analyse(bad)
