#pragma once

#include "ref_links.hpp"

#include "core/record.hpp"
#include "core/registry.hpp"

#include <loopd/attach_options.hpp>
#include <loopd/device_info.hpp>
#include <loopd/log.hpp>
#include <loopd/unique_fd.hpp>

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace loopd::service {

class DeviceObject;

// Resizing: listed and usable, but its kernel state is being changed (Resize):
// no detach or other resize meanwhile.
enum class DeviceState { Attaching, Ready, Detaching, Resizing };

// Why a device left the table. The first five are DeviceRemoved's reasons.
enum class RemovalReason { Detached, ClientVanished, ForeignDetach, Autoclear, Timeout, Abandoned };
// DeviceRemoved's reason string; nullptr for Abandoned (never listed, no signal).
const char* reasonName(RemovalReason reason) noexcept;

// One attachment loopd owns (from LOOP_CONFIGURE, or adopted) until it is removed.
struct Device {
    DeviceInfo info;
    std::shared_ptr<UniqueFd> lockFd; // LOCK_SH while owned (DESIGN.md, step 6)
    AttachOptions options;
    EventSource source = EventSource::Udev;
    std::string owner; // unique bus name of the caller that attached it
    uint32_t ownerUid = 0;
    DeviceState state = DeviceState::Attaching;
    std::string token;           // names its ownership record
    std::string tag;             // its lo_file_name (core::loFileName; a ref before 0.2)
    uint64_t readyTimestamp = 0; // CLOCK_REALTIME µs; 0 until ready
    uint64_t startedUsec = 0;    // CLOCK_REALTIME when the attach call came (0: adopted)
    core::RequestId request = 0; // the attach's readiness request while attaching
    bool ownerGone = false;      // its client left the bus (lifetime=client: detach)
    std::unique_ptr<DeviceObject> object;

    Device();
    Device(Device&&) noexcept;
    Device& operator=(Device&&) noexcept;
    ~Device();

    [[nodiscard]] bool listed() const { return readyTimestamp != 0; }
    // Detached when its client leaves the bus: lifetime=client, and lifetime=fd
    // until Device.Open handed out its first fd (then the kernel's autoclear).
    [[nodiscard]] bool tiedToClient() const
    {
        return options.lifetime == Lifetime::Client || (options.lifetime == Lifetime::Fd && !options.autoclear);
    }
    [[nodiscard]] core::Watch watch() const;
    // Its ownership record in the given state, made from what the device holds.
    [[nodiscard]] core::Record record(core::Record::State state) const;
    // "/dev/loop3 (diskseq 12)", for messages.
    [[nodiscard]] std::string describe() const;
    // The journal's fields for messages about it (DISKSEQ=, LOOPD_DEVICE=, LOOPD_REF=).
    [[nodiscard]] log::Context about() const;
};

// The one place that changes which devices loopd owns. It keeps, whatever the
// order of calls:
//  - one device per diskseq;
//  - one owning attachment per loop number: the newest (the kernel hands a
//    released number out again before loopd has confirmed the old release);
//  - refs unique, and no ref equal to another device's link name (`web-part1`
//    while `web` has a partition 1, or the other way round);
//  - a device listed (counted in Devices, its by-ref links present) exactly from
//    the moment it is ready until it is removed.
// Loop thread only. Knows no flow: flows call it and learn of each other's doings
// only through what it reports (onRemoved).
class DeviceTable {
public:
    explicit DeviceTable(RefLinks links);

    // What the table reports: a device joined; a device left (called before it is
    // destroyed; its object emits InterfacesRemoved when it goes).
    std::function<void(const Device&)> onAdded;
    std::function<void(Device&, RemovalReason)> onRemoved;

    // Throws Error(InvalidArgument) naming the ref when it, or one of the links a
    // device with `partitions` would get, collides with a ref or link in use.
    void checkRef(const std::string& ref, const std::vector<unsigned>& partitions = {}) const;
    // Holds a ref for an attach that is authorized but not yet configured.
    void reserveRef(const std::string& ref);
    void releaseRef(const std::string& ref) noexcept;

    // A configured (or adopted) device joins; its ref must be reserved already or
    // free. Throws Error(InvalidArgument) on a link collision, leaving nothing.
    Device& add(Device device);
    // Ready now: listed, counted, linked.
    void markReady(uint64_t diskseq, uint64_t realtimeUsec);
    void setState(uint64_t diskseq, DeviceState state);
    // A resize changed the device's partitions: its by-ref links follow. A new
    // partition whose link another device's ref already names gets no link.
    void setPartitions(uint64_t diskseq, std::vector<unsigned> partitions);
    // Takes the device out, with its number (if still its), ref and links.
    void remove(uint64_t diskseq, RemovalReason reason);

    [[nodiscard]] Device* find(uint64_t diskseq);
    [[nodiscard]] const Device* find(uint64_t diskseq) const;
    // The newest owned attachment on loop number N.
    [[nodiscard]] Device* owner(unsigned number);
    // A name as WaitReady and loopctl take it: /dev/loopN, then a diskseq (all
    // digits), then a ref. nullptr for none (and for "").
    [[nodiscard]] Device* resolve(std::string_view name);

    [[nodiscard]] uint32_t listedCount() const { return listed_; }
    // Devices owned by a uid, in whatever state (for its quota).
    [[nodiscard]] std::size_t countOwnedBy(uint32_t uid) const;
    // Whether a ref is reserved or names a device.
    [[nodiscard]] bool refInUse(const std::string& ref) const { return refs_.count(ref) != 0; }
    [[nodiscard]] std::size_t size() const { return devices_.size(); }
    [[nodiscard]] std::vector<unsigned> ownedNumbers() const;
    [[nodiscard]] std::vector<uint64_t> diskseqs() const;
    [[nodiscard]] const RefLinks& links() const { return links_; }

    // Checks every invariant above (unit tests and the fuzzer); throws
    // std::logic_error naming the one broken.
    void verify() const;

private:
    [[nodiscard]] bool linkTaken(const std::string& name, const std::string& self) const;

    RefLinks links_;
    std::map<uint64_t, Device> devices_;   // by diskseq
    std::map<unsigned, uint64_t> numbers_; // loop number -> owning diskseq
    std::map<std::string, uint64_t> refs_; // ref -> diskseq, 0 while reserved
    uint32_t listed_ = 0;
};

} // namespace loopd::service
