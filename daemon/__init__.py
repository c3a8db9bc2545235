"""benchhub: the station daemon that provisions iPhones and iPads on smart USB hubs."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("benchhub")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"
