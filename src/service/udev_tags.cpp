#include "udev_tags.hpp"

#include "services.hpp"

#include "kernel/sysfs.hpp"

#include <loopd/log.hpp>

#include <fstream>

namespace loopd::service {

UdevTags::UdevTags(std::filesystem::path dir, WorkerPool& workers) : dir_(std::move(dir)), workers_(workers) {}

void UdevTags::write(uint64_t diskseq, const std::map<std::string, std::string>& properties) const noexcept
{
    // Written whole under a temporary name and renamed: udev never reads half.
    const auto path = dir_ / std::to_string(diskseq);
    const auto temporary = dir_ / ("." + std::to_string(diskseq) + ".tmp");
    std::error_code ec;
    std::filesystem::create_directories(dir_, ec);
    {
        std::ofstream out(temporary, std::ios::trunc);
        for (const auto& [key, value] : properties)
            out << key << '=' << value << '\n';
        if (!out.flush()) {
            log::warn("cannot write udev properties {}", temporary.string());
            return;
        }
    }
    std::filesystem::rename(temporary, path, ec);
    if (ec)
        log::warn("cannot write udev properties {}: {}", path.string(), ec.message());
}

void UdevTags::remove(uint64_t diskseq) const noexcept
{
    std::error_code ec;
    std::filesystem::remove(dir_ / std::to_string(diskseq), ec);
}

void UdevTags::confirm(unsigned number, uint64_t diskseq, const std::vector<unsigned>& partitions, EventSource source,
                       std::chrono::milliseconds timeout, Then then)
{
    const auto uuid = makeUuid();
    auto done = std::make_shared<std::atomic<bool>>(false);
    Pending pending{diskseq, source, {0}, std::move(then), done};
    pending.missing.insert(partitions.begin(), partitions.end());
    pending_.emplace(uuid, std::move(pending));
    workers_.submit([number, partitions, uuid] {
        try {
            kernel::triggerChange(number, 0, uuid);
            for (const auto p : partitions)
                kernel::triggerChange(number, p, uuid);
        } catch (const std::exception& e) {
            log::warn("cannot ask for the events of dev=loop{}: {}", number, e.what()); // the timeout answers
        }
        return WorkerPool::Continuation([] {});
    });
    // The loop's timers are not this helper's to change.
    postAfter(workers_, timeout, done, [this, uuid] {
        auto node = pending_.extract(uuid);
        if (!node.empty())
            node.mapped().then(Confirmation::TimedOut);
    });
}

void UdevTags::onEvent(const Uevent& event)
{
    if (event.synthUuid.empty())
        return;
    const auto it = pending_.find(event.synthUuid);
    if (it == pending_.end() || it->second.source != event.source || it->second.diskseq != event.diskseq)
        return;
    // Its own event, processed by udev without what the rule imports: no later
    // event will have it either.
    const bool imported = event.source != EventSource::Udev || event.loopdProperties;
    it->second.missing.erase(event.partition);
    if (imported && !it->second.missing.empty())
        return;
    auto node = pending_.extract(it);
    *node.mapped().done = true;
    node.mapped().then(imported ? Confirmation::Confirmed : Confirmation::NotImported);
}

} // namespace loopd::service
