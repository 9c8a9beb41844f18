"""The GCS emulator the soak runs ``gs://`` trials against (and kills mid-upload)."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.gcs_emulator import Emulator as _Emulator
from tests.gcs_emulator import emulator_installed

__all__ = ["Emulator", "emulator_installed"]


class Emulator(_Emulator):
    """The tests' emulator, started through ``_emulator.py`` (a server that a client
    killed mid-request cannot wedge)."""

    command = (sys.executable, str(Path(__file__).with_name("_emulator.py")))
