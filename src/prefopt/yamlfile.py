"""Reading a config's text: a YAML file (UTF-8, PyYAML's safe loader with three refusals of its
own) and `--key value` overrides.

    raw = read_yaml("configs/simpo-llama3-8b-instruct.yaml")              # a mapping, or a PrefoptError naming the line
    overrides = parse_overrides(["--beta", "2.5"])     # {"beta": 2.5}

The loader refuses a key given twice (YAML would keep the last), aliases expanding past
`MAX_YAML_VALUES` and nesting past `MAX_YAML_DEPTH`; another encoding is named, with the fix.
"""

import codecs
from pathlib import Path

import yaml

from .errors import PrefoptError


def _fail(where: str, message: str):
    raise PrefoptError(f"{where}: {message}")


# How far a config's YAML may reach. A real config has a few hundred values and nests a few
# levels; aliases may repeat a block (`dataset_splits: *splits`), but nine nested lists of nine
# aliases each (a "billion laughs" in 300 bytes) would expand to 9⁹ values in whatever walks it.
MAX_YAML_VALUES = 100_000  # counting every alias as the values it stands for
MAX_YAML_DEPTH = 64  # PyYAML's composer recurses per level: this stops well before Python's limit

# Encodings recognised by their byte-order mark (UTF-32 first: its LE mark begins with UTF-16's):
# the name, and iconv's name for it
BYTE_ORDER_MARKS = (
    (codecs.BOM_UTF32_LE, "UTF-32 (little-endian)", "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32 (big-endian)", "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16 (little-endian)", "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16 (big-endian)", "UTF-16"),
)


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing at compose time what it would accept silently: a key given
    twice in one mapping (YAML keeps the last), aliases expanding past MAX_YAML_VALUES, and
    nesting past MAX_YAML_DEPTH. Merge keys (`<<: *defaults`) still work: the keys written next
    to a merge override the merged ones, by YAML's rule, and are not duplicates."""

    def __init__(self, text: str, where: str):
        super().__init__(text)
        self.where = where
        self.path: list[str] = []  # where the node being composed sits: dataset_mixer, 'a.jsonl'
        self.sizes: dict[int, int] = {}  # id(node) -> values it expands to, aliases counted in full

    def compose_node(self, parent, index):
        event = self.peek_event()
        if parent is not None:  # index: the key node of a mapping value, the position in a list
            self.path.append(f"[{index}]" if isinstance(index, int) else f".{getattr(index, 'value', '?')}")
        if len(self.path) > MAX_YAML_DEPTH:
            _fail(self.where, f"line {event.start_mark.line + 1}: the YAML nests more than {MAX_YAML_DEPTH} levels "
                              "deep; a config is a mapping of keys to values.")
        node = super().compose_node(parent, index)
        if isinstance(event, yaml.AliasEvent):
            if id(node) not in self.sizes:  # the alias sits inside the value it names
                _fail(self.where, f"line {event.start_mark.line + 1}: the alias *{event.anchor} refers to a value "
                                  "that contains it; a config cannot hold a recursive value.")
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
            if isinstance(node, yaml.MappingNode):
                children = [part for pair in node.value for part in pair]
                self._refuse_duplicate_keys(node)
            self.sizes[id(node)] = 1 + sum(self.sizes[id(child)] for child in children)
            if self.sizes[id(node)] > MAX_YAML_VALUES:
                _fail(self.where, f"line {event.start_mark.line + 1}: this value expands to more than "
                                  f"{MAX_YAML_VALUES:,} values through YAML aliases (*name); write the values out "
                                  "instead.")
        if parent is not None:
            self.path.pop()
        return node

    def _refuse_duplicate_keys(self, node: yaml.MappingNode):
        first: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self.construct_object(key_node)  # `1` and `1.0`, `on` and `true`: one key to Python
            if key in first:
                under = f" under {''.join(self.path).removeprefix('.')}" if self.path else ""
                lines = first[key].start_mark.line + 1, key_node.start_mark.line + 1
                at = f"on line {lines[0]}" if lines[0] == lines[1] else f"(line {lines[0]} and line {lines[1]})"
                _fail(self.where, f"{key_node.value!r}{under} is given twice {at}; YAML would silently keep the "
                                  "second. Keep one.")
            first[key] = key_node


def parse_yaml(text: str, where: str):
    """One YAML document through `_ConfigLoader` (PyYAML errors propagate as yaml.YAMLError)."""
    loader = _ConfigLoader(text, where)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _decode(where: str, data: bytes) -> str:
    """UTF-8 text (a UTF-8 byte-order mark is dropped); any other encoding is named, with the fix."""
    fix = "save it as UTF-8 (your editor's \"save with encoding\")"
    for mark, name, codec in BYTE_ORDER_MARKS:
        if data.startswith(mark):
            _fail(where, f"the file is {name} text; configs are read as UTF-8: {fix}, or convert it with "
                         f"`iconv -f {codec} -t UTF-8 {where} > fixed.yaml`.")
    if b"\x00" in data:  # ASCII text in UTF-16 without a byte-order mark has every other byte 0
        _fail(where, f"the file holds NUL bytes: it looks like UTF-16 or UTF-32 text without a byte-order mark, and "
                     f"configs are read as UTF-8: {fix}.")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        _fail(where, f"line {line}: not UTF-8 text (byte 0x{data[e.start]:02x}: {e.reason}); {fix}.")


def read_yaml(path: str | Path) -> dict:
    """Read a config file (UTF-8, with `_ConfigLoader`); it must hold one mapping."""
    p = Path(path)
    if not p.is_file():
        raise PrefoptError(f"{path}: no such config file.")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise PrefoptError(f"{path}: cannot be read ({e.strerror}); check the file's permissions.") from None
    try:
        raw = parse_yaml(_decode(str(path), data), str(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise PrefoptError(f"{path}:{at} is not valid YAML ({getattr(e, 'problem', e)}).") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise PrefoptError(f"{path}: expected a mapping of keys to values at the top level, got {type(raw).__name__}.")
    return raw


def override_pairs(argv: list[str]):
    """(key, value or None for a bare flag, the arguments as written) of each `--key value`,
    `--key=value` and bare `--flag`."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise PrefoptError(f"command line: expected --key value, got {arg!r}.")
        key, eq, value = arg[2:].partition("=")
        if eq:
            yield key, value, [arg]
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            yield key, argv[i + 1], argv[i:i + 2]
            i += 1
        else:
            yield key, None, [arg]
        i += 1


def parse_overrides(argv: list[str]) -> dict:
    """`--key value`, `--key=value` and bare `--flag` (true). Values are read as YAML scalars or
    flow collections, so `--beta 2.5`, `--bf16 false` and `--dataset_mixer '{data.jsonl: 1.0}'` work."""
    out: dict = {}
    for key, value, _ in override_pairs(argv):
        value = "true" if value is None else value
        try:
            out[key] = parse_yaml(value, f"command line (--{key})")
        except yaml.YAMLError:
            out[key] = value
    return out

