# Sourced by scripts/run and scripts/test: installs what is missing, from Debian only.
packages=(
  build-essential pkg-config meson ninja-build
  libsdbus-c++-dev libsdbus-c++-bin libsystemd-dev libudev-dev libblkid-dev
  libspdlog-dev catch2 libcli11-dev nlohmann-json3-dev
  dbus udev fdisk util-linux python3 python3-dbus polkitd
)

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
