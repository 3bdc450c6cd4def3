#pragma once

#include <CLI/CLI.hpp>
#include <sdbus-c++/sdbus-c++.h>

#include <optional>
#include <string>

// loopctl find and loopctl resize: subcommands of their own, apart from the
// listing commands in loopctl.cpp.
namespace loopctl {

struct FindResizeArgs {
    CLI::App* find = nullptr;
    CLI::App* resize = nullptr;
    std::string image; // find
    std::string name;  // resize: device node, diskseq or ref
    bool json = false;
};

// Registers both subcommands on app; args must outlive the parse.
void addFindResize(CLI::App& app, FindResizeArgs& args);
// Runs whichever of them was given: its exit status; nullopt if neither was.
std::optional<int> runFindResize(sdbus::IConnection& connection, const FindResizeArgs& args);

} // namespace loopctl
