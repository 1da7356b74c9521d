"""The DeepSpeed training engine: config derivation, the training run, checkpoints, evaluation.

    from vlscale.engine import build_deepspeed_config, load_adapter, save_adapter, evaluate

* :mod:`vlscale.engine.deepspeed_config` - ``build_deepspeed_config(ds_file_or_dict, cfg, world_size)``
* :mod:`vlscale.engine.distributed` - process-group set-up for every launcher, watchdog, stop signals
* :mod:`vlscale.engine.trainer` - ``setup_run`` / ``train`` / ``finish`` (what launchers/train.py runs)
* :mod:`vlscale.engine.checkpoint` - ``adapter/`` (safetensors) and resumable ``checkpoints/``
* :mod:`vlscale.engine.evaluation` - batched generation + scoring, shared by training and evaluate.py

Importing this package does not import deepspeed (its CPU accelerator must be chosen first, see
:func:`vlscale.engine.distributed.select_accelerator`).
"""

from vlscale.engine.checkpoint import CheckpointError, load_adapter, read_adapter_config, save_adapter
from vlscale.engine.deepspeed_config import DeepSpeedConfigError, build_deepspeed_config
from vlscale.engine.evaluation import evaluate

__all__ = ["build_deepspeed_config", "DeepSpeedConfigError", "load_adapter", "save_adapter", "read_adapter_config",
           "CheckpointError", "evaluate"]
