"""The man pages say what the programs do now: every command and option that
`loopd --help`, `loopctl --help` and `loopctl COMMAND --help` list is described
in man/loopd.8.scd.in and man/loopctl.1.scd.in, and the pages describe nothing
the programs lack.

Usage: check_man_pages.py LOOPD LOOPCTL MAN_SOURCE_DIR. No root needed.
"""

import re
import subprocess
import sys

# CLI11's help: "  --name ...", "  -h,--help ..." under Options:, "  name  text"
# under Subcommands:.
HELP_OPTION = re.compile(r"^  (?:-\w,)?(--[a-z][a-z0-9-]*)")
HELP_SUBCOMMAND = re.compile(r"^  ([a-z][a-z0-9-]*)\s")
# The pages: an option entry is a line starting "*--name*" (or "*-h*, *--help*").
PAGE_OPTION = re.compile(r"^\*(?:-\w\*, \*)?(--[a-z][a-z0-9-]*)\*")


def help_text(*argv):
    p = subprocess.run(argv + ("--help",), capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, f"{' '.join(argv)} --help exited {p.returncode}: {p.stderr}"
    return p.stdout


def help_section(text, title):
    """Lines of the help's section `title` ("Options:", "Subcommands:")."""
    lines, inside = [], False
    for line in text.splitlines():
        if not line.startswith(" "):
            inside = line.strip() == title
        elif inside:
            lines.append(line)
    return lines


def help_options(text, ignore=()):
    found = {m.group(1) for m in map(HELP_OPTION.match, help_section(text, "Options:")) if m}
    return found - set(ignore)


def help_subcommands(text):
    return [m.group(1) for m in map(HELP_SUBCOMMAND.match, help_section(text, "Subcommands:")) if m]


def page_sections(path, level):
    """{heading: lines} for the page's headings of `level` ('#' or '##')."""
    sections, current = {}, None
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith(level + " "):
                current = line[len(level) + 1:].strip()
                sections[current] = []
            elif line.startswith("# "):
                current = None  # a higher-level heading ends a subsection
            elif current is not None:
                sections[current].append(line)
    return sections


def page_options(lines):
    return {m.group(1) for m in map(PAGE_OPTION.match, lines) if m}


def compare(what, in_help, in_page):
    problems = []
    if in_help - in_page:
        problems.append(f"{what}: not in the man page: {sorted(in_help - in_page)}")
    if in_page - in_help:
        problems.append(f"{what}: in the man page but not in --help: {sorted(in_page - in_help)}")
    return problems


def check_loopd(loopd, mandir):
    sections = page_sections(f"{mandir}/loopd.8.scd.in", "#")
    assert "OPTIONS" in sections, "loopd.8: no OPTIONS section"
    return compare("loopd", help_options(help_text(loopd)), page_options(sections["OPTIONS"]))


def check_loopctl(loopctl, mandir):
    problems = []
    page = f"{mandir}/loopctl.1.scd.in"
    top = help_text(loopctl)
    commands = help_subcommands(top)
    assert commands, f"no subcommands found in loopctl --help:\n{top}"
    # "## attach [OPTIONS] IMAGE": the command is the heading's first word.
    blocks = {heading.split()[0]: lines for heading, lines in page_sections(page, "##").items()}
    problems += compare("loopctl commands", set(commands), set(blocks))
    for command in commands:
        if command in blocks:
            problems += compare(f"loopctl {command}",
                                help_options(help_text(loopctl, command), ignore=("--help",)),
                                page_options(blocks[command]))
    return problems


def main():
    if len(sys.argv) != 4:
        print(__doc__)
        sys.exit(2)
    loopd, loopctl, mandir = sys.argv[1:]
    problems = check_loopd(loopd, mandir) + check_loopctl(loopctl, mandir)
    for p in problems:
        print(f"FAIL {p}")
    if problems:
        print("The man pages (man/*.scd.in) and --help disagree: describe what the programs do.")
        sys.exit(1)
    print("PASS man pages match loopd --help and loopctl --help")


if __name__ == "__main__":
    main()
