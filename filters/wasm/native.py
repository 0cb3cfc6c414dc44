"""The fast boundary: calls into and out of wasm through wasmtime's C API "unchecked" entry
points, and guest memory through its raw buffer.

wasmtime-py's public `Func.__call__` re-reads the function type and boxes every value in
`Val`; its host-function trampoline does the same on the way out. The C API's
`wasmtime_func_call_unchecked` / `wasmtime_linker_define_func_unchecked` take a flat array
of raw 16-byte value slots instead. They are reached through `wasmtime._bindings` and
`_ffi`, which are private and unversioned: this module is the only one that touches them,
`available()` says whether every symbol it needs is there, and the `Public*` classes at the
end do the same jobs through the public API when it is not (or when a filter asks).

Every raw read and write goes through one memoryview spanning the process's address space
(`_WORLD`), so a value slot or guest byte range is reached by address with struct, with no
ctypes object or foreign call per access. Addresses come only from wasmtime (slot arrays,
a memory's base) and guest offsets are bounds-checked against the memory's size first.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable
from typing import Any

import wasmtime

_c = ctypes
try:  # private API: see the module docstring
    from wasmtime import _bindings as _bindings_mod
    from wasmtime import _ffi as _ffi_mod

    _ffi: Any = _ffi_mod
    _bindings: Any = _bindings_mod
    _dll = _ffi.dll
    # Prototypes over plain addresses: ints convert to c_void_p without building pointers.
    # No argtypes: the callers pass ctypes objects built once, which go through as they are.
    _CALL_RAW = _c.CFUNCTYPE(_c.c_void_p)(("wasmtime_func_call_unchecked", _dll))
    _DEFINE = _bindings._wasmtime_linker_define_func_unchecked
    _TRAP_NEW = _bindings._wasmtime_trap_new
    _SET_DEADLINE = _c.CFUNCTYPE(None, _c.c_void_p, _c.c_uint64)(
        ("wasmtime_context_set_epoch_deadline", _dll)
    )
    _CALLBACK_T = _c.CFUNCTYPE(_c.c_size_t, _c.c_void_p, _c.c_void_p, _c.c_void_p, _c.c_size_t)
    _FINALIZER_T = _c.CFUNCTYPE(None, _c.c_void_p)
    _MEM_DATA = _c.CFUNCTYPE(_c.c_void_p, _c.c_void_p, _c.c_void_p)(("wasmtime_memory_data", _dll))
    _MEM_SIZE = _c.CFUNCTYPE(_c.c_size_t, _c.c_void_p, _c.c_void_p)(
        ("wasmtime_memory_data_size", _dll)
    )
    _ERROR_T = _ffi.wasmtime_error_t
    _TRAP_T = _ffi.wasm_trap_t
    # The whole address space as bytes (the top page is left out: the size must fit
    # ssize_t). Nothing is read through it but addresses wasmtime handed out.
    _WORLD = memoryview((_c.c_ubyte * ((1 << 63) - (1 << 16))).from_address(0)).cast("B")
    _AVAILABLE = True
except (ImportError, AttributeError, OverflowError, TypeError):  # pragma: no cover
    _AVAILABLE = False  # another wasmtime-py layout, or not a 64-bit process
    _WORLD = memoryview(b"")

_SLOT = 16  # a raw value slot can hold a v128; i32/i64 sit little-endian at offset 0
_U32 = struct.Struct("<I")
_I64 = struct.Struct("<q")
_MASK = 0xFFFFFFFF


def available() -> bool:
    return _AVAILABLE


class WasmCallError(Exception):
    """A callback trapped (or a host function raised); the instance must be thrown away."""


class HostError(Exception):
    """Raised by a host function to answer the guest with `code` instead of trapping."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


HostFn = Callable[..., int | None]
RaisedBox = list[BaseException]  # what a host function raised, for the export's caller


def _address(obj: Any) -> int:
    addr = _c.cast(obj, _c.c_void_p).value
    assert addr is not None
    return addr


ExportFn = Callable[..., int]


def export_caller(
    store: wasmtime.Store,
    func: wasmtime.Func,
    name: str,
    params: int,
    arity: int,
    raised: RaisedBox,
    exact: bool = True,
) -> ExportFn:
    """A function calling one export with `params` i32 arguments; returns its result (or,
    for an export with none, the first slot) as a signed i32.

    Every foreign-call argument is a ctypes object built here once (ctypes passes those
    without converting a Python int per call), and arguments and the result travel
    through a memoryview over the value slots. The function is specialised for the usual
    arities, since a Python-level loop or struct format per call is what this saves.
    Not `exact`: callers may pass another number of arguments than the export takes (a
    module declared a callback its own way); the export gets the first `params` of them,
    and zeros for any missing.
    """
    slots = (_c.c_ubyte * (_SLOT * max(arity, 1)))()
    buf = _c.addressof(slots)
    view = _WORLD[buf : buf + _SLOT * max(arity, 1)].cast("i")  # slot k's i32: view[4 * k]
    trap = _c.c_void_p()
    trap_at = _c.addressof(trap)
    trap_view = _WORLD[trap_at : trap_at + 8].cast("Q")
    argv = (
        _c.c_void_p(_address(store._context())),
        _c.c_void_p(_c.addressof(func._func)),
        _c.c_void_p(buf),
        _c.c_size_t(max(arity, 1)),
        _c.c_void_p(trap_at),
    )
    call_raw = _CALL_RAW
    keep = (store, func, slots, trap, argv)

    def fail(error: int | None) -> None:
        failed = raised[0] if raised else None
        raised.clear()
        if error:
            message = str(wasmtime.WasmtimeError._from_ptr(_c.cast(error, _c.POINTER(_ERROR_T))))
        else:
            pending = _c.cast(trap_view[0], _c.POINTER(_TRAP_T))
            trap_view[0] = 0
            message = str(wasmtime.Trap._from_ptr(pending))
        if failed is not None:
            message = f"{message}: host function raised {failed!r}"
        raise WasmCallError(f"{name}: {message}") from failed

    call: ExportFn
    if not exact or params > 3:

        def call(*args: int) -> int:
            for i in range(params):
                view[4 * i] = args[i] if i < len(args) else 0
            error = call_raw(*argv)
            if error or trap_view[0]:
                fail(error)
            return view[0]

    elif params == 0:

        def call() -> int:
            error = call_raw(*argv)
            if error or trap_view[0]:
                fail(error)
            return view[0]

    elif params == 1:

        def call(a: int) -> int:
            view[0] = a
            error = call_raw(*argv)
            if error or trap_view[0]:
                fail(error)
            return view[0]

    elif params == 2:

        def call(a: int, b: int) -> int:
            view[0] = a
            view[4] = b
            error = call_raw(*argv)
            if error or trap_view[0]:
                fail(error)
            return view[0]

    else:

        def call(a: int, b: int, c: int) -> int:
            view[0] = a
            view[4] = b
            view[8] = c
            error = call_raw(*argv)
            if error or trap_view[0]:
                fail(error)
            return view[0]

    call.__name__ = call.__qualname__ = name
    setattr(call, "keep", keep)  # noqa: B010  # what the raw addresses point into
    return call


def define_host_func(
    linker: wasmtime.Linker,
    module: str,
    name: str,
    ty: wasmtime.FuncType,
    fn: HostFn,
    raised: RaisedBox,
    keep: list[Any],
) -> None:
    """Define `module.name` on the linker as `fn(*params) -> int | None`.

    i32 parameters arrive unsigned (they are mostly guest addresses), i64 signed. A
    HostError answers its code; any other exception becomes a trap, kept in `raised`.
    """
    params = [str(p) for p in ty.params]
    unpack = struct.Struct("<" + "".join("q8x" if p == "i64" else "I12x" for p in params))
    read_args = unpack.unpack_from
    nresults = len(ty.results)
    result = _U32 if nresults and str(ty.results[0]) == "i32" else _I64
    write_result = result.pack_into
    world = _WORLD

    def trampoline(_env: Any, _caller: Any, args: int, _n: int) -> int:
        try:
            value = fn(*read_args(world, args)) if params else fn()
            if nresults:
                write_result(world, args, (value or 0) & _MASK)
            return 0
        except HostError as answer:
            if nresults:
                write_result(world, args, answer.code)
            return 0
        except BaseException as exc:  # a trap: the export's caller raises WasmCallError
            raised.append(exc)
            text = f"host function {module}.{name} failed".encode()
            return _address(_TRAP_NEW(text, len(text)))

    callback = _CALLBACK_T(trampoline)
    keep.append(callback)
    typed = _c.cast(callback, _bindings.wasmtime_func_unchecked_callback_t)
    keep.append(typed)
    mod, nam = module.encode(), name.encode()
    error = _DEFINE(
        linker.ptr(), mod, len(mod), nam, len(nam), ty.ptr(), typed, None, _FINALIZER_T()
    )
    if error:
        raise wasmtime.WasmtimeError._from_ptr(error)


class RawMemory:
    """A guest memory as (view, base, size): guest offset p is view[base + p].

    The engine is configured so memories never move (memory_may_move off), so the base is
    fixed; memories only grow, so `size` is a lower bound and refresh() is needed only when
    an access falls past it.
    """

    __slots__ = ("_ctx", "_keep", "_mem", "base", "size", "view")

    def __init__(self, store: wasmtime.Store, memory: wasmtime.Memory) -> None:
        self._keep = (store, memory)
        self._ctx = _address(store._context())
        self._mem = _c.addressof(memory._memory)
        self.view = _WORLD
        self.base = _MEM_DATA(self._ctx, self._mem) or 0
        self.size = 0
        self.refresh()

    def refresh(self) -> int:
        self.size = _MEM_SIZE(self._ctx, self._mem)
        return self.size


def epoch_incrementer(engine: wasmtime.Engine) -> Callable[[], None]:
    """`engine.increment_epoch` that keeps the GIL: an atomic add needs no other thread to
    run meanwhile, and a ticker that let the GIL go mid-tick would have to win it back
    from the event loop (two more thread switches per tick)."""
    if not _AVAILABLE:
        return engine.increment_epoch
    increment = _c.PYFUNCTYPE(None, _c.c_void_p)(("wasmtime_engine_increment_epoch", _dll))
    address = _c.c_void_p(_address(engine.ptr()))

    def increment_epoch() -> None:
        increment(address)

    return increment_epoch


def epoch_deadline_setter(store: wasmtime.Store, native: bool) -> Callable[[int], None]:
    """`set_epoch_deadline(ticks)` for this store (one foreign call on the native path)."""
    if not (native and _AVAILABLE):
        return store.set_epoch_deadline
    ctx = _address(store._context())

    def set_deadline(ticks: int) -> None:
        _SET_DEADLINE(ctx, ticks)

    return set_deadline


# -- the public-API equivalents ------------------------------------------------------------


class PublicExportCaller:
    __slots__ = ("_func", "_raised", "_store", "name")

    def __init__(
        self, store: wasmtime.Store, func: wasmtime.Func, name: str, arity: int, raised: RaisedBox
    ) -> None:
        self.name = name
        self._store = store
        self._func = func
        self._raised = raised

    def __call__(self, *args: int) -> int:
        try:
            result = self._func(self._store, *args)
        except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
            raised = self._raised[0] if self._raised else None
            self._raised.clear()
            raise WasmCallError(f"{self.name}: {exc}") from raised
        except Exception as exc:  # wasmtime-py re-raises a host function's exception here
            self._raised.clear()
            raise WasmCallError(f"{self.name}: host function raised {exc!r}") from exc
        return int(result or 0)


def define_public_host_func(
    linker: wasmtime.Linker,
    module: str,
    name: str,
    ty: wasmtime.FuncType,
    fn: HostFn,
    raised: RaisedBox,
    keep: list[Any],
) -> None:
    is_i32 = [str(p) == "i32" for p in ty.params]
    nresults = len(ty.results)
    result_i32 = nresults > 0 and str(ty.results[0]) == "i32"

    def call(*args: int) -> int | None:
        unsigned = [a & _MASK if i32 else a for a, i32 in zip(args, is_i32, strict=True)]
        try:
            value = fn(*unsigned)
        except HostError as answer:
            value = answer.code
        except BaseException as exc:
            raised.append(exc)
            raise
        if not nresults:
            return None
        value = value or 0
        return value - (1 << 32) if result_i32 and value >= 1 << 31 else value

    linker.define_func(module, name, ty, call)


class PublicMemory:
    """RawMemory through the public Memory.data_ptr / data_len."""

    __slots__ = ("_memory", "_store", "base", "size", "view")

    def __init__(self, store: wasmtime.Store, memory: wasmtime.Memory) -> None:
        self._store = store
        self._memory = memory
        self.base = 0
        self.size = -1
        self.view = memoryview(b"")
        self.refresh()

    def refresh(self) -> int:
        size = self._memory.data_len(self._store)
        if size != self.size:
            base = _c.addressof(self._memory.data_ptr(self._store).contents)
            self.size = size
            self.view = memoryview((_c.c_ubyte * size).from_address(base)).cast("B")
        return self.size
