# Helpers shared by the strata-img differential tests (sourced).
#   IMG: the strata-img under test (absolute path); a scratch dir is made
#   and entered; ok/bad count results; finish prints the tally.
command -v qemu-img >/dev/null && command -v qemu-io >/dev/null || {
    echo "SKIP: qemu-img / qemu-io not installed"; exit 77; }
command -v python3 >/dev/null || { echo "SKIP: no python3"; exit 77; }

tmp=$(mktemp -d "${TMPDIR:-/tmp}/img-test.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
cd "$tmp" || exit 1
pass=0 fail=0
ok()  { pass=$((pass + 1)); echo "ok: $*"; }
bad() { fail=$((fail + 1)); echo "FAIL: $*"; }
qio() { qemu-io "$@" >/dev/null || bad "qemu-io $*"; }

# same DESC ARGS...: same stdout, same stderr (program name aside) and
# the same exit status from strata-img and qemu-img.
same() {
    local what=$1; shift
    local a b ea eb sa sb
    a=$("$IMG" "$@" 2>err.s); sa=$?; ea=$(sed 's/strata-img/qemu-img/g' err.s)
    b=$(qemu-img "$@" 2>err.q); sb=$?; eb=$(cat err.q)
    if [ "$a" == "$b" ] && [ "$ea" == "$eb" ] && [ $sa -eq $sb ]; then
        ok "$what (status $sa)"
    else
        bad "$what: status $sa vs $sb"
        diff <(echo "$a"; echo "$ea") <(echo "$b"; echo "$eb") | head -20
    fi
}

# refuse DESC FILE ARGS...: strata-img fails with a message and FILE
# (may be -) keeps its checksum.
refuse() {
    local what=$1 file=$2; shift 2
    local before="" after=""
    [ "$file" != - ] && [ -e "$file" ] && before=$(sha256sum "$file")
    "$IMG" "$@" >out 2>err
    local st=$?
    [ "$file" != - ] && [ -e "$file" ] && after=$(sha256sum "$file")
    if [ $st -eq 0 ]; then bad "$what: exit status 0"
    elif ! grep -q '^strata-img: ' err; then bad "$what: no message"
    elif [ "$before" != "$after" ]; then bad "$what: $file changed"
    else ok "$what ($(head -n 1 err))"; fi
}

# alloc_map FILE: what qemu-img map says is allocated where in the guest
# view, without host offsets (which depend on the order of concurrent
# allocating writes), adjacent entries of one kind merged.
alloc_map() {
    qemu-img map --output=json "$1" | python3 -c '
import json, sys
out = []
for e in json.load(sys.stdin):
    k = (e["depth"], e["present"], e["zero"], e["data"])
    if out and out[-1][0] == k and out[-1][1] + out[-1][2] == e["start"]:
        out[-1][2] += e["length"]
    else:
        out.append([k, e["start"], e["length"]])
for k, st, ln in out:
    print(st, ln, *k)'
}

check_ok() {
    if qemu-img check "$2" >/dev/null 2>&1; then ok "$1"
    else bad "$1: $(qemu-img check "$2" 2>&1 | head -3)"; fi
}
compare_ok() {
    if qemu-img compare "$2" "$3" >/dev/null 2>&1; then ok "$1"
    else bad "$1: $(qemu-img compare "$2" "$3" 2>&1)"; fi
}

finish() {
    echo "$pass passed, $fail failed"
    [ $fail -eq 0 ]
}
