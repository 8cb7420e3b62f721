"""jitfast-sample (CMakeLists.txt, native/) against Denoiser.generate and PMFSampler.generate,
and its refusals.

One tiny model is exported once (through ``python -m jitfast.export``, from a checkpoint whose
training args set noise_scale and t_eps) and the program is built once per test session. The
grid of 10 steps with guidance on (0.3, 0.7) puts t = 0.7 on the boundary, where comparing in
float32 (as Python does) and in float64 disagree, and leaves points outside the interval; the
grid of 12 steps has a point where 1 - t < t_eps. A wrong interval test, a missing unconditional
pass, a Heun last step or a wrong noise_scale or t_eps move the images by far more than the 1e-4
tolerance.

A tiny pMF network is exported twice: a bare state dict through the CLI (no preset: noise scale
1, no guidance by default) and through ``jitfast.export`` with other defaults, which the program
must take from the package. Its weights make the guidance inputs matter: omega or the interval
moved a little moves the images by more than 10x the tolerance (test_pmf_guidance_matters).
"""
import json
import shutil
import subprocess
import types
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

import jitfast
from jitfast import EMA, PMF, Denoiser, JiT, PMFSampler, save_checkpoint
from jitfast.export import ExportError, check_compiled_ops
from jitfast.export import main as export_main
from jitfast.io.images import load_png, to_uint8

CONFIG = dict(input_size=16, patch_size=4, in_channels=3, hidden_size=32, depth=2, num_heads=2,
              num_classes=5, bottleneck_dim=8, in_context_len=4, in_context_start=1)
SHAPE = (3, 16, 16)
NOISE_SCALE, T_EPS = 1.5, 0.1  # the checkpoint's training settings, not the defaults
MAX_BATCH = 4
TOLERANCE = 1e-4
ROOT = Path(__file__).resolve().parents[1]  # where CMakeLists.txt is
PMF_CONFIG = dict(input_size=16, patch_size=4, hidden_size=32, depth=3, num_heads=2,
                  num_classes=5, head_depth=2)
PMF_DEFAULTS = dict(noise_scale=1.5, omega=2.5, interval=(0.2, 0.7))  # not the no-preset ones


def lively_net():
    """Random weights everywhere, adaLN and the final layer included (zero at init): images that
    depend on the noise, the labels and the guidance."""
    torch.manual_seed(0)
    net = JiT(**CONFIG, backend="torch")
    for p in net.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.2)
    return net.eval()


def lively_pmf():
    """Random weights everywhere, the gates and the final layer included (zero at init); the
    gates and q, k, v large and the patch embedding small, so that the conditioning tokens
    (labels, omega, interval) move the images well above the tolerance."""
    torch.manual_seed(1)
    net = PMF(**PMF_CONFIG, backend="torch")
    for name, p in net.named_parameters():
        std = 1.0 if name.endswith(("_scale", "qkv.weight")) else \
            0.05 if name.startswith("x_embedder") else 0.2
        torch.nn.init.normal_(p, std=std)
    return net.eval()


def build(folder):
    if shutil.which("cmake") is None:
        pytest.fail("cmake is not installed: the native tests need cmake >= 3.18 and a C++17 "
                    "compiler (CI has them)")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    for command in (["cmake", "-S", ".", "-B", str(folder), *generator,
                     f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
                    ["cmake", "--build", str(folder)]):
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if done.returncode:
            pytest.fail(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")
    return str(folder / "jitfast-sample")


@pytest.fixture(scope="session")
def native(tmp_path_factory):
    """The built program, the net, and its packages: x-prediction through the CLI (batch up to
    MAX_BATCH images), and e-prediction through jitfast.export(net, path, ...)."""
    root = tmp_path_factory.mktemp("native")
    # the C++ build runs while the packages are exported (each mostly one compiler process)
    building = ThreadPoolExecutor(1).submit(build, root / "build")
    net = lively_net()
    ckpt = root / "checkpoint.pth"
    save_checkpoint(ckpt, Denoiser(net), EMA(Denoiser(net)),
                    args={"noise_scale": NOISE_SCALE, "t_eps": T_EPS})
    package = root / "model.pt2"
    export_main(["--ckpt", str(ckpt), "--out", str(package), "--max-batch", str(MAX_BATCH)])
    package_e = root / "model_e.pt2"
    jitfast.export(net, package_e, noise_scale=NOISE_SCALE, t_eps=T_EPS, pred="e",
                   max_batch=MAX_BATCH)
    return types.SimpleNamespace(program=building.result(), net=net, package=str(package),
                                 package_e=str(package_e))


@pytest.fixture(scope="session")
def native_pmf(native, tmp_path_factory):
    """The pMF network's packages: a bare state dict through the CLI (batch up to MAX_BATCH
    images), and through jitfast.export(net, path, **PMF_DEFAULTS); each with the PMFSampler
    that samples as it should."""
    root = tmp_path_factory.mktemp("native_pmf")
    net = lively_pmf()
    torch.save(net.state_dict(), root / "pmf.pth")
    package = root / "pmf.pt2"
    export_main(["--ckpt", str(root / "pmf.pth"), "--out", str(package), "--max-batch",
                 str(MAX_BATCH)])
    package_defaults = root / "pmf_defaults.pt2"
    jitfast.export(net, package_defaults, max_batch=MAX_BATCH, **PMF_DEFAULTS)
    return types.SimpleNamespace(
        program=native.program, net=net, package=str(package),
        package_defaults=str(package_defaults),
        samplers={str(package): PMFSampler(net), str(package_defaults): PMFSampler(
            net, **PMF_DEFAULTS)})


def run(native, *args, package=None):
    return subprocess.run([native.program, "--package", package or native.package,
                           *map(str, args)], capture_output=True, text=True, timeout=300)


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


CASES = {  # labels, steps, method, cfg, interval, schedule
    "heun, cfg on (0.3, 0.7), batch 3": ([0, 4, 2], 10, "heun", 2.5, (0.3, 0.7), "linear"),
    "heun, 12 steps, cfg on [0, 0.7), batch 1": ([3], 12, "heun", 3.0, (0.0, 0.7), "linear"),
    "euler, no guidance, batch 5 (chunks of 4 + 1)": ([1, 0, 4, 3, 5], 6, "euler", 1.0,
                                                       (0.0, 1.0), "linear"),
    # the exponential methods: 0.3 and 0.7 moved onto the grid, steps past 1 - t_eps
    "ddim, no guidance, batch 5": ([1, 0, 4, 3, 5], 6, "ddim", 1.0, (0.0, 1.0), "linear"),
    "dpm2m lambda, cfg on (0.2, 0.9), batch 4": ([0, 1, 2, 3], 7, "dpm2m", 2.0, (0.2, 0.9),
                                                 "lambda"),
    "dpm3m lambda, 12 steps, cfg on [0, 0.7)": ([3], 12, "dpm3m", 3.0, (0.0, 0.7), "lambda"),
    "unipc2 cosine, cfg on (0.3, 0.7), batch 3": ([0, 4, 2], 10, "unipc2", 2.5, (0.3, 0.7),
                                                  "cosine"),
    "unipc3 lambda, cfg on (0.1, 1], batch 2": ([2, 1], 9, "unipc3", 3.0, (0.1, 1.0), "lambda"),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("pred", ["x", "e"])
def test_images_equal_python(native, tmp_path, case, pred):
    labels, steps, method, cfg, interval, schedule = CASES[case]
    z0 = torch.randn(len(labels), *SHAPE, generator=torch.Generator().manual_seed(len(labels)))
    np.save(tmp_path / "z0.npy", z0.numpy())
    done = run(native, "--labels", ",".join(map(str, labels)), "--steps", steps, "--method",
               method, "--schedule", schedule, "--cfg", cfg, "--interval", *interval, "--z0",
               tmp_path / "z0.npy",
               "--out", tmp_path / "out.npy", "--raw", tmp_path / "raw.npy", "--png-dir",
               tmp_path / "png", package=native.package if pred == "x" else native.package_e)
    assert done.returncode == 0, done.stderr
    denoiser = Denoiser(native.net, pred=pred, noise_scale=NOISE_SCALE, t_eps=T_EPS)
    expected = denoiser.generate(torch.tensor(labels), steps, method, cfg, interval, z0=z0,
                                 schedule=schedule)
    raw = torch.from_numpy(np.load(tmp_path / "raw.npy"))
    error = relative_error(raw, expected)
    print(f"\npred {pred}, {case}: relative error {error:.2e}")
    assert error <= TOLERANCE
    out = np.load(tmp_path / "out.npy")
    assert out.dtype == np.uint8 and out.shape == (len(labels), 16, 16, 3)
    assert np.array_equal(out, to_uint8(raw))  # jitfast.io.images.to_uint8, exactly
    assert np.abs(out.astype(int) - to_uint8(expected)).max() <= 1
    pngs = sorted((tmp_path / "png").iterdir())
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(len(labels))]
    assert np.array_equal(np.stack([load_png(p) for p in pngs]), out)


def test_seed_draws_torch_randn(native, tmp_path):
    """--seed S starts from torch.randn(shape, generator=torch.Generator().manual_seed(S))."""
    done = run(native, "--labels", "2,1", "--steps", 3, "--seed", 1234, "--out",
               tmp_path / "out.npy", "--raw", tmp_path / "raw.npy")
    assert done.returncode == 0, done.stderr
    z0 = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(1234))
    denoiser = Denoiser(native.net, noise_scale=NOISE_SCALE, t_eps=T_EPS)
    expected = denoiser.generate(torch.tensor([2, 1]), 3, z0=z0)
    assert relative_error(torch.from_numpy(np.load(tmp_path / "raw.npy")), expected) <= TOLERANCE


def test_package_metadata(native):
    meta = torch._inductor.aoti_load_package(native.package).get_metadata()
    assert {k: v for k, v in meta.items() if k.startswith("jitfast.")} == {
        "jitfast.format": "2", "jitfast.family": "jit", "jitfast.input_size": "16",
        "jitfast.in_channels": "3", "jitfast.num_classes": "5", "jitfast.noise_scale": "1.5",
        "jitfast.t_eps": "0.1", "jitfast.pred": "x", "jitfast.device": "cpu",
        "jitfast.dtype": "float32", "jitfast.max_batch": "4"}


def test_pmf_package_metadata(native_pmf):
    """The CLI's: PMFSampler's defaults for a network of no preset; jitfast.export's: as given."""
    for package, (noise_scale, omega, t_min, t_max) in (
            (native_pmf.package, ("1.0", "1.0", "0.0", "1.0")),
            (native_pmf.package_defaults, ("1.5", "2.5", "0.2", "0.7"))):
        meta = torch._inductor.aoti_load_package(package).get_metadata()
        assert {k: v for k, v in meta.items() if k.startswith("jitfast.")} == {
            "jitfast.format": "2", "jitfast.family": "pmf", "jitfast.input_size": "16",
            "jitfast.in_channels": "3", "jitfast.num_classes": "5",
            "jitfast.noise_scale": noise_scale, "jitfast.omega": omega, "jitfast.t_min": t_min,
            "jitfast.t_max": t_max, "jitfast.device": "cpu", "jitfast.dtype": "float32",
            "jitfast.max_batch": "4"}


PMF_CASES = {  # package (its defaults: see native_pmf), labels, flags, PMFSampler.generate's
    "1 step, omega 3 on [0.3, 0.8], batch 5 (chunks of 4 + 1)": (
        "package", [0, 4, 2, 5, 1], ["--steps", 1, "--cfg", 3.0, "--interval", 0.3, 0.8],
        dict(steps=1, omega=3.0, interval=(0.3, 0.8))),
    "2 steps, omega 2 on [0, 0.6], batch 3": (
        "package", [3, 1, 5], ["--steps", 2, "--cfg", 2.0, "--interval", 0, 0.6],
        dict(steps=2, omega=2.0, interval=(0.0, 0.6))),
    "the package's defaults: 1 step, its noise scale, omega and interval": (
        "package_defaults", [2, 0], [], dict()),
    "2 steps, the package's guidance": ("package_defaults", [2, 0, 1], ["--steps", 2],
                                        dict(steps=2)),
    "3 steps, omega 4 on the package's interval": (
        "package_defaults", [4], ["--steps", 3, "--cfg", 4], dict(steps=3, omega=4.0)),
}


@pytest.mark.parametrize("case", PMF_CASES)
def test_pmf_images_equal_python(native_pmf, tmp_path, case):
    package, labels, flags, kwargs = PMF_CASES[case]
    package = getattr(native_pmf, package)
    z0 = torch.randn(len(labels), *SHAPE, generator=torch.Generator().manual_seed(len(labels)))
    np.save(tmp_path / "z0.npy", z0.numpy())
    done = run(native_pmf, "--labels", ",".join(map(str, labels)), *flags, "--z0",
               tmp_path / "z0.npy", "--out", tmp_path / "out.npy", "--raw", tmp_path / "raw.npy",
               package=package)
    assert done.returncode == 0, done.stderr
    expected = native_pmf.samplers[package].generate(torch.tensor(labels), z0=z0, **kwargs)
    raw = torch.from_numpy(np.load(tmp_path / "raw.npy"))
    error = relative_error(raw, expected)
    print(f"\npMF, {case}: relative error {error:.2e}")
    assert error <= TOLERANCE
    assert np.array_equal(np.load(tmp_path / "out.npy"), to_uint8(raw))


def test_pmf_guidance_matters():
    """What the pMF cases compare would catch an omega, interval, noise scale or step count
    that the program gets wrong, or inputs passed in the wrong order."""
    sampler = PMFSampler(lively_pmf(), **PMF_DEFAULTS)
    z0 = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([3, 1, 5])
    base = sampler.generate(y, 2, z0=z0)
    for change in (dict(omega=3.0), dict(omega=1.0), dict(interval=(0.3, 0.7)),
                   dict(interval=(0.2, 0.75)), dict(interval=(0.7, 0.7))):
        assert relative_error(sampler.generate(y, 2, z0=z0, **change), base) > 10 * TOLERANCE
    assert relative_error(sampler.generate(y, 1, z0=z0), base) > 10 * TOLERANCE
    assert relative_error(PMFSampler(sampler.net, 1.6, 2.5, (0.2, 0.7)).generate(y, 2, z0=z0),
                          base) > 10 * TOLERANCE


def test_format_1_jit_packages_still_sample(native, tmp_path):
    """A JiT package of format 1 (from before the family key) samples as before."""
    old = with_metadata(native.package, tmp_path / "v1.pt2", format="1", family=None)
    for name, package in (("old", old), ("new", native.package)):
        done = run(native, "--labels", "2,1", "--steps", 3, "--cfg", 2.0, "--out",
                   tmp_path / f"{name}.npy", "--raw", tmp_path / f"{name}_raw.npy",
                   package=package)
        assert done.returncode == 0, done.stderr
    assert np.array_equal(np.load(tmp_path / "old_raw.npy"), np.load(tmp_path / "new_raw.npy"))


def save(path, array):
    np.save(path, array)
    return path


def write(path, data):
    path.write_bytes(data)
    return path


def truncated(native, path):
    return write(path, Path(native.package).read_bytes()[:5000])


def with_metadata(package, path, **changes):
    """A copy of `package` at `path` whose metadata has the jitfast.* `changes` (None: the key
    removed)."""
    with zipfile.ZipFile(package) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("_metadata.json"):
                meta = json.loads(data)
                for key, value in changes.items():
                    meta.pop(f"jitfast.{key}")
                    if value is not None:
                        meta[f"jitfast.{key}"] = value
                data = json.dumps(meta).encode()
            dst.writestr(info, data)
    return path


BAD = {  # name: (arguments added to a good command, made from (native, tmp_path); message)
    "missing package": (lambda n, d: ["--package", d / "none.pt2"],
                        "cannot open the package"),
    "corrupt package": (lambda n, d: ["--package", write(d / "bad.pt2", b"not a zip" * 99)],
                        "is not a readable AOTInductor package"),
    "truncated package": (lambda n, d: ["--package", truncated(n, d / "cut.pt2")],
                          "is not a readable AOTInductor package"),
    "other format": (lambda n, d: ["--package", with_metadata(n.package, d / "v3.pt2",
                                                              format="3")],
                     "has package format 3, this jitfast-sample reads format 2 (and 1, of older "
                     "JiT packages)"),
    "family": (lambda n, d: ["--package", with_metadata(n.package, d / "f.pt2", family="sde")],
               "unknown model family 'sde'"),
    "pmf method": (lambda n, d: ["--method", "pmf"], "method must be one of heun, euler, ddim"),
    "image size": (lambda n, d: ["--image-size", 32], "makes 16 px images, but --image-size 32"),
    "label too big": (lambda n, d: ["--labels", "0,6"],
                      "class labels must lie in [0, 4] (or 5, the null class) for this package, "
                      "got [0, 6]"),
    "negative label": (lambda n, d: ["--labels", "-1"], "class labels must lie in [0, 4]"),
    "z0 shape": (lambda n, d: ["--z0", save(d / "z.npy", np.zeros((2, 3, 16, 16), np.float32))],
                 "z0 must be float32 of shape (1, 3, 16, 16) (one 3x16x16 noise per label, as "
                 "the package makes), got float32 (2, 3, 16, 16)"),
    "z0 dtype": (lambda n, d: ["--z0", save(d / "z.npy", np.zeros((1, 3, 16, 16)))],
                 "dtype '<f8' is not supported"),
    "z0 fortran": (lambda n, d: ["--z0", save(d / "z.npy", np.asfortranarray(
        np.zeros((1, 3, 16, 16), np.float32)))], "Fortran-ordered arrays are not supported"),
    "z0 not npy": (lambda n, d: ["--z0", n.package], "not a .npy file"),
    "seed and z0": (lambda n, d: ["--seed", 1, "--z0", d / "z.npy"], "--seed or --z0, not both"),
    "steps": (lambda n, d: ["--steps", 0], "steps must be >= 1, got 0"),
    "method": (lambda n, d: ["--method", "rk4"], "method must be one of heun, euler, ddim"),
    "schedule": (lambda n, d: ["--method", "ddim", "--schedule", "quantile"],
                 "quantile needs the training distribution of t"),
    "heun schedule": (lambda n, d: ["--schedule", "lambda"], "heun runs the official linear grid"),
    "order": (lambda n, d: ["--method", "dpm3m"], "dpm3m is a 3-step method"),
    "interval ends": (lambda n, d: ["--method", "ddim", "--cfg", 2, "--interval", 0.3, 0.4],
                      "2 steps are too few to put a grid point on both ends"),
    "interval": (lambda n, d: ["--interval", 0.7, 0.3], "0 <= lo <= hi <= 1"),
    "number": (lambda n, d: ["--cfg", "strong"], "--cfg expects a number, got 'strong'"),
    "unknown option": (lambda n, d: ["--guidance", 2], "unknown option '--guidance'"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_input_is_refused(native, tmp_path, name):
    extra, message = BAD[name]
    args = ["--labels", "1", "--steps", 2, "--out", tmp_path / "out.npy", *extra(native, tmp_path)]
    done = run(native, *args)  # a later --package or --labels wins over the defaults here
    assert done.returncode != 0
    assert message in done.stderr
    assert "jitfast-sample: error: " in done.stderr and "Exception raised from" not in done.stderr
    assert not (tmp_path / "out.npy").exists()


BAD_PMF = {  # name: (arguments added to a good command on the CLI's pMF package, message)
    "heun": (["--method", "heun"], "method 'heun' is for JiT packages: a pMF package samples "
             "with pMF's own update"),
    "ddim and schedule": (["--method", "ddim", "--schedule", "lambda"],
                          "method 'ddim' is for JiT packages"),
    "schedule": (["--schedule", "cosine"], "a pMF package samples on the linear grid from t = 1 "
                 "to 0; the 'cosine' schedule is for a JiT package's exponential methods"),
    "omega": (["--cfg", 0.5], "omega (pMF's guidance scale, the cfg) must be >= 1"),
    "interval": (["--interval", 0.8, 0.3], "0 <= lo <= hi <= 1"),
    "steps": (["--steps", 0], "steps must be >= 1, got 0"),
    "label": (["--labels", "6"], "class labels must lie in [0, 4] (or 5, the null class)"),
}


@pytest.mark.parametrize("name", BAD_PMF)
def test_bad_pmf_input_is_refused(native_pmf, tmp_path, name):
    extra, message = BAD_PMF[name]
    done = run(native_pmf, "--labels", "1", "--out", tmp_path / "out.npy", *extra)
    assert done.returncode != 0
    assert message in done.stderr
    assert "jitfast-sample: error: " in done.stderr and "Exception raised from" not in done.stderr
    assert not (tmp_path / "out.npy").exists()


def test_help_says_what_the_flags_mean_for_pmf(native):
    done = subprocess.run([native.program, "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    for meaning in ("is its scale omega (>= 1)", "pMF: omega (default: the package's)",
                    "pMF: t_min t_max (default: the package's)", "(default 50; pMF: 1)"):
        assert meaning in done.stdout


@pytest.mark.parametrize("kwargs, message", [
    (dict(t_eps=0.1), "t_eps is not among pMF's sampler settings"),
    (dict(pred="x"), "pred is not among pMF's sampler settings"),
    (dict(omega=0.5), r"omega \(pMF's guidance scale\) must be >= 1"),
    (dict(interval=(0.6, 0.2)), "the guidance interval must satisfy 0 <= t_min <= t_max <= 1"),
    (dict(noise_scale=0.0), "noise_scale must be positive"),
    (dict(max_batch=0), "max_batch must be an integer >= 1"),
])
def test_pmf_export_refuses_bad_settings(tmp_path, kwargs, message):
    with pytest.raises(ExportError, match=message):
        jitfast.export(PMF(**PMF_CONFIG), tmp_path / "model.pt2", **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(omega=2.0), "omega is not among JiT's sampler settings"),
    (dict(interval=(0.1, 0.9)), "interval is not among JiT's sampler settings"),
    (dict(dtype="float16"), "dtype must be one of"),
    (dict(device="tpu"), "device must be 'cpu' or 'cuda'"),
    (dict(pred="z"), "pred must be one of"),
    (dict(max_batch=0), "max_batch must be an integer >= 1"),
    (dict(t_eps=0.0), "must be positive"),
])
def test_export_refuses_bad_settings(tmp_path, kwargs, message):
    with pytest.raises(ExportError, match=message):
        jitfast.export(JiT(**CONFIG), tmp_path / "model.pt2", **kwargs)


@torch.library.custom_op("jitfast_test::double", mutates_args=())
def _double(x: torch.Tensor) -> torch.Tensor:
    return 2 * x


@_double.register_fake
def _(x):
    return torch.empty_like(x)


def test_export_refuses_ops_a_package_cannot_carry():
    class Outside(torch.nn.Module):
        def forward(self, x):
            return _double(x) + 1

    program = torch.export.export(Outside(), (torch.zeros(3),))
    with pytest.raises(ExportError, match="calls ops that an AOTInductor package cannot carry: "
                                          "jitfast_test.double.default"):
        check_compiled_ops(program)
