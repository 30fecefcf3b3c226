"""The report's figures: laid out to read on a laptop screen."""

from __future__ import annotations

from PIL import Image

from modecl.core import report


def _series(methods: list[str], stages: int = 3, steps: int = 4) -> list[dict]:
    """Synthetic monitored steps, shaped as the conflict monitor writes them."""
    out = []
    for m, method in enumerate(methods):
        groups = ("text", "image", "router") if m % 2 else ("shared",)
        for k in range(stages * steps):
            cosine = 0.1 * ((k + m) % 5) - 0.2
            out.append(
                {
                    "seed": 0,
                    "method": method,
                    "stage": k // steps + 1,
                    "cosine": cosine,
                    "predicted_image_loss_change": 0.01 * cosine,
                    "measured_image_loss_change": 0.012 * cosine,
                    "sgd_image_loss_change": -0.01 * cosine,
                    "by_group": {g: {"cosine": cosine} for g in groups},
                }
            )
    return out


def test_conflict_figure_fits_a_laptop_screen_and_shows_every_method(tmp_path, monkeypatch):
    methods = [f"method-{i}" for i in range(10)]
    titles: list[str] = []
    save = report._save

    def keep_titles(fig, path):
        titles.extend(ax.get_title() for ax in fig.axes)
        save(fig, path)

    monkeypatch.setattr(report, "_save", keep_titles)
    path = tmp_path / "conflict.png"
    report.plot_conflict(_series(methods), path)
    with Image.open(path) as image:
        assert image.width <= 1600
    assert [t for t in titles if t] == methods
