"""The CPU reproductions of the paper's evidence (jitfast.experiments), at test size."""
import itertools
import json
import math

import pytest
import torch
from PIL import Image

from jitfast import JiT
from jitfast.diffusion.denoiser import Denoiser
from jitfast.experiments import classifier, samplers, targets, toy, transfer
from jitfast.experiments.classifier import (frechet_distance, judge, scramble_colours,
                                            train_classifier)
from jitfast.training.shapes import ShapesDataset


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_off_manifold_is_zero_on_the_plane_and_noise_sized_off_it():
    g = torch.Generator().manual_seed(0)
    basis = toy.column_orthogonal(64, g)
    assert torch.allclose(basis.T @ basis, torch.eye(2), atol=1e-5)
    on_plane = toy.spiral(500, g) @ basis.T
    assert toy.off_manifold(on_plane, basis) < 1e-5
    noise = torch.randn(4000, 64, generator=g)
    assert toy.off_manifold(noise, basis) == pytest.approx(math.sqrt(62), rel=0.02)


def test_toy_at_D512_only_x_prediction_stays_on_the_manifold():
    """The paper's point, in the metric that the 2-D projection hides: at D = 512 a 256-wide MLP
    cannot output the off-manifold part of e or v, so e- and v-prediction samples keep their
    noise off the plane; x-prediction samples land near it."""
    residual = {pred: toy.off_manifold(*toy.train_and_sample(512, pred, steps=150, samples=256))
                for pred in ("x", "e", "v")}
    assert residual["x"] < 1.0
    assert residual["v"] > 10 * residual["x"] and residual["e"] > 10 * residual["x"]


def test_toy_run_writes_the_figure_and_metrics(tmp_path):
    report = toy.run([2, 8], steps=20, out=str(tmp_path), seeds=(0, 1))
    saved = json.loads((tmp_path / "toy.json").read_text())
    assert saved["results"] == report["results"]
    assert set(saved["results"]) == {f"D={d}/{p}-pred" for d in (2, 8) for p in "xev"}
    x2 = saved["results"]["D=2/x-pred"]
    assert x2["off_manifold"] == {"mean": 0.0, "std": 0.0}  # P is square at D = 2
    near = saved["per_seed"]["D=8/x-pred"]["near_spiral"]
    assert len(near) == 2 and x2["near_spiral"]["std"] > 0  # two seeds, two different runs
    assert "| 8 | " in (tmp_path / "table.md").read_text()
    assert (tmp_path / "toy.png").stat().st_size > 0


def test_frechet_distance_is_zero_for_equal_sets_and_the_mean_shift_squared_for_shifts():
    a = torch.randn(400, 5, generator=torch.Generator().manual_seed(0))
    shift = torch.tensor([3.0, 0.0, -4.0, 0.0, 0.0])
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, a + shift) == pytest.approx(25.0, rel=1e-6)
    assert frechet_distance(a, 2 * a) > 1.0  # the covariance term counts


def test_classifier_separates_the_builtin_classes():
    model = train_classifier(16, steps=80, seed=1)
    images, labels = ShapesDataset(16, 200, seed=2).batch(range(200))
    accuracy, features = judge(model, images, labels)
    assert accuracy > 0.5  # chance: 0.1
    assert features.shape == (200, 64)


def test_targets_pipeline_writes_table_json_and_one_grid_per_cell(tmp_path):
    config = dict(steps=4, batch=4, samples_per_class=1, sample_steps=2, classifier_steps=4,
                  colour_blind_steps=4, fashion_judge_steps=4, seeds=(0, 1))
    targets.run(config, str(tmp_path), settings=("control",), part="seeds", seeds=[1])
    assert (tmp_path / "control-seed1.pt").exists()  # as a parallel process would leave it
    assert not list(tmp_path.glob("*.png"))  # the grids are the first seed's
    results = targets.run(config, str(tmp_path), settings=("control",))
    cells = {f"{p}-pred/v-loss" for p in "xev"}
    assert set(results["control"]) == {"colour", "colour-blind"}
    for by_cell in results["control"].values():
        assert set(by_cell) == cells | {"real data"}
        for cell in cells:
            assert 0.0 <= by_cell[cell]["accuracy"]["mean"] <= 1.0
            assert by_cell[cell]["frechet"]["std"] > 0  # two seeds, different samples
    for pred in "xev":
        assert (tmp_path / f"control-{pred}-pred-v-loss.png").stat().st_size > 0
    table = (tmp_path / "table.md").read_text()
    assert "| x-pred | - | - | " in table  # the control has only the v-loss column
    assert "**control**, colour-blind judge" in table and " ± " in table
    saved = json.loads((tmp_path / "targets.json").read_text())
    assert saved["results"] == results
    assert len(saved["scores"]["control"]["colour"]["x-pred/v-loss"]["accuracy"]) == 2


def test_targets_on_fashion_mnist_train_on_the_subset_and_use_the_test_split_judge(tmp_path):
    """The real-image settings: batches of the built-in subset (shuffled by the seed, repeated),
    one judge trained on test-split images, the table naming the data."""
    first = targets.FashionBatches(28, seed=0).batch(range(2990, 3010))
    again = targets.FashionBatches(28, seed=0).batch(range(2990, 3010))
    other = targets.FashionBatches(28, seed=1).batch(range(2990, 3010))
    assert torch.equal(first[0], again[0]) and not torch.equal(first[0], other[0])
    assert first[0].shape == (20, 3, 28, 28) and first[1].dtype == torch.long
    config = dict(steps=2, batch=4, samples_per_class=1, sample_steps=2, classifier_steps=4,
                  colour_blind_steps=4, fashion_judge_steps=4, seeds=(0,))
    results = targets.run(config, str(tmp_path), settings=("fashion-bottleneck",))
    assert set(results["fashion-bottleneck"]) == {"test split"}
    assert (tmp_path / "judge-fashion-28px-4steps-seed0.pt").exists()
    assert "**fashion-bottleneck**, test split judge (fashion-mnist, 28 px, patch 7: 147-d" \
        in (tmp_path / "table.md").read_text()


def test_scramble_colours_permutes_and_negates_each_image_on_its_own():
    images = torch.randn(200, 3, 5, 4, generator=torch.Generator().manual_seed(0))
    out = scramble_colours(images, torch.Generator().manual_seed(1))
    variants = set()
    for before, after in zip(images, out):
        found = [(perm, sign) for perm in itertools.permutations(range(3)) for sign in (1, -1)
                 if torch.equal(after, sign * before[list(perm)])]
        assert len(found) == 1
        variants.add(found[0])
    assert len(variants) == 12  # every permutation with either sign, image by image


def test_colour_blind_judge_sees_shapes_not_colours():
    """Scrambling the colours of real images fools the colour judge, not the colour-blind one."""
    images, labels = ShapesDataset(16, 300, seed=2).batch(range(300))
    scrambled = scramble_colours(images, torch.Generator().manual_seed(3))
    colour = train_classifier(16, steps=80, seed=1)
    blind = train_classifier(16, steps=80, seed=1, colour_blind=True)
    assert judge(colour, images, labels)[0] - judge(colour, scrambled, labels)[0] > 0.3
    blind_accuracy = judge(blind, images, labels)[0]
    assert blind_accuracy > 0.2  # chance: 0.1
    assert abs(blind_accuracy - judge(blind, scrambled, labels)[0]) < 0.1


def test_transfer_experiment_writes_table_json_and_figures(tmp_path):
    config = dict(transfer.QUICK, parent_steps=2, steps=2, batch=2, sample_steps=1,
                  classifier_steps=2, colour_blind_steps=2)
    transfer.run(config, str(tmp_path), part="seeds", seeds=[1])  # as a parallel process would
    results = transfer.run(config, str(tmp_path))
    saved = json.loads((tmp_path / "transfer.json").read_text())
    assert set(results) == set(transfer.ARMS) and saved["results"] == results
    for arm in transfer.ARMS:
        for name in transfer.JUDGES:
            accuracies = saved["scores"][arm][name]["accuracy"]
            assert len(accuracies) == 2  # one per seed
            assert results[arm][name]["accuracy"]["mean"] == pytest.approx(
                sum(accuracies) / 2)
    assert [len(c) for c in saved["losses"]["scratch P + N"]] == [4, 4]
    table = (tmp_path / "table.md").read_text()
    assert table.count("\n| ") == 6 and "| transferred + N | 2 |" in table
    with Image.open(tmp_path / "samples.png") as figure:  # 4 arms and the real images
        assert figure.size == (5 * 64 + 4 * 6, 10 * 64 + 14)
    assert (tmp_path / "loss.png").stat().st_size > 0
    with pytest.raises(ValueError, match="holds a run with another config"):
        transfer.run(dict(config, lr=1.0), str(tmp_path))


def test_samplers_judge_table_scores_with_both_judges(tmp_path, monkeypatch):
    monkeypatch.setattr(classifier, "JUDGE_STEPS", {"colour": 4, "colour-blind": 4})
    monkeypatch.setattr(samplers, "JUDGE_HEUN_STEPS", (2,))
    monkeypatch.setattr(samplers, "JUDGE_EVALUATIONS", (3,))
    torch.manual_seed(0)
    denoiser = Denoiser(JiT(input_size=8, patch_size=4, hidden_size=24, depth=1, num_heads=2,
                            bottleneck_dim=8, num_classes=10, in_context_len=0,
                            backend="torch"))
    results = samplers.Results(str(tmp_path / "results.json"))
    samplers.judge_table(denoiser, results, 10, ("unipc2", "cosine"), str(tmp_path / "j"))
    rows = json.loads((tmp_path / "results.json").read_text())["judges"]
    assert set(rows) == {"real data", "heun/linear/3", "unipc2/cosine/3"}
    assert all(len(row) == 5 for row in rows.values())  # 2 judges x (accuracy, Fréchet), s
    assert len(list((tmp_path / "j").glob("judge-*.pt"))) == 2
    table = samplers.markdown(results.data)
    assert "| colour-blind accuracy | colour-blind Fréchet |" in table
    assert "| unipc2/cosine | 3 | " in table
