#!/bin/sh
# Init (PID 1) of the edgevm test guest; prints "EDGEVM-GUEST: ..." markers on ttyS0 for the tests.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
CONSOLE=/dev/ttyS0
DATA_LABEL=edgevm-data
SEED_LABEL=cidata
SEED=/run/seed

marker() {
    echo "EDGEVM-GUEST: $*"
}

# Waits up to $2 tenths of a second for a filesystem labelled $1 and prints its device.
wait_for_label() {
    tries=$2
    while [ "$tries" -gt 0 ]; do
        findfs "LABEL=$1" 2>/dev/null && return 0
        sleep 0.1
        tries=$((tries - 1))
    done
    return 1
}

load_modules() {
    failed=""
    while read -r module; do
        insmod "/lib/modules/$(uname -r)/$module" 2>/dev/null || failed="$failed ${module##*/}"
    done </etc/edgevm/modules
    # The CPU-specific crc drivers (pclmul, sse4.2) fail under TCG; their generic twins are loaded too.
    [ -z "$failed" ] || echo "modules not loaded:$failed"
}

mount_data() {
    if dev=$(wait_for_label "$DATA_LABEL" 300) && mount -t ext2 "$dev" /data; then
        marker "data mounted $dev"
    else
        marker "no-data"
        dmesg | tail -n 30
    fi
}

# Prints the ISO 9660 volume label of device $1, read from its primary volume descriptor at 32 KiB.
iso_label() {
    dd if="$1" bs=2048 skip=16 count=1 2>/dev/null | dd bs=1 skip=40 count=32 2>/dev/null | tr -d ' '
}

# Prints the NoCloud seed device: a whole device holding an ISO labelled cidata, else any fs so labelled.
find_seed() {
    for block in /sys/block/*; do
        # An empty cd-rom drive has size 0, and reading it only takes time.
        [ "$(cat "$block/size")" -gt 0 ] || continue
        dev=/dev/${block##*/}
        [ "$(iso_label "$dev")" = "$SEED_LABEL" ] && { echo "$dev"; return 0; }
    done
    # findfs would do for ISOs too, but busybox skips any device smaller than 68 KiB: most seeds.
    findfs "LABEL=$SEED_LABEL" 2>/dev/null
}

# Devices are all probed by now: insmod returns only after the driver's asynchronous probes are done.
mount_seed() {
    dev=$(find_seed) && mkdir -p "$SEED" && mount -o ro "$dev" "$SEED"
}

# Sets the hostname from the top-level "local-hostname:" of the seed's meta-data (YAML), if it has one.
set_hostname() {
    if [ -f "$SEED/meta-data" ]; then
        name=$(tr -d "\"'" <"$SEED/meta-data" |
            sed -n -E 's/^local-hostname:[[:space:]]*([A-Za-z0-9.-]+).*/\1/p' | head -n 1)
        [ -n "$name" ] && hostname "$name"
    fi
    marker "hostname=$(hostname)"
}

# Prints the NIC for netplan entry $1 with MAC $2 ("-": none): by MAC, by name, else the first unused one.
nic_for() {
    for path in /sys/class/net/*; do
        nic=${path##*/}
        [ "$2" != "-" ] && [ "$(cat "$path/address")" = "$2" ] && { echo "$nic"; return; }
    done
    [ "$2" != "-" ] && return
    [ -e "/sys/class/net/$1" ] && { echo "$1"; return; }
    for path in /sys/class/net/*; do
        nic=${path##*/}
        [ "$nic" = lo ] && continue
        case " $USED_NICS " in *" $nic "*) continue ;; esac
        echo "$nic"
        return
    done
}

apply_network_config() {
    USED_NICS=""
    awk -f /etc/edgevm/netplan.awk "$SEED/network-config" >/run/netplan.plan || return
    while read -r id mac addresses gateway; do
        nic=$(nic_for "$id" "$mac")
        if [ -z "$nic" ]; then
            marker "no-nic $id"
            continue
        fi
        USED_NICS="$USED_NICS $nic"
        ip link set "$nic" up
        for address in $(echo "$addresses" | tr , ' '); do
            [ "$address" = "-" ] && continue
            ip addr add "$address" dev "$nic" && marker "ip=$address"
        done
        [ "$gateway" = "-" ] || ip route add default via "$gateway" dev "$nic"
    done </run/netplan.plan
}

# Prints the argument of the user-data line "#edgevm-test: $1 [ARG]" ("on" without one); nothing if absent.
test_flag() {
    awk -v flag="$1" '$1 == "#edgevm-test:" && $2 == flag { print ($3 == "" ? "on" : $3); exit }' \
        "$SEED/user-data" 2>/dev/null
}

write_poweroff_script() {
    cat >/bin/edgevm-poweroff <<EOF
#!/bin/sh
echo "EDGEVM-GUEST: poweroff" >$CONSOLE
sync
umount /data 2>/dev/null || mount -o remount,ro /data 2>/dev/null
poweroff -f
EOF
    chmod 755 /bin/edgevm-poweroff
    # busybox acpid maps the power button (evdev KEY_POWER) to "PWRF" and runs /etc/acpi/PWRF/00000080.
    mkdir -p /etc/acpi/PWRF
    ln -s /bin/edgevm-poweroff /etc/acpi/PWRF/00000080
}

start_services() {
    mkdir -p /www
    echo "<html><body><h1>edgevm test guest $(hostname)</h1></body></html>" >/www/index.html
    httpd -p 80 -h /www
    nc -ll -p 7 -e cat </dev/null >/dev/null 2>&1 &
    # "ready" promises that the services answer, so wait until both listen.
    tries=50
    until netstat -ltn | grep -q ':7 ' && netstat -ltn | grep -q ':80 '; do
        [ "$tries" -gt 0 ] || { marker "services not listening"; return; }
        sleep 0.1
        tries=$((tries - 1))
    done
}

run_console_commands() {
    while true; do
        IFS= read -r line || { sleep 1; continue; }
        [ -n "$line" ] || continue
        sh -c "$line" </dev/null
        marker "cmd-done $?"
    done
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /run /tmp /data /var/log
exec <$CONSOLE >$CONSOLE 2>&1
# Without echo the console shows only what the commands print; off before a test can type anything.
stty -echo
# Kernel messages would otherwise land in the middle of marker lines.
dmesg -n 1
hostname edgevm-guest
ip link set lo up

load_modules
marker "boot"
mount_data

if mount_seed; then
    set_hostname
    [ -f "$SEED/network-config" ] && apply_network_config
else
    marker "no-seed"
fi

write_poweroff_script
if [ -n "$(test_flag ignore-acpi)" ]; then
    marker "acpi ignored"
else
    acpid -l /var/log/acpid.log
fi
poweroff_after=$(test_flag poweroff-after)
if [ -n "$poweroff_after" ]; then
    (sleep "$poweroff_after"; /bin/edgevm-poweroff) </dev/null &
fi

start_services
marker "ready"
run_console_commands
