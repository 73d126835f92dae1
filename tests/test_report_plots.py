"""The report's figures stay readable: the tick labels of distances close together do not print on top of
each other (the main job's 12 and 16 segments, on a logarithmic axis, did: "(782–808)(1038–1065)")."""

from __future__ import annotations

import matplotlib
import matplotlib.figure
import pytest

from hf_memlm.evaluation import plot_results

matplotlib.use("Agg")
CONDITIONS = ["memory", "memory_disabled", "base_model"]


def retrieval_results(distances: list[int], segment_length: int = 64) -> dict:
    buckets = []
    for distance in distances:
        low = distance * segment_length + 14
        buckets.append(
            {
                "distance_segments": distance,
                "tokens_min": low,
                "tokens_max": low + 26,
                "answers": 100,
                "metrics": {c: {"exact_match": 0.5, "token_accuracy": 0.6} for c in CONDITIONS},
            }
        )
    return {
        "kind": "retrieval",
        "task": "passkey",
        "segment_length": segment_length,
        "num_answers": 100 * len(distances),
        "conditions": CONDITIONS,
        "condition_labels": {c: c.replace("_", " ") for c in CONDITIONS},
        "chance": {"exact_match": 1e-5, "token_accuracy": 0.004},
        "by_distance_segments": buckets,
        "model": {"memory_type": "kv"},
    }


def saved_tick_labels(results: dict, path, monkeypatch) -> list[list]:
    """Per axis, the window boxes of the x tick labels of the figure `plot_results` saves, as it saved it."""
    saved = []
    original = matplotlib.figure.Figure.savefig

    def keep(figure, *args, **kwargs):
        done = original(figure, *args, **kwargs)
        renderer = figure.canvas.get_renderer()
        saved.append(
            [
                [label.get_window_extent(renderer) for label in axis.get_xticklabels() if label.get_text()]
                for axis in figure.axes
            ]
        )
        return done

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    plot_results(results, path)
    assert len(saved) == 1 and path.stat().st_size > 0
    return saved[0]


@pytest.mark.parametrize(
    "distances",
    [[1, 4, 8, 12, 16], [1, 2, 3, 4, 5, 6, 7, 8, 12, 16], [255, 511, 1023, 4095, 8191, 16383], [2, 3]],
)
def test_tick_labels_of_nearby_distances_do_not_overlap(tmp_path, monkeypatch, distances):
    for boxes in saved_tick_labels(retrieval_results(distances), tmp_path / "passkey.png", monkeypatch):
        assert len(boxes) == len(distances)  # every distance keeps its label
        for number, box in enumerate(boxes):
            for other in boxes[number + 1 :]:
                assert not box.overlaps(other), f"tick labels overlap at {distances}: {box} and {other}"
