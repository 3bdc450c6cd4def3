#pragma once

#include "core/record.hpp"

#include <string>
#include <vector>

namespace loopd::service {

// The ownership records as files, one per attachment for its whole life:
// <dir>/<token>.json, created for the intent and rewritten in place as the
// attachment moves on (configured, owned, detaching), removed at the end.
//
// Why in place: a new file per update (temporary + rename) costs an inode each
// time, and on ext4 inode allocation scans past recently deleted inodes; that was
// loopd's largest CPU cost (tests/bench/RESULTS.md). A record padded to one page
// and written with one pwrite at offset 0 is all or nothing when loopd dies: the
// kernel copies a write into the page cache page by page and checks for a fatal
// signal only between pages. A power loss takes the loop devices with it, so
// only loopd's own death matters. Records longer than a page (very long backing
// file paths) fall back to temporary file + rename.
//
// Stateless, so workers and the loop thread may use it at once (each record has
// one writer at a time: the step of the attachment that owns it).
class RecordStore {
public:
    explicit RecordStore(std::string dir);

    void write(const core::Record& record) const;
    void remove(const core::Record& record) const;
    // Every readable record; unreadable files are logged and removed.
    [[nodiscard]] std::vector<core::Record> loadAll() const;

private:
    [[nodiscard]] std::string pathOf(const core::Record& record) const;
    void replace(const std::string& path, const std::string& text) const;
    std::string dir_;
};

} // namespace loopd::service
