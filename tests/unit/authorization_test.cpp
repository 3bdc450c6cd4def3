// Who may do what without asking polkit, and which action polkit is asked.
#include "core/authorization.hpp"

#include <catch2/catch.hpp>

using namespace loopd::core;

TEST_CASE("root needs no polkit; uid 0 without root's powers gets nothing polkit would decide")
{
    CHECK(decide(Action::Attach, Caller{0, true}).allowed);
    CHECK(decide(Action::Detach, Caller{0, true}, 1000).allowed);
    // polkitd says yes to any uid-0 subject: asking it would make capless uid 0 root.
    for (const auto action : {Action::Attach, Action::Detach, Action::Resize, Action::Open}) {
        for (const std::optional<uint32_t> owner :
             {std::optional<uint32_t>{}, std::optional<uint32_t>{0}, std::optional<uint32_t>{1000}}) {
            const auto verdict = decide(action, Caller{0, false}, owner);
            CHECK_FALSE(verdict.allowed);
            CHECK(verdict.polkitAction.empty());
            CHECK(verdict.refusal.find("CAP_SYS_ADMIN") != std::string::npos);
        }
    }
    CHECK(decide(Action::Find, Caller{0, false}).allowed);
    CHECK_FALSE(decide(Action::Attach, Caller{1000, true}).allowed); // caps without uid 0: not root
}

TEST_CASE("others attach only with polkit's org.loopd1.attach")
{
    const auto verdict = decide(Action::Attach, Caller{1000});
    CHECK_FALSE(verdict.allowed);
    CHECK(verdict.polkitAction == "org.loopd1.attach");
}

TEST_CASE("a caller detaches its own device; others' only with detach-others")
{
    CHECK(decide(Action::Detach, Caller{1000}, 1000).allowed);
    const auto others = decide(Action::Detach, Caller{1000}, 1001);
    CHECK_FALSE(others.allowed);
    CHECK(others.polkitAction == "org.loopd1.detach-others");
    // An unknown caller (no credentials) owns nothing, not even a device of uid -1.
    CHECK_FALSE(decide(Action::Detach, Caller{}, std::nullopt).allowed);
}

TEST_CASE("anyone may find; resize is as detach; open is for the owner or root only")
{
    CHECK(decide(Action::Find, Caller{1000}).allowed);
    CHECK(decide(Action::Resize, Caller{1000}, 1000).allowed);
    CHECK(decide(Action::Resize, Caller{1000}, 1001).polkitAction == "org.loopd1.detach-others");
    CHECK(decide(Action::Open, Caller{1000}, 1000).allowed);
    CHECK(decide(Action::Open, Caller{0, true}, 1000).allowed);
    const auto stranger = decide(Action::Open, Caller{1001}, 1000);
    CHECK_FALSE(stranger.allowed);
    CHECK(stranger.polkitAction.empty());
    CHECK(stranger.refusal == "is for the device's owner or root only");
    CHECK_FALSE(decide(Action::Open, Caller{0, false}, 0).allowed);
}
