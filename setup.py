from setuptools import find_packages, setup

setup(
    name="vlscale",
    version="0.1.0",
    description="Parameter-efficient vision-and-language training (VL-Adapter) scaled with DeepSpeed",
    python_requires=">=3.10",
    packages=find_packages(include=["vlscale", "vlscale.*"]),
    package_data={"vlscale": ["configs/**/*.yaml", "configs/*.yaml", "registry/**/*.json",
                              "registry/*.json", "assets/**/*", "assets/*"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "transformers>=4.57,<6",
        "open_clip_torch>=3.1",  # text_cfg.eos_id (mini-clip-rn.json), create_model(load_weights=)
        "deepspeed>=0.17.1",  # aio.intra_op_parallelism (zero3_nvme.json), runtime.precision_config
        "safetensors>=0.4.3",  # transformers 4.57 needs it
        "sentencepiece>=0.2",
        "datasets>=4.0",  # reads the List feature of datasets saved by current releases
        "pyyaml>=6",
        "tqdm>=4.66",
        "numpy>=1.26",
        "pillow>=10",
        "tensorboard>=2.15",
        "accelerate>=1.1",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.3"],
        "metrics": ["pycocoevalcap>=1.2"],
        "plot": ["matplotlib>=3.8"],
        "kernels": ["triton>=3.0"],
    },
)
