# A thin wrapper over meson and ninja.  The build itself is described in
# meson.build; this file only strings the usual steps together.
#
#   make                 configure (once) and build in build/
#   make deps            install what a fresh Debian 12 lacks (apt-get)
#   make check           deps, build with -Dwerror=true, every suite but slow
#   make check-sanitize  the same under ASan + UBSan, in build/sanitize
#   make check-slow      the slow suite only
#   make demo            a short live walkthrough of what strata does
#   make bench           strata-img bench against qemu-img bench
#   make clean           remove build/

BUILD      ?= build
SANITIZE   ?= build/sanitize
JOBS       ?= $(shell nproc 2>/dev/null || echo 2)
MESON      ?= meson
NINJA      ?= ninja
PYTHON     ?= python3

DEPS := build-essential meson ninja-build pkg-config libglib2.0-dev \
	libjson-glib-dev liburing-dev check zlib1g-dev libzstd-dev clang \
	libclang-rt-14-dev qemu-utils qemu-system-common python3 fio binutils \
	jq strace

comma := ,
SANITIZE_ARGS := -Db_sanitize=address$(comma)undefined -Db_lundef=false -Dwerror=true
SANITIZE_ENV := ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

.PHONY: all build deps check check-sanitize check-slow demo bench clean

all: build

build:
	@test -f $(BUILD)/build.ninja || $(MESON) setup $(BUILD)
	$(NINJA) -C $(BUILD) -j$(JOBS)

# Only packages that dpkg does not know as installed are fetched, so a warm
# machine never touches the network.
deps:
	@if ! command -v dpkg-query >/dev/null 2>&1; then \
	    echo "make deps: no dpkg here; install by hand: $(DEPS)"; exit 0; \
	fi; \
	missing=""; \
	for p in $(DEPS); do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' \
	        || missing="$$missing $$p"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	echo "make deps: installing$$missing"; \
	if [ "$$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi; \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing

# $(call configure,DIR,EXTRA-ARGS): set up DIR, or reconfigure it so that
# the options asked for hold even when DIR was configured by hand, and so
# that test programs added since the last setup are registered.
define configure
	@if [ -f $(1)/build.ninja ]; then \
	    $(MESON) setup --reconfigure $(1) $(2) >/dev/null; \
	else \
	    $(MESON) setup $(1) $(2); \
	fi
endef

# $(call run-tests,DIR,MESON-TEST-ARGS,ENV): runs meson test, then prints
# "N passed, N failed" from meson's own counts and fails on any failure.
define run-tests
	@log=$$(mktemp); \
	$(3) $(MESON) test -C $(1) --print-errorlogs --num-processes $(JOBS) $(2) \
	    2>&1 | tee $$log; status=$${PIPESTATUS[0]}; \
	ok=$$(awk '/^Ok:/ {print $$2}' $$log); \
	fail=$$(awk '/^(Fail|Timeout|Unexpected Pass):/ {n += $$NF} END {print n + 0}' $$log); \
	skip=$$(awk '/^Skipped:/ {print $$2}' $$log); \
	rm -f $$log; \
	echo "$${ok:-0} passed, $${fail:-0} failed"; \
	if [ "$${skip:-0}" != 0 ]; then echo "($$skip skipped)"; fi; \
	if [ "$$status" != 0 ] || [ "$${fail:-0}" != 0 ]; then exit 1; fi
endef

check: SHELL := /bin/bash
check: deps
	$(call configure,$(BUILD),-Dwerror=true)
	$(NINJA) -C $(BUILD) -j$(JOBS)
	$(call run-tests,$(BUILD),--no-suite slow,)

check-sanitize: SHELL := /bin/bash
check-sanitize: deps
	$(call configure,$(SANITIZE),$(SANITIZE_ARGS))
	$(NINJA) -C $(SANITIZE) -j$(JOBS)
	$(call run-tests,$(SANITIZE),--no-suite slow,$(SANITIZE_ENV))

check-slow: SHELL := /bin/bash
check-slow: deps
	$(call configure,$(BUILD),-Dwerror=true)
	$(NINJA) -C $(BUILD) -j$(JOBS)
	$(call run-tests,$(BUILD),--suite slow,)

# tests/demo/run is the live demo (also the interop test "demo"); the
# walkthrough is the fallback for trees without it.
demo: deps build
	@if [ -f tests/demo ] && [ -x tests/demo ]; then \
	    exec tests/demo $(BUILD); \
	elif [ -x tests/demo/run ]; then \
	    exec tests/demo/run $(BUILD); \
	else \
	    exec bash tests/interop/walkthrough.sh $(BUILD); \
	fi

bench: build
	$(PYTHON) tests/bench/bench-img.py --build $(BUILD)

clean:
	rm -rf $(BUILD)
