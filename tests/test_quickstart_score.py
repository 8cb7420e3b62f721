"""The quick start's scorer: both judges on a training run's grid PNG and on fresh samples."""
import json

import pytest
import torch
from test_train import run

from jitfast.experiments import classifier, quickstart
from jitfast.io.images import image_grid, to_uint8
from jitfast.training.shapes import ShapesDataset

SMALL_JUDGES = {"colour": 60, "colour-blind": 60}


@pytest.fixture
def small_judges(monkeypatch):
    monkeypatch.setattr(classifier, "JUDGE_STEPS", SMALL_JUDGES)
    monkeypatch.setattr(classifier, "FASHION_JUDGE_STEPS", 60)
    monkeypatch.setattr(quickstart, "REAL_IMAGES", 40)


def test_grid_tiles_read_back_the_training_grid_row_by_row():
    """Real images laid out as training.grid.sample_grid lays out samples (rows: evenly spaced
    classes) score as the same images do; a grid read with its rows' classes mixed up would not."""
    rows = quickstart.grid_classes(4, 10)
    assert rows.tolist() == [0, 3, 6, 9]
    data = ShapesDataset(16, 400, seed=5)
    images, labels = data.batch(range(400))
    chosen = torch.cat([torch.nonzero(labels == c)[:3, 0] for c in rows])
    grid = image_grid(to_uint8(images[chosen]), columns=3)
    tiles, row = quickstart.grid_tiles(grid, 16, 3)
    assert torch.equal(row, torch.arange(4).repeat_interleave(3))
    assert (tiles - images[chosen]).abs().max() <= 1 / 127.5 + 1e-6  # uint8 rounding only
    judge = classifier.train_classifier(16, steps=80, seed=1)
    right = classifier.judge(judge, tiles, rows[row])[0]
    assert right == classifier.judge(judge, images[chosen], labels[chosen])[0]
    assert right > 0.5  # chance: 0.1
    assert classifier.judge(judge, tiles, rows.flip(0)[row])[0] < right - 0.3
    with pytest.raises(ValueError, match="not 4 columns of 16-px"):
        quickstart.grid_tiles(grid, 16, 4)


def test_judges_are_trained_once_per_setting_and_read_back(tmp_path, monkeypatch, small_judges):
    first = classifier.trained_judges(16, 20, cache=str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "judge-colour-16px-60steps-seed1.pt", "judge-colour-blind-16px-60steps-seed1.pt"]

    def no_training(*args, **kwargs):
        raise AssertionError("a cached judge was trained again")

    monkeypatch.setattr(classifier, "train_classifier", no_training)
    again = classifier.trained_judges(16, 20, cache=str(tmp_path))
    for name, judge in first.items():
        assert again[name].reference() == judge.reference()
        assert all(torch.equal(a, b) for a, b in zip(judge.classifier.state_dict().values(),
                                                      again[name].classifier.state_dict().values()))


def test_a_shapes_run_is_scored_on_its_grid_and_on_fresh_samples(tmp_path, capsys,
                                                                 small_judges):
    run(tmp_path, "r", "--steps", "3", "--dataset", "shapes")
    quickstart.main([str(tmp_path / "r"), "--samples-per-class", "2",
                     "--judges", str(tmp_path / "judges")])
    result = json.loads((tmp_path / "r" / "quickstart.json").read_text())
    assert result["grid_png"].endswith("samples-00000003.png")
    for kind in ("grid", "samples", "real"):
        assert set(result[kind]) == {"colour", "colour-blind"}
    real = result["real"]["colour-blind"]["accuracy"]
    assert real > 0.2  # a real judge, better than chance (0.1) on real images
    assert result["samples_ratio"] == {
        "mean": pytest.approx(result["samples"]["colour-blind"]["accuracy"] / real), "std": 0.0}
    assert "accuracy ratio (samples / real, colour-blind)" in capsys.readouterr().out


def test_a_fashion_run_is_judged_by_three_judges_of_the_test_split(tmp_path, capsys,
                                                                   small_judges):
    """The default data: three judges trained on Fashion-MNIST test-split images, the ratio and
    the distance as mean ± std over them."""
    run(tmp_path, "r", "--steps", "2", "--image-size", "28", "--model", "JiT-T/4")
    quickstart.main([str(tmp_path / "r"), "--samples-per-class", "2",
                     "--judges", str(tmp_path / "judges")])
    result = json.loads((tmp_path / "r" / "quickstart.json").read_text())
    assert result["merit"] == ["judge 0", "judge 1", "judge 2"]
    reals = [result["real"][n]["accuracy"] for n in result["merit"]]
    assert min(reals) > 0.25  # 60 steps already classify real clothes above chance (0.1)
    ratios = [result["samples"][n]["accuracy"] / r for n, r in zip(result["merit"], reals)]
    assert result["samples_ratio"]["mean"] == pytest.approx(sum(ratios) / 3)
    assert result["samples_ratio"]["std"] > 0  # three different judges
    assert sorted(p.name for p in (tmp_path / "judges").iterdir()) == [
        f"judge-fashion-28px-60steps-seed{s}.pt" for s in range(3)]
    assert "Fréchet distance" in capsys.readouterr().out


def test_a_run_without_its_grid_is_refused(tmp_path, small_judges):
    run(tmp_path, "r", "--steps", "2")
    (tmp_path / "r" / "samples-00000002.png").unlink()
    with pytest.raises(SystemExit, match="samples-00000002.png: the run's grid at step 2 is "
                                         "missing"):
        quickstart.main([str(tmp_path / "r"), "--judges", str(tmp_path / "judges")])
