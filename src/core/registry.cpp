#include "registry.hpp"

#include <algorithm>

namespace loopd::core {

std::vector<Outcome> Registry::expect(RequestId id, Goal goal, Watch watch, Clock::time_point deadline,
                                      std::optional<Clock::time_point> nudgeAt)
{
    const auto number = watch.number;
    const auto& request = requests_[id] = Request{goal, std::move(watch), deadline, nudgeAt};
    byNumber_.emplace(number, id);
    std::vector<Outcome> out;
    if (const auto kind = evaluate(request))
        settle(id, *kind, out);
    return out;
}

std::vector<Outcome> Registry::onEvent(const Uevent& event)
{
    ledger_.feed(event);
    return reevaluate(event.number);
}

std::vector<Outcome> Registry::resync(unsigned number, EventSource source, EventLedger::View snapshot)
{
    ledger_.resync(number, source, std::move(snapshot));
    return reevaluate(number);
}

std::vector<Nudge> Registry::nudges(Clock::time_point now, Clock::duration retry)
{
    std::map<unsigned, Nudge> due; // one per device, though attach and WaitReady may both wait
    for (auto& [id, request] : requests_) {
        if (!request.nudgeAt || *request.nudgeAt > now)
            continue;
        request.nudgeAt = now + retry;
        due.insert_or_assign(request.watch.number, missing(request, ++request.nudges));
    }
    std::vector<Nudge> out;
    for (auto& [number, nudge] : due)
        out.push_back(std::move(nudge));
    return out;
}

Nudge Registry::missing(const Request& request, unsigned attempt) const
{
    const auto& watch = request.watch;
    const auto& view = ledger_.view(watch.number, watch.source);
    const bool current = view.diskseq == watch.diskseq;
    Nudge nudge{request.goal, watch, attempt, false, {}};
    if (request.goal == Goal::Ready)
        nudge.disk = !current || !view.disk;
    for (const auto p : watch.partitions)
        if ((request.goal == Goal::Ready) == (!current || view.partitions.count(p) == 0))
            nudge.partitions.push_back(p);
    return nudge;
}

std::vector<Nudge> Registry::lacking(EventSource source) const
{
    std::map<unsigned, Nudge> due; // one per device
    for (const auto& [id, request] : requests_)
        if (request.goal == Goal::Ready && request.watch.source == source)
            due.insert_or_assign(request.watch.number, missing(request, request.nudges));
    std::vector<Nudge> out;
    for (auto& [number, nudge] : due)
        out.push_back(std::move(nudge));
    return out;
}

std::vector<Watch> Registry::watches(unsigned number) const
{
    std::vector<Watch> out;
    const auto [first, last] = byNumber_.equal_range(number);
    for (auto it = first; it != last; ++it)
        out.push_back(requests_.at(it->second).watch);
    return out;
}

std::vector<Outcome> Registry::retarget(RequestId id, EventSource source)
{
    std::vector<Outcome> out;
    const auto it = requests_.find(id);
    if (it == requests_.end())
        return out;
    it->second.watch.source = source;
    if (const auto kind = evaluate(it->second))
        settle(id, *kind, out);
    return out;
}

std::vector<unsigned> Registry::watchedNumbers() const
{
    std::vector<unsigned> numbers;
    for (auto it = byNumber_.begin(); it != byNumber_.end(); it = byNumber_.upper_bound(it->first))
        numbers.push_back(it->first);
    return numbers;
}

std::vector<Outcome> Registry::reevaluate(unsigned number)
{
    std::vector<RequestId> affected;
    const auto [first, last] = byNumber_.equal_range(number);
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
    auto consider = [&](Clock::time_point t) {
        if (!next || t < *next)
            next = t;
    };
    for (const auto& [id, request] : requests_) {
        consider(request.deadline);
        if (request.nudgeAt)
            consider(*request.nudgeAt);
    }
    return next;
}

std::optional<Outcome::Kind> Registry::evaluate(const Request& request) const
{
    const auto& watch = request.watch;
    const auto& view = ledger_.view(watch.number, watch.source);

    if (request.goal == Goal::Released) {
        // The partitions' remove events say the kernel let go of them. They carry
        // the old diskseq on 6.18 and the next one on 6.1 (measured under qemu,
        // kernel matrix): a newer diskseq on the device implies the same.
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
