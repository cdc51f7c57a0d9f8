"""Fuzz-suite setup.

When a Hypothesis test fails, its pytest plugin imports ``hypothesis.extra._patching``
(libcst) while reporting; under ``filterwarnings = error`` a DeprecationWarning raised
by that import (mypy_extensions.TypedDict) turns the report into an INTERNALERROR that
hides the falsifying example.  Import it once here, with that warning silenced.
"""

import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import hypothesis.extra._patching  # noqa: F401
    except Exception:  # optional dependency (libcst) missing, or a future rename: nothing to do
        pass
