"""A simulated hub for `benchhub demo`, tests and benchmarks."""

from hubdrivers.sim.driver import Backplane, SimHubDriver

__all__ = ["Backplane", "SimHubDriver"]
