#!/bin/sh
# Turn a fresh debootstrap tree into a mitogen-sim image root. Run by simulator/images.py on the
# build machine (not in a chroot):  finalize-rootfs.sh ROOTFS RECIPE_DIR
# Everything here is part of the image's content hash, so editing this file rebuilds the images.
set -eu
root=$1
recipe=$2
[ -x "$root/usr/sbin/sshd" ] || { echo "finalize-rootfs: $root has no sshd" >&2; exit 1; }

# Our files: the entry point, the node.json applier and the sshd defaults.
install -d -m 0755 "$root/usr/local/lib/mitogen-sim" "$root/usr/local/sbin"
install -m 0755 "$recipe/entrypoint.sh" "$root/usr/local/sbin/mitogen-sim-entrypoint"
install -m 0644 "$recipe/node_setup.py" "$root/usr/local/lib/mitogen-sim/node_setup.py"
install -m 0644 "$recipe/sshd_config" "$root/etc/ssh/sshd_config.d/50-mitogen-sim.conf"
install -d -m 0700 "$root/etc/sim"

# No secrets in the image: the package's postinst made host keys; each container makes its own.
rm -f "$root"/etc/ssh/ssh_host_*

# Without CAP_AUDIT_CONTROL a container cannot set the loginuid; a 'required' module would then
# refuse every ssh session.
sed -i 's/^session\([[:space:]]\+\)required\([[:space:]]\+\)pam_loginuid\.so/session\1optional\2pam_loginuid.so/' \
    "$root/etc/pam.d/sshd"
: > "$root/etc/motd"

# Docker provides /dev, /etc/hosts, /etc/hostname and /etc/resolv.conf; the build machine's
# copies must not leak into the image.
rm -rf "$root"/dev/* "$root/etc/resolv.conf" "$root/etc/hostname"
: > "$root/etc/hosts"

# Size: package caches and lists, documentation, translations, logs.
rm -rf "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
    "$root"/var/lib/apt/lists/* "$root"/var/cache/debconf/*-old "$root"/var/lib/dpkg/*-old \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
    "$root"/usr/share/locale/* "$root"/tmp/* "$root"/var/tmp/*
find "$root/var/log" -type f -exec truncate -s 0 {} +
# Keep packages installed later (apt in a test) from bringing documentation back.
cat > "$root/etc/dpkg/dpkg.cfg.d/mitogen-sim-nodoc" <<'CFG'
path-exclude=/usr/share/doc/*
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
CFG
