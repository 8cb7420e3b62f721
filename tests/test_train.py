"""The training loop: the default command, exact resume, checkpoints, and bad-input errors."""
import glob
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from test_data import write_folder, write_mnist

import jitfast.sample as sample_cli
from jitfast import load_checkpoint, read_checkpoint, train
from jitfast.diffusion.denoiser import Denoiser
from jitfast.diffusion.from_checkpoint import denoiser_from_checkpoint
from jitfast.io.images import to_uint8
from jitfast.prepare import prepare
from jitfast.training.build import build_step
from jitfast.training.data import DataError
from jitfast.training.progress import read_metrics
from jitfast.training.runfolder import latest_checkpoint

TINY = ["--model", "JiT-T/8", "--image-size", "16", "--batch-size", "4", "--log-every", "1",
        "--sample-steps", "2", "--samples-per-class", "2", "--grid-classes", "3",
        "--warmup-steps", "2", "--device", "cpu", "--cpu-threads", "1"]
pytestmark = pytest.mark.usefixtures("restore_threads")


def run(tmp_path, name, *extra):
    return train.main(TINY + ["--out", str(tmp_path / name), *extra])


def losses(result):
    return [r["loss"] for r in read_metrics(result["metrics"])]


def test_default_command_end_to_end(tmp_path):
    """`python -m jitfast.train --compile`, test-sized: checkpoint, sample grid, metrics."""
    result = run(tmp_path, "run", "--compile", "--steps", "3")
    records = read_metrics(result["metrics"])
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["loss"] > 0 and r["images_per_s"] > 0 for r in records)
    lr = 1.2e-2 * 4 / 256  # the small presets' blr, batch 4, 2 warm-up steps
    assert [r["lr"] for r in records] == pytest.approx([lr / 2, lr, lr])
    with Image.open(result["grid"]) as grid:
        assert grid.size == (2 * 16, 3 * 16)
    assert result["checkpoint"].endswith("checkpoint-00000003.pt")
    assert load_checkpoint(result["checkpoint"]).input_size == 16


def test_help_documents_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--compile", "--fsdp", "--resume", "--blr", "--ema-decays", "--data-path"):
        assert flag in text
    assert text.count("(default:") >= 35
    assert "0.99 0.98 for the small presets" in text


@pytest.fixture(scope="module")
def tiny_memmap(tmp_path_factory):
    """10 images in 3 classes: with batch 4 an epoch is 2 steps, so runs cross epochs."""
    root = tmp_path_factory.mktemp("data")
    write_folder(root / "src", [[(20, 24)] * 4, [(24, 20)] * 3, [(16, 16)] * 3])
    prepare(str(root / "src"), str(root / "mm"), 16, workers=1)
    return str(root / "mm")


def test_resume_repeats_the_uninterrupted_run(tmp_path, tiny_memmap):
    common = ["--data-path", tiny_memmap, "--steps", "6", "--schedule", "cosine",
              "--ckpt-every", "3", "--keep-checkpoints", "5"]
    full = run(tmp_path, "full", *common)
    first = os.path.join(tmp_path, "full", "checkpoint-00000003.pt")
    assert read_checkpoint(first)["data"] == {"epoch": 1, "batch_in_epoch": 1, "images_seen": 12}
    resumed = run(tmp_path, "resumed", *common, "--resume", first)
    assert losses(resumed) == losses(full)[3:]  # bit for bit
    a, b = read_checkpoint(full["checkpoint"]), read_checkpoint(resumed["checkpoint"])
    for key in ("model", "model_ema1", "model_ema2"):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), (key, name)
    # A folder resumes from its latest checkpoint.
    assert latest_checkpoint(str(tmp_path / "full")) == full["checkpoint"]


def test_checkpoint_is_official_layout_and_loads(tmp_path):
    result = run(tmp_path, "run", "--steps", "2")
    ckpt = read_checkpoint(result["checkpoint"])  # weights_only=True
    assert {"model", "model_ema1", "model_ema2", "optimizer", "epoch", "args", "step",
            "config"} <= set(ckpt)
    assert isinstance(ckpt["args"], dict) and ckpt["args"]["model"] == "JiT-T/8"
    assert all(k.startswith("net.") for k in ckpt["model"])
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 0.8]), torch.tensor([1, 10])
    denoiser, ema = result["denoiser"], result["ema"]
    for weights, which in (("ema1", 1), ("ema2", 2)):
        net = load_checkpoint(result["checkpoint"], weights=weights)
        with ema.swapped(which), torch.no_grad():
            assert torch.equal(net(x, t, y), denoiser.net.eval()(x, t, y))
    net = load_checkpoint(result["checkpoint"], weights="model")
    with torch.no_grad():
        expected = denoiser.net(x, t, y)
        assert torch.equal(net(x, t, y), expected)
        assert not torch.equal(load_checkpoint(result["checkpoint"])(x, t, y), expected)


def test_a_flat_folder_trains_an_unconditional_model_that_samples_without_labels(tmp_path,
                                                                                  capsys):
    """Images without class subfolders (RGB, grayscale, RGBA): a model with num_classes = 0,
    no label dropout, a plain grid of unguided samples (3 rows of 2); its checkpoint samples
    through python -m jitfast.sample without labels, as Denoiser.generate(None) does."""
    rng = np.random.default_rng(0)
    (tmp_path / "flat").mkdir()
    for i in range(5):
        mode, channels = (("RGB", (3,)), ("L", ()), ("RGBA", (4,)))[i % 3]
        pixels = rng.integers(0, 256, (20, 18, *channels), dtype=np.uint8)
        Image.fromarray(pixels, mode).save(tmp_path / "flat" / f"{i}.png")
    result = run(tmp_path, "run", "--data-path", str(tmp_path / "flat"), "--steps", "2",
                 "--num-workers", "0")
    assert "5 images without classes (an unconditional model)" in capsys.readouterr().err
    ckpt = read_checkpoint(result["checkpoint"])
    assert ckpt["config"]["num_classes"] == 0 and ckpt["args"]["label_drop_prob"] == 0.0
    assert load_checkpoint(result["checkpoint"].replace(".pt", ".safetensors")).num_classes == 0
    with Image.open(result["grid"]) as grid:
        assert grid.size == (2 * 16, 3 * 16)
    out = tmp_path / "samples"
    sample_cli.main(["--ckpt", result["checkpoint"], "--out", str(out), "--steps", "2",
                     "--num-samples", "3", "--batch", "2", "--device", "cpu"])
    data = np.load(out / "samples.npz")
    assert list(data) == ["arr_0"] and data["arr_0"].shape == (3, 16, 16, 3)  # no labels
    z0 = sample_cli.initial_noise(range(3), (3, 16, 16), seed=0)
    expected = denoiser_from_checkpoint(result["checkpoint"]).generate(None, steps=2, z0=z0)
    assert np.array_equal(data["arr_0"], to_uint8(expected))
    with pytest.raises(SystemExit, match=r"the checkpoint is unconditional \(trained without "
                                         r"classes\): drop --cfg 2 \(guidance needs classes\)"):
        sample_cli.main(["--ckpt", result["checkpoint"], "--out", str(tmp_path / "cfg"),
                         "--cfg", "2"])


def test_mnist_format_files_train(tmp_path, capsys):
    """A folder of IDX files trains on its train- pair, and says so; the grid has a row per
    class."""
    write_mnist(tmp_path / "mnist", count=8, rows=12, cols=12)
    result = run(tmp_path, "run", "--data-path", str(tmp_path / "mnist"), "--steps", "2",
                 "--num-workers", "0")
    err = capsys.readouterr().err
    assert "8 images in 3 classes" in err
    assert "data: train-images-idx3-ubyte.gz and train-labels-idx1-ubyte.gz in " in err
    with Image.open(result["grid"]) as grid:
        assert grid.size == (2 * 16, 3 * 16)


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    run(tmp_path, "run", "--steps", "2")
    previous = os.path.join(tmp_path, "run", "checkpoint-00000002.pt")
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        run(tmp_path, "run", "--steps", "4", "--ckpt-every", "4", "--resume", previous)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(f for f in os.listdir(tmp_path / "run") if "checkpoint" in f) == [
        "checkpoint-00000002.pt", "checkpoint-00000002.safetensors"]  # nothing half-written
    assert read_checkpoint(previous)["step"] == 2


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_loss, calls = Denoiser.loss, []

    def loss_that_explodes(self, *args, **kwargs):
        calls.append(1)
        value = real_loss(self, *args, **kwargs)
        return value * float("nan") if len(calls) > 3 else value

    monkeypatch.setattr(Denoiser, "loss", loss_that_explodes)
    with pytest.raises(train.TrainingError, match=r"non-finite \(nan\) between steps 3 and 4; "
                                                  r"the last good checkpoint is .*-00000002.pt"):
        run(tmp_path, "run", "--steps", "6", "--ckpt-every", "2")
    ckpt = read_checkpoint(os.path.join(tmp_path, "run", "checkpoint-00000002.pt"))
    assert ckpt["step"] == 2 and all(v.isfinite().all() for v in ckpt["model"].values())
    assert sorted(glob.glob(os.path.join(tmp_path, "run", "checkpoint-*"))) == [
        os.path.join(tmp_path, "run", f"checkpoint-00000002.{ext}")
        for ext in ("pt", "safetensors")]


def test_cli_turns_errors_into_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["jitfast.train", "--data-path", str(tmp_path / "nope")])
    with pytest.raises(SystemExit, match=r"^error: --data-path '.*nope' does not exist$"):
        train.cli()


@pytest.mark.parametrize("flags, message", [
    (["--sample-steps", "1"], "unipc2 is a 2-step method: it needs steps >= 2"),
    (["--sample-method", "heun", "--sample-schedule", "cosine"],
     "heun runs the official linear grid"),
    (["--sample-cfg", "-1"], "cfg must be >= 0"),
    (["--model", "pMF-T/4", "--sample-cfg", "0.5"], "omega (pMF's guidance scale) must be >= 1"),
    (["--model", "pMF-T/4", "--sample-interval", "0.6", "0.2"],
     "the guidance interval must satisfy 0 <= t_min <= t_max <= 1")])
def test_the_sample_grid_settings_are_refused_before_training(flags, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(flags)
    assert f"the sample grid's settings: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--model", "pMF-T/4", "--sample-method", "heun"], "--sample-method is JiT's"),
    (["--cfg-beta", "2"], "--cfg-beta belongs to pMF's objective"),
    (["--data-proportion", "0.3"], "--data-proportion belongs to pMF's objective")])
def test_a_family_refuses_what_it_does_not_offer(flags, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(flags)
    assert message in capsys.readouterr().err


def test_bad_inputs_say_what_is_wrong(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="does not exist"):
        run(tmp_path, "a", "--data-path", str(tmp_path / "missing"), "--steps", "1")
    root = write_folder(tmp_path / "data", [[(16, 16)] * 6, [(16, 16)] * 6])
    for i in range(2):
        (root / "n001" / f"img{i}.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match=r"[23] of the 12 images read so far could not be decoded"):
        run(tmp_path, "b", "--data-path", str(root), "--steps", "4", "--num-workers", "0")
    monkeypatch.setitem(sys.modules, "apex", None)  # as if not installed
    with pytest.raises(train.TrainingError, match="--optimizer apex needs NVIDIA apex"):
        run(tmp_path, "c", "--optimizer", "apex", "--steps", "1")
    run(tmp_path, "d", "--steps", "2")
    with pytest.raises(train.TrainingError, match="checkpoint is at step 2, not before --steps 2"):
        run(tmp_path, "d", "--steps", "2", "--resume", str(tmp_path / "d"))
    with pytest.raises(train.TrainingError, match="--cuda-graph on: it needs a CUDA device"):
        run(tmp_path, "e", "--cuda-graph", "on", "--steps", "1")


@pytest.mark.gpu
def test_graphed_training_resumes_and_matches_ungraphed(tmp_path):
    """On CUDA the default replays the whole step from one CUDA graph: a resumed run repeats the
    uninterrupted one loss for loss, and the losses follow an ungraphed run's (bf16)."""
    common = ["--device", "cuda", "--steps", "8", "--ckpt-every", "4", "--keep-checkpoints", "5"]
    full = run(tmp_path, "full", *common)
    resumed = run(tmp_path, "resumed", *common, "--resume",
                  os.path.join(tmp_path, "full", "checkpoint-00000004.pt"))
    assert losses(resumed) == losses(full)[4:]
    eager = run(tmp_path, "eager", *common, "--cuda-graph", "off")
    assert torch.allclose(torch.tensor(losses(full)), torch.tensor(losses(eager)), rtol=1e-2)


def test_presets_default_to_their_recipes():
    """The small presets train by the quick-start recipe (docs/quickstart.md), the paper's
    presets by the official one; a value given on the command line wins."""
    small = train.parse_args([])
    assert (small.model, small.image_size, small.dataset, small.steps, small.P_mean,
            small.schedule, small.ema_decays, small.blr, small.sample_cfg) == (
        "JiT-T/4", 28, "fashion-mnist", 1600, 0.0, "cosine", [0.99, 0.98], 1.2e-2, 3.0)
    shapes = train.parse_args(["--dataset", "shapes"])
    own = train.parse_args(["--data-path", "somewhere"])
    assert (shapes.model, shapes.image_size) == (own.model, own.image_size) == ("JiT-N/8", 64)
    big = train.parse_args(["--model", "JiT-B/16"])
    assert (big.P_mean, big.schedule, big.ema_decays, big.blr) == (
        -0.8, "constant", [0.9999, 0.9996], 5e-5)
    given = train.parse_args(["--P-mean", "-0.8", "--schedule", "constant"])
    assert (given.P_mean, given.schedule) == (-0.8, "constant")


@pytest.mark.parametrize("mode, refused", [("reduce-overhead", True), ("max-autotune", True),
                                           ("max-autotune-no-cudagraphs", False),
                                           ("default", False)])
def test_whole_step_graph_refuses_compile_modes_with_graphs_of_their_own(mode, refused):
    """Inductor captures CUDA graphs of its own in reduce-overhead and max-autotune, which the
    whole-step CUDA graph cannot hold (on the CPU the device is refused as well)."""
    args = train.parse_args(["--cuda-graph", "on", "--compile", "--compile-mode", mode])
    with pytest.raises(train.TrainingError) as error:
        build_step(args, None, None, None, None, torch.device("cpu"), 1)
    assert (f"--compile-mode {mode} captures graphs of its own" in str(error.value)) == refused


def test_resume_with_other_defaults_says_what_to_pass(tmp_path):
    """A run of the shapes resumed without --dataset (whose default is now Fashion-MNIST) is
    refused before its weights are loaded, with the flags it was trained with."""
    run(tmp_path, "shapes", "--steps", "2", "--dataset", "shapes")
    with pytest.raises(train.TrainingError, match="was trained with --dataset shapes: pass the "
                                                   "same to resume it"):
        run(tmp_path, "shapes", "--resume", str(tmp_path / "shapes"), "--steps", "4")
    result = run(tmp_path, "shapes", "--resume", str(tmp_path / "shapes"), "--steps", "4",
                 "--dataset", "shapes")
    assert len(losses(result)) == 4
