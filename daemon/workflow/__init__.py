"""The per-port workflow: phases, steps, the port runner and operator actions."""
