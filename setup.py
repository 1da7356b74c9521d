from setuptools import find_packages, setup

setup(
    name="vlscale",
    version="0.1.0",
    description="Parameter-efficient vision-and-language training (VL-Adapter) scaled with DeepSpeed",
    # Verified on 3.11, 3.12, 3.13 (README.md, "Install"); 3.10 cannot install transformers >= 5.21.
    python_requires=">=3.11",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
    ],
    # ds_configs/ (the DeepSpeed files the launchers and presets name) ships inside the package as vlscale/ds_configs/,
    # where a wheel install finds it (vlscale.engine.deepspeed_config.resolve_ds_file).
    packages=find_packages(include=["vlscale", "vlscale.*"]) + ["vlscale.ds_configs"],
    package_dir={"vlscale.ds_configs": "ds_configs"},
    package_data={"vlscale": ["configs/**/*.yaml", "configs/*.yaml", "registry/**/*.json",
                              "registry/*.json", "assets/**/*", "assets/*"],
                  "vlscale.ds_configs": ["*.json"]},
    include_package_data=True,
    install_requires=[
        # Each lower bound is the release the unit tests passed with on 2026-12-04 (README.md, "Install").
        "torch>=2.14.1",  # the torch checked; older releases were not run
        "transformers>=5.23,<6",  # T5 SDPA (5.15); blocks' checkpointed recompute inside ZeRO-3 hooks (5.23)
        "open_clip_torch>=3.1",  # text_cfg.eos_id (mini-clip-rn.json), create_model(load_weights=)
        "deepspeed>=0.19.8",  # < 0.19.8 reads top-level keys vlscale refuses (elasticity, ...)
        "safetensors>=0.8",  # transformers 5.23 needs it
        "sentencepiece>=0.2",
        "datasets>=4.5",  # refuses a saved DatasetDict without data files (4.0-4.4 load it)
        "pyyaml>=6",
        "tqdm>=4.70",  # the release checked (datasets needs >= 4.66.3)
        "numpy>=1.26",  # checked with pyarrow 21 (pyarrow 26 imports only with numpy 2)
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
