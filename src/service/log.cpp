#include "log.hpp"

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/sinks/systemd_sink.h>
#include <spdlog/spdlog.h>

#include <cstdlib>

namespace loopd::service {

void setupLogging(const std::string& level)
{
    std::shared_ptr<spdlog::logger> logger;
    if (std::getenv("JOURNAL_STREAM")) {
        logger = std::make_shared<spdlog::logger>("loopd", std::make_shared<spdlog::sinks::systemd_sink_mt>());
        logger->set_pattern("%v");
    } else {
        logger = spdlog::stderr_color_mt("loopd");
        logger->set_pattern("%Y-%m-%d %H:%M:%S.%e %^%l%$ %v");
    }
    logger->set_level(spdlog::level::from_str(level));
    spdlog::set_default_logger(logger);
}

} // namespace loopd::service
