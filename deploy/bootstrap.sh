#!/usr/bin/env bash
# Prepare this host for edgevm: Debian packages, /dev/kvm permissions, libvirt daemons, the venv at .venv.
# Idempotent and quick when there is nothing to do. Run as root (it is what `make run` and `make test` call).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

packages=(
  libvirt-daemon-system libvirt-clients libvirt-dev pkg-config gcc python3-dev
  qemu-system-x86 qemu-utils ovmf
  nftables conntrack iproute2 kmod
  busybox-static extlinux syslinux-common mtools dosfstools e2fsprogs fdisk systemd-boot-efi binutils cpio
  prometheus cloud-init
  systemd
)

log() { printf 'bootstrap: %s\n' "$*"; }

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    log "missing packages: ${missing[*]} (run as root to install them)"; exit 1
  fi
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if [ "$(id -u)" = 0 ]; then
  # Without group access libvirt re-probes QEMU on every define (30-60 s each): ENVIRONMENT.md.
  if [ -e /dev/kvm ]; then
    chgrp kvm /dev/kvm 2>/dev/null || true
    chmod 660 /dev/kvm || true
  fi
  # No systemd here: start the daemons ourselves when they are not running.
  pgrep -x virtlogd >/dev/null || { log "starting virtlogd"; virtlogd -d; }
  if ! pgrep -x libvirtd >/dev/null; then
    log "starting libvirtd"
    libvirtd -d
  fi
  for _ in $(seq 50); do virsh -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.2; done
  virsh -c qemu:///system version >/dev/null || { log "libvirtd does not answer"; exit 1; }
fi

if ! command -v uv >/dev/null 2>&1; then
  log "installing uv"
  python3 -m pip install -q uv
fi
uv=$(command -v uv || echo "python3 -m uv")
# --frozen: install exactly uv.lock; the workspace members are installed editable into .venv.
$uv sync --frozen --python python3 -q
# Bytecode ahead of time: with none (or PYTHONDONTWRITEBYTECODE set), every service process compiles its
# imports from source at each start, and the compiler's peak stays in its memory (about 6 MB a process).
# compileall skips what is up to date, so a second run costs under a second.
.venv/bin/python -m compileall -q -j 0 .venv/lib shared/src services cli/src >/dev/null ||
  log "some files did not compile to bytecode; they load from source"
log "ready: $(.venv/bin/edgevm --help >/dev/null && echo .venv/bin/edgevm)"
