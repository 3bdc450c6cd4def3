// loopd-bench: runs attach/detach cycles of one contender at a time, at a given
// concurrency, and reports every cycle's times and whether the reply came with the
// device ready. Driven line by line (JSON) by tests/bench/bench.py, which
// interleaves the contenders, samples loopd's CPU time and RSS, and prints the
// tables. It measures; it asserts nothing about speed.
//
//   loopd-bench --image PATH --partitions N [--table-uuid UUID]
//   stdin:  {"cmd":"batch","contender":"floor|loopd|losetup|udisks2","concurrency":8,"cycles":4}
//           {"cmd":"hold","count":100,"concurrency":4,"partscan":true}   (loopd, kept attached;
//            "images":[paths] attaches those in turn instead of the benchmark's image)
//           {"cmd":"release","concurrency":8}                           (detach what hold kept)
//   stdout: one JSON object per command
#include "contender.hpp"
#include "floor.hpp"
#include "verify.hpp"

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <latch>
#include <map>
#include <mutex>
#include <thread>

namespace loopd::bench {
namespace {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

double msBetween(Clock::time_point a, Clock::time_point b)
{
    return std::chrono::duration<double, std::milli>(b - a).count();
}

int64_t realtimeNs()
{
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch())
        .count();
}

struct Sample {
    double attachMs = -1;
    double detachMs = -1;
    std::string notReady;   // "" = the reply came with everything ready
    bool diskReady = false; // when not: was at least the disk itself ready
    std::string notReleased;
    std::string error;
    std::string devnode;
};

json toJson(const Sample& s)
{
    json j{{"attach_ms", s.attachMs}, {"detach_ms", s.detachMs}, {"dev", s.devnode}};
    if (!s.notReady.empty()) {
        j["not_ready"] = s.notReady;
        j["disk_ready"] = s.diskReady;
    }
    if (!s.notReleased.empty())
        j["not_released"] = s.notReleased;
    if (!s.error.empty())
        j["error"] = s.error;
    return j;
}

// The reply's own shape, for contenders whose reply lists the partitions.
std::string checkReply(const Attachment& a, const ImageSpec& image)
{
    if (!a.repliedPartitions)
        return "";
    std::vector<std::string> expected;
    for (unsigned k = 1; k <= image.partitions; ++k)
        expected.push_back(a.devnode + "p" + std::to_string(k));
    return a.partitions == expected ? "" : "reply lists " + std::to_string(a.partitions.size()) + " partitions";
}

// A contender failed to detach: the benchmark still leaves nothing attached. Only
// if the device is still this attachment; partitions first (this kernel keeps
// BLKPG partitions of a device attached without partscan).
void forceRelease(Attachment& a)
{
    a.holdFd.reset();
    if (a.devnode.empty() || a.diskseq == 0 || sysfsDiskseq(a.devnode) != a.diskseq)
        return;
    const auto command = "partx -d " + a.devnode + " >/dev/null 2>&1; losetup -d " + a.devnode + " >/dev/null 2>&1";
    if (std::system(command.c_str()) != 0)
        std::cerr << "loopd-bench: could not release " << a.devnode << "\n";
}

Sample cycle(Client& client, const ImageSpec& image)
{
    Sample s;
    Attachment a;
    const auto since = realtimeNs();
    const auto t0 = Clock::now();
    try {
        a = client.attach(image.path, {});
    } catch (const std::exception& e) {
        s.error = std::string("attach: ") + e.what();
        return s;
    }
    const auto t1 = Clock::now();
    s.attachMs = msBetween(t0, t1);
    s.devnode = a.devnode;
    // At reply time, before anything else: a contender that answers early is caught.
    s.notReady = checkReady(a.devnode, a.diskseq, image, since);
    if (s.notReady.empty())
        s.notReady = checkReply(a, image);
    else
        s.diskReady = checkReady(a.devnode, a.diskseq, image, since, true).empty();
    const auto t2 = Clock::now();
    try {
        client.detach(a);
    } catch (const std::exception& e) {
        s.error = std::string("detach: ") + e.what();
        forceRelease(a);
        return s;
    }
    s.detachMs = msBetween(t2, Clock::now());
    s.notReleased = checkReleased(a.devnode, a.diskseq);
    return s;
}

// `concurrency` clients, each set up before the clock starts, each running
// `cycles` cycles back to back. Wall time from the common start to the last finish.
json runBatch(Contender& contender, const std::string& name, unsigned concurrency, unsigned cycles,
              const ImageSpec& image)
{
    std::vector<std::vector<Sample>> samples(concurrency);
    std::vector<std::string> setupErrors(concurrency);
    std::latch ready(concurrency + 1), go(1);
    std::vector<std::thread> threads;
    for (unsigned i = 0; i < concurrency; ++i)
        threads.emplace_back([&, i] {
            std::unique_ptr<Client> client;
            try {
                client = contender.client();
            } catch (const std::exception& e) {
                setupErrors[i] = e.what();
            }
            ready.count_down();
            go.wait();
            for (unsigned c = 0; client && c < cycles; ++c)
                samples[i].push_back(cycle(*client, image));
        });
    ready.arrive_and_wait();
    const auto start = Clock::now();
    go.count_down();
    for (auto& t : threads)
        t.join();
    const auto wall = msBetween(start, Clock::now());

    json out{{"contender", name}, {"concurrency", concurrency}, {"wall_ms", wall}, {"samples", json::array()}};
    for (const auto& e : setupErrors)
        if (!e.empty())
            out["setup_error"] = e;
    for (const auto& perClient : samples)
        for (const auto& s : perClient)
            out["samples"].push_back(toJson(s));
    return out;
}

// Devices kept attached through loopd for the RSS and "latency with N attached"
// figures.
class Holder {
public:
    // Attaches count devices, the images in turn (one image: all the same).
    json hold(unsigned count, unsigned concurrency, bool partscan, const std::vector<std::string>& images)
    {
        std::mutex mutex;
        std::vector<double> times;
        std::vector<std::string> errors;
        std::atomic<int> left{static_cast<int>(count)};
        std::atomic<unsigned> next{static_cast<unsigned>(held_.size())};
        const auto wallMs = onClients(concurrency, mutex, errors, [&](Client& client) {
            while (left.fetch_sub(1) > 0) {
                const auto t0 = Clock::now();
                try {
                    const auto i = static_cast<std::size_t>(next.fetch_add(1));
                    auto a = client.attach(images[i % images.size()], AttachOptions{partscan});
                    std::lock_guard lock(mutex);
                    times.push_back(msBetween(t0, Clock::now()));
                    held_.push_back(std::move(a));
                } catch (const std::exception& e) {
                    std::lock_guard lock(mutex);
                    errors.push_back(e.what());
                }
            }
        });
        return withErrors({{"held", held_.size()}, {"wall_ms", wallMs}, {"attach_ms", times}}, errors);
    }

    json release(unsigned concurrency)
    {
        std::mutex mutex;
        std::vector<std::string> errors;
        const auto count = held_.size();
        const auto wallMs = onClients(concurrency, mutex, errors, [&](Client& client) {
            for (;;) {
                Attachment a;
                {
                    std::lock_guard lock(mutex);
                    if (held_.empty())
                        return;
                    a = std::move(held_.back());
                    held_.pop_back();
                }
                try {
                    client.detach(a);
                } catch (const std::exception& e) {
                    std::lock_guard lock(mutex);
                    errors.push_back(a.devnode + ": " + e.what());
                }
            }
        });
        return withErrors({{"released", count}, {"wall_ms", wallMs}}, errors);
    }

private:
    // Runs body on concurrency threads, each with a loopd connection of its own (a
    // thread that cannot connect adds an error and ends). Returns the wall time, ms.
    template <typename Body>
    double onClients(unsigned concurrency, std::mutex& mutex, std::vector<std::string>& errors, Body body)
    {
        std::vector<std::thread> threads;
        const auto start = Clock::now();
        for (unsigned i = 0; i < concurrency; ++i)
            threads.emplace_back([&] {
                std::unique_ptr<Client> client;
                try {
                    client = loopd_->client();
                } catch (const std::exception& e) {
                    std::lock_guard lock(mutex);
                    errors.push_back(std::string("client: ") + e.what());
                    return;
                }
                body(*client);
            });
        for (auto& t : threads)
            t.join();
        return msBetween(start, Clock::now());
    }

    static json withErrors(json out, const std::vector<std::string>& errors)
    {
        if (!errors.empty())
            out["errors"] = errors;
        return out;
    }

    std::unique_ptr<Contender> loopd_ = makeLoopd();
    std::vector<Attachment> held_;
};

int serve(const ImageSpec& image)
{
    Floor floor; // subscribed from the start, like a daemon
    std::map<std::string, std::unique_ptr<Contender>> others;
    others["loopd"] = makeLoopd();
    others["losetup"] = makeLosetup();
    others["udisks2"] = makeUdisks2();
    Holder holder;

    std::string line;
    while (std::getline(std::cin, line)) {
        json reply;
        try {
            const auto command = json::parse(line);
            const auto cmd = command.at("cmd").get<std::string>();
            const auto concurrency = command.value("concurrency", 1u);
            if (cmd == "batch") {
                const auto name = command.at("contender").get<std::string>();
                Contender& contender = name == "floor" ? floor : *others.at(name);
                reply = runBatch(contender, name, concurrency, command.value("cycles", 1u), image);
                reply["floor_overflows"] = floor.overflows();
            } else if (cmd == "hold") {
                auto images = command.value("images", std::vector<std::string>{});
                if (images.empty())
                    images.push_back(image.path);
                reply = holder.hold(command.at("count").get<unsigned>(), concurrency, command.value("partscan", true),
                                    images);
            } else if (cmd == "release") {
                reply = holder.release(concurrency);
            } else if (cmd == "quit") {
                break;
            } else {
                reply = {{"error", "unknown command " + cmd}};
            }
        } catch (const std::exception& e) {
            reply = {{"error", e.what()}};
        }
        std::cout << reply.dump() << std::endl;
    }
    // Whatever is still held goes: the benchmark leaves nothing attached.
    holder.release(8);
    return 0;
}

} // namespace
} // namespace loopd::bench

int main(int argc, char** argv)
{
    CLI::App app{"loopd-bench: attach/detach cycles of one contender at a time (driven by tests/bench/bench.py)"};
    loopd::bench::ImageSpec image;
    app.add_option("--image", image.path, "the backing file every contender attaches")->required();
    app.add_option("--partitions", image.partitions, "partitions its table has")->required();
    app.add_option("--table-uuid", image.tableUuid, "ID_PART_TABLE_UUID as udev spells it");
    CLI11_PARSE(app, argc, argv);
    image.path = std::filesystem::canonical(image.path).string();

    // losetup and partx live in sbin; a caller's PATH may lack it.
    std::string path = std::getenv("PATH") ? std::getenv("PATH") : "/usr/bin:/bin";
    setenv("PATH", (path + ":/usr/sbin:/sbin").c_str(), 1);
    try {
        return loopd::bench::serve(image);
    } catch (const std::exception& e) {
        std::cerr << "loopd-bench: " << e.what() << "\n";
        return 1;
    }
}
