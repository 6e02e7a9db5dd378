"""Suite registry: importing this package registers every suite (each module calls core.register_suite)."""

import importlib

# name of module -> imported lazily so one suite's missing optional dependency never hides the others.
_SUITE_MODULES = ("demo", "reasoning", "tau_bench", "bfcl")

for _module in _SUITE_MODULES:
    try:
        importlib.import_module(f"{__name__}.{_module}")
    except ModuleNotFoundError as exc:  # a suite not written yet, or an optional extra not installed
        if exc.name and exc.name.startswith(f"{__name__}.{_module}"):
            continue
        raise
