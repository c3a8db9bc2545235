"""Hub drivers: one package per hub family. Drivers know bytes and hardware, never the daemon."""
