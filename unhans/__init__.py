"""unhans: find, remove and watch for Clever-Hans strategies in vision models served on TorchServe."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("unhans")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
