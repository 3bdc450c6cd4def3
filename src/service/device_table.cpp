#include "device_table.hpp"

#include "device_objects.hpp"
#include "kernel/loop_device.hpp"

#include <loopd/error.hpp>

#include <algorithm>
#include <charconv>
#include <stdexcept>

namespace loopd::service {
namespace {

bool allDigits(std::string_view text)
{
    return !text.empty() && std::all_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; });
}

template <typename Number> std::optional<Number> parseNumber(std::string_view text)
{
    Number value{};
    if (!allDigits(text))
        return std::nullopt;
    const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
    if (error != std::errc{} || end != text.data() + text.size())
        return std::nullopt;
    return value;
}

} // namespace

const char* reasonName(RemovalReason reason) noexcept
{
    switch (reason) {
    case RemovalReason::Detached:
        return "detached";
    case RemovalReason::ClientVanished:
        return "client-vanished";
    case RemovalReason::ForeignDetach:
        return "foreign-detach";
    case RemovalReason::Autoclear:
        return "autoclear";
    case RemovalReason::Timeout:
        return "timeout";
    case RemovalReason::Abandoned:
        break;
    }
    return nullptr;
}

Device::Device() = default;
Device::Device(Device&&) noexcept = default;
Device& Device::operator=(Device&&) noexcept = default;
Device::~Device() = default;

core::Watch Device::watch() const
{
    return core::Watch{info.diskseq, info.number, info.partitions, source};
}

core::Record Device::record(core::Record::State state) const
{
    core::Record r;
    r.state = state;
    r.token = token;
    r.fileName = tag;
    r.info = info;
    r.ref = options.ref;
    r.lifetime = options.lifetime;
    r.owner = owner;
    r.ownerUid = ownerUid;
    r.readyTimestamp = readyTimestamp;
    r.letGo = lockFd && !*lockFd;
    r.hidden = options.hidden;
    return r;
}

log::Context Device::about() const
{
    return {.diskseq = info.diskseq, .device = kernel::loopDevNode(info.number), .ref = options.ref};
}

std::string Device::describe() const
{
    return kernel::loopDevNode(info.number) + " (diskseq " + std::to_string(info.diskseq) + ")";
}

DeviceTable::DeviceTable(RefLinks links) : links_(std::move(links)) {}

// `name` is taken when it is another ref, or the link of another device's
// partition (`<ref>-part<N>`, N one of its partitions).
bool DeviceTable::linkTaken(const std::string& name, const std::string& self) const
{
    if (name != self && refs_.count(name))
        return true;
    const auto cut = name.rfind("-part");
    if (cut == std::string::npos)
        return false;
    const auto base = name.substr(0, cut);
    const auto partition = parseNumber<unsigned>(std::string_view(name).substr(cut + 5));
    const auto owner = refs_.find(base);
    if (!partition || base == self || owner == refs_.end() || owner->second == 0)
        return false;
    const auto& partitions = devices_.at(owner->second).info.partitions;
    return std::find(partitions.begin(), partitions.end(), *partition) != partitions.end();
}

void DeviceTable::checkRef(const std::string& ref, const std::vector<unsigned>& partitions) const
{
    if (ref.empty())
        return;
    if (linkTaken(ref, ref))
        throw Error(Errc::InvalidArgument, "ref '" + ref + "' is already used by another loopd device or its links");
    for (const auto partition : partitions)
        if (const auto name = RefLinks::partitionName(ref, partition); linkTaken(name, ref))
            throw Error(Errc::InvalidArgument, "ref '" + ref + "' would link partition " + std::to_string(partition) +
                                                   " as '" + name + "', which another loopd device uses");
}

void DeviceTable::reserveRef(const std::string& ref)
{
    if (ref.empty())
        return;
    if (refs_.count(ref))
        throw Error(Errc::InvalidArgument, "ref '" + ref + "' is already used by another loopd device");
    checkRef(ref);
    refs_.emplace(ref, 0);
}

void DeviceTable::releaseRef(const std::string& ref) noexcept
{
    if (const auto it = refs_.find(ref); it != refs_.end() && it->second == 0)
        refs_.erase(it);
}

Device& DeviceTable::add(Device device)
{
    const auto diskseq = device.info.diskseq;
    const auto ref = device.options.ref; // a copy: device is moved into the table below
    if (devices_.count(diskseq))
        throw std::logic_error("diskseq " + std::to_string(diskseq) + " is in the table twice");
    if (!ref.empty()) {
        const auto it = refs_.find(ref);
        if (it != refs_.end() && it->second != 0)
            throw Error(Errc::InvalidArgument, "ref '" + ref + "' is already used by another loopd device");
        checkRef(ref, device.info.partitions);
    }
    auto& stored = devices_.emplace(diskseq, std::move(device)).first->second;
    if (!ref.empty())
        refs_[ref] = diskseq;
    numbers_[stored.info.number] = diskseq; // the newest attachment on the number owns it
    if (stored.listed()) {                  // adopted: ready already
        ++listed_;
        links_.link(ref, stored.info.number, stored.info.partitions);
    }
    if (onAdded)
        onAdded(stored);
    return stored;
}

void DeviceTable::markReady(uint64_t diskseq, uint64_t realtimeUsec)
{
    auto& device = devices_.at(diskseq);
    device.state = DeviceState::Ready;
    if (device.listed())
        return;
    device.readyTimestamp = std::max<uint64_t>(realtimeUsec, 1);
    device.request = 0;
    ++listed_;
    links_.link(device.options.ref, device.info.number, device.info.partitions);
}

void DeviceTable::setState(uint64_t diskseq, DeviceState state)
{
    devices_.at(diskseq).state = state;
}

void DeviceTable::setPartitions(uint64_t diskseq, std::vector<unsigned> partitions)
{
    auto& device = devices_.at(diskseq);
    const auto& ref = device.options.ref;
    if (device.listed())
        links_.unlink(ref, device.info.partitions);
    device.info.partitions = std::move(partitions);
    if (!device.listed())
        return;
    std::vector<unsigned> free;
    for (const auto partition : device.info.partitions)
        if (ref.empty() || !linkTaken(RefLinks::partitionName(ref, partition), ref))
            free.push_back(partition);
    links_.link(ref, device.info.number, free);
}

void DeviceTable::remove(uint64_t diskseq, RemovalReason reason)
{
    auto node = devices_.extract(diskseq);
    if (node.empty())
        return;
    auto& device = node.mapped();
    if (const auto it = numbers_.find(device.info.number); it != numbers_.end() && it->second == diskseq)
        numbers_.erase(it);
    if (const auto it = refs_.find(device.options.ref); it != refs_.end() && it->second == diskseq)
        refs_.erase(it);
    if (device.listed()) {
        --listed_;
        links_.unlink(device.options.ref, device.info.partitions);
    }
    if (onRemoved)
        onRemoved(device, reason);
}

Device* DeviceTable::find(uint64_t diskseq)
{
    const auto it = devices_.find(diskseq);
    return it == devices_.end() ? nullptr : &it->second;
}

const Device* DeviceTable::find(uint64_t diskseq) const
{
    const auto it = devices_.find(diskseq);
    return it == devices_.end() ? nullptr : &it->second;
}

Device* DeviceTable::owner(unsigned number)
{
    const auto it = numbers_.find(number);
    return it == numbers_.end() ? nullptr : find(it->second);
}

Device* DeviceTable::resolve(std::string_view name)
{
    constexpr std::string_view devPrefix = "/dev/loop";
    if (name.substr(0, devPrefix.size()) == devPrefix) {
        const auto number = parseNumber<unsigned>(name.substr(devPrefix.size()));
        return number ? owner(*number) : nullptr;
    }
    if (allDigits(name)) {
        const auto diskseq = parseNumber<uint64_t>(name);
        return diskseq ? find(*diskseq) : nullptr;
    }
    const auto it = refs_.find(std::string(name));
    return it == refs_.end() || it->second == 0 ? nullptr : find(it->second);
}

std::size_t DeviceTable::countOwnedBy(uint32_t uid) const
{
    return static_cast<std::size_t>(std::count_if(devices_.begin(), devices_.end(),
                                                  [uid](const auto& entry) { return entry.second.ownerUid == uid; }));
}

std::vector<unsigned> DeviceTable::ownedNumbers() const
{
    std::vector<unsigned> numbers;
    for (const auto& [number, diskseq] : numbers_)
        numbers.push_back(number);
    return numbers;
}

std::vector<uint64_t> DeviceTable::diskseqs() const
{
    std::vector<uint64_t> all;
    for (const auto& [diskseq, device] : devices_)
        all.push_back(diskseq);
    return all;
}

void DeviceTable::verify() const
{
    auto broken = [](const std::string& what) { throw std::logic_error("device table: " + what); };
    uint32_t listed = 0;
    std::map<unsigned, uint64_t> newest;
    for (const auto& [diskseq, device] : devices_) {
        if (device.info.diskseq != diskseq)
            broken("device filed under diskseq " + std::to_string(diskseq));
        listed += device.listed() ? 1 : 0;
        if (device.listed() && device.state == DeviceState::Attaching)
            broken(device.describe() + " is listed while attaching");
        auto& top = newest[device.info.number];
        top = std::max(top, diskseq);
        if (!device.options.ref.empty() &&
            (!refs_.count(device.options.ref) || refs_.at(device.options.ref) != diskseq))
            broken("ref '" + device.options.ref + "' does not name " + device.describe());
    }
    if (listed != listed_)
        broken("listed count " + std::to_string(listed_) + ", devices listed " + std::to_string(listed));
    for (const auto& [number, diskseq] : numbers_)
        if (!newest.count(number) || newest.at(number) != diskseq)
            broken("loop" + std::to_string(number) + " is not owned by its newest attachment");
    for (const auto& [ref, diskseq] : refs_) {
        if (diskseq != 0 && !devices_.count(diskseq))
            broken("ref '" + ref + "' names a device that is gone");
        const auto cut = ref.rfind("-part");
        if (cut != std::string::npos && linkTaken(ref, ref))
            broken("ref '" + ref + "' is another device's link");
    }
}

} // namespace loopd::service
