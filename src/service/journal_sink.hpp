#pragma once

#include <spdlog/details/null_mutex.h>
#include <spdlog/sinks/base_sink.h>

namespace loopd::service {

// Messages to the journal through its native protocol (sd_journal_sendv), each
// with the structured fields of log::current(): DISKSEQ=, LOOPD_DEVICE=, ...
//
// Not spdlog's systemd_sink: in spdlog 1.10 (Debian 12) it sends a fixed set of
// fields (MESSAGE, PRIORITY, SYSLOG_IDENTIFIER, CODE_*) and has no way to add
// others per message, and those fields are what an admin filters by.
class JournalSink final : public spdlog::sinks::base_sink<spdlog::details::null_mutex> {
protected:
    // sd_journal_sendv is one sendmsg() per entry: thread-safe without a mutex.
    void sink_it_(const spdlog::details::log_msg& message) override;
    void flush_() override {}
};

} // namespace loopd::service
