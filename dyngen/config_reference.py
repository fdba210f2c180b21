r"""Writes docs/config_reference.md: every field of every experiment config, with its type, default and comment.

  python -m dyngen.config_reference            # from the repository root; rewrites docs/config_reference.md
  python -m dyngen.config_reference --check    # exit 1 if the checked-in file is stale

Each `configs/*.py` that defines `get_config` is called without an argument (its default variant). The first
table lists every field of any config with its type, the value most configs give it and its description; one
table per config then lists the fields it sets otherwise. Descriptions are the comments written beside (or on
the lines just above) the assignment or keyword that sets the field, in configs/ and in the dyngen modules the
configs build their sections with (e.g. `dyngen.data.default_config`), found with `ast` and `tokenize`; no
config code other than `get_config` runs. tests/test_config_reference.py fails when the file is stale.
"""
import ast
import collections
import dataclasses
import importlib
import io
import pathlib
import re
import sys
import tokenize

from absl import app
from absl import flags
import ml_collections

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"
OUTPUT = REPO_ROOT / "docs" / "config_reference.md"
COMMAND = "python -m dyngen.config_reference"
_MAX_VALUE_CHARS = 70


# Reading the configs.


def config_modules() -> dict[str, object]:
  """{"configs/<name>.py": module} of every config file with a top-level get_config, sorted by name."""
  modules = {}
  for path in sorted(CONFIG_DIR.glob("*.py")):
    tree = ast.parse(path.read_text())
    if any(isinstance(node, ast.FunctionDef) and node.name == "get_config" for node in tree.body):
      modules[f"configs/{path.name}"] = importlib.import_module(f"dyngen.configs.{path.stem}")
  return modules


def _is_run_config(value) -> bool:
  """A nested whole run config (e.g. DyDiT's `pretrain`), listed as one field rather than all of its own."""
  return isinstance(value, ml_collections.ConfigDict) and "model" in value and "optimizer" in value


def leaf_fields(config, prefix="") -> dict[str, object]:
  """{"a.b": value} of every leaf of a ConfigDict, in the config's own (sorted) order."""
  fields = {}
  for key, value in config.items():
    path = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict) and not _is_run_config(value):
      fields.update(leaf_fields(value, f"{path}."))
    else:
      fields[path] = value
  return fields


def type_name(value) -> str:
  if _is_run_config(value):
    return "run config"
  if isinstance(value, ml_collections.ConfigDict):
    return "section"
  if isinstance(value, tuple):
    if value and all(isinstance(item, tuple) for item in value):
      return "tuple[tuple, ...]"
    kinds = sorted({type_name(item) for item in value})
    return f"tuple[{kinds[0]}, ...]" if len(kinds) == 1 else ("tuple" if not kinds else f"tuple[{' | '.join(kinds)}]")
  if value is None:
    return "None"
  return type(value).__name__


def value_text(value) -> str:
  if _is_run_config(value):
    return "(a whole run config)"
  text = repr(value)
  if len(text) > _MAX_VALUE_CHARS:
    count = f", {len(value)} entries" if isinstance(value, (tuple, list)) else ""
    text = text[:_MAX_VALUE_CHARS - 10].rstrip() + f" … {text[-1] if text[-1] in ')]}' else ''}{count}"
  return text.replace("|", "\\|")


# Comments in the source.


@dataclasses.dataclass
class Comment:
  path: str  # "sample.guidance_channels", or a leaf name alone when the section is unknown
  text: str
  source: str  # repository-relative file
  prefixed: bool  # whether `path` holds the section (an assignment to config.<section>.<field>)
  value: str | None  # value_text of the value assigned, when it is a literal; None otherwise


_TOOL_COMMENT = re.compile(r"(pylint|pytype|type|noqa|fmt|pragma)\b:?")


def _comments_by_line(source: str) -> dict[int, str]:
  """Line -> comment text; comments addressed to tools (pylint, pytype, ...) are not descriptions."""
  comments = {}
  for token in tokenize.generate_tokens(io.StringIO(source).readline):
    if token.type == tokenize.COMMENT:
      text = token.string.lstrip("#").strip()
      if text and not _TOOL_COMMENT.match(text):
        comments[token.start[0]] = text
  return comments


def _code_lines(source: str) -> set[int]:
  """Lines holding code (a token that is not a comment, newline or indentation)."""
  skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
  lines = set()
  for token in tokenize.generate_tokens(io.StringIO(source).readline):
    if token.type not in skip:
      lines.update(range(token.start[0], token.end[0] + 1))
  return lines


def _comment_for(node, comments, code_lines, lines) -> str:
  """The trailing comment on the node's last line, else the comment lines right above its first line.

  Either only when the node has its lines to itself: a comment beside `a=1, b=2,` or above a statement
  that sets a whole section does not describe each field on the line.
  """
  alone_at_start = lines[node.lineno - 1][:node.col_offset].strip() == ""
  rest = lines[node.end_lineno - 1][node.end_col_offset:].split("#", 1)[0].strip()
  trailing = comments.get(node.end_lineno)
  if trailing is not None and node.end_lineno in code_lines and rest in ("", ",", ")", "))", "),", ")),"):
    return trailing if alone_at_start else ""
  above = []
  line = node.lineno - 1
  while line in comments and line not in code_lines:
    above.insert(0, comments[line])
    line -= 1
  return " ".join(above) if alone_at_start else ""


def _literal_text(node) -> str | None:
  try:
    return value_text(ast.literal_eval(node))
  except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
    return None


def _attribute_path(node) -> str | None:
  """`config.sample.num_steps` -> "sample.num_steps" (the root name dropped); None for other targets."""
  parts = []
  while isinstance(node, ast.Attribute):
    parts.insert(0, node.attr)
    node = node.value
  return ".".join(parts) if isinstance(node, ast.Name) and parts else None


def _dict_items(call):
  """(name, value node, key node) of `dict(a=1)`, `{"a": 1}`, `ConfigDict(dict(...))`, `ConfigDict({...})`."""
  if isinstance(call, ast.Dict):
    return [(key.value, value, key) for key, value in zip(call.keys, call.values)
            if isinstance(key, ast.Constant) and isinstance(key.value, str)]
  if not isinstance(call, ast.Call):
    return []
  name = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")
  if name == "ConfigDict" and call.args:
    return _dict_items(call.args[0])
  if name == "dict":
    return [(keyword.arg, keyword.value, keyword) for keyword in call.keywords if keyword.arg]
  return []


def _docstring_fields(doc: str) -> dict[str, str]:
  """'Fields: name; data_dir (where; the default); ...' in a section builder's docstring -> {field: text}."""
  match = re.search(r"Fields:\s*(.*?)(?:\n\s*\n|$)", doc, re.DOTALL)
  if not match:
    return {}
  items, depth, current = [], 0, ""
  for char in " ".join(match.group(1).split()):
    depth += {"(": 1, ")": -1}.get(char, 0)
    if char == ";" and depth == 0:
      items.append(current.strip())
      current = ""
    else:
      current += char
  items.append(current.strip().rstrip("."))
  fields = {}
  for item in items:
    named = re.fullmatch(r"(\w+)\s*\((.*)\)", item)
    if named:
      fields[named.group(1)] = named.group(2)
  return fields


def source_comments(path: pathlib.Path) -> list[Comment]:
  """Every comment that describes a config field in one Python file."""
  source = path.read_text()
  comments, code_lines, lines = _comments_by_line(source), _code_lines(source), source.splitlines()
  relative = path.relative_to(REPO_ROOT).as_posix()
  in_configs = relative.startswith(("configs/", "dyngen/recipes/"))
  found = []

  def add(field_path, node, value, prefixed):
    text = _comment_for(node, comments, code_lines, lines)
    if text:
      found.append(Comment(field_path, text, relative, prefixed, _literal_text(value)))

  def add_items(prefix, value, prefixed):
    if not prefixed and not in_configs:
      return  # A dict of unknown section in library code may be anything (a feature spec, kwargs).
    for name, item, key in _dict_items(value):
      field_path = f"{prefix}.{name}" if prefix else name
      # A keyword's comment sits on its value's last line or above the keyword: span from the key to the value.
      span = ast.Assign(targets=[], value=item, lineno=key.lineno, col_offset=key.col_offset,
                        end_lineno=item.end_lineno, end_col_offset=item.end_col_offset)
      add(field_path, span, item, prefixed)
      add_items(field_path, item, prefixed)

  tree = ast.parse(source)
  for function in [tree] + [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)]:
    # A builder whose docstring starts with "`config.data` ..." or "config.dynamic: ..." names its section.
    doc = ast.get_docstring(function) if isinstance(function, ast.FunctionDef) else None
    hint = re.match(r"`?config\.(\w+)`?", doc or "")
    if hint:
      for name, text in _docstring_fields(doc).items():
        found.append(Comment(f"{hint.group(1)}.{name}", text, relative, True, None))
    for node in ast.walk(function) if isinstance(function, ast.FunctionDef) else function.body:
      if isinstance(node, ast.Assign) and len(node.targets) == 1:
        target = _attribute_path(node.targets[0])
        if target:
          add(target, node, node.value, True)
          add_items(target, node.value, True)
        elif isinstance(node.targets[0], ast.Name):
          add_items("", node.value, False)
      elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        call = node.value  # config.sample.update(dict(...))
        if isinstance(call.func, ast.Attribute) and call.func.attr == "update" and call.args:
          target = _attribute_path(call.func.value)
          if target:
            add_items(target, call.args[0], True)
      elif isinstance(node, ast.Return) and node.value is not None:
        add_items(hint.group(1) if hint else "", node.value, bool(hint))
  return found


def repository_sources() -> list[pathlib.Path]:
  """The config files and every dyngen module they imported (where their sections are built)."""
  files = {path.resolve() for path in CONFIG_DIR.glob("*.py")}
  package = REPO_ROOT / "dyngen"
  for name, module in list(sys.modules.items()):
    file = getattr(module, "__file__", None)
    if name.split(".")[0] == "dyngen" and file and file.endswith(".py"):
      path = pathlib.Path(file).resolve()
      if package in path.parents:
        files.add(path)
  return sorted(files)


class Descriptions:
  """Field path -> description: comments on an assignment of that path, or of its leaf in a config constant.

  The table of every field takes the comment written where the field gets its usual value (dyngen/recipes/common.py,
  then dyngen's section builders, then dyngen/recipes/families.py, then the rest); a config's own table takes the
  comment where the config's value is set, if not already the general one. A comment on an assignment of
  another literal value is the reason for that value, not a description of the field.
  """

  def __init__(self, comments: list[Comment]):
    def order(comment):
      rank = {"dyngen/recipes/common.py": 0, "dyngen/recipes/families.py": 2}.get(comment.source)
      return (rank if rank is not None else 1 if comment.source.startswith("dyngen/") else 3), comment.source

    self.exact = collections.defaultdict(list)
    self.by_leaf = collections.defaultdict(list)
    for comment in sorted(comments, key=order):
      if comment.prefixed:
        self.exact[comment.path].append(comment)
      else:
        self.by_leaf[comment.path.rsplit(".", 1)[-1]].append(comment)

  def _candidates(self, path):
    exact = self.exact.get(path, [])
    if exact:
      return exact
    leaf = self.by_leaf.get(path.rsplit(".", 1)[-1], [])
    return leaf if len({c.text for c in leaf}) == 1 else []

  def general(self, path: str, usual_value: str | None) -> str:
    for comment in self._candidates(path):
      if comment.value is None or comment.value == usual_value:
        return comment.text
    return ""

  def specific(self, path: str, value: str, config_name: str, usual_value: str) -> str:
    general = self.general(path, usual_value)
    matching = [c for c in self._candidates(path) if c.value == value and c.text != general]
    own = [c for c in matching if c.source == config_name]
    return (own or matching or [Comment("", "", "", False, None)])[0].text


# The document.


def _cell(text: str) -> str:
  return text.replace("|", "\\|").replace("\n", " ")


def _first_docstring_line(module) -> str:
  return (module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else ""


def render() -> str:
  """The whole markdown document."""
  modules = config_modules()
  configs = {name: module.get_config() for name, module in modules.items()}
  fields = {name: leaf_fields(config) for name, config in configs.items()}
  descriptions = Descriptions([c for path in repository_sources() for c in source_comments(path)])

  every_path = sorted({path for per_config in fields.values() for path in per_config})
  usual = {}
  for path in every_path:
    values = [value_text(per_config[path]) for per_config in fields.values() if path in per_config]
    usual[path] = collections.Counter(values).most_common(1)[0][0]

  sections = sorted({".".join(path.split(".")[:depth]) for path in every_path
                     for depth in range(1, path.count(".") + 1)})
  lines = [
      "# Config reference",
      "",
      f"Generated by `{COMMAND}` from {len(configs)} files in `configs/` (each `get_config()` without an",
      "argument, i.e. its default variant); do not edit by hand: after changing a config, run the command and commit",
      "the result (tests/test_config_reference.py fails when this file is stale). Any field can be set on the",
      "command line with `--config.<field>=<value>`; a name that is no field is refused with the closest one.",
      "",
      "## Every field",
      "",
      "\"Usual value\" is the value most configs give the field; \"in\" counts the configs that have it.",
      "",
      "| field | type | usual value | in | description |",
      "|---|---|---|---|---|",
  ]
  for path in sorted(every_path + [s for s in sections if descriptions.general(s, None)]):
    if path in sections:
      holders = [name for name in fields if any(p.startswith(path + ".") for p in fields[name])]
      lines.append(f"| `{path}` | section | | {len(holders)} | {_cell(descriptions.general(path, None))} |")
      continue
    holders = [name for name in fields if path in fields[name]]
    kinds = sorted({type_name(fields[name][path]) for name in holders})
    lines.append(f"| `{path}` | {' or '.join(kinds)} | `{usual[path]}` | {len(holders)} | "
                 f"{_cell(descriptions.general(path, usual[path]))} |")
  lines += ["", "## Per config", "",
            "Fields each config sets otherwise than the usual value above, and fields only some configs have.", ""]
  for name, per_config in fields.items():
    lines += [f"### `{name}`", "", _cell(_first_docstring_line(modules[name])), ""]
    changed = [path for path, value in per_config.items()
               if value_text(value) != usual[path] or any(path not in other for other in fields.values())]
    if not changed:
      lines += ["Every field has its usual value.", ""]
      continue
    lines += ["| field | value | note |", "|---|---|---|"]
    for path in sorted(changed):
      value = value_text(per_config[path])
      lines.append(f"| `{path}` | `{value}` | {_cell(descriptions.specific(path, value, name, usual[path]))} |")
    lines.append("")
  return "\n".join(lines).rstrip() + "\n"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  text = render()
  output = pathlib.Path(flags.FLAGS.output)
  if flags.FLAGS.check:
    if not output.exists() or output.read_text() != text:
      print(f"{output} is stale: run `{COMMAND}` and commit it", file=sys.stderr)
      sys.exit(1)
    print(f"{output} is current")
    return
  output.parent.mkdir(parents=True, exist_ok=True)
  output.write_text(text)
  print(f"wrote {output}")


if __name__ == "__main__":
  # Defined here, not at import: tests import this module beside benchmarks that define --output too.
  flags.DEFINE_string("output", str(OUTPUT), "Where to write the markdown reference.")
  flags.DEFINE_bool("check", False, "Only compare with --output; exit 1 if it is stale.")
  from dyngen import cli_errors  # pylint: disable=g-import-not-at-top
  cli_errors.run(main)
