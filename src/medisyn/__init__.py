"""MediSyn: text-guided SDXL synthesis of medical images, as an MLOps platform."""

import os

# Nothing downloads at run time: set before any Hugging Face library is imported (ENVIRONMENT.md:
# set later, the hub client still retries for ~30 s).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

__version__ = "0.1.0"
