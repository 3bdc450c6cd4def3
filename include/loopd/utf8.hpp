#pragma once

#include <cstddef>
#include <string_view>

namespace loopd {

// The length of the valid UTF-8 character at the start of `s`, or 0 if there is
// none there (NUL counts as none). sd-bus's rules (systemd's utf8.c), the
// strictest of the D-Bus libraries: shortest form only, below U+110000, no
// surrogates, and not the noncharacters U+FDD0..U+FDEF and U+xFFFE/U+xFFFF,
// which libdbus and GLib let by. Log lines and D-Bus strings both use it: a file
// name is any bytes, and neither may carry one that is not UTF-8 as it is.
inline std::size_t validUtf8Character(std::string_view s)
{
    if (s.empty())
        return 0;
    const auto byte = [&](std::size_t i) { return static_cast<unsigned char>(s[i]); };
    const unsigned char lead = byte(0);
    if (lead != 0 && lead < 0x80)
        return 1;
    std::size_t length = 0;
    char32_t c = 0;
    if (lead >= 0xc2 && lead <= 0xdf)
        length = 2, c = lead & 0x1f;
    else if (lead >= 0xe0 && lead <= 0xef)
        length = 3, c = lead & 0x0f;
    else if (lead >= 0xf0 && lead <= 0xf4)
        length = 4, c = lead & 0x07;
    else
        return 0; // NUL, a continuation byte, or a lead byte of no valid character
    if (s.size() < length)
        return 0;
    for (std::size_t i = 1; i < length; ++i) {
        if ((byte(i) & 0xc0) != 0x80)
            return 0;
        c = (c << 6) | (byte(i) & 0x3f);
    }
    const char32_t shortest = length == 2 ? 0x80 : length == 3 ? 0x800 : 0x10000;
    const bool valid = c >= shortest && c < 0x110000 && (c & 0xfffff800) != 0xd800 && !(c >= 0xfdd0 && c <= 0xfdef) &&
                       (c & 0xfffe) != 0xfffe;
    return valid ? length : 0;
}

} // namespace loopd
