from setuptools import setup

setup(
    name="jitfast",
    version="0.1.0",
    description="Fast, faithful training and sampling of JiT pixel-space diffusion transformers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["jitfast", "jitfast.kernels"],
    package_dir={"jitfast": "jitfast", "jitfast.kernels": "kernels"},
    install_requires=["torch>=2.5", "numpy"],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "triton"],
        "flash": ["flash-attn"],
        "profile": ["nvtx"],
    },
)
