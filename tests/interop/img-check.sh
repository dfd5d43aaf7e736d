#!/usr/bin/env bash
# strata-img check and snapshot against qemu-img: the same summary, JSON
# and exit status on clean, leaked and corrupted images; repairs that
# qemu-img then finds clean; the same snapshot table and errors; bad
# input refused with the image untouched.
#
#   img-check.sh PATH/TO/strata-img
set -uo pipefail
IMG=$(realpath "${1:?usage: img-check.sh PATH/TO/strata-img}")
. "$(dirname "$(realpath "$0")")/img-lib.sh"

# damage FILE KIND: edits the metadata of a fresh image (data in guest
# clusters 0-3) with python, as a crash or a bug would leave it.
cat > damage.py <<'PY'
import struct, sys
f, what = sys.argv[1], sys.argv[2]
d = open(f, 'r+b')
def rd(off, n): d.seek(off); return d.read(n)
def be64(off): return struct.unpack('>Q', rd(off, 8))[0]
cs = 1 << struct.unpack('>I', rd(20, 4))[0]
l1, rt = be64(40), be64(48)
l2 = be64(l1) & 0x00fffffffffffe00
data0 = be64(l2) & 0x00fffffffffffe00
rb = be64(rt)
def setref(cl, v): d.seek(rb + 2 * cl); d.write(struct.pack('>H', v))
if what == 'leak':        # guest cluster 1 forgets its host cluster
    d.seek(l2 + 8); d.write(b'\0' * 8)
elif what == 'refzero':   # a referenced cluster with refcount 0
    setref(data0 // cs, 0)
elif what == 'ref2':      # refcount 2 for one reference: leak + COPIED
    setref(data0 // cs, 2)
elif what == 'corruptbit':  # leak, and the corrupt bit set
    d.seek(l2 + 8); d.write(b'\0' * 8)
    v = be64(72); d.seek(72); d.write(struct.pack('>Q', v | 2))
elif what == 'rb-zero':   # the refcount block wiped
    d.seek(rb); d.write(b'\0' * cs)
elif what == 'rb-noise':  # the refcount block overwritten with noise
    d.seek(rb); d.write(bytes((i * 37 + 11) & 0xff for i in range(cs)))
elif what == 'rt-outside':   # reftable entry 0 past the end of the file
    d.seek(rt); d.write(struct.pack('>Q', 1 << 30))
elif what == 'rt-outside1':  # an unused reftable entry past the end
    d.seek(rt + 8); d.write(struct.pack('>Q', 1 << 30))
elif what == 'rt-unaligned':
    d.seek(rt); d.write(struct.pack('>Q', rb + 512))
elif what == 'rt-reserved':
    d.seek(rt); d.write(struct.pack('>Q', rb | 1))
elif what == 'rb-on-l2':  # reftable entry 0 points at the L2 table
    d.seek(rt); d.write(struct.pack('>Q', l2))
elif what == 'l2-on-rb':  # guest cluster 2 mapped onto the refcount block
    d.seek(l2 + 16); d.write(struct.pack('>Q', rb | (1 << 63)))
elif what == 'l2-on-l1':  # guest cluster 2 mapped onto the L1 table
    d.seek(l2 + 16); d.write(struct.pack('>Q', l1 | (1 << 63)))
elif what == 'shared':    # guest clusters 0 and 2 share a host cluster
    d.seek(l2 + 16); d.write(struct.pack('>Q', data0 | (1 << 63)))
PY
mkimg() {
    qemu-img create -q -f qcow2 "$1" 16M
    qio -c 'write -P 1 0 256k' -c 'write -P 2 8M 64k' "$1"
    [ -n "${2:-}" ] && python3 damage.py "$1" "$2"
}

# stdout and status only: the findings on stderr are the driver's.
same_out() {
    local what=$1; shift
    local a b sa sb
    a=$("$IMG" "$@" 2>/dev/null); sa=$?
    b=$(qemu-img "$@" 2>/dev/null); sb=$?
    if [ "$a" == "$b" ] && [ $sa -eq $sb ]; then ok "$what (status $sa)"
    else bad "$what: status $sa vs $sb"; diff <(echo "$a") <(echo "$b") | head; fi
}

# ---- check: verdicts ----
mkimg clean.qcow2
qemu-img create -q -f qcow2 empty.qcow2 1G
qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=4096 v2.qcow2 8M
qio -c 'write -P 7 0 100k' v2.qcow2
for k in leak refzero ref2 corruptbit; do mkimg "$k.qcow2" "$k"; done
qemu-img create -q -f raw raw.img 1M
for f in clean empty v2 leak refzero ref2 corruptbit; do
    for o in human json; do
        same "check --output=$o $f" check --output=$o "$f.qcow2"
    done
done
same "check -q leak" check -q leak.qcow2
same "check raw: no checks (63)" check -f raw raw.img
same "check raw probed: no checks" check raw.img
"$IMG" check leak.qcow2 >/dev/null 2>&1; [ $? -eq 3 ] && ok "check: leaks exit 3" || bad "check: leaks not 3"
"$IMG" check refzero.qcow2 >/dev/null 2>&1; [ $? -eq 2 ] && ok "check: corruption exit 2" || bad "check: corruption not 2"

# ---- check: repairs, on copies, against qemu-img's on copies ----
# Same report and status from both; the repaired image is clean for
# qemu-img and reads as the damaged one did.  Damage to the refcount
# structure itself (rb-*, rt-*, refzero) makes -r all rebuild it, at the
# same places as QEMU (same end offset); -r leaks then stops with EIO.
rebuilt="refzero rb-zero rb-noise rt-outside rt-outside1 rb-on-l2 l2-on-rb"
for k in $rebuilt l2-on-l1 shared; do mkimg "$k.qcow2" "$k"; done
for k in leak ref2 corruptbit $rebuilt l2-on-l1 shared; do
    same_out "check $k" check "$k.qcow2"
    for r in leaks all; do
        cp "$k.qcow2" "s-$k-$r.qcow2"; cp "$k.qcow2" "q-$k-$r.qcow2"
        a=$("$IMG" check -r $r "s-$k-$r.qcow2" 2>/dev/null); sa=$?
        b=$(qemu-img check -r $r "q-$k-$r.qcow2" 2>/dev/null); sb=$?
        if [ "$a" == "$b" ] && [ $sa -eq $sb ]; then ok "check -r $r $k: same report (status $sa)"
        else bad "check -r $r $k: $sa vs $sb"; diff <(echo "$a") <(echo "$b") | head; fi
        if [ $sa -eq 0 ]; then
            check_ok "check -r $r $k: qemu-img finds it clean" "s-$k-$r.qcow2"
            compare_ok "check -r $r $k: data kept" "s-$k-$r.qcow2" "q-$k-$r.qcow2"
        fi
    done
done
cp leak.qcow2 j.qcow2; cp leak.qcow2 jq.qcow2
a=$("$IMG" check -r leaks --output=json j.qcow2 2>/dev/null); b=$(qemu-img check -r leaks --output=json jq.qcow2 2>/dev/null)
[ "$a" == "${b//jq.qcow2/j.qcow2}" ] && ok "check -r leaks --output=json: leaks-fixed as qemu-img" || bad "check -r json: $a vs $b"
for k in ${rebuilt% l2-on-rb}; do
    qemu-io -r -c 'read -P 1 0 256k' -c 'read -P 2 8M 64k' -c 'read -P 0 256k 7936k' \
        "s-$k-all.qcow2" >/dev/null 2>&1 && ok "check -r all $k: qemu-io reads the data" \
        || bad "check -r all $k: data lost"
done
# Several refcount blocks, a table of several clusters, 64- and 1-bit
# refcounts, a snapshot: the second block wiped, then rebuilt as QEMU
# rebuilds it.
for o in refcount_bits=64 refcount_bits=1; do
    qemu-img create -q -f qcow2 -o $o,cluster_size=512 w.qcow2 16M
    qio -c 'write -P 1 0 3M' -c 'write -P 2 8M 64k' w.qcow2
    qemu-img snapshot -c s1 w.qcow2
    qio -c 'write -P 3 1M 1M' w.qcow2
    python3 -c "
import struct;d=open('w.qcow2','r+b');d.seek(48);rt=struct.unpack('>Q',d.read(8))[0]
d.seek(rt+8);rb=struct.unpack('>Q',d.read(8))[0];d.seek(rb);d.write(bytes(512))"
    cp w.qcow2 ws.qcow2; cp w.qcow2 wq.qcow2
    same_out "check $o, a block wiped" check w.qcow2
    a=$("$IMG" check -r all ws.qcow2 2>/dev/null); sa=$?
    b=$(qemu-img check -r all wq.qcow2 2>/dev/null); sb=$?
    if [ "$a" == "$b" ] && [ $sa -eq 0 ] && [ $sb -eq 0 ]; then ok "check -r all $o: same rebuild"
    else bad "check -r all $o: $sa vs $sb"; diff <(echo "$a") <(echo "$b") | head; fi
    check_ok "check -r all $o: qemu-img finds it clean" ws.qcow2
    qemu-io -r -c 'read -P 1 0 1M' -c 'read -P 3 1M 1M' -c 'read -P 1 2M 1M' -c 'read -P 2 8M 64k' \
        ws.qcow2 >/dev/null 2>&1 && ok "check -r all $o: data reads back" || bad "check -r all $o: data"
    [ $o == refcount_bits=1 ] && continue  # a snapshot's refcount 2 does not fit
    qemu-img snapshot -a s1 ws.qcow2 && qemu-io -r -c 'read -P 1 0 3M' ws.qcow2 >/dev/null 2>&1 \
        && ok "check -r all $o: the snapshot reads back" || bad "check -r all $o: snapshot data"
done
# A reftable entry that is unaligned or has reserved bits: QEMU's rebuild
# trips over the old entry in its overlap check and fails; strata's
# replaces it and leaves the image clean.
for k in rt-unaligned rt-reserved; do
    mkimg "$k.qcow2" "$k"
    same_out "check $k" check "$k.qcow2"
    cp "$k.qcow2" "s-$k.qcow2"
    "$IMG" check -r all "s-$k.qcow2" >out 2>/dev/null; st=$?
    [ $st -eq 0 ] && grep -q 'Double checking' out && ok "check -r all $k: rebuilt" || bad "check -r all $k: $st $(cat out)"
    check_ok "check -r all $k: qemu-img finds it clean" "s-$k.qcow2"
    compare_ok "check -r all $k: data kept" "s-$k.qcow2" clean.qcow2
done
# The corrupt bit stays when the repair cannot clear the corruption.
cp refzero.qcow2 rzl.qcow2
python3 -c "
import struct,sys;d=open('rzl.qcow2','r+b');d.seek(72);v=struct.unpack('>Q',d.read(8))[0];d.seek(72);d.write(struct.pack('>Q',v|2))"
"$IMG" check -r leaks rzl.qcow2 >/dev/null 2>&1; st=$?
[ $st -eq 1 ] && qemu-img info rzl.qcow2 | grep -q 'corrupt: true' && ok "check -r leaks on a corrupt image needing a rebuild: bit kept, exit 1" || bad "check -r leaks corrupt: $st"

# ---- check: bad input ----
sum=$(sha256sum leak.qcow2)
refuse "check: unknown -r value" leak.qcow2 check -r some leak.qcow2
grep -q "Unknown option value for -r (expecting 'leaks' or 'all'): some" err && ok "check -r: qemu-img's words" || bad "check -r words: $(cat err)"
refuse "check: bad --output" leak.qcow2 check --output=xml leak.qcow2
refuse "check: missing file" - check nothere.qcow2
refuse "check: wrong format" raw.img check -f qcow2 raw.img
refuse "check: unknown format" leak.qcow2 check -f vmdkx leak.qcow2
refuse "check: nonsense flag" leak.qcow2 check --frobnicate leak.qcow2
refuse "check: two files" leak.qcow2 check leak.qcow2 clean.qcow2
refuse "check: no file" - check
[ "$sum" == "$(sha256sum leak.qcow2)" ] && ok "check without -r: image untouched" || bad "check changed the image"

# ---- snapshot ----
mkimg sn.qcow2; cp sn.qcow2 snq.qcow2
for f in sn snq; do
    tool=qemu-img; [ $f == sn ] && tool=$IMG
    "$tool" snapshot -c first $f.qcow2 || bad "$tool snapshot -c first"
    qio -c 'write -P 9 0 64k' $f.qcow2
    "$tool" snapshot -c a-rather-long-snapshot-name $f.qcow2
    "$tool" snapshot -c first $f.qcow2
    qio -c 'write -P 8 1M 64k' $f.qcow2
done
# Dates differ by the second the two were made: compare all but DATE.
cols() { sed -E 's/[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9:]{8}/YYYY-MM-DD hh:mm:ss/'; }
a=$("$IMG" snapshot -l sn.qcow2 | cols); b=$(qemu-img snapshot -l snq.qcow2 | cols)
[ "$a" == "$b" ] && ok "snapshot -l: qemu-img's columns" || { bad "snapshot -l"; diff <(echo "$a") <(echo "$b"); }
same "snapshot -l of qemu-img's snapshots" snapshot -l snq.qcow2
same "snapshot without an action does nothing" snapshot snq.qcow2
same "snapshot -l without snapshots" snapshot -l clean.qcow2
same_out "snapshot -l of a raw image" snapshot -l raw.img
check_ok "snapshot -c: check clean" sn.qcow2
"$IMG" snapshot -a 2 sn.qcow2 && qemu-img snapshot -a 2 snq.qcow2
compare_ok "snapshot -a by ID: same disk as qemu-img's" sn.qcow2 snq.qcow2
qemu-io -c 'read -P 9 0 64k' -c 'read -P 0 1M 64k' sn.qcow2 >/dev/null 2>&1 && ok "snapshot -a: the snapshot's data" || bad "snapshot -a: wrong data"
"$IMG" snapshot -a first sn.qcow2 && qemu-img snapshot -a first snq.qcow2
compare_ok "snapshot -a by name (first match)" sn.qcow2 snq.qcow2
qemu-io -c 'read -P 1 0 64k' sn.qcow2 >/dev/null 2>&1 && ok "snapshot -a first: the first snapshot's data" || bad "snapshot -a first: wrong data"
"$IMG" snapshot -d first sn.qcow2 && qemu-img snapshot -d first snq.qcow2
a=$("$IMG" snapshot -l sn.qcow2 | cols); b=$(qemu-img snapshot -l snq.qcow2 | cols)
[ "$a" == "$b" ] && ok "snapshot -d by name: same table" || { bad "snapshot -d"; diff <(echo "$a") <(echo "$b"); }
check_ok "snapshot -a/-d: check clean" sn.qcow2
# strata's snapshots seen by qemu-img, and qemu-img's applied by strata
qemu-img snapshot -a 2 sn.qcow2 2>/dev/null && ok "qemu-img applies strata's snapshot" || bad "qemu-img -a on strata's"
same "snapshot -a missing" snapshot -a nope snq.qcow2
same "snapshot -d missing" snapshot -d nope snq.qcow2
same "snapshot: mixed actions" snapshot -l -c x snq.qcow2
same "snapshot: no file" snapshot -l
same_out "snapshot -c on raw" snapshot -c x raw.img
same_out "snapshot -a on raw" snapshot -a x raw.img
refuse "snapshot -c on raw: refused" raw.img snapshot -c x -f raw raw.img
same "snapshot -U with -c" snapshot -U -c x snq.qcow2
same "snapshot: missing file" snapshot -l nothere.qcow2
refuse "snapshot -a missing: image untouched" sn.qcow2 snapshot -a nope sn.qcow2
refuse "snapshot -d missing: image untouched" sn.qcow2 snapshot -d nope sn.qcow2
refuse "snapshot: nonsense flag" sn.qcow2 snapshot --frobnicate -l sn.qcow2
refuse "snapshot -c: missing argument" sn.qcow2 snapshot sn.qcow2 -c
refuse "snapshot: wrong format" raw.img snapshot -f qcow2 -l raw.img

finish
