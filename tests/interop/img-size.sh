#!/usr/bin/env bash
# strata-img resize, measure and amend against qemu-img on copies of the
# same images: the same lines and exit status, the same resulting images
# (qemu-img compare, info, check), bad input refused with the image
# untouched; and -p drawing progress only on a terminal unless forced.
#
#   img-size.sh PATH/TO/strata-img
set -uo pipefail
IMG=$(realpath "${1:?usage: img-size.sh PATH/TO/strata-img}")
. "$(dirname "$(realpath "$0")")/img-lib.sh"

# twin ARGS...: runs strata-img on the S copies and qemu-img on the Q
# copies (@r, @e, @m, @o name them) and compares output and status.
twin() {
    local a="$*" A B x y sx sy
    A=${a//@r/rS.img}; A=${A//@e/eS.qcow2}; A=${A//@m/mS.qcow2}; A=${A//@o/oS.qcow2}
    B=${a//@r/rQ.img}; B=${B//@e/eQ.qcow2}; B=${B//@m/mQ.qcow2}; B=${B//@o/oQ.qcow2}
    x=$("$IMG" $A 2>&1); sx=$?; y=$(qemu-img $B 2>&1); sy=$?
    x=${x//strata-img/qemu-img}; x=${x//S.qcow2/Q.qcow2}; x=${x//rS.img/rQ.img}
    if [ "$x" == "$y" ] && [ $sx -eq $sy ]; then ok "$a (status $sx)"
    else bad "$a: '$x' ($sx) vs '$y' ($sy)"; fi
}
same_images() {
    local what=$1
    [ "$(stat -c %s rS.img)" == "$(stat -c %s rQ.img)" ] && cmp -s rS.img rQ.img \
        && ok "$what: raw images equal" || bad "$what: raw images differ"
    for f in e m o; do
        [ -e ${f}S.qcow2 ] || continue
        compare_ok "$what: ${f} same content" ${f}S.qcow2 ${f}Q.qcow2
        check_ok "$what: ${f} checks clean" ${f}S.qcow2
        d=$(diff <(qemu-img info ${f}S.qcow2 | grep -v 'disk size\|^image:\|backing file:') \
                 <(qemu-img info ${f}Q.qcow2 | grep -v 'disk size\|^image:\|backing file:'))
        [ -z "$d" ] && ok "$what: ${f} same info" || bad "$what: ${f} info: $d"
    done
}

for t in S Q; do
    qemu-img create -q -f raw r$t.img 1M
    qio -f raw -c 'write -P 3 0 1M' r$t.img
    qemu-img create -q -f qcow2 e$t.qcow2 1M
    qemu-img create -q -f qcow2 m$t.qcow2 64M
    qio -c 'write -P 1 0 300k' -c 'write -z 1M 128k' -c 'write -z 4M 4k' m$t.qcow2
    qemu-img create -q -f qcow2 -b m$t.qcow2 -F qcow2 o$t.qcow2
    qio -c 'write -z 0 64k' -c 'write -P 5 2M 64k' o$t.qcow2
done

# ---- resize ----
for a in "" "@r" "-f raw @r +1M" "-f raw @r -512k" "-f raw --shrink @r -512k" \
    "-f raw @r 0" "-f raw --shrink @r -20M" "-f raw @r 12abc" "-f raw @r -- -5" \
    "-f raw nothere.img 1M" "@e +1M" "@e 1000" "@e +1000" "@e 3M" \
    "--preallocation=xyz -f raw @r +1M" "-q -f raw @r +1M" "-f raw @r 100E" \
    "-f raw @r 2.5M" "@m 1G" "@m 200k" "--shrink @e 100" \
    "--shrink @e 0" "--shrink @o 1M" "--shrink @o -- -512k" "--shrink @e 1536"; do
    twin resize $a
done
same_images "resize"
# QEMU's discard allocates an L2 table for every empty L1 entry it
# crosses (its shrink then frees them again); strata skips them, so its
# file may come out smaller, never larger.
for f in o e; do
    [ $(stat -c %s ${f}S.qcow2) -le $(stat -c %s ${f}Q.qcow2) ] && ok "resize --shrink: $f no larger than qemu-img's" \
        || bad "resize --shrink: $f larger than qemu-img's"
done

# ---- resize --shrink, the cases with more metadata ----
# shrinkpair NAME CREATE-OPTS SIZE NEW-SIZE QEMU-IO-ARGS...: the same image twice,
# shrunk by each tool, must come out byte for byte the same (discarded
# tail, L2 tables and refcount blocks dropped, file truncated).
shrinkpair() {
    local n=$1 o=$2 vsize=$3 size=$4; shift 4
    for t in S Q; do
        qemu-img create -q -f qcow2 -o "$o" $n$t.qcow2 $vsize
        qio "$@" $n$t.qcow2
    done
    "$IMG" resize -q --shrink ${n}S.qcow2 $size; qemu-img resize -q --shrink ${n}Q.qcow2 $size
    check_ok "shrink $n: qemu-img check clean" ${n}S.qcow2
    compare_ok "shrink $n: same content" ${n}S.qcow2 ${n}Q.qcow2
    if [ $n == l2s ]; then   # every L1 entry has its table: no difference
        cmp -s ${n}S.qcow2 ${n}Q.qcow2 && ok "shrink $n: byte for byte as qemu-img's ($(stat -c %s ${n}S.qcow2) bytes)" \
            || bad "shrink $n: differs from qemu-img's"
    else
        [ $(stat -c %s ${n}S.qcow2) -le $(stat -c %s ${n}Q.qcow2) ] \
            && ok "shrink $n: file no larger than qemu-img's ($(stat -c %s ${n}S.qcow2) vs $(stat -c %s ${n}Q.qcow2))" \
            || bad "shrink $n: file larger than qemu-img's"
    fi
    [ "$(qemu-img info ${n}S.qcow2 | grep virtual)" == "$(qemu-img info ${n}Q.qcow2 | grep virtual)" ] \
        && ok "shrink $n: same virtual size" || bad "shrink $n: virtual size"
}
shrinkpair l2s cluster_size=65536 1G 95M -c 'write -P 1 0 1M' -c 'write -P 2 90M 1M' \
    -c 'write -P 3 600M 2M' -c 'write -P 4 1000M 1M'
# (QEMU's shrink syncs each of those L2 tables: a small disk keeps it
# quick.)
shrinkpair rbs cluster_size=512,refcount_bits=16 16M 3M -c 'write -P 1 0 2M' \
    -c 'write -P 2 10M 1M' -c 'write -P 3 15M 512k'
shrinkpair mid cluster_size=4096 64M 1000k -c 'write -P 1 0 2M' -c 'write -z 60M 64k'
qemu-io -r -c 'read -P 1 0 1000k' midS.qcow2 >/dev/null 2>&1 && ok "shrink mid: data before the end kept" \
    || bad "shrink mid: data lost"
# Internal snapshots keep their data: QEMU 7.2 shrinks a v3 image that
# has them (a v2 one it refuses, as for any resize).
for t in S Q; do
    qemu-img create -q -f qcow2 sn$t.qcow2 1G
    qio -c 'write -P 1 0 1M' -c 'write -P 4 1000M 1M' sn$t.qcow2
    qemu-img snapshot -c s1 sn$t.qcow2
    qio -c 'write -P 5 1000M 64k' sn$t.qcow2
done
"$IMG" resize -q --shrink snS.qcow2 95M && qemu-img resize -q --shrink snQ.qcow2 95M \
    && ok "shrink with a snapshot: both shrink" || bad "shrink with a snapshot: refused"
check_ok "shrink with a snapshot: check clean" snS.qcow2
compare_ok "shrink with a snapshot: same content" snS.qcow2 snQ.qcow2
qemu-img snapshot -a s1 snS.qcow2 && qemu-io -r -c 'read -P 4 1000M 1M' snS.qcow2 >/dev/null 2>&1 \
    && ok "shrink with a snapshot: the snapshot still reads its tail" || bad "shrink with a snapshot: snapshot data"
check_ok "shrink with a snapshot: clean after applying it" snS.qcow2
for t in S Q; do
    qemu-img create -q -f qcow2 -o compat=0.10 v2$t.qcow2 1G
    qemu-img snapshot -c s1 v2$t.qcow2
done
a=$("$IMG" resize --shrink v2S.qcow2 95M 2>&1); b=$(qemu-img resize --shrink v2Q.qcow2 95M 2>&1)
[ "${a//strata-img/qemu-img}" == "${b//v2Q/v2S}" ] && ok "resize --shrink v2 with snapshots: qemu-img's refusal" || bad "v2 shrink: $a vs $b"
refuse "resize --shrink v2 with snapshots: image untouched" v2S.qcow2 resize --shrink v2S.qcow2 95M
refuse "resize: shrink without --shrink" rS.img resize -f raw rS.img -1k
refuse "resize: wrong format" rS.img resize -f qcow2 rS.img 5M
refuse "resize: nonsense flag" rS.img resize --frobnicate -f raw rS.img 5M
refuse "resize: bad size" rS.img resize -f raw rS.img 5Q
refuse "resize: too large" eS.qcow2 resize eS.qcow2 8E
refuse "resize: preallocation not yet" rS.img resize --preallocation=full -f raw rS.img +1M

# ---- measure ----
qemu-img create -q -f raw sparse.img 8M
qio -f raw -c 'write -P 1 64k 100k' -c 'write -P 2 5M 1M' sparse.img
for a in "--size 1G -O qcow2" "--size 1G -O raw" "--size 1G -O qcow2 --output=json" \
    "--size 1G -O raw --output=json" "-O qcow2 mQ.qcow2" "-O qcow2 --output=json mQ.qcow2" \
    "-O raw mQ.qcow2" "-O qcow2 -o cluster_size=4k mQ.qcow2" "-O qcow2 oQ.qcow2" \
    "-O qcow2 --output=json oQ.qcow2" "-f raw -O qcow2 sparse.img" \
    "-O qcow2 -o preallocation=metadata --size 1G" "-O qcow2 -o preallocation=full --size 1G" \
    "-O qcow2 -o foo=bar --size 1G" "--size 1G" "-O qcow2" "-O qcow2 --size 1G mQ.qcow2" \
    "-O qcow2 --size 12x" "-O vmdkx --size 1G" "-O qcow2 nothere" "-O qcow2 -o size=2G --size 1G" \
    "-O qcow2 -o compat=0.10,refcount_bits=1 --size 10G" "-O qcow2 -o size=1G" \
    "-O qcow2 -o backing_file=mQ.qcow2 --size 1G" "-O qcow2 --size 0" \
    "-O qcow2 -o cluster_size=1000 --size 1G" "-O qcow2 -o compat=2 --size 1G" \
    "-O qcow2 -o refcount_bits=3 --size 1G" "-O qcow2 -o preallocation=bad --size 1G" \
    "-O raw -o cluster_size=4k --size 1G" "-O qcow2 -o cluster_size=512,refcount_bits=64 --size 100G" \
    "-O qcow2 -o cluster_size=2M,refcount_bits=1 --size 3T" "-O qcow2 -o compat=0.10 mQ.qcow2" \
    "-O qcow2 --size 1000" "--output=xml --size 1G"; do
    same "measure $a" measure $a
done
# The figure holds: a convert to qcow2 needs no more than "required".
req=$("$IMG" measure -O qcow2 --output=json oQ.qcow2 | python3 -c 'import json,sys; print(json.load(sys.stdin)["required"])')
qemu-img convert -O qcow2 oQ.qcow2 conv.qcow2
[ "$(stat -c %s conv.qcow2)" -le "$req" ] && ok "measure: converted file fits in required ($req)" || bad "measure: $(stat -c %s conv.qcow2) > $req"
refuse "measure: unknown -o named" - measure -O qcow2 -o foo=bar --size 1G
grep -q "'foo'" err && ok "measure: -o foo named" || bad "measure: foo not named"
refuse "measure: nonsense flag" - measure --frobnicate --size 1G

# ---- amend ----
for a in "-o compat=0.10 @m" "-o compat=1.1 @m" "-o lazy_refcounts=on @m" \
    "-o compat=0.10 @m" "-o lazy_refcounts=off @m" "-o compat=0.10 @m" \
    "-o compat=0.10 @o" "-o refcount_bits=8 @m" "-o refcount_bits=3 @m" \
    "-o foo=bar @m" "@m" "-o cluster_size=4k @m" "-o size=2G @m" \
    "-o compat=2.0 @m" "-f raw -o size=1M @r" "-o compat=1.1 nothere" \
    "-o lazy_refcounts=maybe @m" "-o backing_file=x @m" "-o preallocation=full @m" \
    "-o compat=1.1,lazy_refcounts=on @m" "-o compat=1.1 @o" "-o refcount_bits=16 @m"; do
    twin amend $a
done
same_images "amend"
qemu-io -c 'read -P 1 0 300k' -c 'read -P 0 1M 128k' mS.qcow2 >/dev/null 2>&1 && ok "amend: data kept" || bad "amend: data"
refuse "amend: refcount width change refused by name" mS.qcow2 amend -o refcount_bits=64 mS.qcow2
grep -q "refcount width" err && ok "amend: says refcount width" || bad "amend refcount: $(cat err)"
refuse "amend: unknown -o named" mS.qcow2 amend -o foo=bar mS.qcow2
refuse "amend: lazy on v2" mS.qcow2 amend -o compat=0.10,lazy_refcounts=on mS.qcow2
refuse "amend: raw" rS.img amend -f raw -o size=2M rS.img
refuse "amend: nonsense flag" mS.qcow2 amend --frobnicate -o compat=1.1 mS.qcow2
qemu-img snapshot -c s mS.qcow2
refuse "amend: compat change with snapshots" mS.qcow2 amend -o compat=0.10 mS.qcow2

# ---- -p: progress only on a terminal, unless forced ----
qemu-img create -q -f qcow2 pb.qcow2 8M
qio -c 'write -P 1 0 4M' pb.qcow2
"$IMG" convert -p -O qcow2 pb.qcow2 p1.qcow2 >out 2>&1
[ ! -s out ] && ok "convert -p: quiet when stdout is no terminal" || bad "convert -p printed: $(cat out | od -c | head -2)"
STRATA_IMG_PROGRESS=force "$IMG" convert -p -O qcow2 pb.qcow2 p2.qcow2 >out 2>&1
grep -q '(100.00/100%)' out && ok "convert -p forced: progress drawn" || bad "convert -p forced: $(cat out)"
qemu-img create -q -f qcow2 -b pb.qcow2 -F qcow2 pt.qcow2
qio -c 'write -P 2 0 1M' pt.qcow2
STRATA_IMG_PROGRESS=force "$IMG" commit -p pt.qcow2 >out 2>&1
grep -q '(100.00/100%)' out && ok "commit -p forced: progress drawn" || bad "commit -p forced: $(cat out)"
qemu-img create -q -f qcow2 -b pb.qcow2 -F qcow2 pr.qcow2
STRATA_IMG_PROGRESS=force "$IMG" rebase -p -b "" pr.qcow2 >out 2>&1
grep -q '(100.00/100%)' out && ok "rebase -p forced: progress drawn" || bad "rebase -p forced: $(cat out)"
if command -v script >/dev/null; then
    script -qec "'$IMG' convert -p -O qcow2 pb.qcow2 p3.qcow2" /dev/null >out 2>&1
    grep -q '(100.00/100%)' out && ok "convert -p on a terminal: progress drawn" || bad "convert -p tty: $(cat out)"
fi

finish
