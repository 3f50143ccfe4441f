"""Unit-test setup.

When a hypothesis test fails, hypothesis' pytest plugin imports ``hypothesis.extra._patching``
(to suggest an ``@example`` patch), which imports libcst, which triggers a
``DeprecationWarning`` from ``mypy_extensions.TypedDict``. Under ``filterwarnings = error``
that warning escapes a pytest hook as an INTERNALERROR and aborts the whole session, hiding
every later result. Import it once here with warnings silenced so a failing property test
is reported like any other failure. (The lasting fix is a ``filterwarnings`` ignore entry
for that message in pyproject.toml.)
"""

from __future__ import annotations

import contextlib
import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    with contextlib.suppress(ImportError):
        import hypothesis.extra._patching  # noqa: F401
