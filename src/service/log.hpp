#pragma once

#include <loopd/log.hpp>

#include <optional>
#include <string_view>

namespace loopd::service {

enum class LogTarget { Automatic, Journal, Console };

std::optional<LogTarget> parseLogTarget(std::string_view name);

// Automatic: the journal when stderr is systemd's journal stream (the device and
// inode in JOURNAL_STREAM are stderr's own, not inherited from a parent), plain
// lines on stderr otherwise. Called once, before any thread starts.
void setupLogging(log::Level threshold, LogTarget target = LogTarget::Automatic);

} // namespace loopd::service
