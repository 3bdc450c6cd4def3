#pragma once

#include "core/record.hpp"

#include <string>
#include <vector>

namespace loopd::service {

// The ownership records as files: <dir>/intent-<token>.json until the diskseq is
// known, <dir>/<diskseq>.json after. Each write replaces the file atomically
// (temporary file + rename), so a crash leaves the old or the new record, never
// half of one. Stateless, so workers and the loop thread may use it at once; the
// files live on tmpfs (/run), so writes do not wait for a disk.
class RecordStore {
public:
    explicit RecordStore(std::string dir);

    void write(const core::Record& record) const;
    void remove(const core::Record& record) const;
    // Every readable record; unreadable files are logged and removed.
    [[nodiscard]] std::vector<core::Record> loadAll() const;

private:
    [[nodiscard]] std::string pathOf(const core::Record& record) const;
    std::string dir_;
};

} // namespace loopd::service
