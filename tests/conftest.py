"""Hermetic tests: no third-party plugin autoload, no network."""

from __future__ import annotations

import os

os.environ.setdefault("CKPTKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Must be set before gcsfs is imported, else every call against the emulator stalls ~60 s.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

# The real GCS emulator (session fixture), shared by every test that needs gs://.
pytest_plugins = ["tests.gcs_emulator"]
