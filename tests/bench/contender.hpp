#pragma once

#include <loopd/unique_fd.hpp>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

// The ways to get a loop device with its partitions ready that the benchmark puts
// side by side. Each contender hands out one Client per concurrent caller: a client
// is what one caller has for itself (its own D-Bus connection, say), set up before
// the clock starts.
namespace loopd::bench {

struct Attachment {
    std::string devnode;
    uint64_t diskseq = 0;                   // as the contender reported it, or read from sysfs at reply time
    bool repliedPartitions = false;         // whether the reply lists partitions at all
    std::vector<std::string> partitions;    // as the reply listed them
    std::string handle;                     // contender's own name for it (udisks2 object path)
    UniqueFd holdFd;                        // floor: the read-only LOCK_SH fd kept while attached
    std::vector<unsigned> partitionNumbers; // floor: what it added with BLKPG
};

struct AttachOptions {
    bool partscan = true;
};

class Client {
public:
    virtual ~Client() = default;
    // Returns when the contender says the device is ready (its own notion of it).
    // Throws on failure, leaving nothing attached.
    virtual Attachment attach(const std::string& image, const AttachOptions& options) = 0;
    // Returns when the contender says the device is released.
    virtual void detach(Attachment& attachment) = 0;
};

class Contender {
public:
    virtual ~Contender() = default;
    virtual std::unique_ptr<Client> client() = 0;
};

std::unique_ptr<Contender> makeLoopd();
std::unique_ptr<Contender> makeLosetup();
std::unique_ptr<Contender> makeUdisks2();

} // namespace loopd::bench
