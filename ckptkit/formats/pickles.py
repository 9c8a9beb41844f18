"""Reading pickles without running them: a global scanner and a restricted unpickler.

Two jobs, one allowlist:

- ``scan_globals`` lists every global a pickle names (``GLOBAL``/``INST`` of protocols
  0-3, ``STACK_GLOBAL`` of 4-5, extension codes) from its opcodes alone, so ``inspect``
  can say what a file would need and a load can refuse it before anything runs.
- ``RestrictedUnpickler`` loads pickles of any protocol whose globals are on the
  allowlist: torch's own weights-only set (tensors, storages, dtypes, ``OrderedDict``...),
  the numpy pieces of ``safe.py``, and a few config classes research scripts save next to
  their weights (``CONFIG_GLOBALS``). Config classes are never imported nor called: each
  name maps to a builder of our own that turns the pickled state into plain data
  (``argparse.Namespace`` -> dict, ``pathlib`` paths -> str, OmegaConf ``DictConfig`` ->
  dict...). Calls (REDUCE/NEWOBJ/INST/OBJ) and BUILD are allowed only on allowlisted
  objects, so no other code can be reached.
"""

from __future__ import annotations

import _compat_pickle
import contextlib
import io
import pickle
import pickletools
import zipfile
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

_ZIP_MAGIC = b"PK\x03\x04"


# -- the config allowlist -------------------------------------------------------------
class _Stub:
    """What a pickled config object is built as: our own class, holding the pickled state
    until ``plain`` turns it into data. The real class is never imported."""

    # NEWOBJ makes instances without __init__; BUILD may never come.
    args: tuple[Any, ...] = ()
    state: Any = None

    def __init__(self, *args: Any) -> None:
        self.args = args
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _Namespace(_Stub):
    """``argparse.Namespace`` / ``types.SimpleNamespace``: its attribute dict."""


class _OmegaContainer(_Stub):
    """OmegaConf ``DictConfig``/``ListConfig``: its ``_content`` (a dict or list of nodes,
    or None, or a string for ``???``/an interpolation)."""


class _OmegaNode(_Stub):
    """An OmegaConf value node (``AnyNode``, ``IntegerNode``...): its ``_val``."""


class _OmegaMeta(_Stub):
    """OmegaConf's per-node metadata (types, flags): dropped."""


class _TypeName:
    """A builtin type or typing name referenced as a value (OmegaConf metadata names
    ``dict``, ``typing.Any``): kept as its dotted name, never callable."""

    def __init__(self, name: str) -> None:
        self.name = name


def _path_builder(sep: str) -> Any:
    def build(*parts: Any) -> str:
        if not all(isinstance(p, str) for p in parts):
            raise pickle.UnpicklingError("a pickled path with non-string parts")
        if not parts:
            return "."
        first = parts[0]
        anchored = first.endswith(sep) or (sep == "\\" and first.endswith(":"))
        rest = parts[1:] if anchored else parts
        return (first if anchored else "") + sep.join(rest)

    return build


def _defaultdict(*args: Any) -> dict[Any, Any]:
    # OmegaConf metadata holds a resolver cache defaultdict(dict): an empty plain dict.
    return {}


_OBJECT = _TypeName("builtins.object")


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """``copyreg._reconstructor``, which protocols 0/1 use for plain objects: only for
    our stubs on ``object``."""
    if isinstance(cls, type) and issubclass(cls, _Stub) and base is _OBJECT and state is None:
        return cls()
    raise pickle.UnpicklingError("copyreg._reconstructor is admitted only for config classes")


def _config_globals() -> dict[str, Any]:
    out: dict[str, Any] = {
        "argparse.Namespace": _Namespace,
        "types.SimpleNamespace": _Namespace,
        "omegaconf.dictconfig.DictConfig": _OmegaContainer,
        "omegaconf.listconfig.ListConfig": _OmegaContainer,
        "omegaconf.base.ContainerMetadata": _OmegaMeta,
        "omegaconf.base.Metadata": _OmegaMeta,
        "copyreg._reconstructor": _reconstructor,
        "builtins.object": _OBJECT,
        "collections.defaultdict": _defaultdict,
    }
    for node in (
        "AnyNode",
        "StringNode",
        "IntegerNode",
        "FloatNode",
        "BooleanNode",
        "BytesNode",
        "PathNode",
    ):
        out[f"omegaconf.nodes.{node}"] = _OmegaNode
    for module in ("pathlib", "pathlib._local"):  # Python 3.13 moved the classes
        for name, sep in (
            ("Path", "/"),
            ("PosixPath", "/"),
            ("PurePath", "/"),
            ("PurePosixPath", "/"),
            ("WindowsPath", "\\"),
            ("PureWindowsPath", "\\"),
        ):
            out[f"{module}.{name}"] = _path_builder(sep)
    for name in ("dict", "list", "tuple", "int", "float", "str", "bool", "bytes"):
        out[f"builtins.{name}"] = _TypeName(f"builtins.{name}")
    out["typing.Any"] = _TypeName("typing.Any")
    return out


CONFIG_GLOBALS: dict[str, Any] = _config_globals()

# What the docs' allowlist table lists (the rest of CONFIG_GLOBALS are their innards).
CONFIG_CLASSES = (
    "argparse.Namespace",
    "types.SimpleNamespace",
    "pathlib.{Path,PosixPath,WindowsPath,PurePath,PurePosixPath,PureWindowsPath}",
    "omegaconf.DictConfig",
    "omegaconf.ListConfig",
)


def tensor_globals() -> dict[str, Any]:
    """The globals torch's weights-only loader admits (its defaults, plus anything added
    with ``torch.serialization.add_safe_globals``, which includes the numpy allowlist
    while ``safe.py`` loads), by dotted name."""
    import torch
    from torch import _weights_only_unpickler as wou

    out = dict(wou._get_allowed_globals())
    for entry in torch.serialization.get_safe_globals():
        if isinstance(entry, tuple):
            out[entry[1]] = entry[0]
        else:
            out[f"{entry.__module__}.{entry.__qualname__}"] = entry
    return out


# -- scanning -------------------------------------------------------------------------
_STRING_OPS = {
    "STRING",
    "BINSTRING",
    "SHORT_BINSTRING",
    "UNICODE",
    "BINUNICODE",
    "SHORT_BINUNICODE",
    "BINUNICODE8",
}
_MARK = object()


def _py3_name(module: str, name: str) -> str:
    # What pickle's find_class does for protocol < 3 files written by Python 2 names.
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{name}"


def scan_globals(data: bytes, *, pickles: int | None = None) -> list[str]:
    """Every global the pickle(s) in ``data`` name, in order of first use, without running
    anything. ``data`` may hold several pickles back to back (torch's legacy format);
    ``pickles`` stops after that many. A ``STACK_GLOBAL`` whose names are not literal
    strings is reported as ``<computed global>``; an extension code as ``<extension N>``.
    Raises ``ValueError`` when the bytes are not a pickle."""
    found: dict[str, None] = {}
    stream = io.BytesIO(data)
    count = 0
    while stream.tell() < len(data) and (pickles is None or count < pickles):
        try:
            _scan_one(stream, found)
        except Exception as exc:  # genops raises ValueError, EOFError, IndexError...
            if count == 0:
                raise ValueError(f"not a pickle: {exc}") from exc
            break  # the raw storage bytes after a legacy file's pickles
        count += 1
    return list(found)


def _scan_one(stream: io.BytesIO, found: dict[str, None]) -> None:
    stack: list[Any] = []
    memo: dict[int, Any] = {}
    for op, arg, _pos in pickletools.genops(stream):
        name = op.name
        if name in ("GLOBAL", "INST"):
            module, qual = str(arg).split(" ", 1)
            found.setdefault(_py3_name(module, qual))
        elif name == "STACK_GLOBAL":
            qual, module = (stack.pop() if stack else None), (stack.pop() if stack else None)
            ok = isinstance(module, str) and isinstance(qual, str)
            found.setdefault(f"{module}.{qual}" if ok else "<computed global>")
            stack.append(None)
            continue
        elif name in ("EXT1", "EXT2", "EXT4"):
            found.setdefault(f"<extension {arg}>")
        if name in _STRING_OPS:
            stack.append(arg.decode("latin-1") if isinstance(arg, bytes) else arg)
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1] if stack else None
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1] if stack else None
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo.get(arg))
        else:
            _simulate(op, stack)


def _simulate(op: Any, stack: list[Any]) -> None:
    """Apply an opcode's stack effect with unknown values (pickletools documents each)."""
    before, after = op.stack_before, op.stack_after
    if pickletools.stackslice in before:
        while stack and stack.pop() is not _MARK:
            pass
        extra = before.index(pickletools.markobject)
        del stack[len(stack) - min(extra, len(stack)) :]
    else:
        del stack[len(stack) - min(len(before), len(stack)) :]
    stack.extend(_MARK if a is pickletools.markobject else None for a in after)


# What a torch file is read from: its bytes, a local path, or an open binary file (a
# checkpoint member read through its storage's bounded calls: storage/confined.py).
Source = bytes | str | BinaryIO


@contextlib.contextmanager
def opened(data: Source) -> Iterator[BinaryIO]:
    """``data`` as a binary file positioned at its start (a path is opened and closed;
    a file that was passed in stays open, for the caller to close)."""
    if isinstance(data, str):
        with open(data, "rb") as f:
            yield f
    elif isinstance(data, (bytes, bytearray, memoryview)):
        yield io.BytesIO(data)
    else:
        data.seek(0)
        yield data


def torch_pickle(data: Source) -> tuple[bytes, int | None]:
    """The pickle bytes of a ``torch.save`` file and how many pickles to scan: a zip's
    ``data.pkl``, or the legacy format's leading pickles (magic number, protocol, system
    info, the object). Raises ``ValueError`` when it is neither."""
    with opened(data) as f:
        head = f.read(4)
        f.seek(0)
        if head == _ZIP_MAGIC:
            try:
                with zipfile.ZipFile(f) as zf:
                    pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
                    if len(pkl) != 1:
                        raise ValueError("no single data.pkl in the zip")
                    return zf.read(pkl[0]), 1
            except (zipfile.BadZipFile, OSError, EOFError, KeyError) as exc:
                raise ValueError(f"unreadable zip: {exc}") from exc
        # The pickles lead the file; the raw storages follow. The object pickle is small
        # next to them, but read at most 64 MiB so a huge file is not slurped.
        return f.read(64 << 20), 4


def unlisted(names: Iterable[str], allowed: Iterable[str]) -> list[str]:
    """``names`` that are on neither list, in order."""
    ok = set(allowed)
    return [n for n in names if n not in ok]


# -- loading --------------------------------------------------------------------------
class Refused(pickle.UnpicklingError):
    """A global or an operation outside the allowlist."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


_DISPATCH = pickle._Unpickler.dispatch  # type: ignore[attr-defined]


class RestrictedUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """A pure-Python unpickler that resolves globals only from ``allowed`` (dotted name ->
    object, never imported) and calls or BUILDs only those objects and their results."""

    dispatch = dict(_DISPATCH)

    def __init__(self, file: Any, *, allowed: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self._allowed = allowed
        self._ids = {id(v) for v in allowed.values()}

    def find_class(self, module: str, name: str) -> Any:
        full = _py3_name(module, name) if self.proto < 3 else f"{module}.{name}"
        if full not in self._allowed:
            raise Refused(full)
        return self._allowed[full]

    def _check(self, obj: Any, what: str) -> None:
        if id(obj) not in self._ids:
            raise Refused(f"{what} on {type(obj).__name__}")

    def load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        self._check(func, "a call")
        self.stack[-1] = func(*args)

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args, {}))

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args, kwargs))

    def _new(self, cls: Any, args: Any, kwargs: Any) -> Any:
        import torch

        self._check(cls, "object creation")
        if not isinstance(cls, type):
            raise Refused(f"object creation on {type(cls).__name__}")
        if cls is torch.nn.Parameter:  # as torch's weights-only unpickler does
            return torch.nn.Parameter(*args, **kwargs)
        return cls.__new__(cls, *args, **kwargs)

    def _instantiate(self, klass: Any, args: Any) -> None:  # INST and OBJ (protocols 0/1)
        self._check(klass, "object creation")
        self.append(klass(*args))

    def load_build(self) -> None:
        import torch

        state = self.stack.pop()
        inst = self.stack[-1]
        kind = type(inst)
        if isinstance(inst, _Stub) or kind is torch.nn.Parameter:
            inst.__setstate__(state)
        elif kind is torch.Tensor:
            inst.set_(*state)  # legacy tensors, as torch's weights-only unpickler does
        elif kind.__name__ == "OrderedDict" and kind.__module__ == "collections":
            inst.__dict__.update(state)
        elif id(kind) in self._ids and hasattr(inst, "__setstate__"):
            inst.__setstate__(state)  # numpy arrays and dtypes
        else:
            raise Refused(f"setting the state of a {kind.__module__}.{kind.__qualname__}")

    def load_ext1(self) -> None:
        raise Refused(f"<extension {self.read(1)[0]}>")

    load_ext2 = load_ext4 = load_ext1

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.EXT1[0]] = load_ext1
    dispatch[pickle.EXT2[0]] = load_ext1
    dispatch[pickle.EXT4[0]] = load_ext1


def pickle_module(allowed: dict[str, Any]) -> Any:
    """A stand-in for the ``pickle`` module that ``torch.load(pickle_module=...)`` uses:
    every unpickling it does goes through ``RestrictedUnpickler`` with ``allowed``."""

    class Unpickler(RestrictedUnpickler):
        def __init__(self, file: Any, **kwargs: Any) -> None:
            super().__init__(file, allowed=allowed, **kwargs)

    class Module:
        UnpicklingError = pickle.UnpicklingError

        @staticmethod
        def load(file: Any, **kwargs: Any) -> Any:
            return Unpickler(file, **kwargs).load()

    Module.Unpickler = Unpickler  # type: ignore[attr-defined]
    Module.__name__ = "ckptkit_restricted_pickle"
    return Module


def restricted_loads(data: bytes, allowed: dict[str, Any]) -> Any:
    """Unpickle plain ``data`` (not a torch file) through ``RestrictedUnpickler``."""
    return RestrictedUnpickler(io.BytesIO(data), allowed=allowed).load()


# -- back to plain data ---------------------------------------------------------------
def plain(obj: Any) -> Any:
    """``obj`` with every config stub replaced by plain data (dicts, lists, strings).
    Containers are rebuilt only where something changed; shared and cyclic references
    are converted once."""
    return _Plain().convert(obj)


class _Plain:
    def __init__(self) -> None:
        self.done: dict[int, Any] = {}

    def convert(self, obj: Any) -> Any:
        key = id(obj)
        if key in self.done:
            return self.done[key]
        if isinstance(obj, _TypeName):
            return obj.name
        if isinstance(obj, _OmegaMeta):
            return None
        if isinstance(obj, _OmegaNode):
            return self.convert(_state_dict(obj).get("_val"))
        if isinstance(obj, _OmegaContainer):
            return self.convert(_state_dict(obj).get("_content"))
        if isinstance(obj, _Namespace):
            obj = _state_dict(obj)
        if isinstance(obj, dict):
            out: dict[Any, Any] = type(obj)() if type(obj) is not dict else {}
            self.done[key] = out
            items = {self._key(k): self.convert(v) for k, v in obj.items()}
            unchanged = all(k in items and items[k] is v for k, v in obj.items())
            if unchanged and (type(obj) is dict or type(obj).__name__ == "OrderedDict"):
                self.done[key] = obj
                return obj
            out.update(items)
            return out
        if isinstance(obj, list):
            lst: list[Any] = []
            self.done[key] = lst
            lst.extend(self.convert(v) for v in obj)
            if all(a is b for a, b in zip(lst, obj, strict=True)):
                self.done[key] = obj
                return obj
            return lst
        if type(obj) is tuple:
            tup = tuple(self.convert(v) for v in obj)
            result = obj if all(a is b for a, b in zip(tup, obj, strict=True)) else tup
            self.done[key] = result
            return result
        return obj

    def _key(self, key: Any) -> Any:
        if not isinstance(key, (_Stub, _TypeName)):
            return key
        plain = self.convert(key)  # a config object used as a key: its text if unhashable
        try:
            hash(plain)
        except TypeError:
            return repr(plain)
        return plain


def _state_dict(stub: _Stub) -> dict[str, Any]:
    state = stub.state
    if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
        merged: dict[str, Any] = {}
        for part in state:
            if isinstance(part, dict):
                merged.update(part)
        return merged
    return dict(state) if isinstance(state, dict) else {}
