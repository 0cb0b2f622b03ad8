"""The main script's module in the workers, and which of its objects travel by reference.

Workers run with the parent's main module imported under the name
``multiprocessing`` gives it, ``__mp_main__`` (as its spawn and forkserver
start methods do), so that a function of the main script that a task runs
is *that module's* function: it sees the globals an initializer set, keeps
state between the tasks of one worker, and reads the module's data without
a copy in every task. Three steps:

1. The parent decides what the fork server imports (`main_to_import`, as
   a server starts): a module run with ``python -m pkg.mod`` by its name; a
   script run with ``python script.py`` by its path; nothing for an
   interactive session, ``python -c``, standard input, or a package's
   ``__main__`` (``python -m pkg``, ``python -m pytest``). It makes
   ``sys.modules['__mp_main__']`` an alias of its ``__main__``, so that
   what the workers send back (an instance, an exception of the script's
   classes) loads as the parent's ``__main__`` objects.
2. The fork server imports it once, before it forks any worker
   (`import_main`): a module named ``__mp_main__``, registered as
   ``__mp_main__`` and ``__main__``, whose code runs with that
   ``__name__`` (so ``if __name__ == '__main__':`` blocks do not run) and
   the parent's ``sys.argv``. It reports what the module defines, or how
   its import failed (`MainReport`); a failed import leaves the workers
   without a main module (``_process.py`` warns once, and every object
   travels by value). If the module loaded native thread pools (numpy's
   BLAS), threadpoolctl finds them then, once for every worker
   (``_native_threads.prepare``).
3. The parent pickles a function or class of ``__main__`` by reference
   (``__main__ name``: the worker finds it in its ``__main__``, the
   imported module) only where the report shows the server has the same
   one, and has every global of ``__main__`` that its code reads
   (`by_reference`); else by value, as cloudpickle does: with the globals
   it uses (a function that reads what the script sets only under its
   ``if __name__ == '__main__':`` guard works as before). Lambdas,
   closures and nested functions always travel by value.

The parent-side steps and the server's import live here; the fork server
imports this module only when it has a main module to import.
"""

from __future__ import annotations

import os
import sys
import traceback
import types
import warnings
import weakref
from collections.abc import Iterable, Iterator

import cloudpickle

from . import _native_threads
from ._protocol import MainReport, MainToImport

__all__ = ["alias_main", "by_reference", "import_main", "main_to_import", "warn_import_failed"]

#: The name the workers' main module has (``multiprocessing``'s).
MP_MAIN = "__mp_main__"


# -- the parent: what the fork server imports -----------------------------------


def main_to_import() -> MainToImport | None:
    """What the fork server imports as the workers' main module; None: nothing
    (an interactive session, ``python -c``, standard input, a package's
    ``__main__``), and ``__main__``'s objects travel by value."""
    main = sys.modules.get("__main__")
    if main is None:
        return None
    spec = getattr(main, "__spec__", None)
    argv = [str(arg) for arg in getattr(sys, "argv", [])]
    if spec is not None:
        name = getattr(spec, "name", None)
        if not isinstance(name, str) or name == "__main__" or name.endswith(".__main__"):
            return None
        return MainToImport(name, None, argv)
    path = getattr(main, "__file__", None)
    if not isinstance(path, str) or not path.endswith(".py"):
        return None
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        return None
    return MainToImport(None, path, argv)


def warn_import_failed(cause: str) -> None:
    """The RuntimeWarning that the workers have no main module (``_process.py``
    gives it once per process)."""
    warnings.warn(
        "pool_manager: the fork server could not import the main module for the worker "
        f"processes ({cause}); functions and classes of __main__ travel by value (copied, "
        "with the globals they use, into each task) instead. Guard the script's top level "
        "with `if __name__ == '__main__':` (it runs in the fork server, as multiprocessing's "
        "spawn runs it in each child).",
        RuntimeWarning,
        stacklevel=4,
    )


def alias_main() -> None:
    """Make ``__mp_main__`` our ``__main__`` (if nothing is that yet), so that
    the workers' ``__mp_main__`` objects load as ours."""
    main = sys.modules.get("__main__")
    if main is not None:
        sys.modules.setdefault(MP_MAIN, main)


# -- the parent: which of __main__'s objects go by reference ---------------------

#: Per function or class of ``__main__``: the report it was checked against,
#: and the global names its code reads that the workers' module lacks (None:
#: the workers' module has no such function or class). Checked once per
#: report: its code does not change; our ``__main__``'s globals may.
_verdicts: weakref.WeakKeyDictionary[object, tuple[MainReport, tuple[str, ...] | None]] = (
    weakref.WeakKeyDictionary()
)


def by_reference(obj: types.FunctionType | type, report: MainReport) -> bool:
    """A function or class of ``__main__`` that the workers' main module has, the same.

    The same: a function of that name, defined at the same line (a class:
    at the same line where Python tells it), found as that name in our
    ``__main__``; and each global of our ``__main__`` that its code reads
    (a class: its methods') is a global of theirs (else it travels by value,
    with those globals).
    """
    verdict = _verdicts.get(obj)
    if verdict is None or verdict[0] is not report:
        verdict = _verdicts[obj] = (report, _globals_they_lack(obj, report))
    lacking = verdict[1]
    if lacking is None:
        return False
    namespace: dict[str, object] | None = getattr(sys.modules.get("__main__"), "__dict__", None)
    if namespace is None or namespace.get(obj.__name__) is not obj:
        return False
    return namespace.keys().isdisjoint(lacking)


def _globals_they_lack(
    obj: types.FunctionType | type, report: MainReport
) -> tuple[str, ...] | None:
    """The global names ``obj``'s code reads that the workers' main module lacks;
    None if that module has no such function or class."""
    name = obj.__name__
    if not report.imported or obj.__qualname__ != name:
        return None
    if isinstance(obj, type):
        line = report.classes.get(name)
        if line is None or line != getattr(obj, "__firstlineno__", line):
            return None
        names: Iterable[str] = _globals_of_class(obj)
    else:
        if report.functions.get(name) != obj.__code__.co_firstlineno:
            return None
        names = cloudpickle.cloudpickle._extract_code_globals(obj.__code__)
    return tuple(global_name for global_name in names if global_name not in report.names)


def _globals_of_class(cls: type) -> dict[str, None]:
    found: dict[str, None] = {}
    for code in _codes_of_class(cls):
        found.update(cloudpickle.cloudpickle._extract_code_globals(code))
    return found


def _codes_of_class(cls: type) -> Iterator[types.CodeType]:
    for value in vars(cls).values():
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if isinstance(value, property):
            for accessor in (value.fget, value.fset, value.fdel):
                code = getattr(accessor, "__code__", None)
                if isinstance(code, types.CodeType):
                    yield code
            continue
        code = getattr(value, "__code__", None)
        if isinstance(code, types.CodeType):
            yield code


# -- the fork server: the import --------------------------------------------------


def import_main(plan: MainToImport) -> MainReport:
    """(The fork server, once, before any fork) import the parent's main module
    as ``__mp_main__``: every worker forked after has it, as ``__main__`` too.

    Never raises: an import that fails (``SystemExit`` included) leaves no
    main module, and the report says why.
    """
    original_main = sys.modules.get("__main__")
    original_argv = sys.argv
    module = types.ModuleType(MP_MAIN)
    # Registered before its code runs, as an import does (a dataclass, or
    # pickle, looks its module up as its class is made).
    sys.modules[MP_MAIN] = sys.modules["__main__"] = module
    sys.argv = list(plan.argv)
    try:
        code = _load_code(plan, module)
        exec(code, module.__dict__)
    except BaseException as error:
        if original_main is not None:
            sys.modules["__main__"] = original_main
        sys.modules.pop(MP_MAIN, None)
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        return MainReport(False, {}, {}, frozenset(), text)
    finally:
        sys.argv = original_argv
    _native_threads.prepare()  # (what it loaded: each worker limits it at once)
    return _report(module)


def _load_code(plan: MainToImport, module: types.ModuleType) -> types.CodeType:
    """The main module's code; sets the module's ``__file__``, ``__spec__`` and so on."""
    import importlib.machinery
    import importlib.util

    if plan.name is not None:
        spec = importlib.util.find_spec(plan.name)
        if spec is None or spec.loader is None:
            raise ImportError(f"no module named {plan.name!r}")
        get_code = getattr(spec.loader, "get_code", None)
        code = get_code(plan.name) if get_code is not None else None
        if code is None:
            raise ImportError(f"no code for the module {plan.name!r}")
        module.__spec__ = spec
        module.__loader__ = spec.loader
        module.__package__ = spec.parent
        module.__file__ = spec.origin
        return code  # type: ignore[no-any-return]
    assert plan.path is not None
    loader = importlib.machinery.SourceFileLoader(MP_MAIN, plan.path)
    module.__spec__ = None
    module.__loader__ = loader
    module.__package__ = None
    module.__file__ = plan.path
    code = loader.get_code(MP_MAIN)
    if code is None:
        raise ImportError(f"no code in {plan.path!r}")
    return code


def _report(module: types.ModuleType) -> MainReport:
    functions = {}
    classes = {}
    for name, value in list(vars(module).items()):
        if getattr(value, "__module__", None) != MP_MAIN:
            continue
        if type(value) is types.FunctionType:
            functions[name] = value.__code__.co_firstlineno
        elif isinstance(value, type):
            classes[name] = getattr(value, "__firstlineno__", 0)
    return MainReport(True, functions, classes, frozenset(vars(module)))
