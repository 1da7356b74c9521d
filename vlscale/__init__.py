"""vlscale: parameter-efficient vision-and-language training (VL-Adapter) scaled with DeepSpeed."""

__version__ = "0.1.0"
