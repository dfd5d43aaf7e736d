#!/usr/bin/env bash
# strata-img reading internal snapshots (convert -l, measure -l) against
# qemu-img 7.2: the converted image compares equal to qemu-img's convert
# of the same snapshot, measure prints the same figures, and a missing
# snapshot, a malformed snapshot_param, a format without snapshots or -l
# with several sources fail with qemu-img's words and status; the source
# image is never changed.
#
#   img-snapshot-read.sh PATH/TO/strata-img
set -uo pipefail
IMG=$(realpath "${1:?usage: img-snapshot-read.sh PATH/TO/strata-img}")
. "$(dirname "$(realpath "$0")")/img-lib.sh"

# Three states of one disk: s1, s2 and the active one, each different;
# a backing file under them so that unallocated clusters read through.
qemu-img create -q -f qcow2 base.qcow2 4M
qio -c 'write -P 0x44 2M 2M' base.qcow2
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 a.qcow2
qio -c 'write -P 0x11 0 1M' a.qcow2
qemu-img snapshot -c s1 a.qcow2
qio -c 'write -P 0x22 512k 1M' -c 'write -z 3M 64k' a.qcow2
qemu-img snapshot -c s2 a.qcow2
qio -c 'write -P 0x33 3M 1M' a.qcow2
qemu-img create -q -f raw r.raw 1M
sum=$(sha256sum a.qcow2 base.qcow2)

for sel in s1 s2 1 2 snapshot.name=s1 snapshot.id=2 \
           snapshot.id=1,snapshot.name=s1; do
    for fmt in raw qcow2; do
        rm -f q.$fmt s.$fmt
        qemu-img convert -O $fmt -l $sel a.qcow2 q.$fmt
        if "$IMG" convert -O $fmt -l $sel a.qcow2 s.$fmt; then
            compare_ok "convert -O $fmt -l $sel: same content" s.$fmt q.$fmt
        else
            bad "convert -O $fmt -l $sel: exit status $?"
        fi
    done
    same "measure -l $sel" measure -O qcow2 -l $sel a.qcow2
    same "measure --output=json -l $sel" measure --output=json -O qcow2 \
        -l $sel a.qcow2
done
# The snapshots differ from each other and from the active state, so the
# comparisons above could tell them apart.
qemu-img convert -O raw -l s1 a.qcow2 s1.raw
qemu-img convert -O raw -l s2 a.qcow2 s2.raw
qemu-img convert -O raw a.qcow2 act.raw
if cmp -s s1.raw s2.raw || cmp -s s2.raw act.raw; then
    bad "the test's snapshots do not differ"
else
    ok "the snapshots and the active state differ"
fi
# -l with a key=value list takes the first of several sources.
rm -f s.raw
"$IMG" convert -O raw -l snapshot.name=s1 a.qcow2 a.qcow2 s.raw &&
    cmp -s <(head -c 4194304 s.raw) s1.raw &&
    cmp -s <(tail -c 4194304 s.raw) act.raw &&
    ok "convert -l snapshot.name with two sources: first one's snapshot" ||
    bad "convert -l snapshot.name with two sources"

for sel in nope 9 snapshot.id=9 snapshot.id=1,snapshot.name=s2 ''; do
    same "convert -l '$sel' (missing)" convert -O raw -l "$sel" a.qcow2 x.raw
    same "measure -l '$sel' (missing)" measure -l "$sel" a.qcow2
done
same "convert -l snapshot.foo=1" convert -O raw -l snapshot.foo=1 a.qcow2 x.raw
same "measure -l snapshot.foo=1" measure -l snapshot.foo=1 a.qcow2
same "convert -l on raw" convert -O raw -l s1 r.raw x.raw
same "measure -l on raw" measure -l s1 r.raw
same "convert -l NAME with two sources" convert -O raw -l s1 a.qcow2 \
    a.qcow2 x.raw
same "measure -l with --size" measure -l s1 --size 1M
same "convert -s (not in 7.2)" convert -O raw -s s1 a.qcow2 x.raw
[ ! -e x.raw ] && ok "no output left by the refusals" ||
    bad "x.raw was created"
[ "$(sha256sum a.qcow2 base.qcow2)" == "$sum" ] &&
    ok "the source images are unchanged" || bad "a source image changed"
check_ok "the source still checks clean" a.qcow2
finish
