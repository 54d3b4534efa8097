"""The zones on this host: VMM processes from /proc, their threads, taps, shares, tenants."""

from zonewatch.inventory.inventory import Inventory, InventoryChange

__all__ = ["Inventory", "InventoryChange"]
