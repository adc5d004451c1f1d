# The Debian package and the system test (issue #5), included by the Makefile.
#   make deb         build/sandboxd_<version>_<arch>.deb, checked by lintian
#   make systemtest  install that .deb in a Debian 12 QEMU guest and use it
# Both install what they need on a Debian 12 host (as root), like `make apt`.

# From the changelog's first line; without dpkg-dev, which may not be installed yet.
DEB_VERSION := $(shell sed -n '1s/^[^(]*(\([^)]*\)).*/\1/p' packaging/debian/changelog)
DEB_ARCH := $(shell dpkg --print-architecture 2>/dev/null)
DEB := build/sandboxd_$(DEB_VERSION)_$(DEB_ARCH).deb
# What goes into the package's source tree (the rest of the checkout does not).
DEB_SOURCES := pyproject.toml README.md sandboxd units etc packaging
DEB_BUILD_PACKAGES := dpkg-dev debhelper python3-venv python3-setuptools python3-wheel \
	ca-certificates lintian
SYSTEMTEST_PACKAGES := debootstrap debian-archive-keyring qemu-system-x86 qemu-utils e2fsprogs
# Extra harness arguments, e.g. SYSTEMTEST_ARGS='--only base,purge'.
SYSTEMTEST_ARGS ?=

.PHONY: deb deb-deps systemtest systemtest-deps

# apt-install whichever of the listed packages are missing.
define apt_ensure
	@missing=""; for p in $(1); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "apt: installing$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends $$missing; \
	fi
endef

deb-deps:
	$(call apt_ensure,$(DEB_BUILD_PACKAGES))

systemtest-deps:
	$(call apt_ensure,$(SYSTEMTEST_PACKAGES))

# dpkg-buildpackage wants debian/ at the top of the source tree: build in a
# copy under build/deb/ with packaging/debian as its debian/.
deb: deb-deps
	rm -rf build/deb && mkdir -p build/deb/sandboxd
	tar -c --exclude=__pycache__ --exclude='*.egg-info' $(DEB_SOURCES) | tar -x -C build/deb/sandboxd
	cp -a packaging/debian build/deb/sandboxd/debian
	cd build/deb/sandboxd && dpkg-buildpackage -us -uc -b
	mv build/deb/sandboxd_$(DEB_VERSION)_$(DEB_ARCH).deb $(DEB)
	lintian --fail-on error $(DEB)
	@echo "built $(DEB)"

systemtest: deb systemtest-deps
	/usr/bin/python3 tests/system/harness.py --deb $(DEB) $(SYSTEMTEST_ARGS)
