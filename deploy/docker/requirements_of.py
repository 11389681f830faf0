"""Print the dependencies of pyproject.toml files, less their sibling packages: the image's deps layer."""

import re
import sys

try:
    import tomllib
except ImportError:  # Python 3.10: our pyproject files are simple enough for a pattern
    tomllib = None


def dependencies(path: str) -> list[str]:
    """[project] dependencies of one pyproject.toml."""
    with open(path, "rb") as f:
        data = f.read()
    if tomllib is not None:
        return tomllib.loads(data.decode())["project"]["dependencies"]
    block = re.search(r"^dependencies\s*=\s*\[(.*?)\]", data.decode(), re.S | re.M).group(1)
    return re.findall(r'"([^"]+)"', block)


if __name__ == "__main__":
    local = {"moe-client", "moe-serve"}  # built from the source in the next stage
    deps = [d for path in sys.argv[1:] for d in dependencies(path) if re.split(r"[<>=!~ \[;]", d)[0] not in local]
    print("\n".join(dict.fromkeys(deps)))
