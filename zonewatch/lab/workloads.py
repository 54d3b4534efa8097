"""Guest workloads (busybox sh) for lab zones: what `make demo` and the e2e tests run.

Every function returns script text for `ZoneSpec.workload`; the guest runs it with ZW_NAME,
ZW_TENANT, ZW_HOST_IP, ZW_GUEST_IP and ZW_SHARE (/mnt/share, its 9p or, on a kata zone,
virtiofs share) set. The attack
steps are what the default rules in rules/ detect from the host:

- `metadata_request`: a TCP connection to 169.254.169.254:80 (network: cloud metadata);
- `connect`: a TCP connection to another zone (network: another tenant's zone);
- `port_scan`: connections to many closed ports of one address (network: port scan);
- `plant_ssh_key`: root/.ssh/authorized_keys written in the share (files: SSH keys; the
  9p share's writer is QEMU, a kata zone's virtiofs share's is virtiofsd);
- `share_escape_attempt`: ways out of the share tried from the guest (files: device node).

A lab guest has no default route: a step that reaches past its /30 (its tap's, or a kata
pod's veth's) needs `route_via_host` first, and the host decides what becomes of it (the
demo and the detection test keep all of it on this machine).
"""

from __future__ import annotations

METADATA_IP = "169.254.169.254"
SSH_KEY = "ssh-ed25519 AAAAC3Nz attacker"


def gate(name: str) -> str:
    """Wait for the host's go-file (9p walks open no file: waiting makes no file event)."""
    return f"while [ ! -e $ZW_SHARE/go-{name} ]; do usleep 20000; done\n"


def route_via_host(ip: str) -> str:
    """Send traffic for `ip` to the host end of the zone's network (tap, or kata veth)."""
    return f"ip route add {ip}/32 via $ZW_HOST_IP\n"


def connect(
    ip: str, port: int, payload: str, *, tries: int = 1, wait_s: int = 3, background: bool = False
) -> str:
    """TCP connections to ip:port sending `payload`, up to `tries` (each a new flow) until
    one succeeds; `background`: one try, not waited for (its SYN leaves at once)."""
    send = f"echo {payload} | nc -w {wait_s} {ip} {port}"
    if background:
        return f"({send} >/dev/null 2>&1 &)\n"
    if tries == 1:
        return f"{send} >/dev/null 2>&1\n"
    return f"for i in $(seq 1 {tries}); do {send} && break; usleep 200000; done\n"


def metadata_request(wait_s: int = 3, background: bool = False) -> str:
    """An HTTP request for the instance metadata (what steals a host's cloud credentials);
    `background`: not waited for."""
    request = (
        f"printf 'GET /latest/meta-data/ HTTP/1.0\\r\\n\\r\\n' | nc -w {wait_s} {METADATA_IP} 80"
        " >/dev/null 2>&1"
    )
    return f"({request} &)\n" if background else request + "\n"


def port_scan(ip: str, count: int, base: int, marker: str = "") -> str:
    """Connections to ports base+1 .. base+count of `ip` (a shell word: "$ZW_HOST_IP"
    works), one after the other; `marker` (if any) is echoed with each port first."""
    say = f"echo {marker} $p; " if marker else ""
    return (
        f"for p in $(seq 1 {count}); do {say}"
        f"nc -w 1 {ip} $(({base} + p)) </dev/null >/dev/null 2>&1; done\n"
    )


def plant_ssh_key(marker: str = "") -> str:
    """Write an attacker's key to root/.ssh/authorized_keys in the share."""
    say = f"echo {marker}\n" if marker else ""
    return (
        "mkdir -p $ZW_SHARE/root/.ssh\n"
        + say
        + f"echo '{SSH_KEY}' > $ZW_SHARE/root/.ssh/authorized_keys\n"
    )


def share_escape_attempt() -> str:
    """Try to reach host files through the 9p share, as exploits of 9p servers did.

    What the host sees (QEMU's 9p with security_model=mapped-xattr, as lab zones run):
    - a symlink to /etc/shadow planted in the share: QEMU stores it as a regular file
      holding the target text plus user.virtfs.* xattrs (a create, a write, a chown and
      a chmod on the host); reading it, the guest follows it inside the guest;
    - `..` past the share's root: resolved by the guest's own VFS, nothing reaches QEMU;
    - a block device node for the host's first disk (8:0) in the share: QEMU's mknodat
      and its user.virtfs.rdev xattr, which "Device node created through a share" raises.
    None of them gets out (QEMU resolves every path inside the share); the attempt is what
    the host observes.

    On a kata zone's virtiofs share (virtiofsd, no xattr mapping) the host gets the real
    things, made by virtiofsd: a symlink to /etc/shadow (op symlink) and a block device node
    8:0 (op mknod, mode 060644), then its unlink; the same rule raises on the mknod."""
    return (
        "mkdir -p $ZW_SHARE/.cache\n"
        "ln -sf /etc/shadow $ZW_SHARE/.cache/shadow\n"
        "cat $ZW_SHARE/.cache/shadow $ZW_SHARE/../../../etc/shadow >/dev/null 2>&1\n"
        "mknod $ZW_SHARE/.cache/sda b 8 0 && rm -f $ZW_SHARE/.cache/sda\n"
    )


# -- the demo's zones ----------------------------------------------------------------------

# A shop's order queue: create, read, rename, and now and then sweep the finished ones.
ORDERS = """
mkdir -p $ZW_SHARE/orders
i=0
while true; do
  i=$((i+1))
  echo "order $i from $ZW_NAME" > $ZW_SHARE/orders/new-$i.txt
  cat $ZW_SHARE/orders/new-$i.txt > /dev/null
  mv $ZW_SHARE/orders/new-$i.txt $ZW_SHARE/orders/done-$i.txt
  if [ $((i % 5)) -eq 0 ]; then rm -f $ZW_SHARE/orders/done-*.txt; fi
  ping -c 1 -W 1 $ZW_HOST_IP > /dev/null 2>&1
  sleep 2
done
"""

# A ledger that appends and rotates its journal (and pings the host: the agent learns
# the zone's address from its tap).
LEDGER = """
mkdir -p $ZW_SHARE/ledger
n=0
while true; do
  n=$((n+1))
  echo "entry $n" >> $ZW_SHARE/ledger/journal.log
  if [ $((n % 10)) -eq 0 ]; then
    mv $ZW_SHARE/ledger/journal.log $ZW_SHARE/ledger/journal.$n.log
    chmod 0400 $ZW_SHARE/ledger/journal.$n.log
  fi
  if [ $((n % 3)) -eq 1 ]; then ping -c 1 -W 1 $ZW_HOST_IP > /dev/null 2>&1; fi
  sleep 1
done
"""

LATERAL_PORTS = (22, 5432, 6379)
SCAN_PORTS = 30  # the port scan rule fires past 25 distinct ports within 60 s
SCAN_BASE = 20000  # host ports 20001..: nothing listens there, the host answers RST


def compromised(target_ip: str, pause_s: int = 3) -> str:
    """A taken-over workload, in a loop: the metadata service, the other tenant's zone at
    `target_ip` (a few service ports), a way out through the share, an SSH key planted
    in the share, and every fourth round a port scan of the host end of its tap.

    The connections are not waited for (nothing answers them: the host routes nothing on),
    so a round takes about `pause_s` and an agent that starts late sees the next one soon.
    Each step is announced on the console (`ZW-ACT <step> <round>`)."""
    step = "echo ZW-ACT {} $n\n".format
    lateral = "".join(
        connect(target_ip, port, "hello", wait_s=1, background=True) for port in LATERAL_PORTS
    )
    return (
        route_via_host(METADATA_IP)
        + route_via_host(target_ip)
        + "n=0\nwhile true; do\n  n=$((n+1))\n"
        + step("metadata")
        + metadata_request(wait_s=1, background=True)
        + step("lateral")
        + lateral
        + step("escape")
        + share_escape_attempt()
        + step("keys")
        + plant_ssh_key()
        + "if [ $((n % 4)) -eq 1 ]; then\n"
        + step("scan")
        + port_scan("$ZW_HOST_IP", SCAN_PORTS, SCAN_BASE)
        + "fi\n"
        + f"sleep {pause_s}\ndone\n"
    )
