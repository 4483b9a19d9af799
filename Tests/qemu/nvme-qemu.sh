#!/usr/bin/env bash
# Runs the NVMe driver against QEMU's emulated controller (-device nvme), an
# implementation nobody here wrote, inside a QEMU guest under TCG:
#   mode uio:  uio_pci_generic, DMA by physical address (/proc/self/pagemap)
#   mode vfio: vfio-pci behind an emulated Intel IOMMU (-device intel-iommu)
# The guest is a Debian kernel with an initramfs of busybox, the kernel modules, and the
# test binary with the shared libraries it needs. QEMU exits 0 whatever the guest did,
# so the verdict is read from the guest's serial output.
#   Tests/qemu/nvme-qemu.sh [uio|vfio ...]      (default: both)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
work=${QEMU_WORK:-$top/.build/qemu}
modes=("$@"); [ ${#modes[@]} -gt 0 ] || modes=(uio vfio)
mkdir -p "$work"

need=()
for p in qemu-system-x86 busybox-static cpio; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# A Debian kernel: the newest linux-image-6.1.0-N-amd64 the archive offers.
if [ ! -f "$work/kernel/vmlinuz" ]; then
  [ -n "$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' | head -1)" ] || apt-get update -qq
  pkg=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' | awk '{print $1}' | sort -V | tail -1)
  rm -rf "$work/kernel" "$work/deb" && mkdir -p "$work/kernel" "$work/deb"
  (cd "$work/deb" && apt-get download "$pkg" >/dev/null 2>&1)
  dpkg -x "$work"/deb/*.deb "$work/kernel/root"
  cp "$work"/kernel/root/boot/vmlinuz-* "$work/kernel/vmlinuz"
fi
kver=$(ls "$work/kernel/root/lib/modules")
moddir="$work/kernel/root/lib/modules/$kver/kernel"

# The test binary (release), and everything it loads.
if [ -n "${NVME_QEMU_BIN:-}" ]; then
  bin=$NVME_QEMU_BIN
else
  (cd "$top" && swift build -c release --product nvme-qemu-check 2>&1 | tail -n 1)
  bin="$(cd "$top" && swift build -c release --show-bin-path)/nvme-qemu-check"
fi

initrd="$work/initrd.cpio.gz"
root="$work/initramfs"
rm -rf "$root" && mkdir -p "$root"/{bin,sbin,proc,sys,dev,tmp,lib/modules,lib64,mnt/huge}
cp /bin/busybox "$root/bin/busybox"
for tool in sh mount insmod echo cat ls sleep poweroff mkdir grep seq basename readlink; do ln -s busybox "$root/bin/$tool"; done
cp "$bin" "$root/bin/nvme-qemu-check"
for lib in $(ldd "$bin" | grep -oE '/[^ ]+\.so[^ ]*'); do
  mkdir -p "$root$(dirname "$lib")"; cp -L "$lib" "$root$lib"
done
for m in uio/uio.ko uio/uio_pci_generic.ko vfio/vfio.ko vfio/vfio_iommu_type1.ko vfio/vfio_virqfd.ko \
         vfio/pci/vfio-pci-core.ko vfio/pci/vfio-pci.ko; do
  cp "$moddir/drivers/$m" "$root/lib/modules/"
done
cp "$moddir/virt/lib/irqbypass.ko" "$root/lib/modules/"
cat > "$root/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mode=$(cat /proc/cmdline | grep -oE 'blobfs_mode=[a-z]+' | cut -d= -f2)
echo 64 > /proc/sys/vm/nr_hugepages
nvme=""
for d in /sys/bus/pci/devices/*; do
  [ "$(cat $d/class)" = "0x010802" ] && nvme=$(basename $d)
done
echo "guest: mode $mode, NVMe controller at ${nvme:-none}"
if [ -n "$nvme" ]; then
  ids="$(cat /sys/bus/pci/devices/$nvme/vendor) $(cat /sys/bus/pci/devices/$nvme/device)"
  if [ "$mode" = uio ]; then
    insmod /lib/modules/uio.ko; insmod /lib/modules/uio_pci_generic.ko
    echo "$ids" > /sys/bus/pci/drivers/uio_pci_generic/new_id
  else
    for m in irqbypass vfio vfio_iommu_type1 vfio_virqfd vfio-pci-core vfio-pci; do insmod /lib/modules/$m.ko; done
    echo "$ids" > /sys/bus/pci/drivers/vfio-pci/new_id
  fi
  sleep 1
  echo "guest: driver $(basename $(readlink /sys/bus/pci/devices/$nvme/driver 2>/dev/null) 2>/dev/null)"
  /bin/nvme-qemu-check --mode "$mode" --bdf "$nvme" && echo "BLOBFS-QEMU-RESULT: PASS" || echo "BLOBFS-QEMU-RESULT: FAIL ($?)"
else
  echo "BLOBFS-QEMU-RESULT: FAIL (no NVMe controller)"
fi
poweroff -f
INIT
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc 2>/dev/null | gzip -1 > "$initrd")

status=0
for mode in "${modes[@]}"; do
  image="$work/nvme-$mode.img"
  rm -f "$image"; truncate -s 256M "$image"
  # no_timer_check: under TCG on a loaded host the guest's IO-APIC timer check can miss
  # its ticks and panic the boot ("timer doesn't work through Interrupt-remapped IO-APIC").
  machine=(-M q35); append="console=ttyS0 panic=-1 quiet no_timer_check blobfs_mode=$mode"
  if [ "$mode" = vfio ]; then
    machine=(-M q35,kernel-irqchip=split -device intel-iommu,intremap=on)
    append="$append intel_iommu=on"
  fi
  log="$work/serial-$mode.log"
  timeout 600 qemu-system-x86_64 -accel tcg "${machine[@]}" -m 1G -smp 1 -nographic -no-reboot \
    -kernel "$work/kernel/vmlinuz" -initrd "$initrd" -append "$append" \
    -drive file="$image",if=none,id=nvm,format=raw -device nvme,serial=blobfs0001,drive=nvm \
    > "$log" 2>&1 || true
  if grep -q "BLOBFS-QEMU-RESULT: PASS" "$log"; then
    echo "PASS nvme-qemu $mode"; grep -E "^check" "$log" | sed 's/^/  /' | cut -c1-160
  else
    echo "FAIL nvme-qemu $mode (serial log: $log)"; grep -E "guest:|check|BLOBFS|FAIL|error|panic" "$log" | tail -n 20 || true
    status=1
  fi
done
exit $status
