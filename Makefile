# weft — top-level commands. `make demo` and `make test` work on a fresh Debian 12 machine as root.
SHELL := /bin/bash
ROOT := $(abspath $(dir $(lastword $(MAKEFILE_LIST))))
VENV := $(ROOT)/.venv
PY := $(VENV)/bin/python
# Debian's interpreter: fast to start, and the CNI plugin's shebang points at it.
SYSPY := /usr/bin/python3
APT_PACKAGES := dnsmasq-base dnsperf dnsutils clang llvm libbpf-dev libbpf1 bpftool gcc-multilib linux-libc-dev iproute2 iperf3 \
	iputils-ping python3-venv python3-dev containernetworking-plugins podman runc catatonit \
	busybox-static containerd procps psmisc util-linux iptables nftables prometheus \
	etcd-server etcd-client chromium fonts-dejavu-core
BPF_SRC := $(wildcard bpf/*.c)
BPF_OBJ := $(patsubst bpf/%.c,build/bpf/%.o,$(BPF_SRC))
BPF_HDR := $(wildcard bpf/include/shared/*.h bpf/lib/*.h)

.PHONY: install apt bpffs venv bpf native demo test test-unit test-privileged lint bench clean

install: apt bpffs venv bpf native
	@ln -sf $(VENV)/bin/weft /usr/local/bin/weft
	@ln -sf $(VENV)/bin/weft-agent /usr/local/bin/weft-agent
	@echo "weft installed: $$(command -v weft)"

apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

bpffs:
	@mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(SYSPY) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

venv: $(VENV)/.installed

build/bpf/%.o: bpf/%.c $(BPF_HDR)
	@mkdir -p build/bpf
	clang -O2 -g -Wall -Werror -target bpf -D__TARGET_ARCH_x86 -Ibpf/include -Ibpf -c $< -o $@

# weft-cni's native launcher: runtimes exec it for every pod operation (see src/weft/cni/launcher.py).
native: build/cni/weft-cni

build/cni/weft-cni: src/weft/cni/native_launcher.c
	@mkdir -p build/cni
	gcc -O2 -Wall -Wextra -Werror -o $@ $<

bpf: $(BPF_OBJ)
	@# The CNI plugin runs under Debian's interpreter at every pod operation: give it bytecode.
	@$(SYSPY) -m compileall -q src/weft/__init__.py src/weft/cni

demo: install
	$(VENV)/bin/weft demo

lint: venv
	$(VENV)/bin/ruff check src tests $(wildcard bench)
	$(VENV)/bin/mypy

test-unit: install
	$(PY) -m pytest tests/unit -q

test-privileged: install
	$(PY) -m pytest tests/privileged -q

test: install lint
	$(PY) -m pytest tests -q

bench: install
	$(PY) bench/run.py

clean:
	rm -rf build
