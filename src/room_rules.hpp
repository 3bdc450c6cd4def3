// Forced into every file of the kernel, uevent and core rooms (-include, see
// meson.build), with LOOPD_ROOM_<NAME> defined. Include paths keep the rooms'
// own headers apart; this makes the system's headers a room may not use a
// compile error too, so DESIGN.md's "who may use whom" is checked by the
// compiler: a poisoned name anywhere after this, in a header included or in
// the room's code, fails the build.
#pragma once

// Only the service room talks D-Bus (sdbus-c++, sd-bus).
#pragma GCC poison sdbus sd_bus_open sd_bus_message_append

#if defined(LOOPD_ROOM_CORE)
// core is pure logic, fed events: no netlink, no udev, no syscalls.
#pragma GCC poison udev_new ioctl sendmsg recvmsg epoll_create1
#elif defined(LOOPD_ROOM_KERNEL)
// kernel wraps syscalls; udev is the uevent room's.
#pragma GCC poison udev_new
#endif
