#include "wire.hpp"

#include <loopd/utf8.hpp>

#include <algorithm>
#include <cstring>
#include <stdexcept>

namespace loopd::service::wire {

bool isValidString(std::string_view bytes)
{
    for (std::size_t i = 0; i < bytes.size();) {
        // ASCII without NUL, nearly all of what loopd sends, eight bytes at a time.
        constexpr uint64_t ones = 0x0101010101010101, highs = 0x8080808080808080;
        uint64_t word;
        if (bytes.size() - i >= sizeof word) {
            std::memcpy(&word, bytes.data() + i, sizeof word);
            if (((word - ones) & ~word & highs) == 0 && (word & highs) == 0) {
                i += sizeof word;
                continue;
            }
        }
        if (const auto c = static_cast<unsigned char>(bytes[i]); c != 0 && c < 0x80) {
            ++i;
            continue;
        }
        const auto n = validUtf8Character(bytes.substr(i));
        if (n == 0)
            return false;
        i += n;
    }
    return true;
}

std::string validString(std::string_view bytes)
{
    if (isValidString(bytes))
        return std::string(bytes);
    static const char hex[] = "0123456789abcdef";
    std::string out;
    for (std::size_t i = 0; i < bytes.size();) {
        if (const auto n = validUtf8Character(bytes.substr(i)); n > 0) {
            out.append(bytes.substr(i, n));
            i += n;
        } else {
            const auto c = static_cast<unsigned char>(bytes[i++]);
            out += {'\\', 'x', hex[c >> 4], hex[c & 15]};
        }
    }
    return out;
}

void Writer::grow(std::size_t n)
{
    out_.resize(std::max(2 * out_.size(), size_ + n + 4096));
}

std::string Writer::take()
{
    out_.resize(size_);
    size_ = 0;
    return std::move(out_);
}

void Writer::string(std::string_view value)
{
    if (!isValidString(value))
        throw std::invalid_argument("not a valid D-Bus string");
    u32(static_cast<uint32_t>(value.size()));
    char* at = room(value.size() + 1);
    std::memcpy(at, value.data(), value.size());
    at[value.size()] = '\0';
}

Writer::Array Writer::openArray(std::size_t elementAlignment)
{
    u32(0);
    const auto lengthAt = size_ - 4;
    // The padding to the first element is there even when the array is empty,
    // and is not counted in its length.
    align(elementAlignment);
    return {lengthAt, size_};
}

void Writer::close(const Array& array)
{
    const auto length = htole32(static_cast<uint32_t>(size_ - array.start));
    std::memcpy(out_.data() + array.lengthAt, &length, sizeof length);
}

std::string methodReturnHeader(uint32_t serial, uint32_t replySerial, const char* destination,
                               std::string_view signature, std::size_t bodySize)
{
    enum Field : uint8_t { ReplySerial = 5, Destination = 6, Signature = 8 };
    constexpr uint8_t methodReturn = 2, noReplyExpected = 0x1, protocolVersion = 1;
    Writer w;
    w.byte('l'); // little-endian
    w.byte(methodReturn);
    w.byte(noReplyExpected);
    w.byte(protocolVersion);
    w.u32(static_cast<uint32_t>(bodySize));
    w.u32(serial);
    const auto fields = w.openArray(8); // a(yv)
    w.entry();
    w.byte(ReplySerial);
    w.signature("u");
    w.u32(replySerial);
    if (destination) {
        w.entry();
        w.byte(Destination);
        w.signature("s");
        w.string(destination);
    }
    w.entry();
    w.byte(Signature);
    w.signature("g");
    w.signature(signature);
    w.close(fields);
    w.align(8); // the body begins on 8 bytes, after the unpadded array
    return w.take();
}

} // namespace loopd::service::wire
