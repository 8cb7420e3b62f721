"""python -m jitfast.sample: outputs, the ADM npz layout, exact resume, bad input, unconditional
checkpoints (and Denoiser.generate without labels)."""
import json
import sys
import types
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

import jitfast.sample as sample_cli
from jitfast import EMA, Denoiser, JiT, save_checkpoint
from jitfast.io.images import to_uint8

OFFICIAL = torch.load(Path(__file__).parent / "fixtures" / "official_tiny.pt", weights_only=True)
FAST = ["--steps", "3", "--cfg", "2.0", "--interval", "0.0", "1.0"]


def lively_net(**overrides):
    """The official tiny config with weights large enough that images depend on the noise."""
    torch.manual_seed(0)
    net = JiT(**{**OFFICIAL["config"], **overrides})
    for p in net.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.2)
    return net.eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    denoiser = Denoiser(lively_net())
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pth"
    save_checkpoint(path, denoiser, EMA(denoiser), args={"noise_scale": 1.0})
    return str(path)


def sample(ckpt, out, *extra):
    sample_cli.main(["--ckpt", ckpt, "--out", str(out), *FAST, *extra])
    return np.load(Path(out) / "samples.npz")


def test_npz_layout_and_images_equal_the_api(ckpt, tmp_path):
    data = sample(ckpt, tmp_path / "a", "--classes", "1,7", "--num-per-class", "2", "--batch",
                  "3")
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (4, 32, 32, 3)
    assert data["arr_1"].tolist() == [1, 1, 7, 7]
    assert (tmp_path / "a" / "grid.png").exists()
    assert sorted(p.name for p in (tmp_path / "a" / "images").iterdir()) == \
        [f"{i:06d}.png" for i in range(4)]
    denoiser = Denoiser(lively_net())
    z0 = sample_cli.initial_noise(range(4), (3, 32, 32), seed=0)
    expected = denoiser.generate(torch.tensor([1, 1, 7, 7]), steps=3, cfg=2.0,
                                 interval=(0.0, 1.0), z0=z0)
    assert np.array_equal(data["arr_0"], to_uint8(expected))


def test_method_and_schedule_reach_the_api(ckpt, tmp_path):
    data = sample(ckpt, tmp_path / "a", "--classes", "2,5", "--method", "unipc2", "--schedule",
                  "lambda")
    z0 = sample_cli.initial_noise(range(2), (3, 32, 32), seed=0)
    expected = Denoiser(lively_net()).generate(torch.tensor([2, 5]), 3, "unipc2", 2.0,
                                               (0.0, 1.0), z0=z0, schedule="lambda")
    assert np.array_equal(data["arr_0"], to_uint8(expected))
    heun = sample(ckpt, tmp_path / "b", "--classes", "2,5")["arr_0"]
    assert not np.array_equal(data["arr_0"], heun)


def test_same_seed_same_images(ckpt, tmp_path):
    a = sample(ckpt, tmp_path / "a", "--classes", "3", "--num-per-class", "2")["arr_0"]
    b = sample(ckpt, tmp_path / "b", "--classes", "3", "--num-per-class", "2")["arr_0"]
    c = sample(ckpt, tmp_path / "c", "--classes", "3", "--num-per-class", "2", "--seed",
               "1")["arr_0"]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_interrupted_run_resumes_to_the_same_result(ckpt, tmp_path, monkeypatch):
    args = ("--classes", "0,4,9", "--num-per-class", "3", "--batch", "2")  # 9 images, 5 batches
    full = sample(ckpt, tmp_path / "full", *args)["arr_0"]
    written = []
    real_save = sample_cli.save_png

    def crash_after_five(image, path):
        if len(written) == 5:
            raise KeyboardInterrupt
        written.append(path)
        real_save(image, path)

    monkeypatch.setattr(sample_cli, "save_png", crash_after_five)
    with pytest.raises(KeyboardInterrupt):
        sample(ckpt, tmp_path / "cut", *args)
    monkeypatch.setattr(sample_cli, "save_png", real_save)
    assert len(list((tmp_path / "cut" / "images").iterdir())) == 5  # no half-written files
    generated = []
    real_generate = Denoiser.generate
    monkeypatch.setattr(Denoiser, "generate", lambda self, y, *a, **k: generated.append(
        y.tolist()) or real_generate(self, y, *a, **k))
    resumed = sample(ckpt, tmp_path / "cut", *args)["arr_0"]
    assert np.array_equal(resumed, full)
    # batches 0 and 1 (images 0-3) were complete and are not regenerated; batch 2 was cut
    assert generated == [[4, 4], [9, 9], [9]]


def test_other_settings_do_not_resume(ckpt, tmp_path):
    sample(ckpt, tmp_path, "--classes", "1")
    with pytest.raises(SystemExit, match=r"other settings \(cfg\)"):
        sample_cli.main(["--ckpt", ckpt, "--out", str(tmp_path), "--classes", "1",
                         "--steps", "3", "--cfg", "3.0", "--interval", "0.0", "1.0"])


def test_a_run_from_before_schedules_resumes(ckpt, tmp_path):
    """A run.json written before --schedule existed resumes with the linear grid it used."""
    first = sample(ckpt, tmp_path, "--classes", "1")
    manifest = tmp_path / "run.json"
    settings = json.loads(manifest.read_text())
    del settings["schedule"]
    manifest.write_text(json.dumps(settings))
    again = sample(ckpt, tmp_path, "--classes", "1")
    assert np.array_equal(first["arr_0"], again["arr_0"])
    with pytest.raises(SystemExit, match=r"other settings \(method, schedule\)"):
        sample_cli.main(["--ckpt", ckpt, "--out", str(tmp_path), "--classes", "1", *FAST,
                         "--method", "unipc2", "--schedule", "cosine"])


@pytest.mark.parametrize("extra, message", [
    (["--classes", "3,10"], r"class ids must lie in \[0, 9\].*\[10\]"),
    (["--classes", "a,b"], "comma-separated integers"),
    (["--num-per-class", "0"], "--num-per-class must be >= 1, got 0"),
    (["--steps", "0"], "steps must be an integer >= 1"),
    (["--cfg", "-1"], "cfg must be >= 0"),
    (["--interval", "0.2", "1.5"], "interval must satisfy"),
    (["--schedule", "lambda"], "heun runs the official linear grid"),
    (["--model", "JiT-B/16"], "not a JiT-B/16: .*depth 4 \\(preset: 12\\)"),
    (["--model", "JiT-X/16"], "--model: unknown preset 'JiT-X/16'; choose one of"),
    (["--fid"], "--fid needs --fid-stats"),
    (["--fid", "--fid-stats", "/nonexistent/stats.npz"], "do not exist"),
])
def test_bad_input(ckpt, tmp_path, extra, message):
    argv = ["--ckpt", ckpt, "--out", str(tmp_path / "o"), "--classes", "1", "--steps", "2"]
    with pytest.raises(SystemExit, match=message):
        sample_cli.main(argv + extra)


def test_unwritable_output_folder(ckpt, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="cannot write to the output folder"):
        sample_cli.main(["--ckpt", ckpt, "--out", str(tmp_path / "file" / "o")])


def test_missing_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        sample_cli.main(["--ckpt", str(tmp_path / "none.pth"), "--out", str(tmp_path)])


def test_fid_needs_torch_fidelity(ckpt, tmp_path, monkeypatch):
    np.savez(tmp_path / "stats.npz", mu=np.zeros(4), sigma=np.eye(4))
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    with pytest.raises(SystemExit, match="pip install torch-fidelity"):
        sample_cli.main(["--ckpt", ckpt, "--out", str(tmp_path / "o"), "--fid", "--fid-stats",
                         str(tmp_path / "stats.npz")])
    np.savez(tmp_path / "bad.npz", mean=np.zeros(4))
    with pytest.raises(SystemExit, match="needs arrays 'mu' and 'sigma'"):
        sample_cli.main(["--ckpt", ckpt, "--out", str(tmp_path / "o"), "--fid", "--fid-stats",
                         str(tmp_path / "bad.npz")])


def test_fid_says_how_to_provide_inception_weights(monkeypatch, tmp_path):
    """torch-fidelity cannot reach the network: the error names the file and --inception-weights."""
    from jitfast.measure.fid import EvaluationError, fid_and_inception_score

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    fake = {"torch_fidelity": {}, "torch_fidelity.metric_fid": {
        "fid_featuresdict_to_statistics": None, "fid_statistics_to_metric": None},
        "torch_fidelity.metric_isc": {"isc_featuresdict_to_metric": None},
        "torch_fidelity.utils": {"create_feature_extractor": offline,
                                 "extract_featuresdict_from_input_id": None,
                                 "resolve_feature_extractor": lambda **k: "inception-v3-compat",
                                 "resolve_feature_layer_for_metric": lambda m, **k: m}}
    for name, attrs in fake.items():
        monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(**attrs))
    with pytest.raises(EvaluationError, match=r"could not be obtained.*no network.*"
                                              r"weights-inception-2015-12-05.*--inception-weights"):
        fid_and_inception_score(str(tmp_path), str(tmp_path / "stats.npz"), cuda=False)


def test_cuda_graphs_need_cuda():
    denoiser = Denoiser(JiT(**OFFICIAL["config"]))
    with pytest.raises(ValueError, match="cuda_graphs=True needs"):
        denoiser.generate(torch.tensor([1]), steps=1, cuda_graphs=True)


@pytest.fixture(scope="module")
def unconditional_ckpt(tmp_path_factory):
    """A model trained without classes: num_classes 0, the null class its only label."""
    denoiser = Denoiser(lively_net(num_classes=0))
    path = tmp_path_factory.mktemp("ckpt") / "unconditional.pth"
    save_checkpoint(path, denoiser, EMA(denoiser), args={"noise_scale": 1.0})
    return str(path)


def test_unconditional_checkpoint_samples_without_labels(unconditional_ckpt, tmp_path):
    """The npz holds the images only (ADM's unconditional layout), unguided, the images of
    generate(None) from the same starts; a run resumes with the same settings."""
    argv = ["--ckpt", unconditional_ckpt, "--out", str(tmp_path), "--steps", "2",
            "--num-samples", "3", "--batch", "2"]
    sample_cli.main(argv)
    data = np.load(tmp_path / "samples.npz")
    assert list(data) == ["arr_0"] and data["arr_0"].shape == (3, 32, 32, 3)
    assert json.loads((tmp_path / "run.json").read_text())["cfg"] == 1.0
    z0 = sample_cli.initial_noise(range(3), (3, 32, 32), seed=0)
    expected = Denoiser(lively_net(num_classes=0)).generate(None, steps=2, z0=z0)
    assert np.array_equal(data["arr_0"], to_uint8(expected))
    sample_cli.main(argv + ["--cfg", "1"])  # the same settings: resumed, nothing to do


@pytest.mark.parametrize("extra, message", [
    (["--cfg", "2"], r"unconditional \(trained without classes\): drop --cfg 2 \(guidance "
                     r"needs classes\); --num-samples N sets how many images"),
    (["--classes", "0", "--num-per-class", "2"], "drop --classes, --num-per-class;"),
    (["--num-samples", "0"], "--num-samples must be >= 1, got 0"),
])
def test_unconditional_bad_input(unconditional_ckpt, tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        sample_cli.main(["--ckpt", unconditional_ckpt, "--out", str(tmp_path), *extra])


def test_num_samples_is_for_unconditional_checkpoints(ckpt, tmp_path):
    with pytest.raises(SystemExit, match="--num-samples is for unconditional checkpoints; this "
                                         "one has 10 classes: use --classes and --num-per-class"):
        sample_cli.main(["--ckpt", ckpt, "--out", str(tmp_path), "--num-samples", "4"])


def test_generate_without_labels():
    """y=None samples the null class: num_samples images (or z0's), the same as the null
    labels given; guidance needs labels and a class-conditional model; invert takes None too."""
    conditional, unconditional = Denoiser(lively_net()), Denoiser(lively_net(num_classes=0))
    z0 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    null = conditional.generate(torch.full((2,), 10), steps=1, z0=z0)
    assert torch.equal(conditional.generate(None, steps=1, z0=z0), null)
    drawn = unconditional.generate(None, steps=1, num_samples=3,
                                   generator=torch.Generator().manual_seed(1))
    assert drawn.shape == (3, 3, 32, 32) and drawn.dtype == torch.float32
    images = unconditional.generate(None, steps=1, z0=z0)
    assert torch.equal(unconditional.generate(torch.zeros(2, dtype=torch.long), steps=1, z0=z0),
                       images)
    assert unconditional.invert(images, None, steps=1).shape == z0.shape
    for denoiser, y, kwargs, message in (
            (unconditional, None, dict(cfg=2.0), r"the model is unconditional \(num_classes 0"),
            (unconditional, torch.tensor([1]), {}, "its one label is 0, the null class"),
            (conditional, None, dict(cfg=2.0), "y=None samples the null class .* use cfg=1"),
            (conditional, None, {}, "needs num_samples >= 1, or z0"),
            (conditional, None, dict(num_samples=2, z0=z0[:1]), r"z0 must have shape \(2,")):
        with pytest.raises(ValueError, match=message):
            denoiser.generate(y, steps=1, **kwargs)


PMF_OFFICIAL = torch.load(Path(__file__).parent / "fixtures" / "pmf_official_tiny.pt",
                          weights_only=True)


@pytest.fixture(scope="module")
def pmf_file(tmp_path_factory):
    """A published-style pMF file: the official port's bare state dict (v-head included)."""
    path = tmp_path_factory.mktemp("pmf") / "pMF-tiny.pt"
    torch.save(PMF_OFFICIAL["state_dict"], path)
    return str(path)


def test_pmf_file_samples_with_its_guidance_inputs(pmf_file, tmp_path):
    """--cfg and --interval reach the network as omega and [t_min, t_max]; one step by
    default; the images equal the official port's generate from the same noise."""
    from jitfast import PMFSampler, load_checkpoint
    sample_cli.main(["--ckpt", pmf_file, "--out", str(tmp_path / "a"), "--classes", "0,9",
                     "--cfg", "7.5", "--interval", "0.1", "0.8"])
    data = np.load(tmp_path / "a" / "samples.npz")
    z0 = sample_cli.initial_noise(range(2), (3, 32, 32), seed=0)
    expected = PMFSampler(load_checkpoint(pmf_file)).generate(
        torch.tensor([0, 9]), 1, 7.5, (0.1, 0.8), z0=z0)
    assert np.array_equal(data["arr_0"], to_uint8(expected))
    run = json.loads((tmp_path / "a" / "run.json").read_text())
    assert (run["method"], run["steps"], run["weights"]) == ("pmf", 1, "model")
    other = PMFSampler(load_checkpoint(pmf_file)).generate(
        torch.tensor([0, 9]), 1, 2.0, (0.1, 0.8), z0=z0)
    assert not np.array_equal(data["arr_0"], to_uint8(other))  # omega reached the network


@pytest.mark.parametrize("extra, message", [
    (["--method", "heun"], "pMF model, which samples with its own update"),
    (["--t-eps", "0.1"], "t_eps is not among pMF's sampler settings"),
    (["--cfg", "0.5"], r"omega .* must be >= 1"),
    (["--interval", "0.8", "0.2"], "interval must satisfy"),
    (["--steps", "0"], "steps must be an integer >= 1"),
    (["--model", "pMF-B/16"], r"not a pMF-B/16: .*hidden_size \d+ \(preset: 768\)"),
    (["--model", "JiT-B/16"], "not a JiT-B/16: it holds a pMF network"),
])
def test_pmf_bad_input(pmf_file, tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        sample_cli.main(["--ckpt", pmf_file, "--out", str(tmp_path / "a"), "--classes", "1",
                         *extra])
    assert not (tmp_path / "a" / "run.json").exists()
