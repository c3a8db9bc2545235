"""Doubles for the unmanaged-hub driver: a fake Linux USB sysfs tree and a pyusb backend."""
