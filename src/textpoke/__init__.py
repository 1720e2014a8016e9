"""textpoke: patch and trace calls in running x86-64 Linux processes, exactly.

The public surface is this module; everything else is private to the package.
"""

from ._errors import *  # noqa: F401,F403
from ._errors import __all__ as _error_names

__all__ = [*_error_names]
