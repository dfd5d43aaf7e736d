#!/usr/bin/env bash
# Checks of libstrata's public interface.
#
#   symbols.sh symbols LIBSTRATA.a LIBSTRATA.so HEADER...
#       (a) every global symbol defined in the .a starts with strata_,
#           Strata or STRATA_ (a VMM links the .a beside its own code,
#           where visibility hides nothing);
#       (b) the .so exports exactly the functions the public HEADERs
#           declare with STRATA_API, no more and no fewer.
#   symbols.sh selftest
#       the checks above fail on a library made to break them.
#   symbols.sh headers HEADER...
#       every public header compiles on its own, as C and (when a C++
#       compiler exists) as C++, laid out as installed (<strata/x.h>).
#
# Exit status: 0 pass, 1 fail, 77 skip.
set -euo pipefail

NM=${NM:-nm}

die() { echo "symbols.sh: $*" >&2; exit 1; }

# Names declared "STRATA_API <type> name(" in the headers; a declaration
# may wrap after the type, so the text is read as one line.
declared_functions() {
    cat "$@" \
        | grep -v '^[[:space:]]*#' \
        | tr '\n' ' ' \
        | grep -oE 'STRATA_API[^;(){}]*\(' \
        | sed -E 's/^.*[^A-Za-z0-9_]([A-Za-z_][A-Za-z0-9_]*)[[:space:]]*\($/\1/' \
        | sort -u
}

# Toolchain-made globals that are no symbol of ours: sanitizer and
# coverage instrumentation, and the linker's section markers.
toolchain_symbol() {
    case $1 in
        __odr_asan_gen_*|__odr_asan.*|__asan_*|__ubsan_*|__sanitizer_*|__sancov_*|\
        __gcov_*|__llvm_*|__bss_start|_edata|_end|_init|_fini) return 0 ;;
    esac
    return 1
}

check_symbols() {
    local a=$1 so=$2; shift 2
    local fail=0 bad="" sym type

    [ -f "$a" ] || die "no such archive: $a"
    [ -f "$so" ] || die "no such shared library: $so"
    command -v "$NM" >/dev/null || { echo "SKIP: no nm"; exit 77; }

    # (a) the archive
    while read -r _ type sym; do
        toolchain_symbol "$sym" && continue
        case $sym in
            strata_*|Strata*|STRATA_*) ;;
            *) bad="$bad $sym($type)" ;;
        esac
    done < <("$NM" -g --defined-only "$a" 2>/dev/null | grep -E '^[0-9a-fA-F]* +[A-Za-z] ' || true)
    if [ -n "$bad" ]; then
        echo "FAIL: global symbols of $(basename "$a") outside the strata_/Strata/STRATA_ namespace:"
        for sym in $bad; do echo "    $sym"; done
        fail=1
    else
        echo "ok: every global symbol of $(basename "$a") is in the strata namespace"
    fi

    # (b) the shared library's exports against the headers
    local want got
    want=$(declared_functions "$@")
    got=$("$NM" -D --defined-only "$so" | awk 'NF >= 3 {print $3}' \
          | while read -r sym; do toolchain_symbol "$sym" || echo "$sym"; done \
          | sort -u)
    [ -n "$want" ] || die "no STRATA_API declarations found in: $*"

    local extra missing
    extra=$(comm -13 <(echo "$want") <(echo "$got"))
    missing=$(comm -23 <(echo "$want") <(echo "$got"))
    if [ -n "$extra" ]; then
        echo "FAIL: $(basename "$so") exports symbols no public header declares:"
        sed 's/^/    /' <<<"$extra"
        fail=1
    fi
    if [ -n "$missing" ]; then
        echo "FAIL: public functions $(basename "$so") does not export:"
        sed 's/^/    /' <<<"$missing"
        fail=1
    fi
    if [ -z "$extra" ] && [ -z "$missing" ]; then
        echo "ok: $(basename "$so") exports exactly the $(wc -l <<<"$want") public functions"
    fi
    return $fail
}

check_headers() {
    local tmp fail=0 h name cc cxx
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' RETURN
    mkdir -p "$tmp/strata"
    cp "$@" "$tmp/strata/"

    local cflags
    cflags=$(pkg-config --cflags glib-2.0 json-glib-1.0) \
        || die "pkg-config cannot find glib-2.0 / json-glib-1.0"
    cc=${CC:-cc}
    cxx=${CXX:-}
    if [ -z "$cxx" ]; then
        for c in c++ g++ clang++; do
            if command -v "$c" >/dev/null; then cxx=$c; break; fi
        done
    fi

    for h in "$@"; do
        name=$(basename "$h")
        printf '#include <strata/%s>\n#include <strata/%s>\nint main(void) { return 0; }\n' \
            "$name" "$name" >"$tmp/t.c"
        # shellcheck disable=SC2086
        if $cc -std=c11 -Wall -Wextra -Werror -Wstrict-prototypes \
               -I"$tmp" $cflags -fsyntax-only "$tmp/t.c" 2>"$tmp/err"; then
            echo "ok: $name compiles alone as C"
        else
            echo "FAIL: $name does not compile alone as C:"; sed 's/^/    /' "$tmp/err"
            fail=1
        fi
        if [ -n "$cxx" ]; then
            printf '#include <strata/%s>\nint main() { return 0; }\n' "$name" >"$tmp/t.cc"
            # shellcheck disable=SC2086
            if $cxx -std=c++11 -Wall -Wextra -Werror -I"$tmp" $cflags \
                   -fsyntax-only "$tmp/t.cc" 2>"$tmp/err"; then
                echo "ok: $name compiles alone as C++"
            else
                echo "FAIL: $name does not compile alone as C++:"; sed 's/^/    /' "$tmp/err"
                fail=1
            fi
        fi
    done
    [ -n "$cxx" ] || echo "note: no C++ compiler; the C++ half was skipped"
    return $fail
}

# The checker checks itself: a library with a stray global, an unexported
# public function and an export no header declares must fail on each.
self_test() {
    local tmp cc fail=0 out
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' RETURN
    cc=${CC:-cc}
    cat >"$tmp/good.h" <<'H'
#define STRATA_API
STRATA_API int strata_one(void);
STRATA_API const char *
strata_two(int x);
H
    printf '%s\n' 'int strata_one(void) { return 1; }' \
        'const char *strata_two(int x) { return x ? "a" : "b"; }' \
        'static int helper(void) { return 2; }' \
        'int strata_internal_shared = 3;' \
        'int strata_internal(void) { return helper(); }' >"$tmp/good.c"
    printf '%s\n' 'int strata_one(void) { return 1; }' \
        'int stray_global = 4;' >"$tmp/bad.c"
    for v in good bad; do
        $cc -fPIC -c "$tmp/$v.c" -o "$tmp/$v.o" || return 1
        ar rcs "$tmp/lib$v.a" "$tmp/$v.o"
    done
    # good.so exports strata_one and strata_two only (a version script
    # stands in for STRATA_API's visibility attribute).
    printf '{ global: strata_one; strata_two; local: *; };\n' >"$tmp/good.map"
    $cc -shared -Wl,--version-script="$tmp/good.map" "$tmp/good.o" -o "$tmp/good.so"
    printf '{ global: strata_one; stray_global; local: *; };\n' >"$tmp/bad.map"
    $cc -shared -Wl,--version-script="$tmp/bad.map" "$tmp/bad.o" -o "$tmp/bad.so"

    if out=$(check_symbols "$tmp/libgood.a" "$tmp/good.so" "$tmp/good.h"); then
        echo "ok: a clean library passes"
    else
        echo "FAIL: a clean library is refused:"; echo "$out"; fail=1
    fi
    out=$(check_symbols "$tmp/libbad.a" "$tmp/bad.so" "$tmp/good.h") && {
        echo "FAIL: a bad library passes"; fail=1; }
    for want in 'stray_global(D)' 'exports symbols no public header declares' \
                'does not export' 'strata_two'; do
        if grep -qF "$want" <<<"$out"; then
            echo "ok: the bad library is reported for: $want"
        else
            echo "FAIL: no report of '$want' in:"; echo "$out"; fail=1
        fi
    done
    return $fail
}

case ${1:-} in
    selftest) self_test ;;
    symbols) shift; [ $# -ge 3 ] || die "usage: symbols.sh symbols LIB.a LIB.so HEADER..."
             check_symbols "$@" ;;
    headers) shift; [ $# -ge 1 ] || die "usage: symbols.sh headers HEADER..."
             check_headers "$@" ;;
    *) die "usage: symbols.sh symbols|headers ..." ;;
esac
