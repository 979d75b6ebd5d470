"""Print the Debian packages a GOPATH build of ROOT needs: ``name version deb-file`` per line.

usage: closure.py PACKAGES_FILE ROOT [EXTRA...]

ROOT and every EXTRA (the Go toolchain packages) are printed, plus the closure of ROOT.

Follows Depends (the first alternative that exists, through Provides) but only into Go source
packages (``golang-*-dev``, ``Architecture: all``): those are what GOPATH mode compiles. Tools and
libraries of other kinds are never needed by ``go build`` and are left out, which keeps the
download to the ~300 packages the apiextensions-apiserver source tree imports.
"""

import sys


def parse(text: str) -> dict[str, dict[str, str]]:
    packages: dict[str, dict[str, str]] = {}
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for line in stanza.split("\n"):
            if line and not line[0].isspace() and ":" in line:
                key, value = line.split(":", 1)
                fields[key] = value.strip()
            elif key and line.startswith(" "):
                fields[key] += " " + line.strip()
        if "Package" in fields:
            packages[fields["Package"]] = fields
    return packages


def closure(packages: dict[str, dict[str, str]], root: str) -> list[str]:
    provided: dict[str, str] = {}
    for name, fields in packages.items():
        for item in fields.get("Provides", "").split(","):
            virtual = item.strip().split(" ")[0]
            if virtual:
                provided.setdefault(virtual, name)

    def go_source(name: str) -> bool:
        fields = packages[name]
        return name.startswith("golang-") and name.endswith("-dev") and fields.get("Architecture") == "all"

    if root not in packages:
        sys.exit(f"closure.py: {root} is not in the package index")
    seen: set[str] = set()
    stack = [root]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        for dependency in packages[name].get("Depends", "").split(","):
            for alternative in dependency.split("|"):
                wanted = alternative.strip().split(" ")[0].split(":")[0]
                found = wanted if wanted in packages else provided.get(wanted)
                if found:
                    if go_source(found):
                        stack.append(found)
                    break
    return sorted(seen)


if __name__ == "__main__":
    index, root, *extra = sys.argv[1:]
    with open(index, encoding="utf-8") as f:
        packages = parse(f.read())
    for name in closure(packages, root) + extra:
        if name not in packages:
            sys.exit(f"closure.py: {name} is not in the package index")
        version = packages[name]["Version"]
        # The file name apt-get download gives it (an epoch's colon is escaped).
        deb = f"{name}_{version.replace(':', '%3a')}_{packages[name]['Architecture']}.deb"
        print(name, version, deb)
