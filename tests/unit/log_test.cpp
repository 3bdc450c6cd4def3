// Caller strings never become log lines of their own.
#include <loopd/log.hpp>

#include <catch2/catch.hpp>

using loopd::log::escaped;

TEST_CASE("control characters are escaped, the rest is left as it is")
{
    CHECK(escaped("x\n<0>FORGED") == "x\\n<0>FORGED");
    CHECK(escaped("a\tb\rc") == "a\\tb\\x0dc");
    CHECK(escaped(std::string("nul\0end", 7)) == "nul\\x00end");
    CHECK(escaped("back\\slash") == "back\\\\slash");
    CHECK(escaped("\x7f") == "\\x7f");
    CHECK(escaped("/var/lib/images/caf\xc3\xa9.img") == "/var/lib/images/caf\xc3\xa9.img");
    CHECK(escaped("plain ref=web-1 diskseq=12") == "plain ref=web-1 diskseq=12");
}

TEST_CASE("bytes that are not UTF-8 are escaped, so journalctl shows the line and not a blob")
{
    CHECK(escaped("/srv/bad-\xff.img") == "/srv/bad-\\xff.img");
    CHECK(escaped("a\xe2\x82") == "a\\xe2\\x82");                // cut short
    CHECK(escaped("a\xe2\x82\xac\x80") == "a\xe2\x82\xac\\x80"); // €, then a stray byte
    CHECK(escaped("\xed\xa0\x80") == "\\xed\\xa0\\x80");         // a UTF-16 surrogate
    CHECK(escaped("a\xc2\x85-b") == "a\\xc2\\x85-b");            // U+0085, a C1 control
    CHECK(escaped("a\xc2\xa0-b") == "a\xc2\xa0-b");              // U+00A0, printable
}
