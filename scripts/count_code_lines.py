"""Count code lines per file: non-blank lines that are not comments or docstrings.

    python scripts/count_code_lines.py [--rev COMMIT] [--exclude mnc_d2/modeling] mnc_d2

With ``--rev``, the files are read from that commit (``git show``), so two revisions can be compared.
"""
import argparse
import ast
import io
import subprocess
import sys
import tokenize


def code_lines(source: str) -> int:
    """Non-blank lines holding at least one token that is not a comment or a docstring."""
    docstring_lines = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                docstring_lines.update(range(first.lineno, first.end_lineno + 1))
    lines = set()
    skip = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in skip:
            lines.update(n for n in range(token.start[0], token.end[0] + 1) if n not in docstring_lines)
    return len(lines)


def _files(rev, roots, excludes):
    if rev:
        listed = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, *roots], capture_output=True, text=True,
                                check=True).stdout.split()
    else:
        listed = subprocess.run(["git", "ls-files", *roots], capture_output=True, text=True, check=True).stdout.split()
    return [f for f in listed if f.endswith(".py") and not any(f.startswith(e.rstrip("/") + "/") for e in excludes)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="+")
    parser.add_argument("--rev", default=None, help="git revision to read (default: the working tree)")
    parser.add_argument("--exclude", action="append", default=[])
    args = parser.parse_args(argv)
    total = 0
    for path in _files(args.rev, args.roots, args.exclude):
        if args.rev:
            source = subprocess.run(["git", "show", f"{args.rev}:{path}"], capture_output=True, text=True, check=True).stdout
        else:
            with open(path, encoding="utf-8") as f:
                source = f.read()
        n = code_lines(source)
        total += n
        print(f"{n:6d}  {path}")
    print(f"{total:6d}  total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
