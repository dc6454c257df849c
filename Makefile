# jobgate developer entry points. `make run` brings up a local cluster,
# `make test` runs the whole suite. Both build what they need first.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STUBS  := src/jobgate/v1
PROTOS := $(wildcard proto/jobgate/v1/*.proto)

.PHONY: all venv proto run run-ha test lint clean

all: proto

# setup.py compiles the worker's job spawner (src/worker/_spawn.c) and the
# jobs' keeper (src/worker/keeper.c, both include jobchild.h) in place.
$(VENV)/.installed: pyproject.toml setup.py src/worker/_spawn.c src/worker/keeper.c \
		src/worker/jobchild.h
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

# Stubs are generated into a git-ignored package, never edited by hand.
$(STUBS)/.generated: $(VENV)/.installed $(PROTOS)
	rm -rf $(STUBS)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=src --pyi_out=src \
		--grpc_python_out=src $(PROTOS)
	touch $(STUBS)/__init__.py $@

proto: $(STUBS)/.generated

run: proto
	$(PY) -m jobgate.dev.run --dir run

# Two schedulers on one PostgreSQL server (Debian's binaries, no service:
# its data under run/postgres), two workers; run/local.env names both URLs.
run-ha: proto postgres-deps
	$(PY) -m jobgate.dev.run --dir run --schedulers 2 --postgres

test: proto
	$(PY) -m pytest tests

lint: proto
	$(PY) -m ruff check src tests certs lab

# The benchmark suite (bench/README.md): bench/results/report.json and .md.
# BENCH_ARGS passes options, e.g. BENCH_ARGS="--scenario start --runs 1".
.PHONY: bench
bench: proto
	$(PY) -m bench.run $(BENCH_ARGS)

clean:
	if [ -f $(LAB_DIR)/state.json ]; then $(PYTHON) -m lab --dir $(LAB_DIR) down; fi
	if [ -f $(LAB_HA_DIR)/state.json ]; then $(PYTHON) -m lab --dir $(LAB_HA_DIR) down; fi
	rm -rf $(VENV) $(STUBS) run build dist src/*.egg-info

# --- appliance: Debian packages, the lab test and its tools ----------------

DEB_BUILD := build/deb
DEB_DIST  := dist/deb
# Ansible and ansible-lint live in a venv of their own: they pin their own
# dependencies, and the project's venv stays what `make test` needs.
TOOLS_VENV := .venv-appliance
APPLIANCE_APT := systemd-container debootstrap dh-virtualenv debhelper dpkg-dev \
	build-essential python3-dev lintian ruby vagrant python3 python3-venv iproute2 \
	openssh-client util-linux procps curl

.PHONY: deb appliance-deps test-appliance

# Builds jobgate_*.deb (the program in /opt/venvs/jobgate), jobgate-scheduler
# and jobgate-worker (units, default configs, users) into dist/deb/ from the
# files of this work tree.
deb:
	rm -rf $(DEB_BUILD) $(DEB_DIST)
	mkdir -p $(DEB_BUILD)/jobgate $(DEB_DIST)
	git ls-files -z -co --exclude-standard -- pyproject.toml setup.py README.md \
		LICENSE src proto packaging examples \
		| tar --null --ignore-failed-read -T - -cf - | tar -C $(DEB_BUILD)/jobgate -xf -
	cp -r packaging/deb/debian $(DEB_BUILD)/jobgate/debian
	cd $(DEB_BUILD)/jobgate && dpkg-buildpackage --build=binary --no-sign
	mv $(DEB_BUILD)/*.deb $(DEB_BUILD)/*.changes $(DEB_BUILD)/*.buildinfo $(DEB_DIST)/
	ls -l $(DEB_DIST)

$(TOOLS_VENV)/.installed:
	$(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/pip install --quiet --upgrade pip
	# The ansible package brings ansible-core 2.19 and the collections the
	# roles use (community.crypto, community.general, ansible.posix).
	$(TOOLS_VENV)/bin/pip install --quiet 'ansible>=12,<13' \
		'ansible-core>=2.19,<2.20' 'ansible-lint>=25'
	touch $@

# What the appliance tests need on a Debian 12 machine (as root).
appliance-deps: $(TOOLS_VENV)/.installed
	if [ "$$(id -u)" = 0 ]; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			--no-install-recommends $(APPLIANCE_APT); \
	else \
		echo "appliance-deps: not root; install with apt-get: $(APPLIANCE_APT)"; \
	fi

test-appliance: proto
	JOBGATE_REQUIRE_APPLIANCE=$${JOBGATE_REQUIRE_APPLIANCE:-1} $(PY) -m pytest tests/appliance

# --- the browser tests (tests/browser) ---------------------------------------

# They drive the web console in Debian's headless Chromium through its
# chromedriver and Selenium (in the dev extra). As root; apt is asked only
# for what is missing, so a second run costs nothing.
BROWSER_APT := chromium chromium-driver

.PHONY: browser-deps

browser-deps: venv
	missing=""; \
	for p in $(BROWSER_APT); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
			| grep -qx 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -z "$$missing" ]; then \
		echo "browser-deps: $(BROWSER_APT) already installed"; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			--no-install-recommends $$missing; \
	else \
		echo "browser-deps: not root; install with apt-get:$$missing"; \
	fi

# --- PostgreSQL for the tests (tests/conftest.py's postgres fixture) ----------

# The tests of the PostgreSQL state store start a throwaway server from
# Debian's postgresql package binaries (src/jobgate/dev/postgres.py: initdb
# and pg_ctl into a temporary directory, no system service). As root; apt is
# asked only when the package is missing.
# iptables: the HA fault test cuts one scheduler off from the database
# inside a network namespace of its own (its rules never reach the host's).
POSTGRES_APT := postgresql iptables

.PHONY: postgres-deps

postgres-deps:
	if [ "$$(dpkg-query -W -f='$${Status}\n' $(POSTGRES_APT) 2>/dev/null \
			| grep -cx 'install ok installed')" = "$(words $(POSTGRES_APT))" ]; then \
		echo "postgres-deps: $(POSTGRES_APT) already installed"; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			--no-install-recommends $(POSTGRES_APT); \
	else \
		echo "postgres-deps: not root; install with apt-get: $(POSTGRES_APT)"; \
	fi

# --- the development lab (docs/lab.md) ---------------------------------------

# Three systemd-nspawn nodes (scheduler, worker-1, worker-2) provisioned by
# site.yml with the packages of `make deb`, the API on 127.0.0.1:$(LAB_PORT).
# Run again to provision again. As root, after `make appliance-deps`.
LAB_DIR  ?= build/lab
LAB_PORT ?= 8443

.PHONY: lab lab-down lab-status

# The machine's packages are installed once (the stamp), not on every run.
$(TOOLS_VENV)/.apt-installed: $(TOOLS_VENV)/.installed
	$(MAKE) appliance-deps
	if [ "$$(id -u)" = 0 ]; then touch $@; fi

lab: proto $(TOOLS_VENV)/.apt-installed deb
	$(PYTHON) -m lab --dir $(LAB_DIR) up --port $(LAB_PORT) --debs $(DEB_DIST)

lab-down:
	$(PYTHON) -m lab --dir $(LAB_DIR) down

lab-status:
	$(PYTHON) -m lab --dir $(LAB_DIR) status

# The same with two schedulers on a PostgreSQL node (inventories/lab/ha.ini),
# beside `make lab`: a directory and a port of its own.
LAB_HA_DIR  ?= build/lab-ha
LAB_HA_PORT ?= 8444

.PHONY: lab-ha lab-ha-down lab-ha-status

lab-ha: proto $(TOOLS_VENV)/.apt-installed deb
	$(PYTHON) -m lab --dir $(LAB_HA_DIR) up --ha --port $(LAB_HA_PORT) --debs $(DEB_DIST)

lab-ha-down:
	$(PYTHON) -m lab --dir $(LAB_HA_DIR) down

lab-ha-status:
	$(PYTHON) -m lab --dir $(LAB_HA_DIR) status

# --- the Vagrant lab, proven under software emulation -------------------------

# libvirtd is started by `make test-vagrant` itself, inside a network namespace
# of its own: libvirt-daemon-system (init scripts, the autostarted "default"
# network on the machine's own network) is deliberately not installed.
VAGRANT_APT := vagrant vagrant-libvirt libvirt-daemon libvirt-daemon-driver-qemu \
	libvirt-clients qemu-system-x86 qemu-utils dnsmasq-base iptables debootstrap \
	util-linux fdisk e2fsprogs extlinux syslinux-common curl

.PHONY: vagrant-deps vagrant-box test-vagrant

vagrant-deps: $(TOOLS_VENV)/.installed
	if [ "$$(id -u)" = 0 ]; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			--no-install-recommends $(VAGRANT_APT); \
	else \
		echo "vagrant-deps: not root; install with apt-get: $(VAGRANT_APT)"; \
	fi

# Builds build/vagrant/bookworm.box from Debian packages (debootstrap, the
# cloud kernel, extlinux) and adds it as the Vagrantfile's box; as root.
vagrant-box:
	$(PYTHON) -m lab.vagrant box

# A real `vagrant up` of the Vagrantfile under software emulation, in a
# network namespace of its own, then checks over HTTPS and `vagrant destroy`.
# Slow (tens of minutes): not part of `make test`. Transcript and timings in
# build/vagrant/run-*/transcript.log.
test-vagrant: deb
	$(PYTHON) -m lab.vagrant test
