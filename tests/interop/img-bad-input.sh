#!/usr/bin/env bash
# Bad input for every strata-img subcommand: a missing file, the wrong
# format, an unknown format, impossible sizes, unknown -o options, flags
# that do not exist and missing arguments.  Each must fail with a
# "strata-img: " message (naming the culprit where there is one), the
# exit status qemu-img 7.2 gives for the same command line, and every
# image it was given left as it was (checksums before and after).
#
#   img-bad-input.sh PATH/TO/strata-img
set -uo pipefail
IMG=$(realpath "${1:?usage: img-bad-input.sh PATH/TO/strata-img}")
. "$(dirname "$(realpath "$0")")/img-lib.sh"

qemu-img create -q -f raw raw.img 1M
qio -f raw -c 'write -P 7 0 64k' raw.img
qemu-img create -q -f qcow2 base.qcow2 1M
qio -c 'write -P 1 0 128k' base.qcow2
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
qio -c 'write -P 2 64k 64k' top.qcow2
qemu-img snapshot -c s1 base.qcow2
files="raw.img base.qcow2 top.qcow2"
sums() { sha256sum $files; }

# bad DESC NEEDLE ARGS...: strata-img fails with a "strata-img: "
# message containing NEEDLE (may be empty), with qemu-img's exit status,
# and no image changes; nothing named x.* is left behind.
bad_input() {
    local what=$1 needle=$2; shift 2
    local before after st qst
    before=$(sums)
    "$IMG" "$@" >out 2>err; st=$?
    after=$(sums)
    rm -f x.*
    qemu-img "$@" >/dev/null 2>&1; qst=$?
    rm -f x.*
    if [ "$(sums)" != "$before" ]; then
        qemu-img create -q -f raw raw.img 1M   # keep going; say it
        bad "$what: qemu-img changed an image (test setup)"
    fi
    # qemu-img's measure answers an unknown flag with its help text and
    # status 0; bad input must fail, so there any failure status will do.
    if [ $st -eq 0 ]; then bad "$what: exit status 0"
    elif [ $qst -ne 0 ] && [ $st -ne $qst ]; then
        bad "$what: status $st, qemu-img's $qst ($(head -n 1 err))"
    elif ! grep -q '^strata-img: ' err; then bad "$what: no message"
    elif [ -n "$needle" ] && ! grep -qF -- "$needle" err; then
        bad "$what: '$needle' not in '$(head -n 2 err | tr '\n' ' ')'"
    elif [ "$before" != "$after" ]; then bad "$what: an image changed"
    else ok "$what ($st: $(head -n 1 err))"; fi
}

# Every subcommand: a file that is not there, a flag that does not
# exist, an option without its argument, an unknown format.
for sub in info map check snapshot commit rebase resize measure amend \
           compare convert bench create; do
    # What each needs around the image to get as far as opening it.
    pre=(); post=()
    case $sub in
        snapshot) pre=(-l) ;;
        rebase) pre=(-u -b base.qcow2 -F qcow2) ;;
        amend) pre=(-o compat=1.1) ;;
        bench) pre=(-c 1) ;;
        resize) post=(+1M) ;;
        compare) post=(top.qcow2) ;;
        convert) pre=(-O raw); post=(x.raw) ;;
        create) pre=(-f qcow2); post=(1M) ;;
    esac
    if [ "$sub" != create ]; then
        bad_input "$sub: missing file" "gone.qcow2" $sub "${pre[@]}" gone.qcow2 "${post[@]}"
        bad_input "$sub: unknown format" "vmdkx" $sub -f vmdkx "${pre[@]}" top.qcow2 "${post[@]}"
    fi
    bad_input "$sub: nonsense flag" "--frobnicate" $sub --frobnicate "${pre[@]}" top.qcow2 "${post[@]}"
    # resize takes its last operand as the size, whatever it looks like.
    [ $sub == resize ] && needle="file name and size" || needle="'-f'"
    bad_input "$sub: missing argument" "$needle" $sub "${pre[@]}" top.qcow2 "${post[@]}" -f
done

# The wrong format: a raw file opened as qcow2.
for args in "info -f qcow2 raw.img" "map -f qcow2 raw.img" \
            "check -f qcow2 raw.img" "snapshot -l -f qcow2 raw.img" \
            "commit -f qcow2 raw.img" \
            "rebase -f qcow2 -u -b base.qcow2 -F qcow2 raw.img" \
            "resize -f qcow2 raw.img +1M" "measure -f qcow2 raw.img" \
            "amend -f qcow2 -o compat=1.1 raw.img" \
            "compare -f qcow2 raw.img top.qcow2" \
            "convert -f qcow2 -O raw raw.img x.raw" \
            "bench -f qcow2 -c 1 raw.img" \
            "create -f qcow2 -b raw.img -F qcow2 x.qcow2"; do
    bad_input "${args%% *}: raw file as qcow2 ($args)" "" $args
done

# Impossible sizes and numbers.
bad_input "create: size too large" "" create -f qcow2 x.qcow2 100E
bad_input "create: size not a number" "" create -f qcow2 x.qcow2 12abc
bad_input "create: negative size" "" create -f raw x.img -5
bad_input "resize: size not a number" "" resize -f raw raw.img 5Q
bad_input "resize: to a negative size" "" resize -f raw --shrink raw.img -2M
bad_input "resize: too large" "" resize top.qcow2 8E
bad_input "measure: size not a number" "" measure --size 12abc
bad_input "measure: negative size" "" measure --size -1
bad_input "convert: -m 0" "" convert -m 0 -O raw top.qcow2 x.raw
bad_input "convert: -S not a number" "" convert -S 1q -O raw top.qcow2 x.raw
bad_input "commit: -r not a number" "" commit -r 1q top.qcow2
bad_input "bench: -s 4G" "" bench -s 4G -c 1 top.qcow2
bad_input "amend: size not a number" "" amend -o size=12abc top.qcow2

# Unknown -o options: named in the message.
bad_input "create: unknown -o named" "foo" create -f qcow2 -o foo=bar x.qcow2 1M
bad_input "create raw: qcow2's -o named" "cluster_size" create -f raw -o cluster_size=4k x.img 1M
bad_input "convert: unknown -o named" "foo" convert -O qcow2 -o foo=1 top.qcow2 x.qcow2
bad_input "measure: unknown -o named" "foo" measure -O qcow2 -o foo=bar --size 1G
bad_input "amend: unknown -o named" "foo" amend -o foo=bar top.qcow2
bad_input "create: bad -o value" "" create -f qcow2 -o lazy_refcounts=maybe x.qcow2 1M

# Garbage instead of an image: the files stay as they were.
head -c 70000 /dev/urandom > junk.qcow2
printf 'QFI\xfb\0\0\0\3' > trunc.qcow2
files="$files junk.qcow2 trunc.qcow2"
bad_input "info: truncated qcow2 header" "" info trunc.qcow2
bad_input "check: truncated qcow2 header" "" check trunc.qcow2
bad_input "commit: garbage as qcow2" "" commit -f qcow2 junk.qcow2
bad_input "rebase: garbage as qcow2" "" rebase -f qcow2 -b base.qcow2 -F qcow2 junk.qcow2
bad_input "amend: garbage as qcow2" "" amend -f qcow2 -o compat=1.1 junk.qcow2
bad_input "snapshot -c: truncated qcow2" "" snapshot -c s trunc.qcow2

check_ok "base.qcow2 still checks clean" base.qcow2
check_ok "top.qcow2 still checks clean" top.qcow2
finish
