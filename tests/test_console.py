"""The console lines of a run: each event said once however often the status is read, progress at most every
``every_s`` seconds."""

from __future__ import annotations

from dreambooth.console import ProgressLines, progress_text


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def running(step: int, **extra) -> dict:
    return {"state": "running", "message": "", "step": step, "total_steps": 100, "epoch": 1, "total_epochs": 10,
            "smoothed_loss": 0.123456, "it_per_s": 2.0, "eta_s": (100 - step) / 2.0, **extra}


def test_each_event_once_and_progress_at_most_every_interval():
    clock = Clock()
    lines = ProgressLines("dog", every_s=10, clock=clock)
    said = []

    def read(status: dict, times: int = 3) -> None:
        for _ in range(times):  # the status is read on every poll; nothing is said twice
            said.extend(lines.lines(status))
            clock.now += 1

    read({"state": "starting", "message": "starting the training process", "step": 0})
    read({"state": "generating_class_images", "message": "generated 1 of 9 class images for concept 0"})
    for n in range(2, 10):  # a message per batch: said at most every 10 s
        read({"state": "generating_class_images", "message": f"generated {n} of 9 class images for concept 0"}, 1)
    read(running(1))
    for step in range(2, 40):
        read(running(step), 1)
    read({**running(40), "state": "saving", "message": "saving at step 40"})
    read({**running(40), "message": "saved at step 40", "last_export": "/m/dog_40.safetensors"})
    read({**running(41), "state": "paused", "message": "paused by the user"})
    read({**running(41), "message": "resumed", "last_export": "/m/dog_40.safetensors"})
    read({**running(100), "state": "done", "message": "training complete", "last_export": "/m/dog_100.safetensors"})
    assert lines.ended and lines.lines(running(100)) == []
    assert all(line.startswith("Dreambooth dog: ") for line in said)
    said = [line.removeprefix("Dreambooth dog: ") for line in said]
    assert said[:2] == ["starting - starting the training process",
                        "generating class images - generated 1 of 9 class images for concept 0"]
    assert said.count("exported /m/dog_40.safetensors") == 1 and "exported /m/dog_100.safetensors" in said
    for event in ("saving - saving at step 40", "saved at step 40", "paused - paused by the user", "resumed",
                  "done - training complete"):
        assert said.count(event) == 1, event
    class_lines = [line for line in said if "class images for concept" in line]
    assert 1 < len(class_lines) < 9  # progress messages are rate-limited, not dropped altogether
    progress = [line for line in said if line.startswith("step ")]
    # steps 1..40 over 3 + 38 s of polls: one line every 10 s, the first at once; and one at the end
    assert progress[0] == "step 1/100 (1%), epoch 1/10, loss 0.1235, 2 it/s, ETA 0:50"
    assert 4 <= len(progress) <= 7 and progress[-1].startswith("step 100/100 (100%)")
    assert "ETA" not in progress[-1]


def test_zero_interval_says_only_the_events():
    lines = ProgressLines("dog", every_s=0, clock=Clock())
    said = [line for step in range(1, 5) for line in lines.lines(running(step))]
    said += lines.lines({"state": "failed", "message": "CUDA out of memory", "step": 4, "total_steps": 100})
    assert said == ["Dreambooth dog: failed - CUDA out of memory",
                    "Dreambooth dog: step 4/100 (4%)"]


def test_progress_text_without_totals():
    assert progress_text({"step": 5}) == "step 5"
