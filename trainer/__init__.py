"""selftransfer trainer: video -> keyframes -> HR/LR pairs -> fine-tuned CARN-M -> model bundle (.stm)."""
from vs_selftransfer import __version__  # noqa: F401  (one version number, kept by the runtime package)
