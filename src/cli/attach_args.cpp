#include "attach_args.hpp"

#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>

namespace loopctl {

// ---- /etc/loopd/images/NAME.conf ------------------------------------------
//
// One "key = value" per line, '#' starts a comment line. Keys are attach's long
// options (image, read-only, offset, size-limit, sector-size, direct-io, partscan,
// autoclear, timeout); booleans are yes/no, true/false, on/off or 1/0. What the
// command line gives wins over the file.

namespace {

bool parseBool(const std::string& value, const std::string& where)
{
    if (value == "yes" || value == "true" || value == "on" || value == "1")
        return true;
    if (value == "no" || value == "false" || value == "off" || value == "0")
        return false;
    throw UsageError(where + ": '" + value + "' is not a boolean (yes or no)");
}

template <typename T> T parseNumber(const std::string& value, const std::string& where)
{
    try {
        std::size_t used = 0;
        const auto number = std::stoull(value, &used, 0);
        if (used == value.size() && value.front() != '-' && number <= std::numeric_limits<T>::max())
            return static_cast<T>(number);
    } catch (const std::exception&) {
    }
    throw UsageError(where + ": '" + value + "' is not a number in range");
}

std::string trim(const std::string& text)
{
    const auto first = text.find_first_not_of(" \t");
    if (first == std::string::npos)
        return {};
    return text.substr(first, text.find_last_not_of(" \t") - first + 1);
}

void applyConfigLine(AttachArgs& args, const std::string& key, const std::string& value, const std::string& where)
{
    if (key == "image") {
        if (args.image.empty())
            args.image = value;
    } else if (key == "read-only") {
        args.readOnly = args.readOnly || parseBool(value, where);
    } else if (key == "direct-io") {
        args.directIo = args.directIo || parseBool(value, where);
    } else if (key == "partscan") {
        args.noPartscan = args.noPartscan || !parseBool(value, where);
    } else if (key == "autoclear") {
        args.autoclear = args.autoclear || parseBool(value, where);
    } else if (key == "offset") {
        args.offset = args.offset.value_or(parseNumber<uint64_t>(value, where));
    } else if (key == "size-limit") {
        args.sizeLimit = args.sizeLimit.value_or(parseNumber<uint64_t>(value, where));
    } else if (key == "sector-size") {
        args.sectorSize = args.sectorSize.value_or(parseNumber<uint32_t>(value, where));
    } else if (key == "timeout") {
        args.timeout = args.timeout.value_or(static_cast<double>(parseNumber<uint32_t>(value, where)));
    } else {
        throw UsageError(where + ": unknown key '" + key + "'");
    }
}

} // namespace

void readConfig(AttachArgs& args)
{
    std::ifstream in(*args.config);
    if (!in)
        throw UsageError(*args.config + ": " + std::strerror(errno));
    std::string line;
    for (unsigned number = 1; std::getline(in, line); ++number) {
        const auto where = *args.config + ":" + std::to_string(number);
        line = trim(line);
        if (line.empty() || line.front() == '#')
            continue;
        const auto equals = line.find('=');
        if (equals == std::string::npos)
            throw UsageError(where + ": expected key = value");
        applyConfigLine(args, trim(line.substr(0, equals)), trim(line.substr(equals + 1)), where);
    }
    if (args.image.empty())
        throw UsageError(*args.config + ": no image = PATH");
}

} // namespace loopctl
