"""jitfast runs from a source checkout without being installed: `jitfast.kernels` is the
top-level kernels/ folder (the GPU machine's pip could not install the package offline)."""
import site
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_kernels_import_from_the_checkout_without_install(tmp_path):
    # -S: no site initialisation, so no editable-install finder; torch comes via PYTHONPATH
    env = {"PYTHONPATH": f"{ROOT}:{':'.join(site.getsitepackages())}", "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-S", "-c",
                          "import jitfast.kernels as k; print(k.__file__)"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == ROOT / "kernels" / "__init__.py"
