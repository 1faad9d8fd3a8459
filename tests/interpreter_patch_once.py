"""Triton's interpreter, minus a repeated cost: it patches ``triton.language`` for a kernel's globals when the
launch starts (``GridExecutor.__call__``), and then again on every call of a ``@triton.jit`` helper inside the
kernel (``InterpretedFunction.__call__``), in every program of the grid and every iteration of the vocabulary
loop: each time ``inspect.getmembers`` over ``tl``, ``tl.tensor`` and ``tl.math``, about 0.8 ms, 40% of an
interpreted launch of fastdpo's kernels (profiled on Triton 3.9.0). The patches are on the module objects
themselves, so a helper that sees no language module the launch has not already patched gets nothing from it:
``install()`` skips those repeats, and only those; every other call goes to Triton's own ``_patch_lang``.
Results are unchanged (the same patched functions run); only the tests use the interpreter.

If this Triton's interpreter is not laid out as expected (``_patch_lang``, ``_LangPatchScope``,
``GridExecutor``), ``install()`` does nothing."""

import contextlib

import triton.language as tl

_state = {"launch": False, "patched": frozenset(), "skipped": 0, "off": False}


def _langs(fn):
    return frozenset(id(v) for v in fn.__globals__.values() if v is tl or v is tl.core)


def install() -> bool:
    try:
        from triton.runtime import interpreter as interp
        original_patch, scope_type, executor = interp._patch_lang, interp._LangPatchScope, interp.GridExecutor
    except (ImportError, AttributeError):
        return False
    if getattr(original_patch, "_patch_once", False):
        return True

    def patch_lang(fn):
        langs = _langs(fn)
        # a helper that sees no language module at all goes to Triton, whose assertion says so
        if _state["launch"] and langs and langs <= _state["patched"] and not _state["off"]:
            _state["skipped"] += 1
            return scope_type()  # already in place for this launch; nothing to restore
        scope = original_patch(fn)
        if _state["launch"]:
            _state["patched"] = _state["patched"] | langs
        return scope

    original_call = executor.__call__

    def call(self, *args, **kwargs):
        _state["launch"], _state["patched"] = True, frozenset()
        try:
            return original_call(self, *args, **kwargs)
        finally:
            _state["launch"], _state["patched"] = False, frozenset()

    patch_lang._patch_once = True
    interp._patch_lang = patch_lang
    executor.__call__ = call
    return True


def skipped() -> int:
    """How many repeats have been skipped so far (tests/test_interpreter_patch_once.py)."""
    return _state["skipped"]


@contextlib.contextmanager
def disabled():
    """Triton's interpreter as shipped, for the test that holds the two to the same bits."""
    _state["off"] = True
    try:
        yield
    finally:
        _state["off"] = False
