"""Warning categories of the package (importable as ``dpfc_native.PrivacyWarning``)."""

from __future__ import annotations


class PrivacyWarning(UserWarning):
    """A setting weakens or voids the stated privacy guarantee.

    Raised as a warning, not an error, for choices that are legitimate in experiments but
    must not be made silently on private data: a fixed noise seed, a ``delta`` above
    ``1/n``, a label set inferred from the private labels. Filter it like any warning
    (``warnings.simplefilter("error", PrivacyWarning)`` turns it into an error).
    """
