"""ckptkit tests (a package, so that tests.gcs_emulator can be imported as a plugin)."""
