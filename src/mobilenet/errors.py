"""The one exception type for a user's mistake.

The CLI turns a :class:`MobileNetError` into a one-line message and exit code 2; any other exception is a bug
in this library and keeps its traceback.
"""

from __future__ import annotations

import errno


class MobileNetError(ValueError):
    """A user's input was wrong: the message names what was wrong and what is expected."""


#: Write failures that say the filesystem has no room or takes no writes, whatever was being written (reading a
#: file never fails so): a disk full, a quota, a file too large for the filesystem, a filesystem mounted read-only.
NO_ROOM_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


class OutputWriteError(MobileNetError, OSError):
    """A file could not be written for want of room or of a writable filesystem (disk full, quota, read-only): no
    mistake in the command, but nothing the program can fix either, so it is one line too. Still an ``OSError``
    (with the original ``errno`` and ``strerror``) for code that handles failed writes as such."""

    def __str__(self) -> str:
        # OSError's own text is "[Errno N] strerror: filename" once those are set; the message says more.
        return str(self.args[0]) if self.args else ""


#: How to install each optional extra: the packages themselves (the names on the package index), and the extra of a
#: checkout of this project, which is how mobilenet itself is installed.
INSTALL_HINTS: dict[str, str] = {
    "onnx": "pip install onnx onnxruntime onnxscript (in a checkout of mobilenet: pip install -e '.[onnx]')",
    "openvino": "pip install openvino (in a checkout of mobilenet: pip install -e '.[openvino]')",
    "mobile": "pip install executorch (the XNNPACK delegate; in a checkout of mobilenet: pip install -e '.[mobile]')",
    "litert": "pip install litert-torch ai-edge-litert (in a checkout of mobilenet: pip install -e '.[litert]')",
    "demo": "pip install scikit-learn (in a checkout of mobilenet: pip install -e '.[demo]')",
}
