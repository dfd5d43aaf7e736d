#!/usr/bin/env bash
# strata-img create, info, map, compare, convert, commit, rebase against
# qemu-img on the same inputs: the same lines, the same JSON (after
# normalising actual-size), images that qemu-img checks clean and
# compares equal, and bad input refused with the image left untouched.
#
#   img-tools.sh PATH/TO/strata-img
set -uo pipefail

IMG=$(realpath "${1:?usage: img-tools.sh PATH/TO/strata-img}")
. "$(dirname "$(realpath "$0")")/img-lib.sh"

# same_output DESC ARGS...: strata-img and qemu-img print the same.
same_output() {
    local what=$1; shift
    local a b
    a=$("$IMG" "$@" 2>&1); b=$(qemu-img "$@" 2>&1)
    if [ "$a" == "$b" ]; then ok "$what"; else
        bad "$what"; diff <(echo "$a") <(echo "$b") | head -20; fi
}

# same_json DESC ARGS...: equal JSON once actual-size is dropped.
norm='import json,sys
def n(o):
    if isinstance(o, dict):
        return {k: n(v) for k, v in o.items() if k != "actual-size"}
    if isinstance(o, list):
        return [n(v) for v in o]
    return o
print(json.dumps(n(json.load(sys.stdin)), sort_keys=True))'
same_json() {
    local what=$1; shift
    local a b
    a=$("$IMG" "$@" | python3 -c "$norm"); b=$(qemu-img "$@" | python3 -c "$norm")
    if [ -n "$a" ] && [ "$a" == "$b" ]; then ok "$what"; else
        bad "$what: $a vs $b"; fi
}

# ---- create ----
for args in "-f qcow2 c1.qcow2 1G" "-f raw c2.img 1M" "-f qcow2 c3.qcow2 1.5k" \
    "-f qcow2 -o cluster_size=4096,lazy_refcounts=on,refcount_bits=8 c4.qcow2 10M" \
    "-f qcow2 -o compat=0.10 c5.qcow2 64M" "-f qcow2 -o size=2M c6.qcow2" \
    "-f qcow2 -b c1.qcow2 -F qcow2 c7.qcow2" "-u -f qcow2 -b gone -F qcow2 c8.qcow2 1M" \
    "-q -f qcow2 c9.qcow2 1M" "-f raw -o preallocation=off c10.img 1M"; do
    a=$("$IMG" create $args 2>&1); sa=$?
    f=$(echo "$args" | awk '{print $(NF-1)}'); [[ $f == *.* ]] || f=$(echo "$args" | awk '{print $NF}')
    mv "$f" "s-$f" 2>/dev/null
    b=$(qemu-img create $args 2>&1); sb=$?
    if [ "$a" == "$b" ] && [ $sa -eq $sb ]; then ok "create $args: same line"
    else bad "create $args: '$a' vs '$b'"; fi
    if [ -e "s-$f" ]; then
        d=$(diff <(qemu-img info --output=json "s-$f" | python3 -c "$norm" | sed "s/s-$f/$f/") \
                 <(qemu-img info --output=json "$f" | python3 -c "$norm") 2>&1)
        [ -z "$d" ] && ok "create $args: same image" || bad "create $args: $d"
        [[ $f == *.qcow2 ]] && [ "$f" != c8.qcow2 ] && check_ok "create $args: check clean" "s-$f"
    fi
done
size7=$(qemu-img info --output=json s-c7.qcow2 | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')
[ "$size7" == 1073741824 ] && ok "create: size from the backing file" || bad "create: size $size7"

refuse "create: -b without -F" - create -f qcow2 -b c1.qcow2 x1.qcow2
[ -e x1.qcow2 ] && bad "create -b without -F made a file" || ok "create -b without -F: no file"
refuse "create: unknown -o named" - create -f qcow2 -o foo=bar x2.qcow2 1M
grep -q "Invalid parameter 'foo'" err && ok "create: -o foo named" || bad "create: -o foo not named"
refuse "create: unknown format" - create -f vmdkx x3.qcow2 1M
refuse "create: no size" - create -f qcow2 x4.qcow2
refuse "create: size too large" - create -f qcow2 x5.qcow2 100E
refuse "create: size not a number" - create -f qcow2 x6.qcow2 12abc
refuse "create: negative size" - create -f qcow2 x7.qcow2 -5
refuse "create: missing backing" - create -f qcow2 -b gone -F qcow2 x8.qcow2 1M
refuse "create: bad cluster size" - create -f qcow2 -o cluster_size=1000 x9.qcow2 1M
refuse "create: nonsense flag" - create --frobnicate -f qcow2 x10.qcow2 1M
refuse "create: no file name" - create

# ---- a chain to look at: base <- mid <- top ----
qemu-img create -q -f qcow2 base.qcow2 4M
qio -c 'write -P 1 0 64k' -c 'write -z 1M 64k' -c 'write -P 3 2M 100k' base.qcow2
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2
qio -c 'write -P 2 64k 64k' -c 'write -z 2M 64k' mid.qcow2
qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2
qio -c 'write -P 4 3M 4k' top.qcow2
mkdir -p sub
qemu-img create -q -f qcow2 -b ../base.qcow2 -F qcow2 sub/rel.qcow2
qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 1G
qemu-img create -q -f raw raw.img 1M
qio -f raw -c 'write -P 1 4k 4k' raw.img

# ---- info, map ----
for f in base.qcow2 mid.qcow2 top.qcow2 sub/rel.qcow2 v2.qcow2 raw.img; do
    same_json "info json $f" info --output=json "$f"
    same_json "info json chain $f" info --output=json --backing-chain "$f"
    same_output "info human $f" info --backing-chain "$f"
    same_output "map json $f" map --output=json "$f"
    same_output "map human $f" map "$f"
done
same_json "info -U -f qcow2" info -U -f qcow2 --output=json top.qcow2
refuse "info: missing file" - info gone.qcow2
refuse "info: wrong format" raw.img info -f qcow2 raw.img
refuse "info: bad --output" top.qcow2 info --output=xml top.qcow2
refuse "info: nonsense flag" top.qcow2 info --frobnicate top.qcow2
refuse "map: missing file" - map gone.qcow2
refuse "map: wrong format" raw.img map -f qcow2 raw.img
refuse "map: bad --output" top.qcow2 map --output=xml top.qcow2

# ---- compare ----
cmp_status() {
    local what=$1 want=$2; shift 2
    local a b sa sb
    a=$("$IMG" compare "$@" 2>/dev/null); sa=$?
    b=$(qemu-img compare "$@" 2>/dev/null); sb=$?
    if [ $sa -eq "$want" ] && [ $sa -eq $sb ] && [ "$a" == "$b" ]; then ok "$what"
    else bad "$what: $sa '$a' vs $sb '$b'"; fi
}
qemu-img create -q -f raw big.img 2M
qio -f raw -c 'write -P 1 4k 4k' big.img
cmp_status "compare: identical" 0 top.qcow2 top.qcow2
cmp_status "compare: mismatch offset" 1 top.qcow2 mid.qcow2
cmp_status "compare: size mismatch, equal" 0 raw.img big.img
cmp_status "compare: strict size mismatch" 1 -s raw.img big.img
qio -f raw -c 'write -P 5 1536k 1' big.img
cmp_status "compare: mismatch in the tail" 1 raw.img big.img
cmp_status "compare: missing file" 2 top.qcow2 gone.qcow2
cmp_status "compare: wrong format" 2 -F qcow2 top.qcow2 raw.img

# ---- json: names: QEMU writes them into headers, strata reads them ----
J='json:{"driver":"qcow2","file":{"driver":"file","filename":"'$PWD'/mid.qcow2"}}'
qemu-img create -q -f qcow2 -b "$J" -F qcow2 jtop.qcow2
qio -c 'write -P 6 3M 4k' jtop.qcow2
qemu-img convert -O qcow2 jtop.qcow2 jflat.qcow2
same_output "info: a json: backing name" info --backing-chain jtop.qcow2
same_output "map: a json: backing name" map --output=json jtop.qcow2
cmp_status "compare: through a json: backing name" 0 jtop.qcow2 jflat.qcow2
for spec in "$J" 'json:{"file.filename":"top.qcow2"}' \
    'json:{"driver":"qcow2","file.filename":"top.qcow2","backing":null}' \
    'json:{"driver":"raw","file":{"filename":"raw.img"}}'; do
    same_output "info $spec" info "$spec"
    same_output "map $spec" map --output=json "$spec"
done
# What reads as zeroes where no layer holds data: only a format that
# takes backing files says so (raw over null-co without read-zeroes
# does not).
for spec in 'json:{"driver":"null-co","size":1048576}' \
    'json:{"driver":"raw","file":{"driver":"null-co","size":1048576}}' \
    'json:{"driver":"raw","file":{"driver":"null-co","size":1048576,"read-zeroes":true}}' \
    'json:{"driver":"raw","file":{"driver":"qcow2","file.filename":"base.qcow2"}}'; do
    same_output "map $spec" map --output=json "$spec"
done
same_output "info -f over a json: name's driver" info -f raw \
    'json:{"driver":"qcow2","file.filename":"top.qcow2"}'
"$IMG" convert -O qcow2 "$J" jconv.qcow2 && compare_ok "convert from a json: name" jconv.qcow2 mid.qcow2
refuse "info: json: not an object" - info 'json:[1]'
refuse "info: json: cut short" - info 'json:{"driver":"qcow2"'
refuse "info: json: empty" - info 'json:'
refuse "info: json: neither driver nor file" - info 'json:{"filename":"top.qcow2"}'
refuse "info: json: a key twice" - info 'json:{"file.filename":"top.qcow2","file":{"filename":"x"}}'
refuse "info: json: an empty key part" - info 'json:{"driver":"qcow2","file.":"x"}'
refuse "info: json: driver not a string" - info 'json:{"driver":5,"file.filename":"top.qcow2"}'
refuse "info: json: file names no file" - info 'json:{"file":{"driver":"file"}}'
refuse "info: json: file not an object" - info 'json:{"file":"top.qcow2"}'
refuse "info: json: a format with a filename, no file" - info 'json:{"driver":"qcow2","filename":"top.qcow2"}'
qemu-img create -q -f qcow2 jloop.qcow2 1M
qemu-img rebase -u -f qcow2 -b 'json:{"driver":"qcow2","file.filename":"'$PWD'/jloop.qcow2"}' -F qcow2 jloop.qcow2
refuse "info: a json: backing name that loops" jloop.qcow2 info --backing-chain jloop.qcow2
refuse "rebase -u: never writes a json: name" top.qcow2 rebase -u -b "$J" -F qcow2 top.qcow2
refuse "rebase: never writes a json: name" top.qcow2 rebase -b "$J" -F qcow2 top.qcow2
refuse "create: never writes a json: name" - create -f qcow2 -b "$J" -F qcow2 jnew.qcow2
[ -e jnew.qcow2 ] && bad "create: left jnew.qcow2 behind" || ok "create: no file left"
refuse "convert -B: never writes a json: name" - convert -O qcow2 -B "$J" -F qcow2 top.qcow2 jnew2.qcow2
[ -e jnew2.qcow2 ] && bad "convert -B: left jnew2.qcow2 behind" || ok "convert -B: no file left"

# ---- convert ----
"$IMG" convert -O qcow2 top.qcow2 cv1.qcow2 && check_ok "convert qcow2: clean" cv1.qcow2
compare_ok "convert qcow2: equal" top.qcow2 cv1.qcow2
qemu-img convert -O qcow2 top.qcow2 qcv1.qcow2
same_output "convert qcow2: same map as qemu-img's" map --output=json cv1.qcow2
[ "$(alloc_map cv1.qcow2)" == "$(alloc_map qcv1.qcow2)" ] \
    && ok "convert: holes and zeroes skipped as qemu-img skips them" || bad "convert: allocation differs"
STRATA_IMG_PROGRESS=force "$IMG" convert -p -O raw top.qcow2 cv2.raw >progress && compare_ok "convert raw -p: equal" top.qcow2 cv2.raw
grep -q '(100.00/100%)' progress && ok "convert -p: progress" || bad "convert -p: no progress"
"$IMG" convert -W -m 16 -O qcow2 -o cluster_size=4k top.qcow2 cv3.qcow2 && check_ok "convert -W -m 16: clean" cv3.qcow2
compare_ok "convert -W -m 16: equal" top.qcow2 cv3.qcow2
"$IMG" convert -O qcow2 -B mid.qcow2 -F qcow2 top.qcow2 cv4.qcow2 && compare_ok "convert -B: equal" top.qcow2 cv4.qcow2
[ "$(qemu-img info --output=json cv4.qcow2 | python3 -c 'import json,sys; print(json.load(sys.stdin)["backing-filename"])')" == mid.qcow2 ] \
    && ok "convert -B: backing file" || bad "convert -B: backing file"
"$IMG" convert -O raw raw.img base.qcow2 cat.raw; qemu-img convert -O raw raw.img base.qcow2 qcat.raw
cmp -s cat.raw qcat.raw && ok "convert: two inputs concatenated" || bad "convert: concatenation differs"
qemu-img create -q -f qcow2 cv5.qcow2 4M
qio -c 'write -P 9 0 4M' cv5.qcow2
"$IMG" convert -n -O qcow2 top.qcow2 cv5.qcow2 && compare_ok "convert -n: zeroes written over old data" top.qcow2 cv5.qcow2
for o in compression_type=zlib compression_type=zstd,cluster_size=4k extended_l2=on; do
    "$IMG" convert -c -O qcow2 -o $o top.qcow2 cc.qcow2 && check_ok "convert -c $o: clean" cc.qcow2
    compare_ok "convert -c $o: equal" top.qcow2 cc.qcow2
    qemu-img convert -c -O qcow2 -o $o top.qcow2 qcc.qcow2
    a=$(qemu-img check cc.qcow2 | grep allocated); b=$(qemu-img check qcc.qcow2 | grep allocated)
    [ -n "$a" ] && [ "$a" == "$b" ] && ok "convert -c $o: as many compressed clusters as qemu-img's" \
        || bad "convert -c $o: '$a' vs '$b'"
done
refuse "convert -c: raw target" - convert -c -O raw top.qcow2 x20.raw
grep -q "Compression not supported" err && ok "convert -c raw: says why" || bad "convert -c raw: $(cat err)"
refuse "convert -c -W" - convert -c -W -O qcow2 top.qcow2 x20.qcow2
refuse "convert: -m 17" - convert -m 17 -O qcow2 top.qcow2 x21.qcow2
refuse "convert: unknown -o" - convert -O qcow2 -o foo=1 top.qcow2 x22.qcow2
grep -q "'foo'" err && ok "convert: -o foo named" || bad "convert: -o foo not named"
refuse "convert: missing input" - convert -O qcow2 gone.qcow2 x23.qcow2
refuse "convert: -n missing target" - convert -n -O qcow2 top.qcow2 gone2.qcow2
refuse "convert: -B without -F" - convert -O qcow2 -B mid.qcow2 top.qcow2 x24.qcow2
refuse "convert: unknown output format" - convert -O vmdkx top.qcow2 x25.qcow2
refuse "convert: -n target too small" c2.img convert -n -O raw top.qcow2 c2.img
refuse "convert: nonsense flag" top.qcow2 convert --frobnicate top.qcow2 x26.qcow2

# convert reads ahead of its copy: each layer's file is told (WILLNEED)
# the ranges the copy will read from it, never what a layer above
# replaces.  A raw base with more data than the read-ahead window, a
# middle layer with scattered clusters, a zero and a compressed one, a
# top written backwards.
qemu-img create -q -f raw pfbase.raw 80M
qio -f raw -c 'write -P 9 0 72M' pfbase.raw
qemu-img create -q -f qcow2 -b pfbase.raw -F raw pfmid.qcow2
set --
for c in $(seq 0 3 60); do set -- "$@" -c "write -P $((c + 20)) $((c * 64))k 64k"; done
qio "$@" -c 'write -z 5M 64k' -c 'write -c -P 5 6M 64k' -c 'write -P 7 70M 2M' pfmid.qcow2
qemu-img create -q -f qcow2 -b pfmid.qcow2 -F qcow2 pftop.qcow2
set --
for c in $(seq 90 -2 40); do set -- "$@" -c "write -P $((c + 30)) $((c * 64))k 64k"; done
qio "$@" pftop.qcow2
if command -v strace >/dev/null && strace -f -o /dev/null true 2>/dev/null; then
    strace -f -y -e trace=fadvise64 -o pf.trace "$IMG" convert -O qcow2 pftop.qcow2 pfout.qcow2 \
        && compare_ok "convert with read-ahead: equal" pftop.qcow2 pfout.qcow2
    check_ok "convert with read-ahead: clean" pfout.qcow2
    qemu-img map --output=json pftop.qcow2 >pf.map
    r=$(python3 - pf.trace pf.map <<'PY'
import json, re, sys
files = ["pftop.qcow2", "pfmid.qcow2", "pfbase.raw"]
need = {f: [] for f in files}
for e in json.load(open(sys.argv[2])):
    if e["data"] and not e["zero"] and "offset" in e:
        need[files[e["depth"]]].append((e["offset"], e["offset"] + e["length"]))
for f in files:
    merged = []
    for a, b in sorted(need[f]):
        if merged and merged[-1][1] == a:
            merged[-1][1] = b
        else:
            merged.append([a, b])
    need[f] = merged
hint = {f: [] for f in files}
pat = re.compile(r'fadvise64\(\d+<([^>]*)>, (\d+), (\d+), POSIX_FADV_WILLNEED')
for line in open(sys.argv[1]):
    m = pat.search(line)
    if m and m.group(1).split("/")[-1] in hint:
        a = int(m.group(2))
        hint[m.group(1).split("/")[-1]].append((a, a + int(m.group(3))))
bad = []
for f in files:
    if not hint[f]:
        bad.append("%s: no hint" % f)
    for a, b in hint[f]:
        if not any(x <= a and b <= y for x, y in need[f]):
            bad.append("%s: [%d, %d) is not read" % (f, a, b))
print("; ".join(bad[:5]) if bad else "ok")
PY
)
    [ "$r" == ok ] && ok "convert: read-ahead hints name exactly what each layer gives" \
        || bad "convert: read-ahead hints: $r"
else
    "$IMG" convert -O qcow2 pftop.qcow2 pfout.qcow2 && compare_ok "convert with read-ahead: equal" pftop.qcow2 pfout.qcow2
fi
qemu-img convert -O raw pftop.qcow2 pf.raw
"$IMG" convert -O raw -B pfmid.qcow2 -F qcow2 -O qcow2 pftop.qcow2 pfb.qcow2 \
    && compare_ok "convert -B over a raw base: equal" pf.raw pfb.qcow2
"$IMG" convert -O raw pftop.qcow2 pftop.qcow2 pf2.raw && cmp -s <(cat pf.raw pf.raw) pf2.raw \
    && ok "convert: a chain twice, concatenated" || bad "convert: a chain twice differs"
# A read that fails half-way (blkdebug) fails the convert with the
# error; the read-ahead neither hides it nor keeps the tool waiting.
qemu-img create -q -f qcow2 pfsrc.qcow2 32M
qio -c 'write -P 3 0 24M' pfsrc.qcow2
failing="driver=qcow2,file.driver=blkdebug,file.inject-error.0.event=read_aio"
failing="$failing,file.inject-error.0.errno=5,file.inject-error.0.x-after=8"
failing="$failing,file.image.driver=file,file.image.filename=pfsrc.qcow2"
refuse "convert: a read fails half-way" pfsrc.qcow2 convert --image-opts -O qcow2 "$failing" pffail.qcow2
grep -q "Input/output error" err && ok "convert: the read error named" || bad "convert: read error: $(cat err)"

# ---- commit and rebase: the seeds' offline workflows ----
# base <- sn1 <- sn2 <- sn3, each layer with data and zeroes of its own.
mkchain() {
    rm -rf "$1"; mkdir -p "$1"
    ( cd "$1" || exit 1
      qemu-img create -q -f qcow2 base.qcow2 4M
      qemu-io -c 'write -P 1 0 1M' base.qcow2 >/dev/null
      for i in 1 2 3; do
          p=base; [ $i -gt 1 ] && p=sn$((i - 1))
          qemu-img create -q -f qcow2 -b $p.qcow2 -F qcow2 sn$i.qcow2
          qemu-io -c "write -P $((i + 1)) $((i * 512))k 256k" \
                  -c "write -z $((i * 1024 + 100))k 64k" sn$i.qcow2 >/dev/null
      done )
}
mkchain ref; qemu-img convert -O raw ref/sn3.qcow2 ref.raw

# (1) commit sn2, then rebase -u -b sn1 sn3; qemu-img does the same on a copy.
mkchain w1; mkchain q1
( cd w1 && "$IMG" commit sn2.qcow2 >commit.out && "$IMG" rebase -u -b sn1.qcow2 -F qcow2 sn3.qcow2 ) \
    && ok "workflow 1 ran" || bad "workflow 1 failed"
grep -qx 'Image committed.' w1/commit.out && ok "commit: message" || bad "commit: message"
( cd q1 && qemu-img commit -q sn2.qcow2 && qemu-img rebase -u -b sn1.qcow2 -F qcow2 sn3.qcow2 )
compare_ok "workflow 1: sn3 reads as before" ref.raw w1/sn3.qcow2
compare_ok "workflow 1: sn1 as qemu-img's" q1/sn1.qcow2 w1/sn1.qcow2
compare_ok "workflow 1: sn2 as qemu-img's" q1/sn2.qcow2 w1/sn2.qcow2
check_ok "workflow 1: sn1 clean" w1/sn1.qcow2
check_ok "workflow 1: sn2 clean" w1/sn2.qcow2
same_json "workflow 1: sn3 info as qemu-img's" info --output=json w1/sn3.qcow2

# (2) safe rebase -b sn1 sn3.
mkchain w2; mkchain q2
( cd w2 && "$IMG" rebase -b sn1.qcow2 -F qcow2 sn3.qcow2 ) && ok "workflow 2 ran" || bad "workflow 2 failed"
( cd q2 && qemu-img rebase -b sn1.qcow2 -F qcow2 sn3.qcow2 )
compare_ok "workflow 2: sn3 reads as before" ref.raw w2/sn3.qcow2
compare_ok "workflow 2: as qemu-img's" q2/sn3.qcow2 w2/sn3.qcow2
check_ok "workflow 2: sn3 clean" w2/sn3.qcow2
[ "$(alloc_map w2/sn3.qcow2)" == "$(alloc_map q2/sn3.qcow2)" ] \
    && ok "workflow 2: copies the clusters qemu-img copies" || bad "workflow 2: allocation differs from qemu-img's"

# rebase -b "" flattens; -p draws progress.
mkchain w3
STRATA_IMG_PROGRESS=force "$IMG" rebase -p -b "" w3/sn3.qcow2 >progress && compare_ok "rebase -b '': flat and equal" ref.raw w3/sn3.qcow2
qemu-img info w3/sn3.qcow2 | grep -q 'backing file' && bad "rebase -b '': still has a backing file" || ok "rebase -b '': no backing file"
grep -q '(100.00/100%)' progress && ok "rebase -p: progress" || bad "rebase -p: no progress"

# commit -b base sn3 (implies -d) against qemu-img's.
mkchain w4; mkchain q4
"$IMG" commit -q -p -b w4/base.qcow2 w4/sn3.qcow2 >/dev/null && ok "commit -b ran" || bad "commit -b failed"
( cd q4 && qemu-img commit -q -b base.qcow2 sn3.qcow2 )
compare_ok "commit -b: base as qemu-img's" q4/base.qcow2 w4/base.qcow2
compare_ok "commit -b: base reads as sn3 did" ref.raw w4/base.qcow2
compare_ok "commit -b: sn3 kept (-d implied)" ref.raw w4/sn3.qcow2
check_ok "commit -b: base clean" w4/base.qcow2
mkchain w8
"$IMG" commit -q -b base.qcow2 w8/sn3.qcow2 && compare_ok "commit -b as the chain names it" ref.raw w8/base.qcow2
mkchain w5
"$IMG" commit -d -q w5/sn3.qcow2 && compare_ok "commit -d: sn3 kept" ref.raw w5/sn3.qcow2
compare_ok "commit -d: sn2 has sn3's data" ref.raw w5/sn2.qcow2

# commit reads runs of clusters that lie next to each other in a layer's
# file (apart in the guest) with one request: a top written every other
# cluster, then a zero cluster, a compressed one, and clusters written
# backwards (next in the file, before in the guest), over a middle layer
# with data of its own; plain commit and commit -b against qemu-img's.
mkruns() {
    rm -rf "$1"; mkdir -p "$1"
    ( cd "$1" || exit 1
      qemu-img create -q -f qcow2 base.qcow2 8M
      qemu-io -c 'write -P 9 0 8M' base.qcow2 >/dev/null
      qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2
      qemu-io -c 'write -P 7 1M 64k' -c 'write -P 6 3M 192k' mid.qcow2 >/dev/null
      qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2
      set --
      for c in $(seq 0 2 40); do set -- "$@" -c "write -P $((c + 20)) $((c * 64))k 64k"; done
      set -- "$@" -c 'write -z 2688k 64k' -c 'write -c -P 5 2816k 64k'
      for c in $(seq 60 -2 44); do set -- "$@" -c "write -P $((c + 20)) $((c * 64))k 64k"; done
      qemu-io "$@" top.qcow2 >/dev/null )
}
mkruns runs; qemu-img convert -O raw runs/top.qcow2 runs.raw
mkruns wr1; mkruns qr1
"$IMG" commit -q wr1/top.qcow2 && ok "commit of scattered clusters ran" || bad "commit of scattered clusters failed"
qemu-img commit -q qr1/top.qcow2
compare_ok "commit runs: mid reads as top did" runs.raw wr1/mid.qcow2
compare_ok "commit runs: mid as qemu-img's" qr1/mid.qcow2 wr1/mid.qcow2
check_ok "commit runs: mid clean" wr1/mid.qcow2
mkruns wr2; mkruns qr2
"$IMG" commit -q -b wr2/base.qcow2 wr2/top.qcow2 && ok "commit -b of scattered clusters ran" || bad "commit -b of scattered clusters failed"
( cd qr2 && qemu-img commit -q -b base.qcow2 top.qcow2 )
compare_ok "commit -b runs: base reads as top did" runs.raw wr2/base.qcow2
compare_ok "commit -b runs: base as qemu-img's" qr2/base.qcow2 wr2/base.qcow2
check_ok "commit -b runs: base clean" wr2/base.qcow2
# Same-file-system layers are copied by the kernel (copy_file_range); a
# top on another file system (tmpfs) makes it refuse, and commit copies
# through its buffer instead, with the same result.
shm=$(mktemp -d /dev/shm/strata-img-tools-XXXXXX 2>/dev/null) || shm=
if [ -n "$shm" ] && [ "$(stat -c %d "$shm")" != "$(stat -c %d .)" ]; then
    mkruns wr3
    mv wr3/top.qcow2 "$shm/top.qcow2" && ln -s "$shm/top.qcow2" wr3/top.qcow2
    "$IMG" commit -q wr3/top.qcow2 && ok "commit across file systems ran" || bad "commit across file systems failed"
    compare_ok "commit across file systems: mid reads as top did" runs.raw wr3/mid.qcow2
    check_ok "commit across file systems: mid clean" wr3/mid.qcow2
    check_ok "commit across file systems: top clean" wr3/top.qcow2
fi
[ -n "$shm" ] && rm -rf "$shm"

# The top is emptied in place: an internal snapshot of it survives with
# its data, and the top keeps no data of its own (qemu-img map: nothing
# at depth 0), as qemu-img's commit leaves it.
mkruns wr4; mkruns qr4
qemu-img snapshot -c before wr4/top.qcow2; qemu-img snapshot -c before qr4/top.qcow2
"$IMG" commit -q wr4/top.qcow2 && ok "commit of a top with a snapshot ran" || bad "commit of a top with a snapshot failed"
qemu-img commit -q qr4/top.qcow2
check_ok "commit, top with a snapshot: top clean" wr4/top.qcow2
compare_ok "commit, top with a snapshot: mid as qemu-img's" qr4/mid.qcow2 wr4/mid.qcow2
compare_ok "commit, top with a snapshot: top reads as mid" wr4/mid.qcow2 wr4/top.qcow2
qemu-img snapshot -l wr4/top.qcow2 | grep -q ' before ' && ok "commit keeps the top's snapshot" || bad "commit lost the top's snapshot"
qemu-img convert -f qcow2 -l snapshot.name=before -O raw wr4/top.qcow2 wr4/snap.raw
qemu-img convert -f qcow2 -l snapshot.name=before -O raw qr4/top.qcow2 qr4/snap.raw
cmp -s wr4/snap.raw qr4/snap.raw && ok "commit keeps the snapshot's data" || bad "the snapshot's data changed"
if qemu-img map --output=json wr4/top.qcow2 | grep -q '"depth": 0'; then
    bad "commit left data in the top"
else
    ok "commit left the top empty"
fi

# The shared-base refusal, through a symlink too; overlays above are fine.
mkchain w6
qemu-img create -q -f qcow2 -b sn1.qcow2 -F qcow2 w6/other.qcow2
refuse "commit: another image uses the base" w6/sn1.qcow2 commit w6/sn2.qcow2
grep -q "other.qcow2" err && ok "commit refusal names the other image" || bad "commit refusal: $(cat err)"
refuse "commit -b: another image uses an intermediate" w6/base.qcow2 commit -b w6/base.qcow2 w6/sn3.qcow2
rm w6/other.qcow2; ln -s sn1.qcow2 w6/link.qcow2
qemu-img create -q -f qcow2 -b link.qcow2 -F qcow2 w6/other.qcow2
refuse "commit: another image uses the base through a symlink" w6/sn1.qcow2 commit w6/sn2.qcow2
"$IMG" commit -q --force w6/sn2.qcow2 && ok "commit --force overrides" || bad "commit --force refused"
mkchain w7
qemu-img create -q -f qcow2 -b sn3.qcow2 -F qcow2 w7/sn4.qcow2
"$IMG" commit -q w7/sn3.qcow2 && ok "commit: an overlay above the top is no reason to refuse" \
    || bad "commit refused with only an overlay above"
compare_ok "commit: the overlay above still reads the same" ref.raw w7/sn4.qcow2

# The base is written through the chain's own node, reopened read-write:
# a cache mode given with -t reaches it, the top reads through after.
mkchain w9
"$IMG" commit -q -t unsafe w9/sn3.qcow2 && ok "commit -t unsafe ran" || bad "commit -t unsafe failed"
compare_ok "commit -t unsafe: sn2 reads as sn3 did" ref.raw w9/sn2.qcow2
compare_ok "commit -t unsafe: the emptied top reads the same" ref.raw w9/sn3.qcow2
check_ok "commit -t unsafe: sn2 clean" w9/sn2.qcow2
# A base that cannot be reopened for writing (immutable, where the file
# system has the flag): a clear error, nothing changed.
mkchain w10
if chattr +i w10/sn1.qcow2 2>/dev/null; then
    refuse "commit: base not writable" w10/sn2.qcow2 commit w10/sn2.qcow2
    grep -q "read-write" err && ok "commit: the error names the reopen" || bad "commit: unclear error: $(cat err)"
    chattr -i w10/sn1.qcow2
    compare_ok "commit: base not writable: sn1 unchanged" ref/sn1.qcow2 w10/sn1.qcow2
else
    echo "skip: no immutable flag on this file system"
fi

refuse "commit: no backing file" base.qcow2 commit base.qcow2
refuse "commit: missing file" - commit gone.qcow2
refuse "commit: -b not in the chain" top.qcow2 commit -b raw.img top.qcow2
refuse "commit: nonsense flag" top.qcow2 commit --frobnicate top.qcow2
refuse "rebase: no -b" top.qcow2 rebase top.qcow2
refuse "rebase: missing new backing" top.qcow2 rebase -b gone.qcow2 -F qcow2 top.qcow2
refuse "rebase: raw image" raw.img rebase -u -b base.qcow2 -F qcow2 raw.img
refuse "rebase: missing file" - rebase -b base.qcow2 gone.qcow2
refuse "rebase: bad -F" top.qcow2 rebase -b base.qcow2 -F vmdkx top.qcow2
refuse "rebase: nonsense flag" top.qcow2 rebase --frobnicate -b base.qcow2 top.qcow2
# qemu-img 7.2 refuses a new backing file without its format, both ways.
refuse "rebase: no -F (safe)" top.qcow2 rebase -b base.qcow2 top.qcow2
refuse "rebase -u: no -F" top.qcow2 rebase -u -b base.qcow2 top.qcow2
grep -q "backing format must be specified" err &&
    ok "rebase: no -F worded as qemu-img" || bad "rebase: no -F: $(cat err)"

finish
