"""The zone lab: real zones (QEMU guests under TCG) booted on this host for tests and demos.

Modules (import the one you need; this package imports nothing on purpose, so that
`python -m zonewatch.lab.assets` runs without loading netlink or QEMU code):

- `zonewatch.lab.assets`: the guest kernel, modules and base busybox initramfs, built once.
- `zonewatch.lab.taps`: the host side of each plain zone's network (a tap with a /30).
- `zonewatch.lab.kata`: the kata layout's pod network, sandbox folders, bundle, virtiofsd.
- `zonewatch.lab.qemu`: `ZoneSpec` and `QemuZone`, one zone (plain or kata layout).
- `zonewatch.lab.lab`: `Lab` (several zones at once) and `lab_up` / `lab_status` / `lab_down`.
- `zonewatch.lab.cli`: `python -m zonewatch.lab up|status|down|tenants|assets|run`.
"""
