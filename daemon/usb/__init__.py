"""The USB side of detection: which device sits on which physical port."""
