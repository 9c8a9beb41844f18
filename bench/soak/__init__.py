"""The reliability soak: ``python -m bench.soak`` (see ``__main__``) writes docs/RELIABILITY.md.

``worker`` is the training process that is killed, ``trials`` aims the kills and checks
the run after each, ``cases`` holds the fault and hostile-input cases, ``report`` writes
the table.
"""
