#!/usr/bin/env bash
# Prepares a machine for the polled NVMe driver, after SPDK's scripts/setup.sh:
#   setup.sh config [--hugepages N] [--driver vfio-pci|uio_pci_generic] [BDF ...]
#       reserve N 2 MiB hugepages (default 1024), turn on FUSE over io_uring where the
#       kernel has it (6.14+: fuse.enable_uring), and bind the NVMe controllers (all, or
#       the BDFs given) to a userspace driver (vfio-pci when an IOMMU is on)
#   setup.sh status   hugepages, FUSE over io_uring, every NVMe controller with its driver
#   setup.sh reset    give the controllers back to the kernel's nvme driver
set -euo pipefail
cmd=${1:-status}; shift || true
hugepages=1024; driver=""; bdfs=()
while [ $# -gt 0 ]; do
  case $1 in
    --hugepages) hugepages=$2; shift 2 ;;
    --driver) driver=$2; shift 2 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    -*) echo "setup.sh: unknown option $1" >&2; exit 2 ;;
    *) bdfs+=("$1"); shift ;;
  esac
done
[[ "$hugepages" =~ ^[0-9]+$ ]] || { echo "setup.sh: --hugepages needs a number, got '$hugepages'" >&2; exit 2; }

nvme_controllers() {
  for d in /sys/bus/pci/devices/*; do
    [ "$(cat "$d/class")" = "0x010802" ] && basename "$d"
  done
}
[ ${#bdfs[@]} -gt 0 ] || mapfile -t bdfs < <(nvme_controllers)

current_driver() { basename "$(readlink "/sys/bus/pci/devices/$1/driver" 2>/dev/null)" 2>/dev/null || echo none; }

bind() {  # bind BDF DRIVER
  local bdf=$1 target=$2 dev=/sys/bus/pci/devices/$1
  [ -e "$dev" ] || { echo "setup.sh: no PCI device $bdf" >&2; return 2; }
  [ "$(current_driver "$bdf")" = "$target" ] && return 0
  [ -e "$dev/driver" ] && echo "$bdf" > "$dev/driver/unbind"
  echo "$target" > "$dev/driver_override"
  echo "$bdf" > /sys/bus/pci/drivers_probe
  echo "" > "$dev/driver_override"
  [ "$(current_driver "$bdf")" = "$target" ] || { echo "setup.sh: $bdf did not bind to $target" >&2; return 1; }
}

case $cmd in
  config)
    [ "$(id -u)" -eq 0 ] || { echo "setup.sh: run as root" >&2; exit 2; }
    echo "$hugepages" > /proc/sys/vm/nr_hugepages
    got=$(cat /proc/sys/vm/nr_hugepages)
    [ "$got" -ge "$hugepages" ] || echo "setup.sh: only $got of $hugepages hugepages could be reserved" >&2
    if [ -w /sys/module/fuse/parameters/enable_uring ]; then
      echo Y > /sys/module/fuse/parameters/enable_uring && echo "FUSE over io_uring: on"
    else
      echo "FUSE over io_uring: this kernel has none (before 6.14); blobfs serves /dev/fuse"
    fi
    if [ -z "$driver" ]; then
      if [ -n "$(ls -A /sys/kernel/iommu_groups 2>/dev/null)" ]; then driver=vfio-pci; else driver=uio_pci_generic; fi
    fi
    modprobe "$driver" 2>/dev/null || modprobe "${driver/-/_}" 2>/dev/null || true
    for bdf in "${bdfs[@]}"; do bind "$bdf" "$driver" && echo "$bdf -> $driver"; done
    ;;
  status)
    echo "hugepages: $(cat /proc/sys/vm/nr_hugepages) reserved, $(awk '/HugePages_Free/{print $2}' /proc/meminfo) free (2 MiB)"
    echo "IOMMU: $([ -n "$(ls -A /sys/kernel/iommu_groups 2>/dev/null)" ] && echo on || echo off)"
    echo "FUSE over io_uring: $(cat /sys/module/fuse/parameters/enable_uring 2>/dev/null || echo "not in this kernel")"
    [ ${#bdfs[@]} -gt 0 ] || echo "no NVMe controllers"
    for bdf in "${bdfs[@]}"; do echo "$bdf  driver $(current_driver "$bdf")"; done
    ;;
  reset)
    [ "$(id -u)" -eq 0 ] || { echo "setup.sh: run as root" >&2; exit 2; }
    modprobe nvme 2>/dev/null || true
    for bdf in "${bdfs[@]}"; do bind "$bdf" nvme && echo "$bdf -> nvme"; done
    ;;
  *) echo "setup.sh: unknown command '$cmd' (config, status, reset)" >&2; exit 2 ;;
esac
