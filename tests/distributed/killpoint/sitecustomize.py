"""Loaded by every torchrun worker of the tests (this folder is on their PYTHONPATH).

``CKPTKIT_TEST_PIDS=DIR``: each worker writes its pid to ``DIR/rank-<RANK>``.
``CKPTKIT_TEST_KILL=before-rename:N`` / ``after-rename:N``: rank 0 SIGKILLs the whole
job (torchrun's process group, then itself) when ckptkit's commit reaches the rename
of its N-th ``.tmp-`` directory: inside the commit, or just after it.
"""

import os
import signal

if os.environ.get("CKPTKIT_TEST_PIDS") and "RANK" in os.environ:
    with open(
        os.path.join(os.environ["CKPTKIT_TEST_PIDS"], f"rank-{os.environ['RANK']}"), "w"
    ) as f:
        f.write(str(os.getpid()))

_SPEC = os.environ.get("CKPTKIT_TEST_KILL", "")
if _SPEC and os.environ.get("RANK") == "0":
    _WHEN, _, _N = _SPEC.partition(":")
    _real_rename = os.rename
    _seen = [0]

    def _kill_job() -> None:
        os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)  # torchrun's group
        os.kill(os.getpid(), signal.SIGKILL)

    def _rename(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
        if os.path.basename(os.fsdecode(src)).startswith(".tmp-"):
            _seen[0] += 1
            if _seen[0] == int(_N) and _WHEN == "before-rename":
                _kill_job()
            _real_rename(src, dst, *args, **kwargs)
            if _seen[0] == int(_N) and _WHEN == "after-rename":
                _kill_job()
            return
        _real_rename(src, dst, *args, **kwargs)

    os.rename = _rename
