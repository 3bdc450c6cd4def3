#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string_view>

// Shared by the fuzz targets: reading the input front to back (so seeds are easy to
// write, see make_seeds.py), and turning a broken invariant into a crash.
namespace loopd::fuzz {

class Reader {
public:
    Reader(const uint8_t* data, std::size_t size) : data_(data), size_(size) {}
    [[nodiscard]] bool empty() const { return pos_ >= size_; }
    // Past the end every read is 0: a short input is a valid input.
    uint8_t byte() { return pos_ < size_ ? data_[pos_++] : 0; }
    uint64_t bytes(unsigned n)
    {
        uint64_t v = 0;
        for (unsigned i = 0; i < n; ++i)
            v = v << 8 | byte();
        return v;
    }
    // Up to n bytes as they are (embedded NULs included).
    std::string_view take(std::size_t n)
    {
        const auto len = n < size_ - pos_ ? n : (pos_ < size_ ? size_ - pos_ : 0);
        const std::string_view s(reinterpret_cast<const char*>(data_) + pos_, len);
        pos_ += len;
        return s;
    }

private:
    const uint8_t* data_;
    std::size_t size_;
    std::size_t pos_ = 0;
};

// abort() so libFuzzer reports the input as a crash and saves it.
#define FUZZ_CHECK(cond, ...)                                                                                          \
    do {                                                                                                               \
        if (!(cond)) {                                                                                                 \
            std::fprintf(stderr, "invariant violated: %s (%s:%d): ", #cond, __FILE__, __LINE__);                       \
            std::fprintf(stderr, __VA_ARGS__);                                                                         \
            std::fputc('\n', stderr);                                                                                  \
            std::abort();                                                                                              \
        }                                                                                                              \
    } while (0)

// Test of the tests: LOOPD_FUZZ_SABOTAGE=<mode> makes a target misreport on purpose,
// and the suite expects it to crash on its seed corpus (see meson.build).
inline std::string_view sabotage()
{
    static const char* const mode = std::getenv("LOOPD_FUZZ_SABOTAGE");
    return mode ? mode : "";
}

} // namespace loopd::fuzz
