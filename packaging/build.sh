#!/bin/bash
# packaging/build.sh: build gpuschedd's distribution packages from this checkout (`make deb`, `make rpm`).
#
#   packaging/build.sh deb OUTDIR    OUTDIR/gpuschedd_VERSION_ARCH.deb      (dpkg-buildpackage -b, debhelper 13)
#   packaging/build.sh rpm OUTDIR    OUTDIR/gpuschedd-VERSION-RELEASE.ARCH.rpm and the .src.rpm  (rpmbuild -ba)
#
# Both start from a copy of the working tree (git's tracked and not-ignored files: what `make install` would
# install), with the dependencies' wheels from WHEELS (default build/wheels, made by `make wheels`) inside it, so
# the build itself never reaches the network. The copy and the build's leftovers live in OUTDIR/.work.
#
# Knobs (environment):
#   DEB_VERSION   version of the .deb; when it differs from packaging/debian/changelog's, an entry for it is added
#                 to the copy's changelog (a local rebuild, e.g. to test an upgrade)
#   RPM_RELEASE   Release: of the rpm (default: the spec's)
#   WHEELS        the wheels directory
set -euo pipefail

kind=${1:-}
out=${2:-}
case "$kind" in deb | rpm) ;; *) sed -n '2,/^set -euo/p' "$0" | sed '$d' >&2; exit 2 ;; esac
[ -n "$out" ] || { echo "build.sh: no OUTDIR" >&2; exit 2; }

top=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$out/.work
wheels=$(cd "${WHEELS:-$top/build/wheels}" && pwd)
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$top/pyproject.toml")
[ -n "$version" ] || { echo "build.sh: no version in pyproject.toml" >&2; exit 1; }
ls "$wheels"/*.whl > /dev/null || { echo "build.sh: no wheels in $wheels (make wheels)" >&2; exit 1; }

# stage DIR: the working tree's files into DIR, plus the wheels in DIR/wheels
stage() {
	local dest=$1
	rm -rf "$dest"
	mkdir -p "$dest/wheels"
	if git -C "$top" rev-parse --git-dir > /dev/null 2>&1; then
		# tracked (minus deleted ones) and untracked-but-not-ignored files; never build/, .venv/, caches
		git -C "$top" ls-files -z --cached --others --exclude-standard \
			| (cd "$top" && while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done) \
			| tar -C "$top" --null -T - -cf - | tar -C "$dest" -xf -
	else
		tar -C "$top" --exclude=./build --exclude=./.venv --exclude=./.git --exclude=__pycache__ \
			--exclude='*.egg-info' --exclude=.pytest_cache --exclude=.ruff_cache -cf - . | tar -C "$dest" -xf -
	fi
	cp "$wheels"/*.whl "$dest/wheels/"
}

build_deb() {
	local src=$work/gpuschedd-$version current
	rm -rf "$work"
	stage "$src"
	cp -a "$top/packaging/debian" "$src/debian"
	current=$(dpkg-parsechangelog -l "$src/debian/changelog" -S Version)
	if [ -n "${DEB_VERSION:-}" ] && [ "$DEB_VERSION" != "$current" ]; then
		{
			printf 'gpuschedd (%s) unstable; urgency=medium\n\n  * Local rebuild.\n\n' "$DEB_VERSION"
			printf ' -- %s  %s\n\n' "$(dpkg-parsechangelog -l "$src/debian/changelog" -S Maintainer)" "$(date -R)"
			cat "$src/debian/changelog"
		} > "$src/debian/changelog.new"
		mv "$src/debian/changelog.new" "$src/debian/changelog"
	fi
	(cd "$src" && dpkg-buildpackage -b -us -uc)
	rm -f "$out"/gpuschedd_*.deb "$out"/gpuschedd-dbgsym_*.deb
	mv "$work"/*.deb "$out/"
	ls -1 "$out"/*.deb
}

build_rpm() {
	local name=gpuschedd-$version args=()
	rm -rf "$work"
	mkdir -p "$work/SOURCES" "$work/SPECS"
	stage "$work/$name"
	tar -C "$work" -czf "$work/SOURCES/$name.tar.gz" "$name"
	rm -rf "${work:?}/$name"
	cp "$top/sysusers.d/gpusched.conf" "$work/SOURCES/gpusched.sysusers"
	cp "$top/packaging/rpm/gpuschedd.spec" "$work/SPECS/"
	sed -i "s/^Version:\( *\).*/Version:\1$version/" "$work/SPECS/gpuschedd.spec"
	[ -z "${RPM_RELEASE:-}" ] || sed -i "s/^Release:\( *\).*/Release:\1$RPM_RELEASE%{?dist}/" "$work/SPECS/gpuschedd.spec"
	# Not an RPM distribution (Debian has rpmbuild, but neither Fedora's macros nor an rpm database that could
	# answer BuildRequires): load the macros Fedora's packages would bring, and skip the BuildRequires check.
	if [ -z "$(rpm --eval '%{?_unitdir}')" ]; then
		args+=(--load "$top/packaging/rpm/macros.non-rpm-host" --nodeps)
	fi
	rm -f "$out"/gpuschedd-*.rpm
	rpmbuild -ba "${args[@]}" \
		--define "_topdir $work" --define "_rpmdir $out" --define "_srcrpmdir $out" \
		--define "_build_name_fmt %%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm" \
		"$work/SPECS/gpuschedd.spec"
	ls -1 "$out"/*.rpm
}

"build_$kind"
