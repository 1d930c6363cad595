"""selftransfer trainer: video -> keyframes -> HR/LR pairs -> fine-tuned CARN-M -> model bundle (.stm)."""
__version__ = "0.1.0"
