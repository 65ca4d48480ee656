# gpuschedd: install, test, demo.
#
#   make install [DESTDIR=...] [PREFIX=/usr]  install as a distribution package would
#   make post-install                         then what the package's maintainer scripts would do (sysusers, reload)
#   make check                                the full test command (ruff, unit tests, system tests in a sandbox)
#   make lint                                 ruff check + ruff format --check + xmllint on the XML files
#   make demo                                 a narrated freeze/thaw/swap cycle inside a throw-away systemd sandbox
#   make prerequisites [PREREQUISITES=demo]   the system packages demo and check need (make demo and make check
#                                             install them first: tools/prerequisites.sh holds the list)
#   make stress                               the long stress test (16 clients x 1,000 operations) in a sandbox
#   make wheels                               build/wheels: the project's dependencies as wheels, for offline installs
#   make preload [PRELOAD_OUT=dir]            the transparent fast path's LD_PRELOAD library (gcc; native/preload)
#   make deb / make rpm                       distribution packages in build/packages (docs/packaging.md)
#
# PREFIX defaults to /usr, not /usr/local: dbus-daemon reads bus policy only from /usr/share/dbus-1/system.d and
# /etc/dbus-1/system.d, and polkitd reads actions only from /usr/share/polkit-1/actions. Under /usr/local the daemon
# would be installed but denied its bus name, and every polkit check would fail.

PREFIX ?= /usr
DESTDIR ?=
SYSCONFDIR ?= /etc
# The interpreter the installed daemon and CLI run under (their shebang); its pip does the install.
PYTHON ?= /usr/bin/python3
# Extra pip options, e.g. PIP_FLAGS="--no-index --find-links build/wheels" to install without a network.
PIP_FLAGS ?=
# Python dependencies the distribution's own packages provide (project names: the .deb and .rpm say
# "psutil systemd-python"): not installed into the private directory, which then holds the project and only the rest
# (packaging/pydeps.py). Empty (make install's default): every dependency is installed there.
SYSTEM_PYDEPS ?=
# The development environment (.ci/run creates it): ruff and pytest come from here.
VENV ?= .venv
PYTEST_ARGS ?=
SANDBOX ?= tools/sandbox.sh
# sandbox instance names: set them to run several checkouts side by side
CHECK_NAME ?= gpuschedd-check
DEMO_NAME ?= gpuschedd-demo
PKG_CHECK_NAME ?= gpuschedd-pkg-check
# What the sandbox shares read-write with the host: the checkout, and the venv when it lives elsewhere.
SANDBOX_BIND = $(CURDIR) $(filter-out $(CURDIR)/%,$(abspath $(VENV)))

BINDIR = $(PREFIX)/bin
LIBEXECDIR = $(PREFIX)/libexec
PKGLIBDIR = $(PREFIX)/lib/gpuschedd
PYDIR = $(PKGLIBDIR)/python
UNITDIR = $(PREFIX)/lib/systemd/system
CATALOGDIR = $(PREFIX)/lib/systemd/catalog
SYSUSERSDIR = $(PREFIX)/lib/sysusers.d
DBUSDIR = $(PREFIX)/share/dbus-1
POLKITDIR = $(PREFIX)/share/polkit-1
CONFDIR = $(SYSCONFDIR)/gpusched
# the model catalog: the admin's files, and a vendor's (the daemon reads /etc/gpusched/models.d and
# /usr/lib/gpusched/models.d: gpusched-models.d(5))
MODELSDIR = $(PREFIX)/lib/gpusched/models.d
MANDIR = $(PREFIX)/share/man
BASHCOMPLETIONDIR = $(PREFIX)/share/bash-completion/completions

PIP_COMMON = --disable-pip-version-check
# Validated against their DTDs (shipped by dbus and polkitd, found offline through the XML catalog). The bus policy is
# only checked for well-formedness: dbus' busconfig.dtd lacks the send_* attributes; the system tests prove that
# dbus-daemon loads and applies it.
XML_VALID = $(wildcard dbus/*.xml polkit/*.policy)
XML_WELLFORMED = $(wildcard dbus/*.conf)

# The transparent fast path's interposer (native/preload, docs/fast-path.md): C, built with the C compiler alone
# (no CUDA headers), installed into the private lib dir where the daemon points LD_PRELOAD.
PRELOAD_OUT ?= build/preload
PRELOAD_LIB = $(PRELOAD_OUT)/libgpuschedd-preload.so
PRELOAD_CFLAGS = -std=gnu11 -O2 -g -fPIC -fvisibility=hidden -Wall -Wextra -Wno-unused-parameter

.PHONY: all install preload post-install uninstall wheels venv check lint unit-tests system-tests demo clean deb rpm package-tests stress prerequisites

all: preload

preload: $(PRELOAD_LIB)
$(PRELOAD_LIB): $(wildcard native/preload/*.c native/preload/*.h)
	mkdir -p $(PRELOAD_OUT)
	$(CC) $(PRELOAD_CFLAGS) $(CFLAGS) -shared -Wl,-soname,libgpuschedd-preload.so -Wl,-z,now -Wl,-z,relro $(LDFLAGS) \
		-o $@ $(wildcard native/preload/*.c) -ldl -lpthread -lm

# A launcher: "#!PYTHON -I" (isolated mode: a root daemon must ignore PYTHONPATH, PYTHONHOME, the user's site
# and the current directory), the private package dir first on sys.path, then MODULE:main's return as exit code.
define launcher
#!$(PYTHON) -I
"""$(2), installed by gpuschedd's Makefile."""
import sys

sys.path.insert(0, "$(PYDIR)")
from gpuschedd.$(1) import main

sys.exit(main())
endef
export DAEMON_LAUNCHER = $(call launcher,daemon,gpuschedd: the daemon)
export CLI_LAUNCHER = $(call launcher,cli,gpusched: the command-line client)
export FRONTDOOR_LAUNCHER = $(call launcher,frontdoor,gpusched-frontdoor: the OpenAI-compatible front door)

install: preload
	# the package and its dependencies, private to gpuschedd: nothing in the system's site-packages changes
	rm -rf "$(DESTDIR)$(PYDIR)" build/lib build/bdist.*   # pip builds in-tree: no stale modules from build/lib
	$(if $(strip $(SYSTEM_PYDEPS)),mkdir -p build && $(PYTHON) packaging/pydeps.py $(SYSTEM_PYDEPS) > build/bundled-requirements.txt)
	$(PYTHON) -m pip install $(PIP_COMMON) --root-user-action=ignore --no-compile --target "$(DESTDIR)$(PYDIR)" $(PIP_FLAGS) \
		$(if $(strip $(SYSTEM_PYDEPS)),--no-deps . -r build/bundled-requirements.txt,".[journal]")
	rm -rf "$(DESTDIR)$(PYDIR)/bin"
	install -d "$(DESTDIR)$(LIBEXECDIR)" "$(DESTDIR)$(BINDIR)"
	install -m 644 $(PRELOAD_LIB) "$(DESTDIR)$(PKGLIBDIR)/libgpuschedd-preload.so"
	printf '%s\n' "$$DAEMON_LAUNCHER" > "$(DESTDIR)$(LIBEXECDIR)/gpuschedd"
	printf '%s\n' "$$CLI_LAUNCHER" > "$(DESTDIR)$(BINDIR)/gpusched"
	printf '%s\n' "$$FRONTDOOR_LAUNCHER" > "$(DESTDIR)$(LIBEXECDIR)/gpusched-frontdoor"
	chmod 755 "$(DESTDIR)$(LIBEXECDIR)/gpuschedd" "$(DESTDIR)$(BINDIR)/gpusched" "$(DESTDIR)$(LIBEXECDIR)/gpusched-frontdoor"
	# systemd units; ExecStart follows PREFIX
	install -d "$(DESTDIR)$(UNITDIR)"
	sed -e 's|/usr/libexec/|$(LIBEXECDIR)/|g' -e 's|file:/usr/share/|file:$(PREFIX)/share/|g' \
		units/gpuschedd.service > "$(DESTDIR)$(UNITDIR)/gpuschedd.service"
	install -m 644 units/gpusched.slice "$(DESTDIR)$(UNITDIR)/gpusched.slice"
	sed -e 's|/usr/libexec/|$(LIBEXECDIR)/|g' units/gpusched-frontdoor.service > "$(DESTDIR)$(UNITDIR)/gpusched-frontdoor.service"
	install -m 644 units/gpusched-frontdoor.socket "$(DESTDIR)$(UNITDIR)/gpusched-frontdoor.socket"
	# D-Bus: bus policy, system activation, interface documentation
	install -d "$(DESTDIR)$(DBUSDIR)/system.d" "$(DESTDIR)$(DBUSDIR)/system-services" "$(DESTDIR)$(DBUSDIR)/interfaces"
	install -m 644 dbus/org.gpusched1.conf "$(DESTDIR)$(DBUSDIR)/system.d/org.gpusched1.conf"
	install -m 644 dbus/org.gpusched1.service "$(DESTDIR)$(DBUSDIR)/system-services/org.gpusched1.service"
	$(if $(wildcard dbus/org.gpusched1.xml),install -m 644 dbus/org.gpusched1.xml "$(DESTDIR)$(DBUSDIR)/interfaces/")
	# optional parts (later issues add them): polkit actions and rules, journal catalog, sysusers
	$(if $(wildcard polkit/*.policy),install -d "$(DESTDIR)$(POLKITDIR)/actions" && install -m 644 $(wildcard polkit/*.policy) "$(DESTDIR)$(POLKITDIR)/actions/")
	# rules.d belongs to polkitd's package (polkitd:root 0700 on Debian): create it only where it is missing
	$(if $(wildcard polkit/*.rules),[ -d "$(DESTDIR)$(POLKITDIR)/rules.d" ] || install -d -m 700 "$(DESTDIR)$(POLKITDIR)/rules.d")
	$(if $(wildcard polkit/*.rules),install -m 644 $(wildcard polkit/*.rules) "$(DESTDIR)$(POLKITDIR)/rules.d/")
	$(if $(wildcard catalog/*.catalog),install -d "$(DESTDIR)$(CATALOGDIR)" && install -m 644 $(wildcard catalog/*.catalog) "$(DESTDIR)$(CATALOGDIR)/")
	$(if $(wildcard sysusers.d/*.conf),install -d "$(DESTDIR)$(SYSUSERSDIR)" && install -m 644 $(wildcard sysusers.d/*.conf) "$(DESTDIR)$(SYSUSERSDIR)/")
	# manual pages and bash completion
	install -d "$(DESTDIR)$(MANDIR)/man1" "$(DESTDIR)$(MANDIR)/man5" "$(DESTDIR)$(MANDIR)/man8" "$(DESTDIR)$(BASHCOMPLETIONDIR)"
	install -m 644 man/gpusched.1 "$(DESTDIR)$(MANDIR)/man1/gpusched.1"
	install -m 644 man/gpusched-models.d.5 "$(DESTDIR)$(MANDIR)/man5/gpusched-models.d.5"
	install -m 644 man/gpuschedd.conf.5 "$(DESTDIR)$(MANDIR)/man5/gpuschedd.conf.5"
	install -m 644 man/gpuschedd.8 "$(DESTDIR)$(MANDIR)/man8/gpuschedd.8"
	install -m 644 man/gpusched-frontdoor.8 "$(DESTDIR)$(MANDIR)/man8/gpusched-frontdoor.8"
	install -m 644 completion/gpusched "$(DESTDIR)$(BASHCOMPLETIONDIR)/gpusched"
	# the admin's configuration: installed once, never overwritten
	install -d "$(DESTDIR)$(CONFDIR)" "$(DESTDIR)$(CONFDIR)/models.d" "$(DESTDIR)$(MODELSDIR)"
	[ -e "$(DESTDIR)$(CONFDIR)/gpuschedd.conf" ] || install -m 644 conf/gpuschedd.conf "$(DESTDIR)$(CONFDIR)/gpuschedd.conf"
	[ -e "$(DESTDIR)$(CONFDIR)/frontdoor.conf" ] || install -m 644 conf/frontdoor.conf "$(DESTDIR)$(CONFDIR)/frontdoor.conf"

# What a package's maintainer scripts do after unpacking, on the target system itself (never with DESTDIR): create
# the system users and groups, index the journal catalog, make systemd and dbus-daemon read the new files.
# It starts nothing; `systemctl start gpuschedd` (or the first D-Bus call, once enabled) does.
post-install:
	$(if $(wildcard sysusers.d/*.conf),systemd-sysusers $(addprefix $(SYSUSERSDIR)/,$(notdir $(wildcard sysusers.d/*.conf))))
	$(if $(wildcard catalog/*.catalog),journalctl --update-catalog)
	systemctl daemon-reload
	busctl --quiet call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus ReloadConfig

uninstall:
	rm -rf "$(DESTDIR)$(PKGLIBDIR)"
	rm -f "$(DESTDIR)$(LIBEXECDIR)/gpuschedd" "$(DESTDIR)$(BINDIR)/gpusched" "$(DESTDIR)$(LIBEXECDIR)/gpusched-frontdoor"
	rm -f "$(DESTDIR)$(UNITDIR)/gpuschedd.service" "$(DESTDIR)$(UNITDIR)/gpusched.slice"
	rm -f "$(DESTDIR)$(UNITDIR)/gpusched-frontdoor.service" "$(DESTDIR)$(UNITDIR)/gpusched-frontdoor.socket"
	rm -f "$(DESTDIR)$(DBUSDIR)/system.d/org.gpusched1.conf" "$(DESTDIR)$(DBUSDIR)/system-services/org.gpusched1.service"
	rm -f "$(DESTDIR)$(DBUSDIR)/interfaces/org.gpusched1.xml"
	rm -f $(foreach f,$(notdir $(wildcard polkit/*.policy)),"$(DESTDIR)$(POLKITDIR)/actions/$(f)")
	rm -f $(foreach f,$(notdir $(wildcard polkit/*.rules)),"$(DESTDIR)$(POLKITDIR)/rules.d/$(f)")
	rm -f $(foreach f,$(notdir $(wildcard catalog/*.catalog)),"$(DESTDIR)$(CATALOGDIR)/$(f)")
	rm -f $(foreach f,$(notdir $(wildcard sysusers.d/*.conf)),"$(DESTDIR)$(SYSUSERSDIR)/$(f)")
	rm -f "$(DESTDIR)$(MANDIR)/man1/gpusched.1" "$(DESTDIR)$(MANDIR)/man5/gpusched-models.d.5" "$(DESTDIR)$(MANDIR)/man5/gpuschedd.conf.5" "$(DESTDIR)$(MANDIR)/man8/gpuschedd.8"
	rm -f "$(DESTDIR)$(MANDIR)/man8/gpusched-frontdoor.8"
	-rmdir "$(DESTDIR)$(MODELSDIR)" "$(DESTDIR)$(PREFIX)/lib/gpusched"
	rm -f "$(DESTDIR)$(BASHCOMPLETIONDIR)/gpusched"
	@echo "left $(DESTDIR)$(CONFDIR)/gpuschedd.conf, frontdoor.conf and $(DESTDIR)$(CONFDIR)/models.d in place (configuration)"

# Wheels of everything `make install` pulls in (plus the build backend), so the sandbox installs offline and never
# compiles: systemd-python is built here once. Rebuilt when the dependencies change.
wheels: build/wheels/.stamp
build/wheels/.stamp: pyproject.toml
	rm -rf build/wheels
	$(PYTHON) -m pip wheel $(PIP_COMMON) -q -w build/wheels ".[journal]" setuptools wheel
	rm -f build/wheels/gpuschedd-*.whl
	touch $@

# The development environment: created on first use, refreshed when pyproject.toml changes. Building
# systemd-python and dbus-python needs system packages: `make prerequisites` (make check does it first).
venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml build/wheels/.stamp
	[ -x $(VENV)/bin/python ] || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_COMMON) -q --upgrade pip
	$(VENV)/bin/pip install $(PIP_COMMON) -q --find-links build/wheels -e '.[journal,test]'
	touch $@

lint: venv
	@rc=0; \
	$(VENV)/bin/ruff check . || rc=1; \
	$(VENV)/bin/ruff format --check . || rc=1; \
	xmllint --noout --valid --nonet $(XML_VALID) || rc=1; \
	xmllint --noout --nonet $(XML_WELLFORMED) || rc=1; \
	if git grep -n -E '^(<<<<<<<|>>>>>>>) |^=======$$' -- . ':!*.txt'; then echo "merge conflict markers"; rc=1; fi; \
	exit $$rc

unit-tests: venv
	# tests/gpu is collected too: without an NVIDIA GPU it reports itself skipped
	$(VENV)/bin/pytest -q tests/unit tests/gpu $(PYTEST_ARGS)

# The system tests run inside a throw-away systemd sandbox; the checkout is shared read-write with it, and the
# session fixture there runs `make install` into the guest's overlay (the host is never written).
system-tests: venv
	SYSD_NAME=$(CHECK_NAME) SYSD_BIND="$(SANDBOX_BIND)" $(SANDBOX) with $(VENV)/bin/pytest -q tests/system $(PYTEST_ARGS)

# The full stress test: STRESS_CLIENTS concurrent clients x STRESS_OPS random operations (run, freeze, thaw, swap, stop,
# status) against the daemon on the fake GPU, then every model checked against systemd, the kernel and the driver
# (tests/system/test_stress.py, figures in docs/reliability.md). Too long for every run: system-tests runs 16 x 50.
# STRESS_KILLS=N also kill -9s the daemon N times during the run.
STRESS_CLIENTS ?= 16
STRESS_OPS ?= 1000
STRESS_SEED ?= 1
STRESS_KILLS ?= 0
stress: venv
	SYSD_NAME=$(CHECK_NAME)-stress SYSD_BIND="$(SANDBOX_BIND)" $(SANDBOX) with env STRESS_CLIENTS=$(STRESS_CLIENTS) \
		STRESS_OPS=$(STRESS_OPS) STRESS_SEED=$(STRESS_SEED) STRESS_KILLS=$(STRESS_KILLS) $(VENV)/bin/pytest -q -m stress tests/system/test_stress.py $(PYTEST_ARGS)

# What demo and check need from the system (apt on Debian/Ubuntu, as root or through sudo; elsewhere a message naming
# the packages). Quick and without apt when everything is there, so demo and check run it every time, first.
PREREQUISITES ?= check
prerequisites:
	@PYTHON=$(PYTHON) tools/prerequisites.sh $(PREREQUISITES)

# Every stage runs even when an earlier one failed, so one CI run reports everything; the exit status is the worst.
# The system packages come first, then the venv and the wheels (one after the other, also under make -j).
check:
	@PYTHON=$(PYTHON) tools/prerequisites.sh check
	@$(MAKE) --no-print-directory venv
	@rc=0; \
	echo "== ruff check"; $(VENV)/bin/ruff check . || rc=1; \
	echo "== unit tests"; $(MAKE) --no-print-directory unit-tests || rc=1; \
	echo "== system tests (sandbox)"; $(MAKE) --no-print-directory system-tests || rc=1; \
	echo "== package tests (a fresh sandbox)"; $(MAKE) --no-print-directory package-tests || rc=1; \
	exit $$rc

# Distribution packages (packaging/, docs/packaging.md), built offline from a copy of the working tree with the wheels
# inside. rpm: Debian's rpmbuild works too; rpmlint, where installed, checks the result.
PKG_OUT ?= build/packages
RPMLINT = rpmlint -c packaging/rpm/fedora.toml -r packaging/rpm/gpuschedd.rpmlintrc
deb: wheels
	packaging/build.sh deb $(PKG_OUT)
rpm: wheels
	packaging/build.sh rpm $(PKG_OUT)
	! command -v rpmlint > /dev/null || $(RPMLINT) $(PKG_OUT)/gpuschedd-*.rpm

# The packages installed, upgraded with a frozen model present, removed and purged, in a sandbox of their own (the
# system tests' sandbox has the project installed by `make install`).
package-tests: venv
	SYSD_NAME=$(PKG_CHECK_NAME) SYSD_BIND="$(SANDBOX_BIND)" $(SANDBOX) with $(VENV)/bin/pytest -q tests/packaging $(PYTEST_ARGS)

demo:
	@PYTHON=$(PYTHON) tools/prerequisites.sh demo
	@$(MAKE) --no-print-directory wheels
	SYSD_NAME=$(DEMO_NAME) SYSD_BIND="$(SANDBOX_BIND)" $(SANDBOX) with tools/demo.sh

clean:
	rm -rf build src/*.egg-info .pytest_cache
