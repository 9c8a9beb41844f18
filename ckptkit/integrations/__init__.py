"""Adapters that put ckptkit under other training loops (docs/INTEGRATIONS.md).

Each adapter imports its framework when it is imported itself, so ``import ckptkit``
never pulls in transformers, accelerate or lightning; a missing framework raises
``MissingDependencyError`` with the pip command.
"""
