#pragma once

#include <string>

struct sd_bus;

namespace loopd::service {

// A message loopd marshalled itself (header, then body), written on sd-bus's
// socket between sd-bus's own messages: false when that could not begin (sd-bus
// has a message of its own queued, the socket is full, or the connection is not
// one stream socket), and nothing was written; sd-bus is then to send it. Loop
// thread only: sd-bus's only user. sd-bus has no public way to send bytes
// marshalled elsewhere (device_objects.cpp, GetManagedObjects, says why loopd
// marshals that one reply itself).
bool writeBetweenMessages(sd_bus* bus, const std::string& header, const std::string& body);

} // namespace loopd::service
