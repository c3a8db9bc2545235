"""Device access behind one protocol: pymobiledevice3, cfgutil (macOS) and the simulator."""
