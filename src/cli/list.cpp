#include "list.hpp"

#include "format.hpp"

#include <algorithm>
#include <cctype>
#include <functional>
#include <sstream>

namespace loopctl {

namespace {

struct Column {
    const char* name;
    bool right;           // numbers people compare by size read better right-aligned
    const char* property; // the one property it shows
    std::function<std::string(const Device&, const ListOptions&)> value;
};

std::string flag(bool value)
{
    return value ? "1" : "0";
}

// Characters a terminal shows, not bytes: UTF-8 continuation bytes take no column.
size_t displayWidth(const std::string& text)
{
    return static_cast<size_t>(
        std::count_if(text.begin(), text.end(), [](char c) { return (static_cast<unsigned char>(c) & 0xc0) != 0x80; }));
}

const std::vector<Column>& columns()
{
    using D = const Device&;
    using O = const ListOptions&;
    static const std::vector<Column> all{
        {"DEVICE", false, "DevNode", [](D d, O) { return d.text("DevNode"); }},
        {"DISKSEQ", false, "DiskSeq", [](D d, O) { return std::to_string(d.u64("DiskSeq")); }},
        {"REF", false, "Ref", [](D d, O) { return d.text("Ref"); }},
        {"PARTS", false, "Partitions", [](D d, O) { return std::to_string(d.strings("Partitions").size()); }},
        {"SIZE", true, "Size",
         [](D d, O o) { return o.bytes ? std::to_string(d.u64("Size")) : iecSize(d.u64("Size")); }},
        {"RO", false, "ReadOnly", [](D d, O) { return flag(d.flag("ReadOnly")); }},
        {"DIO", false, "DirectIO", [](D d, O) { return flag(d.flag("DirectIO")); }},
        {"AUTOCLEAR", false, "Autoclear", [](D d, O) { return flag(d.flag("Autoclear")); }},
        {"LIFETIME", false, "Lifetime", [](D d, O) { return d.text("Lifetime"); }},
        {"OWNER", false, "OwnerUid", [](D d, O) { return userName(d.u32("OwnerUid")); }},
        {"READY-SINCE", false, "ReadyTimestamp",
         [](D d, O) { return localTime(d.u64("ReadyTimestamp"), "%Y-%m-%d %H:%M:%S"); }},
        {"BACKING-FILE", false, "BackingFile", [](D d, O) { return d.text("BackingFile"); }},
        {"BACKING-INODE", false, "BackingInode", [](D d, O) { return std::to_string(d.u64("BackingInode")); }},
    };
    return all;
}

std::vector<const Column*> select(const std::string& spec)
{
    std::string names = spec.empty() ? defaultListColumns : spec;
    if (names.front() == '+') // lsblk's "-o +COL": the defaults and more
        names = std::string(defaultListColumns) + "," + names.substr(1);
    std::vector<const Column*> chosen;
    std::stringstream stream(names);
    for (std::string name; std::getline(stream, name, ',');) {
        std::transform(name.begin(), name.end(), name.begin(), [](unsigned char c) { return std::toupper(c); });
        const auto& all = columns();
        const auto it = std::find_if(all.begin(), all.end(), [&](const Column& c) { return name == c.name; });
        if (it == all.end())
            throw UsageError("list: unknown column '" + name + "' (see loopctl list --help)");
        chosen.push_back(&*it);
    }
    return chosen;
}

// Each column as wide as its widest cell, one space between; the last column
// is not padded, so lines carry no trailing blanks.
void printTable(std::ostream& out, const std::vector<const Column*>& chosen,
                const std::vector<std::vector<std::string>>& rows)
{
    std::vector<size_t> widths(chosen.size(), 0);
    for (const auto& row : rows)
        for (size_t i = 0; i < row.size(); ++i)
            widths[i] = std::max(widths[i], displayWidth(row[i]));
    for (const auto& row : rows) {
        std::string line;
        for (size_t i = 0; i < row.size(); ++i) {
            const bool last = i + 1 == row.size();
            const std::string pad(widths[i] - displayWidth(row[i]), ' ');
            line += chosen[i]->right ? pad + row[i] : last ? row[i] : row[i] + pad;
            line += last ? "" : " ";
        }
        out << line << '\n';
    }
}

} // namespace

std::vector<std::string> listColumns()
{
    std::vector<std::string> names;
    for (const auto& column : columns())
        names.push_back(column.name);
    return names;
}

void checkColumns(const std::string& spec)
{
    select(spec);
}

std::vector<std::string> listedProperties(const ListOptions& options)
{
    if (options.json)
        return {};
    std::vector<std::string> names{"Number", "DiskSeq"}; // the order of the rows
    for (const auto* column : select(options.columns))
        names.emplace_back(column->property);
    return names;
}

void printList(std::ostream& out, const std::vector<Device>& devices, const ListOptions& options)
{
    if (options.json) {
        Json array = Json::array();
        for (const auto& device : devices)
            array.push_back(deviceJson(device));
        out << array.dump(2, ' ', false, Json::error_handler_t::replace) << '\n';
        return;
    }
    const auto chosen = select(options.columns);
    std::vector<std::vector<std::string>> rows;
    if (!options.noHeadings) {
        rows.emplace_back();
        for (const auto* column : chosen)
            rows.back().push_back(column->name);
    }
    for (const auto& device : devices) {
        rows.emplace_back();
        for (const auto* column : chosen) {
            const auto value = column->value(device, options);
            rows.back().push_back(options.raw ? escapeRaw(value) : escapeControl(value));
        }
    }
    if (!options.raw) {
        printTable(out, chosen, rows);
        return;
    }
    for (const auto& row : rows) {
        for (size_t i = 0; i < row.size(); ++i)
            out << (i ? " " : "") << row[i];
        out << '\n';
    }
}

} // namespace loopctl
