"""jitfast-sample (CMakeLists.txt, native/) against Denoiser.generate, and its refusals.

One tiny model is exported once (through ``python -m jitfast.export``, from a checkpoint whose
training args set noise_scale and t_eps) and the program is built once per test session. The
grid of 10 steps with guidance on (0.3, 0.7) puts t = 0.7 on the boundary, where comparing in
float32 (as Python does) and in float64 disagree, and leaves points outside the interval; the
grid of 12 steps has a point where 1 - t < t_eps. A wrong interval test, a missing unconditional
pass, a Heun last step or a wrong noise_scale or t_eps move the images by far more than the 1e-4
tolerance.
"""
import shutil
import subprocess
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import jitfast
from jitfast import EMA, Denoiser, JiT, save_checkpoint
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


def lively_net():
    """Random weights everywhere, adaLN and the final layer included (zero at init): images that
    depend on the noise, the labels and the guidance."""
    torch.manual_seed(0)
    net = JiT(**CONFIG, backend="torch")
    for p in net.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.2)
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
    program = build(root / "build")
    net = lively_net()
    ckpt = root / "checkpoint.pth"
    save_checkpoint(ckpt, Denoiser(net), EMA(Denoiser(net)),
                    args={"noise_scale": NOISE_SCALE, "t_eps": T_EPS})
    package = root / "model.pt2"
    export_main(["--ckpt", str(ckpt), "--out", str(package), "--max-batch", str(MAX_BATCH)])
    package_e = root / "model_e.pt2"
    jitfast.export(net, package_e, noise_scale=NOISE_SCALE, t_eps=T_EPS, pred="e",
                   max_batch=MAX_BATCH)
    return types.SimpleNamespace(program=program, net=net, package=str(package),
                                 package_e=str(package_e))


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
        "jitfast.format": "1", "jitfast.input_size": "16", "jitfast.in_channels": "3",
        "jitfast.num_classes": "5", "jitfast.noise_scale": "1.5", "jitfast.t_eps": "0.1",
        "jitfast.pred": "x", "jitfast.device": "cpu", "jitfast.dtype": "float32",
        "jitfast.max_batch": "4"}


def save(path, array):
    np.save(path, array)
    return path


def write(path, data):
    path.write_bytes(data)
    return path


def truncated(native, path):
    return write(path, Path(native.package).read_bytes()[:5000])


def other_format(native, path):
    """The package with its metadata claiming format 2."""
    with zipfile.ZipFile(native.package) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("_metadata.json"):
                data = data.replace(b'"jitfast.format": "1"', b'"jitfast.format": "2"')
            dst.writestr(info, data)
    return path


BAD = {  # name: (arguments added to a good command, made from (native, tmp_path); message)
    "missing package": (lambda n, d: ["--package", d / "none.pt2"],
                        "cannot open the package"),
    "corrupt package": (lambda n, d: ["--package", write(d / "bad.pt2", b"not a zip" * 99)],
                        "is not a readable AOTInductor package"),
    "truncated package": (lambda n, d: ["--package", truncated(n, d / "cut.pt2")],
                          "is not a readable AOTInductor package"),
    "other format": (lambda n, d: ["--package", other_format(n, d / "v2.pt2")],
                     "has package format 2, this jitfast-sample reads format 1"),
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


@pytest.mark.parametrize("kwargs, message", [
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
