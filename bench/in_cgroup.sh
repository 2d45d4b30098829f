#!/bin/sh
# Run a command inside a new cgroup v2 group whose memory.max is SIZE: the 32 GB laptop's RAM on a bigger machine.
# As root, on a machine with cgroup v2 at /sys/fs/cgroup:
#
#     bench/in_cgroup.sh 32G python3 -m bench.bench_app --models /tmp/m --vram-gb 8 --hold-ram-gb 13 ...
#
# The command and every child it starts (bench_app's RAM holder and VRAM filler) are in the group, so memory.max
# covers them and the page cache they fill. Each run gets a fresh group, so its memory.peak starts at 0; empty groups
# of earlier runs are removed first. The group's controllers come from its parent: where the parent's
# cgroup.subtree_control lacks memory (or io, for io.stat), they are enabled there first. CGROUP_ROOT replaces
# /sys/fs/cgroup (tests point it at a folder).
set -eu
if [ $# -lt 2 ]; then
    echo "usage: $0 SIZE COMMAND [ARGS...]   (SIZE as memory.max takes it, e.g. 32G)" >&2
    exit 2
fi
size=$1
shift
root=${CGROUP_ROOT:-/sys/fs/cgroup}
fail() {
    echo "in_cgroup.sh: $*" >&2
    exit 2
}
[ -f "$root/cgroup.controllers" ] || fail "$root is not a cgroup v2 mount (cgroup v1 has no memory.max)"
grep -qw memory "$root/cgroup.controllers" || fail "the memory controller is not available in $root"
if ! grep -qw memory "$root/cgroup.subtree_control"; then
    # Fails where processes sit in $root itself and $root is not the host's root (a container's own group): the
    # "no internal processes" rule. Then make the group under a parent without processes instead.
    echo +memory >"$root/cgroup.subtree_control" 2>/dev/null ||
        fail "cannot enable +memory in $root/cgroup.subtree_control (processes in $root itself? need root)"
fi
if grep -qw io "$root/cgroup.controllers" && ! grep -qw io "$root/cgroup.subtree_control"; then
    echo +io >"$root/cgroup.subtree_control" 2>/dev/null || true  # io.stat only: the run needs none of it
fi
for old in "$root"/framepack-bench-*; do
    [ -d "$old" ] && rmdir "$old" 2>/dev/null || true  # only empty groups go; a running one stays
done
group=$root/framepack-bench-$$
mkdir "$group"
echo "$size" >"$group/memory.max" || fail "memory.max refused $size"
echo $$ >"$group/cgroup.procs"
echo "in_cgroup.sh: running in $group, memory.max $(cat "$group/memory.max")" >&2
exec "$@"
