from setuptools import find_packages, setup

setup(
    name="mnc_d2",
    version="0.1.0",
    description="Multi-task Network Cascades (Dai, He, Sun, CVPR 2016) for Detectron2",
    packages=find_packages(include=["mnc_d2", "mnc_d2.*"]),
    python_requires=">=3.9",
    license="Apache-2.0",
    # detectron2 is NOT listed: it is not on PyPI under that name (see scripts/install.sh).
    install_requires=["torch", "torchvision", "numpy", "pycocotools", "tqdm", "opencv-python-headless", "tifffile"],
    extras_require={"test": ["pytest", "hypothesis"], "export": ["onnx", "onnxruntime"]},
)
