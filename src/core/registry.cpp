#include "registry.hpp"

#include <algorithm>

namespace loopd::core {

std::vector<Outcome> Registry::expect(RequestId id, Goal goal, Watch watch, Clock::time_point deadline)
{
    const auto number = watch.number;
    const auto& request = requests_[id] = Request{goal, std::move(watch), deadline};
    byNumber_.emplace(number, id);
    std::vector<Outcome> out;
    if (const auto kind = evaluate(request))
        settle(id, *kind, out);
    return out;
}

std::vector<Outcome> Registry::onEvent(const Uevent& event)
{
    ledger_.feed(event);
    std::vector<RequestId> affected;
    const auto [first, last] = byNumber_.equal_range(event.number);
    for (auto it = first; it != last; ++it)
        affected.push_back(it->second);

    std::vector<Outcome> out;
    for (const auto id : affected)
        if (const auto kind = evaluate(requests_.at(id)))
            settle(id, *kind, out);
    return out;
}

std::vector<Outcome> Registry::onTime(Clock::time_point now)
{
    std::vector<RequestId> expired;
    for (const auto& [id, request] : requests_)
        if (request.deadline <= now)
            expired.push_back(id);
    std::vector<Outcome> out;
    for (const auto id : expired)
        settle(id, Outcome::Kind::TimedOut, out);
    return out;
}

void Registry::cancel(RequestId id)
{
    const auto it = requests_.find(id);
    if (it == requests_.end())
        return;
    const auto [first, last] = byNumber_.equal_range(it->second.watch.number);
    for (auto entry = first; entry != last; ++entry)
        if (entry->second == id) {
            byNumber_.erase(entry);
            break;
        }
    requests_.erase(it);
}

std::optional<Clock::time_point> Registry::nextDeadline() const
{
    std::optional<Clock::time_point> next;
    for (const auto& [id, request] : requests_)
        if (!next || request.deadline < *next)
            next = request.deadline;
    return next;
}

std::optional<Outcome::Kind> Registry::evaluate(const Request& request) const
{
    const auto& watch = request.watch;
    const auto& view = ledger_.view(watch.number, watch.source);

    if (request.goal == Goal::Released) {
        // Detach events still carry the old diskseq: the partitions' remove events
        // say the kernel let go of them. A newer attachment implies the same.
        if (ledger_.newestDiskseq(watch.number) > watch.diskseq)
            return Outcome::Kind::Released;
        const bool anyLeft = std::any_of(watch.partitions.begin(), watch.partitions.end(),
                                         [&](unsigned p) { return view.partitions.count(p) != 0; });
        return anyLeft ? std::nullopt : std::optional(Outcome::Kind::Released);
    }

    if (ledger_.newestDiskseq(watch.number) > watch.diskseq)
        return Outcome::Kind::Changed;
    if (view.diskseq != watch.diskseq || !view.disk)
        return std::nullopt;
    const bool allThere = std::all_of(watch.partitions.begin(), watch.partitions.end(),
                                      [&](unsigned p) { return view.partitions.count(p) != 0; });
    return allThere ? std::optional(Outcome::Kind::Ready) : std::nullopt;
}

void Registry::settle(RequestId id, Outcome::Kind kind, std::vector<Outcome>& out)
{
    out.push_back(Outcome{id, kind, requests_.at(id).watch});
    cancel(id);
}

} // namespace loopd::core
