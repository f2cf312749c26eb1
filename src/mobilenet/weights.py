"""Transitional: the names that moved to :mod:`mobilenet.checkpoint` and :mod:`mobilenet.convert`."""

from mobilenet.checkpoint import *  # noqa: F403
from mobilenet.checkpoint import Checkpoint, load, load_checkpoint, read_header, save  # noqa: F401
from mobilenet.convert import *  # noqa: F403
from mobilenet.convert import pretrained  # noqa: F401
