"""The Time-LLM commands (`ckptkit train`, `ckptkit predict`), shipped as a ckptkit plugin."""
