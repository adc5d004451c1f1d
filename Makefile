# sandboxd developer entry points. Everything runs as root on a Debian 12 host.
SHELL := /bin/bash
PY := /usr/bin/python3
VENV := .venv
# Debian packages the daemon, its jail and its tests use from the host
# (python3-jinja2/-requests/-httpx: the jail's offline defaults; squid: the proxy
# tests; haproxy: tests/integration/test_haproxy.py; python3-yaml: the alert rules
# test; groff-base: the man page test; python3-numpy/-pandas/-matplotlib: the
# data-science jail's offline defaults).
APT_PACKAGES := python3-venv python3-pip python3-seccomp python3-pystemd libseccomp2 \
	bubblewrap nodejs ca-certificates tzdata nftables iproute2 \
	python3-jinja2 python3-requests python3-httpx squid haproxy python3-yaml groff-base \
	python3-numpy python3-pandas python3-matplotlib
CONFIG ?= etc/sandboxd/sandboxd.toml
# Where `make run` keeps its state (dependency environments) in a dev checkout.
DEV_STATE := $(CURDIR)/var/state

.PHONY: all apt venv run test unit lint bench clean

all: venv

apt:
	@missing=""; for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "apt: installing$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

# The venv sees Debian's python3-seccomp and python3-pystemd (system site packages).
$(VENV)/.stamp: pyproject.toml | apt
	$(PY) -m venv --system-site-packages $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

venv: apt $(VENV)/.stamp

# The jail's python packages (jinja2, requests, httpx) come from etc/; synced once.
run: venv
	SANDBOXD_DEPS_PYTHON_REQUIREMENTS=etc/sandboxd/python-requirements.txt \
		$(VENV)/bin/sandboxd deps sync --language python3 --config $(CONFIG) --state-dir $(DEV_STATE)
	$(VENV)/bin/sandboxd serve --config $(CONFIG) --state-dir $(DEV_STATE)

test: venv
	$(VENV)/bin/ruff check sandboxd tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -q -p no:cacheprovider

unit: venv
	$(VENV)/bin/pytest -q tests/unit

lint: venv
	$(VENV)/bin/ruff check sandboxd tests bench
	$(VENV)/bin/mypy

bench: venv
	$(VENV)/bin/python -m bench

clean:
	rm -rf $(VENV) build *.egg-info var

# Targets of the packaging and VM system tests (deb, systemtest).
-include mk/*.mk
