#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian 12 machine for zonewatch: system packages, kernel
# headers for bcc, tracefs/debugfs, the .venv, and the lab's guest assets. A second run
# changes nothing and takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'setup: %s\n' "$*"; }

# Debian packages: bcc (python3-bpfcc; never the unrelated PyPI "bcc"), QEMU and busybox for
# the lab (qemu-system-common ships /usr/lib/qemu/virtiofsd, the kata layout's share server),
# bpftrace as the benchmark peer, tmux to drive terminal UIs in tests, prometheus to scrape
# a live agent for the dashboards' queries (tests/e2e/test_dashboards.py).
APT_PACKAGES=(python3-bpfcc bpfcc-tools qemu-system-x86 qemu-system-common busybox-static cpio
              iproute2 bpftrace bpftool tmux kmod xz-utils prometheus)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  say "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# bcc compiles against kernel headers. Where none match the running kernel, Debian's
# generic headers work for tracepoint and tc programs; link them only where nothing is.
kdir="/lib/modules/$(uname -r)"
if [[ ! -e "$kdir/build" ]]; then
  if ! compgen -G "/usr/src/linux-headers-*-amd64" >/dev/null; then
    say "installing linux-headers-amd64"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-headers-amd64 >/dev/null
  fi
  mkdir -p "$kdir"
  build=$(ls -d /usr/src/linux-headers-*-amd64 | sort -V | tail -n1)
  say "linking $kdir/build -> $build"
  ln -s "$build" "$kdir/build"
  if [[ ! -e "$kdir/source" ]]; then
    common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n1 || true)
    [[ -n "$common" ]] && ln -s "$common" "$kdir/source"
  fi
fi

# bcc reads tracepoint formats through debugfs; the agent reads tracefs.
mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing
mountpoint -q /sys/kernel/debug || mount -t debugfs nodev /sys/kernel/debug

# The venv: the project editable plus dev tools. Reinstalled only when pyproject changes.
PY=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || { say "creating .venv"; "$PY" -m venv .venv; }
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
stamp=.venv/.zonewatch-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  say "installing the project into .venv"
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
  echo "$want" > "$stamp"
fi
# The zonewatch.v1 gRPC stubs (gitignored): regenerated only when the .proto is newer.
# protoc names modules after the proto's path (zonewatch.v1); sed points the grpc module's
# import at where the stubs live inside the package.
proto=zonewatch/api/proto/zonewatch/v1/zonewatch.proto
gen=zonewatch/api/gen/zonewatch/v1
if [[ ! -f "$gen/zonewatch_pb2_grpc.py" || "$proto" -nt "$gen/zonewatch_pb2_grpc.py" ]]; then
  say "generating the gRPC stubs"
  mkdir -p "$gen"
  .venv/bin/python -m grpc_tools.protoc -I zonewatch/api/proto --python_out=zonewatch/api/gen \
    --pyi_out=zonewatch/api/gen --grpc_python_out=zonewatch/api/gen "$proto"
  sed -i 's/^from zonewatch\.v1 import/from zonewatch.api.gen.zonewatch.v1 import/' \
    "$gen/zonewatch_pb2_grpc.py"
  touch zonewatch/api/gen/__init__.py zonewatch/api/gen/zonewatch/__init__.py "$gen/__init__.py"
fi
# Expose only Debian's bcc package to the venv, not all of dist-packages.
[[ -e "$site/bcc" ]] || ln -s /usr/lib/python3/dist-packages/bcc "$site/bcc"
.venv/bin/python -c 'import bcc' || { echo "setup: bcc does not import in .venv" >&2; exit 1; }

# The lab's guest kernel, modules and busybox initramfs, built once into a cache folder.
.venv/bin/python -m zonewatch.lab.assets >/dev/null
say "ready"
