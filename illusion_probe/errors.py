"""The one exception type users see for bad input.

Every check in the package raises :class:`IllusionProbeError` (or a subclass)
with a single-line message that names the problem and, where there is one, the
fix. The CLI prints that line and exits non-zero instead of a stack trace.
"""

from __future__ import annotations


class IllusionProbeError(ValueError):
    """Bad input, a bad file, or an unsupported environment, in one line."""


class ArtifactError(IllusionProbeError):
    """A checkpoint, proxy or results file that cannot be read as asked."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`IllusionProbeError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise IllusionProbeError(message)


class IllusionProbeWarning(UserWarning):
    """Something a user should know that does not stop the work (a PCA rank beyond the data's rank)."""
