from setuptools import find_packages, setup

setup(
    name="jitfast",
    version="0.1.0",
    description="Fast, faithful training and sampling of JiT pixel-space diffusion transformers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["jitfast", "jitfast.*"]) + ["jitfast.kernels"],
    package_dir={"jitfast": "jitfast", "jitfast.kernels": "kernels"},
    # the built-in Fashion-MNIST subset (jitfast/datasets/fashion-mnist/README.md)
    package_data={"jitfast": ["datasets/*/*"]},
    install_requires=["torch>=2.5", "numpy", "pillow", "safetensors", "tqdm"],
    extras_require={
        # triton as on the GPU image; its CPU interpreter breaks with numpy >= 2.4
        "dev": ["pytest", "pytest-benchmark", "triton==3.6.0", "numpy<2.4", "huggingface_hub",
                "matplotlib"],
        "flash": ["flash-attn"],
        "profile": ["nvtx"],
        "eval": ["torch-fidelity"],
        "hub": ["huggingface_hub"],  # JiT.from_pretrained of a Hub repo id
        "plot": ["matplotlib"],  # the figures of jitfast.experiments.samplers and .transfer
    },
)
