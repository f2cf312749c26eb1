"""Pictures people read: labels of points that sit close together do not overlap."""

from __future__ import annotations

import itertools

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from mobilenet.plots import label_points


def test_labels_of_close_points_do_not_overlap():
    fig, ax = plt.subplots(figsize=(6, 4))
    points = [(88.0, 38.5, "MobileNetV2 1.0"), (98.8, 38.8, "MobileNet 1.0 @24px"), (99.8, 38.75, "MobileNet 0.75")]
    ax.set_xscale("log")
    ax.set_xlim(50, 300)
    ax.set_ylim(36, 42)
    for x, y, _ in points:
        ax.plot(x, y, "o")
    label_points(ax, points)
    renderer = fig.canvas.get_renderer()
    boxes = [text.get_window_extent(renderer) for text in ax.texts]
    assert len(boxes) == len(points)
    assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))
    plt.close(fig)
