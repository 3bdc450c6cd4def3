#include "event_ledger.hpp"

namespace loopd::core {
namespace {
const EventLedger::View emptyView;

std::size_t slot(EventSource source)
{
    return source == EventSource::Udev ? 1 : 0;
}
} // namespace

void EventLedger::feed(const Uevent& event)
{
    // Without DISKSEQ an event cannot be tied to an attachment (kernel < 5.15).
    if (event.diskseq == 0)
        return;
    auto& view = views_[event.number][slot(event.source)];
    if (event.diskseq < view.diskseq)
        return;
    if (event.diskseq > view.diskseq)
        view = View{event.diskseq, false, {}};

    const bool present = event.action != UeventAction::Remove;
    if (event.partition == 0)
        view.disk = present;
    else if (present)
        view.partitions.insert(event.partition);
    else
        view.partitions.erase(event.partition);
}

void EventLedger::resync(unsigned number, EventSource source, View snapshot)
{
    auto& view = views_[number][slot(source)];
    if (snapshot.diskseq >= view.diskseq)
        view = std::move(snapshot);
}

const EventLedger::View& EventLedger::view(unsigned number, EventSource source) const
{
    const auto it = views_.find(number);
    return it == views_.end() ? emptyView : it->second[slot(source)];
}

uint64_t EventLedger::newestDiskseq(unsigned number) const
{
    return std::max(view(number, EventSource::Kernel).diskseq, view(number, EventSource::Udev).diskseq);
}

} // namespace loopd::core
