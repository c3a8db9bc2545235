"""Cambrionix smart hubs over their serial CLI (CLI-MAN): sans-IO protocol and parsing, per-model
facts, a byte-faithful pty simulator, the asyncio driver and serial-port discovery."""
