#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <endian.h>
#include <string>
#include <string_view>
#include <vector>

// D-Bus's wire format, little-endian, for the one message loopd marshals itself:
// the GetManagedObjects reply (device_objects.cpp says why). Only what that reply
// holds: bytes, u32, u64, booleans, strings, object paths, signatures, arrays,
// dict entries and variants. Offsets are counted from the writer's start, which
// must sit on an 8-byte boundary of the message (the body does; a header written
// by methodReturnHeader ends on one).
namespace loopd::service::wire {

// What sd-bus accepts as a D-Bus string (and so do dbus-daemon, libdbus and GLib):
// UTF-8 as loopd::validUtf8Character takes it, no NUL.
bool isValidString(std::string_view bytes);

// `bytes` as a valid D-Bus string: unchanged if it is one, else each byte of an
// invalid sequence written as \xNN. A file name is any bytes but NUL and '/' has no
// encoding; a property naming one must still reach every client.
std::string validString(std::string_view bytes);

class Writer {
public:
    Writer() = default;
    // Writes into `buffer`: one kept from the last message has its capacity,
    // and its pages, already.
    explicit Writer(std::string&& buffer) : out_(std::move(buffer)) {}

    void byte(uint8_t value) { *room(1) = static_cast<char>(value); }
    void u32(uint32_t value) { put(htole32(value)); }
    void u64(uint64_t value) { put(htole64(value)); }
    void boolean(bool value) { u32(value ? 1 : 0); }
    // 's' and 'o'; throws std::invalid_argument for what isValidString refuses, so
    // that nothing dbus-daemon would cut loopd off for is ever written.
    void string(std::string_view value);
    void signature(std::string_view value)
    {
        char* at = room(value.size() + 2);
        at[0] = static_cast<char>(value.size());
        std::memcpy(at + 1, value.data(), value.size());
        at[value.size() + 1] = '\0';
    }
    // A struct or dict entry begins on 8 bytes.
    void entry() { align(8); }

    struct Array {
        std::size_t lengthAt;
        std::size_t start;
    };
    // An array whose elements align to `elementAlignment`; close() writes its length.
    Array openArray(std::size_t elementAlignment);
    void close(const Array& array);

    void align(std::size_t to)
    {
        const std::size_t padding = ((size_ + to - 1) & ~(to - 1)) - size_;
        if (padding)
            std::memset(room(padding), 0, padding);
    }
    [[nodiscard]] std::size_t size() const { return size_; }
    // The bytes written; the writer is empty afterwards.
    [[nodiscard]] std::string take();

private:
    // `n` more bytes at the end, to be written: the buffer grows by doubling, and
    // its unused tail is never cleared (every byte is written before take()).
    // The hot path of every item, so inline.
    char* room(std::size_t n)
    {
        if (size_ + n > out_.size())
            grow(n);
        char* at = out_.data() + size_;
        size_ += n;
        return at;
    }
    void grow(std::size_t n);
    // Aligned to its own size, as D-Bus aligns every basic type.
    template <typename T> void put(T value)
    {
        align(sizeof value);
        std::memcpy(room(sizeof value), &value, sizeof value);
    }

    std::string out_; // out_.size() is the capacity in use, size_ the bytes written
    std::size_t size_ = 0;
};

// The header of a method return of `bodySize` bytes of `signature`: serial,
// REPLY_SERIAL, DESTINATION (none on a peer-to-peer connection) and SIGNATURE,
// padded to where the body begins. NO_REPLY_EXPECTED, as sd-bus sends replies.
std::string methodReturnHeader(uint32_t serial, uint32_t replySerial, const char* destination,
                               std::string_view signature, std::size_t bodySize);

// The largest message dbus-daemon takes on the system bus by default
// (max_message_size, 32 MiB; the protocol allows 128). It does not refuse a
// larger one: it drops the sender's connection, which for loopd is its name.
constexpr std::size_t maxBusMessageBytes = std::size_t{32} << 20;

} // namespace loopd::service::wire
