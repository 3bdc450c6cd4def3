#include "record.hpp"

#include <nlohmann/json.hpp>

namespace loopd::core {
namespace {

using Json = nlohmann::json;

const char* stateName(Record::State state)
{
    switch (state) {
    case Record::State::Intent:
        return "intent";
    case Record::State::Configured:
        return "configured";
    case Record::State::Owned:
        return "owned";
    case Record::State::Detaching:
        break;
    }
    return "detaching";
}

std::optional<Record::State> parseState(const std::string& name)
{
    for (const auto state :
         {Record::State::Intent, Record::State::Configured, Record::State::Owned, Record::State::Detaching})
        if (name == stateName(state))
            return state;
    return std::nullopt;
}

} // namespace

std::string loFileName(const std::string& token)
{
    return "loopd:" + token;
}

std::string serialize(const Record& r)
{
    const auto& i = r.info;
    Json json{
        {"state", stateName(r.state)},
        {"token", r.token},
        {"fileName", r.fileName},
        {"number", i.number},
        {"diskseq", i.diskseq},
        {"backingFile", i.backingFile},
        {"backingDevice", i.backingDevice},
        {"backingInode", i.backingInode},
        {"offset", i.offset},
        {"sizeLimit", i.sizeLimit},
        {"size", i.size},
        {"sectorSize", i.sectorSize},
        {"readOnly", i.readOnly},
        {"directIo", i.directIo},
        {"autoclear", i.autoclear},
        {"partscan", i.partscan},
        {"partitions", i.partitions},
        {"ref", r.ref},
        {"lifetime", lifetimeName(r.lifetime)},
        {"owner", r.owner},
        {"ownerUid", r.ownerUid},
        {"readyTimestamp", r.readyTimestamp},
        {"letGo", r.letGo},
        {"hidden", r.hidden},
    };
    return json.dump() + "\n";
}

std::optional<Record> parseRecord(const std::string& text)
{
    try {
        const auto json = Json::parse(text);
        const auto state = parseState(json.at("state").get<std::string>());
        if (!state)
            return std::nullopt;
        Record r;
        r.state = *state;
        json.at("token").get_to(r.token);
        json.at("fileName").get_to(r.fileName);
        auto& i = r.info;
        json.at("number").get_to(i.number);
        json.at("diskseq").get_to(i.diskseq);
        json.at("backingFile").get_to(i.backingFile);
        json.at("backingDevice").get_to(i.backingDevice);
        json.at("backingInode").get_to(i.backingInode);
        json.at("offset").get_to(i.offset);
        json.at("sizeLimit").get_to(i.sizeLimit);
        json.at("size").get_to(i.size);
        json.at("sectorSize").get_to(i.sectorSize);
        json.at("readOnly").get_to(i.readOnly);
        json.at("directIo").get_to(i.directIo);
        json.at("autoclear").get_to(i.autoclear);
        json.at("partscan").get_to(i.partscan);
        json.at("partitions").get_to(i.partitions);
        json.at("ref").get_to(r.ref);
        const auto lifetime = json.at("lifetime").get<std::string>();
        r.lifetime = lifetime == "client" ? Lifetime::Client : lifetime == "fd" ? Lifetime::Fd : Lifetime::Persistent;
        json.at("owner").get_to(r.owner);
        json.at("ownerUid").get_to(r.ownerUid);
        json.at("readyTimestamp").get_to(r.readyTimestamp);
        r.letGo = json.value("letGo", false); // records of loopd 0.1 have neither
        r.hidden = json.value("hidden", false);
        return r;
    } catch (const Json::exception&) {
        return std::nullopt;
    }
}

} // namespace loopd::core
