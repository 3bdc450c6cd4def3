# Sourced by scripts/run and scripts/test: installs what is missing, from Debian only.
packages=(
  build-essential pkg-config meson ninja-build
  libsdbus-c++-dev libsdbus-c++-bin libsystemd-dev libudev-dev libblkid-dev
  libfmt-dev libspdlog-dev catch2 libcli11-dev nlohmann-json3-dev
  dbus udev fdisk util-linux python3 python3-dbus python3-gi
  systemd libdbus-1-dev libpolkit-gobject-1-dev polkitd
  fuse3 python3-fusepy bash-completion scdoc
)
# Only scripts/test and scripts/fuzz need these (libFuzzer's runtime is in
# libclang-rt-14-dev); they add them to packages before install_missing.
fuzz_packages=(clang libclang-rt-14-dev)
# Only scripts/package and scripts/test (its package pass) need these:
# dpkg-buildpackage's helpers and the package checker (dpkg-dev comes with
# build-essential).
package_packages=(debhelper lintian)

install_missing() {
  local missing=()
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
}

build() {
  if [ ! -f "$top/build/build.ninja" ]; then
    meson setup "$top/build" "$top"
  fi
  ninja -C "$top/build"
}

# libFuzzer targets (tests/fuzz): clang only, in a build dir of their own; the
# default build above stays g++. `meson test --suite fuzz` builds what it runs.
setup_fuzz() {
  if [ ! -f "$top/build-fuzz/build.ninja" ]; then
    CXX=clang++ meson setup "$top/build-fuzz" "$top" -Dfuzzing=true
  fi
}

build_fuzzers() {
  setup_fuzz
  ninja -C "$top/build-fuzz" fuzzers
}

# The whole project with ASan+UBSan (gcc), for the sanitizer pass of scripts/test;
# `meson test` builds the targets of the suites it runs. -O1 as ASan advises.
# -Wno-maybe-uninitialized: GCC's manual warns that sanitizers cause false
# positives of that warning; gcc 12 raises one in <regex> (via catch.hpp).
setup_asan() {
  if [ ! -f "$top/build-asan/build.ninja" ]; then
    meson setup "$top/build-asan" "$top" -Db_sanitize=address,undefined -Db_lundef=false \
      -Doptimization=1 -Dcpp_args=-Wno-maybe-uninitialized
  fi
}
